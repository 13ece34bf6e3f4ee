"""LLaVA-1.5 through `transformers.LlavaForConditionalGeneration`.

One CLIP ViT-L/14 at 336 px, features of layer −2 with CLS dropped (576 rows for an image), projector
Linear·GELU·Linear, Vicuna-7B (reference/models.md §1, §3). The original work's stage-4 comparison
ran this model, under the name "Video-LLaVA", on the first of the five event frames it rendered per
clip: workload `llava-event`. `llava` is the plain image workload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlopt.errors import VloptError
from vlopt.models.base import Stage4Input, VisualFeatures, VLModel, Workload, seeded_init
from vlopt.models.tokenizer import DEFAULT_QUESTION, build_tokenizer
from vlopt.models.videollava import expand_placeholder

PROMPT = "USER: <image>\n{question}\nASSISTANT:"
# The original rendered five event frames per clip (pre-rendered PNGs) and gave LLaVA the first.
EVENT_FRAMES_RENDERED = 5

PRESETS = {
    "tiny": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=2048),
        vision=dict(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4)),
    # hub llava-hf/llava-1.5-7b-hf: Vicuna-7B-v1.5 (LlamaConfig defaults for the rest), CLIP-L/14-336.
    "7b": dict(
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, projection_dim=768)),
}
PRESETS["tiny-random"] = PRESETS["tiny"]   # no trained LLaVA-1.5 ships: its tiny is random too


@dataclass(frozen=True)
class SeedRow:
    """One row of the original work's stage-4 comparison (bf16/fp16 HF `generate()`, sampled, one RTX
    4090; reference/models.md §5 and perf_anchors.md), with the vlopt workload of the same shape."""

    label: str
    model: str
    workload: str
    stage4_s: float | None         # the original's stage-4 time per sample
    new_tokens: float | None       # its mean answer length
    tokens_per_s: float | None
    context_tokens: int | None     # as the original reported it
    note: str = ""


# The three-row table `vlopt bench --compare` prints next to what vlopt measures on the same shapes.
SEED_STAGE4_COMPARISON = (
    SeedRow("EventGPT-7B, 1 event frame", "eventgpt", "eventgpt-1frame", 1.0, 44.8, 45.0, 306,
            "the original fed frame 0 unpooled (577 rows, 636 context by models.md §3); vlopt's 1-frame "
            "workload pools it (578 rows)"),
    SeedRow("LLaVA-1.5-7B, 1 event frame (the original's \"Video-LLaVA\")", "llava", "llava-event",
            1.9, 90.7, 47.0, 626,
            "576 image rows; vlopt's prompt `USER: <image>\\n{q}\\nASSISTANT:` gives 597 context (models.md §3)"),
    SeedRow("Video-LLaVA-7B, 8 frames", "videollava", "videollava", None, None, None, None,
            "not in the original's stage-4 table (its runs of the real Video-LLaVA were 4-bit)"),
)


def preset_config(preset: str, tokenizer):
    from transformers import LlavaConfig

    p = PRESETS[preset]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    patches = (p["vision"]["image_size"] // p["vision"]["patch_size"]) ** 2
    return LlavaConfig(
        text_config=dict(model_type="llama", bos_token_id=1, eos_token_id=2, pad_token_id=3, **p["text"]),
        vision_config=dict(model_type="clip_vision_model", **p["vision"]),
        image_token_index=image_id, pad_token_id=3, image_seq_length=patches,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)


class LLaVA(VLModel):
    name = "llava"
    default_workload = "llava-event"
    vision_modules = ["model.vision_tower", "model.multi_modal_projector"]

    @property
    def text_model(self):
        return self.hf.model.language_model

    @property
    def decoder_prefix(self) -> str:
        return "model.language_model"

    @property
    def image_size(self) -> int:
        return int(self.hf.config.vision_config.image_size)

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.hf.model.vision_tower.embeddings.patch_embedding.weight.dtype

    @property
    def keeps_cls(self) -> bool:
        return self.hf.config.vision_feature_select_strategy == "full"

    @property
    def image_rows(self) -> int:
        v = self.hf.config.vision_config
        return (v.image_size // v.patch_size) ** 2 + int(self.keeps_cls)

    def visual_rows_for(self, workload: Workload) -> int:
        return self.image_rows

    def context_tokens_for(self, workload: Workload, question: str = DEFAULT_QUESTION) -> int:
        return len(self.prompt_ids(question))

    def load_input(self, path, workload: Workload):
        """An image (the first frame of a video input), or an event stream (`llava-event`)."""
        if workload.input_kind == "events":
            from vlopt.events import load_events, synthetic_events, validate_events

            if path is None:
                return validate_events(synthetic_events(), source="synthetic events")
            return load_events(path, allow_pickle=self.source.get("allow_pickle", False))
        if workload.input_kind != "image":
            raise VloptError(f"LLaVA takes an image or an event stream, not the workload '{workload.name}'")
        from vlopt.frames import load_frames, synthetic_video

        return synthetic_video(num_frames=1)[0] if path is None else load_frames(path, num_frames=1)[0]

    def preprocess(self, raw, question: str, workload: Workload) -> dict:
        from vlopt.frames import clip_preprocess

        if workload.input_kind == "events":
            from vlopt.events import render_frames

            raw = render_frames(raw, EVENT_FRAMES_RENDERED)[0]
        pixels = clip_preprocess([raw], self.image_size).to(self.device, self.vision_dtype)
        return {**self.prompt(question, workload), "pixels": pixels}

    def prompt(self, question: str, workload: Workload) -> dict:
        return {"question": question, "input_ids": self.prompt_ids(question)}

    def prompt_ids(self, question: str, rows: int | None = None) -> list[int]:
        """As `LlavaProcessor` makes them: `<image>` expanded to one id per visual row (`rows` when pruned)."""
        rows = self.image_rows if rows is None else rows
        return expand_placeholder(self.tokenizer, PROMPT.format(question=question),
                                  self.hf.config.image_token_index, rows)

    @torch.no_grad()
    def features(self, prepared: dict) -> VisualFeatures:
        """Tower (layer −2) → projector: [rows, hidden]; with CLS scores, one group (the image)."""
        attn = {"output_attentions": True} if self.need_cls_attention else {}
        out = self.hf.model.get_image_features(pixel_values=prepared["pixels"], return_dict=True, **attn)
        feats = torch.cat(list(out.pooler_output)).reshape(-1, self.hf.config.text_config.hidden_size)
        if not self.need_cls_attention:
            return VisualFeatures(feats)
        # The rows come from layer −2, whose attention map is attentions[−2]: [1, heads, P+1, P+1].
        cls = out.attentions[self.hf.config.vision_feature_layer][0, :, 0, :].float().mean(0)   # [P+1]
        if self.keeps_cls:
            cls = cls.clone()
            cls[0] = float("inf")      # the CLS row itself is always kept
        else:
            cls = cls[1:]
        return VisualFeatures(feats, cls, torch.zeros(cls.shape[0], dtype=torch.long))

    def assemble(self, prepared: dict, feats: torch.Tensor) -> Stage4Input:
        ids = prepared["input_ids"]
        token_id = self.hf.config.image_token_index
        if ids.count(token_id) != feats.shape[0]:   # pruned rows
            ids = self.prompt_ids(prepared["question"], rows=feats.shape[0])
        ids_t = torch.tensor([ids], device=self.device)
        embeds = self.embed(ids_t)
        where = (ids_t == token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(where, feats.to(embeds.dtype))
        start = ids.index(token_id)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        return Stage4Input(embeds, mask, [(start, start + feats.shape[0])])


def build(preset: str, *, dtype: torch.dtype, device: str, meta: bool = False) -> LLaVA:
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(("<image>",))
    config = preset_config(preset, tokenizer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if meta else device), seeded_init("meta" if meta else device):
            hf = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return LLaVA(hf.eval(), tokenizer, source={"preset": preset})


def load_checkpoint(path: Path, config: dict, *, dtype: torch.dtype, device: str) -> LLaVA:
    """A `LlavaForConditionalGeneration` folder: the hub's llava-hf layout (transformers-4.x names,
    `language_model.model.*`, `vision_tower.vision_model.*`), what transformers 5.x's save_pretrained
    writes (`language_model.model.*`, `vision_tower.*`), or the in-memory names (`model.*`);
    transformers' conversion mapping renames each to its modules."""
    from transformers import LlavaForConditionalGeneration

    from vlopt.models.eventgpt import load_tokenizer
    from vlopt.models.weights import from_pretrained_keeping_dtypes

    tokenizer = load_tokenizer(path)
    try:
        hf = from_pretrained_keeping_dtypes(LlavaForConditionalGeneration, path, dtype=dtype,
                                            local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise VloptError(f"{path} is not a loadable LLaVA checkpoint: {err}") from None
    return LLaVA(hf.to(device).eval(), tokenizer, source={"path": str(path)})

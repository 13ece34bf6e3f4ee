"""Video-LLaVA through `transformers.VideoLlavaForConditionalGeneration`.

Two CLIP-L/14 towers at 224 px, one projector, Vicuna-7B. An image gives 256 rows (CLS dropped), an
8-frame video 8×257 = 2056 rows (CLS kept). vlopt builds the pixel tensors and expands the
placeholders itself: the transformers video processor needs torchvision.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlopt.errors import VloptError
from vlopt.models.base import Stage4Input, VisualFeatures, VLModel, Workload, seeded_init
from vlopt.models.tokenizer import DEFAULT_QUESTION, build_tokenizer

PROMPT = {"video": "USER: <video>\n{question}\nASSISTANT:", "image": "USER: <image>\n{question}\nASSISTANT:"}

PRESETS = {
    "tiny-random": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=2048),
        vision=dict(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4)),
    "7b": dict(
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, projection_dim=768)),
}


def preset_config(preset: str, tokenizer):
    from transformers import VideoLlavaConfig

    p = PRESETS[preset]
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    patches = (p["vision"]["image_size"] // p["vision"]["patch_size"]) ** 2
    return VideoLlavaConfig(
        text_config=dict(model_type="llama", bos_token_id=1, eos_token_id=2, pad_token_id=3, **p["text"]),
        vision_config=dict(model_type="clip_vision_model", **p["vision"]),
        image_token_index=image_id, video_token_index=video_id, pad_token_id=3,
        image_seq_length=patches, video_seq_length=8 * (patches + 1),
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)


class VideoLLaVA(VLModel):
    name = "videollava"
    default_workload = "videollava"
    vision_modules = ["model.image_tower", "model.video_tower", "model.multi_modal_projector"]

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
        return self.hf.model.video_tower.embeddings.patch_embedding.weight.dtype

    @property
    def patches(self) -> int:
        v = self.hf.config.vision_config
        return (v.image_size // v.patch_size) ** 2

    def visual_rows(self, kind: str, frames: int) -> int:
        return self.patches if kind == "image" else frames * (self.patches + 1)

    def visual_rows_for(self, workload: Workload) -> int:
        return self.visual_rows(workload.input_kind, workload.frames)

    def context_tokens_for(self, workload: Workload, question: str = DEFAULT_QUESTION) -> int:
        return len(self.prompt_ids(workload.input_kind, question, workload.frames))

    def load_input(self, path, workload: Workload):
        from vlopt.frames import load_frames, synthetic_video

        if workload.input_kind not in ("video", "image"):
            raise VloptError(f"Video-LLaVA takes video or image input, not the workload '{workload.name}'")
        wanted = 1 if workload.input_kind == "image" else workload.frames
        if path is None:
            return list(synthetic_video())[:1] if wanted == 1 else list(synthetic_video())
        return load_frames(path, num_frames=wanted)   # an image workload takes the first frame

    def preprocess(self, raw, question: str, workload: Workload) -> dict:
        from vlopt.frames import clip_preprocess, sample_uniform

        kind = workload.input_kind
        frames = raw[:1] if kind == "image" else sample_uniform(raw, workload.frames)
        pixels = clip_preprocess(frames, self.image_size).to(self.device, self.vision_dtype)
        return {**self.prompt(question, workload), "pixels": pixels}

    def prompt(self, question: str, workload: Workload) -> dict:
        frames = 1 if workload.input_kind == "image" else workload.frames
        return {"kind": workload.input_kind, "question": question,
                "input_ids": self.prompt_ids(workload.input_kind, question, frames)}

    def prompt_ids(self, kind: str, question: str, frames: int, rows: int | None = None) -> list[int]:
        """Prompt ids with the placeholder expanded to one id per visual row (`rows` when pruned)."""
        cfg = self.hf.config
        token_id = cfg.image_token_index if kind == "image" else cfg.video_token_index
        rows = self.visual_rows(kind, frames) if rows is None else rows
        return expand_placeholder(self.tokenizer, PROMPT[kind].format(question=question), token_id, rows)

    @torch.no_grad()
    def features(self, prepared: dict) -> VisualFeatures:
        """Towers → projector: [rows, hidden] in the order the placeholders appear; with CLS scores,
        one group per frame."""
        m = self.hf.model
        attn = {"output_attentions": True} if self.need_cls_attention else {}
        if prepared["kind"] == "image":
            out = m.get_image_features(pixel_values=prepared["pixels"], return_dict=True, **attn)
        else:
            out = m.get_video_features(pixel_values_videos=prepared["pixels"][None], return_dict=True, **attn)
        feats = out.pooler_output.reshape(-1, out.pooler_output.shape[-1])
        if not self.need_cls_attention:
            return VisualFeatures(feats)
        # The features come from layer −2, whose attention map is attentions[−2]: [T, heads, P+1, P+1].
        cls = out.attentions[self.hf.config.vision_feature_layer][:, :, 0, :].float().mean(1)   # [T, P+1]
        if prepared["kind"] == "image":
            cls = cls[:, 1:]                   # the image path drops CLS
        else:
            cls = cls.clone()
            cls[:, 0] = float("inf")           # keep each frame's CLS row
        return VisualFeatures(feats, cls.reshape(-1), torch.arange(cls.shape[0]).repeat_interleave(cls.shape[1]))

    def assemble(self, prepared: dict, feats: torch.Tensor) -> Stage4Input:
        ids = prepared["input_ids"]
        if ids.count(self.hf.config.video_token_index if prepared["kind"] == "video"
                     else self.hf.config.image_token_index) != feats.shape[0]:   # pruned rows
            ids = self.prompt_ids(prepared["kind"], prepared["question"], 0, rows=feats.shape[0])
        return self.splice(ids, prepared["kind"], feats)

    def splice(self, ids: list[int], kind: str, feats: torch.Tensor) -> Stage4Input:
        cfg = self.hf.config
        token_id = cfg.image_token_index if kind == "image" else cfg.video_token_index
        ids_t = torch.tensor([ids], device=self.device)
        embeds = self.embed(ids_t)
        where = (ids_t == token_id)
        if int(where.sum()) != feats.shape[0]:
            raise VloptError(f"{int(where.sum())} placeholders but {feats.shape[0]} visual rows")
        embeds = embeds.masked_scatter(where[..., None].expand_as(embeds), feats.to(embeds.dtype))
        start = ids.index(token_id)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        return Stage4Input(embeds, mask, [(start, start + feats.shape[0])])


def expand_placeholder(tokenizer, prompt: str, token_id: int, rows: int) -> list[int]:
    """The HF processors' ids: the whole prompt tokenized at once, then the placeholder token repeated
    once per visual row. Tokenizing the text after the placeholder on its own would give it a
    leading-space piece, which a LLaMA tokenizer with `legacy=False` does not put after a special token."""
    ids = tokenizer(prompt).input_ids
    if ids.count(token_id) != 1:
        name = tokenizer.convert_ids_to_tokens(token_id)
        raise VloptError(f"the tokenizer splits the placeholder {name!r} (id {token_id}) of the prompt {prompt!r}; "
                         "it must be one added token of the tokenizer (added_tokens in tokenizer_config.json)")
    pos = ids.index(token_id)
    return ids[:pos] + [token_id] * rows + ids[pos + 1:]


def build(preset: str, *, dtype: torch.dtype, device: str, meta: bool = False) -> VideoLLaVA:
    from transformers import VideoLlavaForConditionalGeneration

    from vlopt.models import shipped

    if preset == shipped.TRAINED_PRESET:
        return shipped.load("videollava", dtype=dtype, device=device, meta=meta)
    tokenizer = build_tokenizer(("<image>", "<video>"))
    config = preset_config(preset, tokenizer)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if meta else device), seeded_init("meta" if meta else device):
            hf = VideoLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return VideoLLaVA(hf.eval(), tokenizer, source={"preset": preset})


def load_checkpoint(path: Path, config: dict, *, dtype: torch.dtype, device: str) -> VideoLLaVA:
    """A `VideoLlavaForConditionalGeneration` folder, in the legacy (hub, pre-5.0) key layout or the
    current one; transformers' conversion mapping renames legacy keys."""
    from transformers import VideoLlavaForConditionalGeneration

    from vlopt.models.eventgpt import load_tokenizer
    from vlopt.models.weights import from_pretrained_keeping_dtypes

    tokenizer = load_tokenizer(path)
    try:
        hf = from_pretrained_keeping_dtypes(VideoLlavaForConditionalGeneration, path, dtype=dtype,
                                            local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise VloptError(f"{path} is not a loadable Video-LLaVA checkpoint: {err}") from None
    return VideoLLaVA(hf.to(device).eval(), tokenizer, source={"path": str(path)})

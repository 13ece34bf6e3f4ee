"""EventGPT rebuilt from transformers parts (there is no class for it in transformers).

Structure (reference/models.md §1–2): CLIP ViT-L/14-336, last layer with CLS kept (577 rows a frame)
→ projector Linear·GELU·Linear → feature_adaptor Linear → spatio-temporal pooling (T temporal means
+ 577 spatial means) → spliced at the `<event>` placeholder (id −200) → LLaMA decoder.
The module tree mirrors the original `EventChatModel(LlamaForCausalLM)`: the vision parts hang off
`model.` so original checkpoints map with few renames and `save_pretrained` round-trips.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from vlopt.errors import VloptError
from vlopt.models.base import Stage4Input, VisualFeatures, VLModel, Workload, seeded_init
from vlopt.models.tokenizer import DEFAULT_QUESTION, SYSTEM_PROMPT, build_tokenizer

logger = logging.getLogger(__name__)

EVENT_TOKEN_INDEX = -200
PROMPT = SYSTEM_PROMPT + " USER: <ev_start><event><ev_end>\n{question} ASSISTANT:"

CLIP_L14_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu")
PRESETS = {
    "tiny-random": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=2048),
        vision=dict(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")),
    "7b": dict(
        text=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision=CLIP_L14_336),
}


class EventGPTConfig(LlamaConfig):
    model_type = "eventgpt"
    vision_config: dict | None = None
    num_event_frames: int = 5


class EventGPTForCausalLM(LlamaForCausalLM):
    config_class = EventGPTConfig

    def __init__(self, config: EventGPTConfig):
        super().__init__(config)
        vcfg = CLIPVisionConfig(**(config.vision_config or {}))
        self.model.visual_tower = CLIPVisionModel(vcfg)
        self.model.visual_projector = nn.Sequential(
            nn.Linear(vcfg.hidden_size, config.hidden_size), nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size))
        self.model.feature_adaptor = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def encode_frames(self, pixel_values: torch.Tensor, cls_attention: bool = False):
        """[T,3,S,S] → pooled features [T + P + 1, hidden] (P patches, CLS kept). With
        `cls_attention`, also the last layer's CLS attention to each position, averaged over
        frames and heads ([P + 1])."""
        out = self.model.visual_tower(pixel_values, output_attentions=cls_attention)
        feats = self.model.feature_adaptor(self.model.visual_projector(out.last_hidden_state))
        temporal = feats.mean(dim=1)        # one row per frame
        spatial = feats.mean(dim=0)         # one row per patch position (CLS included)
        pooled = torch.cat([temporal, spatial], dim=0)
        if not cls_attention:
            return pooled
        return pooled, out.attentions[-1][:, :, 0, :].float().mean(dim=(0, 1))


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("eventgpt", EventGPTConfig)
        AutoModelForCausalLM.register(EventGPTConfig, EventGPTForCausalLM)
    except ValueError:
        pass  # already registered in this process


def preset_config(preset: str) -> EventGPTConfig:
    p = PRESETS[preset]
    return EventGPTConfig(**p["text"], vision_config=dict(p["vision"]), tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3)


class EventGPT(VLModel):
    name = "eventgpt"
    default_workload = "eventgpt"
    vision_modules = ["model.visual_tower", "model.visual_projector", "model.feature_adaptor"]

    @property
    def text_model(self):
        return self.hf.model

    @property
    def decoder_prefix(self) -> str:
        return "model"

    @property
    def image_size(self) -> int:
        return int(self.hf.config.vision_config.get("image_size", 336))

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.hf.model.visual_tower.embeddings.patch_embedding.weight.dtype

    def visual_rows_for(self, workload: Workload) -> int:
        v = self.hf.config.vision_config
        return workload.frames + (v["image_size"] // v["patch_size"]) ** 2 + 1

    def context_tokens_for(self, workload: Workload, question: str = DEFAULT_QUESTION) -> int:
        return len(self.prompt_ids(question)) - 1 + self.visual_rows_for(workload)

    def load_input(self, path, workload: Workload):
        from vlopt.events import load_events, synthetic_events, validate_events

        if path is None:
            return validate_events(synthetic_events(), source="synthetic events")
        return load_events(path, allow_pickle=self.source.get("allow_pickle", False))

    def preprocess(self, raw, question: str, workload: Workload) -> dict:
        from vlopt.events import render_frames
        from vlopt.frames import clip_preprocess

        frames = render_frames(raw, workload.frames)
        pixels = clip_preprocess(frames, self.image_size).to(self.device, self.vision_dtype)
        return {**self.prompt(question, workload), "pixel_values": pixels}

    def prompt(self, question: str, workload: Workload) -> dict:
        return {"input_ids": self.prompt_ids(question)}

    def prompt_ids(self, question: str) -> list[int]:
        """The original `tokenizer_event_token`: tokenize the text around `<event>`, join with −200."""
        before, after = PROMPT.format(question=question).split("<event>")
        ids = self.tokenizer(before).input_ids
        return ids + [EVENT_TOKEN_INDEX] + self.tokenizer(after, add_special_tokens=False).input_ids

    @torch.no_grad()
    def features(self, prepared: dict) -> VisualFeatures:
        """Pooled rows; with CLS scores, the temporal rows are in group -1 (always kept) and the
        spatial rows in group 0, the CLS row itself scored +inf."""
        if not self.need_cls_attention:
            return VisualFeatures(self.hf.encode_frames(prepared["pixel_values"]))
        feats, cls = self.hf.encode_frames(prepared["pixel_values"], cls_attention=True)
        frames = feats.shape[0] - cls.shape[0]
        inf = torch.full((frames,), float("inf"), device=cls.device)
        cls = cls.clone()
        cls[0] = float("inf")                      # the CLS row itself is always kept
        return VisualFeatures(feats, torch.cat([inf, cls]),
                              torch.cat([torch.full((frames,), -1), torch.zeros(cls.shape[0], dtype=torch.long)]))

    def assemble(self, prepared: dict, feats: torch.Tensor) -> Stage4Input:
        return splice(self, prepared["input_ids"], feats.to(self.dtype))


def splice(vlm: EventGPT, ids: list[int], feats: torch.Tensor) -> Stage4Input:
    pos = ids.index(EVENT_TOKEN_INDEX)
    dev = vlm.device
    before = vlm.embed(torch.tensor([ids[:pos]], device=dev))
    after = vlm.embed(torch.tensor([ids[pos + 1:]], device=dev))
    embeds = torch.cat([before, feats[None].to(before.dtype), after], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
    return Stage4Input(embeds, mask, [(pos, pos + feats.shape[0])])


# ---- the builder and real checkpoints ------------------------------------------------------------

def build(preset: str, *, dtype: torch.dtype, device: str, meta: bool = False) -> EventGPT:
    from vlopt.models import shipped

    if preset == shipped.TRAINED_PRESET:
        return shipped.load("eventgpt", dtype=dtype, device=device, meta=meta)
    register_auto_classes()
    config = preset_config(preset)
    hf = _instantiate(config, dtype=dtype, device="meta" if meta else device)
    return EventGPT(hf.eval(), build_tokenizer(), source={"preset": preset})


def _instantiate(config, *, dtype, device):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), seeded_init(device):
            return EventGPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def is_original_checkpoint(config: dict) -> bool:
    return config.get("model_type") in ("EventChat_llama", "eventgpt")


# Original key prefix → vlopt key prefix (models.md §7). In transformers ≥5.18 CLIPVisionModel has no
# `vision_model.` level any more.
_ORIGINAL_PREFIXES = [
    ("model.visual_tower.visual_tower.vision_model.", "model.visual_tower."),
    ("model.visual_tower.vision_model.", "model.visual_tower."),
]
TOWER = "model.visual_tower."
# The top-level modules of a CLIPVisionModel (transformers ≥5.18 names, `vision_model.` stripped).
_CLIP_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
CLIP_HEAD_DIM = 64   # every OpenAI CLIP ViT (B/32, B/16, L/14, L/14-336) has 64-wide attention heads


def map_original_key(key: str) -> str:
    for old, new in _ORIGINAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_checkpoint(path: Path, config: dict, *, dtype: torch.dtype, device: str) -> EventGPT:
    """Load an EventGPT folder: either one vlopt wrote (model_type `eventgpt`) or the original
    release (`EventChat_llama`), whose CLIP tower is inside the weights or in the local folder
    named by `mm_visual_tower`."""
    from vlopt.models.weights import from_pretrained_keeping_dtypes, read_state_dict

    register_auto_classes()
    tokenizer = load_tokenizer(path)
    if config.get("model_type") == "eventgpt":   # written by save_pretrained (vlopt): the native route
        try:
            hf = from_pretrained_keeping_dtypes(EventGPTForCausalLM, path, dtype=dtype, local_files_only=True,
                                                use_safetensors=True)
        except (OSError, ValueError) as err:
            raise VloptError(f"{path} is not a loadable EventGPT checkpoint: {err}") from None
        return EventGPT(hf.to(device).eval(), tokenizer, source={"path": str(path)})
    dtype = dtype or torch.bfloat16   # the original release is bf16
    # position_ids are buffers transformers rebuilds; 4.x checkpoints saved them.
    state = {map_original_key(k): v for k, v in read_state_dict(path).items() if not k.endswith(".position_ids")}
    vision = _clip_tower(path, config, state)
    cfg = _config_from_original(path, config, state, vision)
    # The embedding row count comes from the weights (32000, or 32001 with <ev_patch>), not the config.
    rows = state["model.embed_tokens.weight"].shape[0]
    cfg.vocab_size = rows
    hf = _instantiate(cfg, dtype=dtype, device="meta")
    unexpected = [k for k in state if k not in hf.state_dict()]
    missing = [k for k in hf.state_dict() if k not in state and not k.endswith("position_ids")]
    if unexpected or missing:
        raise VloptError(f"{path}: the weights do not match an EventGPT model: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    hf.load_state_dict(state, strict=False, assign=True)
    hf = _materialize(hf, dtype=dtype, device=device)
    return EventGPT(hf.eval(), tokenizer, source={"path": str(path)})


def _materialize(hf, *, dtype, device):
    """After `assign=True` loading, rebuild non-persistent buffers (rotary inv_freq, CLIP position
    ids) that a meta-device skeleton lacks, then move to the target device and dtype."""
    for module in hf.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            module.inv_freq = fresh.inv_freq
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq
        if hasattr(module, "position_ids") and getattr(module, "position_ids").is_meta:
            n = module.position_ids.shape[-1]
            module.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
    return hf.to(device=device, dtype=dtype)


def split_clip_vision(state: dict) -> tuple[dict, list[str]]:
    """The CLIPVisionModel tensors of a CLIP folder (names without `vision_model.`), and the names of
    everything else: a full `CLIPModel` folder as the hub ships it also holds the text tower,
    `logit_scale` and the two projections, which the vision tower does not use."""
    vision, ignored = {}, []
    for key, tensor in state.items():
        name = key.removeprefix("vision_model.")
        if name.startswith(_CLIP_VISION_PARTS) and not name.endswith(".position_ids"):
            vision[name] = tensor
        else:
            ignored.append(key)
    return vision, ignored


def _summarize_keys(keys: list[str]) -> str:
    """`text_model.* (196), logit_scale, …`: one entry per top-level name."""
    groups: dict[str, int] = {}
    for k in keys:
        group = k.split(".")[0] + (".*" if "." in k else "")
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in sorted(groups.items()))


def clip_config_from_weights(state: dict, prefix: str = TOWER) -> dict:
    """A CLIPVisionConfig dict read off the tower's tensor shapes: width and patch size from the patch
    convolution, image size from the position-embedding count ((image/patch)² + 1), depth from the
    layer indices, MLP width from fc1, heads from CLIP's head width of 64. The activation is OpenAI
    CLIP's quick_gelu."""
    patch = state[prefix + "embeddings.patch_embedding.weight"]          # [width, channels, p, p]
    positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
    hidden, channels, patch_size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[-1])
    grid = round((positions - 1) ** 0.5)
    layer_ids = {int(k[len(prefix + "encoder.layers."):].split(".")[0]) for k in state
                 if k.startswith(prefix + "encoder.layers.")}
    if grid * grid != positions - 1 or not layer_ids or hidden % CLIP_HEAD_DIM:
        raise VloptError(f"the CLIP tower in the weights has an unexpected shape (width {hidden}, {positions} "
                         f"positions, {len(layer_ids)} layers); name a local CLIP folder in mm_visual_tower")
    return dict(image_size=grid * patch_size, patch_size=patch_size, hidden_size=hidden, num_channels=channels,
                intermediate_size=int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
                num_hidden_layers=max(layer_ids) + 1, num_attention_heads=hidden // CLIP_HEAD_DIM,
                hidden_act="quick_gelu")


def _clip_tower(path: Path, config: dict, state: dict) -> dict:
    """The CLIP vision config of an original release. It comes from the local CLIP folder named by
    `mm_visual_tower` when there is one (whose vision weights are added to `state` when the release's
    weights lack the tower), else from the shapes of the tower inside the weights."""
    from vlopt.models.weights import read_state_dict

    name = config.get("mm_visual_tower")
    tower_dir = Path(name or "")
    in_weights = any(k.startswith(TOWER) for k in state)
    if (tower_dir / "config.json").is_file():
        vision = json.loads((tower_dir / "config.json").read_text())
        vision = vision.get("vision_config", vision)  # a full CLIPModel folder nests it
        if not in_weights:
            tower, ignored = split_clip_vision(read_state_dict(tower_dir))
            if not tower:
                raise VloptError(f"{tower_dir} (mm_visual_tower) holds no CLIP vision weights "
                                 "(vision_model.* or embeddings./encoder.* tensors)")
            if ignored:
                logger.warning("note: %s: took the %d CLIP vision tensors, ignored the other %d (%s)",
                               tower_dir, len(tower), len(ignored), _summarize_keys(ignored))
            state.update({TOWER + k: v for k, v in tower.items()})
        return vision
    if in_weights:
        vision = clip_config_from_weights(state)
        logger.warning("note: %s: mm_visual_tower=%r is not a local folder; the CLIP config was read off the "
                       "tower's tensor shapes: %s", path, name, vision)
        return vision
    raise VloptError(
        f"{path}/config.json names mm_visual_tower={name!r}, which is not a local CLIP folder, and the weights "
        "hold no CLIP tower (model.visual_tower.visual_tower.vision_model.*); edit it to the path of a local "
        "clip-vit-large-patch14-336 folder (as the EventGPT README says)")


def _config_from_original(path: Path, config: dict, state: dict, vision: dict) -> EventGPTConfig:
    if config.get("use_event_qformer"):
        raise VloptError(f"{path}/config.json sets use_event_qformer; that variant was never released "
                         "and is not supported")
    keep = set(CLIP_L14_336) | {"layer_norm_eps", "num_channels", "projection_dim"}
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    text = {k: config[k] for k in text_keys if k in config}
    if "rope_theta" in text:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    if "model.feature_adaptor.weight" not in state:
        raise VloptError(f"{path}: no model.feature_adaptor weights; only checkpoints with "
                         "event_feature_adaptor are supported")
    return EventGPTConfig(**text, vision_config={k: v for k, v in vision.items() if k in keep})


def _missing_packages(modules: dict[str, str]) -> list[str]:
    """The pip names of the `modules` ({pip name: module}) that do not import."""
    import importlib

    missing = []
    for package, module in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def load_tokenizer(path: Path):
    """The folder's tokenizer: `tokenizer.json`, or the slow LLaMA files (`tokenizer.model` with
    `tokenizer_config.json`), which transformers converts with sentencepiece and protobuf."""
    from transformers import AutoTokenizer

    path = Path(path)
    has = {name: (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")}
    if not has["tokenizer.json"]:
        if not has["tokenizer.model"]:
            raise VloptError(f"{path} has no tokenizer: it needs tokenizer.json, or tokenizer.model with "
                             "tokenizer_config.json (the slow LLaMA tokenizer files)")
        if not has["tokenizer_config.json"]:
            raise VloptError(f"{path} has tokenizer.model but no tokenizer_config.json, which names the tokenizer "
                             "class and its special tokens; copy it from the release")
        missing = _missing_packages({"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"})
        if missing:
            raise VloptError(f"{path} has only the slow LLaMA tokenizer (tokenizer.model); reading it needs the "
                             f"package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: "
                             f"pip install {' '.join(missing)}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types here; all mean "no usable tokenizer"
        raise VloptError(f"{path}: its tokenizer does not load offline ({type(err).__name__}: {err})") from None

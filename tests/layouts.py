"""Write small checkpoints in the layouts real releases use (models.md §7), from a tiny model."""

import json
from pathlib import Path

from safetensors.torch import save_file


def write_original_eventgpt(vlm, folder: Path, *, tower: str = "inside", extra_row: bool = True) -> Path:
    """The original EventGPT release layout: model_type EventChat_llama, CLIP under
    `model.visual_tower.visual_tower.vision_model.` (tower="inside") or in a separate local CLIP
    folder named by `mm_visual_tower` (tower="folder"). `extra_row` adds the `<ev_patch>` row."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True)
    clip_dir = folder.parent / (folder.name + "-clip")
    clip_dir.mkdir()
    cfg = vlm.hf.config
    state = {k: v.detach().clone().contiguous() for k, v in vlm.hf.state_dict().items()}
    if extra_row:   # the release resizes embeddings after adding <ev_patch>
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            state[k] = torch.cat([state[k], torch.zeros_like(state[k][:1])])
    tower_state = {k.removeprefix("model.visual_tower."): v for k, v in state.items()
                   if k.startswith("model.visual_tower.")}
    state = {k: v for k, v in state.items() if not k.startswith("model.visual_tower.")}
    if tower == "inside":
        state.update({"model.visual_tower.visual_tower.vision_model." + k: v for k, v in tower_state.items()})
    save_file({"vision_model." + k: v for k, v in tower_state.items()}, str(clip_dir / "model.safetensors"))
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **cfg.vision_config}))
    save_file(state, str(folder / "model.safetensors"))
    config = {
        "model_type": "EventChat_llama", "architectures": ["EventChatModel"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 3, "tie_word_embeddings": False, "mm_visual_tower": str(clip_dir),
        "event_feature_adaptor": True, "mm_use_im_patch_token": True, "mm_use_im_start_end": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    vlm.tokenizer.save_pretrained(str(folder))
    return folder


_LEGACY = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
           ("model.image_tower.", "image_tower.vision_model."), ("model.video_tower.", "video_tower.vision_model."),
           ("model.multi_modal_projector.", "multi_modal_projector.")]


def write_legacy_videollava(vlm, folder: Path) -> Path:
    """The hub `Video-LLaVA-7B-hf` layout (transformers 4.x key names)."""
    folder = Path(folder)
    vlm.hf.save_pretrained(str(folder))   # for config.json
    for f in folder.glob("*.safetensors"):
        f.unlink()
    state = {}
    for k, v in vlm.hf.state_dict().items():
        for new, old in _LEGACY:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        state[k] = v.detach().clone().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["transformers_version"] = "4.41.0"
    (folder / "config.json").write_text(json.dumps(cfg))
    vlm.tokenizer.save_pretrained(str(folder))
    return folder

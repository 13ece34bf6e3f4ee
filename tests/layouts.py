"""Write small checkpoints in the layouts real releases use (models.md §7), from a tiny model."""

import json
from pathlib import Path

from safetensors.torch import save_file


def write_original_eventgpt(vlm, folder: Path, *, tower: str = "inside", extra_row: bool = True,
                            clip: str = "vision", tokenizer: str = "fast") -> Path:
    """The original EventGPT release layout: model_type EventChat_llama, CLIP under
    `model.visual_tower.visual_tower.vision_model.` (tower="inside") or in a separate local CLIP
    folder named by `mm_visual_tower` (tower="folder"). `extra_row` adds the `<ev_patch>` row.
    `clip` says how that CLIP folder is written: "vision" (a CLIPVisionModel, `vision_model.*`
    keys), "hub" (a full CLIPModel as `openai/clip-vit-large-patch14-336` is, written by transformers'
    save_pretrained) or "hub-bin" (that folder's transformers-4.x `pytorch_model.bin`, position-id
    buffers included). `tokenizer="slow"` ships only the slow LLaMA tokenizer files."""
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
    if clip == "vision":
        save_file({"vision_model." + k: v for k, v in tower_state.items()}, str(clip_dir / "model.safetensors"))
        (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **cfg.vision_config}))
    else:
        write_hub_clip(tower_state, cfg.vision_config, clip_dir, legacy_bin=clip == "hub-bin")
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
    if tokenizer == "slow":
        write_slow_llama_tokenizer(folder, legacy=False)
    else:
        vlm.tokenizer.save_pretrained(str(folder))
    return folder


def write_hub_clip(tower_state: dict, vision_config: dict, folder: Path, *, legacy_bin: bool = False) -> Path:
    """A full `CLIPModel` folder (text tower, `logit_scale`, `visual_projection`, `text_projection`)
    whose vision tower holds `tower_state`, written by transformers' own `save_pretrained`. With
    `legacy_bin`, the weights are the hub's transformers-4.x `pytorch_model.bin` instead: the same
    keys plus the `position_ids` buffers 4.x saved."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(vision_config), projection_dim=24))
    clip.vision_model.load_state_dict(tower_state)
    clip.save_pretrained(str(folder))
    if legacy_bin:
        state = {k: v.contiguous() for k, v in clip.state_dict().items()}
        for tower, n in (("vision_model", clip.vision_model.embeddings.position_ids.shape[-1]),
                         ("text_model", text["max_position_embeddings"])):
            state[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]
        (Path(folder) / "model.safetensors").unlink()
        torch.save(state, Path(folder) / "pytorch_model.bin")
    return Path(folder)


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


def llama_sentencepiece_model() -> bytes:
    """A small SentencePiece BPE model with LLaMA's settings (unk 0, bos 1, eos 2, byte fallback,
    dummy prefix, digits split), trained on the prompts: the kind of `tokenizer.model` a LLaMA
    release ships."""
    import io

    import sentencepiece as spm

    from vlopt.models.tokenizer import _CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    return buf.getvalue()


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_slow_llama_tokenizer(folder: Path, *, legacy: bool, added: tuple[str, ...] = (),
                               pad: str | None = None) -> dict[str, int]:
    """The slow-tokenizer files a LLaMA-based hub release ships (`tokenizer.model`,
    `tokenizer_config.json` in the transformers-4.x form, `special_tokens_map.json`, `added_tokens.json`;
    no tokenizer.json), replacing any tokenizer files in `folder`. Returns the added tokens' ids."""
    folder = Path(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    model = llama_sentencepiece_model()
    (folder / "tokenizer.model").write_bytes(model)
    import sentencepiece as spm
    size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    ids = {tok: size + i for i, tok in enumerate(added)}
    decoder = {str(i): _added_token(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    decoder.update({str(i): _added_token(t) for t, i in ids.items()})
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": legacy,
        "model_max_length": 4096, "pad_token": pad, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **({"pad_token": pad} if pad else {})}))
    if ids:
        (folder / "added_tokens.json").write_text(json.dumps(ids))
    return ids


# In-memory LlavaForConditionalGeneration names → the hub's llava-hf names (transformers 4.x).
_LLAVA_HUB = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower.vision_model."),
              ("model.multi_modal_projector.", "multi_modal_projector.")]


def write_llava(hf, folder: Path, *, keys: str, legacy_tokenizer: bool = False) -> Path:
    """A `LlavaForConditionalGeneration` folder with the slow LLaMA tokenizer (`<image>`, `<pad>` added
    as llava-hf adds them). `keys`: "saved" (transformers' own save_pretrained, as it writes them),
    "hub" (the llava-hf repository's transformers-4.x names, `vision_tower.vision_model.*`) or
    "modules" (the in-memory module names, `model.language_model.*`)."""
    folder = Path(folder)
    hf.save_pretrained(str(folder))
    if keys != "saved":
        for f in folder.glob("*.safetensors"):
            f.unlink()
        state = {}
        for k, v in hf.state_dict().items():
            for new, old in (_LLAVA_HUB if keys == "hub" else []):
                if k.startswith(new):
                    k = old + k[len(new):]
                    break
            state[k] = v.detach().clone().contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if keys == "hub":
            cfg = json.loads((folder / "config.json").read_text())
            cfg["transformers_version"] = "4.36.0.dev0"
            (folder / "config.json").write_text(json.dumps(cfg))
    write_slow_llama_tokenizer(folder, legacy=legacy_tokenizer, added=("<image>", "<pad>"), pad="<pad>")
    return folder

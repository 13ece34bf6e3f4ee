import json

import numpy as np
import pytest
import torch

from layouts import llama_sentencepiece_model, write_legacy_videollava, write_original_eventgpt, write_slow_llama_tokenizer
from vlopt.decode import teacher_forced_logits
from vlopt.errors import VloptError
from vlopt.models import get_workload, load_model


def _logits(vlm):
    wl = get_workload(vlm.default_workload)
    inp = vlm.run_stages(None, wl, "What is here?")
    return teacher_forced_logits(vlm, inp, [10, 20, 30, 40])


@pytest.mark.parametrize("tower", ["inside", "folder"])
def test_original_eventgpt_layout_loads_to_the_same_logits(eventgpt, tmp_path, tower):
    folder = write_original_eventgpt(eventgpt, tmp_path / "EventGPT-7b", tower=tower)
    loaded = load_model(path=str(folder), device="cpu")
    assert loaded.name == "eventgpt"
    assert loaded.hf.model.embed_tokens.weight.shape[0] == eventgpt.hf.config.vocab_size + 1  # <ev_patch>
    expected = _logits(eventgpt)
    torch.testing.assert_close(_logits(loaded)[:, : expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", ["hub", "hub-bin"])
def test_original_eventgpt_with_the_hub_clip_folder(eventgpt, tmp_path, caplog, clip):
    """`mm_visual_tower` names a full CLIPModel folder as the hub ships it: the vision tensors are
    taken, the text tower, logit_scale and projections ignored, and that is said in one line."""
    folder = write_original_eventgpt(eventgpt, tmp_path / "EventGPT-7b", tower="folder", clip=clip)
    clip_dir = tmp_path / "EventGPT-7b-clip"
    assert json.loads((clip_dir / "config.json").read_text())["model_type"] == "clip"
    with caplog.at_level("WARNING", logger="vlopt"):
        loaded = load_model(path=str(folder), device="cpu")
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("vlopt")]
    assert len(notes) == 1 and "ignored" in notes[0]
    for name in ("text_model.*", "logit_scale", "visual_projection", "text_projection"):
        assert name in notes[0]
    expected = _logits(eventgpt)
    torch.testing.assert_close(_logits(loaded)[:, : expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


def test_original_eventgpt_with_clip_in_the_weights_needs_no_clip_folder(tmp_path, caplog):
    """The release's weights hold the tower and mm_visual_tower is a hub name: the CLIP config is read
    off the tensor shapes (a tower with CLIP's 64-wide heads, as every OpenAI CLIP has)."""
    from vlopt.models import eventgpt as egpt
    from vlopt.models.tokenizer import build_tokenizer

    vision = dict(image_size=42, patch_size=14, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=2, hidden_act="quick_gelu")
    cfg = egpt.EventGPTConfig(**egpt.PRESETS["tiny-random"]["text"], vision_config=vision, tie_word_embeddings=False,
                              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    source = egpt.EventGPT(egpt._instantiate(cfg, dtype=torch.float32, device="cpu").eval(), build_tokenizer(),
                           source={"preset": "tiny"})
    folder = write_original_eventgpt(source, tmp_path / "EventGPT-7b", tower="inside")
    release = json.loads((folder / "config.json").read_text())
    release["mm_visual_tower"] = "openai/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(release))
    import shutil
    shutil.rmtree(tmp_path / "EventGPT-7b-clip")
    with caplog.at_level("WARNING", logger="vlopt"):
        loaded = load_model(path=str(folder), device="cpu")
    assert any("read off the tower's tensor shapes" in r.getMessage() for r in caplog.records)
    inferred = loaded.hf.config.vision_config
    assert {k: inferred[k] for k in vision} == vision
    expected = _logits(source)
    torch.testing.assert_close(_logits(loaded)[:, : expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


def test_original_eventgpt_with_only_the_slow_tokenizer(eventgpt, tmp_path):
    import sentencepiece as spm

    folder = write_original_eventgpt(eventgpt, tmp_path / "EventGPT-7b", tokenizer="slow")
    assert not (folder / "tokenizer.json").exists() and (folder / "tokenizer.model").is_file()
    loaded = load_model(path=str(folder), device="cpu")
    text = "A chat between a curious human and an artificial intelligence assistant."
    reference = spm.SentencePieceProcessor(model_proto=llama_sentencepiece_model())
    assert loaded.tokenizer(text).input_ids == [1] + reference.encode(text)
    inp = loaded.run_stages(None, get_workload("eventgpt"), "What is here?")
    assert len(loaded.stage4(inp, new_tokens=3).tokens) == 3


@pytest.mark.parametrize("module,package", [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")])
def test_a_missing_slow_tokenizer_package_is_named(eventgpt, tmp_path, monkeypatch, module, package):
    import sys

    folder = write_original_eventgpt(eventgpt, tmp_path / "EventGPT-7b", tokenizer="slow")
    monkeypatch.setitem(sys.modules, module, None)     # makes `import module` fail
    with pytest.raises(VloptError, match=f"only the slow LLaMA tokenizer.*needs the package {package}: pip install {package}"):
        load_model(path=str(folder), device="cpu")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(VloptError, match="tokenizer.model but no tokenizer_config.json"):
        load_model(path=str(folder), device="cpu")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(VloptError, match="has no tokenizer: it needs tokenizer.json, or tokenizer.model"):
        load_model(path=str(folder), device="cpu")


def test_original_eventgpt_without_a_local_clip_folder_is_explained(eventgpt, tmp_path):
    folder = write_original_eventgpt(eventgpt, tmp_path / "ck", tower="folder")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["mm_visual_tower"] = "openai/clip-vit-large-patch14-336"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VloptError, match="not a local CLIP folder.*edit it"):
        load_model(path=str(folder), device="cpu")


def test_legacy_videollava_layout_loads_to_the_same_logits(videollava, tmp_path):
    folder = write_legacy_videollava(videollava, tmp_path / "Video-LLaVA-7B-hf")
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert any(k.startswith("language_model.model.") for k in f.keys())
    loaded = load_model(path=str(folder), device="cpu")
    torch.testing.assert_close(_logits(loaded), _logits(videollava), rtol=0, atol=0)


def test_folders_that_are_not_checkpoints_are_explained(tmp_path):
    with pytest.raises(VloptError, match="not a checkpoint folder"):
        load_model(path=str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VloptError, match="'bert' is none of the known layouts"):
        load_model(path=str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VloptError, match="not valid JSON"):
        load_model(path=str(tmp_path), device="cpu")


def test_eventgpt_checkpoint_with_wrong_weights_is_explained(eventgpt, tmp_path):
    folder = write_original_eventgpt(eventgpt, tmp_path / "ck", tower="inside")
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(VloptError, match="missing \\['model.norm.weight'\\]"):
        load_model(path=str(folder), device="cpu")


def _videollava_processor(tokenizer, image_size, monkeypatch):
    """transformers' VideoLlavaProcessor with its PIL image processor. Its video processor needs
    torchvision, so video frames go through the image processor one by one, as transformers 4.x's
    VideoLlavaImageProcessor did; the processor's own token expansion and tokenization run unchanged."""
    from transformers import BatchFeature, VideoLlavaImageProcessor, VideoLlavaProcessor
    from transformers.processing_utils import ProcessorMixin

    images = VideoLlavaImageProcessor(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})

    class FramesThroughTheImageProcessor:
        def __call__(self, videos, **kwargs):
            return BatchFeature({"pixel_values_videos": np.stack([
                images(images=list(v), return_tensors="np", return_legacy_image_output=False)["pixel_values"]
                for v in videos])})

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    return VideoLlavaProcessor(image_processor=images, video_processor=FramesThroughTheImageProcessor(),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)


@pytest.mark.parametrize("legacy", [True, False])
def test_videollava_prompt_ids_and_pixels_equal_the_hf_processor(videollava, tmp_path, monkeypatch, legacy):
    from vlopt.frames import synthetic_video
    from vlopt.models import get_workload

    folder = write_legacy_videollava(videollava, tmp_path / "Video-LLaVA-7B-hf")
    ids = write_slow_llama_tokenizer(folder, legacy=legacy, added=("<image>", "<video>", "<pad>"), pad="<pad>")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(image_token_index=ids["<image>"], video_token_index=ids["<video>"], pad_token_id=ids["<pad>"])
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(path=str(folder), device="cpu")
    assert type(loaded.tokenizer).__name__ == "LlamaTokenizer" and loaded.tokenizer.legacy is legacy
    processor = _videollava_processor(loaded.tokenizer, loaded.image_size, monkeypatch)
    video = list(synthetic_video(num_frames=8))
    question = "What are the key elements in this scene?"
    for kind, inputs in [("video", {"videos": [video]}), ("image", {"images": [video[0]]})]:
        wl = get_workload("videollava" if kind == "video" else "videollava-image")
        prepared = loaded.preprocess(video, question, wl)
        theirs = processor(text=f"USER: <{kind}>\n{question}\nASSISTANT:", return_tensors="pt", **inputs)
        assert prepared["input_ids"] == theirs["input_ids"][0].tolist(), f"{kind}, legacy={legacy}"
        pixels = theirs["pixel_values_videos"][0] if kind == "video" else theirs["pixel_values_images"]
        assert torch.equal(prepared["pixels"], pixels.float())
    # The flag changes the ids (a leading-space piece after the placeholder only with legacy=True).
    after = prepared["input_ids"][len(prepared["input_ids"]) - prepared["input_ids"][::-1].index(ids["<image>"])]
    assert loaded.tokenizer.convert_ids_to_tokens(after) == ("▁" if legacy else "<0x0A>")

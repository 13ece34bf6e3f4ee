"""The `llava` family (LLaVA-1.5): presets, workloads, checkpoints written by transformers, and every
built-in pass on the tiny model."""

import json

import numpy as np
import pytest
import torch

from layouts import write_llava
from vlopt.decode import teacher_forced_logits
from vlopt.errors import VloptError
from vlopt.frames import synthetic_video
from vlopt.models import describe, get_workload, load_model
from vlopt.testing import run_pass

QUESTION = "What are the key elements in this scene?"
IMAGE_ID, PAD_ID = 400, 401        # `<image>`, `<pad>` after the 400 pieces of the test SentencePiece model


def _transformers_llava():
    """A tiny random LlavaForConditionalGeneration built by transformers alone (image 42 px, 9 rows)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID),
        vision_config=dict(model_type="clip_vision_model", image_size=42, patch_size=14, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        image_token_index=IMAGE_ID, pad_token_id=PAD_ID, image_seq_length=9, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(config).eval()


def _llava_processor(tokenizer, image_size):
    """transformers' LlavaProcessor as llava-hf configures it, with the PIL CLIP image processor."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("keys", ["saved", "hub", "modules"])
def test_a_transformers_llava_folder_gives_its_logits_and_greedy_tokens(tmp_path, keys):
    from PIL import Image
    from safetensors import safe_open

    hf = _transformers_llava()
    folder = write_llava(hf, tmp_path / "llava-1.5-7b-hf", keys=keys)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    expected_prefix = {"saved": "language_model.model.", "hub": "language_model.model.", "modules": "model.language_model."}
    assert any(k.startswith(expected_prefix[keys]) for k in names)
    assert any(k.startswith("vision_tower.vision_model.") for k in names) is (keys == "hub")

    loaded = load_model(path=str(folder), dtype="float32", device="cpu")
    assert loaded.name == "llava" and loaded.image_rows == 9
    image = synthetic_video(num_frames=1, height=60, width=80)[0]
    Image.fromarray(image).save(tmp_path / "frame.png")
    inp = loaded.run_stages(str(tmp_path / "frame.png"), get_workload("llava"), QUESTION)

    theirs = _llava_processor(loaded.tokenizer, 42)(text=f"USER: <image>\n{QUESTION}\nASSISTANT:", images=[image],
                                                     return_tensors="pt")
    prompt = theirs["input_ids"][0].tolist()
    assert loaded.prompt(QUESTION, get_workload("llava"))["input_ids"] == prompt
    assert inp.context_tokens == len(prompt) and inp.visual_tokens == 9

    n = 12
    with torch.no_grad():
        generated = hf.generate(**theirs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    assert loaded.stage4(inp, new_tokens=n).tokens == generated
    with torch.no_grad():
        ids = torch.tensor([prompt + generated[:-1]])
        hf_logits = hf(input_ids=ids, pixel_values=theirs["pixel_values"]).logits[0, -n:].float()
    torch.testing.assert_close(teacher_forced_logits(loaded, inp, generated), hf_logits, rtol=1e-5, atol=1e-5)


def test_a_llava_folder_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_llava(_transformers_llava(), tmp_path / "llava", keys="hub")
    state = load_file(str(folder / "model.safetensors"))
    del state["multi_modal_projector.linear_2.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VloptError, match="missing .*multi_modal_projector.linear_2.weight"):
        load_model(path=str(folder), device="cpu")


def test_presets_and_workloads_have_the_original_shapes():
    tiny = load_model("llava", preset="tiny", dtype="float32", device="cpu")
    event = tiny.run_stages(None, get_workload("llava-event"), QUESTION)
    image = tiny.run_stages(None, get_workload("llava"), QUESTION)
    assert event.visual_tokens == image.visual_tokens == tiny.image_rows == 4
    assert get_workload("llava-event").new_tokens == get_workload("llava").new_tokens == 90
    seven = describe("llava", "7b")
    assert seven["visual_tokens"] == 576                            # CLIP-L/14-336, CLS dropped
    assert abs(seven["params"] / 1e9 - 7.063) < 0.001               # models.md §1
    assert seven["context_tokens"] == 576 + len(tiny.prompt_ids(QUESTION, rows=0))


def test_the_event_workload_renders_the_first_of_five_event_frames(monkeypatch):
    from vlopt import frames
    from vlopt.events import render_frames, synthetic_events

    vlm = load_model("llava", preset="tiny", dtype="float32", device="cpu")
    seen = []
    monkeypatch.setattr(frames, "clip_preprocess", lambda imgs, size, f=frames.clip_preprocess: seen.extend(imgs) or f(imgs, size))
    vlm.run_stages(None, get_workload("llava-event"), QUESTION)
    assert len(seen) == 1 and np.array_equal(seen[0], render_frames(synthetic_events(), 5)[0])


def test_llava_refuses_a_video_workload():
    vlm = load_model("llava", preset="tiny", dtype="float32", device="cpu")
    with pytest.raises(VloptError, match="workload 'videollava' is for videollava, not llava"):
        vlm.workload("videollava")


def test_the_seed_comparison_names_registered_workloads():
    from vlopt.models.llava import SEED_STAGE4_COMPARISON

    rows = {r.model: r for r in SEED_STAGE4_COMPARISON}
    assert set(rows) == {"eventgpt", "llava", "videollava"}
    for r in rows.values():
        assert get_workload(r.workload, model=r.model)
    assert (rows["eventgpt"].stage4_s, rows["eventgpt"].new_tokens) == (1.0, 44.8)
    assert (rows["llava"].stage4_s, rows["llava"].new_tokens) == (1.9, 90.7)


# Settings a pass needs on the tiny model (or a second variant worth running); every other registered
# pass runs with its defaults, so a pass added later is covered too.
PASS_VARIANTS = {
    "attention": [{"implementation": "eager"}, {"implementation": "sdpa"}],
    "dtype": [{"dtype": "bfloat16"}],
    "fast_decode": [{"compile": False}],
    "int4": [{"group_size": 32}],
    "nf4": [{"compute_dtype": "float32"}],
    "fp4": [{"compute_dtype": "float32"}],
    "layer_skip": [{"draft_layers": 2, "draft_tokens": 3}],
    "feature_cache": [{"scope": "request"}, {"scope": "disk"}],   # prefix: below, after fast_decode
    "prune_visual": [{"method": "cls_attention", "keep": 0.5}, {"method": "fastv", "keep": 0.5, "after_layer": 2}],
}
# Passes that need a distributed launch (run on two gloo ranks below), with the refusal they give here.
REFUSED_HERE = {"tensor_parallel": "torchrun"}


def _builtin_pass_configs():
    from vlopt.plugins import get_registry

    builtin = [t for t, e in sorted(get_registry().passes.items()) if e.plugin != "lmhead_int8"]
    return [{"type": t, **v} for t in builtin for v in PASS_VARIANTS.get(t, [{}])]


@pytest.mark.parametrize("cfg", _builtin_pass_configs(), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_builtin_pass_runs_on_tiny_llava(cfg, tmp_path):
    if cfg.get("scope") == "disk":
        cfg = {**cfg, "cache_dir": str(tmp_path / "features")}
    if cfg["type"] in REFUSED_HERE:
        # refused before the run by the pass's preflight (a one-line VloptError)
        with pytest.raises(VloptError, match=REFUSED_HERE[cfg["type"]]):
            run_pass(cfg, model="llava")
        return
    if cfg["type"] == "distill":
        # distill trains on the scene task, which has no LLaVA-1.5 model: a clear refusal
        with pytest.raises(AssertionError, match="distill trains on vlopt's scene task"):
            run_pass(cfg, model="llava")
        return
    row = run_pass(cfg, model="llava")
    assert row.applied
    if row.changes_weights and cfg["type"] != "dtype":     # quantization: the decoder only
        assert row.modules_touched and all(".layers." in n for n in row.modules_touched)
        assert any("vision_tower" in n or "projector" in n for n in row.modules_skipped)


def test_prefix_reuse_runs_on_tiny_llava_after_fast_decode(tmp_path):
    from vlopt.testing import TINY_BENCH, run_recipe

    result = run_recipe({"model": {"name": "llava", "preset": "tiny", "dtype": "float32", "device": "cpu"},
                         "benchmark": TINY_BENCH,
                         "passes": [{"type": "fast_decode", "compile": False}, {"type": "feature_cache", "scope": "prefix"}]},
                        tmp_path)
    assert [r.status for r in result.rows] == ["applied", "applied"]


def test_tensor_parallel_on_two_gloo_ranks_gives_the_single_process_logits(tmp_path):
    import torch.multiprocessing as mp

    from test_tensor_parallel import _free_port, _worker

    mp.spawn(_worker, args=(2, _free_port(), "llava", str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(r["sharded"], r["single"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["sharded_fastv"], r["single_fastv"], rtol=1e-5, atol=1e-5)


import pytest
import torch

from vlopt.decode import teacher_forced_logits
from vlopt.engine import DecodeEngine
from vlopt.errors import VloptError
from vlopt.models import get_workload
from vlopt.models.tokenizer import QUESTIONS
from vlopt.plugins import get_registry
from vlopt.testing import assert_fidelity, run_pass


def _apply(vlm, cfg):
    return get_registry().apply(vlm, cfg)


def _inp(vlm, question="What is here?", workload=None):
    return vlm.run_stages(None, get_workload(workload or vlm.default_workload), question)


# ---- layer_skip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_layer_skip_gives_the_full_models_tokens_and_reports_acceptance(model):
    row = run_pass({"type": "layer_skip", "draft_layers": 3, "draft_tokens": 3}, model=model,
                   benchmark={"new_tokens": 16})
    assert_fidelity(row, min_top1=1.0, max_kl=0.0, exact_tokens=True)
    info = row["stage4"]["engine_info"]
    assert 0.0 <= info["acceptance_rate"] <= 1.0 and info["verify_forwards"] >= 1
    assert info["tokens_per_verify"] == pytest.approx(1 + info["acceptance_rate"] * 3, rel=0.25)


def test_layer_skip_identical_tokens_in_the_same_process(eventgpt):
    inp = _inp(eventgpt)
    base = eventgpt.stage4(inp, new_tokens=20).tokens
    _apply(eventgpt, {"type": "layer_skip", "draft_layers": 1, "draft_tokens": 5})
    assert eventgpt.stage4(inp, new_tokens=20).tokens == base


def test_layer_skip_rejects_bad_settings(eventgpt):
    with pytest.raises(VloptError, match="below the decoder's 4 layers"):
        _apply(eventgpt, {"type": "layer_skip", "draft_layers": 4})
    _apply(eventgpt, {"type": "fast_decode", "compile": False})
    with pytest.raises(VloptError, match="use one of them"):
        _apply(eventgpt, {"type": "layer_skip"})


# ---- early_stop ------------------------------------------------------------------------------------
def _favour(vlm, token_id):
    with torch.no_grad():
        vlm.lm_head.weight[token_id] = vlm.lm_head.weight.abs().max() * 60


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_early_stop_ends_after_the_sentence_budget(eventgpt, engine):
    dot = eventgpt.tokenizer.convert_tokens_to_ids(".")
    _favour(eventgpt, dot)
    inp = _inp(eventgpt)
    assert len(eventgpt.stage4(inp, new_tokens=24, fixed=False).tokens) == 24   # no EOS: runs the budget
    if engine == "fast":
        _apply(eventgpt, {"type": "fast_decode", "compile": False})
    _apply(eventgpt, {"type": "early_stop", "eos_threshold": None, "max_sentences": 2})
    tokens = eventgpt.stage4(inp, new_tokens=24, fixed=False).tokens
    assert tokens[-1] == eventgpt.eos_token_id and tokens[:-1].count(dot) == 2 and tokens[-2] == dot
    assert len(eventgpt.stage4(inp, new_tokens=24, fixed=True).tokens) == 24      # a fixed budget ignores it


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_early_stop_eos_threshold(eventgpt, engine):
    inp = _inp(eventgpt)
    base = eventgpt.stage4(inp, new_tokens=12, fixed=False).tokens
    logits = teacher_forced_logits(eventgpt, inp, base)
    p_eos = torch.softmax(logits, -1)[:, eventgpt.eos_token_id]
    if engine == "fast":
        _apply(eventgpt, {"type": "fast_decode", "compile": False})
    # A threshold just under the 4th position's P(EOS) must stop there or earlier.
    threshold = float(p_eos[:4].max()) * 0.999
    _apply(eventgpt, {"type": "early_stop", "eos_threshold": threshold})
    tokens = eventgpt.stage4(inp, new_tokens=12, fixed=False).tokens
    stop = int((p_eos >= threshold).nonzero()[0])
    assert tokens == base[:stop] + [eventgpt.eos_token_id]


def test_early_stop_needs_a_rule():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="set eos_threshold, max_sentences or both"):
        get_registry().pass_entry("early_stop").config.model_validate({"type": "early_stop", "eos_threshold": None})


# ---- feature_cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_request_cache_skips_stages_1_to_3_and_keeps_the_input_exact(model):
    from vlopt.models import load_model
    vlm = load_model(model, preset="tiny", device="cpu")
    plain = _inp(vlm, "second question?")
    _apply(vlm, {"type": "feature_cache", "scope": "request"})
    calls = []
    tower = vlm.hf.get_submodule(vlm.vision_modules[0] if model == "eventgpt" else "model.video_tower")
    tower.register_forward_hook(lambda *a: calls.append(1))
    _inp(vlm, "first question?")
    cached = _inp(vlm, "second question?")
    assert len(calls) == 1 and vlm.vision.hits == 1 and vlm.vision.misses == 1
    torch.testing.assert_close(cached.embeds, plain.embeds, rtol=0, atol=0)


def test_disk_cache_is_keyed_bounded_and_refuses_damage(tmp_path):
    from vlopt.models import load_model
    vlm = load_model("videollava", preset="tiny", device="cpu")
    _apply(vlm, {"type": "feature_cache", "scope": "disk", "cache_dir": str(tmp_path), "max_mb": 1})
    first = _inp(vlm)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    # A second process (fresh cache object, same model) reads it instead of encoding.
    _apply(vlm, {"type": "feature_cache", "scope": "disk", "cache_dir": str(tmp_path)})
    torch.testing.assert_close(_inp(vlm).embeds, first.embeds, rtol=0, atol=0)
    assert vlm.vision.hits == 1
    # Damage: truncated file → ignored, rebuilt, and the result is still exact.
    files[0].write_bytes(files[0].read_bytes()[:100])
    torch.testing.assert_close(_inp(vlm).embeds, first.embeds, rtol=0, atol=0)
    assert vlm.vision.rejected == 1
    # Another model's features (different fingerprint) are never used.
    other = load_model("videollava", preset="tiny", device="cpu")
    with torch.no_grad():
        other.hf.model.multi_modal_projector.linear_1.weight.add_(1.0)
    _apply(other, {"type": "feature_cache", "scope": "disk", "cache_dir": str(tmp_path)})
    _inp(other)
    assert other.vision.hits == 0 and other.vision.rejected == 1
    # Size bound: many inputs with max 1 MB keep the folder under it.
    for i in range(30):
        np_path = tmp_path / f"in{i}.npy"
        import numpy as np
        from vlopt.frames import synthetic_video
        np.save(np_path, synthetic_video(num_frames=8, seed=i))
        vlm.run_stages(str(np_path), get_workload("videollava"), "q")
    total = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert 0 < total <= 1 * 2**20


def test_prefix_scope_reuses_the_shared_prompt_kv(eventgpt):
    _apply(eventgpt, {"type": "fast_decode", "compile": False})
    _apply(eventgpt, {"type": "feature_cache", "scope": "prefix"})
    fresh = DecodeEngine(compile=False)
    reused = []
    for q in QUESTIONS[:3]:
        inp = _inp(eventgpt, q, "eventgpt-10q")
        result = eventgpt.stage4(inp, new_tokens=10)
        reused.append(result.info["prefix_reused"])
        assert result.tokens == fresh.generate(eventgpt, inp, new_tokens=10).tokens
    assert reused[0] == 0 and all(r > inp.visual_spans[0][1] - 1 for r in reused[1:])


def test_prefix_scope_needs_fast_decode(eventgpt):
    with pytest.raises(VloptError, match="put `{type: fast_decode}` before it"):
        _apply(eventgpt, {"type": "feature_cache", "scope": "prefix"})


# ---- prune_visual ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model,rows_after", [("eventgpt", 5 + 3), ("videollava", 8 * 3)])
def test_cls_attention_pruning(model, rows_after):
    row_full = run_pass({"type": "prune_visual", "keep": 1.0}, model=model)
    # keep everything = the baseline (the vision tower now runs eager attention: rounding only)
    assert_fidelity(row_full, min_top1=1.0, max_kl=1e-9, exact_tokens=True)
    row = run_pass({"type": "prune_visual", "keep": 0.5}, model=model)
    assert row["stage4"]["visual_tokens"] == rows_after
    assert row["stage4"]["context_tokens"] == row_full["stage4"]["context_tokens"] - (
        row_full["stage4"]["visual_tokens"] - rows_after)


def test_pruned_prefill_equals_a_hand_built_pruned_forward(videollava):
    inp_full = _inp(videollava)
    _apply(videollava, {"type": "prune_visual", "keep": 2})
    wl = get_workload("videollava")
    prepared = videollava.preprocess(videollava.load_input(None, wl), "What is here?", wl)
    feats = videollava.features(prepared)
    scores, groups = prepared["row_scores"], prepared["row_groups"]
    keep = []
    for g in range(8):   # by hand: CLS row plus the best-attended patch of each frame, in order
        rows = (groups == g).nonzero().flatten()
        best = rows[1:][scores[rows[1:]].argmax()]
        keep += sorted([int(rows[0]), int(best)])
    start, end = inp_full.visual_spans[0]
    by_hand = torch.cat([inp_full.embeds[:, :start], feats[keep][None], inp_full.embeds[:, end:]], dim=1)
    pruned = videollava.run_stages(None, wl, "What is here?")
    torch.testing.assert_close(pruned.embeds, by_hand, rtol=0, atol=0)
    with torch.no_grad():
        a = videollava.hf(inputs_embeds=pruned.embeds).logits
        b = videollava.hf(inputs_embeds=by_hand).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fastv_is_a_clear_error(eventgpt):
    with pytest.raises(VloptError, match="'fastv' is not implemented yet"):
        _apply(eventgpt, {"type": "prune_visual", "method": "fastv"})

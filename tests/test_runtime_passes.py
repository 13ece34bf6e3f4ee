
import math

import pytest
import torch

from vlopt.decode import teacher_forced_logits
from vlopt.engine import FastDecodeEngine
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
    info = row.stage4["engine_info"]
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
    vlm = load_model(model, preset="tiny-random", device="cpu")
    plain = _inp(vlm, "second question?")
    _apply(vlm, {"type": "feature_cache", "scope": "request"})
    calls = []
    tower = vlm.hf.get_submodule(vlm.vision_modules[0] if model == "eventgpt" else "model.video_tower")
    tower.register_forward_hook(lambda *a: calls.append(1))
    _inp(vlm, "first question?")
    cached = _inp(vlm, "second question?")
    assert len(calls) == 1 and vlm.feature_store.hits == 1 and vlm.feature_store.misses == 1
    torch.testing.assert_close(cached.embeds, plain.embeds, rtol=0, atol=0)


def test_disk_cache_is_keyed_bounded_and_refuses_damage(tmp_path):
    from vlopt.models import load_model
    vlm = load_model("videollava", preset="tiny-random", device="cpu")
    _apply(vlm, {"type": "feature_cache", "scope": "disk", "cache_dir": str(tmp_path), "max_mb": 1})
    first = _inp(vlm)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    # A second process (fresh cache object, same model) reads it instead of encoding.
    _apply(vlm, {"type": "feature_cache", "scope": "disk", "cache_dir": str(tmp_path)})
    torch.testing.assert_close(_inp(vlm).embeds, first.embeds, rtol=0, atol=0)
    assert vlm.feature_store.hits == 1
    # Damage: truncated file → ignored, rebuilt, and the result is still exact.
    files[0].write_bytes(files[0].read_bytes()[:100])
    torch.testing.assert_close(_inp(vlm).embeds, first.embeds, rtol=0, atol=0)
    assert vlm.feature_store.rejected == 1
    # Another model's features (different fingerprint) are never used.
    other = load_model("videollava", preset="tiny-random", device="cpu")
    with torch.no_grad():
        other.hf.model.multi_modal_projector.linear_1.weight.add_(1.0)
    _apply(other, {"type": "feature_cache", "scope": "disk", "cache_dir": str(tmp_path)})
    _inp(other)
    assert other.feature_store.hits == 0 and other.feature_store.rejected == 1
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
    fresh = FastDecodeEngine(compile=False)
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
    row_full = run_pass({"type": "prune_visual", "keep": 1.0}, model=model, preset="tiny-random")
    # keep everything = the baseline (the vision tower now runs eager attention: rounding only)
    assert_fidelity(row_full, min_top1=1.0, max_kl=1e-9, exact_tokens=True)
    row = run_pass({"type": "prune_visual", "keep": 0.5}, model=model, preset="tiny-random")
    assert row.stage4["visual_tokens"] == rows_after
    assert row.stage4["context_tokens"] == row_full.stage4["context_tokens"] - (
        row_full.stage4["visual_tokens"] - rows_after)


def test_pruned_prefill_equals_a_hand_built_pruned_forward(videollava):
    inp_full = _inp(videollava)
    _apply(videollava, {"type": "prune_visual", "keep": 2})
    wl = get_workload("videollava")
    prepared = videollava.preprocess(videollava.load_input(None, wl), "What is here?", wl)
    visual = videollava.features(prepared)
    feats, scores, groups = visual.rows, visual.cls_scores, visual.groups
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


@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_fastv_keeping_everything_is_the_baseline(model):
    row = run_pass({"type": "prune_visual", "method": "fastv", "keep": 1.0}, model=model)
    assert_fidelity(row, min_top1=1.0, max_kl=0.0, exact_tokens=True)
    info = row.stage4["engine_info"]["fastv"]
    assert info["visual_before"] == info["visual_after"] == row.stage4["visual_tokens"]
    assert info["context_after_layer"] == info["context"] == row.stage4["context_tokens"]


def _by_hand_fastv(vlm, embeds, spans, after_layer, n_keep):
    """FastV written out: transformers' own eager attention map of layer k-1 ranks the visual rows;
    layers k.. run on the kept rows at their original positions; the final norm and lm_head follow."""
    L = embeds.shape[1]
    tm = vlm.text_model
    impl = tm.config._attn_implementation
    tm.config._attn_implementation = "eager"
    try:
        out = vlm.hf(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True, use_cache=False)
    finally:
        tm.config._attn_implementation = impl
    to_last = out.attentions[after_layer - 1][0, :, L - 1].mean(0)          # [L]
    visual = torch.cat([torch.arange(s, e) for s, e in spans])
    best = visual[to_last[visual].topk(n_keep).indices]
    keep = torch.tensor(sorted(set(range(L)) - set(visual.tolist()) | set(best.tolist())))
    hidden = out.hidden_states[after_layer][:, keep]
    pos = keep[None]
    cos_sin = tm.rotary_emb(hidden, position_ids=pos)
    n = len(keep)
    causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]   # additive, any backend
    for layer in tm.layers[after_layer:]:
        hidden = layer(hidden, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
    return vlm.lm_head(tm.norm(hidden)), keep


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_fastv_prefill_equals_a_hand_built_pruned_forward(model, attention, request):
    vlm = request.getfixturevalue(model)
    _apply(vlm, {"type": "attention", "implementation": attention})
    inp = _inp(vlm)
    n_keep = inp.visual_tokens // 4
    _apply(vlm, {"type": "prune_visual", "method": "fastv", "keep": n_keep, "after_layer": 2})
    with torch.no_grad():
        expected, keep = _by_hand_fastv(vlm, inp.embeds, inp.visual_spans, 2, n_keep)
        with vlm.decoding.wrapper("fastv").around(inp):
            got = vlm.hf(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask).logits
            kept = vlm.decoding.wrapper("fastv").kept
    assert kept.tolist() == keep.tolist()
    assert got.shape[1] == inp.context_tokens - inp.visual_tokens + n_keep
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fastv_cached_decode_equals_a_pruned_recompute(videollava, attention):
    """Decode steps (KV cache: layers ≥ k hold fewer rows; eager slices its 4D mask) give the logits
    one teacher-forced forward of the pruned model gives."""
    _apply(videollava, {"type": "attention", "implementation": attention})
    _apply(videollava, {"type": "prune_visual", "method": "fastv", "keep": 0.25})
    inp = _inp(videollava)
    with torch.no_grad(), videollava.decoding.wrapper("fastv").around(inp):
        out = videollava.hf.generate(inputs_embeds=inp.embeds, attention_mask=inp.attention_mask, max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
        cache_lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    stepwise = torch.cat(out.logits).float()
    tokens = out.sequences[0].tolist()
    recomputed = videollava.decoding.score(inp, tokens)
    torch.testing.assert_close(stepwise, recomputed, rtol=1e-4, atol=1e-4)
    pruned = inp.visual_tokens - math.ceil(0.25 * inp.visual_tokens)
    assert cache_lengths[:2] == [inp.context_tokens + 5] * 2
    assert cache_lengths[2:] == [inp.context_tokens + 5 - pruned] * 2
    # and pruning changed the answer's logits: this is not the baseline
    base = teacher_forced_logits(videollava, inp, tokens)
    assert (base - recomputed).abs().max() > 1e-3


def test_fastv_refuses_the_static_cache_engines(eventgpt, videollava):
    _apply(eventgpt, {"type": "prune_visual", "method": "fastv"})
    for follower in ({"type": "fast_decode", "compile": False}, {"type": "layer_skip"}):
        with pytest.raises(VloptError, match="Use prune_visual method: cls_attention"):
            _apply(eventgpt, follower)
    with pytest.raises(VloptError, match="below the decoder's 4 layers"):
        _apply(videollava, {"type": "prune_visual", "method": "fastv", "after_layer": 4})
    _apply(videollava, {"type": "fast_decode", "compile": False})
    with pytest.raises(VloptError, match="Use prune_visual method: cls_attention"):
        _apply(videollava, {"type": "prune_visual", "method": "fastv"})

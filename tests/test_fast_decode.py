import pytest
import torch

from vlopt.decode import teacher_forced_logits
from vlopt.engine import FastDecodeEngine
from vlopt.models import get_workload
from vlopt.plugins import get_registry
from vlopt.testing import assert_fidelity, run_pass
from vlopt.testing import tiny_model as build_tiny


def _inp(vlm):
    return vlm.run_stages(None, get_workload(vlm.default_workload), "What is here?")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_engine_logits_equal_transformers_within_1e4(tiny_model, compile):
    inp = _inp(tiny_model)
    base = tiny_model.stage4(inp, new_tokens=12)
    engine = FastDecodeEngine(compile=compile)
    result = engine.generate(tiny_model, inp, new_tokens=12)
    assert len(result.tokens) == 12 and result.info["compiled"] is compile
    assert result.info["cache_len"] >= inp.context_tokens + 12
    ref = teacher_forced_logits(tiny_model, inp, base.tokens)
    assert _rel(engine.score(tiny_model, inp, base.tokens), ref) < 1e-4
    # The incremental path (KV cache, one token at a time) agrees with the baseline's too: every
    # greedy token the engine chose is the argmax of the reference logits on its own prefix.
    own = teacher_forced_logits(tiny_model, inp, result.tokens)
    assert own.argmax(-1).tolist() == result.tokens


def test_natural_length_stops_at_eos(eventgpt):
    eos = eventgpt.eos_token_id
    with torch.no_grad():
        eventgpt.lm_head.weight[eos] = eventgpt.lm_head.weight.abs().max() * 50
    inp = _inp(eventgpt)
    natural = FastDecodeEngine(compile=False, check_every=2).generate(eventgpt, inp, new_tokens=20, fixed=False).tokens
    assert natural[-1] == eos and eos not in natural[:-1] and len(natural) < 20
    assert len(FastDecodeEngine(compile=False).generate(eventgpt, inp, new_tokens=20, fixed=True).tokens) == 20


def test_sampling_draws_from_the_distribution(eventgpt):
    inp = _inp(eventgpt)
    torch.manual_seed(0)
    a = FastDecodeEngine(compile=False, temperature=1.0).generate(eventgpt, inp, new_tokens=16).tokens
    b = FastDecodeEngine(compile=False, temperature=1.0).generate(eventgpt, inp, new_tokens=16).tokens
    greedy = FastDecodeEngine(compile=False).generate(eventgpt, inp, new_tokens=16).tokens
    assert a != b or a != greedy                      # randomness reaches the tokens
    assert all(0 <= t < eventgpt.lm_head.weight.shape[0] for t in a + b)


@pytest.mark.slow
def test_fast_decode_through_the_manager_is_lossless_in_float32():
    row = run_pass({"type": "fast_decode"}, model="videollava")
    assert_fidelity(row, min_top1=1.0, max_kl=1e-8, exact_tokens=True)
    assert row.stage4["engine"] == "fast_decode" and row.stage4["engine_info"]["compile_s"] > 0


def test_a_weight_pass_after_fast_decode_rebuilds_the_step(eventgpt):
    for cfg in ({"type": "fast_decode", "compile": False}, {"type": "int8"}):
        get_registry().apply(eventgpt, cfg)
    inp = _inp(eventgpt)
    tokens = eventgpt.stage4(inp, new_tokens=8).tokens
    # The engine sees the int8 weights: its logits equal the HF forward of the quantized model.
    ref = teacher_forced_logits(eventgpt, inp, tokens)
    assert _rel(eventgpt.decoding.score(inp, tokens), ref) < 1e-4
    assert ref.argmax(-1).tolist() == tokens


def test_fused_projections_give_the_same_logits_on_plain_and_on_int8_weights(eventgpt):
    inp = _inp(eventgpt)
    base = eventgpt.stage4(inp, new_tokens=8).tokens
    ref = teacher_forced_logits(eventgpt, inp, base)
    get_registry().apply(eventgpt, {"type": "fast_decode", "compile": False, "fuse_projections": True})
    result = eventgpt.stage4(inp, new_tokens=8)
    fused = eventgpt.decoding.engine.fused
    assert fused is not None and fused[0][0].shape[0] == 3 * 64 and fused[0][1].shape[0] == 2 * 128
    assert _rel(eventgpt.decoding.score(inp, base), ref) < 1e-5
    assert teacher_forced_logits(eventgpt, inp, result.tokens).argmax(-1).tolist() == result.tokens
    get_registry().apply(eventgpt, {"type": "int8"})       # new weights: the engine rebuilds and fuses the int8 ones
    tokens = eventgpt.stage4(inp, new_tokens=8).tokens
    fused = eventgpt.decoding.engine.fused
    assert fused is not None and type(fused[0][0]).__name__ == "Int8Tensor" and fused[0][0].shape[0] == 3 * 64
    q = eventgpt.text_model.layers[0].self_attn.q_proj.weight       # a view into the stacked int8 rows
    assert q.qdata.untyped_storage().data_ptr() == fused[0][0].qdata.untyped_storage().data_ptr()
    assert _rel(eventgpt.decoding.score(inp, tokens), teacher_forced_logits(eventgpt, inp, tokens)) < 1e-4


@pytest.mark.parametrize("cfg", [{"type": "llm_int8"}, {"type": "nf4", "compute_dtype": "float32"}])
def test_bitsandbytes_weights_stay_unfused_and_match_the_hf_forward(eventgpt, cfg):
    # Their Parameter subclasses hold plain-looking data that is not the weight: stacking it would be wrong.
    for c in (cfg, {"type": "fast_decode", "compile": False}):
        get_registry().apply(eventgpt, c)
    inp = _inp(eventgpt)
    tokens = eventgpt.stage4(inp, new_tokens=6).tokens
    assert eventgpt.decoding.engine.fused is None
    assert _rel(eventgpt.decoding.score(inp, tokens), teacher_forced_logits(eventgpt, inp, tokens)) < 1e-4


def test_fused_int8_projections_give_the_unfused_answers_on_the_trained_model():
    from vlopt import scenes
    from vlopt.models import load_model

    answers = {}
    for fuse in (False, True):
        vlm = load_model("eventgpt", preset="tiny", device="cpu", dtype="float32")
        for cfg in ({"type": "int8"}, {"type": "fast_decode", "compile": False, "fuse_projections": fuse}):
            get_registry().apply(vlm, cfg)
        result = scenes.evaluate(vlm, scenes.scenes(2, 12, "eval"), workload="eventgpt")
        assert (vlm.decoding.engine.fused is not None) == fuse
        answers[fuse] = [r["answer"] for r in result["answers"]]
    assert answers[True] == answers[False]


def test_fused_weights_are_views_and_save_as_ordinary_tensors(tmp_path):
    import vlopt
    from vlopt.testing import run_recipe

    recipe = {"model": {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"},
              "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 6},
              "passes": [{"type": "fast_decode", "compile": False}]}
    result = run_recipe(recipe, tmp_path, output=True)
    assert result.exit_code == 0, result.failures
    row = result.report["passes"][0]
    assert row["fidelity"]["first_divergence"] is None
    loaded = vlopt.load(tmp_path / "out")
    fresh = build_tiny("eventgpt")
    for name, t in fresh.hf.state_dict().items():          # same values, one tensor per module
        torch.testing.assert_close(loaded.hf.state_dict()[name], t, rtol=0, atol=0)
    inp = _inp(loaded)
    tokens = loaded.stage4(inp, new_tokens=6).tokens        # the replayed engine fuses the loaded weights
    a = loaded.text_model.layers[0].self_attn
    assert a.q_proj.weight.untyped_storage().data_ptr() == a.v_proj.weight.untyped_storage().data_ptr()
    assert _rel(loaded.decoding.score(inp, tokens), teacher_forced_logits(fresh, inp, tokens)) < 1e-5

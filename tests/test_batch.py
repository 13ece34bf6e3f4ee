"""Batched stage 4: every row of a batch gets the greedy answer it gets alone (float32, tiny models),
in the HF baseline and in fast_decode, for prompts of different lengths, with rows that end early,
through the `vlm.decoding` holder and with weight passes."""

import pytest
import torch

from vlopt.engine import FastDecodeEngine
from vlopt.models import get_workload
from vlopt.plugins import get_registry
from vlopt.stage4 import Wrapper

N = 12
QUESTIONS = ["What is here?", "Describe the whole scene in detail: what moves, and where does it go?", "Why?"]
WORKLOADS = {"eventgpt": ["eventgpt"], "videollava": ["videollava", "videollava-image"]}


def _inputs(vlm):
    """Prompts of different lengths: several questions, and for Video-LLaVA video and image prompts."""
    return [vlm.run_stages(None, get_workload(w), q) for w in WORKLOADS[vlm.name] for q in QUESTIONS]


def _engine(name):
    from vlopt.decode import HFGenerate
    return HFGenerate() if name == "hf_generate" else FastDecodeEngine(compile=False)


@pytest.mark.parametrize("engine", ["hf_generate", "fast_decode"])
def test_every_row_of_a_batch_equals_the_prompt_run_alone(tiny_model, engine):
    inputs = _inputs(tiny_model)
    assert len({inp.context_tokens for inp in inputs}) == len(inputs)      # all lengths differ
    eng = _engine(engine)
    alone = [eng.generate(tiny_model, inp, new_tokens=N).tokens for inp in inputs]
    batch = eng.generate_batch(tiny_model, inputs, new_tokens=N)
    assert [r.tokens for r in batch] == alone
    assert all(len(t) == N for t in alone) and len(set(map(tuple, alone))) > 1
    assert all(r.info["batch"] == len(inputs) for r in batch)


def _eos_top_at(vlm, inp, step: int) -> tuple[list[int], torch.Tensor, float]:
    """`inp`'s fixed-budget greedy answer, lm_head's inputs [N, hidden] along it, and the largest |logit|."""
    answer = vlm.stage4(inp, new_tokens=N, fixed=True).tokens
    seen = []
    hook = vlm.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        embeds = torch.cat([inp.embeds, vlm.embed(torch.tensor([answer[:-1]]))], dim=1)
        logits = vlm.hf(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
    hook.remove()
    L = inp.context_tokens
    return answer, seen[-1][0, L - 1: L - 1 + N].double(), float(logits.abs().max())


def _end_row_early(vlm, early, late, step: int):
    """Edit lm_head's EOS row so that EOS is the top choice at `step` of `early`'s answer and far
    below the others everywhere else along `early`'s and `late`'s answers. Returns both answers."""
    a_answer, a_hidden, a_max = _eos_top_at(vlm, early, step)
    b_answer, b_hidden, b_max = _eos_top_at(vlm, late, step)
    margin = 20 * max(a_max, b_max)
    target = torch.full((2 * N,), -margin, dtype=torch.float64)
    target[step] = margin
    row = torch.linalg.lstsq(torch.cat([a_hidden, b_hidden]), target[:, None]).solution[:, 0]
    with torch.no_grad():
        vlm.lm_head.weight[vlm.eos_token_id] = row.to(vlm.lm_head.weight.dtype)
    return a_answer, b_answer


@pytest.mark.parametrize("engine", ["hf_generate", "fast_decode"])
def test_natural_length_ends_each_row_at_its_own_eos(eventgpt, engine):
    inputs = _inputs(eventgpt)
    eos, step = eventgpt.eos_token_id, 4
    early, late = _end_row_early(eventgpt, inputs[1], inputs[0], step)
    eng = _engine(engine)
    batch = [r.tokens for r in eng.generate_batch(eventgpt, inputs, new_tokens=N, fixed=False)]
    alone = [eng.generate(eventgpt, inp, new_tokens=N, fixed=False).tokens for inp in inputs]
    assert batch == alone
    assert batch[1] == early[:step] + [eos]          # this row stopped at its EOS ...
    assert batch[0] == late and eos not in late      # ... and the other went on to the budget
    fixed = [r.tokens for r in eng.generate_batch(eventgpt, inputs, new_tokens=N, fixed=True)]
    assert fixed[1] == early and all(len(t) == N and eos not in t for t in fixed)   # EOS masked until N


def test_the_compiled_batch_step_gives_the_same_answers(videollava):
    inputs = _inputs(videollava)[:4]
    eng = FastDecodeEngine(compile=True)
    alone = [FastDecodeEngine(compile=False).generate(videollava, inp, new_tokens=8).tokens for inp in inputs]
    batch = eng.generate_batch(videollava, inputs, new_tokens=8)
    assert [r.tokens for r in batch] == alone
    assert batch[0].info["compiled"] and batch[0].info["compile_s"] > 0
    again = eng.generate_batch(videollava, inputs[::-1], new_tokens=8)     # same batch size: same step
    assert [r.tokens for r in again] == alone[::-1] and again[0].info["compile_s"] == batch[0].info["compile_s"]


class _PerInput(Wrapper):
    """A wrapper that arms something per input: it cannot serve a batch in one call."""

    name = "per_input"

    def __init__(self):
        self.seen = []

    def around(self, inp):
        self.seen.append(inp.context_tokens)
        return super().around(inp)


def test_the_holder_batches_through_wrappers_that_can_and_row_by_row_otherwise(eventgpt):
    inputs = _inputs(eventgpt)
    alone = [eventgpt.stage4(inp, new_tokens=N).tokens for inp in inputs]
    get_registry().apply(eventgpt, {"type": "fast_decode", "compile": False})
    batch = eventgpt.decoding.generate_batch(inputs, new_tokens=N)
    assert [r.tokens for r in batch] == alone and batch[0].info["batch"] == len(inputs)
    wrapper = _PerInput()
    eventgpt.decoding.wrap(wrapper)
    rows = eventgpt.decoding.generate_batch(inputs, new_tokens=N)
    assert [r.tokens for r in rows] == alone
    assert wrapper.seen == [inp.context_tokens for inp in inputs]          # entered once per row
    assert all(r.info["batch"] == 1 and r.info["unbatched_by"] == ["per_input"] for r in rows)


def test_an_engine_without_generate_batch_runs_the_rows_one_at_a_time(eventgpt):
    inputs = _inputs(eventgpt)[:2]
    get_registry().apply(eventgpt, {"type": "layer_skip", "draft_layers": 2, "draft_tokens": 3})
    assert not hasattr(eventgpt.decoding.engine, "generate_batch")
    rows = eventgpt.decoding.generate_batch(inputs, new_tokens=6)
    assert [r.tokens for r in rows] == [eventgpt.stage4(inp, new_tokens=6).tokens for inp in inputs]
    assert all(r.info["batch"] == 1 for r in rows)


@pytest.mark.parametrize("weights", [{"type": "int8"}, {"type": "int4", "group_size": 32},
                                     {"type": "int4", "group_size": 32, "kernel": "triton"}])
def test_batches_compose_with_weight_passes(eventgpt, weights):
    get_registry().apply(eventgpt, {"type": "fast_decode", "compile": False})
    get_registry().apply(eventgpt, weights)
    inputs = _inputs(eventgpt)
    alone = [eventgpt.stage4(inp, new_tokens=8).tokens for inp in inputs]
    assert [r.tokens for r in eventgpt.decoding.generate_batch(inputs, new_tokens=8)] == alone


def test_batches_compose_with_the_stop_rule_and_the_feature_cache(videollava):
    for cfg in ({"type": "fast_decode", "compile": False}, {"type": "feature_cache"},
                {"type": "early_stop", "eos_threshold": None, "max_sentences": 1}):
        get_registry().apply(videollava, cfg)
    inputs = _inputs(videollava)
    assert videollava.feature_store.hits == len(inputs) - len(WORKLOADS["videollava"])   # one encode per clip
    alone = [videollava.stage4(inp, new_tokens=16, fixed=False).tokens for inp in inputs]
    assert [r.tokens for r in videollava.decoding.generate_batch(inputs, new_tokens=16, fixed=False)] == alone


# ---- the throughput-vs-batch benchmark -------------------------------------------------------------
def _vlopt(*args, cwd=None):
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "vlopt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "VLOPT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"})


def test_bench_batch_reports_throughput_latency_memory_and_the_ratio_to_batch_1(tmp_path):
    import json

    out = tmp_path / "b.json"
    proc = _vlopt("bench", "--device", "cpu", "--samples", "1", "--warmup", "0", "--new-tokens", "4",
                  "--batch", "1,3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "throughput vs batch" in proc.stdout
    table = json.loads(out.read_text())["batch"]
    one, three = table["rows"]
    assert (one["batch"], three["batch"]) == (1, 3) and one["vs_batch_1"] == 1.0
    assert three["new_tokens"] == 3 * one["new_tokens"] == 12 and three["one_pass"]
    assert three["tokens_per_s"] == pytest.approx(12 / (three["stage4_ms"] / 1e3))
    assert three["vs_batch_1"] == pytest.approx(three["tokens_per_s"] / one["tokens_per_s"])
    assert three["stage4_per_clip_ms"] == pytest.approx(three["stage4_ms"] / 3)
    assert three["peak_mem_mb"] is None and three["peak_mem_kind"].startswith("n/a")      # CPU


@pytest.mark.parametrize("value", ["1,x", "0,4", "4,4", ""])
def test_bad_batch_sizes_are_one_line_errors(value):
    proc = _vlopt("bench", "--device", "cpu", "--batch", value)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--batch" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value, message", [("[]", "at least one"), ("[1, 1]", "distinct"), ("[0]", "between 1"),
                                            ("['4']", "valid integer"), ("[true]", "valid integer")])
def test_the_recipe_batch_key_is_strict(tmp_path, value, message):
    from vlopt.errors import VloptError
    from vlopt.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name: eventgpt}}\nbenchmark: {{batch: {value}}}\n")
    with pytest.raises(VloptError, match=f"benchmark.batch.*{message}"):
        load_recipe(path)


def test_a_recipe_with_batch_sizes_gets_the_table_and_the_chart(tmp_path):
    from vlopt.testing import run_recipe

    recipe = {"model": {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"},
              "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 4, "batch": [1, 2]},
              "passes": [{"type": "fast_decode", "compile": False}]}
    result = run_recipe(recipe, tmp_path, output=True)
    assert result.exit_code == 0, result.failures
    tables = result.report["batch"]
    assert list(tables) == ["baseline", "after passes"]
    assert tables["baseline"]["engine"] == "hf_generate" and tables["after passes"]["engine"] == "fast_decode"
    assert [r["batch"] for r in tables["after passes"]["rows"]] == [1, 2]
    assert (tmp_path / "out" / "vlopt_report_batch.png").stat().st_size > 0
    assert "## Throughput vs batch size" in (tmp_path / "out" / "vlopt_report.md").read_text()

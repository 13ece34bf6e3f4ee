import json
import subprocess
import sys

import pytest

from vlopt.bench import benchmark, compare_table, decode_step_bytes
from vlopt.models import get_workload


def test_benchmark_json_has_the_documented_shape(eventgpt):
    result = benchmark(eventgpt, get_workload("eventgpt"), samples=2, warmup=1, new_tokens=8)
    assert result["model"]["name"] == "eventgpt" and result["workload"]["name"] == "eventgpt"
    for key in ("gpu", "driver", "cuda", "torch", "transformers", "commit"):
        assert key in result["machine"]
    assert set(result["stages"]) == {"1", "2", "3", "4"}
    for s in result["stages"].values():
        assert s["min_ms"] <= s["median_ms"] <= s["max_ms"] and s["min_ms"] > 0
    s4 = result["stage4"]
    for key in ("context_tokens", "new_tokens", "prefill_ms", "decode_ms_per_token", "tokens_per_s",
                "gb_per_s", "peak_mem_mb"):
        assert s4[key] is not None
    assert s4["new_tokens"] == 8 and s4["context_tokens"] == 69
    assert s4["tokens_per_s"] == pytest.approx(1000 / s4["decode_ms_per_token"])
    # Stage 4 covers prefill and every decode step.
    assert s4["stage4_ms"] >= s4["prefill_ms"]
    json.dumps(result)


def test_natural_length_mode_stops_at_eos_within_the_budget(eventgpt):
    eos = eventgpt.eos_token_id
    # Make EOS likely: natural mode must stop right after it, fixed mode must not stop.
    with __import__("torch").no_grad():
        eventgpt.lm_head.bias = None
        eventgpt.lm_head.weight[eos] = eventgpt.lm_head.weight.abs().max() * 50
    wl = get_workload("eventgpt")
    inp = eventgpt.run_stages(None, wl, "q")
    natural = eventgpt.stage4(inp, new_tokens=6, fixed=False).tokens
    assert len(natural) < 6 and natural[-1] == eos and eos not in natural[:-1]
    assert len(eventgpt.stage4(inp, new_tokens=6, fixed=True).tokens) == 6


def test_decode_step_bytes_counts_weights_and_kv(eventgpt):
    tm = eventgpt.text_model
    layers = sum(p.numel() for p in tm.layers.parameters()) + tm.norm.weight.numel()
    head = eventgpt.lm_head.weight.numel()
    kv_per_token = 2 * 4 * 64   # 2 × layers × hidden
    assert decode_step_bytes(eventgpt, 100) == 4 * (layers + head + kv_per_token * 100)


def test_compare_table_ratios():
    r = lambda name, ms: {"model": {"name": name}, "workload": {"name": name},  # noqa: E731
                          "stage4": {"stage4_ms": ms, "context_tokens": 1, "share_of_total": 0.9,
                                     "new_tokens": 10, "tokens_per_s": 1, "prefill_ms": 1}}
    rows = compare_table([r("eventgpt", 100.0), r("videollava", 250.0)])
    assert [row["ratio"] for row in rows] == [1.0, 2.5]
    assert rows[1]["tok_s"] == pytest.approx(40.0)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlopt.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bench_writes_json(tmp_path):
    out = tmp_path / "b.json"
    proc = _cli("-q", "bench", "--model", "videollava", "--samples", "1", "--warmup", "0",
                "--new-tokens", "4", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["stage4"]["new_tokens"] == 4 and data["model"]["name"] == "videollava"
    assert "stage-4 s" in proc.stdout


def test_cli_bench_times_a_vlopt_output_with_its_runtime_passes(tmp_path):
    from vlopt.testing import run_recipe

    recipe = {"model": {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"},
              "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 4},
              "passes": [{"type": "fast_decode", "compile": False}]}
    folder = run_recipe(recipe, tmp_path, output=True).output
    proc = _cli("-q", "bench", "--model", str(folder), "--samples", "1", "--warmup", "0", "--new-tokens", "4",
                "--device", "cpu", "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["stage4"]["engine"] == "fast_decode" and data["model"]["name"] == "eventgpt"


def test_cli_models_json_lists_both_models():
    proc = _cli("models", "--preset", "7b", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["model"]: r for r in json.loads(proc.stdout)}
    assert rows["eventgpt"]["visual_tokens"] == 582 and rows["videollava"]["visual_tokens"] == 2056
    assert set(rows["eventgpt"]) == {"model", "params", "visual_tokens", "context_tokens"}


@pytest.mark.parametrize("args,message", [
    (["bench", "--model", "qwen_vl"], "unknown model 'qwen_vl'"),
    (["bench", "--preset", "70b"], "unknown preset '70b'"),
    (["bench", "--input", "/nonexistent/events.npz"], "does not exist"),
    (["bench", "--workload", "videollava"], "is for videollava, not eventgpt"),
    (["bench", "--workload", "nope"], "unknown workload 'nope'"),
    (["bench", "--model", "/nonexistent/ckpt"], "not a checkpoint folder"),
    (["models", "--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_bad_input_exits_2_with_one_message(args, message):
    proc = _cli(*args, "--device", "cpu") if args[0] == "bench" else _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_cuda_without_gpu_exits_2():
    import torch
    if torch.cuda.is_available():
        pytest.fail("this check is for CPU machines; run the GPU suite with --gpu instead")
    proc = _cli("bench", "--device", "cuda")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_compare_prints_the_original_three_rows_beside_vlopts(tmp_path):
    out = tmp_path / "c.json"
    proc = _cli("bench", "--compare", "--samples", "1", "--warmup", "0", "--new-tokens", "2", "--device", "cpu",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["compare"]
    assert [(r["model"], r["workload"]) for r in rows] == [("eventgpt", "eventgpt-1frame"), ("llava", "llava-event"),
                                                           ("videollava", "videollava")]
    assert (rows[0]["seed_stage4_s"], rows[1]["seed_tokens"], rows[2]["seed_stage4_s"]) == (1.0, 90.7, None)
    assert all(r["tokens"] == 2 for r in rows) and "orig." in proc.stdout
    refused = _cli("bench", "--compare", "--workload", "eventgpt", "--device", "cpu")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "leave out --workload" in refused.stderr

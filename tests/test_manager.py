import json
import subprocess
import sys
from typing import Literal

import pytest
import torch
import yaml

import vlopt
from vlopt.decode import teacher_forced_logits
from vlopt.models import get_workload
from vlopt.passes import PassConfig
from vlopt.testing import assert_fidelity, run_pass, run_recipe, temporary_plugin

TINY = {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"}
BENCH = {"samples": 1, "warmup": 0, "new_tokens": 6, "quality_scenes": 0}   # quality has its own tests


def test_rows_carry_speedup_fidelity_and_modules(tmp_path):
    result = run_recipe({"model": TINY, "benchmark": BENCH,
                         "passes": [{"type": "attention", "implementation": "eager"},
                                    {"type": "dtype", "dtype": "bfloat16"}]}, tmp_path, output=True)
    assert result.exit_code == 0
    report = result.report
    assert set(report) >= {"baseline", "passes", "machine", "commit"}
    assert report["baseline"]["stage4"]["new_tokens"] == 6
    for row in report["passes"]:
        for key in ("pass", "plugin", "plugin_version", "config", "status", "duration_s", "modules_touched",
                    "modules_skipped", "stage4", "speedup_vs_baseline", "speedup_vs_previous", "fidelity"):
            assert key in row, key
    first, second = result.rows
    # Each pass is timed in alternating rounds against an unoptimized instance: the speedup is the
    # median round's ratio, with the spread of the rounds beside it.
    for row in (first, second):
        t = row.timing
        assert t["rounds"] == BENCH["samples"] and t["min"] <= t["median"] <= t["max"]
        assert row.speedup_vs_baseline == pytest.approx(t["median"]) and t["reference_stage4_ms"] > 0
    assert second.speedup_vs_previous == pytest.approx(second.timing["median"] / first.timing["median"])
    assert report["timing"]["torch_threads"] >= 1 and report["timing"]["cores"] >= 1
    # eager vs sdpa attention is the same math: fidelity is exact up to rounding.
    assert_fidelity(first, min_top1=1.0, max_kl=1e-9, exact_tokens=True)
    # bf16 changes numerics: close but not exact, and it is measured, not assumed.
    assert second.fidelity["mean_kl"] > 0 and second.fidelity["top1_agreement"] > 0.5
    assert "model.visual_tower" in second.modules_skipped
    assert second.saved_as == "weights" and first.saved_as == "sidecar"
    out = result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "vlopt_recipe.yaml", "vlopt_report.json", "vlopt_report.md",
            "vlopt_report.png", "vlopt_manifest.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert "| dtype | applied |" in (out / "vlopt_report.md").read_text()
    assert (out / "vlopt_report.png").read_bytes()[:4] == b"\x89PNG"


def test_apply_save_load_gives_the_optimized_logits(tmp_path):
    result = run_recipe({"model": TINY, "benchmark": BENCH,
                         "passes": [{"type": "dtype", "dtype": "bfloat16"},
                                    {"type": "attention", "implementation": "eager"}]}, tmp_path, output=True)
    loaded = vlopt.load(result.output, device="cpu")
    assert loaded.text_model.config._attn_implementation == "eager"     # runtime pass re-applied
    assert loaded.dtype == torch.bfloat16 and loaded.vision_dtype == torch.float32
    # The in-memory optimized model, rebuilt the same way, gives the same logits.
    from vlopt.models import load_model
    from vlopt.plugins import get_registry
    fresh = load_model("eventgpt", preset="tiny", dtype="float32", device="cpu")
    for cfg in ({"type": "dtype", "dtype": "bfloat16"}, {"type": "attention", "implementation": "eager"}):
        get_registry().apply(fresh, cfg)
    wl = get_workload("eventgpt")
    a = teacher_forced_logits(loaded, loaded.run_stages(None, wl, "q"), [5, 6, 7])
    b = teacher_forced_logits(fresh, fresh.run_stages(None, wl, "q"), [5, 6, 7])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Plain transformers loads the weight passes too.
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(result.output))
    assert type(plain).__name__ == "EventGPTForCausalLM"


def test_a_failing_pass_is_recorded_and_earlier_rows_kept(tmp_path):
    class Boom(PassConfig):
        type: Literal["boom"] = "boom"

    def boom(vlm, cfg, ctx):
        raise RuntimeError("kaboom")

    class Plugin:
        @vlopt.hookimpl
        def register_passes(self, register):
            register(Boom, boom)

    with temporary_plugin(Plugin(), "boom-plugin"):
        result = run_recipe({"model": TINY, "benchmark": BENCH,
                             "passes": [{"type": "attention", "implementation": "eager"}, {"type": "boom"},
                                        {"type": "dtype"}]}, tmp_path, output=True)
        assert result.exit_code == 1
        rows = result.report["passes"]
        assert [r["status"] for r in rows] == ["applied", "failed"]
        assert "kaboom" in rows[1]["error"] and rows[1]["plugin"] == "boom-plugin"
        report = json.loads((result.output / "vlopt_report.json").read_text())
        assert report["passes"][0]["status"] == "applied" and not report["complete"]
        assert not (result.output / "model.safetensors").exists()
        with pytest.raises(vlopt.VloptError, match="run that failed"):
            vlopt.load(result.output, device="cpu")
        go_on = run_recipe({"model": TINY, "benchmark": BENCH, "passes": [{"type": "boom"}, {"type": "dtype"}]},
                           tmp_path / "b", continue_on_error=True)
        assert [r["status"] for r in go_on.report["passes"]] == ["failed", "applied"] and go_on.exit_code == 1


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlopt.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_dry_run_prints_plan_and_resolved_recipe_without_weights(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "videollava", "preset": "7b"},
                                      "passes": [{"type": "attention"}], "output": "out"}))
    proc = _cli("apply", str(recipe), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["passes"][0] == {"type": "attention", "implementation": "sdpa", "_plugin": "builtin",
                                     "_plugin_version": "0.1.0", "_pass_version": "1"}
    assert resolved["benchmark"]["samples"] == 3
    assert "1. attention" in proc.stderr and str(tmp_path / "out") in proc.stderr


def test_existing_output_is_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY, "benchmark": BENCH, "passes": [], "output": "out"}))
    proc = _cli("apply", str(recipe))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_plugins_and_passes_commands():
    proc = _cli("plugins")
    assert proc.returncode == 0, proc.stderr
    builtin = next(p for p in json.loads(proc.stdout) if p["name"] == "builtin")
    assert {"register_passes", "register_models"} <= set(builtin["hooks"])
    assert {"dtype", "attention"} <= set(builtin["passes"]) and builtin["version"] == "0.1.0"
    proc = _cli("passes", "--json")
    rows = {r["type"]: r for r in json.loads(proc.stdout)}
    assert rows["attention"]["fields"]["implementation"]["default"] == "sdpa"
    assert rows["dtype"]["changes_weights"] is True and rows["attention"]["lossless"] is True
    assert rows["dtype"]["persistence"] == "weights" and rows["nf4"]["persistence"] == "reapplied"


def test_attention_flash_on_cpu_is_a_clear_error_before_the_run():
    with pytest.raises(vlopt.VloptError, match="passes\\[0\\] \\(attention\\): attention implementation 'flash' needs a CUDA GPU"):
        run_pass({"type": "attention", "implementation": "flash"})

import json
import os
import subprocess
import sys

import pytest

from vlopt import plugins
from vlopt.testing import assert_fidelity, run_pass


@pytest.fixture
def with_this_plugin(monkeypatch):
    """Load installed plugins named here (vlopt's own tests load built-ins only)."""
    monkeypatch.setenv("VLOPT_LOAD_PLUGINS", "lmhead_int8")
    plugins.set_registry(None)
    yield plugins.get_registry()
    plugins.set_registry(None)


def test_the_entry_point_registers_the_pass(with_this_plugin):
    info = next(p for p in with_this_plugin.plugins if p.name == "lmhead_int8")
    assert info.passes == ["lm_head_int8"] and info.version == "0.1.0" and info.error is None


@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_only_the_head_is_quantized_with_small_error(with_this_plugin, model):
    row = run_pass({"type": "lm_head_int8"}, model=model)
    assert row.modules_touched == ["lm_head"] and row.plugin == "lmhead_int8"
    assert_fidelity(row, min_top1=0.8, max_kl=1e-3)
    assert row.fidelity["mean_kl"] > 0


def test_it_shows_in_vlopt_plugins_and_runs_in_a_recipe(tmp_path):
    env = {**os.environ, "VLOPT_LOAD_PLUGINS": "lmhead_int8"}
    out = subprocess.run([sys.executable, "-m", "vlopt.cli", "plugins"], capture_output=True, text=True, env=env)
    assert any(p["name"] == "lmhead_int8" and p["passes"] == ["lm_head_int8"] for p in json.loads(out.stdout))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: eventgpt, preset: tiny-random, dtype: float32, device: cpu}\n"
                      "benchmark: {samples: 1, warmup: 0, new_tokens: 4}\n"
                      "passes:\n  - {type: int4, group_size: 32}\n  - {type: lm_head_int8}\noutput: out\n")
    proc = subprocess.run([sys.executable, "-m", "vlopt.cli", "-q", "apply", str(recipe)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "vlopt_report.json").read_text())
    assert [r["pass"] for r in report["passes"]] == ["int4", "lm_head_int8"]
    assert report["plugins"]["lmhead_int8"] == "0.1.0"


def test_the_family_registers_with_its_workload_and_runs_a_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("VLOPT_LOAD_PLUGINS", "lmhead_int8,eventgpt_short")
    plugins.set_registry(None)
    try:
        registry = plugins.get_registry()
        info = next(p for p in registry.plugins if p.name == "eventgpt_short")
        assert info.models == ["eventgpt_short"] and info.error is None
        assert registry.workloads["eventgpt-short"].frames == 2
        row = run_pass({"type": "lm_head_int8"}, model="eventgpt_short", tmp_dir=tmp_path)
        assert row.stage4["new_tokens"] == 8 and row.modules_touched == ["lm_head"]   # the tiny bench budget
        from vlopt.models import load_model
        vlm = load_model("eventgpt_short", preset="tiny-random", device="cpu")
        assert vlm.workload().name == "eventgpt-short"
        assert vlm.run_stages(None, vlm.workload(), "q").visual_tokens == 2 + 5     # 2 temporal + 5 spatial rows
    finally:
        plugins.set_registry(None)

"""bench/quality.py (issue 15, item 5) runs end to end: --quick on a handful of scenes writes a JSON
with one row per requested pass carrying the quality fields, and the markdown and plot beside it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSES = ["int8", "layer_skip", "feature_cache"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from vlopt.models import load_model

    # The trained weights ship in vlopt/weights/: without them the tables would mean nothing.
    assert load_model("eventgpt", preset="tiny", device="cpu").weights_trained
    out = tmp_path_factory.mktemp("quality")
    # A subprocess: the script sets torch's thread count for its own process.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--family", "eventgpt",
                           "--scenes", "3", "--rounds", "1", "--new-tokens", "8", "--calibration-scenes", "2", "--passes", ",".join(PASSES),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, out


def test_quick_mode_writes_a_row_per_requested_pass_with_quality(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "quality.json").read_text())
    assert record["command"].startswith("python bench/quality.py --quick")
    assert record["commit"] and record["timing"]["torch_threads"] == 1 and "load_average" in record["timing"]
    family = record["families"]["eventgpt"]
    assert [r["kind"] for r in family["rows"]] == PASSES
    for row in family["rows"]:
        assert row["status"] == "applied", row
        assert row["scenes"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert {"delta_accuracy", "identical_answers", "kl", "top1", "example"} <= set(row)
        assert {"median", "min", "max", "within_noise"} <= set(row["speedup"])
    lossless = {r["kind"]: r for r in family["rows"] if r["lossless"]}
    assert set(lossless) == {"layer_skip", "feature_cache"}
    assert all(r["identical_answers"] == r["scenes"] for r in lossless.values())
    assert 0.0 <= family["rows"][1]["drafts"]["acceptance"] <= 1.0


def test_the_markdown_and_plot_come_with_the_json(quick_run):
    proc, out = quick_run
    md = (out / "quality.md").read_text()
    record = json.loads((out / "quality.json").read_text())
    assert record["commit"] in md and record["command"] in md
    for row in record["families"]["eventgpt"]["rows"]:
        assert f"| {row['label']} | {row['accuracy']:.3f} |" in md
    assert (out / "prune_sweep.png").stat().st_size > 0

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from typing import Literal

import pytest
import yaml

import vlopt
from vlopt.checkpoint import verify
from vlopt.passes import PassConfig
from vlopt.testing import run_recipe, temporary_plugin

TINY = {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"}
BENCH = {"samples": 1, "warmup": 0, "new_tokens": 4, "quality_scenes": 0}   # quality has its own tests


def test_sigkill_at_any_point_leaves_nothing_or_a_complete_checkpoint(tmp_path):
    """Kill `vlopt apply` at many points of its run: the output path never holds a partial
    checkpoint that passes verification."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY, "benchmark": BENCH,
                                      "passes": [{"type": "dtype"}, {"type": "int8"}], "output": "out"}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlopt.cli", "-q", "apply", str(recipe)], capture_output=True)
    full = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    outcomes = []
    for fraction in (0.15, 0.35, 0.55, 0.7, 0.8, 0.88, 0.94, 0.98):
        out = tmp_path / "out"
        child = subprocess.Popen([sys.executable, "-m", "vlopt.cli", "-q", "apply", str(recipe), "--force"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if out.exists():
            assert verify(out) == [], f"killed at {fraction:.0%}: {verify(out)}"
            vlopt.load(out, device="cpu")
            outcomes.append("complete")
        else:
            outcomes.append("absent")
    # The previous complete output is replaced by rename, never modified in place: it stays complete.
    assert "complete" in outcomes


def test_nothing_outside_the_output_path_is_deleted(tmp_path):
    keep = tmp_path / "neighbour.txt"
    keep.write_text("mine")
    result = run_recipe({"model": TINY, "benchmark": BENCH, "passes": [], "output": "out"}, tmp_path, output=True)
    run_recipe({"model": TINY, "benchmark": BENCH, "passes": []}, tmp_path, output=True)   # --force over it
    assert keep.read_text() == "mine" and verify(result.output) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbour.txt", "out", "recipe.yaml"]


def test_a_killed_runs_leftovers_are_swept_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                              # a PID that no longer runs
    stale = [tmp_path / f".out.vlopt-tmp-{dead.pid}", tmp_path / f".out.vlopt-old-{dead.pid}"]
    live = tmp_path / f".out.vlopt-tmp-{os.getppid()}"        # the process that started pytest: alive
    others = [tmp_path / f".other.vlopt-tmp-{dead.pid}", tmp_path / f".out.vlopt-notes-{dead.pid}"]
    for d in [*stale, live, *others]:
        d.mkdir()
        (d / "model.safetensors").write_text("partial")
    run_recipe({"model": TINY, "benchmark": BENCH, "passes": []}, tmp_path, output=True)
    assert not any(d.exists() for d in stale)
    assert live.exists() and all(d.exists() for d in others)   # not ours to remove


def test_verify_names_missing_extra_and_altered_files(tmp_path):
    out = run_recipe({"model": TINY, "benchmark": BENCH, "passes": []}, tmp_path, output=True).output
    (out / "vlopt_report.md").write_text("tampered")
    (out / "tokenizer.json").unlink()
    (out / "extra.bin").write_bytes(b"x")
    problems = verify(out)
    assert "altered file vlopt_report.md" in problems and "missing file tokenizer.json" in problems
    assert "extra file extra.bin" in problems
    proc = subprocess.run([sys.executable, "-m", "vlopt.cli", "verify", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and "altered file vlopt_report.md" in proc.stderr
    with pytest.raises(vlopt.VloptError, match="fails verification"):
        vlopt.load(out, device="cpu")


def test_same_recipe_twice_gives_identical_weight_files(tmp_path):
    recipe = {"model": TINY, "benchmark": BENCH, "passes": [{"type": "dtype"}, {"type": "int8"}]}
    a = run_recipe(recipe, tmp_path / "a", output=True).output
    b = run_recipe(recipe, tmp_path / "b", output=True).output
    ha = json.loads((a / "vlopt_manifest.json").read_text())["files"]
    hb = json.loads((b / "vlopt_manifest.json").read_text())["files"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vlopt_recipe.yaml"):
        assert ha[name] == hb[name], name
    report = json.loads((a / "vlopt_report.json").read_text())
    assert report["nondeterministic"] == []


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payloads_are_refused_not_executed(tmp_path, monkeypatch, eventgpt):
    monkeypatch.chdir(tmp_path)
    # A checkpoint whose weights file is a pickle payload.
    from layouts import write_original_eventgpt
    folder = write_original_eventgpt(eventgpt, tmp_path / "ck", tower="inside")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.norm.weight": _Payload()}, fh)
    with pytest.raises(vlopt.VloptError, match="not a plain tensor file"):
        vlopt.load_model(path=str(folder), device="cpu")
    # An event file.
    import numpy as np
    np.save(tmp_path / "ev.npy", np.array(_Payload(), dtype=object), allow_pickle=True)
    from vlopt.events import load_events
    with pytest.raises(vlopt.VloptError, match="pickle"):
        load_events(tmp_path / "ev.npy")
    # A recipe.
    (tmp_path / "r.yaml").write_text("model: !!python/object/apply:os.system ['touch PWNED']\n")
    from vlopt.recipe import load_recipe
    with pytest.raises(vlopt.VloptError):
        load_recipe(tmp_path / "r.yaml")
    assert not (tmp_path / "PWNED").exists()


class _Fails(PassConfig):
    type: Literal["fails"] = "fails"


@pytest.mark.parametrize("exc,status,code", [(MemoryError(), "failed", 1), (KeyboardInterrupt(), "interrupted", 130)])
def test_out_of_memory_and_ctrl_c_keep_earlier_results(tmp_path, exc, status, code):
    def apply(vlm, cfg, ctx):
        raise exc

    class Plugin:
        @vlopt.hookimpl
        def register_passes(self, register):
            register(_Fails, apply)

    with temporary_plugin(Plugin(), "faulty"):
        result = run_recipe({"model": TINY, "benchmark": BENCH, "passes": [{"type": "dtype"}, {"type": "fails"},
                                                                             {"type": "attention"}]},
                            tmp_path, output=True)
    rows = result.report["passes"]
    assert [r["status"] for r in rows] == ["applied", status] and result.exit_code == code
    if status == "failed":
        assert rows[1]["error"].startswith("out of memory")
    assert json.loads((result.output / "vlopt_report.json").read_text())["passes"][0]["status"] == "applied"
    assert "pass 1 (fails)" in result.failures[0]

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
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
    for fraction in (0.3, 0.7, 0.88, 0.97):    # the late points land in the write
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


# ---- write-time failures lose nothing ------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args, env=ENV, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "vlopt.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


def _one_line_error(proc, message, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlopt: error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    return errors[0]


def _recipe(folder, passes, model=TINY, output="out"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({"model": model, "benchmark": BENCH, "passes": passes, "output": output}))
    return path


def test_an_output_that_cannot_be_created_is_refused_before_the_run(tmp_path):
    (tmp_path / "afile").write_text("mine")
    recipe = _recipe(tmp_path, [{"type": "dtype"}])
    proc = _cli("apply", recipe, "-o", tmp_path / "afile" / "out")
    _one_line_error(proc, f"{tmp_path / 'afile'} is a file, not a directory")
    assert proc.stdout == "" and (tmp_path / "afile").read_text() == "mine"
    # A read-only folder (root writes anywhere, so the child drops that capability).
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = _cli("apply", recipe, "-o", locked / "out",
                prefix=("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--") if os.getuid() == 0 else ())
    _one_line_error(proc, f"{locked} is not writable")
    assert list(locked.iterdir()) == []
    # bench --json likewise, before benchmarking.
    _one_line_error(_cli("bench", "--samples", "1", "--json", tmp_path / "afile" / "x.json"), "is a file, not a directory")


_SABOTAGE = """
import pathlib, shutil, sys
from typing import Literal
import vlopt
from vlopt import cli
from vlopt.passes import PassConfig, PassOutcome
from vlopt.testing import temporary_plugin

class Sabotage(PassConfig):
    type: Literal["sabotage"] = "sabotage"
    how: Literal["library", "folder"] = "library"

def apply(vlm, cfg, ctx):
    if cfg.how == "library":     # the weights cannot be saved (as transformers refused an int8 output's)
        def refuse(*args, **kwargs):
            raise NotImplementedError("these weights cannot be saved")
        vlm.hf.save_pretrained = refuse
    else:                        # the output's folder becomes a file while the run goes on
        parent = pathlib.Path(sys.argv[2]).parent
        shutil.rmtree(parent)
        parent.write_text("not a folder any more")
    return PassOutcome()

class Plugin:
    @vlopt.hookimpl
    def register_passes(self, register):
        register(Sabotage, apply)

with temporary_plugin(Plugin(), "sabotage"):
    sys.exit(cli.main(["apply", sys.argv[1], "-o", sys.argv[2], "--force"]))
"""


@pytest.mark.parametrize("how", ["library", "folder"])
def test_a_write_failure_after_the_benchmarks_keeps_the_report(tmp_path, how):
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    recipe = _recipe(tmp_path, [{"type": "dtype"}, {"type": "sabotage", "how": how}])
    proc = subprocess.run([sys.executable, "-c", _SABOTAGE, str(recipe), str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=600)
    line = _one_line_error(proc, f"could not write {out}: ")
    assert "| dtype | applied |" in proc.stdout and "| sabotage | applied |" in proc.stdout   # printed first
    kept = line.split("the report is kept in ")[1].split(" (")[0].split("; ")[0]
    report = json.loads((Path(kept) / "vlopt_report.json").read_text())
    assert [r["pass"] for r in report["passes"]] == ["dtype", "sabotage"] and report["weights_saved"] is False
    if how == "library":         # the output itself holds the report: an intact report-only folder
        assert Path(kept) == out and verify(out) == []
        assert "these weights cannot be saved" in line and "remove the partial" not in line
        assert not list(out.parent.glob(".out.vlopt-*"))
    else:                        # nowhere near the output: a new folder, named
        import shutil
        assert not Path(kept).is_relative_to(tmp_path)
        shutil.rmtree(kept)


def test_chaining_from_an_int8_output_works(tmp_path):
    first = _cli("-q", "apply", _recipe(tmp_path / "a", [{"type": "int8"}]))
    assert first.returncode == 0, first.stderr
    second = _cli("-q", "apply", _recipe(tmp_path / "b", [{"type": "attention", "implementation": "eager"}],
                                         model={"path": "../a/out", "device": "cpu"}))
    assert second.returncode == 0, second.stderr
    out = tmp_path / "b" / "out"
    assert verify(out) == [] and vlopt.load(out, device="cpu").text_model.config._attn_implementation == "eager"
    # Weights get the same permissions as every other file.
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


_SWAP = """
import os, signal, sys
from pathlib import Path
from vlopt import checkpoint, report
from vlopt.checkpoint import verify

out = Path(sys.argv[1])
report.write = lambda record, folder: (folder / "vlopt_report.json").write_text("{}")

def write(n):
    checkpoint.write_output(out, vlm=None, resolved={"n": n}, report={}, force=True)

write(1)
rename = Path.rename

def rename_then_ctrl_c(self, target):
    moved = rename(self, target)
    if self == out:          # the previous output just moved aside: Ctrl-C before the new one is in place
        os.kill(os.getpid(), signal.SIGINT)
    return moved

Path.rename = rename_then_ctrl_c
try:
    write(2)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
print(verify(out), sorted(p.name for p in out.parent.iterdir()), (out / "vlopt_recipe.yaml").read_text().strip())
"""


def test_ctrl_c_between_the_two_renames_of_the_output_swap_leaves_the_new_output(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SWAP, str(tmp_path / "out")], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["interrupted", "[] ['out'] n: 2"], proc.stdout


def test_bench_json_is_written_through_a_temporary_file(tmp_path):
    target = tmp_path / "deep" / "r.json"
    proc = _cli("-q", "bench", "--samples", "1", "--warmup", "0", "--new-tokens", "2", "--json", target)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(target.read_text())["timing"]["torch_threads"] >= 1
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


# ---- what is saved, and what loads -----------------------------------------------------------------
def test_continue_on_error_saves_the_passes_that_applied(tmp_path):
    """A pass that changes a module and then fails is recorded, not kept: the model is rebuilt from
    the passes that applied, and those are saved and load."""
    import torch

    def half_done(vlm, cfg, ctx):
        with torch.no_grad():
            vlm.lm_head.weight.zero_()
        raise RuntimeError("failed half-way")

    class Plugin:
        @vlopt.hookimpl
        def register_passes(self, register):
            register(_Fails, half_done)

    passes = [{"type": "dtype", "dtype": "bfloat16"}, {"type": "fails"}, {"type": "attention", "implementation": "eager"}]
    with temporary_plugin(Plugin(), "faulty"):
        result = run_recipe({"model": TINY, "benchmark": BENCH, "passes": passes}, tmp_path, output=True,
                            continue_on_error=True)
    assert [r.status for r in result.rows] == ["applied", "failed", "applied"] and result.exit_code == 1
    assert result.rows[1].saved_as == "not saved" and result.report["weights_saved"] is True
    loaded = vlopt.load(result.output, device="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.text_model.config._attn_implementation == "eager"
    assert loaded.lm_head.weight.abs().sum() > 0                      # the failed pass's change is not in it
    md = (result.output / "vlopt_report.md").read_text()
    assert "in the checkpoint: no (the pass did not apply)" in md


def test_verify_does_not_call_a_report_only_folder_a_checkpoint(tmp_path):
    def boom(vlm, cfg, ctx):
        raise RuntimeError("kaboom")

    class Plugin:
        @vlopt.hookimpl
        def register_passes(self, register):
            register(_Fails, boom)

    with temporary_plugin(Plugin(), "faulty"):
        result = run_recipe({"model": TINY, "benchmark": BENCH, "passes": [{"type": "attention"}, {"type": "fails"}]},
                            tmp_path, output=True)
    proc = _cli("verify", result.output)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "intact, but it is the report of a run that failed: no weights, not a loadable checkpoint" in proc.stderr
    md = (result.output / "vlopt_report.md").read_text()
    assert "re-applied from the recipe on load" not in md and "no weights saved (report only)" in md


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    return run_recipe({"model": TINY, "benchmark": BENCH, "passes": [{"type": "attention", "implementation": "eager"}]},
                      folder, output=True).output


def test_junk_files_are_ignored_and_named(checkpoint_folder, tmp_path):
    import shutil

    folder = Path(shutil.copytree(checkpoint_folder, tmp_path / "ck"))
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"x")
    (folder / "._model.safetensors").write_bytes(b"\0\5\26\7")      # a macOS resource fork, not weights
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "notes-checkpoint.ipynb").write_text("{}")
    assert verify(folder) == []
    proc = _cli("verify", folder)
    assert proc.returncode == 0 and "ok, a loadable checkpoint (ignored: " in proc.stdout
    for name in (".DS_Store", "Thumbs.db", "._model.safetensors", ".ipynb_checkpoints/notes-checkpoint.ipynb"):
        assert name in proc.stdout
    assert vlopt.load(folder, device="cpu").text_model.config._attn_implementation == "eager"
    (folder / "notes.txt").write_text("not junk")
    assert verify(folder) == ["extra file notes.txt"]


def test_bench_and_load_follow_one_rule_for_a_folder_vlopt_wrote(checkpoint_folder, tmp_path):
    import shutil

    folder = Path(shutil.copytree(checkpoint_folder, tmp_path / "ck"))
    (folder / "vlopt_manifest.json").unlink()
    with pytest.raises(vlopt.VloptError, match="vlopt_manifest.json is missing"):
        vlopt.load(folder, device="cpu")
    _one_line_error(_cli("bench", "--model", folder, "--samples", "1", "--warmup", "0", "--new-tokens", "2"),
                    "vlopt_manifest.json is missing")
    # A plain save_pretrained folder (no vlopt files) is timed as plain weights; vlopt.load says what it is.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint_folder / name, plain / name)
    with pytest.raises(vlopt.VloptError, match="was not written by `vlopt apply`"):
        vlopt.load(plain, device="cpu")
    proc = _cli("-q", "bench", "--model", plain, "--samples", "1", "--warmup", "0", "--new-tokens", "2")
    assert proc.returncode == 0, proc.stderr

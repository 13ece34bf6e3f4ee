"""The command line a user meets, through real subprocesses: usage errors are one line and exit 2,
`--version`, `-q` on either side of the subcommand, Ctrl-C exits 130 with one line at any point,
and importing the Python API prints nothing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vlopt

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The quickstart's shape (tiny EventGPT on the CPU, two passes), with enough samples to still be
# benchmarking when the Ctrl-C tests interrupt it.
RECIPE = """model: {name: eventgpt, preset: tiny, dtype: float32, device: cpu}
benchmark: {workload: eventgpt, samples: 40, warmup: 1, new_tokens: 45}
passes:
  - {type: attention, implementation: sdpa}
  - {type: dtype, dtype: bfloat16}
output: out
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def vlopt_cli(*args, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "vlopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=timeout, **kwargs)


def assert_one_line_error(proc, message, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlopt: error: "), proc.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("args,message", [
    ([], "missing command (one of apply, bench, "),
    ([], "); see 'vlopt --help'"),
    (["apply"], "Missing argument 'recipe'; see 'vlopt apply --help'"),
    (["verify"], "Missing argument 'folder'"),
    (["apply", "r.yaml", "--bogus"], "No such option: --bogus"),
    (["apply", "r.yaml", "--outptu", "x"], "No such option: --outptu (Possible options: --output)"),
    (["--bogus"], "No such option: --bogus; see 'vlopt --help'"),
    (["bench", "--samples", "0"], "Invalid value for '--samples': Input should be greater than or equal to 1"),
    (["bench", "--samples", "many"], "Invalid value for '--samples'"),
    (["bench", "--new-tokens", "4097"], "Invalid value for '--new-tokens': Input should be less than or equal to 4096"),
    (["nosuch"], "No such command 'nosuch'"),
    (["models", "--preset"], "Option '--preset' requires an argument"),
    (["apply", "r.yaml", "r2.yaml"], "unexpected extra argument(s) (r2.yaml)"),
    (["-q"], "missing command"),
])
def test_usage_errors_are_one_line_and_exit_2(args, message):
    proc = vlopt_cli(*args)
    assert_one_line_error(proc, message)
    assert proc.stdout == ""


def test_version_prints_the_package_version():
    proc = vlopt_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"vlopt {vlopt.__version__}\n" and proc.stderr == ""


def test_help_still_works_and_lists_the_global_options():
    proc = vlopt_cli("--help")
    assert proc.returncode == 0 and "--version" in proc.stdout and "--quiet" in proc.stdout
    sub = vlopt_cli("apply", "--help")
    assert sub.returncode == 0 and "--quiet" in sub.stdout and "--dry-run" in sub.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_is_accepted_before_and_after_the_subcommand(recipe, where):
    args = ["apply", recipe, "--dry-run"]
    args = ["-q", *args] if where == "before" else [*args, "-q"]
    proc = vlopt_cli(*args)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr       # no plan lines, no progress
    assert "implementation: sdpa" in proc.stdout                         # the resolved recipe still prints
    loud = vlopt_cli("apply", recipe, "--dry-run")
    assert loud.returncode == 0 and "1. attention" in loud.stderr


def test_dry_run_refuses_what_the_run_would(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: gpt5}\n")
    assert_one_line_error(vlopt_cli("apply", recipe, "--dry-run"), "'model.name' (line 1): unknown model 'gpt5'")
    recipe.write_text("model: {name: eventgpt, preset: 13b}\n")
    assert_one_line_error(vlopt_cli("apply", recipe, "--dry-run"), "unknown preset '13b' for eventgpt")
    recipe.write_text("model: {name: eventgpt}\npasses:\n  - {type: {int4: 1}}\n")
    assert_one_line_error(vlopt_cli("apply", recipe, "--dry-run"), "`type` must be a pass name (a string)")


def test_an_event_file_with_a_huge_coordinate_is_one_line_error(tmp_path):
    ev = tmp_path / "ev.npz"
    np.savez(ev, x=np.array([1, 34_500_000, 3]), y=np.array([0, 1, 2]), p=np.array([0, 1, 1]), t=np.array([0, 5, 9]))
    proc = vlopt_cli("bench", "--model", "eventgpt", "--device", "cpu", "--samples", "1", "--warmup", "0",
                     "--new-tokens", "2", "--input", ev)
    assert_one_line_error(proc, f"{ev}: x reaches 34500000, beyond the 4096×4096 sensors vlopt handles")


def _interrupt(args, after_s):
    """Start `vlopt ARGS` in its own process group, send the group SIGINT (what Ctrl-C in a terminal
    does) after `after_s` seconds, and return the finished process and how long it took to exit."""
    child = subprocess.Popen([sys.executable, "-m", "vlopt", *map(str, args)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(after_s)
    assert child.poll() is None, "finished before the signal"
    os.killpg(child.pid, signal.SIGINT)
    sent = time.perf_counter()
    try:
        out, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise AssertionError(f"still running 20 s after SIGINT at {after_s} s")
    return child.returncode, out, err, time.perf_counter() - sent


def assert_interrupted(code, err):
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == "vlopt: interrupted", err


@pytest.mark.parametrize("after_s", [0.5, 2, 5])     # importing, building the model, benchmarking
def test_ctrl_c_during_apply_exits_130_with_one_line(recipe, tmp_path, after_s):
    out = tmp_path / "out"
    code, _, err, took = _interrupt(["apply", recipe, "--force"], after_s)
    assert_interrupted(code, err)
    assert took < 10
    if out.exists():                                  # never a partial checkpoint
        from vlopt.checkpoint import verify
        assert verify(out) == []


@pytest.mark.parametrize("after_s", [0.5, 3])
def test_ctrl_c_during_bench_exits_130_with_one_line(after_s):
    code, _, err, _ = _interrupt(["bench", "--model", "eventgpt", "--device", "cpu", "--samples", "50"], after_s)
    assert_interrupted(code, err)


# A command registered only in the child process, for what real runs hit by chance.
_SCRIPT = """
import signal, sys, time
from vlopt import cli

class Finalizer:
    def __del__(self):                      # Ctrl-C arriving while a finalizer runs
        signal.raise_signal(signal.SIGINT)
        time.sleep(0)

@cli.app.command()
def finalizer():
    print("ready", flush=True)
    Finalizer()
    time.sleep(5)
    print("kept running")

@cli.app.command()
def swallow():
    print("ready", flush=True)
    try:
        time.sleep(10)
    except KeyboardInterrupt:               # a library that swallows the first Ctrl-C
        time.sleep(10)
    print("kept running")

sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_inside_a_finalizer_still_stops_the_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_SCRIPT)
    child = subprocess.Popen([sys.executable, script, "finalizer"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"      # started: what follows is the command alone
    start = time.perf_counter()
    out, err = child.communicate(timeout=30)
    assert_interrupted(child.returncode, err)
    assert "kept running" not in out and time.perf_counter() - start < 3


def test_a_second_ctrl_c_stops_at_once_even_if_the_first_was_swallowed(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_SCRIPT)
    child = subprocess.Popen([sys.executable, script, "swallow"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    time.sleep(0.5)
    start = time.perf_counter()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=5)
    assert time.perf_counter() - start < 2 and "kept running" not in out
    assert_interrupted(child.returncode, err)


def test_importing_the_python_api_and_building_a_model_prints_nothing():
    code = "import vlopt; vlopt.load_model('eventgpt', preset='tiny', device='cpu')"
    env = {k: v for k, v in ENV.items() if k != "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"}   # as a user's script
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr

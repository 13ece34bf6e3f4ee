"""`vlopt run` through real subprocesses: a folder of 20 mixed inputs (images, frame folders, mp4
videos, frame arrays; one corrupt) on the tiny Video-LLaVA gives 19 answers and one error line; a
rerun answers nothing twice; two torchrun ranks give the same file; a killed run is finished by a
rerun; bad arguments are one-line errors."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLOPT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
RECIPE = ("model: {name: videollava, preset: tiny, dtype: float32, device: cpu}\n"
          "passes:\n  - {type: fast_decode, compile: false}\n")


def _vlopt(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vlopt.cli", *args], capture_output=True, text=True, cwd=cwd, env=ENV)


def _torchrun(*args, cwd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    return subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(port), "-m", "vlopt.cli", *args],
                          capture_output=True, text=True, cwd=cwd, env=ENV)


def _write_mp4(path, seed):
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _mixed_inputs(folder):
    """20 inputs: 5 images, 5 frame folders, 4 mp4 videos, 5 frame arrays and one corrupt image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"image{i}.png")
        frames = folder / f"frames{i}"
        frames.mkdir()
        for j in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(frames / f"{j:02d}.png")
        np.save(folder / f"array{i}.npy", rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    for i in range(4):
        _write_mp4(folder / f"video{i}.mp4", i)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return sorted(str(p) for p in folder.iterdir())


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "recipe.yaml").write_text(RECIPE)
    return root, _mixed_inputs(root / "inputs")


def test_a_folder_of_mixed_inputs_gets_19_answers_and_one_error_line_and_a_rerun_answers_nothing_twice(workspace):
    root, inputs = workspace
    out = root / "single.jsonl"
    args = ["run", "recipe.yaml", "inputs", "--batch", "4", "--new-tokens", "4", "-o", str(out)]
    first = _vlopt(*args, cwd=root)
    assert first.returncode == 1, first.stderr[-3000:]            # one input could not be read
    rows = _lines(out)
    assert [r["input"] for r in rows] == [os.path.join("inputs", os.path.basename(p)) for p in inputs]
    errors = [r for r in rows if r["error"] is not None]
    assert [os.path.basename(r["input"]) for r in errors] == ["broken.png"] and errors[0]["answer"] is None
    assert "broken.png" in errors[0]["error"] and "\n" not in errors[0]["error"]
    answers = [r for r in rows if r["error"] is None]
    assert len(answers) == 19
    assert {r["workload"] for r in answers} == {"videollava", "videollava-image"}       # image and video prompts
    for r in answers:
        assert r["tokens"] == len(r["token_ids"]) and 1 <= r["tokens"] <= 4 and isinstance(r["answer"], str)
        assert r["stage4_s"] > 0 and r["stage4_per_clip_s"] == pytest.approx(r["stage4_s"] / r["batch"])
        assert r["question"] and r["rank"] == 0
    assert any(r["batch"] == 4 and r["one_pass"] for r in answers)
    progress = [line for line in first.stderr.splitlines() if line.startswith("vlopt run: round")]
    assert len(progress) == 5                                        # 20 inputs in batches of 4
    assert "19 answered, 1 errors" in first.stderr

    again = _vlopt(*args, cwd=root)
    rerun = _lines(out)[len(rows):]
    assert [os.path.basename(r["input"]) for r in rerun] == ["broken.png"]      # only the failed one is retried
    assert "19 already answered" in again.stderr
    answered = [r["input"] for r in _lines(out) if r["error"] is None]
    assert len(answered) == len(set(answered)) == 19


def test_two_torchrun_ranks_write_the_same_answers(workspace):
    root, _ = workspace
    single = root / "single.jsonl"
    if not single.exists():
        _vlopt("run", "recipe.yaml", "inputs", "--batch", "4", "--new-tokens", "4", "-o", str(single), cwd=root)
    out = root / "two.jsonl"
    proc = _torchrun("run", "recipe.yaml", "inputs", "--batch", "4", "--new-tokens", "4", "-o", str(out), cwd=root)
    assert proc.returncode != 0 and "19 answered, 1 errors" in proc.stderr, proc.stderr[-3000:]
    rows = _lines(out)
    want = [r for r in _lines(single)][:20]
    assert [(r["input"], r["answer"], r["error"]) for r in rows] == [(r["input"], r["answer"], r["error"]) for r in want]
    assert {r["rank"] for r in rows if r["error"] is None} == {0, 1}               # both ranks answered
    again = _torchrun("run", "recipe.yaml", "inputs", "--batch", "4", "--new-tokens", "4", "-o", str(out), cwd=root)
    assert [os.path.basename(r["input"]) for r in _lines(out)[20:]] == ["broken.png"], again.stderr[-2000:]


def test_a_killed_run_is_finished_by_a_rerun(workspace, tmp_path):
    root, inputs = workspace
    inputs = [p for p in inputs if "broken" not in p]
    out = tmp_path / "killed.jsonl"
    args = [sys.executable, "-m", "vlopt.cli", "run", str(root / "recipe.yaml"), *inputs[:8], "--batch", "2",
            "--new-tokens", "4", "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    written = out.read_text().count("\n")
    assert 2 <= written < 8                                      # killed part-way
    with out.open("a") as fh:
        fh.write('{"input": "cut sho')                           # a line the kill cut short
    done = _vlopt("run", str(root / "recipe.yaml"), *inputs[:8], "--batch", "2", "--new-tokens", "4", "-o", str(out),
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if not line.startswith('{"input": "cut')]
    assert sorted(r["input"] for r in rows) == sorted(inputs[:8]) and all(r["error"] is None for r in rows)


@pytest.mark.parametrize("args, message", [
    (["run", "nothere.yaml", "x"], "neither a recipe file nor a checkpoint folder"),
    (["run", "recipe.yaml", "missing.png"], "input missing.png does not exist"),
    (["run", "recipe.yaml", "inputs", "--batch", "0"], "--batch"),
    (["run", "recipe.yaml", "inputs", "--workload", "eventgpt"], "workload 'eventgpt' is for eventgpt"),
])
def test_bad_arguments_are_one_line_errors(workspace, args, message):
    root, _ = workspace
    proc = _vlopt(*args, cwd=root)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_an_eventgpt_checkpoint_answers_event_files_and_names_what_it_cannot_read(tmp_path):
    from vlopt.events import synthetic_events
    from vlopt.testing import run_recipe

    recipe = {"model": {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"},
              "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 4, "quality_scenes": 0},
              "passes": [{"type": "fast_decode", "compile": False}]}
    assert run_recipe(recipe, tmp_path, output=True).exit_code == 0
    events = synthetic_events()
    for i in range(3):
        np.savez(tmp_path / f"clip{i}.npz", **{k: events[k][i * 100:] for k in ("x", "y", "p", "t")})
    (tmp_path / "notes.txt").write_text("not an input")
    out = tmp_path / "answers.jsonl"
    proc = _vlopt("run", "out", "clip0.npz", "clip1.npz", "clip2.npz", "notes.txt", "--question", "What moves?",
                  "--new-tokens", "3", "--batch", "2", "-o", str(out), cwd=tmp_path)
    rows = _lines(out)
    assert [r["error"] is None for r in rows] == [True, True, True, False], proc.stderr[-2000:]
    assert all(r["question"] == "What moves?" for r in rows) and "not an input vlopt reads" in rows[3]["error"]

"""Preflight: what is knowable before the run is refused by `--dry-run` and at the start of every run,
before the baseline, as one line (exit 2). Each pass declares its own checks (`PassConfig.preflight`);
the manager collects them without branching on pass names."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

import vlopt
from vlopt.passes import PassConfig
from vlopt.testing import run_recipe, temporary_plugin

ROOT = Path(__file__).resolve().parent.parent
# No CUDA in the child whatever the machine has, so "a CUDA recipe without CUDA" is this machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TINY = {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"}
BENCH = {"samples": 1, "warmup": 0, "new_tokens": 4, "quality_scenes": 0}   # quality has its own tests


def _tiny_text():
    import torch

    from vlopt.plugins import get_registry
    family = get_registry().models["eventgpt"]
    return family.build("tiny", dtype=torch.bfloat16, device="cpu", meta=True).text_model.config.to_dict()


# The tiny preset's widths and depth, read from it (the messages name them).
HIDDEN, MLP, LAYERS = (_tiny_text()[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
FITS = [g for g in (32, 64, 128, 256) if HIDDEN % g == 0 and MLP % g == 0]
UNFIT = next(g for g in (256, 128, 64) if HIDDEN % g or MLP % g)


def vlopt_cli(*args, env=ENV):
    return subprocess.run([sys.executable, "-m", "vlopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def assert_one_line_error(proc, *messages):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlopt: error: the run would fail: "), proc.stderr
    for message in messages:
        assert message in lines[0], lines[0]


def write_recipe(tmp_path, passes, model=TINY, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": model, "benchmark": BENCH, "passes": passes, "output": "out"}))
    return path


def test_dry_run_names_each_problem_in_one_line(tmp_path):
    proc = vlopt_cli("apply", write_recipe(tmp_path, [{"type": "attention", "implementation": "flash"},
                                                      {"type": "tensor_parallel", "size": 2},
                                                      {"type": "int4", "group_size": UNFIT}]), "--dry-run")
    assert_one_line_error(
        proc, "passes[0] (attention): attention implementation 'flash' needs a CUDA GPU; on CPU use 'sdpa' or 'eager'",
        "passes[1] (tensor_parallel): tensor_parallel.size 2 needs 2 processes, but vlopt runs without torchrun: "
        "run `torchrun --nproc-per-node 2 -m vlopt.cli apply RECIPE`",
        f"passes[2] (int4): int4.group_size {UNFIT} does not divide the decoder's widths (hidden {HIDDEN}, MLP {MLP}); "
        f"use group_size {' or '.join(map(str, FITS))}")


def test_the_run_refuses_before_the_baseline(tmp_path):
    # The same check at the start of a real run: nothing is built, benchmarked or written.
    proc = vlopt_cli("apply", write_recipe(tmp_path, [{"type": "dtype"}, {"type": "int4", "group_size": UNFIT}]))
    assert_one_line_error(proc, "passes[1] (int4)")
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_a_cuda_recipe_on_a_machine_without_cuda(tmp_path):
    proc = vlopt_cli("apply", write_recipe(tmp_path, [], {**TINY, "device": "cuda"}), "--dry-run")
    assert_one_line_error(proc, "the recipe runs on device cuda, but this machine has no CUDA GPU")


def _preflight(tmp_path, passes, model=TINY, device=None):
    from vlopt import manager
    from vlopt.recipe import load_recipe

    recipe = write_recipe(tmp_path, passes, model)
    rec, configs = load_recipe(recipe)
    return manager.preflight(manager.resolve(rec, configs, recipe_path=recipe, output=None), device)


def test_fastv_with_an_engine_of_its_own_loop_in_either_order(tmp_path):
    fastv = {"type": "prune_visual", "method": "fastv"}
    before, = _preflight(tmp_path, [fastv, {"type": "fast_decode"}])
    assert before.startswith("passes[0] (prune_visual): ") and "Use prune_visual method: cls_attention" in before
    assert before.endswith("(this recipe also has fast_decode)")
    after, = _preflight(tmp_path, [{"type": "fast_decode"}, fastv])
    assert after.startswith("passes[1] (prune_visual): ")
    assert "also has layer_skip" in _preflight(tmp_path, [{"type": "layer_skip"}, fastv])[0]
    assert _preflight(tmp_path, [{"type": "prune_visual", "method": "cls_attention"}, {"type": "fast_decode"}]) == []


def test_layer_counts_and_the_device_given_on_the_command_line(tmp_path, monkeypatch):
    problem, = _preflight(tmp_path, [{"type": "layer_skip", "draft_layers": LAYERS}])
    assert f"draft_layers must be below the decoder's {LAYERS} layers" in problem
    # --device cuda (here: no CUDA) is what preflight checks, not the recipe's cpu.
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "no CUDA GPU" in _preflight(tmp_path, [], device="cuda")[0]


def test_what_preflight_allows_still_runs(tmp_path):
    assert _preflight(tmp_path, [{"type": "int4", "group_size": FITS[0]}, {"type": "prune_visual", "method": "fastv"},
                                 {"type": "attention", "implementation": "sdpa"}]) == []


def test_a_checkpoint_folder_gives_its_widths_from_config_json(tmp_path):
    from vlopt import manager
    from vlopt.recipe import load_recipe

    folder = tmp_path / "ck"
    vlopt.load_model("eventgpt", preset="tiny", dtype="float32", device="cpu").hf.save_pretrained(str(folder))
    (folder / "tokenizer.json").write_text("{}")
    recipe = write_recipe(tmp_path, [{"type": "int4", "group_size": UNFIT}], model={"path": "ck", "device": "cpu"})
    rec, configs = load_recipe(recipe)
    plan = manager.resolve(rec, configs, recipe_path=recipe, output=None)
    facts = manager.model_facts(plan)
    assert (facts.family, facts.preset, facts.hidden_size, facts.intermediate_size) == ("eventgpt", None, HIDDEN, MLP)
    assert f"group_size {UNFIT} does not divide" in manager.preflight(plan)[0]


class _NeedsManyLayers(PassConfig):
    type: Literal["needs_many_layers"] = "needs_many_layers"

    def preflight(self, facts, plan):
        return [] if facts.num_layers == 99 else [f"needs 99 decoder layers, the model has {facts.num_layers}"]


def test_a_plugin_pass_declares_its_own_preflight(tmp_path):
    applied = []

    class Plugin:
        @vlopt.hookimpl
        def register_passes(self, register):
            register(_NeedsManyLayers, lambda vlm, cfg, ctx: applied.append(cfg))

    with temporary_plugin(Plugin(), "many"):
        with pytest.raises(vlopt.VloptError, match=rf"passes\[0\] \(needs_many_layers\): needs 99 decoder layers, "
                                                   rf"the model has {LAYERS}"):
            run_recipe({"model": TINY, "benchmark": BENCH, "passes": [{"type": "needs_many_layers"}]}, tmp_path)
    assert applied == []

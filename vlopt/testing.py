"""Helpers for testing passes — vlopt's own tests and third-party plugin authors use the same ones.

    from vlopt.testing import run_pass, assert_fidelity, temporary_plugin

    row = run_pass({"type": "my_pass", "k": 2}, model="videollava")   # a vlopt.rows.PassRow
    assert_fidelity(row, min_top1=0.95, max_kl=1e-3)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

# Quality on held-out scenes is off here (a pass's tests choose how many scenes they need): it
# costs one decoding per scene and model state.
TINY_BENCH = {"samples": 1, "warmup": 0, "new_tokens": 8, "quality_scenes": 0}


def tiny_model(name: str = "eventgpt"):
    """A tiny random-weight model (real structure) on the CPU in float32."""
    from vlopt.models import load_model
    return load_model(name, preset="tiny", dtype="float32", device="cpu")


def run_recipe(recipe: dict, tmp_dir: str | Path, *, output: bool = False, continue_on_error: bool = False):
    """Write `recipe` (a dict) to `tmp_dir`, run the manager on it and return its `RunResult`."""
    from vlopt import manager
    from vlopt.recipe import load_recipe

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rec, configs = load_recipe(path)
    out = (tmp_dir / "out") if output else None
    return manager.run(rec, configs, recipe_path=path, output=out, force=True, continue_on_error=continue_on_error)


def run_pass(pass_config: dict, *, model: str = "eventgpt", preset: str = "tiny",
             tmp_dir: str | Path | None = None, benchmark: dict | None = None):
    """Apply one pass to a tiny model through the real manager; return its `vlopt.rows.PassRow`
    (status, speedup_vs_baseline, fidelity, modules touched/skipped, …). Raises if the pass failed."""
    import tempfile

    recipe = {"model": {"name": model, "preset": preset, "dtype": "float32", "device": "cpu"},
              "benchmark": {**TINY_BENCH, **(benchmark or {})}, "passes": [pass_config]}
    with contextlib.ExitStack() as stack:
        folder = tmp_dir or stack.enter_context(tempfile.TemporaryDirectory())
        result = run_recipe(recipe, folder)
    row = result.rows[0]
    if not row.applied:
        raise AssertionError(f"pass {pass_config['type']} {row.status}: {row.error}")
    return row


def assert_fidelity(row, *, min_top1: float = 1.0, max_kl: float = 1e-6, exact_tokens: bool = False) -> None:
    """Fail with a readable message when a pass's fidelity (a `PassRow`'s) is below the thresholds."""
    fid = row.fidelity
    problems = []
    if fid["top1_agreement"] < min_top1:
        problems.append(f"top-1 agreement {fid['top1_agreement']:.4f} < {min_top1}")
    if fid["mean_kl"] > max_kl:
        problems.append(f"mean KL {fid['mean_kl']:.3g} > {max_kl}")
    if exact_tokens and fid["first_divergence"] is not None:
        problems.append(f"greedy output diverges at token {fid['first_divergence']}")
    if problems:
        raise AssertionError(f"pass {row.pass_type}: " + "; ".join(problems))


@contextlib.contextmanager
def temporary_plugin(plugin, name: str = "test-plugin"):
    """Register `plugin` (a module or object with hookimpls) for the duration of the block, on top
    of the built-ins (and of nothing else installed unless VLOPT_LOAD_PLUGINS allows it)."""
    from vlopt import plugins

    saved = plugins._REGISTRY
    plugins.set_registry(plugins.build_registry(extra=[(name, plugin)]))
    try:
        yield plugins.get_registry()
    finally:
        plugins.set_registry(saved)

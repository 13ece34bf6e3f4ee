from pathlib import Path

import pytest

from vlopt.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe, configs = load_recipe(path)
    assert configs or path.stem == "quickstart"
    assert recipe.output


@pytest.mark.parametrize("name", ["quantize-cpu", "memory-bitsandbytes", "prune-visual", "prune-fastv", "early-exit"])
def test_cpu_recipes_run_end_to_end(name, tmp_path):
    from vlopt import manager
    recipe, configs = load_recipe(Path(__file__).parent.parent / "recipes" / f"{name}.yaml")
    recipe.benchmark.samples, recipe.benchmark.warmup, recipe.benchmark.new_tokens = 1, 0, 8
    recipe.benchmark.quality_scenes = 8        # quality is measured on every pass, on fewer scenes here
    result = manager.run(recipe, configs, recipe_path=tmp_path / "r.yaml", output=tmp_path / "out")
    assert result.exit_code == 0, result.failures
    assert all(r["status"] == "applied" for r in result.report["passes"])
    for row in result.rows:
        assert row.quality is not None and (row.quality.not_measured or row.quality.scenes == 8), row.pass_type

import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlopt.errors import VloptError
from vlopt.recipe import load_recipe

GOOD = """model: {name: eventgpt, preset: tiny}
benchmark:
  samples: 2
passes:
  - {type: attention, implementation: eager}
  - type: dtype
    dtype: bfloat16
"""


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


def test_a_good_recipe_validates_every_pass(tmp_path):
    recipe, configs = load_recipe(_write(tmp_path, GOOD))
    assert recipe.benchmark.samples == 2 and [c.type for c in configs] == ["attention", "dtype"]
    assert configs[0].implementation == "eager"


@pytest.mark.parametrize("text,message", [
    (GOOD.replace("samples: 2", "sampels: 2"), "unknown key 'benchmark.sampels' (line 3); allowed keys: workload, samples"),
    (GOOD.replace("preset: tiny", "preset: huge"), "'model.preset' (line 1)"),
    (GOOD.replace("samples: 2", "samples: many"), "'benchmark.samples' (line 3)"),
    (GOOD.replace("samples: 2", "samples: 0"), "greater than or equal to 1"),
    (GOOD.replace("implementation: eager", "implementation: fast"), "'passes.0.implementation' (line 5)"),
    (GOOD.replace("    dtype: bfloat16", "    dtpye: bfloat16"), "unknown key 'passes.1.dtpye' (line 7); allowed keys: type, dtype"),
    (GOOD.replace("type: dtype", "type: int9"), "passes[1] (line 6): unknown pass type 'int9'; known types:"),
    (GOOD.replace("{name: eventgpt, preset: tiny}", "{preset: tiny}"), "exactly one of model.name"),
    ("benchmark: {samples: 1}\n", "missing key 'model'"),
    ("model: {name: eventgpt}\npasses:\n  - attention\n", "passes[0] (line 3) must be a mapping with a `type` key"),
    ("model: {name: eventgpt\n", "not valid YAML at line 2"),
    ("", "is empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("model: {name: eventgpt}\nextra: 1\n", "unknown key 'extra' (line 2)"),
])
def test_recipe_errors_name_the_key_and_line(tmp_path, text, message):
    with pytest.raises(VloptError) as info:
        load_recipe(_write(tmp_path, text))
    assert message in str(info.value)


def test_directory_binary_and_missing_recipes(tmp_path):
    with pytest.raises(VloptError, match="is a directory"):
        load_recipe(tmp_path)
    with pytest.raises(VloptError, match="binary file"):
        load_recipe(_write(tmp_path, b"\x89PNG\x00\x00\x01", "r.png"))
    with pytest.raises(VloptError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_tags_that_would_build_objects_are_refused(tmp_path):
    text = "model: !!python/object/apply:os.system ['touch pwned']\n"
    with pytest.raises(VloptError, match="not valid YAML"):
        load_recipe(_write(tmp_path, text))
    assert not (tmp_path / "pwned").exists()


def test_cli_recipe_error_exits_2_without_traceback(tmp_path):
    p = _write(tmp_path, GOOD.replace("samples: 2", "sampels: 2"))
    proc = subprocess.run([sys.executable, "-m", "vlopt.cli", "apply", str(p), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "sampels" in proc.stderr and "Traceback" not in proc.stderr


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=8), st.floats(allow_nan=False))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), c, max_size=3)),
                       max_leaves=8)
_keys = st.sampled_from(["model", "benchmark", "passes", "output", "modle", "pass", "type", "name", "samples"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_values, st.dictionaries(_keys, _values, max_size=4)),
       mutate=st.sampled_from(["as_is", "truncate", "tab"]))
def test_malformed_recipes_give_one_clear_error_never_a_crash(tmp_path, doc, mutate):
    text = yaml.safe_dump(doc)
    if mutate == "truncate":
        text = text[: len(text) // 2]
    elif mutate == "tab":
        text = "\t" + text
    path = _write(tmp_path, text)
    try:
        load_recipe(path)
    except VloptError as err:
        assert str(err).startswith(f"recipe {path}") and "\n" not in str(err).strip()

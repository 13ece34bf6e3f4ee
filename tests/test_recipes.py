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


# Structure-aware fuzzing: start from a valid recipe that uses every level (model, benchmark, passes
# with fields) and replace, add or delete values anywhere with values of every YAML type.
VALID = {"model": {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"},
         "benchmark": {"workload": "eventgpt", "samples": 2, "warmup": 0, "new_tokens": 8, "natural": False},
         "passes": [{"type": "attention", "implementation": "sdpa"},
                    {"type": "int4", "group_size": 64, "kernel": "triton"},
                    {"type": "fast_decode", "compile": False, "temperature": 0.0},
                    {"type": "prune_visual", "keep": 0.5},
                    {"type": "int8", "targets": ["re:.*"], "ignore": ["lm_head"]}],
         "output": "out"}
_any_key = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.none(), st.booleans(), st.floats(),
                     st.sampled_from(["model", "benchmark", "passes", "output", "type", "name", "preset", "path",
                                      "samples", "workload", "input", "implementation", "keep", "<<"]))
_weird_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10), st.binary(max_size=6), st.dates(),
    st.sampled_from([2 ** 64, -2 ** 63, 10 ** 40, -1, 0, 4097, "3", "true", "", " ", "\x00", "eventgpt", "videollava",
                     "7b", "dtype", "int4", "re:(", "~", "../..", "nope"]))
_weird = st.recursive(_weird_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                          st.dictionaries(_any_key, c, max_size=3)), max_leaves=6)


def _mutate(data, doc):
    """One random replace / add / delete somewhere in `doc` (a dict or list), or a new top level."""
    if data.draw(st.integers(0, 20)) == 0:
        return data.draw(_weird)
    node = doc
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        child = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        if not isinstance(node[child], (dict, list)):
            break
        node = node[child]
    action = data.draw(st.sampled_from(["replace", "add", "delete"]))
    slots = list(node) if isinstance(node, dict) else list(range(len(node)))
    if action == "add" or not slots:
        if isinstance(node, dict):
            node[data.draw(_any_key)] = data.draw(_weird)
        else:
            node.append(data.draw(_weird))
    elif action == "replace":
        node[data.draw(st.sampled_from(slots))] = data.draw(_weird)
    else:
        del node[data.draw(st.sampled_from(slots))]
    return doc


@pytest.fixture(scope="module")
def registry():
    from vlopt.plugins import get_registry
    return get_registry()


def _assert_recipe_error_or_valid(path, registry):
    try:
        recipe, configs = load_recipe(path, registry)
    except VloptError as err:
        message = str(err)
        assert message.startswith(f"recipe {path}") and "\n" not in message and len(message) < 1500, message
        return None
    assert all(c.type in registry.passes for c in configs)
    return recipe


def test_the_fuzzing_seed_recipe_is_valid(tmp_path, registry):
    assert _assert_recipe_error_or_valid(_write(tmp_path, yaml.safe_dump(VALID)), registry) is not None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_recipes_mutated_anywhere_give_a_recipe_error_never_a_python_error(tmp_path, registry, data):
    import copy

    doc = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(data, doc)
        if not isinstance(doc, (dict, list)):
            break
    _assert_recipe_error_or_valid(_write(tmp_path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)), registry)


_LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n"
                  for p, a in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg"))


@pytest.mark.parametrize("text,message", [
    ("model: {name: eventgpt}\npasses:\n  - {type: {int4: 1}}\n", "passes[0] (line 3): `type` must be a pass name (a string), got {'int4': 1}"),
    ("model: {name: eventgpt}\npasses:\n  - {type: [dtype]}\n", "`type` must be a pass name (a string), got ['dtype']"),
    ("model: {name: eventgpt}\npasses:\n  - {type: 3}\n", "got 3; known types:"),
    ("model: {name: eventgpt}\npasses: {type: dtype}\n", "'passes' (line 2): Input should be a valid list"),
    ("model: [eventgpt]\n", "'model' (line 1): Input should be a valid dictionary"),
    ("model: {name: eventgpt}\nbenchmark: {samples: '3'}\n", "'benchmark.samples' (line 2): Input should be a valid integer (got '3')"),
    ("model: {name: eventgpt}\nbenchmark: {samples: true}\n", "'benchmark.samples' (line 2): Input should be a valid integer (got True)"),
    ("model: {name: eventgpt}\nbenchmark: {natural: 1}\n", "'benchmark.natural' (line 2): Input should be a valid boolean"),
    ("model: {name: eventgpt}\nbenchmark: {samples: 1e999}\n", "'benchmark.samples'"),
    ("model: {name: eventgpt}\nbenchmark: {new_tokens: 4097}\n", "less than or equal to 4096"),
    ("model: {name: eventgpt}\nbenchmark: {samples: " + "9" * 5000 + "}\n", "holds an integer too long to read"),
    ("model: {name: eventgpt}\npasses: [{type: fast_decode, compile: 'yes'}]\n", "'passes.0.compile' (line 2): Input should be a valid boolean"),
    ("model: {name: eventgpt}\npasses: [{type: fast_decode, temperature: .nan}]\n", "'passes.0.temperature'"),
    ("model: {name: eventgpt}\npasses: [{type: dtype, 5: x}]\n", "'passes.0.5' (line 2): Keys should be strings"),
    ("model: {name: eventgpt, 5: x}\n", "'model.5' (line 1): Keys should be strings"),
    ("model: {name: !!binary aGVsbG8=}\n", "'model.name' (line 1): Input should be a valid string (got b'hello')"),
    ("model: {name: 2024-01-01}\n", "Input should be a valid string (got datetime.date(2024, 1, 1))"),
    ("model: {name: 2024-13-45}\n", "holds a value YAML cannot read (month must be in 1..12)"),
    ("model: {name: eventgpt}\nmodel: {name: videollava}\n", "key 'model' appears twice in one mapping (lines 1 and 2)"),
    ("model: {name: eventgpt, name: videollava}\n", "key 'name' appears twice"),
    ("model: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("model: &a [*a]\n", "more than 20000 values"),
    (_LAUGHS + "model: {name: *g}\n", "more than 20000 values"),
    ("? [a, b]\n: 1\n", "not valid YAML at line 1"),
    ("model: {name: eventgpt}\n---\nmodel: {name: eventgpt}\n", "not valid YAML at line 2"),
    ("model: {name: eventgpt}\noutput: ''\n", "'output' (line 2): must be a non-empty path"),
    ("model: {name: eventgpt}\n" + "".join(f"k{i}: 1\n" for i in range(20)), "and 15 more"),
    ("model: {name: \"a\\nb\"}\n", "unknown model 'a\\nb'"),
    ("model: {name: " + "a" * 5000 + "}\n", "unknown model 'aaaa"),
])
def test_malformed_values_of_every_type_are_recipe_errors(tmp_path, registry, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(VloptError) as info:
        load_recipe(path, registry)
    assert message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 1500


@pytest.mark.parametrize("text,message", [
    ("model: {name: gpt5}\n", "'model.name' (line 1): unknown model 'gpt5'; choose one of eventgpt, "),
    ("model: {name: eventgpt, preset: 13b}\n", "'model.preset' (line 1): unknown preset '13b' for eventgpt; choose one of tiny, tiny-random, 7b"),
    ("model: {path: nowhere}\n", "'model.path' (line 1):"),
    ("model: {name: eventgpt}\nbenchmark: {workload: nope}\n", "'benchmark.workload' (line 2): unknown workload 'nope'"),
    ("model: {name: eventgpt}\nbenchmark: {workload: videollava}\n",
     "'benchmark.workload' (line 2): workload 'videollava' is for videollava, not eventgpt; choose one of eventgpt"),
    ("model: {name: eventgpt}\nbenchmark: {input: missing.npz}\n", "'benchmark.input' (line 2):"),
])
def test_names_and_files_a_recipe_refers_to_are_checked_at_load(tmp_path, registry, text, message):
    with pytest.raises(VloptError, match="^recipe ") as info:
        load_recipe(_write(tmp_path, text), registry)
    assert message in str(info.value)


def test_checkpoint_folders_are_recognised_at_load(tmp_path, registry):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{not json")
    with pytest.raises(VloptError, match="config.json is not readable JSON"):
        load_recipe(_write(tmp_path, "model: {path: ck}\n"), registry)
    (ck / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(VloptError, match="model_type 'bert' is none of the known models"):
        load_recipe(_write(tmp_path, "model: {path: ck}\n"), registry)
    (ck / "config.json").write_text('{"model_type": "video_llava"}')
    with pytest.raises(VloptError, match="workload 'eventgpt' is for eventgpt, not videollava"):
        load_recipe(_write(tmp_path, "model: {path: ck}\nbenchmark: {workload: eventgpt}\n"), registry)
    recipe, _ = load_recipe(_write(tmp_path, "model: {path: ck}\nbenchmark: {workload: videollava}\n"), registry)
    assert recipe.model.path == "ck"

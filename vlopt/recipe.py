"""Recipes: YAML read with a safe loader, validated strictly; every error names the key and its line.

`load_recipe` checks everything the recipe and the plugin registry alone can tell, without building
a model: the YAML (size, nesting, duplicate keys), every key and value (strict types: a quoted "3"
is not a number, 1 is not true), the model family and its preset, the workload and whether it is that
model's, the checkpoint folder and input file named, and every pass config. `vlopt apply --dry-run`
and a real run both start with it. Checks that need the pass and engine contracts (a pass against the
device or the model's widths) come after it, from the manager.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlopt.errors import VloptError

MAX_NEW_TOKENS = 4096     # the token budget's cap, here and in `vlopt bench --new-tokens`
MAX_VALUES = 20_000       # values in one recipe, counting every use of a YAML anchor (a recipe has ~50)
MAX_ERRORS = 5            # validation problems listed in one message
MAX_BATCH = 512           # the largest batch size, here and in `vlopt bench --batch` / `vlopt run --batch`

_STRICT = ConfigDict(extra="forbid", strict=True)


def _a_path(value: str | None) -> str | None:
    if value is not None and (not value.strip() or "\x00" in value):
        raise ValueError("must be a non-empty path without NUL characters")
    return value


class ModelSpec(BaseModel):
    model_config = _STRICT

    name: str | None = None           # a registered model family: eventgpt | videollava | a plugin's
    preset: str = "tiny"              # one of the family's presets (tiny | 7b for the built-in ones)
    path: str | None = None           # a local checkpoint folder instead of name + preset
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_pickle: bool = False

    check_path = field_validator("path")(_a_path)

    @model_validator(mode="after")
    def _name_or_path(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of model.name (with model.preset) or model.path")
        return self


class BenchmarkSpec(BaseModel):
    model_config = _STRICT

    workload: str | None = None       # default: the model's own
    samples: int = Field(3, ge=1, le=1000)
    warmup: int = Field(1, ge=0, le=100)
    new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    natural: bool = False             # stop at EOS instead of a fixed token budget
    input: str | None = None          # event file / frames folder; default: the synthetic demo input
    fidelity_tokens: int | None = Field(None, ge=2, le=MAX_NEW_TOKENS)
    # Answer quality on held-out scenes of the synthetic task (vlopt.evaluate); 0 turns it off.
    quality_scenes: int = Field(100, ge=0, le=10_000)
    quality_seed: int = Field(1, ge=0, le=2**32 - 1)
    quality_tokens: int = Field(24, ge=1, le=256)    # the natural-length answer's token cap

    # Batch sizes for the throughput-vs-batch table (vlopt.bench_batch), e.g. [1, 4, 16, 32]; none: no table.
    batch: list[int] | None = None

    check_input = field_validator("input")(_a_path)

    @field_validator("batch")
    @classmethod
    def _batch_sizes(cls, sizes: list[int] | None) -> list[int] | None:
        return None if sizes is None else check_batch_sizes(sizes)


def check_batch_sizes(sizes: list[int]) -> list[int]:
    """Batch sizes: a non-empty list of distinct whole numbers 1..MAX_BATCH, in the order given."""
    if not sizes:
        raise ValueError("give at least one batch size, e.g. [1, 4, 16, 32]")
    bad = [s for s in sizes if not 1 <= s <= MAX_BATCH]
    if bad:
        raise ValueError(f"batch sizes must be between 1 and {MAX_BATCH}, not {bad[0]}")
    if len(set(sizes)) != len(sizes):
        raise ValueError("batch sizes must be distinct")
    return sizes


class Recipe(BaseModel):
    model_config = _STRICT

    model: ModelSpec
    benchmark: BenchmarkSpec = BenchmarkSpec()
    passes: list[Any] = []            # validated against the registered pass configs
    output: str | None = None

    check_output = field_validator("output")(_a_path)


def _load_yaml(path: Path):
    import yaml

    if not path.exists():
        raise VloptError(f"recipe {path} does not exist")
    if path.is_dir():
        raise VloptError(f"recipe {path} is a directory; give a .yaml file")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise VloptError(f"recipe {path} is a binary file, not YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VloptError(f"recipe {path} is not UTF-8 text") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_shape(path, node)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise VloptError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise VloptError(f"recipe {path} is nested too deeply to be a recipe") from None
    except ValueError as err:      # e.g. an integer of more than 4300 digits, a date like 2024-13-45
        what = "an integer too long to read" if "digits" in str(err) else f"a value YAML cannot read ({err})"
        raise VloptError(f"recipe {path} holds {_show(what, quote=False)}") from None
    if data is None:
        raise VloptError(f"recipe {path} is empty; it needs at least `model:`")
    if not isinstance(data, dict):
        raise VloptError(f"recipe {path} must be a mapping with keys model, benchmark, passes, output; "
                         f"got a {type(data).__name__}")
    return data, node


def _check_shape(path: Path, root) -> None:
    """Refuse a repeated key in one mapping (YAML would keep the last silently) and a recipe of more
    than MAX_VALUES values once anchors are expanded (self-referencing anchors never end)."""
    import yaml

    stack, count = [root] if root is not None else [], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise VloptError(f"recipe {path} has more than {MAX_VALUES} values (counting every use of an "
                             "anchor, or an anchor that refers to itself); a recipe is a short list of settings")
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in seen:
                        raise VloptError(f"recipe {path}: key '{_show(key.value, quote=False)}' appears twice in one "
                                         f"mapping (lines {seen[key.value]} and {key.start_mark.line + 1}); keep one")
                    seen[key.value] = key.start_mark.line + 1
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 60, 60, 40, 3
_REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxtuple = 5


def _show(value, quote: bool = True) -> str:
    """A value for a one-line message: short, control characters escaped."""
    try:
        text = _REPR.repr(value) if quote or not isinstance(value, str) else _REPR.repr(value)[1:-1]
    except ValueError:          # an int too long for str()
        text = "(a number too long to show)"
    return text.replace("\n", "\\n")


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at `loc` (keys and list indices), or of its nearest parent."""
    import yaml

    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _explain(err: ValidationError, node, prefix: tuple = (), allowed: dict | None = None) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS]:
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # _show escapes control characters, so a key like "\n" cannot break the one-line message.
        key = ".".join(_show(p, quote=False) for p in loc) or "(top level)"
        line = _line_of(node, loc)
        where = f" (line {line})" if line else ""
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            known = allowed.get(parent) if allowed else None
            hint = f"; allowed keys: {', '.join(known)}" if known else ""
            lines.append(f"unknown key '{key}'{where}{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'{where}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}'{where}: {msg}" + (f" (got {_show(e['input'])})" if "input" in e and
                                                     not isinstance(e["input"], dict) else ""))
    if len(errors) > MAX_ERRORS:
        lines.append(f"and {len(errors) - MAX_ERRORS} more")
    return "; ".join(lines)


def load_recipe(path: str | Path, registry=None) -> tuple[Recipe, list]:
    """Read and validate a recipe (see the module docstring). Returns the recipe and the list of
    validated pass configs; any problem is a one-line VloptError naming the key and its line."""
    from vlopt.plugins import get_registry

    path = Path(path)
    data, node = _load_yaml(path)
    allowed = {(): list(Recipe.model_fields), ("model",): list(ModelSpec.model_fields),
               ("benchmark",): list(BenchmarkSpec.model_fields)}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise VloptError(f"recipe {path}: {_explain(err, node, allowed=allowed)}") from None
    registry = registry or get_registry()
    _check_references(path, recipe, node, registry)
    known = f"known types: {', '.join(sorted(registry.passes))}{registry.broken_note()}"
    configs = []
    for i, entry in enumerate(recipe.passes):
        loc = ("passes", i)
        line = _line_of(node, loc)
        if not isinstance(entry, dict) or "type" not in entry:
            raise VloptError(f"recipe {path}: passes[{i}] (line {line}) must be a mapping with a `type` key; {known}")
        kind = entry["type"]
        if not isinstance(kind, str):
            raise VloptError(f"recipe {path}: passes[{i}] (line {line}): `type` must be a pass name (a string), "
                             f"got {_show(kind)}; {known}")
        if kind not in registry.passes:
            raise VloptError(f"recipe {path}: passes[{i}] (line {line}): unknown pass type {_show(kind)}; {known}")
        cls = registry.passes[kind].config
        try:
            configs.append(cls.model_validate(entry, strict=True))
        except ValidationError as err:
            allowed[loc] = list(cls.model_fields)
            raise VloptError(f"recipe {path}: {_explain(err, node, prefix=loc, allowed=allowed)}") from None
    _check_conflicts(path, configs, registry)
    return recipe, configs


def _check_references(path: Path, recipe: Recipe, node, registry) -> None:
    """The names and files a recipe refers to exist: model family and preset (or checkpoint folder),
    workload (and it is that model's), input. Relative paths are relative to the recipe's folder,
    as the run reads them."""
    def fail(loc: tuple, message: str):
        raise VloptError(f"recipe {path}: '{'.'.join(loc)}' (line {_line_of(node, loc)}): {message}")

    spec, base = recipe.model, path.parent
    families = registry.models
    family = None
    if spec.name is not None:
        family = families.get(spec.name)
        if family is None:
            fail(("model", "name"), f"unknown model {_show(spec.name)}; choose one of {', '.join(sorted(families))} "
                                    f"or give model.path{registry.broken_note()}")
        if spec.preset not in family.presets:
            fail(("model", "preset"), f"unknown preset {_show(spec.preset)} for {spec.name}; "
                                      f"choose one of {', '.join(family.presets)}")
    else:
        folder = base / spec.path
        config_file = folder / "config.json"
        if not config_file.is_file():
            fail(("model", "path"), f"{folder} is not a checkpoint folder (no config.json); give a folder "
                                    "written by `vlopt apply` or save_pretrained, or a release layout")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            fail(("model", "path"), f"{config_file} is not readable JSON: {_show(str(err), quote=False)}")
        matches = [f for f in families.values() if isinstance(config, dict) and f.recognizes(config)]
        if not matches:
            model_type = config.get("model_type") if isinstance(config, dict) else None
            fail(("model", "path"), f"{config_file}: model_type {_show(model_type)} is none of the known "
                                    f"models ({', '.join(sorted(families))})")
        family = matches[0]
    workload = recipe.benchmark.workload
    if workload is not None:
        workloads = registry.workloads
        if workload not in workloads:
            fail(("benchmark", "workload"), f"unknown workload {_show(workload)}; choose one of "
                                            f"{', '.join(sorted(workloads))}")
        if workloads[workload].model != family.name:
            mine = [w.name for w in family.workloads]
            fail(("benchmark", "workload"), f"workload '{workload}' is for {workloads[workload].model}, not "
                                            f"{family.name}" + (f"; choose one of {', '.join(mine)}" if mine else ""))
    if recipe.benchmark.input is not None and not (base / recipe.benchmark.input).exists():
        fail(("benchmark", "input"), f"{base / recipe.benchmark.input} does not exist; give an event file, "
                                     "a frames folder, a video or an image")


def _check_conflicts(path: Path, configs: list, registry) -> None:
    """A pass type that may appear once (ClassVar `once = True`) appearing twice is an error."""
    seen: dict[str, int] = {}
    for i, cfg in enumerate(configs):
        if getattr(type(cfg), "once", False) and cfg.type in seen:
            raise VloptError(f"recipe {path}: passes[{i}] repeats '{cfg.type}' (first at passes[{seen[cfg.type]}]);"
                             " it may appear once")
        seen.setdefault(cfg.type, i)


def resolved_recipe(recipe: Recipe, configs: list, registry) -> dict:
    """The recipe with every default filled in and each pass's plugin and version recorded."""
    out = recipe.model_dump()
    out["passes"] = []
    for cfg in configs:
        entry = registry.passes[cfg.type]
        out["passes"].append({**cfg.model_dump(), "_plugin": entry.plugin, "_plugin_version": entry.plugin_version,
                              "_pass_version": type(cfg).version})
    return out

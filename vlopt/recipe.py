"""Recipes: YAML read with a safe loader, validated strictly; every error names the key and its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlopt.errors import VloptError

MAX_NEW_TOKENS = 4096     # the token budget's cap, here and in `vlopt bench --new-tokens`


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None           # eventgpt | videollava (or a plugin's model)
    preset: Literal["tiny", "7b"] = "tiny"
    path: str | None = None           # a local checkpoint folder instead of name + preset
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _name_or_path(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of model.name (with model.preset) or model.path")
        return self


class BenchmarkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workload: str | None = None       # default: the model's own
    samples: int = Field(3, ge=1, le=1000)
    warmup: int = Field(1, ge=0, le=100)
    new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    natural: bool = False             # stop at EOS instead of a fixed token budget
    input: str | None = None          # event file / frames folder; default: the synthetic demo input
    fidelity_tokens: int | None = Field(None, ge=2, le=MAX_NEW_TOKENS)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    benchmark: BenchmarkSpec = BenchmarkSpec()
    passes: list[Any] = []            # validated against the registered pass configs
    output: str | None = None


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
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise VloptError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise VloptError(f"recipe {path} is empty; it needs at least `model:`")
    if not isinstance(data, dict):
        raise VloptError(f"recipe {path} must be a mapping with keys model, benchmark, passes, output; "
                         f"got a {type(data).__name__}")
    return data, node


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at `loc` (keys and list indices), or of its nearest parent."""
    import yaml

    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
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
    for e in err.errors():
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Escape control characters so a key like "\n" cannot break the one-line message.
        key = ".".join(str(p) for p in loc).encode("unicode_escape").decode("ascii") or "(top level)"
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
            lines.append(f"'{key}'{where}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and
                                                          not isinstance(e["input"], dict) else ""))
    return "; ".join(lines)


def load_recipe(path: str | Path, registry=None) -> tuple[Recipe, list]:
    """Read and validate a recipe. Returns the recipe and the list of validated pass configs."""
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
    configs = []
    for i, entry in enumerate(recipe.passes):
        loc = ("passes", i)
        line = _line_of(node, loc)
        if not isinstance(entry, dict) or "type" not in entry:
            raise VloptError(f"recipe {path}: passes[{i}] (line {line}) must be a mapping with a `type` key; "
                             f"known types: {', '.join(sorted(registry.passes))}")
        if entry["type"] not in registry.passes:
            raise VloptError(f"recipe {path}: passes[{i}] (line {line}): unknown pass type {entry['type']!r}; "
                             f"known types: {', '.join(sorted(registry.passes))}{registry.broken_note()}")
        cls = registry.passes[entry["type"]].config
        try:
            configs.append(cls.model_validate(entry))
        except ValidationError as err:
            allowed[loc] = list(cls.model_fields)
            raise VloptError(f"recipe {path}: {_explain(err, node, prefix=loc, allowed=allowed)}") from None
    _check_conflicts(path, configs, registry)
    return recipe, configs


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

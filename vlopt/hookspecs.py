"""The plugin contract (pluggy project `vlopt`, entry-point group `vlopt`).

A plugin is a module or object with functions decorated by `vlopt.hookimpl` and named exactly like
the hooks below; a misspelled name is an error at load time. Hooks are called with keyword
arguments only. The built-in passes and models are registered through these same hooks.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("vlopt")
hookimpl = pluggy.HookimplMarker("vlopt")


@hookspec
def register_passes(register: Callable) -> None:
    """Called once when vlopt loads its plugins. Call `register(ConfigClass, apply)` once per pass.

    `ConfigClass` subclasses `vlopt.PassConfig` (pydantic, extra keys forbidden) with a field
    `type: Literal["name"] = "name"` — the recipe key — and ClassVars `version`, `persistence`
    (vlopt.passes WEIGHTS | RUNTIME | REAPPLIED), `lossless` and `deterministic`. `apply(model,
    config, ctx) -> PassOutcome` changes the `vlopt.VLModel` in place, through its modules and the
    contract of `vlopt.stage4` (`model.decoding`). The host rejects a duplicate pass type, naming
    both plugins. Import torch inside `apply`, not at the module's top: registering is declaring.
    """


@hookspec
def register_models(register: Callable) -> None:
    """Called once when vlopt loads its plugins. Call `register(family)` with a
    `vlopt.models.ModelFamily`, a declaration: its name (the recipe's `model.name`), the module that
    builds and loads it (imported when a model is built), the `config.json` model_types of its
    checkpoints and its workloads. The host rejects a duplicate family or workload name."""

"""Loading plugins from the `vlopt` entry-point group and collecting what they register.

Every entry point names a module (or object) with hook implementations. vlopt's own entry points
(one per built-in pass and model family) together form the plugin `builtin`; any other entry point
is a plugin of its own, by its entry-point name. `VLOPT_LOAD_PLUGINS=a,b` loads only the named
third-party plugins; empty loads the built-ins only. A plugin that fails to import or raises in a
hook is recorded by name and the others still load. Nothing here imports torch: registering is
declaring (configs, family declarations); what runs is imported when it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from vlopt import hookspecs
from vlopt.errors import VloptError

BUILTIN = "builtin"
OWN_DISTRIBUTION = "vlopt"


@dataclass
class PassEntry:
    type: str
    config: type           # the PassConfig subclass
    apply: Callable
    plugin: str
    plugin_version: str | None


@dataclass
class PluginInfo:
    name: str
    version: str | None
    hooks: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registry:
    passes: dict[str, PassEntry]
    models: dict[str, Any]          # family name → vlopt.models.ModelFamily
    plugins: list[PluginInfo]
    workloads: dict[str, Any] = field(default_factory=dict)   # workload name → vlopt.models.Workload

    def pass_entry(self, type_name: str) -> PassEntry:
        if type_name not in self.passes:
            raise VloptError(f"unknown pass type '{type_name}'; known: {sorted(self.passes)}{self.broken_note()}")
        return self.passes[type_name]

    def apply(self, vlm, raw: dict, ctx=None):
        """Validate a pass config given as a dict (a recipe entry) and apply it to `vlm`."""
        from pydantic import ValidationError

        from vlopt.passes import PassContext

        entry = self.pass_entry(raw["type"])
        ctx = ctx or PassContext(device=str(vlm.device))
        try:
            cfg = entry.config.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or raw['type']}: {e['msg']}" for e in err.errors())
            raise VloptError(f"pass {raw['type']}: {problems}") from None
        return entry.apply(vlm, cfg, ctx)

    def broken_note(self) -> str:
        broken = [f"{p.name} ({p.error})" for p in self.plugins if p.error]
        return f"; plugins that failed to load: {'; '.join(broken)}" if broken else ""


def _allowed() -> set[str] | None:
    raw = os.environ.get("VLOPT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group="vlopt"), key=lambda ep: (not _is_builtin(ep), ep.name))


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name == OWN_DISTRIBUTION


def _load(eps) -> tuple[list[tuple[str, str | None, list]], list[PluginInfo]]:
    """Import the entry points, grouped into plugins: (name, version, hook objects) and the
    PluginInfo of those that failed to import."""
    allowed = _allowed()
    groups: dict[str, tuple[str | None, list]] = {}
    failed: dict[str, PluginInfo] = {}
    for ep in eps:
        name = BUILTIN if _is_builtin(ep) else ep.name
        if name != BUILTIN and allowed is not None and name not in allowed:
            continue
        version = ep.dist.version if ep.dist else None
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not take the others down
            failed[name] = PluginInfo(name, version, error=f"import failed ({ep.value}): {type(err).__name__}: {err}")
            continue
        groups.setdefault(name, (version, []))[1].append(obj)
    return [(name, version, objs) for name, (version, objs) in groups.items()], list(failed.values())


def build_registry(extra: list[tuple[str, Any]] = ()) -> Registry:
    """Load the entry points (plus `extra` (name, plugin object) pairs) and collect registrations."""
    from vlopt.passes import PERSISTENCE, PassConfig

    eps = _entry_points()
    if not any(_is_builtin(ep) for ep in eps):
        raise VloptError("the built-in passes are not registered: vlopt is not installed; "
                         "run `pip install -e .` in the vlopt folder")
    loaded, infos = _load(eps)
    loaded.extend((name, None, [obj]) for name, obj in extra)

    passes: dict[str, PassEntry] = {}
    models: dict[str, Any] = {}
    workloads: dict[str, Any] = {}
    for name, version, objs in loaded:
        pm = pluggy.PluginManager("vlopt")
        pm.add_hookspecs(hookspecs)
        info = PluginInfo(name, version)
        infos.append(info)
        try:
            for i, obj in enumerate(objs):
                pm.register(obj, name=f"{name}.{i}")
            pm.check_pending()
        except pluggy.PluginValidationError as err:
            # A misspelled or mis-signed hook would silently never run: refuse it.
            raise VloptError(f"plugin '{name}' has an invalid hook implementation: {err}; hooks are "
                             f"{', '.join(sorted(h for h in dir(hookspecs) if h.startswith('register_')))}. "
                             "Fix the plugin or leave it out with VLOPT_LOAD_PLUGINS") from None
        info.hooks = sorted({h.name for obj in objs for h in pm.get_hookcallers(obj) or []})

        def register_pass(config, apply, _name=name, _version=version, _info=info):
            if not (isinstance(config, type) and issubclass(config, PassConfig)):
                raise VloptError(f"plugin '{_name}' registered {config!r}, which is not a PassConfig subclass")
            type_name = config.model_fields["type"].default
            if not isinstance(type_name, str) or not type_name.isidentifier():
                raise VloptError(f"plugin '{_name}': pass config {config.__name__} needs a `type` default "
                                 "that is an identifier")
            if not callable(apply):
                raise VloptError(f"plugin '{_name}': apply for pass '{type_name}' is not callable")
            if isinstance(getattr(config, "changes_weights", None), bool) or hasattr(config, "saved_as") \
                    or config.persistence not in PERSISTENCE:
                raise VloptError(f"plugin '{_name}': pass '{type_name}' must declare `persistence` as one of "
                                 f"{', '.join(PERSISTENCE)} (vlopt.passes), not changes_weights / saved_as")
            if type_name in passes:
                raise VloptError(f"pass type '{type_name}' is registered by both plugin "
                                 f"'{passes[type_name].plugin}' and plugin '{_name}'; uninstall one or "
                                 "limit plugins with VLOPT_LOAD_PLUGINS")
            passes[type_name] = PassEntry(type_name, config, apply, _name, _version)
            _info.passes.append(type_name)

        def register_model(family, _name=name, _info=info):
            if family.name in models:
                raise VloptError(f"model '{family.name}' is registered twice (plugin '{_name}')")
            for w in family.workloads:
                if w.model != family.name:
                    raise VloptError(f"plugin '{_name}': workload '{w.name}' of family '{family.name}' names "
                                     f"model '{w.model}'")
                if w.name in workloads:
                    raise VloptError(f"workload '{w.name}' is registered twice (plugin '{_name}')")
                workloads[w.name] = w
            models[family.name] = family
            _info.models.append(family.name)

        for hook, register in (("register_passes", register_pass), ("register_models", register_model)):
            try:
                getattr(pm.hook, hook)(register=register)
            except VloptError:
                raise
            except Exception as err:
                info.error = f"{hook} raised {type(err).__name__}: {err}"
    return Registry(passes, models, infos, workloads)


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (None: rebuild on next use). Used by `vlopt.testing`."""
    global _REGISTRY
    _REGISTRY = registry

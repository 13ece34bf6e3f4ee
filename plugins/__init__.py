"""vlopt's built-in passes and models, registered through the `vlopt` entry-point group exactly as a
third-party plugin is. Each pass is one module: a config class and an `apply` function."""

from __future__ import annotations

import importlib

from vlopt.hookspecs import hookimpl

PASS_MODULES = ["dtype", "attention", "fast_decode", "int8", "int4", "layer_skip", "early_stop", "feature_cache", "prune_visual", "tensor_parallel"]


@hookimpl
def register_passes(register):
    for name in PASS_MODULES:
        module = importlib.import_module(f"vlopt_passes.{name}")
        register(module.Config, module.apply)


@hookimpl
def register_models(register):
    from vlopt.models import BUILTIN_FAMILIES

    for family in BUILTIN_FAMILIES:
        register(family)

import ast
import inspect
import re
from importlib import metadata
from pathlib import Path
from typing import Literal

import pytest

import vlopt
from vlopt import hookspecs, plugins
from vlopt.errors import VloptError
from vlopt.passes import PassConfig

DOCS = Path(__file__).parent.parent / "docs" / "plugins.md"


def test_every_hook_and_argument_is_documented():
    text = DOCS.read_text()
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    assert hooks == ["register_models", "register_passes"]
    for name in hooks:
        args = list(inspect.signature(getattr(hookspecs, name)).parameters)
        assert re.search(rf"### `{name}\({', '.join(args)}\)`", text), f"{name}({args}) missing from docs"
        assert getattr(hookspecs, name).__doc__.strip()


def test_the_docs_examples_are_valid_python():
    for block in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S):
        ast.parse(block)


class _Cfg(PassConfig):
    type: Literal["demo_pass"] = "demo_pass"


class _Good:
    @vlopt.hookimpl
    def register_passes(self, register):
        register(_Cfg, lambda vlm, cfg, ctx: None)


def _fake_eps(monkeypatch, extra):
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: real + extra)


def test_a_plugin_that_fails_to_import_is_reported_and_others_load(monkeypatch):
    _fake_eps(monkeypatch, [metadata.EntryPoint("broken", "no_such_module_xyz", "vlopt")])
    monkeypatch.setenv("VLOPT_LOAD_PLUGINS", "broken")
    reg = plugins.build_registry()
    broken = next(p for p in reg.plugins if p.name == "broken")
    assert "import failed" in broken.error and "no_such_module_xyz" in broken.error
    assert "dtype" in reg.passes
    with pytest.raises(VloptError, match="plugins that failed to load: broken"):
        reg.pass_entry("missing_pass")


def test_the_allow_list_limits_third_party_plugins(monkeypatch):
    _fake_eps(monkeypatch, [metadata.EntryPoint("broken", "no_such_module_xyz", "vlopt")])
    monkeypatch.setenv("VLOPT_LOAD_PLUGINS", "")
    assert [p.name for p in plugins.build_registry().plugins] == ["builtin"]


def test_a_hook_that_raises_is_reported_by_name():
    class Raises:
        @vlopt.hookimpl
        def register_passes(self, register):
            raise RuntimeError("boom in hook")

    reg = plugins.build_registry(extra=[("raiser", Raises()), ("good", _Good())])
    assert "boom in hook" in next(p for p in reg.plugins if p.name == "raiser").error
    assert "demo_pass" in reg.passes


def test_two_plugins_with_one_pass_type_is_an_error_naming_both():
    with pytest.raises(VloptError, match="'demo_pass' is registered by both plugin 'first' and plugin 'second'"):
        plugins.build_registry(extra=[("first", _Good()), ("second", _Good())])


def test_a_misspelled_hook_is_an_error():
    class Typo:
        @vlopt.hookimpl
        def register_pass(self, register):   # missing "es"
            pass

    with pytest.raises(VloptError, match="plugin 'typo' has an invalid hook implementation.*register_passes"):
        plugins.build_registry(extra=[("typo", Typo())])


def test_registering_something_that_is_not_a_pass_config():
    class Bad:
        @vlopt.hookimpl
        def register_passes(self, register):
            register(dict, print)

    with pytest.raises(VloptError, match="not a PassConfig subclass"):
        plugins.build_registry(extra=[("bad", Bad())])

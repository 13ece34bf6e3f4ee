"""The stage-4 holder checks compatibility from declarations alone, and registering imports no torch."""

import subprocess
import sys

import pytest

from vlopt.errors import VloptError
from vlopt.stage4 import PREFIX_REUSE, TRANSFORMERS_FORWARD, Decoding, Wrapper


class _Engine:
    def __init__(self, name, *capabilities):
        self.name, self.capabilities = name, frozenset(capabilities)


class _KernelChoice(Wrapper):
    name = "kernel_choice"
    needs = TRANSFORMERS_FORWARD
    why = "the kernel choice does not carry into this engine"


class _Hooks(Wrapper):
    name = "hooks"
    needs = TRANSFORMERS_FORWARD
    refuses_other_engines = True
    why = "the hooks need transformers' forward"


def test_wrappers_are_left_out_with_a_note_or_refuse_the_engine():
    decoding = Decoding(None, _Engine("hf", TRANSFORMERS_FORWARD))
    decoding.wrap(_KernelChoice())
    assert decoding.name == "hf+kernel_choice"
    notes = decoding.install(_Engine("own_loop", PREFIX_REUSE), by="fast")
    assert notes == ["the kernel choice does not carry into this engine"] and decoding.name == "own_loop"
    with pytest.raises(VloptError, match="the hooks need transformers' forward"):
        decoding.wrap(_Hooks())
    hooked = Decoding(None, _Engine("hf", TRANSFORMERS_FORWARD))
    hooked.wrap(_Hooks())
    with pytest.raises(VloptError, match="the hooks need transformers' forward"):
        hooked.install(_Engine("own_loop"), by="fast")
    assert hooked.engine.name == "hf" and hooked.name == "hf+hooks"     # nothing changed


def test_requirements_hold_for_later_engines_and_one_engine_pass_at_a_time():
    decoding = Decoding(None, _Engine("hf", TRANSFORMERS_FORWARD))
    with pytest.raises(VloptError, match="needs prefix reuse"):
        decoding.require(PREFIX_REUSE, "needs prefix reuse")
    decoding.install(_Engine("fast", PREFIX_REUSE), by="fast_decode")
    decoding.require(PREFIX_REUSE, "needs prefix reuse")
    with pytest.raises(VloptError, match="fast_decode installed.*use one of them"):
        decoding.install(_Engine("spec"), by="layer_skip")


def test_listing_passes_imports_no_torch():
    code = ("import sys, io, contextlib\nfrom vlopt.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    code = main(['passes', '--json'])\n"
            "import json\nassert code == 0 and {'int4', 'nf4', 'llm_int8'} <= {r['type'] for r in json.loads(out.getvalue())}\n"
            "print(sorted(m for m in ('torch', 'transformers.models') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

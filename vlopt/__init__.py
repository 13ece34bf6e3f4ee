"""vlopt: make stage 4 (LLM decoding) of EventGPT and Video-LLaVA fast, and prove it."""

import os

# torchao ships CUDA-only extension files (mxfp8, cutlass) that vlopt does not use; loading them
# only prints failures on CPU machines.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from vlopt.errors import VloptError  # noqa: E402
from vlopt.hookspecs import hookimpl  # noqa: E402
from vlopt.passes import ModuleSelection, PassConfig, PassContext, PassOutcome  # noqa: E402

__version__ = "0.1.0"
__all__ = ["VloptError", "hookimpl", "PassConfig", "ModuleSelection", "PassContext", "PassOutcome",
           "load", "load_model"]


def load_model(*args, **kwargs):
    """Build a preset or load a checkpoint folder; see `vlopt.models.load_model`."""
    from vlopt.models import load_model as _load_model
    return _load_model(*args, **kwargs)


def load(path, *, device: str = "auto"):
    """Load a directory written by `vlopt apply`: weights, then runtime passes re-applied."""
    from vlopt.checkpoint import load_optimized
    return load_optimized(path, device=device)

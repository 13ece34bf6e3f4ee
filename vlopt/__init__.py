"""vlopt: make stage 4 (LLM decoding) of EventGPT and Video-LLaVA fast, and prove it."""

import os

# torchao ships CUDA-only extension files (mxfp8, cutlass) that vlopt does not use; loading them
# only prints failures on CPU machines.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")


def _drop_torchao_import_notes() -> None:
    """Importing torchao (transformers does, when building a model) logs two notes that say nothing
    about the user's work: that it skipped those files (because of the line above), and torch's
    deprecation note about how torchao registers its enums with pytree. Drop exactly these two."""
    import logging

    def not_skip_note(record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES" not in record.getMessage()

    def not_torchao_enum_note(record: logging.LogRecord) -> bool:
        return not ("is an Enum subclass" in str(record.msg) and
                    any(str(getattr(a, "__module__", "")).startswith("torchao") for a in record.args or ()))

    logging.getLogger("torchao").addFilter(not_skip_note)
    logging.getLogger("torch.utils._pytree").addFilter(not_torchao_enum_note)


_drop_torchao_import_notes()

from vlopt.errors import VloptError  # noqa: E402

# The plugin API is imported on first use, so that `import vlopt` (and so the `vlopt` script's start,
# before it can catch Ctrl-C) does not wait for pydantic and pluggy.
_LAZY = {"hookimpl": "vlopt.hookspecs", "PassConfig": "vlopt.passes", "ModuleSelection": "vlopt.passes",
         "PassContext": "vlopt.passes", "PassOutcome": "vlopt.passes"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlopt' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["VloptError", "hookimpl", "PassConfig", "ModuleSelection", "PassContext", "PassOutcome",
           "load", "load_model"]


def load_model(*args, **kwargs):
    """Build a preset or load a checkpoint folder; see `vlopt.models.load_model`."""
    from vlopt.models import load_model as _load_model
    return _load_model(*args, **kwargs)


def load(path, *, device: str = "auto"):
    """Load a directory written by `vlopt apply`: weights, then runtime passes re-applied."""
    from vlopt.manager import load_optimized
    return load_optimized(path, device=device)

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
    from vlopt.manager import load_optimized
    return load_optimized(path, device=device)

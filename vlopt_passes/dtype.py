"""`dtype`: cast the decoder (stage 4: embeddings, layers, final norm, lm_head) to another dtype.
The vision side keeps its own; its features are cast at the splice."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlopt.hookspecs import hookimpl
from vlopt.passes import WEIGHTS, PassConfig, PassOutcome


class Config(PassConfig):
    type: Literal["dtype"] = "dtype"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    persistence: ClassVar[str] = WEIGHTS


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    import torch

    target = getattr(torch, cfg.dtype)
    touched = []
    for name, module in vlm.decoder_modules():
        module.to(target)
        touched.append(name)
    return PassOutcome(touched=touched, skipped=list(vlm.vision_modules),
                       notes=[f"decoder cast to {cfg.dtype}; vision side left in {str(vlm.vision_dtype)[6:]}"])


@hookimpl
def register_passes(register):
    register(Config, apply)

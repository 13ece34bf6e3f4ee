"""`lm_head_int8`: int8 weight-only quantization of the output head.

vlopt's int8/int4 passes leave `lm_head` alone by default (it is the most sensitive layer). After the
decoder is int4, the bf16 head (32000 × 4096) is ~7 % of the bytes each decode step reads; int8
halves that. A third-party plugin: it registers through the `vlopt` entry-point group like the
built-ins, and saves its result in the checkpoint through transformers' torchao serialization."""

from __future__ import annotations

from typing import ClassVar, Literal

import vlopt
from vlopt import PassConfig, PassOutcome
from vlopt.passes import REAPPLIED

__version__ = "0.1.0"


class LmHeadInt8(PassConfig):
    type: Literal["lm_head_int8"] = "lm_head_int8"
    version: ClassVar[str] = "1"
    # Re-quantized on load: transformers does not serialize it combined with another torchao config.
    persistence: ClassVar[str] = REAPPLIED
    lossless: ClassVar[bool] = False
    once: ClassVar[bool] = True


def apply(vlm, cfg: LmHeadInt8, ctx) -> PassOutcome:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(vlm.hf, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda module, fqn: fqn == "lm_head")
    return PassOutcome(touched=["lm_head"], skipped=[],
                       notes=["lm_head int8 weight-only (torchao)"])


@vlopt.hookimpl
def register_passes(register):
    register(LmHeadInt8, apply)

"""`int8`: torchao weight-only int8 for the decoder's Linear layers — the speed path, saved quantized
in the checkpoint (transformers' torchao serialization). bitsandbytes LLM.int8 is the pass
`llm_int8`."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlopt.hookspecs import hookimpl
from vlopt.passes import WEIGHTS, ModuleSelection

BITSANDBYTES = "bitsandbytes LLM.int8 is pass type `llm_int8`: write e.g. `{type: llm_int8, threshold: 6.0}`"


class Config(ModuleSelection):
    type: Literal["int8"] = "int8"
    persistence: ClassVar[str] = WEIGHTS
    once: ClassVar[bool] = True
    moved: ClassVar[dict[str, str]] = {"backend": f"int8 is torchao's weight-only int8; drop `backend`. {BITSANDBYTES}",
                                       "threshold": BITSANDBYTES}


def apply(vlm, cfg: Config, ctx):
    from torchao.quantization import Int8WeightOnlyConfig

    from vlopt_passes._quant import torchao_quantize

    return torchao_quantize(vlm, cfg, Int8WeightOnlyConfig(), serializable=True,
                            notes=["torchao int8 weight-only; vision side and lm_head untouched by default"])


@hookimpl
def register_passes(register):
    register(Config, apply)

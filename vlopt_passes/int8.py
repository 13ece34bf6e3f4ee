"""`int8`: 8-bit weights for the decoder's Linear layers.

`backend: torchao` — weight-only int8 (speed path; saved quantized in the checkpoint).
`backend: bitsandbytes` — LLM.int8 with outlier decomposition above `threshold` (memory path;
0 disables decomposition)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlopt.hookspecs import hookimpl
from vlopt.passes import ModuleSelection


class Config(ModuleSelection):
    type: Literal["int8"] = "int8"
    backend: Literal["torchao", "bitsandbytes"] = "torchao"
    threshold: float = Field(6.0, ge=0.0)         # bitsandbytes only
    changes_weights: ClassVar[bool] = True
    once: ClassVar[bool] = True

    def saved_as(self) -> str:
        return "weights" if self.backend == "torchao" else "sidecar"


def apply(vlm, cfg: Config, ctx):
    from vlopt_passes._quant import bnb_replace, torchao_quantize

    if cfg.backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        return torchao_quantize(vlm, cfg, Int8WeightOnlyConfig(), serializable=True,
                                notes=["torchao int8 weight-only; vision side and lm_head untouched by default"])

    import bitsandbytes as bnb
    import torch

    def make(linear):
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=cfg.threshold)
        q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu", torch.float16).clone(), requires_grad=False,
                                     has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return q

    return bnb_replace(vlm, cfg, make)


@hookimpl
def register_passes(register):
    register(Config, apply)

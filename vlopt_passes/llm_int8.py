"""`llm_int8`: bitsandbytes LLM.int8 for the decoder's Linear layers, with outlier decomposition
above `threshold` (0 disables it). A memory pass: slower than bf16 at batch 1. The checkpoint keeps
the unquantized weights; the pass is re-applied on load."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlopt.hookspecs import hookimpl
from vlopt.passes import REAPPLIED, ModuleSelection


class Config(ModuleSelection):
    type: Literal["llm_int8"] = "llm_int8"
    threshold: float = Field(6.0, ge=0.0)
    persistence: ClassVar[str] = REAPPLIED
    once: ClassVar[bool] = True


def apply(vlm, cfg: Config, ctx):
    from vlopt_passes._quant import bnb_replace

    def make(linear):
        import bitsandbytes as bnb
        import torch

        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=cfg.threshold)
        q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu", torch.float16).clone(), requires_grad=False,
                                     has_fp16_weights=False)
        return q

    return bnb_replace(vlm, cfg, make)


@hookimpl
def register_passes(register):
    register(Config, apply)

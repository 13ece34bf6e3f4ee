"""`nf4` and `fp4`: bitsandbytes 4-bit weights (NormalFloat4 or FP4) for the decoder's Linear
layers, optional double quantization of the scales, products in `compute_dtype`. A memory pass:
about as slow as bf16 eager at batch 1. The checkpoint keeps the unquantized weights; the pass is
re-applied on load."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlopt.hookspecs import hookimpl
from vlopt.passes import REAPPLIED, ModuleSelection


class Nf4(ModuleSelection):
    type: Literal["nf4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    persistence: ClassVar[str] = REAPPLIED
    once: ClassVar[bool] = True


class Fp4(Nf4):
    type: Literal["fp4"] = "fp4"


def apply(vlm, cfg: Nf4, ctx):
    from vlopt.errors import VloptError
    from vlopt_passes._quant import bnb_replace

    def make(linear):
        import bitsandbytes as bnb
        import torch

        if linear.in_features < 64:
            raise VloptError(f"bitsandbytes 4-bit needs in_features ≥ 64 (its block size); a layer has "
                             f"{linear.in_features}: narrow `targets`")
        compute = getattr(torch, cfg.compute_dtype)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute, quant_type=cfg.type, compress_statistics=cfg.double_quant)
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu").clone(), requires_grad=False,
                                     quant_type=cfg.type, compress_statistics=cfg.double_quant)
        return q

    return bnb_replace(vlm, cfg, make)


@hookimpl
def register_passes(register):
    register(Nf4, apply)
    register(Fp4, apply)

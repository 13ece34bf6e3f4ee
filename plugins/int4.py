"""`int4`: 4-bit weights for the decoder's Linear layers.

`backend: torchao` — weight-only int4, groups of `group_size`: on CUDA the tinygemm tile-packed
kernel (needs bfloat16 weights: apply `dtype: bfloat16` first); on CPU torchao's IntxWeightOnly int4,
which stores the 4-bit values in int8 (same numerics, no memory saving there).
`backend: bitsandbytes` — NF4 or FP4 (`quant_type`), optional double quantization, `compute_dtype`.
int4 tensors are re-quantized on load (deterministic) rather than serialized."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlopt.errors import VloptError
from vlopt.passes import ModuleSelection


class Config(ModuleSelection):
    type: Literal["int4"] = "int4"
    backend: Literal["torchao", "bitsandbytes"] = "torchao"
    group_size: Literal[32, 64, 128, 256] = 128               # torchao
    quant_type: Literal["nf4", "fp4"] = "nf4"                 # bitsandbytes
    double_quant: bool = True                                 # bitsandbytes
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"   # bitsandbytes
    changes_weights: ClassVar[bool] = True
    once: ClassVar[bool] = True

    def saved_as(self) -> str:
        return "sidecar"


def apply(vlm, cfg: Config, ctx):
    import torch

    from vlopt_passes._quant import bnb_replace, torchao_quantize

    if cfg.backend == "torchao":
        if vlm.device.type == "cuda":
            from torchao.quantization import Int4WeightOnlyConfig
            if vlm.dtype != torch.bfloat16:
                raise VloptError("int4 torchao on CUDA needs a bfloat16 decoder; put `{type: dtype, dtype: "
                                 f"bfloat16}}` before it (the decoder is {str(vlm.dtype)[6:]})")
            ao = Int4WeightOnlyConfig(group_size=cfg.group_size, int4_packing_format="tile_packed_to_4d")
            note = f"torchao int4 weight-only, tinygemm tile-packed, group {cfg.group_size}"
        else:
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup
            ao = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size))
            note = (f"torchao IntxWeightOnly int4, group {cfg.group_size} (CPU form: 4-bit values stored in int8, "
                    "so no memory saving on CPU; the CUDA form packs them)")
        return torchao_quantize(vlm, cfg, ao, serializable=False, notes=[note])

    import bitsandbytes as bnb
    compute = getattr(torch, cfg.compute_dtype)

    def make(linear):
        if linear.in_features < 64:
            raise VloptError(f"bitsandbytes 4-bit needs in_features ≥ 64 (its block size); a layer has "
                             f"{linear.in_features}: narrow `targets`")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute, quant_type=cfg.quant_type, compress_statistics=cfg.double_quant)
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu").clone(), requires_grad=False,
                                     quant_type=cfg.quant_type, compress_statistics=cfg.double_quant)
        if linear.bias is not None:
            q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return q

    return bnb_replace(vlm, cfg, make)

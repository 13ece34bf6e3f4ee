"""`int4`: 4-bit weights for the decoder's Linear layers.

`backend: torchao` — weight-only int4, groups of `group_size`: on CUDA the tinygemm tile-packed
kernel (needs bfloat16 weights: apply `dtype: bfloat16` first); on CPU torchao's IntxWeightOnly int4,
which stores the 4-bit values in int8 (same numerics, no memory saving there).
`backend: bitsandbytes` — NF4 or FP4 (`quant_type`), optional double quantization, `compute_dtype`.
int4 tensors are re-quantized on load (deterministic) rather than serialized.

tinygemm is a GEMV: at hundreds of prompt rows it makes prefill ~10× slower than bf16, and torchao
0.18 cannot dequantize its tile-packed layout. With `dense_prefill` (CUDA, the default) each layer
also keeps its 4-bit codes in plain order (+0.5 byte per weight, next to the 0.5 of the packed
copy); `prefill_weight()` rebuilds the dense weight from them, and fast_decode's prefill uses that —
the same values the kernel multiplies by."""

from __future__ import annotations

import functools

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
    dense_prefill: bool = True                                # torchao on CUDA: keep plain codes for prefill
    changes_weights: ClassVar[bool] = True
    once: ClassVar[bool] = True

    def saved_as(self) -> str:
        return "sidecar"


def apply(vlm, cfg: Config, ctx):
    import torch

    from vlopt_passes._quant import bnb_replace, torchao_quantize

    if cfg.backend == "torchao":
        originals = []      # (module, bf16 weight) whose plain codes the dense prefill keeps
        if vlm.device.type == "cuda":
            from torchao.quantization import Int4WeightOnlyConfig
            if vlm.dtype != torch.bfloat16:
                raise VloptError("int4 torchao on CUDA needs a bfloat16 decoder; put `{type: dtype, dtype: "
                                 f"bfloat16}}` before it (the decoder is {str(vlm.dtype)[6:]})")
            from vlopt_passes._quant import _linears
            ao = Int4WeightOnlyConfig(group_size=cfg.group_size, int4_packing_format="tile_packed_to_4d")
            note = f"torchao int4 weight-only, tinygemm tile-packed, group {cfg.group_size}"
            if cfg.dense_prefill:
                originals = [(module, module.weight.detach()) for _, module in _linears(vlm, cfg)[0]]
        else:
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup
            ao = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size))
            note = (f"torchao IntxWeightOnly int4, group {cfg.group_size} (CPU form: 4-bit values stored in int8, "
                    "so no memory saving on CPU; the CUDA form packs them)")
        outcome = torchao_quantize(vlm, cfg, ao, serializable=False, notes=[note])
        if originals:
            kept = sum(_keep_plain_codes(module, weight, cfg.group_size) for module, weight in originals)
            outcome.notes.append(f"dense prefill: plain 4-bit codes kept for {kept} of {len(originals)} layers "
                                 "(+0.5 byte per weight) so fast_decode's prefill multiplies dense weights")
        return outcome

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


class PlainInt4:
    """A tinygemm-quantized weight's 4-bit codes in plain row-major order, two per byte, with views
    of its scales and zeros: `()` gives the dense weight, (code − 8) · scale + zero per group."""

    def __init__(self, codes, scale, zero, group_size: int, shape: tuple[int, int] | None = None):
        self.packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(codes.dtype)    # [N, K/2] uint8
        self.scale, self.zero, self.group_size = scale, zero, group_size        # [N, K/g, 1]
        self.shape = tuple(shape or codes.shape)      # the weight's own shape (codes may be padded)

    def __call__(self):
        fn = _dequantize_compiled() if self.packed.is_cuda else _dequantize
        return fn(self.packed, self.scale, self.zero, self.group_size, *self.shape)


def _dequantize(packed, scale, zero, group_size: int, rows: int, cols: int):
    import torch

    padded_rows, half = packed.shape
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).view(padded_rows, -1, group_size)
    dense = ((codes.to(scale.dtype) - 8) * scale + zero).view(padded_rows, 2 * half)
    return dense[:rows, :cols].contiguous()


@functools.cache
def _dequantize_compiled():
    """One fused kernel per weight shape on the GPU (eager, the unpacking steps cost ~3× the
    matrix products of a prefill: bench/results/h100/int4-prefill.md)."""
    import torch
    return torch.compile(_dequantize, dynamic=False)


def _keep_plain_codes(module, original, group_size: int) -> bool:
    """Attach `prefill_weight` to a Linear whose weight torchao just tile-packed: the codes come from
    torchao's own quantizer with the tensor's own scales and zeros, so they are the packed values."""
    import torch
    from torchao.quantization.quant_primitives import _quantize_affine_tinygemm
    from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

    weight = module.weight
    if not hasattr(weight, "scale_and_zero") or tuple(weight.shape) != tuple(original.shape):
        return False
    scale, zero = unpack_tinygemm_scales_and_zeros(weight.scale_and_zero)        # views, [N', K'/g, 1] each
    rows, cols = original.shape
    padded = (scale.shape[0], scale.shape[1] * group_size)    # torchao pads K to 1024s (11008 → 11264)
    if padded[0] < rows or padded[1] < cols:
        return False
    original = torch.nn.functional.pad(original, (0, padded[1] - cols, 0, padded[0] - rows))
    codes = _quantize_affine_tinygemm(original, [1, group_size], scale.squeeze(-1), zero.squeeze(-1),
                                      torch.uint8, 0, 15)
    module.prefill_weight = PlainInt4(codes, scale, zero, group_size, shape=(rows, cols))
    return True

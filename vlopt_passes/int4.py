"""`int4`: 4-bit weights for the decoder's Linear layers.

`backend: torchao` — weight-only int4, groups of `group_size`, with one of two decode kernels:
- `kernel: tinygemm` — torchao's tile-packed kernel on CUDA (needs bfloat16 weights: apply `dtype:
  bfloat16` first); on CPU torchao's IntxWeightOnly int4, which stores the 4-bit values in int8
  (same numerics, no memory saving there);
- `kernel: triton` — vlopt's own layout and batch-1 GEMV (`_int4_gemv.py`), same quantized values as
  tinygemm's scheme. Each Linear becomes an `Int4Linear`: one-row inputs go through the Triton
  kernel (tuned per weight shape on the GPU at apply time), more rows through the dense rebuild.
  fast_decode fuses its q/k/v and gate/up codes. On CPU it computes through the dense rebuild.
`backend: bitsandbytes` — NF4 or FP4 (`quant_type`), optional double quantization, `compute_dtype`.
int4 tensors are re-quantized on load (deterministic) rather than serialized.

tinygemm is a GEMV: at hundreds of prompt rows it makes prefill ~10× slower than bf16, and torchao
0.18 cannot dequantize its tile-packed layout. With `dense_prefill` (CUDA, the default) each layer
also keeps its 4-bit codes in vlopt's layout (+0.5 byte per weight, next to the 0.5 of the packed
copy); `prefill_weight()` rebuilds the dense weight from them, and fast_decode's prefill uses that —
the same values the kernel multiplies by. `kernel: triton` needs no second copy."""

from __future__ import annotations

from typing import ClassVar, Literal

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import ModuleSelection


class Config(ModuleSelection):
    type: Literal["int4"] = "int4"
    backend: Literal["torchao", "bitsandbytes"] = "torchao"
    group_size: Literal[32, 64, 128, 256] = 128               # torchao
    quant_type: Literal["nf4", "fp4"] = "nf4"                 # bitsandbytes
    double_quant: bool = True                                 # bitsandbytes
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"   # bitsandbytes
    kernel: Literal["tinygemm", "triton"] = "tinygemm"        # torchao: the decode kernel
    dense_prefill: bool = True                                # tinygemm on CUDA: keep plain codes for prefill
    changes_weights: ClassVar[bool] = True
    once: ClassVar[bool] = True

    def saved_as(self) -> str:
        return "sidecar"


def apply(vlm, cfg: Config, ctx):
    import torch

    from vlopt_passes._quant import bnb_replace, torchao_quantize

    if cfg.backend == "bitsandbytes" and cfg.kernel != "tinygemm":
        raise VloptError(f"int4: `kernel: {cfg.kernel}` chooses the decode kernel of backend torchao; "
                         "bitsandbytes has its own — drop `kernel` or use backend torchao")
    if cfg.backend == "torchao" and cfg.kernel == "triton":
        return _apply_triton(vlm, cfg)
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


def _apply_triton(vlm, cfg: Config):
    from vlopt.passes import PassOutcome
    from vlopt_passes._int4_gemv import Int4Codes, Int4Linear, tune
    from vlopt_passes._quant import _linears

    chosen, skipped = _linears(vlm, cfg)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = vlm.hf.get_submodule(parent_name) if parent_name else vlm.hf
        setattr(parent, child, Int4Linear(Int4Codes.quantize(linear.weight, cfg.group_size), linear.bias))
    if vlm.device.type == "cuda":
        for name, _ in chosen:
            tune(vlm.hf.get_submodule(name).codes)
    where = ("Triton GEMV for one-row inputs, tuned per shape on this GPU" if vlm.device.type == "cuda"
             else "on CPU through the dense rebuild (the Triton kernel runs on CUDA)")
    return PassOutcome(touched=[n for n, _ in chosen], skipped=skipped, saved_as="sidecar", notes=[
        f"vlopt int4, group {cfg.group_size}: {where}; prefill multiplies the rebuilt dense weight",
        "the checkpoint keeps the unquantized weights; the pass is re-applied on load"])


def _keep_plain_codes(module, original, group_size: int) -> bool:
    """Attach `prefill_weight` to a Linear whose weight torchao just tile-packed: the codes come from
    torchao's own quantizer with the tensor's own scales and zeros, so they are the packed values."""
    import torch
    from torchao.quantization.quant_primitives import _quantize_affine_tinygemm
    from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

    from vlopt_passes._int4_gemv import Int4Codes

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
    module.prefill_weight = Int4Codes.from_codes(codes, scale.squeeze(-1), zero.squeeze(-1), group_size,
                                                 shape=(rows, cols))
    return True


@hookimpl
def register_passes(register):
    register(Config, apply)

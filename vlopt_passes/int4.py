"""`int4`: torchao weight-only int4 for the decoder's Linear layers, groups of `group_size`, with one
of two decode kernels:
- `kernel: tinygemm` — torchao's tile-packed kernel on CUDA (needs bfloat16 weights: apply `dtype:
  bfloat16` first); on CPU torchao's IntxWeightOnly int4, which stores the 4-bit values in int8
  (same numerics, no memory saving there);
- `kernel: triton` — vlopt's own layout and batch-1 GEMV (`_int4_gemv.py`), same quantized values as
  tinygemm's scheme. Each Linear becomes an `Int4Linear`: one-row inputs go through the Triton
  kernel (tuned per weight shape on the GPU at apply time), more rows through the dense rebuild.
  fast_decode fuses its q/k/v and gate/up codes. On CPU it computes through the dense rebuild.
int4 tensors are re-quantized on load (deterministic) rather than serialized. bitsandbytes 4-bit is
the passes `nf4` / `fp4`.

tinygemm is a GEMV: at hundreds of prompt rows it makes prefill ~10× slower than bf16, and torchao
0.18 cannot dequantize its tile-packed layout. With `dense_prefill` (CUDA, the default) each layer
also keeps its 4-bit codes in vlopt's layout (+0.5 byte per weight, next to the 0.5 of the packed
copy) and becomes a `PackedLinear` whose `prefill_weight()` rebuilds the dense weight; fast_decode's
prefill multiplies that — the same values the kernel multiplies by. `kernel: triton` needs no second
copy."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import REAPPLIED, ModuleSelection

BITSANDBYTES = "bitsandbytes 4-bit is pass type `nf4` (or `fp4`): write e.g. `{type: nf4, compute_dtype: float32}`"


class Config(ModuleSelection):
    type: Literal["int4"] = "int4"
    group_size: Literal[32, 64, 128, 256] = 128
    kernel: Literal["tinygemm", "triton"] = "tinygemm"        # the decode kernel
    dense_prefill: bool | None = None     # tinygemm on CUDA: keep plain codes for prefill (default: yes)
    persistence: ClassVar[str] = REAPPLIED
    once: ClassVar[bool] = True
    moved: ClassVar[dict[str, str]] = {
        "backend": f"int4 is torchao's; it picks its `kernel` (tinygemm or triton) within torchao. {BITSANDBYTES}",
        **{k: BITSANDBYTES for k in ("quant_type", "double_quant", "compute_dtype")}}

    def preflight(self, facts, plan) -> list[str]:
        # Every decoder Linear is quantized in groups along its input: the hidden width (q/k/v/o,
        # gate/up) and the MLP width (down). torchao asserts on a group that does not divide them.
        widths = {"hidden": facts.hidden_size, "MLP": facts.intermediate_size}
        if all(w is None or w % self.group_size == 0 for w in widths.values()):
            return []
        fits = [g for g in (32, 64, 128, 256) if all(w is None or w % g == 0 for w in widths.values())]
        shown = ", ".join(f"{k} {w}" for k, w in widths.items() if w is not None)
        return [f"int4.group_size {self.group_size} does not divide the decoder's widths ({shown}); "
                + (f"use group_size {' or '.join(map(str, fits))}" if fits else "int4 cannot quantize this model")]

    @model_validator(mode="after")
    def _dense_prefill_is_tinygemms(self):
        if self.kernel == "triton" and self.dense_prefill is not None:
            raise ValueError("dense_prefill applies to kernel tinygemm; kernel triton always prefills "
                             "through its own dense rebuild")
        return self


def apply(vlm, cfg: Config, ctx):
    import torch

    from vlopt_passes._quant import _linears, torchao_quantize

    if cfg.kernel == "triton":
        return _apply_triton(vlm, cfg)
    originals = []      # (name, bf16 weight) whose plain codes the dense prefill keeps
    if vlm.device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig
        if vlm.dtype != torch.bfloat16:
            raise VloptError("int4 on CUDA needs a bfloat16 decoder; put `{type: dtype, dtype: "
                             f"bfloat16}}` before it (the decoder is {str(vlm.dtype)[6:]})")
        ao = Int4WeightOnlyConfig(group_size=cfg.group_size, int4_packing_format="tile_packed_to_4d",
                                  set_inductor_config=False)
        note = f"torchao int4 weight-only, tinygemm tile-packed, group {cfg.group_size}"
        if cfg.dense_prefill is not False:
            originals = [(name, module.weight.detach()) for name, module in _linears(vlm, cfg)[0]]
    else:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        ao = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(cfg.group_size))
        note = (f"torchao IntxWeightOnly int4, group {cfg.group_size} (CPU form: 4-bit values stored in int8, "
                "so no memory saving on CPU; the CUDA form packs them)")
    outcome = torchao_quantize(vlm, cfg, ao, serializable=False, notes=[note])
    if originals:
        kept = sum(_keep_plain_codes(vlm, name, weight, cfg.group_size) for name, weight in originals)
        outcome.notes.append(f"dense prefill: plain 4-bit codes kept for {kept} of {len(originals)} layers "
                             "(+0.5 byte per weight) so fast_decode's prefill multiplies dense weights")
    outcome.notes.append("the checkpoint keeps the unquantized weights; the pass is re-applied on load")
    return outcome


def _apply_triton(vlm, cfg: Config):
    from vlopt.passes import PassOutcome
    from vlopt_passes._int4_gemv import Int4Codes, Int4Linear, tune
    from vlopt_passes._quant import _linears, replace_module

    chosen, skipped = _linears(vlm, cfg)
    for name, linear in chosen:
        replace_module(vlm, name, Int4Linear(Int4Codes.quantize(linear.weight, cfg.group_size), linear.bias))
    if vlm.device.type == "cuda":
        for name, _ in chosen:
            tune(vlm.hf.get_submodule(name).codes)
    where = ("Triton GEMV for one-row inputs, tuned per shape on this GPU" if vlm.device.type == "cuda"
             else "on CPU through the dense rebuild (the Triton kernel runs on CUDA)")
    return PassOutcome(touched=[n for n, _ in chosen], skipped=skipped, notes=[
        f"vlopt int4, group {cfg.group_size}: {where}; prefill multiplies the rebuilt dense weight",
        "the checkpoint keeps the unquantized weights; the pass is re-applied on load"])


def plain_codes(module, original, group_size: int):
    """vlopt-layout codes of a Linear whose weight torchao just tile-packed, or None when it is not
    (or does not fit). The codes come from torchao's own quantizer with the tensor's own scales and
    zeros, so they are the packed values."""
    import torch
    from torchao.quantization.quant_primitives import _quantize_affine_tinygemm
    from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

    from vlopt_passes._int4_gemv import Int4Codes

    weight = module.weight
    if not hasattr(weight, "scale_and_zero") or tuple(weight.shape) != tuple(original.shape):
        return None
    scale, zero = unpack_tinygemm_scales_and_zeros(weight.scale_and_zero)        # views, [N', K'/g, 1] each
    rows, cols = original.shape
    padded = (scale.shape[0], scale.shape[1] * group_size)    # torchao pads K to 1024s (11008 → 11264)
    if padded[0] < rows or padded[1] < cols:
        return None
    original = torch.nn.functional.pad(original, (0, padded[1] - cols, 0, padded[0] - rows))
    codes = _quantize_affine_tinygemm(original, [1, group_size], scale.squeeze(-1), zero.squeeze(-1),
                                      torch.uint8, 0, 15)
    return Int4Codes.from_codes(codes, scale.squeeze(-1), zero.squeeze(-1), group_size, shape=(rows, cols))


def _keep_plain_codes(vlm, name: str, original, group_size: int) -> bool:
    """Turn the tile-packed Linear `name` into a `PackedLinear` that keeps its plain codes."""
    from vlopt_passes._int4_gemv import PackedLinear
    from vlopt_passes._quant import replace_module

    module = vlm.hf.get_submodule(name)
    codes = plain_codes(module, original, group_size)
    if codes is not None:
        replace_module(vlm, name, PackedLinear(module, codes))
    return codes is not None


@hookimpl
def register_passes(register):
    register(Config, apply)

"""`int8`: torchao weight-only int8 for the decoder's Linear layers — the speed path, saved quantized
in the checkpoint (transformers' torchao serialization). Its per-row int8 tensors are declared
row-stackable (`register_row_stacker`), so fast_decode fuses q/k/v and gate/up of an int8 decoder as
it does bf16 ones. bitsandbytes LLM.int8 is the pass `llm_int8`."""

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


def stack_rows(weights: list):
    """torchao int8 weights (weight-only, one scale and zero point per output row) as one tensor of
    their rows in order, or None when they are not all of that form with the same input width."""
    import torch

    first = weights[0]
    names, attrs = first.__tensor_flatten__()
    rows = [w.shape[0] for w in weights]
    for w, n in zip(weights, rows):
        if (w.__tensor_flatten__() != (names, attrs) or w.dim() != 2 or w.act_quant_kwargs is not None
                or list(w.block_size) != [1, first.shape[1]]
                or any(getattr(w, name).shape[0] != n for name in names)):
            return None
    inner = {name: torch.cat([getattr(w, name) for w in weights]) for name in names}
    return type(first).__tensor_unflatten__(inner, attrs, torch.Size((sum(rows), first.shape[1])), None)


def apply(vlm, cfg: Config, ctx):
    from torchao.quantization import Int8WeightOnlyConfig

    from vlopt_passes._quant import torchao_quantize

    return torchao_quantize(vlm, cfg, Int8WeightOnlyConfig(set_inductor_config=False), serializable=True,
                            notes=["torchao int8 weight-only; vision side and lm_head untouched by default"])


@hookimpl
def register_passes(register):
    from vlopt.stage4 import register_row_stacker

    register(Config, apply)
    register_row_stacker("torchao.quantization.Int8Tensor", stack_rows)

"""Shared by the quantization passes: decoder Linear selection and the two libraries.

torchao is the speed path (`int8`, `int4`: weight-only kernels that torch.compile fuses);
bitsandbytes is the memory path (`llm_int8`, `nf4`, `fp4`): at batch 1 it is slower than bf16, and
the report says so.
"""

from __future__ import annotations

import torch

from vlopt.errors import VloptError
from vlopt.passes import PassOutcome, select_modules

BNB_NOTE = ("bitsandbytes is a memory pass: at batch 1 its kernels are slower than bf16 "
            "(see the stage-4 column); use int8 / int4 (torchao) for speed")


def _linears(vlm, cfg):
    chosen, skipped = select_modules(vlm, cfg, torch.nn.Linear)
    if not chosen:
        raise VloptError(f"{cfg.type}: targets {cfg.targets} select no Linear modules of {vlm.name} "
                         "(module names look like "
                         f"'{vlm.decoder_prefix}.layers.0.self_attn.q_proj')")
    return chosen, skipped


def replace_module(vlm, name: str, module) -> None:
    """Put `module` where the qualified name `name` is in `vlm.hf`."""
    parent_name, _, child = name.rpartition(".")
    setattr(vlm.hf.get_submodule(parent_name) if parent_name else vlm.hf, child, module)


def torchao_quantize(vlm, cfg, ao_config, *, serializable: bool, notes: list[str]) -> PassOutcome:
    """`quantize_` the selected Linears; `serializable`: make transformers save them quantized."""
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise VloptError(f"{cfg.type} needs torchao: pip install 'vlopt[quant]'") from None
    chosen, skipped = _linears(vlm, cfg)
    names = {n for n, _ in chosen}
    quantize_(vlm.hf, ao_config, filter_fn=lambda module, fqn: fqn in names)
    if serializable:
        # transformers serializes torchao tensors when the model carries a torchao quantization config.
        from transformers import TorchAoConfig
        from transformers.quantizers import AutoHfQuantizer

        others = [n for n, m in vlm.hf.named_modules() if isinstance(m, torch.nn.Linear) and n not in names]
        qc = TorchAoConfig(ao_config, modules_to_not_convert=others)
        vlm.hf.config.quantization_config = qc
        vlm.hf.hf_quantizer = AutoHfQuantizer.from_config(qc)
    return PassOutcome(touched=sorted(names), skipped=skipped, notes=notes)


def bnb_replace(vlm, cfg, make) -> PassOutcome:
    """Swap each selected Linear for the bitsandbytes module `make(linear)` returns (its weight set;
    the bias is copied here)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise VloptError(f"{cfg.type} needs bitsandbytes: pip install 'vlopt[quant]'") from None
    chosen, skipped = _linears(vlm, cfg)
    for name, linear in chosen:
        module = make(linear)
        if linear.bias is not None:
            module.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        replace_module(vlm, name, module.to(linear.weight.device))
    return PassOutcome(touched=[n for n, _ in chosen], skipped=skipped,
                       notes=[BNB_NOTE, "the checkpoint keeps the unquantized weights; the pass is re-applied on load"])

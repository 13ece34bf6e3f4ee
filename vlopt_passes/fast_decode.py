"""`fast_decode`: replace stage 4's `generate()` with vlopt's own decode loop (`vlopt.engine`):
static KV cache, eager prefill, compiled `decode_one_token`, replayed as a CUDA graph on GPU.
Runtime only (no weight value changes; with `fuse_projections` the q/k/v and gate/up weights become
views into one buffer per layer, saved as ordinary separate tensors); composes with int8/int4 weight
passes applied before or after it, since the step calls the model's own (possibly quantized)
modules (int8 weights are fused too, as their pass declares them row-stackable; int4's modules
stack their own kind). `vlm.decoding.generate_batch` decodes B prompts in one
pass (left-padded static cache [B, ...], one compiled step / CUDA graph per batch size; see
`FastDecodeEngine.generate_batch`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome
from vlopt.stage4 import PREFIX_REUSE


class Config(PassConfig):
    type: Literal["fast_decode"] = "fast_decode"
    compile: bool = True
    cuda_graph: bool = True                       # ignored on CPU (no graphs there)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    temperature: float = Field(0.0, ge=0.0, le=5.0)   # 0: greedy
    fuse_projections: bool = True      # [q;k;v] and [gate;up] as one product each (weights become views)
    tune: bool = True                  # Inductor coordinate-descent tuning while the step compiles
    lossless: ClassVar[bool] = True               # same math as the baseline; rounding differs
    once: ClassVar[bool] = True
    engine_capabilities: ClassVar[frozenset[str] | None] = frozenset({PREFIX_REUSE})   # FastDecodeEngine's


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    from vlopt.engine import FastDecodeEngine

    previous = vlm.decoding.name
    engine = FastDecodeEngine(compile=cfg.compile, cuda_graph=cfg.cuda_graph,
                              compile_mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                              temperature=cfg.temperature, fuse_projections=cfg.fuse_projections, tune=cfg.tune)
    left_out = vlm.decoding.install(engine, by="fast_decode")
    engine.bind(vlm)                  # fuses the projections now, on the weights as they are
    graph = cfg.cuda_graph and vlm.device.type == "cuda"
    notes = [f"stage-4 engine: {previous} → fast_decode "
             f"({'compiled' if cfg.compile else 'eager'}{', CUDA graph' if graph else ''}"
             f"{', fused q/k/v and gate/up' if engine.fused else ''})", *left_out]
    return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers", "lm_head"], skipped=list(vlm.vision_modules),
                       notes=notes)


@hookimpl
def register_passes(register):
    register(Config, apply)

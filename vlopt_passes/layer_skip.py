"""`layer_skip`: self-speculative decoding (LayerSkip, training-free form). The first `draft_layers`
layers, with the shared final norm and lm_head, draft `draft_tokens` tokens; the full model verifies
them in one forward and keeps the agreeing run. Greedy output is exactly the full model's; the
report gives the acceptance rate. Early layers of an untrained (random or ordinary) model agree with
the full model rarely, so expect a slowdown unless the checkpoint was trained with early-exit losses."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome


class Config(PassConfig):
    type: Literal["layer_skip"] = "layer_skip"
    draft_layers: int = Field(2, ge=1)
    draft_tokens: int = Field(4, ge=1, le=32)
    lossless: ClassVar[bool] = True
    once: ClassVar[bool] = True


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    from vlopt.engine import DecodeEngine, SelfSpeculativeEngine

    layers = len(vlm.text_model.layers)
    if cfg.draft_layers >= layers:
        raise VloptError(f"layer_skip.draft_layers must be below the decoder's {layers} layers, got {cfg.draft_layers}")
    if isinstance(vlm.engine, DecodeEngine):
        raise VloptError("layer_skip and fast_decode each replace the stage-4 engine; the speculative loop is "
                         "eager (its accepted length varies per step), so use one of them")
    vlm.replace_engine(SelfSpeculativeEngine(draft_layers=cfg.draft_layers, draft_tokens=cfg.draft_tokens))
    return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers[:{cfg.draft_layers}] (draft)"],
                       skipped=list(vlm.vision_modules), saved_as="sidecar",
                       notes=[f"self-speculative: {cfg.draft_layers}/{layers} layers draft {cfg.draft_tokens} tokens"])


@hookimpl
def register_passes(register):
    register(Config, apply)

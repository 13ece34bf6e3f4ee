"""`layer_skip`: self-speculative decoding (LayerSkip, training-free form). The first `draft_layers`
layers, with the shared final norm and lm_head, draft `draft_tokens` tokens; the full model verifies
them in one forward and keeps the agreeing run. Greedy output is exactly the full model's; the
report gives the acceptance rate. Early layers of an untrained (random or ordinary) model agree with
the full model rarely, so expect a slowdown unless the checkpoint was trained with early-exit losses
(vlopt's trained tiny models are). The loop is the one every speculative engine shares
(`vlopt.engine.verify_drafts`); `speculative` with `draft: self` is the same engine."""

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
    engine_capabilities: ClassVar[frozenset[str] | None] = frozenset()    # SpeculativeEngine's: its own loop

    def preflight(self, facts, plan) -> list[str]:
        if facts.num_layers is not None and self.draft_layers >= facts.num_layers:
            return [f"layer_skip.draft_layers must be below the decoder's {facts.num_layers} layers, "
                    f"got {self.draft_layers}"]
        return []


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    from vlopt.engine import LayerDraft, SpeculativeEngine

    layers = len(vlm.text_model.layers)
    if cfg.draft_layers >= layers:
        raise VloptError(f"layer_skip.draft_layers must be below the decoder's {layers} layers, got {cfg.draft_layers}")
    engine = SpeculativeEngine(LayerDraft(cfg.draft_layers), draft_tokens=cfg.draft_tokens, name="layer_skip")
    notes = vlm.decoding.install(engine, by="layer_skip")
    return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers[:{cfg.draft_layers}] (draft)"],
                       skipped=list(vlm.vision_modules),
                       notes=[f"self-speculative: {cfg.draft_layers}/{layers} layers draft {cfg.draft_tokens} tokens",
                              *notes])


@hookimpl
def register_passes(register):
    register(Config, apply)

"""`early_stop`: the seed's "stop generation when confident". In natural-length mode the answer ends
when P(end-of-sequence) reaches `eos_threshold`, and/or after `max_sentences` sentences (tokens
ending in . ! ?). Measure it with `benchmark: {natural: true}`: the report shows tokens and time
saved, and fidelity as agreement with the baseline answer up to the stop. Random-weight presets put
P(EOS) near 1/vocab, so on them only the sentence budget fires."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome


class Config(PassConfig):
    type: Literal["early_stop"] = "early_stop"
    eos_threshold: float | None = Field(0.5, gt=0.0, le=1.0)
    max_sentences: int | None = Field(None, ge=1)
    once: ClassVar[bool] = True

    @model_validator(mode="after")
    def _something_to_do(self):
        if self.eos_threshold is None and self.max_sentences is None:
            raise ValueError("set eos_threshold, max_sentences or both")
        return self


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    from vlopt.stage4 import StopRule

    vocab = vlm.tokenizer.convert_ids_to_tokens(list(range(len(vlm.tokenizer))))
    ends = tuple(i for i, t in enumerate(vocab) if t and t.replace("Ġ", "").replace("▁", "")[-1:] in ".!?")
    vlm.decoding.stop_rule = StopRule(cfg.eos_threshold, cfg.max_sentences, ends)
    return PassOutcome(touched=["stage-4 stopping"],
                       notes=[f"ends the answer at P(EOS) ≥ {cfg.eos_threshold} or after {cfg.max_sentences} "
                              "sentences (natural-length mode only; a fixed budget ignores it)"])


@hookimpl
def register_passes(register):
    register(Config, apply)

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


class SelfSpeculativeEngine:
    """LayerSkip-style self-speculative greedy decoding, built from the fast_decode phases on one
    static cache: the first `draft_layers` layers (+ final norm + lm_head) draft `draft_tokens`
    tokens one by one; the full model verifies them in one forward over [last token, drafts] and
    keeps the agreeing run plus its own next token. Draft layers write the same KV the full model
    would for accepted positions; rejected positions are masked out (their key position lies beyond
    every later query) and overwritten. The output is the full model's greedy output, EOS masked
    under a fixed budget as in every engine. Eager (no graph): the accepted length varies per step."""

    name = "layer_skip"
    capabilities = frozenset()

    def __init__(self, *, draft_layers: int, draft_tokens: int):
        self.draft_layers = draft_layers
        self.draft_tokens = draft_tokens
        self.decoder = None

    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True):
        import torch

        from vlopt.engine import decoder_for, prefill
        from vlopt.stage4 import Stage4Result, Stopwatch, answer_tokens

        L, n = inp.context_tokens, self.draft_tokens
        self.decoder = dec = decoder_for(vlm, self.decoder, L + new_tokens + n + 1)
        dec.forbid_eos(fixed)
        dev, eos = vlm.device, dec.eos_id
        embed = vlm.text_model.embed_tokens
        watch = Stopwatch(dev)
        with torch.no_grad():
            watch.start()
            token = prefill(dec, inp.embeds)
            watch.lap("prefill")
            out, pos, verifies, accepted_total = [int(token)], L, 0, 0
            while len(out) < new_tokens and (fixed or eos not in out):
                drafts, t = [], token
                for p in range(pos, pos + n):
                    t = dec.pick(dec.forward(embed(t)[None], torch.tensor([p], device=dev), causal=False,
                                             layers=self.draft_layers)[:, -1])
                    drafts.append(t)
                seq = torch.cat([token, *drafts])
                h = dec.forward(embed(seq)[None], torch.arange(pos, pos + n + 1, device=dev), causal=False)
                preds = dec.pick(h[0]).tolist()
                drafted = torch.cat(drafts).tolist()
                m = 0
                while m < n and drafted[m] == preds[m]:
                    m += 1
                out += drafted[:m] + [preds[m]]
                token = torch.tensor([preds[m]], device=dev)
                pos += m + 1
                verifies += 1
                accepted_total += m
            watch.lap("decode")
        rule = None if fixed else vlm.decoding.stop_rule
        return Stage4Result(answer_tokens(out[:new_tokens], fixed=fixed, eos=eos, rule=rule),
                            watch.seconds["prefill"], watch.seconds["decode"], info={
                                "verify_forwards": verifies, "acceptance_rate": accepted_total / max(1, verifies * n),
                                "tokens_per_verify": (len(out) - 1) / max(1, verifies),
                                "draft_layers": self.draft_layers, "draft_tokens": n})

    def score(self, vlm, inp, tokens):
        from vlopt.engine import decoder_for, teacher_forced

        self.decoder = decoder_for(vlm, self.decoder, inp.context_tokens + len(tokens))
        return teacher_forced(self.decoder, inp, tokens)


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    layers = len(vlm.text_model.layers)
    if cfg.draft_layers >= layers:
        raise VloptError(f"layer_skip.draft_layers must be below the decoder's {layers} layers, got {cfg.draft_layers}")
    notes = vlm.decoding.install(SelfSpeculativeEngine(draft_layers=cfg.draft_layers, draft_tokens=cfg.draft_tokens),
                                 by="layer_skip")
    return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers[:{cfg.draft_layers}] (draft)"],
                       skipped=list(vlm.vision_modules),
                       notes=[f"self-speculative: {cfg.draft_layers}/{layers} layers draft {cfg.draft_tokens} tokens",
                              *notes])


@hookimpl
def register_passes(register):
    register(Config, apply)

"""Stage 4: decoding from `Stage4Input`. The baseline engine is plain transformers `generate()`.

An engine has two methods: `generate` (time and produce tokens) and `score` (teacher-forced logits of
given tokens, for fidelity). Engine passes (fast_decode, layer_skip, early_stop) replace
`VLModel.engine` with their own object of the same shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StopRule:
    """End the answer early: force EOS once P(EOS) ≥ `eos_threshold`, and/or after `max_sentences`
    sentence-ending tokens. Honoured by every engine in natural-length mode."""

    eos_threshold: float | None = None
    max_sentences: int | None = None
    sentence_end_ids: tuple[int, ...] = ()

    def sentences_done(self, tokens: list[int]) -> int | None:
        """Index after which the sentence budget is spent, or None."""
        if not self.max_sentences:
            return None
        seen = 0
        for i, t in enumerate(tokens):
            if t in self.sentence_end_ids:
                seen += 1
                if seen >= self.max_sentences:
                    return i
        return None


class _StopRuleProcessor:
    """transformers logits processor applying a `StopRule` (generate calls it once per step)."""

    def __init__(self, rule: StopRule, eos: int, prompt_len: int):
        self.rule, self.eos, self.prompt_len = rule, eos, prompt_len

    def __call__(self, input_ids, scores):
        force = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        if self.rule.eos_threshold is not None:
            force |= torch.softmax(scores.float(), -1)[:, self.eos] >= self.rule.eos_threshold
        done = self.rule.sentences_done(input_ids[0, self.prompt_len:].tolist())
        if done is not None:
            force[:] = True
        if force.any():
            scores = scores.clone()
            scores[force] = float("-inf")
            scores[force, self.eos] = 0.0
        return scores


@dataclass
class Stage4Result:
    tokens: list[int]          # the new tokens only
    prefill_s: float           # prompt forward → first token
    decode_s: float            # every later token
    info: dict = field(default_factory=dict)   # engine-specific (acceptance rate, kernel, …)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


class _StepClock:
    """A `generate(streamer=...)` object that timestamps each emitted token after a device sync.
    transformers calls `put` once with the (empty, for inputs_embeds) prompt, then once per token."""

    def __init__(self, device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value):
        if value.numel():
            sync(self.device)
            self.stamps.append(time.perf_counter())

    def end(self):
        pass


class HFGenerate:
    """transformers `generate()`, greedy, dynamic cache: the plain baseline every pass is compared to."""

    name = "hf_generate"

    def __init__(self, **generate_kwargs):
        self.generate_kwargs = generate_kwargs   # e.g. cache_implementation="static" for the peer

    @torch.no_grad()
    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        clock = _StepClock(vlm.device)
        extra = dict(self.generate_kwargs)
        if vlm.stop_rule is not None and not fixed:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([_StopRuleProcessor(vlm.stop_rule, vlm.eos_token_id, 0)])
        sync(vlm.device)
        start = time.perf_counter()
        out = vlm.hf.generate(
            inputs_embeds=inp.embeds, attention_mask=inp.attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if fixed else 0, do_sample=False, num_beams=1,
            pad_token_id=vlm.tokenizer.pad_token_id, eos_token_id=vlm.eos_token_id,
            streamer=clock, **extra)
        sync(vlm.device)
        end = time.perf_counter()
        first = clock.stamps[0] if clock.stamps else end
        return Stage4Result(out[0].tolist(), first - start, end - first)

    @torch.no_grad()
    def score(self, vlm, inp, tokens: list[int]) -> torch.Tensor:
        return teacher_forced_logits(vlm, inp, tokens)


@torch.no_grad()
def teacher_forced_logits(vlm, inp, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] (float32, CPU) predicting each of `tokens` given the prompt and the
    tokens before it — one forward through `vlm.hf`, so module-level passes are included."""
    ids = torch.tensor([tokens[:-1]], device=vlm.device, dtype=torch.long)
    embeds = torch.cat([inp.embeds, vlm.embed(ids).to(inp.embeds.dtype)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=vlm.device)
    out = vlm.hf(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    # The last len(tokens) positions: prompt end onwards (counted from the end, since a pass may
    # drop prompt rows inside the decoder — prune_visual fastv).
    return out.logits[0, -len(tokens):].float().cpu()

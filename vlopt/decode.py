"""The baseline engine: plain transformers `generate()`, greedy, dynamic cache — what every pass
is compared to — and teacher-forced scoring through the model's own forward."""

from __future__ import annotations

import torch

from vlopt.stage4 import TRANSFORMERS_FORWARD, StopRule, Stage4Result, Stopwatch


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


class _FirstToken:
    """A `generate(streamer=...)` object that ends the stopwatch's prefill lap at the first new token.
    transformers calls `put` once with the (empty, for inputs_embeds) prompt, then once per token."""

    def __init__(self, watch: Stopwatch):
        self.watch, self.seen = watch, False

    def put(self, value):
        if value.numel() and not self.seen:
            self.seen = True
            self.watch.lap("prefill")

    def end(self):
        pass


class HFGenerate:
    """transformers `generate()`, greedy, dynamic cache: the plain baseline every pass is compared to."""

    name = "hf_generate"
    capabilities = frozenset({TRANSFORMERS_FORWARD})

    def __init__(self, **generate_kwargs):
        self.generate_kwargs = generate_kwargs   # e.g. cache_implementation="static" for the peer

    @torch.no_grad()
    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        """A fixed budget is `min_new_tokens == max_new_tokens` (EOS masked until then); natural
        length stops at EOS (kept as the last token) or where the model's stop rule says."""
        extra = dict(self.generate_kwargs)
        rule = vlm.decoding.stop_rule
        if rule is not None and not fixed:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([_StopRuleProcessor(rule, vlm.eos_token_id, 0)])
        watch = Stopwatch(vlm.device)
        first = _FirstToken(watch)
        watch.start()
        out = vlm.hf.generate(
            inputs_embeds=inp.embeds, attention_mask=inp.attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if fixed else 0, do_sample=False, num_beams=1,
            pad_token_id=vlm.tokenizer.pad_token_id, eos_token_id=vlm.eos_token_id,
            streamer=first, **extra)
        watch.lap("decode")
        return Stage4Result(out[0].tolist(), watch.seconds["prefill"], watch.seconds["decode"])

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

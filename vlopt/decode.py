"""The baseline engine: plain transformers `generate()`, greedy, dynamic cache — what every pass
is compared to — and teacher-forced scoring through the model's own forward."""

from __future__ import annotations

import torch

from vlopt.stage4 import TRANSFORMERS_FORWARD, StopRule, Stage4Result, Stopwatch, answer_tokens


class _StopRuleProcessor:
    """transformers logits processor applying a `StopRule` (generate calls it once per step)."""

    def __init__(self, rule: StopRule, eos: int, prompt_len: int):
        self.rule, self.eos, self.prompt_len = rule, eos, prompt_len

    def __call__(self, input_ids, scores):
        force = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        if self.rule.eos_threshold is not None:
            force |= torch.softmax(scores.float(), -1)[:, self.eos] >= self.rule.eos_threshold
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):    # each row of a batch
            if self.rule.sentences_done(ids) is not None:
                force[row] = True
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
        out, watch = self._run(vlm, inp.embeds, inp.attention_mask, new_tokens=new_tokens, fixed=fixed)
        return Stage4Result(out[0].tolist(), watch.seconds["prefill"], watch.seconds["decode"])

    @torch.no_grad()
    def generate_batch(self, vlm, inputs, *, new_tokens: int, fixed: bool = True) -> list[Stage4Result]:
        """`generate()` on B prompts at once, left-padded (pad-token embeddings, attention mask 0 there),
        as transformers batches prompts of different lengths: it derives each row's positions from
        the mask. Natural length: transformers pads a row after its EOS; the answer ends at the EOS."""
        if len(inputs) == 1:
            return [self.generate(vlm, inputs[0], new_tokens=new_tokens, fixed=fixed)]
        embeds, mask = left_padded(vlm, inputs)
        out, watch = self._run(vlm, embeds, mask, new_tokens=new_tokens, fixed=fixed)
        rows = out.tolist()
        return [Stage4Result(answer_tokens(tokens, fixed=fixed, eos=vlm.eos_token_id, rule=None),
                             watch.seconds["prefill"], watch.seconds["decode"], info={"batch": len(inputs)})
                for tokens in rows]

    def _run(self, vlm, embeds, mask, *, new_tokens: int, fixed: bool):
        """One timed `generate()` call (prefill until the first token, then decode)."""
        extra = dict(self.generate_kwargs)
        rule = vlm.decoding.stop_rule
        if rule is not None and not fixed:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([_StopRuleProcessor(rule, vlm.eos_token_id, 0)])
        watch = Stopwatch(vlm.device)
        first = _FirstToken(watch)
        watch.start()
        out = vlm.hf.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if fixed else 0, do_sample=False, num_beams=1,
            pad_token_id=vlm.tokenizer.pad_token_id, eos_token_id=vlm.eos_token_id,
            streamer=first, **extra)
        watch.lap("decode")
        return out, watch

    @torch.no_grad()
    def score(self, vlm, inp, tokens: list[int]) -> torch.Tensor:
        return teacher_forced_logits(vlm, inp, tokens)


def left_padded(vlm, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings [B, P, hidden] ending at the same column (P: the longest), with the
    pad token's embedding before the shorter ones, and the attention mask [B, P] (0 on padding)."""
    end = max(inp.context_tokens for inp in inputs)
    pad = vlm.embed(torch.tensor([vlm.tokenizer.pad_token_id], device=vlm.device))[0].to(inputs[0].embeds.dtype)
    embeds = pad.expand(len(inputs), end, pad.shape[-1]).clone()
    mask = torch.zeros(len(inputs), end, dtype=torch.long, device=vlm.device)
    for b, inp in enumerate(inputs):
        n = inp.context_tokens
        embeds[b, end - n:] = inp.embeds[0]
        mask[b, end - n:] = inp.attention_mask[0]
    return embeds, mask


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

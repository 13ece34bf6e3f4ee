"""Fidelity of a pass against the baseline, on the baseline's own greedy output.

Teacher-forced: the optimized model scores the baseline's tokens; we report top-1 agreement with
those tokens, mean KL(baseline ‖ optimized) over positions, and the first position where the
optimized model's own greedy output departs from the baseline's. Random weights give near-tied logits,
so these are tolerances to read, never exact equality across numerics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlopt.models.tokenizer import DEFAULT_QUESTION


@dataclass
class Reference:
    tokens: list[int]
    logits: torch.Tensor        # [N, vocab] float32, CPU


def _inputs(vlm, workload, input_path):
    return vlm.run_stages(input_path, workload, DEFAULT_QUESTION)


@torch.no_grad()
def reference(vlm, workload, *, input_path=None, new_tokens: int) -> Reference:
    inp = _inputs(vlm, workload, input_path)
    tokens = vlm.stage4(inp, new_tokens=new_tokens, fixed=True).tokens
    return Reference(tokens, vlm.decoding.score(inp, tokens))


@torch.no_grad()
def compare(vlm, ref: Reference, workload, *, input_path=None, fixed: bool = True) -> dict:
    inp = _inputs(vlm, workload, input_path)
    own = vlm.stage4(inp, new_tokens=len(ref.tokens), fixed=fixed).tokens
    logits = vlm.decoding.score(inp, ref.tokens)
    n = min(len(logits), len(ref.tokens))
    base = ref.logits[:n]
    vocab = min(base.shape[-1], logits.shape[-1])   # a resized head compares on the shared rows
    logp_base = torch.log_softmax(base[:, :vocab].double(), -1)
    logp_new = torch.log_softmax(logits[:n, :vocab].double(), -1)
    kl = (logp_base.exp() * (logp_base - logp_new)).sum(-1)
    target = torch.tensor(ref.tokens[:n])
    # The reference was decoded at a fixed budget, where EOS is forbidden (HF's min_new_tokens): the
    # optimized model's choice is read under the same rule. A trained model's top logit after its
    # answer is EOS, which fixed-budget decoding never picks.
    choice = logp_new.clone()
    if vlm.eos_token_id < vocab:
        choice[:, vlm.eos_token_id] = float("-inf")
    first = next((i for i, (a, b) in enumerate(zip(own, ref.tokens)) if a != b), None)
    if first is None and len(own) < len(ref.tokens) and fixed:
        first = len(own)
    return {
        "top1_agreement": float((choice.argmax(-1) == target).double().mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "first_divergence": first,
        "tokens_compared": n,
        "generated_tokens": len(own),
    }

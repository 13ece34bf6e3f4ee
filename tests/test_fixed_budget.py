"""A fixed budget is transformers' `generate(min_new_tokens=N, max_new_tokens=N)` in every engine:
EOS is masked until N tokens. Natural length stops where transformers stops, EOS kept as the last
token. Checked with EOS made the top choice at one step by editing lm_head's EOS row."""

import pytest
import torch

from vlopt.plugins import get_registry

STEP, N = 4, 16
ENGINES = {"hf_generate": [], "fast_decode": [{"type": "fast_decode", "compile": False}],
           "layer_skip": [{"type": "layer_skip", "draft_layers": 2, "draft_tokens": 3}]}


def _make_eos_top_at(vlm, inp, step: int, n: int) -> list[int]:
    """Edit the EOS row of lm_head so that, along the model's fixed-budget greedy answer, EOS is
    the top choice at `step` and far below the others everywhere else. The other rows are
    untouched, so masking EOS leaves every other choice as it was. Returns that answer."""
    answer = vlm.stage4(inp, new_tokens=n, fixed=True).tokens
    seen = []
    hook = vlm.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        ids = torch.tensor([answer[:-1]])
        embeds = torch.cat([inp.embeds, vlm.embed(ids)], dim=1)
        logits = vlm.hf(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
    hook.remove()
    L = inp.context_tokens
    hidden = seen[-1][0, L - 1: L - 1 + n].double()                    # what lm_head multiplies, per answer step
    margin = 20 * float(logits.abs().max())
    target = torch.full((n,), -margin, dtype=torch.float64)
    target[step] = margin
    row = torch.linalg.lstsq(hidden, target[:, None]).solution[:, 0]
    with torch.no_grad():
        vlm.lm_head.weight[vlm.eos_token_id] = row.to(vlm.lm_head.weight.dtype)
    return answer


@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_fixed_budget_masks_eos_and_natural_length_stops_at_it_in_every_engine(model, request):
    vlm = request.getfixturevalue(model)
    inp = vlm.run_stages(None, vlm.workload(), "What is here?")
    answer = _make_eos_top_at(vlm, inp, STEP, N)
    eos = vlm.eos_token_id
    hf_fixed = vlm.stage4(inp, new_tokens=N, fixed=True).tokens
    hf_natural = vlm.stage4(inp, new_tokens=N, fixed=False).tokens
    assert hf_fixed == answer and eos not in hf_fixed                   # min_new_tokens masked it
    assert hf_natural == answer[:STEP] + [eos]                          # it was the top choice at STEP
    for name, chain in ENGINES.items():
        from vlopt.models import load_model
        other = load_model(model, preset="tiny-random", device="cpu")
        other.lm_head.weight.data.copy_(vlm.lm_head.weight.data)
        for cfg in chain:
            get_registry().apply(other, cfg)
        assert other.decoding.engine.name == name
        assert other.stage4(inp, new_tokens=N, fixed=True).tokens == hf_fixed, name
        assert other.stage4(inp, new_tokens=N, fixed=False).tokens == hf_natural, name

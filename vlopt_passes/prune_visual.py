"""`prune_visual`: fewer visual rows in stage 4.

`method: cls_attention` — before the LLM, a fixed budget: keep the `keep` rows (a count per frame,
or a fraction) the vision tower's CLS token attends to most, per frame for video (EventGPT: among
the pooled spatial rows; its temporal rows and CLS rows are always kept). Shapes stay static, so it
composes with fast_decode. Rows keep their order; the shortened prompt is renumbered (as VisionZip
and FasterVLM do). Pruning mostly shortens prefill: at decode the KV of visual rows is a few percent
of the bytes read per step.

`method: fastv` — inside the LLM (FastV): the decoder runs layers 0..k-1 on the whole prompt; the
attention layer k-1 pays from the last prompt token to each visual row ranks them; layers k.. see
only the text rows and the `keep` best visual rows (a fraction of all visual rows, or a count), at
their original RoPE positions. Built from hooks on transformers' own layers (no fork): a forward
hook on `layers[k-1].self_attn` ranks, forward pre-hooks on `layers[k:]` slice hidden states,
cos/sin, position ids and a 4D mask. Per-layer KV lengths then differ, so it needs transformers'
dynamic cache: it wraps the `generate()` engine, and fast_decode / layer_skip (static cache, own
loop) refuse to follow it — use `cls_attention` there.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import ClassVar, Literal

from pydantic import Field

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome
from vlopt.stage4 import TRANSFORMERS_FORWARD, Wrapper, apply_rope


class Config(PassConfig):
    type: Literal["prune_visual"] = "prune_visual"
    method: Literal["cls_attention", "fastv"] = "cls_attention"
    keep: float = Field(0.25, gt=0)     # ≤ 1: a fraction of the rows; > 1: a count (cls_attention: per frame)
    after_layer: int = Field(2, ge=1)   # fastv: layers from this index on see the pruned rows
    once: ClassVar[bool] = True

    def preflight(self, facts, plan) -> list[str]:
        if self.method != "fastv":
            return []
        problems = []
        if facts.num_layers is not None and self.after_layer >= facts.num_layers:
            problems.append(f"prune_visual.after_layer must be below the decoder's {facts.num_layers} layers, "
                            f"got {self.after_layer}")
        # Any engine pass whose engine does not decode through transformers' forward refuses fastv,
        # in either order (vlopt.stage4.Decoding.install / wrap).
        others = [c.type for c in plan.configs if c is not self and c.engine_capabilities is not None
                  and TRANSFORMERS_FORWARD not in c.engine_capabilities]
        if others:
            problems.append(f"{FastV.why} (this recipe also has {', '.join(others)})")
        return problems


class KeepTopRows:
    def __init__(self, keep: float):
        self.keep = keep
        self.tag = f"cls_attention:{keep}"
        self.last = None

    def __call__(self, vlm, feats):
        import torch

        scores, groups = feats.cls_scores.to("cpu"), feats.groups.to("cpu")
        keep = torch.zeros(len(scores), dtype=torch.bool)
        keep[groups < 0] = True
        for g in groups[groups >= 0].unique():
            rows = (groups == g).nonzero().flatten()
            k = min(len(rows), math.ceil(self.keep * len(rows)) if self.keep <= 1 else int(self.keep))
            keep[rows[scores[rows].topk(k).indices]] = True
        self.last = (len(scores), int(keep.sum()))
        return feats.select(keep)


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    if cfg.method == "fastv":
        return _apply_fastv(vlm, cfg)
    vlm.need_cls_attention = True
    for prefix in vlm.vision_modules:     # attention maps need the eager attention of the vision tower
        module = vlm.hf.get_submodule(prefix)
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    keeper = KeepTopRows(cfg.keep)
    vlm.feature_filters.append(keeper)
    return PassOutcome(touched=list(vlm.vision_modules),
                       notes=[f"visual rows kept by CLS attention: {cfg.keep} per frame; vision attention set to eager "
                              "to read the attention map; rows before/after are in the stage4 columns"],
                       info={"keep": cfg.keep})


# ---- fastv -----------------------------------------------------------------------------------------
class FastV(Wrapper):
    """The hooks and the state they share, wrapped around every stage-4 call: `around(inp)` arms
    them with the call's prompt length and visual spans; outside a call the hooks do nothing. They
    act inside transformers' forward, whose dynamic KV cache lets layers hold different lengths, so
    an engine with its own loop on a static cache is refused."""

    name = "fastv"
    needs = TRANSFORMERS_FORWARD
    refuses_other_engines = True
    why = ("prune_visual method 'fastv' prunes inside transformers' own forward, whose dynamic KV "
           "cache lets layers hold different lengths; fast_decode and layer_skip run their own loop "
           "on a static cache. Use prune_visual method: cls_attention with them")

    def __init__(self, keep: float, after_layer: int, decoding):
        self.keep, self.after_layer = keep, after_layer
        self.decoding = decoding   # its `shards`: under tensor_parallel each rank holds some heads
        self.prompt_len = None     # L of the armed call
        self.spans = None
        self.kept = None           # sorted prompt positions layers ≥ k keep (set at prefill)
        self.full_len = None       # sequence length of the forward that ranked (prefill or scoring)
        self.last = None           # what the report shows

    def install(self, layers) -> None:
        layers[self.after_layer - 1].self_attn.register_forward_hook(self._rank, with_kwargs=True)
        for layer in layers[self.after_layer:]:
            layer.register_forward_pre_hook(self._slice, with_kwargs=True)

    @contextmanager
    def around(self, inp):
        self.prompt_len, self.spans = inp.context_tokens, list(inp.visual_spans)
        try:
            yield
        finally:
            self.prompt_len = self.spans = self.kept = self.full_len = None

    def _rank(self, attn, args, kwargs, output):
        """After layer k-1's attention, at prefill (the forward that holds the whole prompt):
        rank visual rows by the attention the last prompt token pays them, over all heads (summed:
        the same ranking as the mean)."""
        import torch

        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        L = self.prompt_len
        if L is None or hidden.shape[1] < L:      # not armed, or a decode step
            return None
        cos, sin = kwargs["position_embeddings"]
        head_dim = attn.head_dim
        with torch.no_grad():
            q = attn.q_proj(hidden[:, L - 1:L]).view(1, 1, -1, head_dim).transpose(1, 2)
            k = attn.k_proj(hidden[:, :L]).view(1, L, -1, head_dim).transpose(1, 2)
            q = apply_rope(q, cos[:, None, L - 1:L], sin[:, None, L - 1:L])
            k = apply_rope(k, cos[:, None, :L], sin[:, None, :L])
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scaling, dim=-1)
            scores = probs[0, :, 0].sum(0)                                 # [L], summed over heads
            if self.decoding.shards > 1:                                    # each rank ranked with its heads
                import torch.distributed as dist
                dist.all_reduce(scores)
        visual = torch.cat([torch.arange(s, e) for s, e in self.spans]).to(scores.device)
        n = len(visual)
        n_keep = min(n, math.ceil(self.keep * n) if self.keep <= 1 else int(self.keep))
        keep = torch.ones(L, dtype=torch.bool, device=scores.device)
        keep[visual] = False
        keep[visual[scores[visual].topk(n_keep).indices]] = True
        self.kept = keep.nonzero().flatten()
        self.full_len = hidden.shape[1]
        self.last = {"after_layer": self.after_layer, "visual_before": n, "visual_after": n_keep,
                     "context": L, "context_after_layer": L - n + n_keep}
        return None

    def info(self) -> dict:
        return {"fastv": self.last}

    def _slice(self, layer, args, kwargs):
        """Before each layer ≥ k: drop the pruned rows from whatever still has the full length."""
        import torch

        if self.kept is None:
            return None
        full, L = self.full_len, self.prompt_len
        rows = torch.cat([self.kept, torch.arange(L, full, device=self.kept.device)])

        def cut(t, dim):
            return t.index_select(dim, rows) if t is not None and t.shape[dim] == full else t

        if args:
            args = (cut(args[0], 1), *args[1:])
        else:
            kwargs["hidden_states"] = cut(kwargs["hidden_states"], 1)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cut(cos, 1), cut(sin, 1))
        kwargs["position_ids"] = cut(kwargs.get("position_ids"), 1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            # Keys: the kept prompt rows, then everything after the prompt (answer tokens so far).
            keys = torch.cat([self.kept, torch.arange(L, mask.shape[-1], device=mask.device)])
            kwargs["attention_mask"] = cut(mask, 2).index_select(3, keys)
        return args, kwargs


def _apply_fastv(vlm, cfg: Config) -> PassOutcome:
    layers = vlm.text_model.layers
    if cfg.after_layer >= len(layers):
        raise VloptError(f"prune_visual.after_layer must be below the decoder's {len(layers)} layers, "
                         f"got {cfg.after_layer}")
    fastv = FastV(cfg.keep, cfg.after_layer, vlm.decoding)
    vlm.decoding.wrap(fastv)         # refused here, before any hook is installed, under another engine
    fastv.install(layers)
    share = f"{cfg.keep:.0%} of" if cfg.keep <= 1 else f"{int(cfg.keep)} of"
    return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers[{cfg.after_layer}:]"],
                       notes=[f"fastv: layers {cfg.after_layer}.. keep {share} the visual rows, ranked by the "
                              f"last prompt token's attention at layer {cfg.after_layer - 1}; the stage-4 "
                              "engine_info.fastv gives rows and context before/after"],
                       info={"keep": cfg.keep, "after_layer": cfg.after_layer})


@hookimpl
def register_passes(register):
    register(Config, apply)

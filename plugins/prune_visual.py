"""`prune_visual`: fewer visual rows in stage 4.

`method: cls_attention` — before the LLM, a fixed budget: keep the `keep` rows (a count per frame,
or a fraction) the vision tower's CLS token attends to most, per frame for video (EventGPT: among
the pooled spatial rows; its temporal rows and CLS rows are always kept). Shapes stay static, so it
composes with fast_decode. Rows keep their order; the shortened prompt is renumbered (as VisionZip
and FasterVLM do). Pruning mostly shortens prefill: at decode the KV of visual rows is a few percent
of the bytes read per step. `method: fastv` (inside the LLM) is not implemented yet: it is an error.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field

from vlopt.errors import VloptError
from vlopt.passes import PassConfig, PassOutcome


class Config(PassConfig):
    type: Literal["prune_visual"] = "prune_visual"
    method: Literal["cls_attention", "fastv"] = "cls_attention"
    keep: float = Field(0.25, gt=0)     # ≤ 1: fraction of each frame's rows; > 1: rows per frame
    once: ClassVar[bool] = True


class KeepTopRows:
    def __init__(self, keep: float):
        self.keep = keep
        self.tag = f"cls_attention:{keep}"
        self.last = None

    def __call__(self, vlm, prepared, feats):
        import torch

        scores, groups = prepared["row_scores"].to("cpu"), prepared["row_groups"].to("cpu")
        keep = torch.zeros(len(scores), dtype=torch.bool)
        keep[groups < 0] = True
        for g in groups[groups >= 0].unique():
            rows = (groups == g).nonzero().flatten()
            k = min(len(rows), math.ceil(self.keep * len(rows)) if self.keep <= 1 else int(self.keep))
            keep[rows[scores[rows].topk(k).indices]] = True
        self.last = (len(scores), int(keep.sum()))
        return feats[keep.to(feats.device)]


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    if cfg.method == "fastv":
        raise VloptError("prune_visual method 'fastv' is not implemented yet; use method: cls_attention")
    vlm.need_cls_attention = True
    for prefix in vlm.vision_modules:     # attention maps need the eager attention of the vision tower
        module = vlm.hf.get_submodule(prefix)
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    keeper = KeepTopRows(cfg.keep)
    vlm.feature_filters.append(keeper)
    return PassOutcome(touched=list(vlm.vision_modules), saved_as="sidecar",
                       notes=[f"visual rows kept by CLS attention: {cfg.keep} per frame; vision attention set to eager "
                              "to read the attention map; rows before/after are in the stage4 columns"],
                       info={"keep": cfg.keep})

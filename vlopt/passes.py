"""What a pass is: a typed config and one `apply` function (the torchao `quantize_` shape)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from vlopt.errors import VloptError


# How a pass's effect survives `vlopt apply` → `vlopt.load` (the pass declares one):
WEIGHTS = "weights"        # its result is in the saved weights (dtype, torchao int8)
RUNTIME = "runtime"        # no weight changes; re-applied on load from the saved recipe (fast_decode, …)
REAPPLIED = "reapplied"    # changes weights the checkpoint cannot hold: the weights from before it are
                           # saved, and it (with every pass after it) is re-applied on load (int4, nf4, …)
PERSISTENCE = (WEIGHTS, RUNTIME, REAPPLIED)


class PassConfig(BaseModel):
    """Base of every pass config. Fields are the recipe keys; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    version: ClassVar[str] = "1"
    persistence: ClassVar[str] = RUNTIME      # WEIGHTS | RUNTIME | REAPPLIED
    lossless: ClassVar[bool] = False          # True: the outputs are the baseline's (same numerics)
    deterministic: ClassVar[bool] = True      # False: two applications may give different weights
    why_nondeterministic: ClassVar[str] = ""
    once: ClassVar[bool] = False              # True: may appear once in a recipe
    moved: ClassVar[dict[str, str]] = {}      # a key this pass no longer takes → what to write instead
    # The capabilities of the stage-4 engine this pass installs (vlopt.stage4); None: it installs none.
    # Lets another pass's preflight see, before the run, an engine it cannot work under.
    engine_capabilities: ClassVar[frozenset[str] | None] = None

    @classmethod
    def changes_weights(cls) -> bool:
        return cls.persistence != RUNTIME

    def preflight(self, facts: ModelFacts, plan) -> list[str]:
        """Problems this pass would hit that are knowable before any weights are built: the device,
        the model's widths, the launch, the other passes (`plan.configs`, in recipe order; this
        config is one of them). Each is one line saying what to change. `vlopt apply --dry-run` and
        the start of every run (before the baseline) collect them; the default finds none."""
        return []

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved_keys(cls, data):
        for key, instead in cls.moved.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"`{key}` is not a field of {cls.model_fields['type'].default}: {instead}")
        return data


class ModuleSelection(PassConfig):
    """Module selection, one syntax: `re:` prefix = regex (full match), else an exact qualified name.
    `ignore=None` means the model's default: vision towers, projector, adaptor and `lm_head`."""

    type: str
    targets: list[str] = ["re:.*"]
    ignore: list[str] | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What a pass's preflight may know about the model without its weights: the family's preset
    config (or the checkpoint's config.json) and where the run happens."""

    family: str
    preset: str | None                 # None: a checkpoint folder
    device: str                        # resolved: "cpu" | "cuda"
    world_size: int                    # processes of a torchrun launch (1 without one)
    hidden_size: int | None = None     # decoder widths (None: not known for this model)
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None


@dataclass
class PassContext:
    device: str
    workload: Any = None
    log: Any = print


@dataclass
class PassOutcome:
    """What `apply` reports: module names touched and left alone, notes for a person, and `info`
    (JSON-able facts: a kernel chosen, a rank)."""

    touched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            try:
                if re.fullmatch(p[3:], name):
                    return True
            except re.error as err:
                raise VloptError(f"bad regex {p!r} in module selection: {err}") from None
        elif p == name:
            return True
    return False


def select_modules(vlm, cfg: ModuleSelection, kind) -> tuple[list[tuple[str, Any]], list[str]]:
    """Modules of type `kind` in `vlm.hf` that `cfg.targets` names and `cfg.ignore` (or the model's
    default ignores) does not. Returns (selected (name, module) pairs, skipped names)."""
    ignore = vlm.default_ignore if cfg.ignore is None else cfg.ignore
    chosen, skipped = [], []
    for name, module in vlm.hf.named_modules():
        if not isinstance(module, kind):
            continue
        if matches(name, ignore) or any(name.startswith(i + ".") for i in ignore if not i.startswith("re:")):
            skipped.append(name)
        elif matches(name, cfg.targets):
            chosen.append((name, module))
    return chosen, skipped

"""The typed record of one pass in a run: what the manager writes, the report renders, the
testing helpers return and the bench summarizers read. Its JSON form is `to_dict()` (the pass type
under the key "pass"); `from_dict` reads it back, ignoring keys it does not know (older runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from vlopt.passes import WEIGHTS


@dataclass
class Quality:
    """How well the model answers after a pass (task accuracy, agreement with the unoptimized
    model's answers, an example). `not_measured` says why the numbers are absent, e.g. random
    weights, where answers carry no meaning."""

    task_accuracy: float | None = None
    answer_agreement: float | None = None
    example: dict | None = None            # {"question", "expected", "before", "after", "scene", "kind"}
    not_measured: str | None = None
    scenes: int | None = None              # held-out evaluation scenes (one question each)
    seed: int | None = None                # their `vlopt.scenes` seed
    per_kind: dict | None = None           # accuracy per question kind

    @classmethod
    def from_dict(cls, data: dict) -> Quality:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class PassRow:
    pass_type: str
    plugin: str
    plugin_version: str | None
    pass_version: str
    config: dict
    persistence: str                       # how the pass declares it survives save → load
    lossless: bool
    deterministic: bool
    status: str = "applied"                # applied | failed | interrupted
    error: str | None = None
    duration_s: float = 0.0
    modules_touched: list[str] = field(default_factory=list)
    modules_skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    saved_as: str = "sidecar"              # "weights": in the checkpoint; "sidecar": re-applied on load
    stage4: dict | None = None             # the benchmark's stage-4 block after this pass
    stages: dict | None = None             # per-stage spreads after this pass
    speedup_vs_baseline: float | None = None
    speedup_vs_previous: float | None = None
    fidelity: dict | None = None           # teacher-forced against the baseline (vlopt.fidelity)
    timing: dict | None = None             # interleaved against the unoptimized reference: ratio spread, within_noise
    quality: Quality | None = None

    @property
    def changes_weights(self) -> bool:
        return self.persistence != "runtime"

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def to_dict(self) -> dict:
        out = asdict(self)
        out = {"pass": out.pop("pass_type"), **out, "changes_weights": self.changes_weights}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PassRow:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["pass_type"] = data["pass"]
        values.setdefault("persistence", WEIGHTS if data.get("changes_weights") else "runtime")
        for key in ("plugin", "plugin_version", "pass_version"):
            values.setdefault(key, None)
        values.setdefault("config", {"type": data["pass"]})
        values.setdefault("lossless", False)
        values.setdefault("deterministic", True)
        if isinstance(values.get("quality"), dict):
            values["quality"] = Quality.from_dict(values["quality"])
        return cls(**values)

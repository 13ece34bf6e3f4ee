"""The gate: a same-run speedup against the minimum kept per device kind (minimums.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

MINIMUMS = yaml.safe_load((Path(__file__).parent / "minimums.yaml").read_text())


def minimum(kind: str, name: str) -> float | None:
    return (MINIMUMS.get(kind) or {}).get(name)


def check_gate(kind: str, name: str, speedup: float) -> None:
    """Fail when `speedup` is under the minimum kept for this device kind (no minimum: no gate)."""
    floor = minimum(kind, name)
    if floor is not None and speedup < floor:
        raise AssertionError(f"{name} on {kind}: speedup {speedup:.2f}x is below the gate {floor}x "
                             "(bench/minimums.yaml)")

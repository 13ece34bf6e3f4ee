"""The two measurements a gate compares, and the gate itself."""

from __future__ import annotations

import statistics
import time
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


def timed(fn, *, rounds: int, warmup: int = 1, sync=lambda: None) -> float:
    """Median seconds of `fn()` over `rounds`, after `warmup` untimed calls, device synced."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)

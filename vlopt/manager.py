"""The pass manager: bench the baseline, then for each pass apply → bench → fidelity → one row.

It knows nothing about individual passes: it looks each `type` up in the registry, calls `apply`,
and reads the config's declared properties (changes_weights, lossless, deterministic).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlopt.errors import VloptError


@dataclass
class RunResult:
    report: dict
    output: Path | None
    exit_code: int
    failures: list[str] = field(default_factory=list)


def _free_memory(device) -> None:
    gc.collect()
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _speedup(before: dict | None, after: dict | None) -> float | None:
    if not before or not after:
        return None
    return before["stage4"]["stage4_ms"] / after["stage4"]["stage4_ms"]


def plan(recipe, configs, registry) -> list[dict]:
    """What `apply` will do, pass by pass, without loading weights (for --dry-run)."""
    rows = []
    for cfg in configs:
        entry = registry.passes[cfg.type]
        cls = type(cfg)
        rows.append({"pass": cfg.type, "plugin": entry.plugin, "version": cls.version,
                     "changes_weights": cls.changes_weights, "lossless": cls.lossless,
                     "config": cfg.model_dump()})
    return rows


def run(recipe, configs, *, recipe_path: Path, output: Path | None, force: bool = False,
        device: str | None = None, continue_on_error: bool = False, progress=None) -> RunResult:
    import torch

    from vlopt import bench, checkpoint, fidelity
    from vlopt.machine import git_commit, machine_info
    from vlopt.models import get_workload, load_model
    from vlopt.passes import PassContext, PassOutcome
    from vlopt.plugins import get_registry
    from vlopt.recipe import resolved_recipe

    say = progress or (lambda msg: None)
    registry = get_registry()
    if output is not None:
        checkpoint.check_output(output, force=force)
    base_dir = recipe_path.parent
    spec = recipe.model
    path = str((base_dir / spec.path).resolve()) if spec.path else None
    input_path = str((base_dir / recipe.benchmark.input).resolve()) if recipe.benchmark.input else None

    say(f"loading {spec.name or path}")
    vlm = load_model(spec.name, preset=spec.preset, path=path, dtype=spec.dtype,
                     device=device or spec.device, allow_pickle=spec.allow_pickle)
    wl = get_workload(recipe.benchmark.workload or vlm.default_workload)
    if wl.model != vlm.name:
        raise VloptError(f"benchmark.workload '{wl.name}' is for {wl.model}, not {vlm.name}")
    b = recipe.benchmark
    new_tokens = b.new_tokens or wl.new_tokens
    bench_kw = dict(samples=b.samples, warmup=b.warmup, new_tokens=new_tokens, fixed=not b.natural,
                    input_path=input_path)
    ctx = PassContext(device=str(vlm.device), workload=wl, log=say)

    say("benchmarking the baseline")
    baseline = bench.benchmark(vlm, wl, **bench_kw)
    say("recording the baseline's greedy output for fidelity")
    ref = fidelity.reference(vlm, wl, input_path=input_path, new_tokens=b.fidelity_tokens or new_tokens)

    rows, failures, previous = [], [], baseline
    snapshot, replay = None, []
    interrupted = False
    for i, cfg in enumerate(configs):
        entry = registry.passes[cfg.type]
        cls = type(cfg)
        row = {"pass": cfg.type, "plugin": entry.plugin, "plugin_version": entry.plugin_version,
               "pass_version": cls.version, "config": cfg.model_dump(), "changes_weights": cls.changes_weights,
               "lossless": cls.lossless, "deterministic": cls.deterministic, "status": "applied"}
        # A weight pass whose result the checkpoint cannot hold is replayed on load, and so is every
        # pass after it; the checkpoint keeps the weights as they were before it.
        sidecar_weights = cls.changes_weights and getattr(cfg, "saved_as", lambda: "weights")() == "sidecar"
        if sidecar_weights and snapshot is None:
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in vlm.hf.state_dict().items()}
        say(f"pass {i + 1}/{len(configs)}: {cfg.type}")
        start = time.perf_counter()
        try:
            outcome = entry.apply(vlm, cfg, ctx) or PassOutcome()
            row["duration_s"] = time.perf_counter() - start
            row.update(modules_touched=outcome.touched, modules_skipped=outcome.skipped, notes=outcome.notes,
                       info=outcome.info, saved_as=outcome.saved_as if snapshot is None else "sidecar")
            say(f"benchmarking after {cfg.type}")
            result = bench.benchmark(vlm, wl, **bench_kw)
            row["stage4"] = result["stage4"]
            row["stages"] = result["stages"]
            row["speedup_vs_baseline"] = _speedup(baseline, result)
            row["speedup_vs_previous"] = _speedup(previous, result)
            row["fidelity"] = fidelity.compare(vlm, ref, wl, input_path=input_path, fixed=not b.natural)
            previous = result
            if not cls.changes_weights or row["saved_as"] == "sidecar":
                replay.append(i)
        except KeyboardInterrupt:
            row.update(status="interrupted", error="interrupted (Ctrl-C)", duration_s=time.perf_counter() - start)
            interrupted = True
        except (Exception, MemoryError) as err:  # a failing pass is a recorded row, not a crash
            kind = "out of memory" if isinstance(err, MemoryError) or "out of memory" in str(err).lower() else "failed"
            row.update(status="failed", error=f"{kind}: {type(err).__name__}: {err}",
                       duration_s=time.perf_counter() - start)
        rows.append(row)
        if row["status"] != "applied":
            failures.append(f"pass {i} ({cfg.type}): {row['error']}")
            _free_memory(vlm.device)
            if interrupted or not continue_on_error:
                break

    registry_versions = {p.name: p.version for p in registry.plugins}
    report = {
        "model": {"label": f"{vlm.name} ({spec.preset if spec.name else 'checkpoint'})", "name": vlm.name,
                  **{k: v for k, v in vlm.source.items() if k != "allow_pickle"}},
        "workload": wl.name,
        "benchmark": b.model_dump(),
        "baseline": baseline,
        "passes": rows,
        "machine": machine_info(),
        "commit": git_commit(),
        "plugins": registry_versions,
        "nondeterministic": [{"pass": r["pass"], "why": type(configs[k]).why_nondeterministic}
                             for k, r in enumerate(rows) if not r["deterministic"]],
        "complete": not failures,
    }
    resolved = resolved_recipe(recipe, configs, registry)
    resolved["replay"] = replay
    resolved["model"]["dtype"] = str(vlm.dtype).removeprefix("torch.")
    written = None
    if output is not None:
        say(f"writing {output}")
        written = checkpoint.write_output(output, vlm=None if failures else vlm, resolved=resolved,
                                          report=report, state_dict=snapshot, force=force)
    del vlm
    _free_memory("cuda" if torch.cuda.is_available() else "cpu")
    code = 130 if interrupted else (1 if failures else 0)
    return RunResult(report, written, code, failures)

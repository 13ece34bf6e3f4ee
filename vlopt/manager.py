"""The pass manager, as named steps:

    resolve  a recipe → a `Plan` (paths, workload settings, the resolved recipe), no weights loaded
    measure  the stage-4 benchmark of the model as it is now
    apply_pass  one pass → a typed `PassRow` (apply, measure, fidelity against the baseline)
    report   the run's record
    save     checkpoint, recipe and report (through `vlopt.checkpoint`)

`run` chains them; `load_optimized` replays a saved recipe on its weights. The manager never
branches on a pass's name: it looks each `type` up in the registry, calls `apply`, and reads the
config's declared properties (persistence, lossless, deterministic).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlopt.passes import REAPPLIED, RUNTIME, WEIGHTS
from vlopt.rows import PassRow


@dataclass
class Plan:
    """What a recipe resolves to before any weights load."""

    recipe: object                 # vlopt.recipe.Recipe
    configs: list                  # validated pass configs, in order
    registry: object               # vlopt.plugins.Registry
    output: Path | None
    force: bool
    model_path: str | None         # model.path resolved against the recipe's folder
    input_path: str | None         # benchmark.input, likewise
    resolved: dict                 # the recipe with defaults and plugin versions (saved as vlopt_recipe.yaml)

    def steps(self) -> list[dict]:
        """What `run` will do, pass by pass (for --dry-run)."""
        rows = []
        for cfg in self.configs:
            cls = type(cfg)
            rows.append({"pass": cfg.type, "plugin": self.registry.passes[cfg.type].plugin, "version": cls.version,
                         "persistence": cls.persistence, "changes_weights": cls.changes_weights(),
                         "lossless": cls.lossless, "config": cfg.model_dump()})
        return rows


@dataclass
class RunResult:
    report: dict
    output: Path | None
    exit_code: int
    failures: list[str] = field(default_factory=list)
    rows: list[PassRow] = field(default_factory=list)


def resolve(recipe, configs, *, recipe_path: Path, output: Path | None, force: bool = False, registry=None) -> Plan:
    """Resolve paths and defaults; refuse an output that exists (before minutes of benchmarking)."""
    from vlopt import checkpoint
    from vlopt.plugins import get_registry
    from vlopt.recipe import resolved_recipe

    registry = registry or get_registry()
    if output is not None:
        checkpoint.check_output(output, force=force)
    base_dir = Path(recipe_path).parent
    spec, bench = recipe.model, recipe.benchmark
    return Plan(recipe, configs, registry, output, force,
                model_path=str((base_dir / spec.path).resolve()) if spec.path else None,
                input_path=str((base_dir / bench.input).resolve()) if bench.input else None,
                resolved=resolved_recipe(recipe, configs, registry))


def measure(vlm, workload, plan: Plan) -> dict:
    """The stage-4 benchmark with the recipe's settings."""
    from vlopt import bench

    b = plan.recipe.benchmark
    return bench.benchmark(vlm, workload, samples=b.samples, warmup=b.warmup,
                           new_tokens=b.new_tokens or workload.new_tokens, fixed=not b.natural,
                           input_path=plan.input_path)


def measure_batches(vlm, workload, plan: Plan, say) -> dict:
    """The throughput-vs-batch table (`benchmark.batch`) of the model as it is now."""
    from vlopt.bench_batch import batch_table

    b = plan.recipe.benchmark
    say(f"measuring stage 4 at batch sizes {b.batch}")
    return batch_table(vlm, workload, batches=b.batch, samples=b.samples, warmup=b.warmup,
                       new_tokens=b.new_tokens or workload.new_tokens, fixed=not b.natural, input_path=plan.input_path)


def _speedup(before: dict | None, after: dict | None) -> float | None:
    if not before or not after:
        return None
    return before["stage4"]["stage4_ms"] / after["stage4"]["stage4_ms"]


def apply_pass(vlm, cfg, *, plan: Plan, ctx, workload, baseline: dict, previous: dict, reference,
               snapshot_taken: bool) -> tuple[PassRow, dict | None]:
    """Apply one pass and measure it. Returns its row and its benchmark (None when it failed).
    A failing pass is a recorded row, not a crash; Ctrl-C is recorded and re-raised by `run`."""
    from vlopt import fidelity
    from vlopt.passes import PassOutcome

    entry = plan.registry.passes[cfg.type]
    cls = type(cfg)
    row = PassRow(cfg.type, entry.plugin, entry.plugin_version, cls.version, cfg.model_dump(), cls.persistence,
                  cls.lossless, cls.deterministic,
                  saved_as="weights" if cls.persistence == WEIGHTS and not snapshot_taken else "sidecar")
    start = time.perf_counter()
    try:
        outcome = entry.apply(vlm, cfg, ctx) or PassOutcome()
        row.duration_s = time.perf_counter() - start
        row.modules_touched, row.modules_skipped = outcome.touched, outcome.skipped
        row.notes, row.info = outcome.notes, outcome.info
        ctx.log(f"benchmarking after {cfg.type}")
        result = measure(vlm, workload, plan)
        row.stage4, row.stages = result["stage4"], result["stages"]
        row.speedup_vs_baseline = _speedup(baseline, result)
        row.speedup_vs_previous = _speedup(previous, result)
        row.fidelity = fidelity.compare(vlm, reference, workload, input_path=plan.input_path,
                                        fixed=not plan.recipe.benchmark.natural)
        return row, result
    except KeyboardInterrupt:
        row.status, row.error, row.duration_s = "interrupted", "interrupted (Ctrl-C)", time.perf_counter() - start
    except (Exception, MemoryError) as err:
        kind = "out of memory" if isinstance(err, MemoryError) or "out of memory" in str(err).lower() else "failed"
        row.status, row.error = "failed", f"{kind}: {type(err).__name__}: {err}"
        row.duration_s = time.perf_counter() - start
    return row, None


def report(vlm, plan: Plan, workload, baseline: dict, rows: list[PassRow]) -> dict:
    from vlopt.machine import git_commit, machine_info

    spec = plan.recipe.model
    return {
        "model": {"label": f"{vlm.name} ({spec.preset if spec.name else 'checkpoint'})", "name": vlm.name,
                  **{k: v for k, v in vlm.source.items() if k != "allow_pickle"}},
        "workload": workload.name,
        "benchmark": plan.recipe.benchmark.model_dump(),
        "baseline": baseline,
        "passes": [r.to_dict() for r in rows],
        "machine": machine_info(),
        "commit": git_commit(),
        "plugins": {p.name: p.version for p in plan.registry.plugins},
        "nondeterministic": [{"pass": r.pass_type, "why": type(cfg).why_nondeterministic}
                             for r, cfg in zip(rows, plan.configs) if not r.deterministic],
        "complete": all(r.applied for r in rows),
    }


def replayed(configs, rows: list[PassRow]) -> list[int]:
    """Indices of the passes `vlopt.load` re-applies: runtime passes, and from the first pass whose
    weights the checkpoint cannot hold on, every applied pass (the weights from before it are saved)."""
    out, from_here = [], False
    for i, (cfg, row) in enumerate(zip(configs, rows)):
        from_here = from_here or type(cfg).persistence == REAPPLIED
        if row.applied and (from_here or type(cfg).persistence == RUNTIME):
            out.append(i)
    return out


def save(plan: Plan, vlm, report_: dict, rows: list[PassRow], snapshot: dict | None) -> Path:
    from vlopt import checkpoint

    resolved = dict(plan.resolved, replay=replayed(plan.configs, rows))
    resolved["model"] = dict(resolved["model"], dtype=str(vlm.dtype).removeprefix("torch."))
    complete = all(r.applied for r in rows)
    return checkpoint.write_output(plan.output, vlm=vlm if complete else None, resolved=resolved, report=report_,
                                   state_dict=snapshot, force=plan.force)


def _free_memory(device) -> None:
    gc.collect()
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(recipe, configs, *, recipe_path: Path, output: Path | None, force: bool = False,
        device: str | None = None, continue_on_error: bool = False, progress=None) -> RunResult:
    """Resolve, measure the baseline, apply each pass (a row each), report and save."""
    import torch

    from vlopt import fidelity
    from vlopt.models import load_model
    from vlopt.passes import PassContext

    say = progress or (lambda msg: None)
    plan = resolve(recipe, configs, recipe_path=recipe_path, output=output, force=force)
    spec, b = recipe.model, recipe.benchmark
    say(f"loading {spec.name or plan.model_path}")
    vlm = load_model(spec.name, preset=spec.preset, path=plan.model_path, dtype=spec.dtype,
                     device=device or spec.device, allow_pickle=spec.allow_pickle)
    workload = vlm.workload(b.workload)
    ctx = PassContext(device=str(vlm.device), workload=workload, log=say)

    say("benchmarking the baseline")
    baseline = measure(vlm, workload, plan)
    batches = {"baseline": measure_batches(vlm, workload, plan, say)} if b.batch else {}
    say("recording the baseline's greedy output for fidelity")
    reference = fidelity.reference(vlm, workload, input_path=plan.input_path,
                                   new_tokens=b.fidelity_tokens or b.new_tokens or workload.new_tokens)

    rows: list[PassRow] = []
    failures: list[str] = []
    previous, snapshot = baseline, None
    for i, cfg in enumerate(configs):
        if type(cfg).persistence == REAPPLIED and snapshot is None:
            # The checkpoint cannot hold this pass's weights: keep the weights from before it.
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in vlm.hf.state_dict().items()}
        say(f"pass {i + 1}/{len(configs)}: {cfg.type}")
        row, result = apply_pass(vlm, cfg, plan=plan, ctx=ctx, workload=workload, baseline=baseline,
                                 previous=previous, reference=reference, snapshot_taken=snapshot is not None)
        rows.append(row)
        if row.applied:
            previous = result
            continue
        failures.append(f"pass {i} ({cfg.type}): {row.error}")
        _free_memory(vlm.device)
        if row.status == "interrupted" or not continue_on_error:
            break

    if b.batch and any(r.applied for r in rows):
        batches["after passes"] = measure_batches(vlm, workload, plan, say)
    record = report(vlm, plan, workload, baseline, rows)
    if batches:
        record["batch"] = batches
    written = None
    if output is not None:
        say(f"writing {output}")
        written = save(plan, vlm, record, rows, snapshot)
    del vlm
    _free_memory("cuda" if torch.cuda.is_available() else "cpu")
    interrupted = any(r.status == "interrupted" for r in rows)
    code = 130 if interrupted else (1 if failures else 0)
    return RunResult(record, written, code, failures, rows)


def load_optimized(folder, *, device: str = "auto"):
    """Load a `vlopt apply` output: verified weights, then the passes its recipe replays, in order."""
    from vlopt import checkpoint
    from vlopt.models import load_model
    from vlopt.plugins import get_registry

    recipe = checkpoint.read_output(folder)
    vlm = load_model(path=str(folder), dtype="saved", device=device)
    registry = get_registry()
    for index in recipe.get("replay", []):
        registry.apply(vlm, {k: v for k, v in recipe["passes"][index].items() if not k.startswith("_")})
    return vlm

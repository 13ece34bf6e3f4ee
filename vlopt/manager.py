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
from dataclasses import asdict, dataclass, field
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
    write_error: str | None = None     # the output could not be written (the report was kept: see the message)


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


def model_facts(plan: Plan, device: str | None = None):
    """What passes may check before the run (`vlopt.passes.ModelFacts`): the family's preset config
    built on the meta device (no weights), or a checkpoint's config.json; the device and launch."""
    import json
    import os

    import torch

    from vlopt.passes import ModelFacts

    spec = plan.recipe.model
    asked = device or spec.device
    where = "cuda" if asked == "cuda" or (asked == "auto" and torch.cuda.is_available()) else "cpu"
    widths, family = {}, spec.name
    if spec.name is not None:
        import contextlib

        with contextlib.suppress(Exception):      # a family that cannot build on meta: widths unknown
            text = plan.registry.models[spec.name].build(spec.preset, dtype=torch.bfloat16, device="cpu",
                                                         meta=True).text_model.config
            widths = text.to_dict()
    else:
        config = json.loads((Path(plan.model_path) / "config.json").read_text())
        family = next((f.name for f in plan.registry.models.values() if f.recognizes(config)), None)
        widths = config.get("text_config") or config
    kv = widths.get("num_key_value_heads")
    return ModelFacts(family=family, preset=spec.preset if spec.name else None, device=where,
                      world_size=int(os.environ.get("WORLD_SIZE", "1")),
                      hidden_size=widths.get("hidden_size"), intermediate_size=widths.get("intermediate_size"),
                      num_layers=widths.get("num_hidden_layers"), num_heads=widths.get("num_attention_heads"),
                      num_kv_heads=kv)


def preflight(plan: Plan, device: str | None = None) -> list[str]:
    """Everything knowable before the run that would make it fail: a CUDA recipe on a machine without
    CUDA, then each pass config's own `preflight(facts, plan)`. Empty: nothing found."""
    import torch

    asked = device or plan.recipe.model.device
    if asked == "cuda" and not torch.cuda.is_available():
        return ["the recipe runs on device cuda, but this machine has no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or model.device: cpu"]
    facts = model_facts(plan, device)
    return [f"passes[{i}] ({cfg.type}): {problem}" for i, cfg in enumerate(plan.configs)
            for problem in cfg.preflight(facts, plan)]


def check_preflight(plan: Plan, device: str | None = None) -> None:
    """`preflight` as one VloptError (what the user changes), before any weights load."""
    from vlopt.errors import VloptError

    problems = preflight(plan, device)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise VloptError("the run would fail: " + "; ".join(problems[:5]) + more)


def measure(vlm, workload, plan: Plan) -> dict:
    """The stage-4 benchmark with the recipe's settings."""
    from vlopt import bench

    b = plan.recipe.benchmark
    return bench.benchmark(vlm, workload, samples=b.samples, warmup=b.warmup,
                           new_tokens=b.new_tokens or workload.new_tokens, fixed=not b.natural,
                           input_path=plan.input_path)


def measure_against(reference_vlm, vlm, workload, plan: Plan) -> dict:
    """The stage-4 benchmark of `vlm` timed in alternating rounds with `reference_vlm`, an
    unoptimized instance of the same model: its `vs_reference` block holds the per-round ratios'
    spread and whether it is within noise (`vlopt.bench.interleaved`)."""
    from vlopt import bench

    b = plan.recipe.benchmark
    return bench.interleaved(reference_vlm, vlm, workload, samples=b.samples, warmup=b.warmup,
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
    """Stage-4 speedup of `after` over `before`. Results timed against the reference compare through
    it (the median per-round ratio; against another such result, the quotient of the two)."""
    if not before or not after:
        return None
    if "vs_reference" in after:
        return after["vs_reference"]["median"] / (before["vs_reference"]["median"] if "vs_reference" in before else 1.0)
    return before["stage4"]["stage4_ms"] / after["stage4"]["stage4_ms"]


def apply_pass(vlm, cfg, *, plan: Plan, ctx, workload, baseline: dict, previous: dict, reference,
               snapshot_taken: bool, quality=None, reference_vlm=None) -> tuple[PassRow, dict | None]:
    """Apply one pass and measure it (interleaved with `reference_vlm` when given). Returns its row
    and its benchmark (None when it failed). A failing pass is a recorded row, not a crash; Ctrl-C
    is recorded and re-raised by `run`."""
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
        result = measure(vlm, workload, plan) if reference_vlm is None else measure_against(reference_vlm, vlm, workload, plan)
        row.stage4, row.stages, row.timing = result["stage4"], result["stages"], result.get("vs_reference")
        row.speedup_vs_baseline = _speedup(baseline, result)
        row.speedup_vs_previous = _speedup(previous, result)
        row.fidelity = fidelity.compare(vlm, reference, workload, input_path=plan.input_path,
                                        fixed=not plan.recipe.benchmark.natural)
        if quality is not None:
            ctx.log(f"answering held-out scenes after {cfg.type}")
            row.quality = quality.measure(vlm)
        return row, result
    except KeyboardInterrupt:
        row.status, row.error, row.duration_s = "interrupted", "interrupted (Ctrl-C)", time.perf_counter() - start
    except (Exception, MemoryError) as err:
        kind = "out of memory" if isinstance(err, MemoryError) or "out of memory" in str(err).lower() else "failed"
        row.status, row.error = "failed", f"{kind}: {type(err).__name__}: {err}"
        row.duration_s = time.perf_counter() - start
    row.saved_as = "not saved"          # a pass that did not apply is in neither the weights nor the replay
    return row, None


def quality_step(vlm, workload, plan: Plan, say):
    """Answer quality on the recipe's held-out scenes (`vlopt.evaluate.QualityRun`): the baseline's
    answers are computed once, then each pass's are scored against them and the expected answers."""
    from vlopt.evaluate import QualityRun

    b = plan.recipe.benchmark
    if vlm.weights_trained is not False and b.quality_scenes:
        say(f"answering {b.quality_scenes} held-out scenes (seed {b.quality_seed})")
    return QualityRun(vlm, workload, scenes_n=b.quality_scenes, seed=b.quality_seed, new_tokens=b.quality_tokens)


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


def save(plan: Plan, vlm, report_: dict, rows: list[PassRow], snapshot: dict | None,
         weights: bool | None = None) -> Path:
    """Write the output. `weights`: whether the model holds exactly the applied passes (default: every
    pass applied); if not, only the report and recipe are written."""
    from vlopt import checkpoint

    resolved = dict(plan.resolved, replay=replayed(plan.configs, rows))
    resolved["model"] = dict(resolved["model"], dtype=str(vlm.dtype).removeprefix("torch."))
    complete = all(r.applied for r in rows) if weights is None else weights
    return checkpoint.write_output(plan.output, vlm=vlm if complete else None, resolved=resolved, report=report_,
                                   state_dict=snapshot, force=plan.force)


def save_keeping_report(plan: Plan, vlm, report_: dict, rows: list[PassRow], snapshot: dict | None,
                        weights: bool) -> tuple[Path | None, str | None]:
    """`save`, but a write that fails loses nothing measured: the report goes into the output as a
    report-only folder if that can be written, else into a new temporary folder. Returns (the output
    written, None) or (None, one line saying what failed and where the report is)."""
    import os
    import tempfile

    from vlopt import report as report_files

    try:
        return save(plan, vlm, report_, rows, snapshot, weights=weights), None
    except Exception as err:  # a disk, permission or library failure at the very end of the run
        reason = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
    kept = dict(report_, weights_saved=False)
    try:
        where = save(plan, vlm, kept, rows, snapshot, weights=False)
        kept_at = f"{where} (report only, no weights)"
    except Exception:
        folder = Path(tempfile.mkdtemp(prefix=f"vlopt-report-{plan.output.name}-"))
        report_files.write(kept, folder)
        kept_at = str(folder)
    partial = plan.output.parent / f".{plan.output.name}.vlopt-tmp-{os.getpid()}"   # checkpoint.write_output's
    left = f"; remove the partial {partial}" if partial.exists() else ""
    return None, f"could not write {plan.output}: {reason}; the report is kept in {kept_at}{left}"


def _load(plan: Plan, device: str | None):
    from vlopt.models import load_model

    spec = plan.recipe.model
    return load_model(spec.name, preset=spec.preset, path=plan.model_path, dtype=spec.dtype,
                      device=device or spec.device, allow_pickle=spec.allow_pickle)


def timing_setup(vlm, plan: Plan, device: str | None, say) -> tuple[dict, object]:
    """Before the baseline: choose and record CPU threads and machine load (with a one-line
    `warning` when the machine is busy), and load the unoptimized reference instance every pass is
    timed against in alternating rounds (a second copy of the model's weights in memory)."""
    from vlopt import bench

    conditions = bench.cpu_conditions(vlm.device)
    say("loading a second, unoptimized instance to time each pass against")
    return conditions, _load(plan, device)


def rebuild(plan: Plan, device: str | None, configs, rows: list[PassRow], ctx, say):
    """A fresh model with exactly the passes that applied (`--continue-on-error`): a pass that failed
    may have changed some modules before it failed, so it is recorded, not kept."""
    say("rebuilding the model from the passes that applied")
    vlm = _load(plan, device)
    for cfg, row in zip(configs, rows):
        if row.applied:
            plan.registry.passes[cfg.type].apply(vlm, cfg, ctx)
    return vlm


def _free_memory(device) -> None:
    gc.collect()
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(recipe, configs, *, recipe_path: Path, output: Path | None, force: bool = False,
        device: str | None = None, continue_on_error: bool = False, progress=None, on_report=None) -> RunResult:
    """Resolve, preflight, measure the baseline, apply each pass (a row each, timed interleaved with
    an unoptimized instance), report (`on_report(record)` before anything is written) and save."""
    import torch

    from vlopt import fidelity
    from vlopt.models import load_model
    from vlopt.passes import PassContext

    say = progress or (lambda msg: None)
    plan = resolve(recipe, configs, recipe_path=recipe_path, output=output, force=force)
    check_preflight(plan, device)
    spec, b = recipe.model, recipe.benchmark
    say(f"loading {spec.name or plan.model_path}")
    vlm = load_model(spec.name, preset=spec.preset, path=plan.model_path, dtype=spec.dtype,
                     device=device or spec.device, allow_pickle=spec.allow_pickle)
    workload = vlm.workload(b.workload)
    ctx = PassContext(device=str(vlm.device), workload=workload, log=say)
    conditions, reference_vlm = timing_setup(vlm, plan, device, say)

    say("benchmarking the baseline")
    baseline = measure(vlm, workload, plan)
    batches = {"baseline": measure_batches(vlm, workload, plan, say)} if b.batch else {}
    say("recording the baseline's greedy output for fidelity")
    reference = fidelity.reference(vlm, workload, input_path=plan.input_path,
                                   new_tokens=b.fidelity_tokens or b.new_tokens or workload.new_tokens)
    quality = quality_step(vlm, workload, plan, say)
    baseline["quality"] = asdict(quality.baseline(vlm))

    rows: list[PassRow] = []
    failures: list[str] = []
    previous, snapshot = baseline, None
    for i, cfg in enumerate(configs):
        if type(cfg).persistence == REAPPLIED and snapshot is None:
            # The checkpoint cannot hold this pass's weights: keep the weights from before it.
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in vlm.hf.state_dict().items()}
        say(f"pass {i + 1}/{len(configs)}: {cfg.type}")
        row, result = apply_pass(vlm, cfg, plan=plan, ctx=ctx, workload=workload, baseline=baseline,
                                 previous=previous, reference=reference, snapshot_taken=snapshot is not None,
                                 quality=quality, reference_vlm=reference_vlm)
        rows.append(row)
        if row.applied:
            previous = result
            continue
        failures.append(f"pass {i} ({cfg.type}): {row.error}")
        _free_memory(vlm.device)
        if row.status == "interrupted" or not continue_on_error:
            break
        del vlm
        vlm = rebuild(plan, device, configs, rows, ctx, say)

    quality.close()
    if b.batch and any(r.applied for r in rows):
        batches["after passes"] = measure_batches(vlm, workload, plan, say)
    record = report(vlm, plan, workload, baseline, rows)
    if batches:
        record["batch"] = batches
    interrupted = any(r.status == "interrupted" for r in rows)
    # With --continue-on-error the model was rebuilt after each failure: it holds the applied passes.
    weights = all(r.applied for r in rows) or (continue_on_error and not interrupted)
    record["timing"] = conditions
    record["weights_saved"] = output is not None and weights
    if on_report is not None:
        on_report(record)
    written = write_error = None
    if output is not None:
        say(f"writing {output}")
        written, write_error = save_keeping_report(plan, vlm, record, rows, snapshot, weights=weights)
    del vlm, reference_vlm
    _free_memory("cuda" if torch.cuda.is_available() else "cpu")
    code = 130 if interrupted else (2 if write_error else (1 if failures else 0))
    return RunResult(record, written, code, failures, rows, write_error)


def build_optimized(recipe, configs, *, recipe_path: Path, device: str | None = None, progress=None):
    """The recipe's model with its passes applied in order, nothing measured (`vlopt eval --recipe`).
    Returns the model and the recipe's workload; a pass that fails is a one-line VloptError."""
    from vlopt.errors import VloptError
    from vlopt.models import load_model
    from vlopt.passes import PassContext

    say = progress or (lambda msg: None)
    plan = resolve(recipe, configs, recipe_path=recipe_path, output=None)
    spec = recipe.model
    say(f"loading {spec.name or plan.model_path}")
    vlm = load_model(spec.name, preset=spec.preset, path=plan.model_path, dtype=spec.dtype,
                     device=device or spec.device, allow_pickle=spec.allow_pickle)
    workload = vlm.workload(recipe.benchmark.workload)
    ctx = PassContext(device=str(vlm.device), workload=workload, log=say)
    for i, cfg in enumerate(configs):
        say(f"pass {i + 1}/{len(configs)}: {cfg.type}")
        try:
            plan.registry.passes[cfg.type].apply(vlm, cfg, ctx)
        except VloptError as err:
            raise VloptError(f"pass {i} ({cfg.type}): {err}") from None
    return vlm, workload


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

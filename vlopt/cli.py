"""The `vlopt` command. Heavy imports (torch, transformers) happen inside commands so that
`vlopt --help` is instant."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from vlopt.recipe import MAX_BATCH, MAX_NEW_TOKENS

# `vlopt` alone is a usage error like any other (one line, exit 2), not the help text.
app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Make stage 4 (LLM decoding) of EventGPT and Video-LLaVA fast, and prove it.")
# interrupted: a Ctrl-C arrived; reraise: the next SIGINT is our own re-raise of one a finalizer
# swallowed; finished: main() has its exit code.
STATE = {"quiet": False, "debug": False, "interrupted": False, "reraise": False, "finished": False}


def _set_flag(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> None:
    if value:
        STATE[param.name] = True


def _print_version(value: bool) -> None:
    if value:
        from vlopt import __version__
        print(f"vlopt {__version__}")
        raise typer.Exit()


# -q/--quiet and --debug are accepted before and after the subcommand (`_command` adds them to each one).
GLOBAL_OPTIONS = ("quiet", "debug")


@app.callback()
def _main(quiet: bool = typer.Option(False, "-q", "--quiet", callback=_set_flag, expose_value=False,
                                     help="Print results only, no progress."),
          debug: bool = typer.Option(False, "--debug", callback=_set_flag, expose_value=False,
                                     help="Show tracebacks for user errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, expose_value=False,
                                       is_eager=True, help="Print vlopt's version and exit.")):
    pass


def _console():
    from rich.console import Console
    return Console(stderr=True, quiet=STATE["quiet"])


def _print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*[("–" if r.get(k) is None else format(r[k], fmt)) for k, _, fmt in columns])
    Console(width=160).print(table)


@app.command()
def models(preset: str = typer.Option("tiny", help="tiny | 7b"),
           as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")):
    """Parameter count, visual tokens and context length of each model (meta device, no weights)."""
    from vlopt.models import PRESETS, describe
    from vlopt.plugins import get_registry
    from vlopt.errors import VloptError

    if preset not in PRESETS:
        raise VloptError(f"unknown preset '{preset}'; choose one of {list(PRESETS)}")
    rows = [describe(name, preset) for name in get_registry().models]
    if as_json:
        print(json.dumps([{k: r[k] for k in ("model", "params", "visual_tokens", "context_tokens")} for r in rows]))
        return
    for r in rows:
        r["params_b"] = r["params"] / 1e9
    _print_table(f"models, preset {preset}", rows, [("model", "model", ""), ("params_b", "params (B)", ".3f"),
                 ("workload", "workload", ""), ("visual_tokens", "visual tokens", "d"),
                 ("context_tokens", "context", "d")])


@app.command()
def bench(model: str = typer.Option("eventgpt", help="eventgpt | videollava | a checkpoint folder"),
          preset: str = typer.Option("tiny", help="tiny | 7b"),
          device: str = typer.Option("auto", help="cpu | cuda | auto"),
          dtype: str = typer.Option("auto", help="auto (bf16 on cuda, float32 on cpu) | bfloat16 | float16 | float32"),
          workload: Optional[str] = typer.Option(None, help="Default: the model's own (eventgpt / videollava)."),
          samples: int = typer.Option(3, min=1), warmup: int = typer.Option(1, min=0),
          new_tokens: Optional[int] = typer.Option(None, min=1, max=MAX_NEW_TOKENS,
                                                   help=f"Token budget, at most {MAX_NEW_TOKENS} as in a recipe "
                                                        "(default: the workload's)."),
          natural: bool = typer.Option(False, help="Stop at EOS instead of a fixed budget."),
          input_path: Optional[Path] = typer.Option(None, "--input", help="Event file / frames folder / image."),
          allow_pickle: bool = typer.Option(False, help="Allow the original pickled-dict event .npy (runs code)."),
          compare: bool = typer.Option(False, "--compare", help="The original comparison's three rows (EventGPT and "
                                       "LLaVA-1.5 on one event frame, Video-LLaVA on 8 frames) beside its numbers."),
          batch: Optional[str] = typer.Option(None, "--batch", help="Also time stage 4 at these batch sizes, "
                                                                    "e.g. 1,4,16,32 (throughput vs batch)."),
          scenes: Optional[int] = typer.Option(None, "--scenes", min=1, max=10_000,
                                               help="Also answer N held-out scenes: task accuracy (trained weights)."),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result JSON here.")):
    """Time stages 1–4 (stage 4 split into prefill and decode) for one model or both. A folder
    written by `vlopt apply` is loaded with its runtime passes re-applied (its saved dtype), so the
    optimized model is what gets timed; under torchrun (tensor_parallel) rank 0 alone prints and writes."""
    from vlopt.bench import benchmark, compare_table
    from vlopt.bench import cpu_conditions
    from vlopt.checkpoint import is_vlopt_output
    from vlopt.manager import load_optimized
    from vlopt.bench_batch import batch_table, parse_batch_sizes
    from vlopt.errors import VloptError
    from vlopt.models import get_workload, load_model
    from vlopt.plugins import get_registry

    sizes = parse_batch_sizes(batch) if batch is not None else None
    rank = _init_distributed()
    if rank != 0:
        STATE["quiet"], json_out = True, None
    if json_out:                                # refused now, not after minutes of benchmarking
        from vlopt.checkpoint import check_creatable
        check_creatable(json_out, "--json")
    console = _console()
    if compare:
        from vlopt.models.llava import SEED_STAGE4_COMPARISON as seeds
        if workload is not None:
            raise VloptError("--compare runs the original comparison's own workloads; leave out --workload")
        runs = [(r.model, r.workload) for r in seeds]
    else:
        seeds, runs = None, [(model, workload)]
    for name, run_workload in runs:              # a bad --workload is refused before any model is built
        if run_workload is not None and not (Path(name).exists() or "/" in name):
            get_workload(run_workload, model=name if name in get_registry().models else None)
    results, conditions = [], None
    for name, run_workload in runs:
        is_path = not compare and (Path(name).exists() or "/" in name)
        with console.status(f"building {name} ({'checkpoint' if is_path else preset})"):
            if is_path and is_vlopt_output(Path(name)):   # the rule vlopt.load follows: only through its manifest
                vlm = load_optimized(name, device=device)
            else:
                vlm = load_model(None if is_path else name, preset=preset, path=name if is_path else None,
                                 dtype=dtype, device=device, allow_pickle=allow_pickle)
        conditions = conditions or cpu_conditions(vlm.device)
        wl = vlm.workload(run_workload)
        with console.status(f"benchmarking {vlm.name} on {wl.name}"):
            results.append(benchmark(vlm, wl, samples=samples, warmup=warmup, new_tokens=new_tokens,
                                     fixed=not natural, input_path=str(input_path) if input_path else None))
        if sizes:
            with console.status(f"stage 4 of {vlm.name} at batch sizes {sizes}"):
                results[-1]["batch"] = batch_table(vlm, wl, batches=sizes, samples=samples, warmup=warmup,
                                                   new_tokens=new_tokens, fixed=not natural,
                                                   input_path=str(input_path) if input_path else None)
        if scenes:
            results[-1]["quality"] = _bench_quality(vlm, wl, scenes, console)
        del vlm
    if rank != 0:
        return
    rows = compare_table(results, seeds)
    if compare:
        _print_table(f"stage 4: the original comparison (RTX 4090, 7B, sampled) and vlopt ({preset}, "
                     f"{results[0]['model']['device']})", rows, [
            ("label", "model", ""), ("workload", "workload", ""), ("seed_context", "context (orig.)", "d"),
            ("context", "context", "d"), ("seed_stage4_s", "stage-4 s (orig.)", ".2f"), ("stage4_s", "stage-4 s", ".3f"),
            ("seed_tokens", "tokens (orig.)", ".1f"), ("tokens", "tokens", ".0f"),
            ("seed_tok_s", "tok/s (orig.)", ".1f"), ("tok_s", "tok/s", ".1f"), ("share", "share of 1–4", ".1%"),
            ("ratio", "ratio", ".2f")])
    else:
        _print_table("stage 4 (the seed's table)", rows, [
            ("model", "model", ""), ("workload", "workload", ""), ("context", "context", "d"),
            ("stage4_s", "stage-4 s", ".3f"), ("share", "share of 1–4", ".1%"), ("tokens", "tokens", ".0f"),
            ("tok_s", "tok/s (stage 4)", ".1f"), ("prefill_ms", "prefill ms", ".1f"),
            ("decode_tok_s", "decode tok/s", ".1f"), ("ratio", "ratio", ".2f")])
    for r in results if sizes else []:
        _print_batch_table(r)
    for r in results if scenes else []:
        _print_quality(r)
    for r in results:
        r["timing"] = conditions
    _warn_if_busy(conditions)
    if json_out:
        payload = {"compare": rows, "results": results} if compare else results[0]
        _write_atomically(json_out, json.dumps(payload, indent=2, default=str))
        console.print(f"wrote {json_out}")


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling and rename it over `path`: a reader (or a Ctrl-C) never
    sees half a file. A path that cannot be written is one line, after the results were printed."""
    import os

    from vlopt.checkpoint import check_creatable
    from vlopt.errors import VloptError

    path = path.absolute()
    if path.is_dir():
        raise VloptError(f"--json {path} is a directory; give a file path")
    check_creatable(path, "--json")            # a file or an unwritable folder on the way to it
    tmp = path.parent / f".{path.name}.vlopt-tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise VloptError(f"could not write --json {path}: {err.strerror or err}") from None


def _bench_quality(vlm, wl, scenes: int, console) -> dict:
    """`vlopt bench --scenes N`: accuracy on N held-out scenes, or why it is not measurable."""
    from vlopt.evaluate import NOT_MEASURABLE, evaluate_model

    if vlm.weights_trained is False:
        return {"not_measured": NOT_MEASURABLE}
    with console.status(f"answering {scenes} held-out scenes with {vlm.name}"):
        result = evaluate_model(vlm, wl, scenes_n=scenes)
    return {k: result[k] for k in ("accuracy", "scenes", "seed", "per_kind")}


def _print_quality(result: dict) -> None:
    q, name = result["quality"], result["model"]["name"]
    if q.get("not_measured"):
        print(f"{name}: {q['not_measured']}")
        return
    print(f"{name}: accuracy {q['accuracy']:.1%} on {q['scenes']} held-out scenes (seed {q['seed']}); "
          + ", ".join(f"{k} {v:.0%}" for k, v in q["per_kind"].items()))


def _print_batch_table(result: dict) -> None:
    from vlopt.bench_batch import COLUMNS

    table = result["batch"]
    _print_table(f"{result['model']['name']} · {table['workload']} · {table['engine']}: throughput vs batch "
                 f"(peak memory: {table['rows'][0]['peak_mem_kind']})", table["rows"], COLUMNS)


@app.command()
def apply(recipe: Path = typer.Argument(..., help="The recipe YAML."),
          output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output directory (overrides the recipe's)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; load no weights."),
          force: bool = typer.Option(False, "--force", help="Replace an existing non-empty output directory."),
          device: Optional[str] = typer.Option(None, help="cpu | cuda (overrides the recipe)."),
          continue_on_error: bool = typer.Option(False, "--continue-on-error",
                                                 help="Record a failing pass and go on with the next.")):
    """Apply a recipe: bench the baseline, apply each pass, bench again, write checkpoint and report."""
    from vlopt import manager
    from vlopt.errors import VloptError
    from vlopt.recipe import load_recipe

    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise VloptError(f"--device must be cpu, cuda or auto, not '{device}'")
    rec, configs = load_recipe(recipe)
    out = output if output is not None else (recipe.parent / rec.output if rec.output else None)
    out = out.resolve() if out is not None else None
    if dry_run:
        import yaml

        plan = manager.resolve(rec, configs, recipe_path=recipe.absolute(), output=out, force=force)
        manager.check_preflight(plan, device)
        console = _console()
        for i, step in enumerate(plan.steps()):
            console.print(f"{i + 1}. {step['pass']} ({step['plugin']}, v{step['version']}): "
                          f"{step['persistence']}, {'lossless' if step['lossless'] else 'lossy'} — {step['config']}")
        console.print(f"output: {out if out else '(none: report printed only)'}")
        print(yaml.safe_dump(plan.resolved, sort_keys=False), end="")
        return
    rank = _init_distributed()
    if rank != 0:                 # under torchrun only rank 0 writes the report and the checkpoint
        STATE["quiet"], out = True, None
    console = _console()
    from vlopt.report import markdown

    def show(record):             # the report is printed before anything is written: a write error loses nothing
        if rank == 0:
            print(markdown(record), flush=True)

    with console.status("starting") as status:
        result = manager.run(rec, configs, recipe_path=recipe.absolute(), output=out,
                             force=force, device=device, continue_on_error=continue_on_error,
                             progress=lambda msg: status.update(msg), on_report=show)
    if rank != 0:
        raise typer.Exit(result.exit_code)
    if result.output:
        console.print(f"wrote {result.output}")
    for failure in result.failures:
        print(f"vlopt: {failure}", file=sys.stderr)
    _warn_if_busy(result.report.get("timing"))
    if result.write_error:
        print(f"vlopt: error: {result.write_error}", file=sys.stderr)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _warn_if_busy(conditions: dict | None) -> None:
    """One line after the results when the machine was loaded while they were timed."""
    if conditions and conditions.get("warning"):
        print(f"vlopt: warning: {conditions['warning']}", file=sys.stderr)


@app.command("run")
def run_inputs(target: str = typer.Argument(..., help="A recipe YAML, or a folder `vlopt apply` or save_pretrained wrote."),
               inputs: list[str] = typer.Argument(..., help="Event files, videos, images, frame folders, or "
                                                           "folders of them."),
               batch: int = typer.Option(8, "--batch", min=1, max=MAX_BATCH, help="Inputs per stage-4 batch."),
               question: Optional[str] = typer.Option(None, "--question", help="The question (default: the "
                                                                               "built-in one)."),
               output: Path = typer.Option(Path("answers.jsonl"), "-o", "--output",
                                           help="The answers file (JSON lines; appended to, answered inputs skipped)."),
               new_tokens: Optional[int] = typer.Option(None, min=1, max=MAX_NEW_TOKENS,
                                                        help="Token budget per answer (default: the workload's)."),
               fixed: bool = typer.Option(False, "--fixed", help="Always produce the whole budget (EOS masked)."),
               device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (overrides the recipe)."),
               workload: Optional[str] = typer.Option(None, help="One workload for every input (default: by each "
                                                                 "input's kind).")):
    """Answer a folder or list of inputs, batched, one JSON line per input (input, question, answer,
    error, tokens, timing). Resumable; under torchrun the inputs are split across ranks and rank 0
    writes the file."""
    from vlopt import run as runner
    from vlopt.errors import VloptError

    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise VloptError(f"--device must be cpu, cuda or auto, not '{device}'")
    say = (lambda msg: None) if STATE["quiet"] else (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = runner.run(target, inputs, output=output, batch=batch, question=question, new_tokens=new_tokens,
                         fixed=fixed, device=device, workload=workload, progress=say)
    if _rank() != 0:
        return
    left = summary["unanswered"]
    print(f"{output}: {summary['answered']} answered, {summary['errors']} errors, "
          f"{summary['skipped']} already answered, {len(left)} unanswered", file=sys.stderr)
    for why in summary["failures"]:
        print(f"vlopt: {why}; its {len(left)} inputs are unanswered: run the same command again to finish them",
              file=sys.stderr)
    if left or summary["errors"]:
        raise typer.Exit(1)


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))


def _init_distributed() -> int:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); return this rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


@app.command(name="eval")
def eval_(model: Optional[str] = typer.Option(None, help="eventgpt | videollava | … (default eventgpt)"),
          preset: Optional[str] = typer.Option(None, help="The model's preset (default tiny)."),
          recipe: Optional[Path] = typer.Option(None, help="A recipe: its model with its passes applied."),
          checkpoint: Optional[Path] = typer.Option(None, help="A folder: `vlopt apply` output or a checkpoint."),
          workload: Optional[str] = typer.Option(None, help="Default: the recipe's, else the model's own."),
          scenes: Optional[int] = typer.Option(None, help="Held-out scenes, one question each (default 100, "
                                                          "or the recipe's quality_scenes)."),
          seed: Optional[int] = typer.Option(None, help="Scene seed of the evaluation split (default 1, or the recipe's)."),
          device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: the recipe's, else auto)"),
          dtype: Optional[str] = typer.Option(None, help="auto | bfloat16 | float16 | float32 (presets and plain "
                                                         "checkpoint folders; default auto)"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result JSON here.")):
    """Task accuracy (exact match) on fresh scenes of the synthetic scene task, overall and per
    question kind: of a preset, a recipe's optimized model, or a saved folder."""
    from vlopt.evaluate import run_eval

    console = _console()
    with console.status("starting") as status:
        result = run_eval(model=model, preset=preset, recipe=recipe, checkpoint=checkpoint, workload=workload,
                          scenes_n=scenes, seed=seed, device=device, dtype=dtype, progress=status.update)
    if result.get("note"):
        print(f"vlopt: note: {result['note']}", file=sys.stderr)
    print(f"accuracy {result['accuracy']:.1%} on {result['scenes']} scenes (seed {result['seed']}, "
          f"{result['workload']}, {result['model']['label']})")
    for kind, acc in result["per_kind"].items():
        print(f"  {kind:<10} {acc:.1%}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str))
        console.print(f"wrote {json_out}")


@app.command()
def train(family: str = typer.Argument(..., help="eventgpt | videollava"),
          steps: int = typer.Option(1500, min=1, help="Decoder steps (phase 2)."),
          vision_steps: Optional[int] = typer.Option(None, min=0, help="Vision-side steps (phase 1; default --steps)."),
          seed: int = typer.Option(0, help="Seeds the initial weights, the training scenes and the sampling."),
          device: str = typer.Option("cpu", help="cpu | cuda"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder to save the trained model in."),
          pool_scenes: int = typer.Option(4000, min=1, help="Training scenes rendered once up front."),
          batch_size: int = typer.Option(32, min=1),
          lr: float = typer.Option(2e-3, min=0.0, help="Decoder learning rate."),
          vision_lr: float = typer.Option(1e-3, min=0.0, help="Vision-side learning rate."),
          exit_weight: float = typer.Option(0.5, min=0.0, help="Weight of the early-exit (LayerSkip) loss."),
          threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
          eval_scenes: int = typer.Option(200, min=1, help="Held-out scenes evaluated at the end."),
          eval_seed: int = typer.Option(0, help="Seed of the held-out scenes."),
          eval_every: int = typer.Option(0, min=0, help="Evaluate every N decoder steps as well (0: only at the end)."),
          workers: int = typer.Option(1, min=1, help="Processes rendering the training scenes."),
          time_budget: Optional[float] = typer.Option(None, min=1.0, help="Seconds of each decoder phase: fewer steps "
                                                      "if --steps would take longer (the count trained is recorded)."),
          joint_steps: int = typer.Option(0, min=0, help="Steps of phase 3: decoder and vision side together."),
          joint_vision_lr: float = typer.Option(2e-4, min=0.0, help="Vision-side learning rate in phase 3."),
          init: Optional[Path] = typer.Option(None, "--init", help="Start from this trained model's folder "
                                              "(e.g. vlopt/weights/videollava-tiny) instead of fresh weights."),
          patch_size: Optional[int] = typer.Option(None, min=2, help="CLIP patch size (even, divides 56; default 14)."),
          vision_layers: Optional[int] = typer.Option(None, min=1, help="CLIP layers (default 3)."),
          image_weight: Optional[float] = typer.Option(None, min=0.0, help="Video-LLaVA: image samples per video "
                                                       "sample (default 1).")):
    """Train the trained-tiny model of a family on the synthetic scene task: the vision side against an
    attribute probe, then the decoder on its fixed visual rows, then (--joint-steps) both together
    (seeded; deterministic on CPU).
    `vlopt/weights/<family>-tiny/` holds the shipped result and the command that made it."""
    from vlopt import train as training
    from vlopt.errors import VloptError

    if family not in training.FAMILIES:
        raise VloptError(f"vlopt train trains {' or '.join(training.FAMILIES)}, not '{family}'")
    if device not in ("cpu", "cuda"):
        raise VloptError(f"--device must be cpu or cuda, not '{device}'")
    if image_weight is not None and family != "videollava":
        raise VloptError("--image-weight is for videollava (the only family trained on two inputs)")
    if patch_size is not None and (56 % patch_size or patch_size % 2):
        raise VloptError(f"--patch-size must be even and divide the 56 px scenes (2, 4, 8, 14, 28), not {patch_size}")
    if init is not None and (patch_size is not None or vision_layers is not None):
        raise VloptError("--patch-size and --vision-layers shape a fresh model; leave them out with --init")
    if init is not None and not (init / "config.json").is_file():
        raise VloptError(f"--init {init}: no trained model there (no config.json); give a folder vlopt train wrote")
    if out is not None:
        from vlopt.checkpoint import check_creatable

        check_creatable(out, "--out")
    say = (lambda msg: None) if STATE["quiet"] else (lambda msg: print(msg, file=sys.stderr, flush=True))
    vision = {k: v for k, v in (("patch_size", patch_size), ("num_hidden_layers", vision_layers)) if v}
    weights = {"video": 1.0, "image": image_weight} if image_weight is not None else None
    training.train(family, steps=steps, vision_steps=vision_steps, seed=seed, device=device, out=out,
                   pool_scenes=pool_scenes, batch_size=batch_size, lr=lr, vision_lr=vision_lr,
                   exit_weight=exit_weight, eval_scenes=eval_scenes, eval_every=eval_every, eval_seed=eval_seed,
                   threads=threads, workers=workers, time_budget=time_budget, vision=vision or None,
                   modality_weights=weights, joint_steps=joint_steps, joint_vision_lr=joint_vision_lr,
                   init=init, log=say)


@app.command()
def passes(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Every registered pass with its config fields, types and defaults."""
    from vlopt.plugins import get_registry

    rows = []
    for name, entry in sorted(get_registry().passes.items()):
        cls = entry.config
        fields = {f: {"type": _type_name(info.annotation), "default": info.get_default(call_default_factory=True)}
                  for f, info in cls.model_fields.items() if f != "type"}
        rows.append({"type": name, "plugin": entry.plugin, "version": cls.version, "persistence": cls.persistence,
                     "changes_weights": cls.changes_weights(), "lossless": cls.lossless,
                     "deterministic": cls.deterministic, "fields": fields,
                     "doc": (entry.apply.__module__ and sys.modules[entry.apply.__module__].__doc__ or "").strip()})
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        print(f"{r['type']}  ({r['plugin']}, v{r['version']}; {r['persistence']}, "
              f"{'lossless' if r['lossless'] else 'lossy'})")
        for f, info in r["fields"].items():
            print(f"    {f}: {info['type']} = {info['default']!r}")


def _type_name(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@app.command()
def plugins():
    """Loaded plugins as JSON: name, version, hooks, passes and models registered, load errors."""
    from dataclasses import asdict

    from vlopt.plugins import get_registry
    print(json.dumps([asdict(p) for p in get_registry().plugins], indent=2))


@app.command()
def verify(folder: Path = typer.Argument(..., help="A directory written by `vlopt apply`.")):
    """Check a checkpoint against its sha256 manifest; exit 1 naming any missing, extra or altered file."""
    from vlopt.checkpoint import holds_weights, junk_files
    from vlopt.checkpoint import verify as verify_dir

    problems = verify_dir(folder)
    if problems:
        for p in problems:
            print(f"vlopt: {folder}: {p}", file=sys.stderr)
        raise typer.Exit(1)
    junk = junk_files(folder)
    ignored = f" (ignored: {', '.join(junk)}, files that file browsers and notebooks add)" if junk else ""
    if not holds_weights(folder):
        print(f"vlopt: {folder}: intact, but it is the report of a run that failed: no weights, not a loadable "
              f"checkpoint{ignored}", file=sys.stderr)
        raise typer.Exit(1)
    print(f"{folder}: ok, a loadable checkpoint{ignored}")


@app.command()
def env():
    """torch / transformers / quantization libraries / CUDA / GPU, as JSON."""
    from vlopt.machine import machine_info
    print(json.dumps(machine_info(), indent=2))


def _quiet_libraries() -> None:
    import logging
    import warnings

    # Import-time chatter of torchao and torch's pytree registry says nothing about the user's run.
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _command():
    """The click group behind `app`, with the global options added to every subcommand."""
    group = typer.main.get_command(app)
    shared = [p for p in group.params if p.name in GLOBAL_OPTIONS]
    for sub in group.commands.values():
        sub.params.extend(p for p in shared if p not in sub.params)
    return group


def _usage_message(err) -> str:
    """A click usage error as one line, with where to look for help."""
    ctx = getattr(err, "ctx", None)
    message = " ".join(err.format_message().split())
    if message == "Missing command." and ctx is not None and hasattr(ctx.command, "commands"):
        message = f"missing command (one of {', '.join(sorted(ctx.command.commands))})"
    hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    return message.rstrip(".") + hint


def _on_sigint(signum, frame):
    import os

    if STATE["reraise"]:             # our own re-raise of a Ctrl-C that a finalizer swallowed
        STATE["reraise"] = False
        if not STATE["finished"]:
            raise KeyboardInterrupt
        return
    if STATE["interrupted"] or STATE["finished"]:    # a second Ctrl-C, or one while exiting: stop now
        os.write(2, b"vlopt: interrupted\n")
        os._exit(130)
    STATE["interrupted"] = True
    raise KeyboardInterrupt


def _install_interrupt_handling() -> None:
    """Ctrl-C raises KeyboardInterrupt once (so a pass in progress is recorded as interrupted); a
    second Ctrl-C exits at once. Python drops an exception raised inside a finalizer or weakref
    callback ("Exception ignored in ..."), which let an interrupted run go on: such a KeyboardInterrupt
    is raised again in the main flow instead, once the finalizer has returned."""
    import signal
    import threading

    signal.signal(signal.SIGINT, _on_sigint)
    previous = sys.unraisablehook
    main_thread = threading.main_thread().ident

    def hook(info):
        if isinstance(info.exc_value, KeyboardInterrupt):
            if not STATE["finished"]:
                STATE["reraise"] = True
                timer = threading.Timer(0.05, signal.pthread_kill, (main_thread, signal.SIGINT))
                timer.daemon = True
                timer.start()
            return
        previous(info)

    sys.unraisablehook = hook


def _run(argv: list[str] | None) -> int:
    from vlopt.errors import VloptError

    try:
        _quiet_libraries()
        # In non-standalone mode click returns a command's `Exit` code instead of raising it, and
        # returns 130 for a KeyboardInterrupt inside a command.
        code = _command().main(args=argv, prog_name="vlopt", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except VloptError as err:
        if STATE["debug"]:
            raise
        print(f"vlopt: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except typer.Exit as ex:
        return ex.exit_code
    except typer.TyperException as err:   # click's errors (typer vendors click as typer._click)
        print(f"vlopt: error: {_usage_message(err)}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("vlopt: aborted", file=sys.stderr)
        return 1


def _forget_unhandled_keyboard_interrupt() -> None:
    """A Ctrl-C that lands inside code a C extension ran through PyRun_String (pybind11's eval, met
    while torch imports) sets CPython's "unhandled KeyboardInterrupt" flag even though the exception
    is caught here, and at exit CPython then kills the process with SIGINT (status -2, not 130).
    Running an empty string the same way clears the flag."""
    import ctypes

    try:
        ctypes.pythonapi.PyRun_SimpleString(b"")
    except AttributeError:          # not CPython
        pass


def main(argv: list[str] | None = None) -> int:
    """The `vlopt` script: usage and recipe errors are one line and exit 2; Ctrl-C exits 130."""
    _install_interrupt_handling()
    try:
        code = _run(argv)
    except KeyboardInterrupt:
        code = 130
    STATE["finished"] = True
    if STATE["interrupted"] or code == 130:
        # Interpreter shutdown puts SIGINT back to the default action, so a late one (a second
        # Ctrl-C, or the re-raise timer) would end the process by signal instead of with 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _forget_unhandled_keyboard_interrupt()
        print("vlopt: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

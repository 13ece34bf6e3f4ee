"""Throughput against batch size (issue 18) on one GPU: for each model (`7b` preset, bf16, random
weights), HF `generate()` eager, HF static cache + compile (the peer) and fast_decode, each at batch
1/4/8/16/32, all in this one process. The rows of a batch are the workload's demo clip with its
question (the same prompt repeated), a fixed budget (EOS masked: every row produces the workload's
45 / 90 tokens), stage 4 only (stages 1–3 run once, outside timing).

Per engine and batch size (vlopt.bench_batch.batch_table): aggregate decode tok/s (all rows'
tokens after the first over the decode time), aggregate stage-4 tok/s (prefill included), the
batch's stage-4 time (every request's latency), stage 4 per clip, peak memory
(`torch.cuda.max_memory_allocated`, weights included), and ratios: against batch 1 of the same
engine and against each HF engine at the same batch.

Usage:  python3 bench/gpu/batch.py [eventgpt|videollava|all] [--batches 1,4,8,16,32]
                                   [--engines hf_eager,hf_static_compile,fast_decode] [--samples 3] [--smoke]
Writes $OUT/batch-<model>.json (-<engines> when --engines names a subset; OUT defaults to the current
folder) after every engine, and prints
the summary table last. --smoke: tiny presets on the CPU in float32, batch 1/3, 1 sample,
6 tokens, fast_decode uncompiled — checks the script in seconds and measures nothing.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
import argparse
import json
import time
from pathlib import Path

import torch

ENGINES = ("hf_eager", "hf_static_compile", "fast_decode")


def arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="all", choices=["eventgpt", "videollava", "all"])
    p.add_argument("--batches", default=None, help="batch sizes, e.g. 1,4,8,16,32 (smoke: 1,3)")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    return p.parse_args()


def fresh(model: str, preset: str, dtype: str, device: str):
    from vlopt.models import load_model

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()          # a new engine's step is compiled afresh, not served from an old cache
    return load_model(model, preset=preset, dtype=dtype, device=device)


def install(vlm, engine: str, smoke: bool) -> float:
    """Put `engine` in as stage 4; returns the seconds it took (fast_decode fuses its weights)."""
    from vlopt.decode import HFGenerate
    from vlopt.plugins import get_registry

    start = time.perf_counter()
    if engine == "hf_static_compile":
        vlm.decoding.install(HFGenerate(cache_implementation="static"), by="hf_static_compile")
    elif engine == "fast_decode":
        get_registry().apply(vlm, {"type": "fast_decode", "compile": not smoke})   # smoke: the compile is tested elsewhere
    return time.perf_counter() - start


def main() -> None:
    from vlopt.bench_batch import batch_table, parse_batch_sizes
    from vlopt.machine import git_commit, machine_info
    from vlopt.models import get_workload

    args = arguments()
    smoke = args.smoke
    preset, device, dtype = ("tiny", "cpu", "float32") if smoke else ("7b", "cuda", "bfloat16")
    sizes = parse_batch_sizes(args.batches or ("1,3" if smoke else "1,4,8,16,32"))
    samples = args.samples or (1 if smoke else 3)
    warmup = 1 if smoke else args.warmup
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    models = ["eventgpt", "videollava"] if args.model == "all" else [args.model]
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for model in models:
        wl = get_workload(model)
        record = {"model": model, "preset": preset, "dtype": dtype, "workload": wl.name, "new_tokens": wl.new_tokens,
                  "batches": sizes, "samples": samples, "warmup": warmup, "commit": git_commit(),
                  "machine": machine_info(), "command": f"python3 bench/gpu/batch.py {' '.join(os.sys.argv[1:])}",
                  "engines": {}}
        part = "" if engines == list(ENGINES) else "-" + "-".join(engines)   # a split run: one file per part
        path = out_dir / f"batch-{model}{part}.json"
        for engine in engines:
            vlm = fresh(model, preset, dtype, device)
            install_s = install(vlm, engine, smoke)
            start = time.perf_counter()
            try:
                table = batch_table(vlm, wl, batches=sizes, samples=samples, warmup=warmup, fixed=True,
                                    new_tokens=6 if smoke else None)
            except torch.cuda.OutOfMemoryError as err:      # record how far it got; the others still run
                table = {"error": f"out of memory: {err}".splitlines()[0], "rows": []}
            table.update(install_s=install_s, wall_s=time.perf_counter() - start)
            record["engines"][engine] = table
            for row in table["rows"]:
                print(f"{model:10s} {engine:18s} batch {row['batch']:3d}  decode {row['decode_tokens_per_s'] or 0:8.1f} "
                      f"tok/s  stage4 {row['stage4_ms']:9.1f} ms  per clip {row['stage4_per_clip_ms']:8.1f} ms  "
                      f"peak {row['peak_mem_mb'] or 0:8.0f} MB  one pass {row['one_pass']}", flush=True)
            path.write_text(json.dumps(record, indent=1, default=str))
            del vlm
        summary += rows_of(record)
        print(f"wrote {path}", flush=True)
    print_summary(summary)


def rows_of(record: dict) -> list[dict]:
    """One summary row per (engine, batch): decode tok/s, × batch 1, × each HF engine at that batch."""
    engines = record["engines"]
    by = {(e, r["batch"]): r for e, t in engines.items() for r in t["rows"]}
    out = []
    for (engine, size), r in by.items():
        one = by.get((engine, 1))
        tok = r["decode_tokens_per_s"]
        ratio = {f"vs_{hf}": tok / by[(hf, size)]["decode_tokens_per_s"]
                 for hf in ("hf_eager", "hf_static_compile") if (hf, size) in by and by[(hf, size)]["decode_tokens_per_s"]}
        out.append({"model": record["model"], "engine": engine, "batch": size, "decode_tok_s": tok,
                    "stage4_tok_s": r["tokens_per_s"], "stage4_per_clip_ms": r["stage4_per_clip_ms"],
                    "latency_ms": r["stage4_ms"], "peak_mb": r["peak_mem_mb"],
                    "vs_batch_1": tok / one["decode_tokens_per_s"] if one and one["decode_tokens_per_s"] else None,
                    **ratio})
    return out


def print_summary(rows: list[dict]) -> None:
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    print("\nmodel      engine             batch  decode tok/s  × batch 1  × HF eager  × HF static  "
          "stage4 tok/s  per clip ms  latency ms   peak MB")
    for r in rows:
        print(f"{r['model']:10s} {r['engine']:18s} {r['batch']:5d}  {f(r['decode_tok_s'], '12.1f')}  "
              f"{f(r['vs_batch_1'], '9.2f')}  {f(r.get('vs_hf_eager'), '10.2f')}  {f(r.get('vs_hf_static_compile'), '11.2f')}  "
              f"{f(r['stage4_tok_s'], '12.1f')}  {f(r['stage4_per_clip_ms'], '11.1f')}  {f(r['latency_ms'], '10.1f')}  "
              f"{f(r['peak_mb'], '8.0f')}", flush=True)


if __name__ == "__main__":
    main()

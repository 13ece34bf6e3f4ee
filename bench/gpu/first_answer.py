"""How long a new process waits for its first answer: load a `7b` model, apply the passes, run one
benchmark sample (the first call compiles), then time the steady state. Run twice on one Inductor cache
directory (bench/gpu/compile_times.sh) it shows the first compile and what a second process pays.

    python3 bench/gpu/first_answer.py MODEL 'PASSES_JSON' LAUNCHED_EPOCH_S OUT.jsonl [--smoke]
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
import json
import sys
import time


def compile_phases() -> dict:
    """Seconds per Dynamo/Inductor phase this process spent (summed over its compiles): where a long
    first compile goes."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {name: round(float(value), 2) for name, value in zip(names, values)}


def main() -> None:
    model, passes, launched, out_path = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    smoke = "--smoke" in sys.argv
    started = time.time()
    import torch

    from vlopt import bench
    from vlopt.machine import machine_info
    from vlopt.models import get_workload, load_model
    from vlopt.plugins import get_registry

    preset, device, dtype = ("tiny", "cpu", "float32") if smoke else ("7b", "cuda", "bfloat16")
    vlm = load_model(model, preset=preset, dtype=dtype, device=device)
    loaded = time.time()
    registry = get_registry()
    for cfg in passes:
        registry.apply(vlm, cfg)
    applied = time.time()
    wl = get_workload(vlm.default_workload)
    first = bench.benchmark(vlm, wl, samples=1, warmup=0)
    answered = time.time()
    steady = bench.benchmark(vlm, wl, samples=3, warmup=0)
    row = {"model": model, "passes": passes, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
           "python_start_s": started - launched, "load_s": loaded - started, "apply_s": applied - loaded,
           "first_answer_s": answered - applied, "launch_to_first_answer_s": answered - launched,
           "first_engine_info": first["stage4"]["engine_info"], "first_stage4_ms": first["stage4"]["stage4_ms"],
           "steady_stage4_ms": steady["stage4"]["stage4_ms"], "steady_tokens_per_s": steady["stage4"]["tokens_per_s"],
           "compile_phases_s": compile_phases(), "torch": torch.__version__, "machine": machine_info()}
    with open(out_path, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
    info = row["first_engine_info"]
    print(f"{model} {json.dumps(passes)}: launch→first answer {row['launch_to_first_answer_s']:.1f} s "
          f"(python {row['python_start_s']:.1f}, load {row['load_s']:.1f}, apply {row['apply_s']:.1f}, first answer "
          f"{row['first_answer_s']:.1f}; compile_s {info.get('compile_s')}) · steady {row['steady_stage4_ms']:.1f} ms, "
          f"{row['steady_tokens_per_s']:.1f} tok/s", flush=True)
    slowest = sorted(row["compile_phases_s"].items(), key=lambda kv: -kv[1])[:8]
    print("  compile phases (s):", ", ".join(f"{k} {v}" for k, v in slowest), flush=True)


if __name__ == "__main__":
    main()

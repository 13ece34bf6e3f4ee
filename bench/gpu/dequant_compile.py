"""First-call cost of int4's dense prefill rebuild (`Int4Codes.dense`) on the 7B decoder's weight shapes,
compiled per shape (`dynamic=False`) against one shape-generic compile (`dynamic=True`), each mode in its
own process on its own empty Inductor cache: per shape the first call's wall time (what a first answer
pays) and the steady time per call (CUDA events, median of 20), checked equal to the eager rebuild.

    python3 bench/gpu/dequant_compile.py OUT.json            (runs every mode as a subprocess)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]
GROUP = 128
MODES = ("static", "dynamic")


def one_mode(mode: str) -> dict:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from vlopt_passes._int4_gemv import Int4Codes, _dequantize

    fn = torch.compile(_dequantize, dynamic=(mode == "dynamic"))
    rows = []
    torch.manual_seed(0)
    for n, k in SHAPES:
        codes = Int4Codes.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), GROUP)
        args = (codes.packed, codes.scale, codes.zero, GROUP, n, k)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t
        same = bool(torch.equal(out, _dequantize(*args)))
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(*args)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000)
        steady_us = sorted(times)[len(times) // 2]
        rows.append({"shape": [n, k], "first_call_s": first_s, "steady_us": steady_us,
                     "gb_per_s": n * k * 2 / steady_us / 1e3, "equal_to_eager": same})
    return {"mode": mode, "rows": rows, "total_first_s": sum(r["first_call_s"] for r in rows),
            "torch": torch.__version__}


def main() -> None:
    if sys.argv[1] == "--mode":
        print(json.dumps(one_mode(sys.argv[2])))
        return
    from vlopt.machine import machine_info

    results = {"machine": machine_info(), "group_size": GROUP, "modes": []}
    for mode in MODES:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp())
        done = subprocess.run([sys.executable, __file__, "--mode", mode], env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:])
            continue
        results["modes"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    with open(sys.argv[1], "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print("mode     shape          first s   steady µs  GB/s(out)  equal")
    for m in results["modes"]:
        for r in m["rows"]:
            print(f"{m['mode']:8s} {str(r['shape']):14s} {r['first_call_s']:7.2f}  {r['steady_us']:9.1f}  "
                  f"{r['gb_per_s']:9.0f}  {r['equal_to_eager']}")
        print(f"{m['mode']:8s} total first-call s {m['total_first_s']:.2f}")


if __name__ == "__main__":
    main()

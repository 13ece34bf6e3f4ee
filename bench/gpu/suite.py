"""Stage-4 suite for one `7b` model on a GPU: every row measured in this one process.

Rows: HF generate (eager, the baseline), fast_decode bf16 without and with its fused projections and
kernel tuning (the defaults), fast_decode + int8 (torchao),
fast_decode + int4 with torchao's tinygemm kernel and with vlopt's Triton kernel (bf16 weights rebuilt
first for each), and the peer HF static cache + compile.
Each row: benchmark JSON (stages, prefill, decode tok/s, GB/s, peak memory) and fidelity against
the baseline's greedy output. Usage: python bench/gpu/suite.py MODEL OUT.json [--skip-peer]
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
import json
import sys
import time

import torch


def main() -> None:
    from vlopt import bench, fidelity
    from vlopt.decode import HFGenerate
    from vlopt.models import get_workload, load_model
    from vlopt.plugins import get_registry
    from vlopt_passes._int4_gemv import PackedLinear
    from vlopt_passes._quant import replace_module

    model, out_path = sys.argv[1], sys.argv[2]
    skip_peer = "--skip-peer" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    smoke = "--smoke" in sys.argv      # tiny model on the CPU: checks the script, measures nothing
    preset, device, dtype = ("tiny", "cpu", "float32") if smoke else ("7b", "cuda", "bfloat16")
    samples = 1 if smoke else 3
    registry = get_registry()

    def apply(vlm, cfg: dict):
        t = time.perf_counter()
        outcome = registry.apply(vlm, cfg)
        return time.perf_counter() - t, outcome

    def fresh():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return load_model(model, preset=preset, dtype=dtype, device=device)

    results = {"model": model, "rows": []}

    def wanted(name):
        return only is None or name in only or name == "hf_eager"

    def quantization_errors(lin, original):
        """Relative error of a quantized projection's effective weight (read back as lin(I), which
        works for every torchao layout, tile-packed int4 included) and of its output on random rows,
        both against the bf16 original: checks the kernel itself, which random-weight logits cannot."""
        eye = torch.eye(lin.in_features, device=original.device, dtype=original.dtype)
        w_hat = lin(eye).T.float()
        x = torch.randn(4, lin.in_features, device=original.device, dtype=original.dtype)
        exact = (x @ original.T).float()
        return ((w_hat - original.float()).norm() / original.float().norm()).item(), \
            ((lin(x).float() - exact).norm() / exact.norm()).item()

    def record(name, vlm, wl, ref, passes, apply_s=0.0, warmup=2, lossless=False):
        if not wanted(name):
            return
        t = time.perf_counter()
        res = bench.benchmark(vlm, wl, samples=samples, warmup=warmup)
        wall = time.perf_counter() - t
        fid = fidelity.compare(vlm, ref, wl) if ref is not None else None
        row = {"name": name, "passes": passes, "lossless": lossless, "apply_s": apply_s, "bench_wall_s": wall,
               "bench": res, "fidelity": fid}
        results["rows"].append(row)
        s4 = res["stage4"]
        print(f"{model:10s} {name:28s} stage4 {s4['stage4_ms']:8.1f} ms  prefill {s4['prefill_ms']:6.1f} ms  "
              f"decode {s4['tokens_per_s']:6.1f} tok/s  {s4['gb_per_s']:6.0f} GB/s  peak {s4['peak_mem_mb']:6.0f} MB  "
              f"info {s4['engine_info']}  fid {fid}", flush=True)
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1, default=str)

    vlm = fresh()
    wl = get_workload(vlm.default_workload)
    record("hf_eager", vlm, wl, None, [], warmup=1, lossless=True)
    ref = fidelity.reference(vlm, wl, new_tokens=wl.new_tokens)
    results["reference_tokens"] = ref.tokens
    if wanted("fast_decode_bf16_plain"):    # session 1's engine: five projection products, untuned kernels
        s, _ = apply(vlm, {"type": "fast_decode", "fuse_projections": False, "tune": False})
        record("fast_decode_bf16_plain", vlm, wl, ref, ["fast_decode(fuse_projections=false, tune=false)"], s,
               lossless=True)
        torch._dynamo.reset()                  # else the next engine's step may be served from this one's cache
    if wanted("fast_decode_bf16") or wanted("fast_decode_int8"):
        s, _ = apply(vlm, {"type": "fast_decode"})
        record("fast_decode_bf16", vlm, wl, ref, ["fast_decode"], s, lossless=True)
    if wanted("fast_decode_bf16_max_autotune"):   # + Inductor's autotuned matmul templates
        torch._dynamo.reset()
        s, _ = apply(vlm, {"type": "fast_decode", "compile_mode": "max-autotune-no-cudagraphs"})
        record("fast_decode_bf16_max_autotune", vlm, wl, ref, ["fast_decode(compile_mode=max-autotune-no-cudagraphs)"],
               s, lossless=True)
    if wanted("fast_decode_int8"):
        s, _ = apply(vlm, {"type": "int8"})
        record("fast_decode_int8", vlm, wl, ref, ["fast_decode", "int8"], s)
    group = 128 if not smoke else 32
    for kernel in ("tinygemm", "triton"):
        name = "fast_decode_int4" if kernel == "tinygemm" else "fast_decode_int4_triton"
        if not (wanted(name) or kernel == "tinygemm" and wanted("fast_decode_int4_kernel_prefill")):
            continue
        del vlm
        vlm = fresh()
        torch._dynamo.reset()
        original = vlm.text_model.layers[0].mlp.down_proj.weight.detach().clone()
        s1, _ = apply(vlm, {"type": "fast_decode"})
        s2, _ = apply(vlm, {"type": "int4", "group_size": group, "kernel": kernel})
        with torch.no_grad():
            errors = quantization_errors(vlm.text_model.layers[0].mlp.down_proj, original)
        results[f"{kernel}_int4_weight_rel_error"], results[f"{kernel}_int4_layer_rel_error"] = errors
        print(f"{kernel} int4 weight / layer-output relative error:", *errors, flush=True)
        record(name, vlm, wl, ref, ["fast_decode", f"int4(kernel={kernel})"], s1 + s2)
        if kernel == "tinygemm" and wanted("fast_decode_int4_kernel_prefill"):   # same weights, tinygemm prefill
            for name, module in list(vlm.hf.named_modules()):
                if isinstance(module, PackedLinear):          # back to the plain tile-packed Linear
                    plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                            device="meta")
                    plain.weight, plain.bias = module.weight, module.bias
                    replace_module(vlm, name, plain)
            record("fast_decode_int4_kernel_prefill", vlm, wl, ref, ["fast_decode", "int4(dense_prefill=false)"])
    if not skip_peer and wanted("hf_static_compile"):
        del vlm
        vlm = fresh()
        vlm.decoding.install(HFGenerate(cache_implementation="static"), by="hf_static_compile")
        record("hf_static_compile", vlm, wl, ref, ["(peer) generate cache_implementation=static"], warmup=2,
               lossless=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()

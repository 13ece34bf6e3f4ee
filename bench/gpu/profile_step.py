"""Where a fast_decode step's time goes on the GPU (issue 5: what limits the targets).

For EventGPT 7b, bf16 and int4: the graph-replayed step time, the same compiled step launched
without a graph, and a torch.profiler breakdown of the kernels of one step by kind (matrix
products, attention, Triton-fused norms/rope/elementwise, other). Plus the device's copy bandwidth,
so the achieved GB/s can be read against what the memory can do.
Usage: python bench/gpu/profile_step.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")


def categorize(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "efficient")):
        return "attention"
    if any(k in n for k in ("gemm", "gemv", "cutlass", "nvjet", "cublas", "sm90_", "matmul", "tinygemm", "int4pack")):
        return "matmul"
    if "triton" in n:
        return "fused (triton)"
    if any(k in n for k in ("copy", "memcpy", "memset", "fill")):
        return "copy/fill"
    return "other"


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vlopt.bench import decode_step_bytes
    from vlopt.models import get_workload, load_model
    from vlopt.plugins import get_registry

    out = {}
    x = torch.empty(2**30, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    out["copy_tb_s_read_plus_write"] = 10 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e12
    del x, y

    vlm = load_model("eventgpt", preset="7b", dtype="bfloat16", device="cuda")
    wl = get_workload("eventgpt")
    inp = vlm.run_stages(None, wl, "What are the key elements in this scene?")
    registry = get_registry()

    def apply(cfg):
        registry.apply(vlm, cfg)

    apply({"type": "fast_decode"})
    torch.set_grad_enabled(False)          # the engine runs under no_grad; so must direct step calls
    only = os.environ.get("PROFILE_ONLY")
    for label, extra in (("bf16", None), ("int4", {"type": "int4", "group_size": 128})):
        if only and label != only:
            if extra:
                continue
            continue                      # skip bf16 but keep the order of passes
        if extra:
            apply(extra)
        eng = vlm.decoding.engine
        eng.generate(vlm, inp, new_tokens=8)                      # compile + capture
        token = torch.tensor([5], device="cuda")
        pos = torch.tensor([inp.context_tokens + 8], device="cuda")

        def timed(fn, n=100):
            for _ in range(5):
                fn()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / n

        graph_ms = timed(lambda: eng.step(token, pos))           # the captured graph, replayed
        nograph_ms = timed(lambda: eng.step.fn(token, pos))       # the compiled step without it
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                eng.step.fn(token, pos)
            torch.cuda.synchronize()
        cats: dict[str, float] = {}
        kernels = 0
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if t and ev.device_type.name == "CUDA":
                cats[categorize(ev.key)] = cats.get(categorize(ev.key), 0.0) + t / 10 / 1e3   # ms per step
                kernels += ev.count / 10
        step_bytes = decode_step_bytes(vlm, inp.context_tokens + 8)
        out[label] = {"graph_step_ms": graph_ms, "no_graph_step_ms": nograph_ms,
                      "kernel_ms_by_kind": cats, "kernel_ms_total": sum(cats.values()),
                      "kernels_per_step": kernels, "bytes_per_step": step_bytes,
                      "achieved_tb_s": step_bytes / (graph_ms / 1e3) / 1e12,
                      "top_kernels": [(ev.key[:90], round((getattr(ev, "self_device_time_total", 0) or 0) / 10 / 1e3, 4))
                                      for ev in sorted(prof.key_averages(),
                                                       key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:12]]}
        r = out[label]
        print(f"{label}: graph {graph_ms:.3f} ms/step ({1e3 / graph_ms:.0f} tok/s), no graph {nograph_ms:.3f} ms, "
              f"kernels {r['kernel_ms_total']:.3f} ms in {kernels:.0f} launches: "
              + ", ".join(f"{k} {v:.3f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1]))
              + f"; {r['achieved_tb_s']:.2f} TB/s of {out['copy_tb_s_read_plus_write'] / 2:.2f} TB/s read (copy/2)",
              flush=True)
        for k, t in r["top_kernels"]:
            print(f"    {t:8.4f} ms  {k}")
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

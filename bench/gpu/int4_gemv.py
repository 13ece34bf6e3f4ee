"""vlopt's Triton int4 GEMV against tinygemm and bf16 cuBLAS, on the 7B decoder's weight shapes.

Per shape: correctness of the kernel against the dense rebuild in float64 (fresh random x), then
the time per GEMV of every candidate config, of torchao's tinygemm (tile-packed int4, same group
size) and of a bf16 F.linear. Every time is one CUDA graph over enough copies of the weight to
overflow the 50 MB L2 (as the decode step reads 32 layers in turn), replayed 10 times; median.
Usage: python bench/gpu/int4_gemv.py OUT.json [--wide]   (--wide: a larger config sweep)
"""

from __future__ import annotations

import json
import os
import sys

SHAPES = {                      # name: (N, K) of a 7B LLaMA decoder layer
    "q/k/v/o": (4096, 4096),
    "qkv fused": (12288, 4096),
    "gate/up": (11008, 4096),
    "gate+up fused": (22016, 4096),
    "down": (4096, 11008),
    "lm_head": (32000, 4096),
}
GROUP = 128


def main() -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from vlopt.machine import machine_info
    from vlopt_passes._int4_gemv import Int4Codes, candidate_configs, graph_ms, register_op, time_config

    register_op()
    wide = "--wide" in sys.argv
    results = {"machine": machine_info(), "group_size": GROUP, "shapes": {}}
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        copies = max(4, -(-256 * 2**20 // (n * k // 2)))          # ≥ 256 MB of int4 weights in turn
        dense = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(min(copies, 8))]
        codes = [Int4Codes.quantize(dense[i % len(dense)], GROUP) for i in range(copies)]
        row = {"n": n, "k": k, "copies": copies}
        # correctness: fresh x, float64 reference of the same codes
        errs = []
        for c in codes[:2]:
            x = torch.randn(k, dtype=torch.bfloat16, device="cuda")
            ref = c.dense().double() @ x.double()
            for cfg in candidate_configs(n, wide=True)[:: 7]:
                c.config = cfg
                y = c.gemv(x[None]).double()[0]
                errs.append(((y - ref).norm() / ref.norm()).item())
        row["max_rel_err_vs_dense"] = max(errs)
        configs = candidate_configs(n, wide=wide)
        timed = sorted(((time_config(codes, cfg), cfg) for cfg in configs), key=lambda t: t[0])
        best_ms, best = timed[0]
        row["probe_loads_only_ms"] = time_config(codes, best, probe=True)     # same loads, no unpacking
        default = candidate_configs(n)
        row["triton_default_list_ms"] = min(ms for ms, cfg in timed if cfg in default)   # what `tune` picks from
        for c in codes:
            c.config = best
        x1 = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        row["triton_op_ms"] = graph_ms([lambda c=c: c.gemv(x1) for c in codes])      # with the partial sum
        int4_bytes = codes[0].packed.numel() + 2 * codes[0].scale.numel() * 2
        row["triton_ms"] = best_ms
        row["triton_tb_s"] = int4_bytes / best_ms / 1e9
        row["triton_best"] = vars(best)
        row["triton_all"] = [{"ms": ms, **vars(cfg)} for ms, cfg in timed]
        # tinygemm through torchao, same shapes and group size
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        mods = []
        for i in range(copies):
            lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
            lin.weight.data.copy_(dense[i % len(dense)])
            quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
            mods.append(lin)
        x2 = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            row["tinygemm_ms"] = graph_ms([lambda m=m: m(x2) for m in mods])
            row["tinygemm_tb_s"] = int4_bytes / row["tinygemm_ms"] / 1e9
            ref = F.linear(x2, dense[0]).float()
            tiny = mods[0](x2).float()
            ours = codes[0].gemv(x2).float()
            row["tinygemm_vs_triton_rel"] = ((tiny - ours).norm() / ref.norm()).item()
        del mods
        ws = [d for d in dense] * (-(-copies // (2 * len(dense))))   # bf16 is 4× the bytes: fewer copies
        row["bf16_ms"] = graph_ms([lambda w=w: F.linear(x2, w) for w in ws])
        row["bf16_tb_s"] = n * k * 2 / row["bf16_ms"] / 1e9
        results["shapes"][name] = row
        print(f"{name:14s} N={n:5d} K={k:5d} err {row['max_rel_err_vs_dense']:.1e} | triton {best_ms * 1e3:7.1f} us "
              f"{row['triton_tb_s']:.2f} TB/s {vars(best)} (loads only {row['probe_loads_only_ms'] * 1e3:5.1f}, op {row['triton_op_ms'] * 1e3:6.1f}, short list {row['triton_default_list_ms'] * 1e3:6.1f}) | tinygemm {row['tinygemm_ms'] * 1e3:7.1f} us "
              f"{row['tinygemm_tb_s']:.2f} TB/s | bf16 {row['bf16_ms'] * 1e3:7.1f} us {row['bf16_tb_s']:.2f} TB/s",
              flush=True)
        del codes, dense
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""One row per pass on a `7b` model: each pass applied alone to a fresh model by the real manager,
against the HF-eager baseline measured in the same run (issue 4's per-pass table).

A row may be a chain (its last pass is the one measured against the pass before it, e.g.
feature_cache prefix after fast_decode on the 10-questions workload).
Usage: python bench/gpu/passes.py MODEL OUT.json [--smoke] [--only TYPE,...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

PASSES = [
    ({"type": "attention", "implementation": "flash"}, {}),
    ({"type": "prune_visual", "method": "cls_attention", "keep": 0.25}, {}),
    ({"type": "prune_visual", "method": "fastv", "keep": 0.25, "after_layer": 2}, {}),
    ([{"type": "fast_decode", "tune": False}, {"type": "feature_cache", "scope": "prefix"}], {"workload": "{model}-10q", "samples": 4}),
    ({"type": "feature_cache", "scope": "request"}, {}),
    ({"type": "llm_int8"}, {}),
    ({"type": "nf4", "compute_dtype": "bfloat16"}, {}),
    ({"type": "layer_skip", "draft_layers": 8, "draft_tokens": 4}, {}),
    ({"type": "speculative", "draft": "self", "draft_layers": 8, "draft_tokens": 4}, {}),
    ({"type": "speculative", "draft": {"family": "{other}", "preset": "{preset}"}, "draft_tokens": 4}, {}),
    ({"type": "early_stop", "eos_threshold": 0.5, "max_sentences": 2}, {"natural": True}),
]


def main() -> None:
    import gc

    import torch

    from vlopt.testing import run_recipe

    model, out_path = sys.argv[1], sys.argv[2]
    smoke = "--smoke" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    spec = ({"name": model, "preset": "tiny", "dtype": "float32", "device": "cpu"} if smoke else
            {"name": model, "preset": "7b", "dtype": "bfloat16", "device": "cuda"})
    names = {"model": model, "other": {"eventgpt": "videollava"}.get(model, "eventgpt"), "preset": spec["preset"]}

    def filled(v):                      # "{model}", "{other}" (the other family), "{preset}" in a row
        if isinstance(v, str):
            return v.format(**names)
        if isinstance(v, dict):
            return {k: filled(x) for k, x in v.items()}
        return [filled(x) for x in v] if isinstance(v, list) else v

    rows = []
    for cfgs, bench in PASSES:
        chain = filled(cfgs if isinstance(cfgs, list) else [cfgs])
        cfg = chain[-1]
        if smoke and cfg.get("draft_layers"):       # the tiny presets have 8 layers
            cfg["draft_layers"] = 2
        key = cfg.get("method") or cfg.get("scope") or cfg["type"]
        if (smoke and cfg.get("implementation") == "flash") or (only and key not in only):
            continue
        bench = filled(bench)
        recipe = {"model": spec, "benchmark": {"samples": 2, "warmup": 1, **bench}, "passes": chain}
        with tempfile.TemporaryDirectory() as tmp:
            result = run_recipe(recipe, tmp)
        base, last = result.report["baseline"], result.rows[-1]
        rows.append({"config": cfg, "chain": chain, "benchmark": bench, "baseline": base, "row": last.to_dict(),
                     "previous": result.rows[-2].to_dict() if len(chain) > 1 else None})
        s0, s1 = base["stage4"], last.stage4 or {}
        print(f"{model:10s} {cfg['type']:13s} {last.status:8s} base {s0['stage4_ms']:8.1f} ms -> "
              f"{s1.get('stage4_ms', float('nan')):8.1f} ms  x{last.speedup_vs_baseline or float('nan'):.2f}  "
              f"x{last.speedup_vs_previous or float('nan'):.2f} previous  "
              f"prefill {s0['prefill_ms']:.1f}->{s1.get('prefill_ms', float('nan')):.1f}  "
              f"ctx {s0['context_tokens']}->{s1.get('context_tokens')}  tokens {s0['new_tokens']}->{s1.get('new_tokens')}  "
              f"peak {s0['peak_mem_mb']:.0f}->{s1.get('peak_mem_mb', float('nan')):.0f} MB  fid {last.fidelity}  "
              f"{last.error or ''} {s1.get('engine_info') or ''}", flush=True)
        with open(out_path, "w") as fh:
            json.dump({"model": model, "rows": rows}, fh, indent=1, default=str)
        del result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

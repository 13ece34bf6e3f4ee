"""One row per pass on a `7b` model: each pass applied alone to a fresh model by the real manager,
against the HF-eager baseline measured in the same run (issue 4's per-pass table).

Usage: python bench/gpu/passes.py MODEL OUT.json [--smoke]
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
    ({"type": "feature_cache", "scope": "request"}, {}),
    ({"type": "int8", "backend": "bitsandbytes"}, {}),
    ({"type": "int4", "backend": "bitsandbytes", "quant_type": "nf4", "compute_dtype": "bfloat16"}, {}),
    ({"type": "layer_skip", "draft_layers": 8, "draft_tokens": 4}, {}),
    ({"type": "early_stop", "eos_threshold": 0.5, "max_sentences": 2}, {"natural": True}),
]


def main() -> None:
    import gc

    import torch

    from vlopt.testing import run_recipe

    model, out_path = sys.argv[1], sys.argv[2]
    smoke = "--smoke" in sys.argv
    spec = ({"name": model, "preset": "tiny", "dtype": "float32", "device": "cpu"} if smoke else
            {"name": model, "preset": "7b", "dtype": "bfloat16", "device": "cuda"})
    rows = []
    for cfg, bench in PASSES:
        if smoke and cfg.get("implementation") == "flash":
            continue
        recipe = {"model": spec, "benchmark": {"samples": 2, "warmup": 1, **bench}, "passes": [cfg]}
        with tempfile.TemporaryDirectory() as tmp:
            result = run_recipe(recipe, tmp)
        base, row = result.report["baseline"], result.report["passes"][0]
        rows.append({"config": cfg, "benchmark": bench, "baseline": base, "row": row})
        s0, s1 = base["stage4"], row.get("stage4") or {}
        print(f"{model:10s} {cfg['type']:13s} {row['status']:8s} base {s0['stage4_ms']:8.1f} ms -> "
              f"{s1.get('stage4_ms', float('nan')):8.1f} ms  x{row.get('speedup_vs_baseline') or float('nan'):.2f}  "
              f"prefill {s0['prefill_ms']:.1f}->{s1.get('prefill_ms', float('nan')):.1f}  "
              f"ctx {s0['context_tokens']}->{s1.get('context_tokens')}  tokens {s0['new_tokens']}->{s1.get('new_tokens')}  "
              f"peak {s0['peak_mem_mb']:.0f}->{s1.get('peak_mem_mb', float('nan')):.0f} MB  fid {row.get('fidelity')}  "
              f"{row.get('error') or ''} {s1.get('engine_info') or ''}", flush=True)
        with open(out_path, "w") as fh:
            json.dump({"model": model, "rows": rows}, fh, indent=1, default=str)
        del result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

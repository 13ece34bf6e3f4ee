"""Turn the suite JSONs of one GPU into `summary.json` and `stage4.md` (what the README quotes).

Usage: python bench/gpu/summarize.py RESULTS_DIR   (reads RESULTS_DIR/raw/{eventgpt,videollava}.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {  # issue #5: decode tok/s and stage-4 seconds on an H100
    "eventgpt": {"bf16_tok_s": 200, "int4_tok_s": 450, "bf16_stage4_s": 0.25, "int4_stage4_s": 0.12},
    "videollava": {"bf16_tok_s": 185, "int4_tok_s": 380, "bf16_stage4_s": 0.55, "int4_stage4_s": 0.28},
}


def main(folder: Path) -> None:
    summary, lines = [], []
    meta = None
    for model in ("eventgpt", "videollava"):
        path = folder / "raw" / f"{model}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = {r["name"]: r for r in data["rows"]}
        eager = rows["hf_eager"]["bench"]["stage4"]["stage4_ms"]
        static = rows.get("hf_static_compile", {}).get("bench", {}).get("stage4", {}).get("stage4_ms")
        meta = meta or {**rows["hf_eager"]["bench"]["machine"], "command": data.get("command")}
        lines += [f"### {model} (workload `{rows['hf_eager']['bench']['workload']['name']}`, "
                  f"{rows['hf_eager']['bench']['stage4']['context_tokens']} context, "
                  f"{rows['hf_eager']['bench']['stage4']['new_tokens']:.0f} new tokens)", "",
                  "| recipe | stage 4 ms | prefill ms | decode tok/s | GB/s | peak MB | × HF eager | × HF static+compile | top-1 | KL | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            s4 = r["bench"]["stage4"]
            fid = r.get("fidelity") or {"top1_agreement": 1.0, "mean_kl": 0.0}
            entry = {"workload": model, "recipe": name, "passes": r["passes"], "lossless": r["lossless"],
                     "decode_tokens_per_s": s4["tokens_per_s"], "stage4_ms": s4["stage4_ms"],
                     "prefill_ms": s4["prefill_ms"], "gb_per_s": s4["gb_per_s"], "peak_mem_mb": s4["peak_mem_mb"],
                     "speedup_vs_hf_eager": eager / s4["stage4_ms"],
                     "speedup_vs_hf_static_compile": static / s4["stage4_ms"] if static else None,
                     "top1_agreement": fid["top1_agreement"], "mean_kl": fid["mean_kl"],
                     "first_divergence": fid.get("first_divergence"),
                     "compile_s": s4["engine_info"].get("compile_s")}
            summary.append(entry)
            lines.append(f"| {name} | {s4['stage4_ms']:.1f} | {s4['prefill_ms']:.1f} | {s4['tokens_per_s']:.1f} | "
                         f"{s4['gb_per_s']:.0f} | {s4['peak_mem_mb']:.0f} | {entry['speedup_vs_hf_eager']:.2f} | "
                         f"{'–' if static is None else format(entry['speedup_vs_hf_static_compile'], '.2f')} | "
                         f"{entry['top1_agreement']:.3f} | {entry['mean_kl']:.2e} | "
                         f"{'–' if entry['compile_s'] is None else format(entry['compile_s'], '.0f')} |")
        t = TARGETS[model]
        lines += ["", f"Targets (issue 5): bf16 ≥ {t['bf16_tok_s']} tok/s and ≤ {t['bf16_stage4_s']} s; "
                  f"int4 ≥ {t['int4_tok_s']} tok/s and ≤ {t['int4_stage4_s']} s.", ""]
    (folder / "summary.json").write_text(json.dumps({"machine": meta, "entries": summary}, indent=1))
    header = [f"# Stage 4 on {meta.get('gpu')} (driver {meta.get('driver')}, CUDA {meta.get('cuda')}, torch "
              f"{meta.get('torch')}, transformers {meta.get('transformers')}, torchao {meta.get('torchao')})", "",
              f"Commit `{meta.get('commit')}`. Command, per model, on the lent GPU after `bench/gpu/setup.sh`:", "",
              "```", "python3 bench/gpu/suite.py MODEL raw/MODEL.json", "```", "",
              "All rows of a model come from one process: same inputs, same warm-up (2 runs, compile excluded and "
              "reported apart), median of 3 samples, fixed token budget. Fidelity is teacher-forced on the HF "
              "eager greedy output. Random weights give near-tied logits, so lossy rows (int8/int4) show low "
              "top-1 agreement even when the kernels are right; read KL.", ""]
    (folder / "stage4.md").write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

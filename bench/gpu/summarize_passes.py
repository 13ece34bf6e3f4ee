"""Write `passes.md` (issue 4's per-pass table) and `baseline.md` (the `vlopt bench --compare`
baseline) from the raw JSON of a GPU run. Usage: python bench/gpu/summarize_passes.py RESULTS_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def passes(folder: Path) -> list[str]:
    out = []
    for model in ("eventgpt", "videollava"):
        path = folder / "raw" / f"passes-{model}.json"
        if not path.exists():
            continue
        rows = json.loads(path.read_text())["rows"]
        m = rows[0]["baseline"]["machine"]
        out += [f"### {model}", "", f"{m['gpu']} · torch {m['torch']} · transformers {m['transformers']} · "
                f"bitsandbytes {m['bitsandbytes']} · commit `{m['commit']}`", "",
                "| pass | config | stages 1–3 ms (base → pass) | prefill ms | stage 4 ms | × baseline | new tokens | context | peak MB | top-1 | KL | engine info |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            b, row = r["baseline"], r["row"]
            s0, s1 = b["stage4"], row.get("stage4") or {}
            pre = lambda st: sum(st[k]["median_ms"] for k in ("1", "2", "3"))  # noqa: E731
            cfg = {k: v for k, v in r["config"].items() if k != "type"}
            fid = row.get("fidelity") or {}
            info = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in (s1.get("engine_info") or {}).items()}
            out.append(
                f"| {row['pass']} | {cfg}{' (natural length)' if r['benchmark'].get('natural') else ''} | "
                f"{pre(b['stages']):.1f} → {pre(row['stages']) if row.get('stages') else float('nan'):.1f} | "
                f"{s0['prefill_ms']:.1f} → {_f(s1.get('prefill_ms'))} | {s0['stage4_ms']:.0f} → {_f(s1.get('stage4_ms'), '.0f')} | "
                f"{_f(row.get('speedup_vs_baseline'), '.2f')} | {s0['new_tokens']:.0f} → {_f(s1.get('new_tokens'), '.0f')} | "
                f"{s0['context_tokens']} → {s1.get('context_tokens')} | {s0['peak_mem_mb']:.0f} → {_f(s1.get('peak_mem_mb'), '.0f')} | "
                f"{_f(fid.get('top1_agreement'), '.3f')} | {_f(fid.get('mean_kl'), '.2e')} | "
                f"{info or (row.get('info') or {}).get('kernel') or ''} |")
        out.append("")
    return out


ADDED = [  # later runs, one row each: (raw file, pass key, how to read it)
    ("passes-{model}-s2.json", "fastv", ""),
    ("passes-{model}-s2.json", "prefix", "cold: each timed question had a prompt length not seen before "
     "(superseded by the next row; kept because it shows the cost)"),
    ("passes-{model}-prefix.json", "prefix", "warm: every question ran once before timing"),
]


def added(folder: Path) -> list[str]:
    """Rows of later runs, with the pass before the measured one (`× previous`) where it is a chain."""
    out = ["## Added later: `prune_visual: fastv` and `feature_cache: prefix`", "",
           "Commands: `python3 bench/gpu/passes.py MODEL raw/passes-MODEL-s2.json --only fastv,prefix` and "
           "`python3 bench/gpu/passes.py MODEL raw/passes-MODEL-prefix.json --only prefix` (commit per row). "
           "The prefix rows are the chain fast_decode (tune off) → feature_cache prefix on the 10-questions "
           "workload (4 samples), so `× previous` is prefix reuse against fast_decode alone; `× baseline` is "
           "against HF eager.", "",
           "| model | pass | run | commit | stages 1–3 ms | prefill ms (base → previous → pass) | stage 4 ms (base → previous → pass) | × baseline | × previous | context into layers ≥ k | peak MB | top-1 | KL | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("eventgpt", "videollava"):
        for pattern, key, note in ADDED:
            path = folder / "raw" / pattern.format(model=model)
            if not path.exists():
                continue
            for r in json.loads(path.read_text())["rows"]:
                cfg = r["config"]
                if (cfg.get("method") or cfg.get("scope") or cfg["type"]) != key:
                    continue
                b, row, prev = r["baseline"], r["row"], r.get("previous")
                s0, s1 = b["stage4"], row["stage4"]
                sp = prev["stage4"] if prev else None
                pre = lambda st: sum(st[k]["median_ms"] for k in ("1", "2", "3"))  # noqa: E731
                fid = row.get("fidelity") or {}
                fv = s1["engine_info"].get("fastv") or {}
                ctx = (f"{fv['context']} → {fv['context_after_layer']} ({fv['visual_before']} → {fv['visual_after']} visual)"
                       if fv else f"{s1['context_tokens']} (prefix reused: {s1['engine_info'].get('prefix_reused')} rows)")
                mid = lambda k, f=".1f": f" → {format(sp[k], f)}" if sp else ""  # noqa: E731
                out.append(
                    f"| {model} | {row['pass']} {({k: v for k, v in cfg.items() if k != 'type'})} | `raw/{path.name}` | "
                    f"`{b['machine']['commit'][:7]}` | {pre(b['stages']):.1f} → {pre(row['stages']):.1f} | "
                    f"{s0['prefill_ms']:.1f}{mid('prefill_ms')} → {s1['prefill_ms']:.1f} "
                    f"[{s1['prefill_min_ms']:.1f}–{s1['prefill_max_ms']:.1f}] | "
                    f"{s0['stage4_ms']:.0f}{mid('stage4_ms', '.0f')} → {s1['stage4_ms']:.0f} | "
                    f"{_f(row.get('speedup_vs_baseline'), '.2f')} | {_f(row.get('speedup_vs_previous') if prev else None, '.2f')} | "
                    f"{ctx} | {s0['peak_mem_mb']:.0f} → {s1['peak_mem_mb']:.0f} | "
                    f"{_f(fid.get('top1_agreement'), '.3f')} | {_f(fid.get('mean_kl'), '.2e')} | {note} |")
    return [*out, ""]


def baseline(folder: Path) -> list[str]:
    data = json.loads((folder / "raw" / "compare.json").read_text())
    m = data["results"][0]["machine"]
    out = [f"# HF `generate()` baseline, `7b` presets, bf16 ({m['gpu']}, driver {m['driver']}, torch {m['torch']}, "
           f"transformers {m['transformers']})", "", f"Commit `{m['commit']}`. Command:", "",
           "```", "vlopt bench --compare --preset 7b --device cuda --samples 3 --warmup 2 --json raw/compare.json", "```", "",
           "| model | workload | context | stage-4 s | share of stages 1–4 | tokens | tok/s (stage 4) | prefill ms | decode tok/s | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["compare"]:
        out.append(f"| {r['model']} | {r['workload']} | {r['context']} | {r['stage4_s']:.3f} | {r['share']:.1%} | "
                   f"{r['tokens']:.0f} | {r['tok_s']:.1f} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | {r['ratio']:.2f} |")
    out += ["", "This plain-transformers path is launch-bound (one Python-driven forward per token), so it varies "
            "between processes on the same machine: the EventGPT decode rate of the `hf_eager` rows in "
            "`raw/eventgpt.json`, `raw/eventgpt-int4.json` and `raw/compare-first-run.json` (an earlier commit, "
            "the first process on a fresh machine) and of this table spans 19.8–42.2 tok/s. Ratios in vlopt reports are always "
            "measured in one process against a baseline measured in that process.", ""]
    return out


def main(folder: Path) -> None:
    (folder / "baseline.md").write_text("\n".join(baseline(folder)))
    head = ["# Each pass alone on the `7b` models (H100)", "",
            "Command, per model, on the lent GPU after `bench/gpu/setup.sh`: "
            "`python3 bench/gpu/passes.py MODEL raw/passes-MODEL.json`. Each row: a fresh bf16 model, the "
            "HF-eager baseline and the pass measured by the real manager in one process (2 samples after 1 "
            "warm-up, fixed 45/90-token budget unless marked natural length).", "",
            "How to read it — plainly:",
            "- The baseline is transformers' launch-bound eager `generate()`; its stage-4 time moves by up to "
            "±30 % between rows of the same run (compare the baseline column). A × baseline within that band "
            "is noise, not a speedup. The speed passes are in `stage4.md` (fast_decode, int8/int4 torchao).",
            "- bitsandbytes is a memory pass: LLM.int8 is ~4× *slower* at batch 1, NF4 about as slow as bf16 "
            "eager, while peak memory falls from ~14 GB to 8 GB (int8) and ~5–6 GB (NF4).",
            "- prune_visual shortens the prompt (Video-LLaVA 2075 → 539 tokens) and halves prefill; decode "
            "is unchanged, as the roofline predicts (visual KV is a few % of the bytes per step).",
            "- feature_cache removes stages 1–3 on a repeated clip (the stages column); stage 4 is unchanged.",
            "- prune_visual fastv (section at the end) keeps a quarter of the visual rows from layer 2 on (Video-LLaVA: "
            "2075 → 533 rows for layers 2–31; EventGPT 641 → 205). On Video-LLaVA prefill fell 68 → 43 ms. On EventGPT it "
            "did not (2 samples, 37.6–98.3 ms against 32.6–47.6 ms): at 641 rows the ranking and slicing cost about what "
            "the shorter layers save. Stage-4 ratios of 1.25 and 1.52 are inside the eager baseline's noise band.",
            "- feature_cache prefix (section at the end) reuses the shared prompt's KV in fast_decode: Video-LLaVA "
            "prefill 61.0 → 21.7 ms per question (× 1.07 stage 4). EventGPT got *slower*, 22.3 → 30.3 ms: the remaining "
            "~12 rows run through the eager, launch-bound prefill, which costs about what a full 641-row prefill does. "
            "Measured cold (new prompt lengths), the first prefill of each new length took up to 1.1 s, so "
            "multi-question workloads now warm up every question before timing.",
            "- layer_skip is lossless (KL 0, same tokens) but random-weight early layers rarely agree with the "
            "full model (acceptance 0 % EventGPT, 21 % Video-LLaVA with 8 of 32 layers), so it cannot pay on "
            "presets; it is meant for checkpoints trained with early-exit losses.",
            "- early_stop never fires on random weights (P(EOS) ≈ 1/32000, no sentence ends): 0 tokens saved.",
            "- attention `flash`: flash-attn is not installed on the GPU image, so it ran PyTorch SDPA "
            "restricted to its flash kernel (recorded per row).",
            "- Lossy rows on random weights show low top-1 agreement because logits are near-tied; read KL.", ""]
    (folder / "passes.md").write_text("\n".join(head + passes(folder) + added(folder)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

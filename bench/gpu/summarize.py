"""Rewrite the generated tables of a GPU results folder from its run index.

Usage: python bench/gpu/summarize.py RESULTS_DIR

RESULTS_DIR/runs.yaml lists every run (raw file, kind, command, note, and the commit where the
file's own record is wrong). Each markdown file in RESULTS_DIR may hold blocks

    <!-- generated: KIND MODEL -->  …  <!-- end generated -->

which are replaced by the table of every run of that kind and model, in index order (KIND: suite,
passes, compare, batch or compile; MODEL may be `all`). Everything outside the blocks is written by hand.
`summary.json` takes each suite recipe from the first (newest) run that has it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

BLOCK = re.compile(r"(<!-- generated: (\w+) ([\w-]+) -->\n).*?(<!-- end generated -->)", re.S)


def _f(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def _stages_1_3(stages: dict) -> float:
    return sum(stages[k]["median_ms"] for k in ("1", "2", "3"))


class Run:
    def __init__(self, folder: Path, entry: dict):
        self.file, self.kind = entry["file"], entry["kind"]
        self.command, self.note = entry["command"], entry.get("note", "")
        self.only = entry.get("only")
        text = (folder / "raw" / self.file).read_text()
        if self.file.endswith(".jsonl"):     # first_answer.py's rows, one process each
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            self.data = {"model": rows[0]["model"], "rows": rows}
        else:
            self.data = json.loads(text)
        self.commit = entry.get("commit")

    @property
    def model(self) -> str:
        if self.kind == "compare":
            return "all"
        return self.data["model"]

    def header(self, machine: dict) -> list[str]:
        commit = self.commit or machine.get("commit")
        return [f"Run `raw/{self.file}` · commit `{commit}` · `{self.command}`" + (f" · {self.note}" if self.note else ""), ""]


def suite_table(run: Run) -> tuple[list[str], list[dict]]:
    """One suite run's table (ratios against that run's own baselines) and its summary entries."""
    rows = {r["name"]: r for r in run.data["rows"]}
    base = rows["hf_eager"]["bench"]
    eager = base["stage4"]["stage4_ms"]
    static = rows.get("hf_static_compile", {}).get("bench", {}).get("stage4", {}).get("stage4_ms")
    commit = run.commit or base["machine"].get("commit")
    lines = [f"### {run.model} — workload `{base['workload']['name']}`, {base['stage4']['context_tokens']} context, "
             f"{base['stage4']['new_tokens']:.0f} new tokens", "", *run.header(base["machine"]),
             "| recipe | stage 4 ms | prefill ms | decode tok/s | GB/s | peak MB | × HF eager | × HF static+compile | top-1 | KL | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    entries = []
    for name, r in rows.items():
        s4 = r["bench"]["stage4"]
        fid = r.get("fidelity") or {"top1_agreement": 1.0, "mean_kl": 0.0}
        entry = {"workload": run.model, "recipe": name, "passes": r["passes"], "lossless": r["lossless"],
                 "decode_tokens_per_s": s4["tokens_per_s"], "stage4_ms": s4["stage4_ms"],
                 "prefill_ms": s4["prefill_ms"], "gb_per_s": s4["gb_per_s"], "peak_mem_mb": s4["peak_mem_mb"],
                 "speedup_vs_hf_eager": eager / s4["stage4_ms"],
                 "speedup_vs_hf_static_compile": static / s4["stage4_ms"] if static else None,
                 "top1_agreement": fid["top1_agreement"], "mean_kl": fid["mean_kl"],
                 "first_divergence": fid.get("first_divergence"),
                 "compile_s": s4["engine_info"].get("compile_s"), "run": run.file, "commit": commit}
        entries.append(entry)
        lines.append(f"| {name} | {s4['stage4_ms']:.1f} | {s4['prefill_ms']:.1f} | {s4['tokens_per_s']:.1f} | "
                     f"{s4['gb_per_s']:.0f} | {s4['peak_mem_mb']:.0f} | {entry['speedup_vs_hf_eager']:.2f} | "
                     f"{_f(entry['speedup_vs_hf_static_compile'], '.2f')} | {entry['top1_agreement']:.3f} | "
                     f"{entry['mean_kl']:.2e} | {_f(entry['compile_s'], '.0f')} |")
    return [*lines, ""], entries


def passes_table(run: Run) -> list[str]:
    """One passes.py run: each pass (the last of its chain) against the HF-eager baseline measured
    just before it, and against the pass before it in the chain."""
    from vlopt.rows import PassRow

    rows = run.data["rows"]
    lines = [*run.header(rows[0]["baseline"]["machine"]),
             "| pass | config | stages 1–3 ms (base → pass) | prefill ms (base → [previous →] pass) | stage 4 ms | × baseline | × previous | context | peak MB | top-1 | KL | engine info |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r["config"]
        if run.only and (cfg.get("method") or cfg.get("scope") or cfg["type"]) not in run.only:
            continue
        row = PassRow.from_dict(r["row"])
        prev = PassRow.from_dict(r["previous"]) if r.get("previous") else None
        s0, s1 = r["baseline"]["stage4"], row.stage4 or {}
        mid = lambda k, f=".1f": f" → {format(prev.stage4[k], f)}" if prev else ""  # noqa: E731
        fid = row.fidelity or {}
        info = s1.get("engine_info") or {}
        fastv = info.get("fastv")
        context = (f"{fastv['context']} → {fastv['context_after_layer']} in layers ≥ k" if fastv else
                   f"{s0['context_tokens']} → {s1.get('context_tokens')}")
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items() if k != "fastv"}
        lines.append(
            f"| {row.pass_type} | {({k: v for k, v in cfg.items() if k != 'type'})}"
            f"{' (natural length)' if r['benchmark'].get('natural') else ''} | "
            f"{_stages_1_3(r['baseline']['stages']):.1f} → {_stages_1_3(row.stages) if row.stages else float('nan'):.1f} | "
            f"{s0['prefill_ms']:.1f}{mid('prefill_ms')} → {_f(s1.get('prefill_ms'))} | "
            f"{s0['stage4_ms']:.0f}{mid('stage4_ms', '.0f')} → {_f(s1.get('stage4_ms'), '.0f')} | "
            f"{_f(row.speedup_vs_baseline, '.2f')} | {_f(row.speedup_vs_previous if prev else None, '.2f')} | {context} | "
            f"{s0['peak_mem_mb']:.0f} → {_f(s1.get('peak_mem_mb'), '.0f')} | {_f(fid.get('top1_agreement'), '.3f')} | "
            f"{_f(fid.get('mean_kl'), '.2e')} | {shown or (row.info or {}).get('kernel') or row.error or ''} |")
    return [*lines, ""]


def compare_table(run: Run) -> list[str]:
    """A `vlopt bench --compare` run: each row beside the original work's numbers for it (– where the
    original has none)."""
    lines = [*run.header(run.data["results"][0]["machine"]),
             "| row | workload | context (orig.) | context | stage-4 s (orig.) | stage-4 s | tokens (orig.) | tokens | "
             "tok/s (orig.) | tok/s (stage 4) | prefill ms | decode tok/s | share of stages 1–4 | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run.data["compare"]:
        lines.append(f"| {r.get('label', r['model'])} | {r['workload']} | {_f(r.get('seed_context'), 'd')} | {r['context']} | "
                     f"{_f(r.get('seed_stage4_s'), '.2f')} | {r['stage4_s']:.3f} | {_f(r.get('seed_tokens'))} | "
                     f"{r['tokens']:.0f} | {_f(r.get('seed_tok_s'))} | {r['tok_s']:.1f} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['share']:.1%} | {r['ratio']:.2f} |")
    return [*lines, ""]


def compile_table(run: Run) -> list[str]:
    """compile_times.sh's rows: per recipe, the process that compiled on an empty Inductor cache and the
    one after it on the same cache."""
    by_cache: dict[str, list[dict]] = {}
    for row in run.data["rows"]:
        by_cache.setdefault(row["cache_dir"], []).append(row)
    lines = run.header(run.data["rows"][0]["machine"]) + [
        "| recipe | process | launch → first answer s | model load s | compile s | other first-call s | steady stage 4 ms | steady decode tok/s |",
        "|---|---|---|---|---|---|---|---|"]
    for rows in by_cache.values():
        recipe = " + ".join(", ".join([p["type"], *(f"{k}={v}" for k, v in p.items() if k != "type")])
                            for p in rows[0]["passes"])
        for process, r in zip(("first (cold cache)", "second (same cache)"), rows):
            compile_s = r["first_engine_info"].get("compile_s") or 0.0
            lines.append(f"| {recipe} | {process} | {r['launch_to_first_answer_s']:.1f} | {r['load_s']:.1f} | "
                         f"{compile_s:.1f} | {r['first_answer_s'] - compile_s:.1f} | {r['steady_stage4_ms']:.1f} | "
                         f"{r['steady_tokens_per_s']:.1f} |")
    return lines + [""]


def batch_table(runs: list[Run]) -> list[str]:
    """Every batch.py run of one model merged into one table: per engine and batch size, aggregate
    decode tok/s and its ratios to batch 1 and to each HF engine at the same batch (the run each
    engine came from is named, since a ratio across runs is across processes)."""
    rows, where = {}, {}
    for run in runs:
        for engine, table in run.data["engines"].items():
            for r in table["rows"]:
                rows[(engine, r["batch"])] = r
                where[engine] = run.file
    lines = [*[h for run in runs for h in run.header(run.data["machine"])],
             "| engine | batch | decode tok/s (all rows) | × batch 1 | × HF eager | × HF static+compile | "
             "stage-4 tok/s | prefill ms | stage 4 per clip ms | batch latency ms | peak MB | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (engine, size), r in rows.items():
        tok = r["decode_tokens_per_s"]
        ratio = {hf: _f(tok / rows[(hf, size)]["decode_tokens_per_s"], ".2f") if (hf, size) in rows else "–"
                 for hf in ("hf_eager", "hf_static_compile")}
        one = rows.get((engine, 1))
        lines.append(f"| {engine} | {size} | {tok:.1f} | {_f(tok / one['decode_tokens_per_s'] if one else None, '.2f')} | "
                     f"{ratio['hf_eager']} | {ratio['hf_static_compile']} | {r['tokens_per_s']:.1f} | "
                     f"{r['prefill_ms']:.1f} | {r['stage4_per_clip_ms']:.1f} | {r['stage4_ms']:.1f} | "
                     f"{_f(r['peak_mem_mb'], '.0f')} | `{where[engine]}` |")
    return [*lines, ""]


def main(folder: Path) -> None:
    index = yaml.safe_load((folder / "runs.yaml").read_text())
    runs = [Run(folder, e) for e in index["runs"]]
    summary, taken = [], set()
    tables: dict[tuple[str, str], list[str]] = {}
    batches: dict[str, list[Run]] = {}
    for run in runs:
        if run.kind == "batch":
            batches.setdefault(run.model, []).append(run)
            continue
        if run.kind == "suite":
            lines, entries = suite_table(run)
            for e in entries:
                if (e["workload"], e["recipe"]) not in taken:
                    summary.append(e)
                    taken.add((e["workload"], e["recipe"]))
        else:
            lines = {"passes": passes_table, "compare": compare_table, "compile": compile_table}[run.kind](run)
        for key in {(run.kind, run.model), (run.kind, "all")}:
            tables.setdefault(key, []).extend(lines)
    for model, model_runs in batches.items():
        tables[("batch", model)] = batch_table(model_runs)
    suites = [r for r in runs if r.kind == "suite"]
    if suites:
        machine = dict(suites[0].data["rows"][0]["bench"]["machine"])
        machine["commit"] = suites[0].commit or machine.get("commit")     # the index's commit where the file's is wrong
        (folder / "summary.json").write_text(json.dumps({"machine": machine, "entries": summary}, indent=1))
    for md in sorted(folder.glob("*.md")):
        text = md.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + "\n".join(tables.get((m.group(2), m.group(3)), [])) + m.group(4), text)
        if new != text:
            md.write_text(new)
            print(f"rewrote {md}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(Path(sys.argv[1]))

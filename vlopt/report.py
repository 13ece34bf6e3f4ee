"""The three report files: JSON (the record), Markdown (for a person), PNG (stage-4 time per pass)."""

from __future__ import annotations

import json
from pathlib import Path

from vlopt.rows import PassRow, Quality


def _fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def markdown(report: dict) -> str:
    base = report["baseline"]
    s4 = base["stage4"] if base else None
    lines = [f"# vlopt report: {report['model']['label']}", "",
             f"Workload `{report['workload']}`, {report['benchmark']['samples']} samples after "
             f"{report['benchmark']['warmup']} warm-up, {'natural length' if report['benchmark']['natural'] else 'fixed token budget'}; "
             f"machine: {report['machine'].get('gpu') or 'CPU'} · torch {report['machine']['torch']} · "
             f"transformers {report['machine']['transformers']} · commit `{report['commit']}`.", "",
             *timing_lines(report),
             "| step | status | stage 4 ms | stages 1–3 ms | prefill ms | decode tok/s | GB/s | peak MB | × baseline (min–max) | × previous | top-1 | KL | diverges at | modules |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if s4:
        lines.append(f"| baseline | measured | {s4['stage4_ms']:.1f} | {_fmt(stages_1_to_3(base.get('stages')), '.1f')} "
                     f"| {s4['prefill_ms']:.1f} | {_fmt(s4['tokens_per_s'], '.1f')} "
                     f"| {_fmt(s4['gb_per_s'])} | {s4['peak_mem_mb']:.0f} | 1.00 | – | 1.000 | 0 | – | – |")
    rows = [PassRow.from_dict(r) for r in report["passes"]]
    for row in rows:
        st = row.stage4 or {}
        fid = row.fidelity or {}
        mods = f"{len(row.modules_touched)} touched, {len(row.modules_skipped)} skipped"
        lines.append(
            f"| {row.pass_type} | {row.status} | {_fmt(st.get('stage4_ms'), '.1f')} | {_fmt(stages_1_to_3(row.stages), '.1f')} "
            f"| {_fmt(st.get('prefill_ms'), '.1f')} "
            f"| {_fmt(st.get('tokens_per_s'), '.1f')} | {_fmt(st.get('gb_per_s'))} | {_fmt(st.get('peak_mem_mb'), '.0f')} "
            f"| {ratio_cell(row)} | {'–' if within_noise(row) else _fmt(row.speedup_vs_previous)} "
            f"| {_fmt(fid.get('top1_agreement'), '.3f')} | {_fmt(fid.get('mean_kl'), '.2e')} "
            f"| {_fmt(fid.get('first_divergence'), 'd', 'never')} | {mods} |")
    lines.append("")
    lines += quality_lines(report, rows)
    for row in rows:
        lines.append(f"- **{row.pass_type}** ({row.plugin} {row.plugin_version or ''}): {row.status}"
                     + (f" — {row.error}" if row.error else ""))
        for note in row.notes:
            lines.append(f"  - {note}")
        if row.modules_skipped:
            shown = ", ".join(row.modules_skipped[:6]) + (" …" if len(row.modules_skipped) > 6 else "")
            lines.append(f"  - left untouched: {shown}")
        if row.quality is not None and row.quality.not_measured:
            lines.append(f"  - quality: {row.quality.not_measured}")
        lines.append(f"  - in the checkpoint: {checkpoint_note(report, row)}")
    lines.append("")
    lines.append("Speedups are stage-4 time ratios measured in this run against the baseline model: each pass is "
                 "timed in alternating rounds with a second, unoptimized instance, and the ratio shown is the "
                 "median round's with the range of all rounds; a range at least as wide as the effect (or an "
                 "effect under 2 %) reads \"within noise\" instead of a speedup. "
                 "Fidelity is teacher-forced on the baseline's greedy output (top-1 agreement, mean "
                 "KL(baseline‖pass)) plus the first position where the pass's own greedy output departs.")
    return "\n".join(lines) + "\n" + batch_section(report)


def stages_1_to_3(stages: dict | None) -> float | None:
    """Median ms of stages 1–3 (load, preprocess, vision encode): what feature caching and pruning change."""
    if not stages or not all(s in stages for s in ("1", "2", "3")):
        return None
    return sum(stages[s]["median_ms"] for s in ("1", "2", "3"))


def within_noise(row: PassRow) -> bool:
    return bool(row.timing and row.timing.get("within_noise"))


def ratio_cell(row: PassRow) -> str:
    """× baseline with the spread of its rounds, or "within noise" when the spread is the effect's size."""
    t = row.timing
    if not t:
        return _fmt(row.speedup_vs_baseline)
    spread = f"({t['min']:.2f}–{t['max']:.2f})"
    return f"within noise {spread}" if t["within_noise"] else f"{row.speedup_vs_baseline:.2f} {spread}"


def timing_lines(report: dict) -> list[str]:
    """How the numbers were timed: threads, cores, machine load, and a warning when it was busy."""
    t = report.get("timing")
    if not t:
        return []
    load = ", ".join(f"{x:.1f}" for x in t["load_average"])
    lines = [f"Timing: {t['torch_threads']} torch threads ({t['threads_chosen_by']}), {t['cores']} cores, "
             f"load average {load}, calibration spin {t['spin_utilization']:.0%} of a core.", ""]
    if t.get("warning"):
        lines += [f"**Warning:** {t['warning']}.", ""]
    return lines


def checkpoint_note(report: dict, row: PassRow) -> str:
    if not row.applied:
        return "no (the pass did not apply)"
    if report.get("weights_saved") is False:
        return "no weights saved (report only)"
    return "saved weights" if row.saved_as == "weights" else "re-applied from the recipe on load"


def _cell(text: str) -> str:
    """Text for a table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def quality_lines(report: dict, rows: list[PassRow]) -> list[str]:
    """The answer-quality table: accuracy on the held-out scenes, agreement with the baseline's
    answers, and one question with its answer before and after the pass (one where they differ,
    if any). On random weights every row says that quality is not measurable."""
    base = (report.get("baseline") or {}).get("quality")
    steps = [("baseline", Quality.from_dict(base) if base else None)] + [(r.pass_type, r.quality) for r in rows]
    if all(q is None for _, q in steps):
        return []
    first = next((q for _, q in steps if q is not None and q.scenes), None)
    lines = ["Answer quality" + (f" on {first.scenes} held-out scenes (seed {first.seed}), one question each, "
                                 "greedy at natural length; agreement: the same answer as the baseline's." if first else ":"),
             "", "| step | accuracy | agreement | example question | expected | before | after |",
             "|---|---|---|---|---|---|---|"]
    for name, q in steps:
        if q is None:
            lines.append(f"| {name} | – | – | | | | |")
        elif q.not_measured:
            lines.append(f"| {name} | {q.not_measured} | – | | | | |")
        else:
            ex = q.example or {}
            lines.append(f"| {name} | {_fmt(q.task_accuracy, '.1%')} | {_fmt(q.answer_agreement, '.1%')} "
                         f"| {_cell(ex.get('question', ''))} | {_cell(ex.get('expected', ''))} "
                         f"| {_cell(ex.get('before', ''))} | {_cell(ex.get('after', ''))} |")
    return lines + [""]


def batch_section(report: dict) -> str:
    """The throughput-vs-batch tables, when the recipe asked for them (else nothing)."""
    if not report.get("batch"):
        return ""
    from vlopt import bench_batch
    return "\n" + bench_batch.markdown(report["batch"])


# Bar colours by what a row's ratio says (a slowdown must not look like a speedup).
COLOURS = {"baseline": "#888888", "speedup": "#2e9e5b", "slowdown": "#d1495b", "noise": "#9fb3c8",
           "failed": "#d1495b"}


def chart_bars(report: dict) -> list[dict]:
    """What the chart draws, one bar per step: label, stage-4 ms, stages 1–3 ms (stacked on top),
    kind (baseline | speedup | slowdown | noise | failed), its colour and the text above it."""
    bars = []
    if report["baseline"]:
        base = report["baseline"]
        bars.append({"label": "baseline", "stage4_ms": base["stage4"]["stage4_ms"],
                     "stages_1_3_ms": stages_1_to_3(base.get("stages")), "kind": "baseline", "text": "1.00×"})
    for row in map(PassRow.from_dict, report["passes"]):
        if not row.stage4:
            bars.append({"label": row.pass_type, "stage4_ms": 0.0, "stages_1_3_ms": None, "kind": "failed",
                         "text": row.status.upper()})
            continue
        t, ratio = row.timing, row.speedup_vs_baseline
        kind = "noise" if within_noise(row) else ("speedup" if ratio >= 1 else "slowdown")
        spread = f"\n{t['min']:.2f}–{t['max']:.2f}" if t else ""
        bars.append({"label": row.pass_type, "stage4_ms": row.stage4["stage4_ms"],
                     "stages_1_3_ms": stages_1_to_3(row.stages), "kind": kind,
                     "text": ("noise" if kind == "noise" else f"{ratio:.2f}×") + spread})
    for bar in bars:
        bar["colour"] = COLOURS[bar["kind"]]
    return bars


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = chart_bars(report)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(bars) + 3), 3.8), dpi=100)
    x = range(len(bars))
    stage4 = [b["stage4_ms"] for b in bars]
    ax.bar(x, stage4, color=[b["colour"] for b in bars])
    front = [b["stages_1_3_ms"] or 0.0 for b in bars]
    if any(front):
        ax.bar(x, front, bottom=stage4, color="#dddddd", edgecolor="#999999", hatch="//")
    for i, b in enumerate(bars):
        ax.text(i, stage4[i] + front[i], b["text"], ha="center", va="bottom", fontsize=8,
                color=COLOURS["failed"] if b["kind"] == "failed" else "black")
    ax.set_xticks(list(x), [b["label"] for b in bars], rotation=20, ha="right")
    ax.set_ylabel("time (ms)")
    kinds = [k for k in ("speedup", "slowdown", "noise", "failed") if any(b["kind"] == k for b in bars)]
    legend = [Patch(color=COLOURS[k], label={"speedup": "stage 4, faster", "slowdown": "stage 4, slower",
                                              "noise": "stage 4, within noise", "failed": "failed"}[k]) for k in kinds]
    if any(front):
        legend.append(Patch(facecolor="#dddddd", edgecolor="#999999", hatch="//", label="stages 1–3"))
    if legend:
        ax.legend(handles=legend, fontsize=7, loc="upper right")
    ax.set_title(f"{report['model']['label']} · {report['workload']}")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})   # no timestamps: same data, same bytes
    plt.close(fig)


def write(report: dict, folder: Path) -> None:
    (folder / "vlopt_report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "vlopt_report.md").write_text(markdown(report))
    chart(report, folder / "vlopt_report.png")
    if report.get("batch"):                     # the recipe asked for batch sizes (benchmark.batch)
        from vlopt import bench_batch
        bench_batch.chart(report["batch"], folder / "vlopt_report_batch.png", title=report["model"]["label"])

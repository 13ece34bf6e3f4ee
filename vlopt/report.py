"""The three report files: JSON (the record), Markdown (for a person), PNG (stage-4 time per pass)."""

from __future__ import annotations

import json
from pathlib import Path

from vlopt.rows import PassRow


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
             "| step | status | stage 4 ms | prefill ms | decode tok/s | GB/s | peak MB | × baseline | × previous | top-1 | KL | diverges at | modules |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if s4:
        lines.append(f"| baseline | measured | {s4['stage4_ms']:.1f} | {s4['prefill_ms']:.1f} | {_fmt(s4['tokens_per_s'], '.1f')} "
                     f"| {_fmt(s4['gb_per_s'])} | {s4['peak_mem_mb']:.0f} | 1.00 | – | 1.000 | 0 | – | – |")
    rows = [PassRow.from_dict(r) for r in report["passes"]]
    for row in rows:
        st = row.stage4 or {}
        fid = row.fidelity or {}
        mods = f"{len(row.modules_touched)} touched, {len(row.modules_skipped)} skipped"
        lines.append(
            f"| {row.pass_type} | {row.status} | {_fmt(st.get('stage4_ms'), '.1f')} | {_fmt(st.get('prefill_ms'), '.1f')} "
            f"| {_fmt(st.get('tokens_per_s'), '.1f')} | {_fmt(st.get('gb_per_s'))} | {_fmt(st.get('peak_mem_mb'), '.0f')} "
            f"| {_fmt(row.speedup_vs_baseline)} | {_fmt(row.speedup_vs_previous)} "
            f"| {_fmt(fid.get('top1_agreement'), '.3f')} | {_fmt(fid.get('mean_kl'), '.2e')} "
            f"| {_fmt(fid.get('first_divergence'), 'd', 'never')} | {mods} |")
    lines.append("")
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
        lines.append(f"  - in the checkpoint: {'saved weights' if row.saved_as == 'weights' else 're-applied from the recipe on load'}")
    lines.append("")
    lines.append("Speedups are stage-4 time ratios measured in this run against the baseline model. "
                 "Fidelity is teacher-forced on the baseline's greedy output (top-1 agreement, mean "
                 "KL(baseline‖pass)) plus the first position where the pass's own greedy output departs.")
    return "\n".join(lines) + "\n" + batch_section(report)


def batch_section(report: dict) -> str:
    """The throughput-vs-batch tables, when the recipe asked for them (else nothing)."""
    if not report.get("batch"):
        return ""
    from vlopt import bench_batch
    return "\n" + bench_batch.markdown(report["batch"])


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, texts = [], [], []
    if report["baseline"]:
        labels.append("baseline")
        values.append(report["baseline"]["stage4"]["stage4_ms"])
        texts.append("1.00×")
    for row in map(PassRow.from_dict, report["passes"]):
        if row.stage4:
            labels.append(row.pass_type)
            values.append(row.stage4["stage4_ms"])
            texts.append(f"{row.speedup_vs_baseline:.2f}×")
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels) + 2), 3.5), dpi=100)
    bars = ax.bar(range(len(values)), values, color=["#888"] + ["#3a7"] * (len(values) - 1))
    for bar, text in zip(bars, texts):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("stage-4 time (ms)")
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

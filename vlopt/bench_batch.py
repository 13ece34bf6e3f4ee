"""Throughput against batch size: stage 4 of B prompts at once through `vlm.decoding.generate_batch`.

Per batch size: aggregate tokens/s (all rows' new tokens over the batch's stage-4 time, prefill
included, and over its decode time alone), the latency every request of the batch sees (the batch's
stage-4 time), stage 4 per clip (that time over B), peak memory (CUDA: `max_memory_allocated`; on
the CPU there is no per-run figure: n/a) and each size's throughput as a ratio to batch 1's.
Stages 1–3 run once per distinct question, outside timing: the rows of a batch are that clip with
the workload's questions in turn (the same prompt repeated for one-question workloads), so only
stage 4 is measured.
"""

from __future__ import annotations

import statistics

from vlopt.errors import VloptError
from vlopt.models import Workload
from vlopt.stage4 import Stopwatch


def parse_batch_sizes(text: str) -> list[int]:
    """`--batch 1,4,16,32` → [1, 4, 16, 32]; anything else is a one-line error saying what to write."""
    from vlopt.recipe import check_batch_sizes

    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise VloptError(f"--batch takes batch sizes separated by commas, e.g. --batch 1,4,16,32 (got '{text}')")
    try:
        return check_batch_sizes([int(p) for p in parts])
    except ValueError as err:
        raise VloptError(f"--batch: {err}") from None


def _peak(device) -> tuple[float | None, str]:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return None, "n/a on CPU (no per-run peak)"


def batch_table(vlm, workload: Workload, *, batches: list[int], samples: int = 3, warmup: int = 1,
                new_tokens: int | None = None, fixed: bool = True, input_path: str | None = None,
                questions: list[str] | None = None) -> dict:
    """Measure stage 4 at each batch size in `batches` (warm-up runs untimed, the median of
    `samples`); return the table as JSON."""
    import torch

    from vlopt.models.tokenizer import DEFAULT_QUESTION, QUESTIONS

    new_tokens = new_tokens or workload.new_tokens
    questions = questions or (QUESTIONS[: workload.questions] if workload.questions > 1 else [DEFAULT_QUESTION])
    prompts = {q: vlm.run_stages(input_path, workload, q) for q in dict.fromkeys(questions)}
    rows = []
    for size in batches:
        inputs = [prompts[questions[i % len(questions)]] for i in range(size)]
        for _ in range(warmup):
            vlm.decoding.generate_batch(inputs, new_tokens=new_tokens, fixed=fixed)
        if torch.device(vlm.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(vlm.device)
        runs = []
        for _ in range(samples):
            watch = Stopwatch(vlm.device)
            with watch.phase("4"):
                results = vlm.decoding.generate_batch(inputs, new_tokens=new_tokens, fixed=fixed)
            runs.append((watch.seconds["4"], results))
        peak_mb, peak_kind = _peak(vlm.device)
        stage4 = statistics.median(t for t, _ in runs)
        tokens = statistics.median(sum(len(r.tokens) for r in results) for _, results in runs)
        # A batched engine reports the batch's times on every row; row by row, each row its own.
        decode = statistics.median(_decode_s(results) for _, results in runs)
        steps = statistics.median(sum(max(0, len(r.tokens) - 1) for r in results) for _, results in runs)
        info = runs[-1][1][0].info
        rows.append({"batch": size, "stage4_ms": stage4 * 1e3, "stage4_per_clip_ms": stage4 * 1e3 / size,
                     "prefill_ms": statistics.median(_prefill_s(results) for _, results in runs) * 1e3,
                     "new_tokens": tokens, "tokens_per_s": tokens / stage4 if stage4 > 0 else None,
                     "decode_tokens_per_s": steps / decode if decode > 0 else None,
                     "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
                     "one_pass": info.get("batch", 1) == size, "unbatched_by": info.get("unbatched_by")})
    base = next((r["tokens_per_s"] for r in rows if r["batch"] == 1), None)
    for r in rows:
        r["vs_batch_1"] = r["tokens_per_s"] / base if base and r["tokens_per_s"] else None
    return {"workload": workload.name, "engine": vlm.decoding.name, "new_tokens": new_tokens, "fixed_budget": fixed,
            "samples": samples, "warmup": warmup, "context_tokens": [p.context_tokens for p in prompts.values()],
            "rows": rows}


def _one_pass(results) -> bool:
    return results[0].info.get("batch") == len(results) > 1


def _decode_s(results) -> float:
    return results[0].decode_s if _one_pass(results) else sum(r.decode_s for r in results)


def _prefill_s(results) -> float:
    return results[0].prefill_s if _one_pass(results) else sum(r.prefill_s for r in results)


COLUMNS = [("batch", "batch", "d"), ("tokens_per_s", "tok/s (stage 4)", ".1f"),
           ("decode_tokens_per_s", "decode tok/s", ".1f"), ("vs_batch_1", "× batch 1", ".2f"),
           ("stage4_ms", "latency ms (batch stage 4)", ".1f"), ("stage4_per_clip_ms", "stage 4 per clip ms", ".1f"),
           ("peak_mem_mb", "peak MB", ".0f")]


def markdown(tables: dict[str, dict]) -> str:
    """One table per measured model (`{"baseline": table, "optimized": table}`)."""
    lines = ["## Throughput vs batch size", ""]
    for label, table in tables.items():
        lines += [f"**{label}** (`{table['engine']}`, {table['new_tokens']} tokens per row, "
                  f"{'fixed budget' if table['fixed_budget'] else 'natural length'}):", "",
                  "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in table["rows"]:
            cells = ["n/a" if r.get(k) is None else format(r[k], f) for k, _, f in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |" + ("" if r["one_pass"] or r["batch"] == 1 else
                                                           " (row by row)"))
        lines.append("")
    return "\n".join(lines) + "\n"


def chart(tables: dict[str, dict], path, title: str = "") -> None:
    """Aggregate stage-4 tokens/s against batch size, one line per measured model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for label, table in tables.items():
        xs = [r["batch"] for r in table["rows"]]
        ys = [r["tokens_per_s"] or 0.0 for r in table["rows"]]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch"] for table in tables.values() for r in table["rows"]})
    ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("aggregate tokens/s (stage 4)")
    ax.set_title(title or "throughput vs batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})   # no timestamps: same data, same bytes
    plt.close(fig)

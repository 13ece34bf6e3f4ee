"""The stage-4 benchmark: the same measurement before and after every pass.

Method (DESIGN §3): warm-up runs excluded; the device synchronized around every timed region; a fixed
token budget (EOS ignored) for speed comparisons, or natural length for passes that change output
length; the median over samples with min and max; prefill, decode ms/token, tokens/s, achieved GB/s
and peak memory reported apart.
"""

from __future__ import annotations

import statistics

import torch

from vlopt.models import Workload
from vlopt.models.tokenizer import DEFAULT_QUESTION
from vlopt.stage4 import Stopwatch


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really occupies, looking inside quantized tensor subclasses (torchao)."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(tensor_bytes(getattr(data, n)) for n in names)
    return data.numel() * data.element_size()


def decode_step_bytes(vlm, context: int) -> int:
    """Bytes one decode step must read: decoder weights (parameters, and buffers, where a weight pass
    keeps its codes), final norm, lm_head, and the KV cache at `context` tokens (the embedding table
    contributes one row, ignored)."""
    tm = vlm.text_model
    weights = sum(tensor_bytes(p) for p in (*tm.layers.parameters(), *tm.layers.buffers(), *tm.norm.parameters()))
    weights += sum(tensor_bytes(p) for p in vlm.lm_head.parameters())
    cfg = tm.config
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * vlm.dtype.itemsize * context
    return weights + kv


def _peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> tuple[float, str]:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _spread(values: list[float]) -> dict:
    return {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3, "max_ms": max(values) * 1e3}


def run_sample(vlm, workload: Workload, *, input_path: str | None, new_tokens: int, fixed: bool,
               question: str = DEFAULT_QUESTION) -> dict:
    """One pass through stages 1–4 with every stage timed after a device sync."""
    watch = Stopwatch(vlm.device)
    inp = vlm.run_stages(input_path, workload, question, watch.phase)
    with watch.phase("4"):
        result = vlm.stage4(inp, new_tokens=new_tokens, fixed=fixed)
    times = {stage: watch.seconds[stage] for stage in ("1", "2", "3", "4")}
    return {"times": times, "result": result, "context_tokens": inp.context_tokens,
            "visual_tokens": inp.visual_tokens}


def benchmark(vlm, workload: Workload, *, samples: int = 3, warmup: int = 1, new_tokens: int | None = None,
              fixed: bool = True, input_path: str | None = None, questions: list[str] | None = None) -> dict:
    """Run `warmup` untimed and `samples` timed passes of stages 1–4; return the benchmark JSON."""
    from vlopt.machine import machine_info

    new_tokens = new_tokens or workload.new_tokens
    if questions is None and workload.questions > 1:
        from vlopt.models.tokenizer import QUESTIONS
        questions = QUESTIONS[: workload.questions]
    questions = questions or [DEFAULT_QUESTION]
    if len(questions) > 1:
        # Every question once before timing: each prompt length is a new shape, and on the H100 a
        # shape's first prefill cost up to ~1 s (bench/results/h100/passes.md), which is warm-up.
        warmup = max(warmup, len(questions))
    for i in range(warmup):
        run_sample(vlm, workload, input_path=input_path, new_tokens=new_tokens, fixed=fixed,
                   question=questions[i % len(questions)])
    _peak_reset(vlm.device)
    runs = [run_sample(vlm, workload, input_path=input_path, new_tokens=new_tokens, fixed=fixed,
                       question=questions[(warmup + i) % len(questions)]) for i in range(samples)]
    peak_mb, peak_kind = _peak_mb(vlm.device)

    prefill = [r["result"].prefill_s for r in runs]
    generated = [len(r["result"].tokens) for r in runs]
    per_token = [r["result"].decode_s / max(1, n - 1) for r, n in zip(runs, generated)]
    context = runs[0]["context_tokens"]
    mean_ctx = context + statistics.median(generated) / 2
    step_ms = statistics.median(per_token) * 1e3
    stages = {s: _spread([r["times"][s] for r in runs]) for s in ("1", "2", "3", "4")}
    total = sum(stages[s]["median_ms"] for s in stages)
    stage4 = {
        "context_tokens": context,
        "visual_tokens": runs[0]["visual_tokens"],
        "new_tokens": statistics.median(generated),
        "fixed_budget": fixed,
        "prefill_ms": statistics.median(prefill) * 1e3,
        "prefill_min_ms": min(prefill) * 1e3, "prefill_max_ms": max(prefill) * 1e3,
        "decode_ms_per_token": step_ms,
        "decode_min_ms_per_token": min(per_token) * 1e3, "decode_max_ms_per_token": max(per_token) * 1e3,
        "tokens_per_s": 1e3 / step_ms if step_ms > 0 else None,
        "gb_per_s": decode_step_bytes(vlm, int(mean_ctx)) / (step_ms / 1e3) / 1e9 if step_ms > 0 else None,
        "stage4_ms": stages["4"]["median_ms"],
        "share_of_total": stages["4"]["median_ms"] / total if total else None,
        "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
        "engine": vlm.decoding.name,
        "engine_info": runs[-1]["result"].info,
    }
    return {
        "model": {"name": vlm.name, **{k: v for k, v in vlm.source.items() if k != "allow_pickle"},
                  "dtype": str(vlm.dtype).removeprefix("torch."), "device": str(vlm.device)},
        "workload": {"name": workload.name, "frames": workload.frames, "input": workload.input_kind,
                     "new_tokens": new_tokens, "samples": samples, "warmup": warmup,
                     "input_path": input_path},
        "machine": machine_info(),
        "stages": stages,
        "stage4": stage4,
    }


def compare_table(results: list[dict]) -> list[dict]:
    """The seed's side-by-side table: stage-4 time, its share of stages 1–4, tokens, tok/s, and each
    model's stage-4 time as a ratio to the first row's."""
    rows, ref = [], None
    for r in results:
        s4 = r["stage4"]
        ref = ref or s4["stage4_ms"]
        rows.append({"model": r["model"]["name"], "workload": r["workload"]["name"],
                     "context": s4["context_tokens"], "stage4_s": s4["stage4_ms"] / 1e3,
                     "share": s4["share_of_total"], "tokens": s4["new_tokens"],
                     "tok_s": s4["new_tokens"] / (s4["stage4_ms"] / 1e3),
                     "decode_tok_s": s4["tokens_per_s"], "prefill_ms": s4["prefill_ms"],
                     "ratio": s4["stage4_ms"] / ref})
    return rows

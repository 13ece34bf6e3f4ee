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


def _peak_mb(device, exclude_mb: float = 0.0) -> tuple[float, str]:
    """Peak memory; on CUDA, less `exclude_mb` (what other models held on the device meanwhile)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - exclude_mb, "cuda_max_allocated"
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


def _questions(workload: Workload, questions: list[str] | None, warmup: int) -> tuple[list[str], int]:
    """The questions to cycle through and the warm-up count that covers each of them once."""
    if questions is None and workload.questions > 1:
        from vlopt.models.tokenizer import QUESTIONS
        questions = QUESTIONS[: workload.questions]
    questions = questions or [DEFAULT_QUESTION]
    if len(questions) > 1:
        # Every question once before timing: each prompt length is a new shape, and on the H100 a
        # shape's first prefill cost up to ~1 s (bench/results/h100/passes.md), which is warm-up.
        warmup = max(warmup, len(questions))
    return questions, warmup


def benchmark(vlm, workload: Workload, *, samples: int = 3, warmup: int = 1, new_tokens: int | None = None,
              fixed: bool = True, input_path: str | None = None, questions: list[str] | None = None) -> dict:
    """Run `warmup` untimed and `samples` timed passes of stages 1–4; return the benchmark JSON."""
    new_tokens = new_tokens or workload.new_tokens
    questions, warmup = _questions(workload, questions, warmup)
    for i in range(warmup):
        run_sample(vlm, workload, input_path=input_path, new_tokens=new_tokens, fixed=fixed,
                   question=questions[i % len(questions)])
    _peak_reset(vlm.device)
    runs = [run_sample(vlm, workload, input_path=input_path, new_tokens=new_tokens, fixed=fixed,
                       question=questions[(warmup + i) % len(questions)]) for i in range(samples)]
    peak = _peak_mb(vlm.device)
    return _summary(vlm, workload, runs, peak, new_tokens=new_tokens, fixed=fixed, samples=samples,
                    warmup=warmup, input_path=input_path)


def _summary(vlm, workload: Workload, runs: list[dict], peak: tuple[float, str], *, new_tokens: int, fixed: bool,
             samples: int, warmup: int, input_path: str | None) -> dict:
    """The benchmark JSON of one model from its timed samples."""
    from vlopt.machine import machine_info

    peak_mb, peak_kind = peak
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


# ---- interleaved measurement against an unoptimized reference --------------------------------------
# A ratio whose effect is under this is not told apart from noise on a CPU, whatever the spread.
NOISE_FLOOR = 0.02


def ratio_spread(ratios: list[float]) -> dict:
    """Spread of per-round speedups (reference time / model time). `within_noise`: the spread of
    the rounds is at least the effect (in log terms, max/min ≥ |median − 1|, so rounds disagree
    about the ratio by more than the ratio departs from 1), or the effect is under NOISE_FLOOR;
    a single round has no spread to judge by, so only the floor applies."""
    import math

    ordered = sorted(ratios)
    median = statistics.median(ordered)
    q1, q3 = (statistics.quantiles(ordered, n=4, method="inclusive")[::2] if len(ordered) > 1
              else (median, median))
    effect = abs(math.log(median))
    spread = math.log(ordered[-1] / ordered[0])
    return {"min": ordered[0], "q1": q1, "median": median, "q3": q3, "max": ordered[-1], "rounds": len(ordered),
            "within_noise": effect < math.log1p(NOISE_FLOOR) or (len(ordered) > 1 and spread >= effect)}


def interleaved(reference, vlm, workload: Workload, *, samples: int = 3, warmup: int = 1,
                new_tokens: int | None = None, fixed: bool = True, input_path: str | None = None,
                questions: list[str] | None = None) -> dict:
    """Time `vlm` and the unoptimized `reference` (a second instance of the same model) in
    alternating rounds — reference first in even rounds, `vlm` first in odd ones (ABBA) — so load
    on a shared machine falls on both sides alike. Returns `vlm`'s benchmark JSON with a
    `vs_reference` block: the reference's stage-4 median and the spread of the per-round ratios."""
    new_tokens = new_tokens or workload.new_tokens
    questions, warmup = _questions(workload, questions, warmup)
    common = dict(input_path=input_path, new_tokens=new_tokens, fixed=fixed)
    for i in range(warmup):
        for model in (reference, vlm):
            run_sample(model, workload, question=questions[i % len(questions)], **common)
    mine, theirs, peaks = [], [], []
    for i in range(samples):
        question = questions[(warmup + i) % len(questions)]
        for model in ((reference, vlm) if i % 2 == 0 else (vlm, reference)):
            if model is vlm:
                _peak_reset(vlm.device)
                mine.append(run_sample(vlm, workload, question=question, **common))
                # The reference's weights stay resident on the device; the rest of the peak is vlm's.
                peaks.append(_peak_mb(vlm.device, exclude_mb=_own_mb(reference)))
            else:
                theirs.append(run_sample(reference, workload, question=question, **common))
    peak = max(peaks, key=lambda p: p[0])
    result = _summary(vlm, workload, mine, peak, new_tokens=new_tokens, fixed=fixed, samples=samples,
                      warmup=warmup, input_path=input_path)
    ratios = [r["times"]["4"] / m["times"]["4"] for r, m in zip(theirs, mine)]
    result["vs_reference"] = {**ratio_spread(ratios),
                              "reference_stage4_ms": statistics.median(r["times"]["4"] for r in theirs) * 1e3,
                              "reference_stages": {s: _spread([r["times"][s] for r in theirs]) for s in ("1", "2", "3")},
                              "method": "alternating (ABBA) rounds against a second, unoptimized instance"}
    return result


def _own_mb(vlm) -> float:
    """MB of `vlm`'s own tensors on a CUDA device (0 on CPU, where peak memory is the process's)."""
    if torch.device(vlm.device).type != "cuda":
        return 0.0
    return sum(tensor_bytes(t) for t in (*vlm.hf.parameters(), *vlm.hf.buffers())) / 2**20


# ---- CPU threads and machine load -------------------------------------------------------------------
def spin_utilization(seconds: float = 0.05) -> float:
    """CPU time this thread got per second of wall time over a short busy loop: ~1.0 on an idle
    core, lower when other processes take turns on it."""
    import time

    wall0, cpu0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall0 < seconds:
        sum(range(1000))
    return (time.thread_time() - cpu0) / (time.perf_counter() - wall0)


def cpu_conditions(device, *, load: tuple[float, float, float] | None = None, cores: int | None = None,
                   spin: float | None = None, set_threads: bool = True) -> dict:
    """Choose torch's CPU thread count deliberately and record what timing ran under: threads, the
    cores this process may use, the load average and a calibration spin. Threads: OMP_NUM_THREADS
    or VLOPT_THREADS when set; else the cores not already busy (cores − 1-minute load, at least
    one), because threads beyond the free cores wait on other processes and multiply times.
    `warning` is one line when the machine is loaded. (`load`, `cores`, `spin`: given instead of
    measured.)"""
    import os

    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    load = load or (os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0))
    spin = spin_utilization() if spin is None else spin
    on_cpu = torch.device(device).type == "cpu"
    asked = os.environ.get("VLOPT_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if not on_cpu:
        threads, why = torch.get_num_threads(), "left as is (timing on the GPU)"
    elif asked and asked.isdigit() and int(asked) > 0:
        threads, why = int(asked), "VLOPT_THREADS" if os.environ.get("VLOPT_THREADS") else "OMP_NUM_THREADS"
    else:
        ranks = int(os.environ.get("WORLD_SIZE", "1"))     # torchrun's processes share the free cores
        threads = max(1, min(cores, cores - round(load[0])) // ranks)
        why = f"free cores: {cores} cores − load {load[0]:.1f}" + (f", shared by {ranks} ranks" if ranks > 1 else "")
    if on_cpu and set_threads:
        torch.set_num_threads(threads)
    busy = [f"load average {load[0]:.1f} on {cores} cores"] if load[0] > cores else []
    busy += [f"a calibration spin got {spin:.0%} of a core"] if spin < 0.75 else []
    warning = (f"the machine is busy ({'; '.join(busy)}): timings are noisy; read the spread (min–max) of each "
               "figure") if busy else None
    return {"device": str(device), "torch_threads": threads, "threads_chosen_by": why, "cores": cores,
            "load_average": [round(x, 2) for x in load], "spin_utilization": round(spin, 3), "warning": warning}


def compare_table(results: list[dict], seeds=None) -> list[dict]:
    """The seed's side-by-side table: stage-4 time, its share of stages 1–4, tokens, tok/s, and each
    model's stage-4 time as a ratio to the first row's; with `seeds` (one `SeedRow` per result) also
    the original work's numbers for the same row (None where it has none)."""
    rows, ref = [], None
    for i, r in enumerate(results):
        s4 = r["stage4"]
        ref = ref or s4["stage4_ms"]
        rows.append({"model": r["model"]["name"], "workload": r["workload"]["name"],
                     "context": s4["context_tokens"], "stage4_s": s4["stage4_ms"] / 1e3,
                     "share": s4["share_of_total"], "tokens": s4["new_tokens"],
                     "tok_s": s4["new_tokens"] / (s4["stage4_ms"] / 1e3),
                     "decode_tok_s": s4["tokens_per_s"], "prefill_ms": s4["prefill_ms"],
                     "ratio": s4["stage4_ms"] / ref})
        if seeds is not None:
            seed = seeds[i]
            rows[-1].update(label=seed.label, seed_context=seed.context_tokens, seed_stage4_s=seed.stage4_s,
                            seed_tokens=seed.new_tokens, seed_tok_s=seed.tokens_per_s, note=seed.note)
    return rows

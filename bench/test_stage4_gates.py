"""Stage-4 regression gates: every pass (and each shipped recipe's chain) on each workload.

The timed function runs stage 4 (or stages 1–4 for feature_cache) once, device synchronized inside.
pytest-benchmark times the optimized model with `benchmark.pedantic`; the baseline of the same model
is timed in the same process just before, and the ratio is gated against bench/minimums.yaml."""

from __future__ import annotations


import pytest

from gates import check_gate

CASES = [  # (gate name, pass chain, what is timed)
    ("fast_decode", [{"type": "fast_decode"}], "stage4"),
    ("feature_cache", [{"type": "feature_cache", "scope": "request"}], "stages"),
    ("int8", [{"type": "int8"}], "stage4"),
    ("int4", [{"type": "int4", "group_size": 32}], "stage4"),
    ("int8_bitsandbytes", [{"type": "llm_int8"}], "stage4"),
    ("int4_bitsandbytes", [{"type": "nf4", "compute_dtype": "float32"}], "stage4"),
    ("prune_visual", [{"type": "prune_visual", "keep": 0.5}], "stages"),
    ("prune_visual_fastv", [{"type": "prune_visual", "method": "fastv", "keep": 0.5}], "stage4"),
    ("layer_skip", [{"type": "layer_skip", "draft_layers": 2, "draft_tokens": 3}], "stage4"),
    ("early_stop", [{"type": "early_stop", "eos_threshold": 0.5}], "stage4"),
]
GPU_CASES = {"fast_decode", "feature_cache"}


def _model(model: str, gpu: bool):
    from vlopt.models import load_model
    return load_model(model, preset="7b" if gpu else "tiny-random", dtype="bfloat16" if gpu else "float32",
                      device="cuda" if gpu else "cpu")


def _apply(vlm, chain):
    from vlopt.plugins import get_registry
    for cfg in chain:
        get_registry().apply(vlm, cfg)


def measure(model, chain, what, *, gpu, rounds, benchmark=None, slow_down=None):
    """(baseline seconds, optimized seconds, extra info) for one gate. Two instances of the same
    seeded preset — one plain, one optimized — are timed in alternation, round by round, so load on
    the machine falls on both sides alike: the ratio holds where absolute times drift."""
    import statistics
    import time

    from vlopt.bench import decode_step_bytes
    from vlopt.stage4 import sync
    from vlopt.models import get_workload

    base_vlm, opt_vlm = _model(model, gpu), _model(model, gpu)
    _apply(opt_vlm, chain)
    if slow_down is not None:
        slow_down(opt_vlm)
    wl = get_workload(base_vlm.default_workload)
    tokens = wl.new_tokens if gpu else 16
    fixed = chain[0]["type"] != "early_stop"
    inputs = {id(v): v.run_stages(None, wl, "What is here?") for v in (base_vlm, opt_vlm)}

    def runner(vlm):
        def run():
            inp = vlm.run_stages(None, wl, "What is here?") if what == "stages" else inputs[id(vlm)]
            result = vlm.stage4(inp, new_tokens=tokens, fixed=fixed)
            sync(vlm.device)
            return result
        return run

    run_base, run_opt = runner(base_vlm), runner(opt_vlm)
    run_base(), run_opt()                 # compile / capture / fill caches outside the timing
    base_samples = []

    def time_baseline():                  # pedantic's untimed setup: one baseline round
        start = time.perf_counter()
        run_base()
        base_samples.append(time.perf_counter() - start)

    if benchmark is not None:
        result = benchmark.pedantic(run_opt, setup=time_baseline, rounds=rounds, iterations=1)
        optimized = benchmark.stats.stats.median
    else:
        opt_samples = []
        for _ in range(rounds):
            time_baseline()
            start = time.perf_counter()
            result = run_opt()
            opt_samples.append(time.perf_counter() - start)
        optimized = statistics.median(opt_samples)
    base = statistics.median(base_samples)
    per_token = result.decode_s / max(1, len(result.tokens) - 1)
    extra = {"pass_chain": [c["type"] for c in chain], "baseline_s": base, "optimized_s": optimized,
             "speedup": base / optimized, "tokens": len(result.tokens),
             "tokens_per_s": 1 / per_token if per_token else None, "ms_per_token": per_token * 1e3,
             "gb_per_s": decode_step_bytes(opt_vlm, 100) / per_token / 1e9 if per_token else None}
    return base, optimized, extra


def pytest_generate_tests(metafunc):
    # On the GPU only the passes with a 7b gate run (the others' 7b tables are in bench/results/h100).
    if "name" in metafunc.fixturenames:
        cases = [c for c in CASES if not metafunc.config.getoption("--gpu") or c[0] in GPU_CASES]
        metafunc.parametrize("name,chain,what", cases, ids=[c[0] for c in cases])


@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_stage4_gate(benchmark, bench_settings, model, name, chain, what):
    benchmark.group = f"{model}:{name}"
    base, optimized, extra = measure(model, chain, what, gpu=bench_settings["gpu"],
                                     rounds=bench_settings["rounds"], benchmark=benchmark)
    benchmark.extra_info.update(extra)
    check_gate(bench_settings["kind"], name, base / optimized)


def test_an_injected_slowdown_fails_the_gate(bench_settings):
    """The gate catches a regression: the same fast_decode pass with 20 ms added to every decode
    step (a fixture-style wrapper, no code change) falls under its minimum."""
    import time

    def slow_down(vlm):
        engine = vlm.decoding.engine
        build = engine.compile_step

        def slower_step(dec, pos):
            step = build(dec, pos)

            def slower(token, position):
                time.sleep(0.02)
                return step(token, position)
            return slower
        engine.compile_step = slower_step    # an instance attribute of this test's engine only

    base, optimized, _ = measure("eventgpt", [{"type": "fast_decode"}], "stage4", gpu=bench_settings["gpu"],
                                 rounds=3, slow_down=slow_down)
    with pytest.raises(AssertionError, match="below the gate"):
        check_gate(bench_settings["kind"], "fast_decode", base / optimized)
    # …and without the slowdown the same gate passes.
    base, optimized, _ = measure("eventgpt", [{"type": "fast_decode"}], "stage4", gpu=bench_settings["gpu"], rounds=3)
    check_gate(bench_settings["kind"], "fast_decode", base / optimized)

"""Per-pass quality tables on the trained tiny models (issue 15, item 5), CPU, float32.

    python bench/quality.py [--family eventgpt|videollava] [--scenes 100] [--seed 1] [--passes dtype,int8,...]
                            [--quick] [--out bench/results/cpu]

For each family (EventGPT on the scene's event stream, Video-LLaVA on its video), each pass alone —
and the quickstart recipe's chain — is applied to a fresh copy of the trained `tiny` preset through
the manager's own `apply_pass`: timed in alternating rounds against one unoptimized instance
(`vlopt.bench.interleaved`), fidelity (KL, top-1) against that instance's greedy output, then
answers to held-out scenes scored by `vlopt.evaluate.QualityRun` (accuracy, agreement with the
unoptimized answers). A lossless pass must give the unoptimized model's exact answer tokens on every
scene: the table says so per row, and the script exits 1 when one does not.

Writes quality.md, quality.json and prune_sweep.png (accuracy against kept visual tokens) under
--out, with the command, the commit, the machine, the threads and the load average.
--quick: 6 scenes, a handful of passes, 2 timing rounds, written under out/quality-quick.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLOPT_LOAD_PLUGINS", "")
# One thread: the 2 cores are shared with other work, and two OpenMP threads waiting on each other
# under load made answering ~20× slower than one (measured while writing this script).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("eventgpt", "videollava")
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
KEEPS = (0.75, 0.5, 0.25, 0.1)
CALIBRATION_SEED = 2        # layer_skip's draft depth is chosen on other scenes than the table's
DRAFT_TOKENS = 4            # layer_skip's default
DESCRIBE = "Describe the scene in one sentence."    # the task's longest answer (vlopt.scenes' grammar)
SPREAD = ("median", "min", "max", "rounds", "within_noise")


def rows_to_run(quickstart_passes: list[dict]) -> list[dict]:
    """Every row: a label, its kind (what --passes selects) and its passes. `natural`: timed at
    natural length (a pass that changes the answer's length), as recipes/early-exit.yaml does.
    layer_skip's draft_layers is filled in per family (`choose_draft_layers`); int4's group size too."""
    rows = [{"kind": "attention", "passes": [{"type": "attention", "implementation": "eager"}]},  # baseline is sdpa
            {"kind": "dtype", "passes": [{"type": "dtype", "dtype": "bfloat16"}]},
            {"kind": "int8", "passes": [{"type": "int8"}]},
            {"kind": "int4", "passes": [{"type": "int4"}]},
            {"kind": "llm_int8", "passes": [{"type": "llm_int8"}]},
            {"kind": "nf4", "passes": [{"type": "nf4", "compute_dtype": "float32"}]},
            {"kind": "fp4", "passes": [{"type": "fp4", "compute_dtype": "float32"}]}]
    for method in ("cls_attention", "fastv"):
        rows += [{"kind": "prune_visual", "passes": [{"type": "prune_visual", "method": method, "keep": keep}]}
                 for keep in KEEPS]
    rows += [{"kind": "early_stop", "natural": True, "passes": [{"type": "early_stop", "eos_threshold": t}]}
             for t in (0.5, 0.05, 0.01)]     # the default, then low enough to cut answers short
    rows += [{"kind": "layer_skip", "natural": True, "passes": [{"type": "layer_skip", "draft_tokens": DRAFT_TOKENS}]},
             {"kind": "feature_cache", "passes": [{"type": "feature_cache", "scope": "request"}]},
             # fast_decode as the pass defaults on CPU: the step compiled (no CUDA graph on CPU).
             {"kind": "fast_decode", "passes": [{"type": "fast_decode"}]},
             {"kind": "quickstart", "label": "quickstart chain", "passes": quickstart_passes}]
    for row in rows:
        row.setdefault("natural", False)
        row.setdefault("label", label_of(row["passes"]))
    return rows


QUICK_KINDS = ("dtype", "int8", "prune_visual", "early_stop", "layer_skip", "feature_cache", "quickstart")


def quick_rows(specs: list[dict]) -> list[dict]:
    """--quick: one point of each sweep (keep 0.5 per method, the default eos_threshold)."""
    def one_point(spec):
        cfg = spec["passes"][0]
        return cfg.get("keep", 0.5) == 0.5 and cfg.get("eos_threshold", 0.5) == 0.5
    return [s for s in specs if one_point(s)]


def label_of(passes: list[dict]) -> str:
    return " + ".join(" ".join([p["type"], *(f"{k}={v}" for k, v in p.items() if k != "type")]) for p in passes)


def int4_group_size(vlm) -> int:
    """The largest int4 group that divides the decoder's widths (the trained decoders are narrow)."""
    cfg = vlm.text_model.config
    return next(g for g in (256, 128, 64, 32) if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0)


def choose_draft_layers(vlm, workload, scenes_n: int) -> dict:
    """layer_skip's draft depth k for this model: the best expected tokens per unit of work,
    (1 + p + … + p^d) / (1 + d·k/L) — with p the chance that the first k layers' token is the full
    model's, a verify yields that many tokens, and costs d draft steps through k of L layers plus one
    full forward (Leviathan et al.'s estimate). p per exit comes from calibration scenes
    (`vlopt.train.draft_agreement`, another seed than the table's)."""
    from vlopt import scenes, train

    layers = len(vlm.text_model.layers)
    per_exit = train.draft_agreement(vlm, scenes.scenes(CALIBRATION_SEED, scenes_n, "eval"), workload=workload,
                                     draft_tokens=DRAFT_TOKENS)
    value = {k: sum(r["agreement"] ** i for i in range(DRAFT_TOKENS + 1)) / (1 + DRAFT_TOKENS * k / layers)
             for k, r in per_exit.items()}
    return {"draft_layers": max(value, key=value.get), "layers": layers, "scenes": scenes_n, "seed": CALIBRATION_SEED,
            "per_exit": {k: {**r, "expected_gain": value[k]} for k, r in per_exit.items()}}


@contextlib.contextmanager
def recording_answers(vlm):
    """The stage-4 results of every answer given inside the block — exact tokens for the lossless
    check, their count for early_stop, draft counts for layer_skip — by wrapping the model's
    `decoding.generate` for the block."""
    results = []
    generate = vlm.decoding.generate

    def recorded(inp, **kw):
        results.append(generate(inp, **kw))
        return results[-1]

    vlm.decoding.generate = recorded
    try:
        yield results
    finally:
        del vlm.decoding.generate


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_record(family: str) -> dict:
    """Which trained weights ran: the file's hash, and whether it is the committed one."""
    from vlopt.models import shipped

    file = shipped.folder(family) / "model.safetensors"
    rel = file.relative_to(ROOT).as_posix()
    committed = subprocess.run(["git", "log", "-1", "--format=%h", "--", rel], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", rel], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    return {"file": rel, "sha256": sha256(file), "committed_in": committed or None,
            "interim": not committed or bool(changed)}


class Family:
    """One family's shared state: the unoptimized instance every row is timed and scored against,
    its held-out answers, and its benchmark settings."""

    def __init__(self, family: str, a, folder: Path, say):
        from vlopt import fidelity, manager
        from vlopt.evaluate import QualityRun
        from vlopt.models import load_model

        self.name, self.a, self.folder, self.say = family, a, folder, say
        self.model = {"name": family, "preset": "tiny", "dtype": "float32", "device": "cpu"}
        self.reference_vlm = load_model(**self.model)
        self.workload = self.reference_vlm.workload()
        self.quality = QualityRun(self.reference_vlm, self.workload, scenes_n=a.scenes, seed=a.seed,
                                  new_tokens=a.answer_tokens)
        if self.quality.reason:
            raise SystemExit(f"{family}: {self.quality.reason}")
        # Timing runs on one held-out scene's file (what these models know), asked the benchmark's question.
        self.input_path = self.quality.qset.items[0].path
        say(f"[{family}] answering {a.scenes} held-out scenes unoptimized")
        with recording_answers(self.reference_vlm) as results:
            self.baseline_quality = self.quality.baseline(self.reference_vlm)
        self.baseline_tokens = [r.tokens for r in results]
        plan = self.plan([], natural=False)
        self.baseline = manager.measure(self.reference_vlm, self.workload, plan)
        self.reference = fidelity.reference(self.reference_vlm, self.workload, input_path=self.input_path,
                                            new_tokens=a.new_tokens)
        self.draft = choose_draft_layers(self.reference_vlm, self.workload, a.calibration_scenes)
        self.int4_group = int4_group_size(self.reference_vlm)

    def plan(self, passes: list[dict], *, natural: bool):
        """The manager's plan for a recipe of these passes on this family (the recipe is validated
        as a user's would be)."""
        import yaml

        from vlopt import manager
        from vlopt.recipe import load_recipe

        a = self.a
        recipe = {"model": self.model, "passes": passes,
                  "benchmark": {"samples": a.rounds, "warmup": 1, "new_tokens": a.new_tokens, "natural": natural,
                                "input": self.input_path, "quality_scenes": a.scenes, "quality_seed": a.seed,
                                "quality_tokens": a.answer_tokens}}
        path = self.folder / f"{self.name}-{len(list(self.folder.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        rec, configs = load_recipe(path)
        return manager.resolve(rec, configs, recipe_path=path, output=None)

    def run_row(self, spec: dict) -> dict:
        """Apply the row's passes in order to a fresh instance (each step a manager `apply_pass`),
        then answer the held-out scenes."""
        from vlopt import manager
        from vlopt.errors import VloptError
        from vlopt.models import load_model
        from vlopt.passes import PassContext

        passes = [dict(p) for p in spec["passes"]]
        for p in passes:
            if p["type"] == "layer_skip":
                p["draft_layers"] = self.draft["draft_layers"]
            if p["type"] == "int4":
                p["group_size"] = self.int4_group
        out = {"label": label_of(passes) if spec["kind"] != "quickstart" else spec["label"], "kind": spec["kind"],
               "passes": passes, "natural": spec["natural"]}
        self.say(f"[{self.name}] {out['label']}")
        started = time.perf_counter()
        try:
            plan = self.plan(passes, natural=spec["natural"])
            manager.check_preflight(plan)
        except VloptError as err:
            return {**out, "status": "failed", "error": str(err), "lossless": False}
        out["lossless"] = all(type(cfg).lossless for cfg in plan.configs)
        vlm = load_model(**self.model)
        ctx = PassContext(device="cpu", workload=self.workload, log=lambda msg: None)
        previous, steps = self.baseline, []
        for cfg in plan.configs:
            row, result = manager.apply_pass(vlm, cfg, plan=plan, ctx=ctx, workload=self.workload,
                                             baseline=self.baseline, previous=previous, reference=self.reference,
                                             snapshot_taken=False, reference_vlm=self.reference_vlm)
            steps.append(row)
            if not row.applied:
                return {**out, "status": row.status, "error": row.error, "steps": [r.to_dict() for r in steps]}
            previous = result
        with recording_answers(vlm) as results:
            row.quality = self.quality.measure(vlm)
        out.update(status="applied", steps=[r.to_dict() for r in steps], **summarize(row, results, self))
        if spec["natural"]:
            out["describe_timing"] = self.describe_timing(vlm)
        out["seconds"] = time.perf_counter() - started
        return out

    def describe_timing(self, vlm) -> dict:
        """Natural-length timing on the task's longest answer: the benchmark's question gets a
        few-token answer from these models, too short for stopping early or drafting to matter."""
        from vlopt import bench

        result = bench.interleaved(self.reference_vlm, vlm, self.workload, samples=self.a.rounds, warmup=1,
                                   new_tokens=self.a.answer_tokens, fixed=False, input_path=self.input_path,
                                   questions=[DESCRIBE])
        return {"question": DESCRIBE, "speedup": {k: result["vs_reference"][k] for k in SPREAD},
                "new_tokens": result["stage4"]["new_tokens"], "engine_info": result["stage4"]["engine_info"]}


def summarize(row, results: list, fam: Family) -> dict:
    """The table's columns of the last step of a row (the whole chain so far) and its answers."""
    q = row.quality
    tokens = [r.tokens for r in results]
    identical = sum(t == b for t, b in zip(tokens, fam.baseline_tokens))
    base_tokens = sum(map(len, fam.baseline_tokens))
    out = {"accuracy": q.task_accuracy, "delta_accuracy": q.task_accuracy - fam.baseline_quality.task_accuracy,
           "agreement": q.answer_agreement, "identical_answers": identical, "scenes": q.scenes,
           "per_kind": q.per_kind, "example": q.example,
           "kl": row.fidelity["mean_kl"], "top1": row.fidelity["top1_agreement"],
           "speedup": {k: row.timing[k] for k in SPREAD},
           "stage4_ms": row.stage4["stage4_ms"], "reference_stage4_ms": row.timing["reference_stage4_ms"],
           "visual_tokens": kept_visual_tokens(row),
           "answer_tokens": sum(map(len, tokens)), "baseline_answer_tokens": base_tokens,
           "tokens_saved": base_tokens - sum(map(len, tokens))}
    drafted = sum(r.info.get("drafted", 0) for r in results)
    if drafted:
        verifies = sum(r.info["verify_forwards"] for r in results)
        out["drafts"] = {"acceptance": sum(r.info["accepted"] for r in results) / drafted,
                         # decode-phase tokens (the first comes from prefill) per verify forward
                         "tokens_per_verify": sum(len(r.tokens) - 1 for r in results) / max(1, verifies),
                         "benchmark_engine_info": row.stage4["engine_info"]}
    return out


def kept_visual_tokens(row) -> int:
    """Visual rows the decoder's later layers see: fastv prunes inside the LLM (its wrapper reports
    the count), cls_attention before it (the prompt is shorter)."""
    fastv = (row.stage4["engine_info"] or {}).get("fastv")
    return fastv["visual_after"] if fastv else row.stage4["visual_tokens"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, action="append", help="default: both")
    p.add_argument("--scenes", type=int, help="held-out scenes per family (default 100; --quick 6)")
    p.add_argument("--seed", type=int, default=1, help="evaluation-split seed (training never draws from that split)")
    p.add_argument("--passes", help="comma-separated row kinds (default: all; --quick: a few), e.g. dtype,layer_skip")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; --quick 2)")
    p.add_argument("--new-tokens", type=int, default=24, help="timed token budget (the answers' cap)")
    p.add_argument("--answer-tokens", type=int, default=24, help="natural-length answers' token cap")
    p.add_argument("--calibration-scenes", type=int, help="scenes for choosing layer_skip's draft depth (default 20)")
    p.add_argument("--quick", action="store_true", help="few scenes, few passes, to try it out")
    p.add_argument("--out", help="output folder (default bench/results/cpu; --quick: out/quality-quick)")
    a = p.parse_args(argv)
    a.scenes = a.scenes or (6 if a.quick else 100)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.calibration_scenes = a.calibration_scenes or (4 if a.quick else 20)
    out = Path(a.out or (ROOT / "out" / "quality-quick" if a.quick else ROOT / "bench" / "results" / "cpu"))
    families = a.family or list(FAMILIES)

    import yaml

    from vlopt import bench
    from vlopt.machine import git_commit, machine_info

    conditions = bench.cpu_conditions("cpu")          # sets torch's threads from OMP_NUM_THREADS
    quickstart = yaml.safe_load(QUICKSTART.read_text())["passes"]
    specs = rows_to_run(quickstart)
    kinds = a.passes.split(",") if a.passes else (QUICK_KINDS if a.quick else None)
    if kinds:
        unknown = sorted(set(kinds) - {s["kind"] for s in specs})
        if unknown:
            p.error(f"unknown --passes {', '.join(unknown)}; choose from {', '.join(dict.fromkeys(s['kind'] for s in specs))}")
        specs = [s for s in specs if s["kind"] in kinds]
    if a.quick:
        specs = quick_rows(specs)

    def say(msg):
        print(f"[{time.perf_counter() - started:5.0f} s] {msg}", flush=True)

    started = time.perf_counter()
    record = {"command": " ".join(["python bench/quality.py", *(sys.argv[1:] if argv is None else argv)]),
              "environment": {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ},
              "commit": git_commit(), "machine": machine_info(), "timing": conditions,
              "settings": {"scenes": a.scenes, "seed": a.seed, "answer_tokens": a.answer_tokens,
                           "timed_new_tokens": a.new_tokens, "rounds": a.rounds, "warmup": 1, "quick": a.quick,
                           "draft_tokens": DRAFT_TOKENS, "keeps": list(KEEPS)},
              "weights": {f: weights_record(f) for f in families}, "families": {},
              "machine_extra": {"kernels_package": importlib.util.find_spec("kernels") is not None}}
    with tempfile.TemporaryDirectory(prefix="vlopt-quality-") as folder:
        for family in families:
            fam = Family(family, a, Path(folder), say)
            b = fam.baseline_quality
            say(f"[{family}] unoptimized accuracy {b.task_accuracy:.3f}; layer_skip draft_layers "
                f"{fam.draft['draft_layers']}")
            rows = []
            for spec in specs:
                rows.append(fam.run_row(spec))
                r = rows[-1]
                say(f"[{family}]   {r['status']}: " + (f"accuracy {r['accuracy']:.3f}, identical {r['identical_answers']}"
                                                      f"/{r['scenes']}, speedup {r['speedup']['median']:.2f}×"
                                                      if r["status"] == "applied" else r["error"][:200]))
            record["families"][family] = {
                "workload": fam.workload.name, "input": fam.workload.input_kind,
                "baseline": {"quality": asdict(b), "answer_tokens": sum(map(len, fam.baseline_tokens)),
                             "stage4": fam.baseline["stage4"], "benchmark_input": "held-out scene "
                             f"{fam.quality.qset.items[0].scene.index} (seed {a.seed}), the benchmark's question"},
                "layer_skip_calibration": fam.draft, "int4_group_size": fam.int4_group, "rows": rows}
            fam.quality.close()
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["seconds"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["cpu_seconds"] = usage.ru_utime + usage.ru_stime     # this process's share of the shared cores
    record["lossless_failures"] = [f"{family}: {r['label']}" for family, f in record["families"].items()
                                   for r in f["rows"] if r["lossless"] and not is_identical(r)]
    # The trained weights are replaced in place while they are being improved: a run that straddles
    # a replacement mixes two models (it happened).
    record["weights_changed_during_run"] = [f for f in families
                                            if weights_record(f)["sha256"] != record["weights"][f]["sha256"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(record, indent=1, default=str))
    (out / "quality.md").write_text(markdown(record))
    plot_prune_sweep(record, out / "prune_sweep.png")
    say(f"wrote {out / 'quality.md'}, quality.json and prune_sweep.png")
    if record["weights_changed_during_run"]:
        print(f"the weights of {', '.join(record['weights_changed_during_run'])} changed during the run: its numbers "
              "mix two models; rerun", file=sys.stderr)
        return 2
    for failure in record["lossless_failures"]:
        print(f"lossless pass changed answers: {failure}", file=sys.stderr)
    return 1 if record["lossless_failures"] else 0


def is_identical(r: dict) -> bool:
    return r["status"] == "applied" and r["identical_answers"] == r["scenes"]


# ---- the markdown and the plot, from the record alone ----------------------------------------------
def _x(s: dict) -> str:
    noise = " ~" if s["within_noise"] else ""
    return f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f}){noise}"


def _lossless(r: dict) -> str:
    if not r["lossless"]:
        return "lossy"
    return "yes: identical" if is_identical(r) else "**NO: answers differ**"


def markdown(rec: dict) -> str:
    m, t, s = rec["machine"], rec["timing"], rec["settings"]
    weights = "; ".join(f"{f} `{w['file']}` sha256 `{w['sha256'][:16]}…`"
                        + (" (**interim weights**, not the committed ones)" if w["interim"]
                           else f" (committed in {w['committed_in']})") for f, w in rec["weights"].items())
    lines = [
        "# Per-pass quality on the trained tiny models (CPU, float32)", "",
        f"Command: `{rec['command']}` · commit `{rec['commit']}` · machine: {t['cores']} cores, {m['platform']}, "
        f"torch {m['torch']}, torchao {m['torchao']}, bitsandbytes {m['bitsandbytes']} · torch threads "
        f"{t['torch_threads']} ({t['threads_chosen_by']}) · load average {t['load_average']} at the start, "
        f"{rec['load_average_end']} at the end · {rec['seconds'] / 60:.1f} min wall, {rec['cpu_seconds'] / 60:.1f} min "
        "CPU.", "",
        f"Weights: {weights}.", "",
        *([f"**The weights of {', '.join(rec['weights_changed_during_run'])} changed during this run: its numbers mix "
           "two models. Rerun.**", ""] if rec["weights_changed_during_run"] else []),
        f"Quality: {s['scenes']} held-out scenes per family (evaluation split, seed {s['seed']}: the split training "
        f"never draws from), one question each, greedy, natural length (≤ {s['answer_tokens']} tokens), exact match. "
        "Δ is the change from the unoptimized model's accuracy; agreement is how often the answer equals the "
        "unoptimized model's; *identical* counts answers with exactly the unoptimized model's tokens. A lossless "
        "pass must be identical on every scene (the script exits 1 otherwise). KL and top-1 are the manager's "
        f"fidelity: teacher-forced on the unoptimized model's {s['timed_new_tokens']}-token greedy output for the "
        "benchmark input.", "",
        f"Speed: stage-4 time of the unoptimized instance / the pass's, timed in {s['rounds']} alternating (ABBA) "
        f"rounds after {s['warmup']} warm-up in the same process (`vlopt.bench.interleaved`): median of the "
        "per-round ratios (min–max); `~` marks a ratio within noise. The input is one held-out scene asked the "
        f"benchmark's question, a fixed {s['timed_new_tokens']}-token budget (early_stop and layer_skip: natural "
        "length). The 2 cores are shared with other work, so only these same-run ratios and their spread mean "
        "anything; absolute times do not. Each row is applied alone to a fresh copy of the model.", ""]
    for family, f in rec["families"].items():
        bq = f["baseline"]["quality"]
        lines += [f"## {family} ({f['input']})", "",
                  f"Unoptimized: accuracy {bq['task_accuracy']:.3f} on {bq['scenes']} scenes · stage 4 "
                  f"{f['baseline']['stage4']['stage4_ms']:.0f} ms for {f['baseline']['stage4']['context_tokens']} "
                  f"context tokens ({f['baseline']['stage4']['visual_tokens']} visual) · timed on "
                  f"{f['baseline']['benchmark_input']}.", "",
                  "| pass | accuracy | Δ accuracy | agreement | identical | lossless? | KL | top-1 | stage-4 speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in f["rows"]:
            if r["status"] != "applied":
                lines.append(f"| {r['label']} | not run: {r['error'][:160].replace('|', '/')} | | | | "
                             f"{'**NO: failed**' if r['lossless'] else 'lossy'} | | | |")
                continue
            lines.append(f"| {r['label']} | {r['accuracy']:.3f} | {r['delta_accuracy']:+.3f} | {r['agreement']:.3f} | "
                         f"{r['identical_answers']}/{r['scenes']} | {_lossless(r)} | {r['kl']:.2g} | {r['top1']:.3f} | "
                         f"{_x(r['speedup'])} |")
        lines += _prune_table(f) + _early_stop_table(f) + _layer_skip_table(f) + _examples(f)
    lines += ["## Notes", "",
              "- fast_decode runs as the pass defaults on CPU: its decode step compiled by torch.compile (no CUDA "
              "graph on CPU); the compile happens in the warm-up, outside the timed rounds. The quickstart chain "
              "uses `compile: false`, as `recipes/quickstart.yaml` does.",
              "- early_stop at eos_threshold ≥ 0.5 can only end an answer where greedy decoding ends it anyway "
              "(P(EOS) ≥ 0.5 makes EOS the most likely token); lower thresholds end answers before the greedy EOS.",
              "- int4 is torchao's CPU form (IntxWeightOnly: 4-bit values stored in int8), with the largest group "
              "size that divides the narrow trained decoder's widths.",
              "- bitsandbytes rows that could not run on this CPU say why in the accuracy column"
              + ("; bitsandbytes' optimized CPU 4-bit kernel comes from the `kernels` package, not installed here, "
                 "so nf4/fp4 ran its fallback path." if not rec["machine_extra"]["kernels_package"] else "."),
              "- `speculative` and `distill` have their own table: `bench/results/cpu/speculative.md`.", ""]
    if rec["lossless_failures"]:
        lines += ["**Lossless passes that changed answers:** " + "; ".join(rec["lossless_failures"]), ""]
    return "\n".join(lines)


def _applied(f: dict, kind: str) -> list[dict]:
    return [r for r in f["rows"] if r["kind"] == kind and r["status"] == "applied"]


def _prune_table(f: dict) -> list[str]:
    rows = _applied(f, "prune_visual")
    if not rows:
        return []
    total = f["baseline"]["stage4"]["visual_tokens"]
    fastv_from = {r["steps"][0]["config"]["after_layer"] for r in rows if r["passes"][0]["method"] == "fastv"}
    lines = ["", f"prune_visual sweep (![accuracy against kept visual tokens](prune_sweep.png)): visual tokens the "
             f"decoder sees, of {total} (cls_attention: in the prompt; fastv: from layer "
             f"{', '.join(map(str, sorted(fastv_from)))} on).",
             "", "| method | keep | visual tokens | accuracy | Δ accuracy | agreement | stage-4 speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r["passes"][0]
        lines.append(f"| {cfg['method']} | {cfg['keep']} | {r['visual_tokens']} | {r['accuracy']:.3f} | "
                     f"{r['delta_accuracy']:+.3f} | {r['agreement']:.3f} | {_x(r['speedup'])} |")
    return lines


def _early_stop_table(f: dict) -> list[str]:
    rows = _applied(f, "early_stop")
    if not rows:
        return []
    base = f["baseline"]["answer_tokens"]
    lines = ["", f"early_stop at natural length: answer tokens over the held-out scenes (unoptimized: {base}); "
             f"speedups at natural length on the benchmark's question and on \"{DESCRIBE}\" (tokens: the pass's "
             "answer there).", "",
             "| eos_threshold | answer tokens | tokens saved | accuracy | Δ accuracy | stage-4 speedup | "
             "describe: tokens | describe: speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["describe_timing"]
        lines.append(f"| {r['passes'][0]['eos_threshold']} | {r['answer_tokens']} | {r['tokens_saved']} "
                     f"({r['tokens_saved'] / max(1, base):.1%}) | {r['accuracy']:.3f} | {r['delta_accuracy']:+.3f} | "
                     f"{_x(r['speedup'])} | {d['new_tokens']:g} | {_x(d['speedup'])} |")
    return lines


def _layer_skip_table(f: dict) -> list[str]:
    rows = _applied(f, "layer_skip")
    cal = f["layer_skip_calibration"]
    if not rows:
        return []
    gains = ", ".join(f"k={k}: {v['agreement']:.2f} → {v['expected_gain']:.2f}" for k, v in cal["per_exit"].items())
    lines = ["", f"layer_skip: draft_layers {cal['draft_layers']} of {cal['layers']}, chosen on {cal['scenes']} "
             f"calibration scenes (seed {cal['seed']}) as the best expected gain (1 + p + … + p^d) / (1 + d·k/L), p the "
             f"first k layers' token agreement with the full model (p → gain per k: {gains}).", "",
             "| draft layers | draft tokens | acceptance | tokens per verify | identical | stage-4 speedup | "
             "describe: tokens | describe: acceptance | describe: speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg, d, t = r["passes"][0], r.get("drafts") or {}, r["describe_timing"]
        lines.append(f"| {cfg['draft_layers']} | {cfg['draft_tokens']} | {d.get('acceptance', float('nan')):.3f} | "
                     f"{d.get('tokens_per_verify', float('nan')):.2f} | {r['identical_answers']}/{r['scenes']} | "
                     f"{_x(r['speedup'])} | {t['new_tokens']:g} | {t['engine_info'].get('acceptance_rate', float('nan')):.3f} | "
                     f"{_x(t['speedup'])} |")
    lines += ["", "Acceptance (accepted / drafted) and tokens per verify are over the held-out answers (decode phase: "
              "the first token comes from prefill). Speedups, same run: the benchmark's question (a few-token answer "
              f"from these models) and \"{DESCRIBE}\" (the task's longest answer; acceptance of that timed answer)."]
    return lines


def _examples(f: dict) -> list[str]:
    """One example per lossy row whose answers changed."""
    rows = [r for r in f["rows"] if r["status"] == "applied" and r["agreement"] < 1.0]
    if not rows:
        return [""]
    lines = ["", "Where answers changed, one example each:", "",
             "| pass | question | expected | unoptimized | after |", "|---|---|---|---|---|"]
    for r in rows:
        e = r["example"]
        lines.append(f"| {r['label']} | {e['question']} | {e['expected']} | {e['before']} | {e['after']} |")
    return lines + [""]


def plot_prune_sweep(rec: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = rec["families"]
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
    for ax, (family, f) in zip(axes[0], families.items()):
        total = f["baseline"]["stage4"]["visual_tokens"]
        base = f["baseline"]["quality"]["task_accuracy"]
        for method, marker in (("cls_attention", "o"), ("fastv", "s")):
            rows = [r for r in _applied(f, "prune_visual") if r["passes"][0]["method"] == method]
            points = sorted([(r["visual_tokens"], r["accuracy"]) for r in rows] + [(total, base)])
            ax.plot(*zip(*points), marker=marker, label=method)
        ax.axhline(base, color="gray", linestyle=":", linewidth=1, label="unoptimized")
        ax.set(title=f"{family} ({f['input']}, {f['baseline']['quality']['scenes']} scenes)",
               xlabel="visual tokens kept", ylabel="exact-match accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"prune_visual: accuracy against kept visual tokens (commit {str(rec['commit'])[:12]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

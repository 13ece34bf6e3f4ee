"""`vlopt run`: answers for a folder or list of user inputs, batched, one JSON line per input.

- The model: a recipe (its model with its passes applied, nothing measured), a folder `vlopt apply`
  wrote (`vlopt.load`), or a save_pretrained / release checkpoint folder.
- Inputs, in the order given: a file is one input (event `.npz`/`.npy`, a video, an image); a
  folder of image files is one video (its frames) when the model takes video, any other folder is a
  set of inputs — each file one input and each subfolder a frame folder, sorted by name. Each
  input gets the model's workload for its kind (events, video or image).
- Every line: `input`, `question`, `answer`, `error` (null when answered), `tokens`, `token_ids`,
  `workload`, `batch`, and timing (`stages_1_3_s` of that input, `stage4_s` of its batch, which
  every row waited for, and `stage4_per_clip_s`). An input that cannot be read gets a line with its
  error and no answer; the others go on.
- Resumable: an existing answers file is appended to, and inputs it already answers (same input and
  question, `error` null) are skipped; an input that failed is tried again. One process writes the
  file (rank 0 under torchrun), holding a lock on it, line-buffered, flushed and synced per batch.
- Under torchrun (gloo on CPU, NCCL on GPUs) the batches are dealt to the ranks in turn (data
  parallel, each rank a whole model); each round rank 0 gathers the rows and writes them in input
  order, so the file has the order of a single process. A tensor-parallel model
  (`vlm.decoding.shards` > 1) is one replica over all ranks: every rank decodes every batch with
  its shard. A rank whose stage 4 fails stops; its remaining inputs stay unanswered (named at the
  end, exit 1) and a rerun finishes them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vlopt.errors import VloptError

EVENT_SUFFIXES = (".npz", ".npy")


@dataclass
class Task:
    index: int          # place in the input order
    path: str
    question: str


# ---- the model ---------------------------------------------------------------------------------------
def load_target(target: str, *, device: str | None = None):
    """A recipe's model with its passes applied, or a checkpoint folder. Returns (model, workload
    name or None: the recipe's `benchmark.workload`)."""
    from vlopt.checkpoint import MANIFEST

    path = Path(target)
    if path.is_file():
        return _recipe_model(path, device)
    if path.is_dir() and (path / MANIFEST).is_file():
        from vlopt import load
        return load(path, device=device or "auto"), None
    if path.is_dir() and (path / "config.json").is_file():
        from vlopt.models import load_model
        return load_model(path=str(path), dtype="saved", device=device or "auto"), None
    raise VloptError(f"{target} is neither a recipe file nor a checkpoint folder (no config.json); give a recipe "
                     "YAML, a folder `vlopt apply` wrote, or a save_pretrained folder")


def _recipe_model(path: Path, device: str | None):
    from vlopt.manager import resolve
    from vlopt.models import load_model
    from vlopt.passes import PassContext
    from vlopt.recipe import load_recipe

    recipe, configs = load_recipe(path)
    plan = resolve(recipe, configs, recipe_path=path.absolute(), output=None)
    spec = recipe.model
    vlm = load_model(spec.name, preset=spec.preset, path=plan.model_path, dtype=spec.dtype,
                     device=device or spec.device, allow_pickle=spec.allow_pickle)
    ctx = PassContext(device=str(vlm.device), workload=vlm.workload(recipe.benchmark.workload), log=lambda msg: None)
    for i, cfg in enumerate(configs):
        try:
            plan.registry.passes[cfg.type].apply(vlm, cfg, ctx)
        except VloptError as err:
            raise VloptError(f"{path}: pass {i} ({cfg.type}): {err}") from None
    return vlm, recipe.benchmark.workload


# ---- the inputs --------------------------------------------------------------------------------------
def expand_inputs(paths: list[str], *, takes_video: bool) -> list[str]:
    """The inputs named by `paths` in order (see the module docstring); a path that does not exist
    is an error naming it."""
    from vlopt.frames import IMAGE_SUFFIXES

    out = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise VloptError(f"input {given} does not exist; give event files, videos, images or folders of them")
        if not p.is_dir():
            out.append(str(p))
            continue
        entries = sorted(e for e in p.iterdir() if not e.name.startswith("."))
        if takes_video and entries and all(e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES for e in entries):
            out.append(str(p))                  # a frame folder: one video
        else:
            out.extend(str(e) for e in entries)
    return list(dict.fromkeys(out))             # a path named twice is one input


def kinds_of(path: str) -> list[str]:
    """The input kinds a path can be, most likely first (the model's workloads decide)."""
    from vlopt.frames import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir() or suffix in VIDEO_SUFFIXES:
        return ["video"]
    if suffix in IMAGE_SUFFIXES:
        return ["image", "video"]
    if suffix in EVENT_SUFFIXES:
        return ["events", "video"]               # events, or an array of frames
    return []


def workload_for(vlm, path: str, forced: str | None):
    """The model's workload for this input's kind (its default workload when that fits)."""
    from vlopt.frames import IMAGE_SUFFIXES, VIDEO_SUFFIXES
    from vlopt.plugins import get_registry

    if forced:
        return vlm.workload(forced)
    family = get_registry().models[vlm.name]
    default = vlm.workload()
    kinds = kinds_of(path)
    for kind in kinds:
        if default.input_kind == kind:
            return default
        match = next((w for w in family.workloads if w.input_kind == kind and w.questions == 1), None)
        if match is not None:
            return match
    takes = sorted({w.input_kind for w in family.workloads})
    if not kinds:
        raise VloptError(f"not an input vlopt reads: give event files ({'/'.join(EVENT_SUFFIXES)}), videos "
                         f"({'/'.join(VIDEO_SUFFIXES)}), images ({'/'.join(IMAGE_SUFFIXES)}) or frame folders")
    raise VloptError(f"{vlm.name} takes {' or '.join(takes)} input, not {' or '.join(kinds)}")


# ---- the answers file --------------------------------------------------------------------------------
def answered(path: Path) -> set[tuple[str, str]]:
    """(input, question) pairs the file already answers. A line that is not JSON (a run killed while
    writing it) answers nothing."""
    done = set()
    if not path.exists():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("error") is None and "input" in row and "question" in row:
            done.add((row["input"], row["question"]))
    return done


class AnswersFile:
    """The answers file, appended to by this process alone (an exclusive lock while open)."""

    def __init__(self, path: Path):
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        ends_open = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.fh = open(path, "a", buffering=1, encoding="utf-8")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise VloptError(f"another vlopt run is writing {path}; wait for it or give another -o file") from None
        if ends_open:                           # a line cut short by a killed run: end it
            self.fh.write("\n")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# ---- answering ---------------------------------------------------------------------------------------
def answer_batch(vlm, tasks: list[Task], *, forced_workload: str | None, new_tokens: int | None, fixed: bool,
                 pad_to: int) -> list[dict]:
    """Stages 1–3 per input (an input that fails gets its error line), then stage 4 of the rest in
    one batch, padded to `pad_to` rows with copies of its last row so that the engine's step for
    that batch size serves a short last batch too (no new compile or graph)."""
    from vlopt.stage4 import Stopwatch

    rows, ready = {}, []
    for task in tasks:
        base = {"input": task.path, "question": task.question}
        try:
            workload = workload_for(vlm, task.path, forced_workload)
            watch = Stopwatch(vlm.device)
            with watch.phase("1-3"):
                inp = vlm.run_stages(task.path, workload, task.question)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:               # unreadable input: its own line, the others go on
            text = str(err) if isinstance(err, VloptError) else f"{type(err).__name__}: {err}"
            rows[task.index] = {**base, "answer": None, "error": " ".join(text.split()) or type(err).__name__}
            continue
        rows[task.index] = {**base, "workload": workload.name, "stages_1_3_s": watch.seconds["1-3"]}
        ready.append((task, inp, workload))
    if ready:
        # One budget per batch: the largest of its workloads' (or the one given).
        budget = new_tokens or max(w.new_tokens for _, _, w in ready)
        inputs = [inp for _, inp, _ in ready]
        padded = inputs + [inputs[-1]] * max(0, pad_to - len(inputs))
        watch = Stopwatch(vlm.device)
        with watch.phase("4"):
            results = vlm.decoding.generate_batch(padded, new_tokens=budget, fixed=fixed)[: len(inputs)]
        seconds = watch.seconds["4"]
        for (task, _, _), result in zip(ready, results):
            rows[task.index].update(
                answer=vlm.tokenizer.decode(result.tokens, skip_special_tokens=True).strip(), error=None,
                tokens=len(result.tokens), token_ids=result.tokens, batch=len(inputs),
                one_pass=result.info.get("batch") == len(padded), stage4_s=seconds,
                stage4_per_clip_s=seconds / len(inputs))
    return [rows[t.index] for t in tasks]


def run(target: str, inputs: list[str], *, output: Path, batch: int = 8, question: str | None = None,
        new_tokens: int | None = None, fixed: bool = False, device: str | None = None, workload: str | None = None,
        progress=print) -> dict:
    """Answer `inputs` with the model `target` into `output` (see the module docstring). Returns a
    summary (rank 0's is complete): answered, errors, skipped, unanswered, and any rank failures."""
    from vlopt.models.tokenizer import DEFAULT_QUESTION

    rank, world = _distributed()
    question = question if question is not None else DEFAULT_QUESTION
    vlm, recipe_workload = load_target(target, device=device)
    forced = workload or recipe_workload
    if forced is not None:
        vlm.workload(forced)                    # an unknown or another model's workload: one clear error
    shards = vlm.decoding.shards
    if shards > 1 and shards != world:
        raise VloptError(f"the model is tensor-parallel over {shards} ranks but torchrun started {world}: run "
                         f"`torchrun --nproc-per-node {shards}` (data-parallel replicas of a tensor-parallel model "
                         "are not supported)")
    replicas, replica = (1, 0) if shards > 1 else (world, rank)
    takes_video = any(w.input_kind == "video" for w in _family(vlm).workloads)

    writer, plan = None, None
    if rank == 0:
        try:
            paths = expand_inputs(inputs, takes_video=takes_video)
            done = answered(output)
            todo = [Task(i, p, question) for i, p in enumerate(paths) if (p, question) not in done]
            writer = AnswersFile(output)
            plan = ("ok", todo, len(paths) - len(todo))
        except VloptError as err:
            plan = ("error", str(err), None)
    status, todo, skipped = _broadcast(plan, world)
    if status == "error":                       # every rank stops with rank 0's one-line error
        raise VloptError(todo)
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    rounds = -(-len(chunks) // replicas)
    summary = {"inputs": len(todo) + skipped, "skipped": skipped, "answered": 0, "errors": 0, "unanswered": [],
               "failures": []}
    failed = None
    start = time.perf_counter()
    try:
        for k in range(rounds):
            mine = chunks[k * replicas + replica] if k * replicas + replica < len(chunks) else []
            rows, left = [], []
            if mine and failed is None:
                try:
                    rows = answer_batch(vlm, mine, forced_workload=forced, new_tokens=new_tokens, fixed=fixed,
                                        pad_to=batch)
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as err:       # this rank stops; its inputs stay unanswered for a rerun
                    failed = f"rank {rank}: {type(err).__name__}: {' '.join(str(err).split())}"
            if failed is not None:
                left = [t.path for t in mine]
            rows = [{**r, "rank": rank} for r in rows]
            gathered = _gather((rows, left, failed), world) if shards == 1 else [(rows, left, failed)]
            if rank != 0:
                continue
            rows = sorted((r for g in gathered for r in g[0]), key=_order(todo))
            writer.write(rows)
            for _, left_paths, why in gathered:
                summary["unanswered"] += left_paths
                if why and why not in summary["failures"]:
                    summary["failures"].append(why)
            summary["answered"] += sum(r["error"] is None for r in rows)
            summary["errors"] += sum(r["error"] is not None for r in rows)
            finished = summary["answered"] + summary["errors"] + len(summary["unanswered"])
            progress(f"vlopt run: round {k + 1}/{rounds}: {finished}/{len(todo)} inputs "
                     f"({summary['answered']} answered, {summary['errors']} errors"
                     f"{', ' + str(skipped) + ' already answered' if skipped else ''}), "
                     f"{time.perf_counter() - start:.1f} s")
    finally:
        if writer is not None:
            writer.close()
    return summary


def _order(todo: list[Task]):
    where = {t.path: t.index for t in todo}
    return lambda row: where[row["input"]]


def _family(vlm):
    from vlopt.plugins import get_registry
    return get_registry().models[vlm.name]


# ---- torchrun -----------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(rank, world size): joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _broadcast(value, world: int):
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value, world: int) -> list:
    """Every rank's `value`, in rank order (on every rank)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out

"""Answer quality on the synthetic scene task (`vlopt.scenes`): what a pass costs, not only what it saves.

`QualitySet` is a held-out set of evaluation-split scenes for one workload, rendered once per
process to the files a user would give stage 1 (an event `.npz`, a `[T, H, W, 3]` frames `.npy`), with the
question each scene asks. `answer` runs every scene through the model's real path as it is now —
`vlm.run_stages` (stage 1 reads the file; a feature store or feature filter a pass installed acts
as it does for users) and `vlm.decoding.generate` at natural length, greedy, with a small token cap.
The stage-4 inputs are kept and reused while the stages-1–3 state of the model (everything outside
the decoder layers, final norm and lm_head, and the feature extension points) is unchanged, so a
decoder-only pass costs one decoding per scene.

`QualityRun` is the manager's quality step: the baseline's answers once, then a `Quality` per model
state (accuracy, agreement with the baseline's answers, one example). On random weights
(`vlm.weights_trained is False`) nothing is run and the row says why.

`evaluate_model` is `vlopt eval`: accuracy overall and per question kind on N fresh scenes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vlopt import scenes
from vlopt.rows import Quality

DEFAULT_SCENES = 100
DEFAULT_SEED = 1              # any seed works: the eval split never shares a scene with training
ANSWER_TOKENS = 24            # the grammar's longest answer is ~16 tokens
NOT_MEASURABLE = "random weights: quality not measurable"


@dataclass
class Item:
    scene: scenes.Scene
    qa: scenes.QA
    path: str                 # the rendered stage-1 input


# Rendered stage-1 files, per (input kind, seed), kept for the process: each run of a process (a
# test session, a sweep) renders a scene once. The folders go when the process ends.
_RENDERED: dict[tuple[str, int], tuple[tempfile.TemporaryDirectory, dict[int, str]]] = {}


def rendered(scene: scenes.Scene, modality: str) -> str:
    """The path of `scene` rendered for `modality` as a user's stage-1 file (rendered once)."""
    import numpy as np

    from vlopt.events import save_events

    folder, paths = _RENDERED.setdefault((modality, scene.seed),
                                         (tempfile.TemporaryDirectory(prefix="vlopt-scenes-"), {}))
    if scene.index not in paths:
        raw = scenes.render(scene, modality)
        path = Path(folder.name) / f"scene{scene.index:05d}"
        if modality == "events":
            paths[scene.index] = str(save_events(path.with_suffix(".npz"), raw))
        else:
            np.save(path.with_suffix(".npy"), np.stack(raw))
            paths[scene.index] = str(path.with_suffix(".npy"))
    return paths[scene.index]


@dataclass
class QualitySet:
    """Held-out scenes of one workload with their questions and rendered stage-1 files, and the
    stage-4 inputs of the last model state they were answered in."""

    workload: object          # vlopt.models.Workload
    seed: int
    items: list[Item]
    _state: tuple | None = field(default=None, repr=False)
    _inputs: list | None = field(default=None, repr=False)

    @classmethod
    def build(cls, workload, n: int, seed: int) -> QualitySet:
        """`n` evaluation-split scenes of `seed`, rendered for `workload`'s input kind."""
        modality = workload.input_kind
        return cls(workload, seed, [Item(scene, scenes.question(scene, modality), rendered(scene, modality))
                                    for scene in scenes.scenes(seed, n, "eval")])

    def close(self) -> None:
        """Drop the kept stage-4 inputs (the rendered files stay for the process)."""
        self._inputs = self._state = None

    def __len__(self) -> int:
        return len(self.items)


def stages_state(vlm) -> tuple:
    """What stages 1–3 depend on, cheaply: the feature extension points, and the identity, dtype,
    shape and in-place version of every tensor outside the decoder layers, final norm and lm_head
    (vision side, projector, embeddings). Equal states give equal stage-4 inputs."""
    prefix = vlm.decoder_prefix
    decoder_only = (f"{prefix}.layers.", f"{prefix}.norm.", "lm_head.")
    tensors = []
    named = list(vlm.hf.named_parameters(remove_duplicate=False)) + list(vlm.hf.named_buffers(remove_duplicate=False))
    for name, t in named:
        if name.startswith(decoder_only):
            continue
        try:
            where = t.data_ptr()
        except RuntimeError:          # a tensor subclass without storage (torchao)
            where = id(t)
        tensors.append((name, type(t).__name__, str(t.dtype), tuple(t.shape), where, t._version))
    modules = tuple((n, type(m).__name__) for n, m in vlm.hf.named_modules() if not n.startswith(decoder_only))
    return (id(vlm.feature_store), tuple(id(f) for f in vlm.feature_filters), vlm.feature_tag,
            vlm.need_cls_attention, modules, tuple(tensors))


def answer(vlm, qset: QualitySet, *, new_tokens: int = ANSWER_TOKENS) -> list[str]:
    """The model's answer to each item's question, through its real stages 1–4 as it is now."""
    import torch

    with torch.no_grad():
        state = stages_state(vlm)
        if state != qset._state:
            qset._inputs = [vlm.run_stages(it.path, qset.workload, it.qa.question) for it in qset.items]
            for inp, it in zip(qset._inputs, qset.items):
                inp.origin = (it.scene, it.qa.question)
            qset._state = state
        out = []
        for inp in qset._inputs:
            tokens = vlm.decoding.generate(inp, new_tokens=new_tokens, fixed=False).tokens
            out.append(vlm.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return out


def accuracy(qset: QualitySet, answers: list[str]) -> tuple[float, dict[str, float]]:
    """Exact-match accuracy overall and per question kind (in the grammar's order)."""
    hits = [scenes.score(a, it.qa.answer) for a, it in zip(answers, qset.items)]
    per_kind = {}
    for kind in scenes.kinds(qset.workload.input_kind):
        mine = [h for h, it in zip(hits, qset.items) if it.qa.kind == kind]
        if mine:
            per_kind[kind] = sum(mine) / len(mine)
    return sum(hits) / max(1, len(hits)), per_kind


def example(qset: QualitySet, before: list[str], after: list[str]) -> dict:
    """One question with the answer before and after: the first where they differ, else the first."""
    i = next((i for i, (b, a) in enumerate(zip(before, after)) if not scenes.score(a, b)), 0)
    it = qset.items[i]
    return {"scene": it.scene.index, "kind": it.qa.kind, "question": it.qa.question, "expected": it.qa.answer,
            "before": before[i], "after": after[i]}


class QualityRun:
    """The manager's quality step for one run: `baseline()` once, then `measure()` after each pass."""

    def __init__(self, vlm, workload, *, scenes_n: int, seed: int, new_tokens: int = ANSWER_TOKENS):
        self.seed, self.new_tokens = seed, new_tokens
        self.reason = None
        if vlm.weights_trained is False:
            self.reason = NOT_MEASURABLE
        elif scenes_n == 0:
            self.reason = "not measured (benchmark.quality_scenes is 0)"
        self.qset = None if self.reason else QualitySet.build(workload, scenes_n, seed)
        self.before: list[str] | None = None

    def baseline(self, vlm) -> Quality:
        if self.reason:
            return Quality(not_measured=self.reason)
        self.before = answer(vlm, self.qset, new_tokens=self.new_tokens)
        return self._quality(self.before)

    def measure(self, vlm) -> Quality:
        if self.reason:
            return Quality(not_measured=self.reason)
        return self._quality(answer(vlm, self.qset, new_tokens=self.new_tokens))

    def _quality(self, after: list[str]) -> Quality:
        acc, per_kind = accuracy(self.qset, after)
        agree = sum(scenes.score(a, b) for a, b in zip(after, self.before)) / max(1, len(after))
        return Quality(task_accuracy=acc, answer_agreement=agree, example=example(self.qset, self.before, after),
                       scenes=len(self.qset), seed=self.seed, per_kind=per_kind)

    def close(self) -> None:
        if self.qset is not None:
            self.qset.close()


def describe_model(vlm) -> dict:
    """The model description an evaluation records."""
    return {"name": vlm.name, **{k: v for k, v in vlm.source.items() if k != "allow_pickle"},
            "dtype": str(vlm.dtype).removeprefix("torch."), "device": str(vlm.device),
            "engine": vlm.decoding.name, "weights_trained": vlm.weights_trained}


def evaluate_model(vlm, workload, *, scenes_n: int = DEFAULT_SCENES, seed: int = DEFAULT_SEED,
                   new_tokens: int = ANSWER_TOKENS) -> dict:
    """Accuracy of `vlm` as it is now on `scenes_n` evaluation-split scenes of `seed` (`vlopt eval`)."""
    qset = QualitySet.build(workload, scenes_n, seed)
    try:
        answers = answer(vlm, qset, new_tokens=new_tokens)
        acc, per_kind = accuracy(qset, answers)
    finally:
        qset.close()
    result = {"accuracy": acc, "scenes": scenes_n, "seed": seed, "questions": len(answers), "per_kind": per_kind,
              "workload": workload.name, "modality": workload.input_kind, "model": describe_model(vlm),
              "answers": [{"scene": it.scene.index, "kind": it.qa.kind, "question": it.qa.question,
                           "expected": it.qa.answer, "answer": a, "correct": scenes.score(a, it.qa.answer)}
                          for it, a in zip(qset.items, answers)]}
    if vlm.weights_trained is False:
        result["note"] = NOT_MEASURABLE
    return result


MAX_SCENES = 10_000


def run_eval(*, model: str | None = None, preset: str | None = None, recipe=None, checkpoint=None,
             workload: str | None = None, scenes_n: int | None = None, seed: int | None = None,
             device: str | None = None, dtype: str | None = None, progress=None) -> dict:
    """`vlopt eval`: build what the arguments name — a preset (`model` + `preset`), a recipe's model
    with its passes applied (nothing benchmarked), or a folder (a `vlopt apply` output through
    `vlopt.load`, else a checkpoint) — and evaluate it (`evaluate_model`). Bad arguments are one-line
    VloptErrors."""
    from vlopt.errors import VloptError

    say = progress or (lambda msg: None)
    given = [flag for flag, value in (("--preset", preset), ("--recipe", recipe), ("--checkpoint", checkpoint))
             if value is not None]
    if len(given) > 1:
        raise VloptError(f"give one of --preset, --recipe or --checkpoint, not {' and '.join(given)}")
    if model is not None and (recipe is not None or checkpoint is not None):
        raise VloptError(f"--model picks a preset's family; {given[0]} names its own model")
    if scenes_n is not None and not 1 <= scenes_n <= MAX_SCENES:
        raise VloptError(f"--scenes must be between 1 and {MAX_SCENES}, not {scenes_n}")
    if seed is not None and not 0 <= seed < 2**32:
        raise VloptError(f"--seed must be between 0 and 2**32 - 1, not {seed}")
    described: dict = {}
    if recipe is not None:
        from pathlib import Path as _Path

        from vlopt.manager import build_optimized
        from vlopt.recipe import load_recipe

        if dtype is not None:
            raise VloptError("--dtype does not apply to --recipe: the recipe's model.dtype does")
        recipe = _Path(recipe)
        rec, configs = load_recipe(recipe)
        vlm, wl = build_optimized(rec, configs, recipe_path=recipe.absolute(), device=device, progress=say)
        b = rec.benchmark
        scenes_n = scenes_n or b.quality_scenes or DEFAULT_SCENES
        seed = b.quality_seed if seed is None else seed
        described = {"label": f"{vlm.name} from recipe {recipe}", "recipe": str(recipe),
                     "passes": [cfg.type for cfg in configs]}
    elif checkpoint is not None:
        from vlopt.checkpoint import MANIFEST, read_output
        from vlopt.manager import load_optimized
        from vlopt.models import load_model

        folder = Path(checkpoint)
        if not folder.is_dir():
            raise VloptError(f"--checkpoint {folder} is not a folder; give a `vlopt apply` output or a checkpoint folder")
        say(f"loading {folder}")
        if (folder / MANIFEST).is_file():
            if dtype is not None:
                raise VloptError(f"--dtype does not apply to {folder}: a `vlopt apply` output loads in its saved dtype")
            vlm = load_optimized(folder, device=device or "auto")
            described = {"passes": [p["type"] for p in read_output(folder).get("passes", [])]}
        else:
            vlm = load_model(path=str(folder), dtype=dtype or "auto", device=device or "auto")
        described.update(label=f"{vlm.name} from {folder}", checkpoint=str(folder))
        wl = None
    else:
        from vlopt.models import load_model

        from vlopt.plugins import get_registry

        name, preset = model or "eventgpt", preset or "tiny"
        families = get_registry().models
        if name not in families:       # before torch loads: an unknown name is answered at once
            raise VloptError(f"unknown model '{name}'; choose one of {sorted(families)}, or give --checkpoint DIR")
        say(f"building {name} ({preset})")
        vlm = load_model(name, preset=preset, dtype=dtype or "auto", device=device or "auto")
        described = {"label": f"{name} ({preset})", "preset": preset}
        wl = None
    if workload is not None or wl is None:
        wl = vlm.workload(workload)
    scenes_n = scenes_n or DEFAULT_SCENES
    seed = DEFAULT_SEED if seed is None else seed
    say(f"answering {scenes_n} scenes (seed {seed}) on {wl.name}")
    result = evaluate_model(vlm, wl, scenes_n=scenes_n, seed=seed)
    result["model"].update(described)
    return result

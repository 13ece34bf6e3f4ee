"""`speculative`: greedy speculative decoding with a draft model. The draft proposes `draft_tokens`
tokens, the target verifies them in one forward and keeps the longest prefix it agrees with plus its
own next token (`vlopt.engine.verify_drafts`, the loop `layer_skip` runs too): the answer is the
target's own, in both the fixed-budget (EOS masked until the budget) and natural-length modes.

Drafts (`draft:`):
- `self`: the target's first `draft_layers` layers (the `layer_skip` engine);
- `{family, preset}` or `{path}`: another model — the other family on the same scene (EventGPT on
  the event stream drafting for Video-LLaVA on the video, or the reverse), or a smaller model of the
  same family (a `distill` output).

Draft and target must share a tokenizer: the draft's ids are what the target verifies. The vocabularies
are compared and a mismatch is refused (the random presets of the two families differ: Video-LLaVA
adds `<image>`/`<video>`; the trained tiny models share the task tokenizer).

The draft's stage-4 input. A draft whose stages 1–3 are the target's (same family and the same
vision, projector and embedding weights: a `distill` student) decodes from the target's own input.
Any other draft needs its own rendering of the same scene (events vs video): the engine looks the
target's input up among paired inputs (`pair`: target input → draft input, matched by value). At
apply time the benchmark's demo input is paired for the workload's questions (each family's demo
input for the same question); `pair_scene` pairs a synthetic scene's two renderings
(`vlopt.scenes`); an input that carries the scene it was built from (`Stage4Input.origin`, as the
held-out quality scenes do) is rendered for the draft on first use. Any other prompt with no pair
is refused, naming `pair`. The draft's stages 1–3 run when
pairing, outside the stage-4 time.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome


class DraftModel(BaseModel):
    """A draft model: a preset of a family, or a checkpoint folder (a `vlopt apply` output or a
    `save_pretrained` folder; a relative path is taken from the working directory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str | None = None
    preset: str | None = None
    path: str | None = None
    workload: str | None = None     # the draft's workload for demo pairing (default: the family's)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.preset is None) == (self.path is None):
            raise ValueError("give the draft one of preset (with family) or path")
        if self.preset is not None and self.family is None:
            raise ValueError("a draft preset needs its family")
        return self


class Config(PassConfig):
    type: Literal["speculative"] = "speculative"
    draft: Literal["self"] | DraftModel = "self"
    draft_tokens: int = Field(4, ge=1, le=32)
    draft_layers: int = Field(2, ge=1)           # draft: self only
    lossless: ClassVar[bool] = True
    once: ClassVar[bool] = True


# ---- pairing the draft's input ------------------------------------------------------------------------
class PairedInputs:
    """Target stage-4 input → the draft's stage-4 input of the same scene and question, matched by
    value (the target's stages 1–3 are deterministic, so a re-run gives the same embeddings).
    Bounded: the oldest pair goes first."""

    def __init__(self, limit: int = 512, render=None):
        self.pairs: list[tuple] = []
        self.limit = limit
        self.render = render          # (scene, question) -> the draft's input, for inputs that carry an origin

    def add(self, target_inp, draft_inp) -> None:
        self.pairs = [p for p in self.pairs if not _same(p[0], target_inp)][-(self.limit - 1):]
        self.pairs.append((target_inp, draft_inp))

    def __call__(self, target_inp):
        for known, own in reversed(self.pairs):
            if _same(known, target_inp):
                return own
        if self.render is not None and target_inp.origin is not None:
            own = self.render(*target_inp.origin)
            self.add(target_inp, own)
            return own
        raise VloptError("speculative: no draft input is paired with this prompt (the draft model decodes from "
                         "its own rendering of the same scene); pair it first with "
                         "vlopt_passes.speculative.pair(vlm, target_input, draft_input) or pair_scene(vlm, scene)")


def _same(a, b) -> bool:
    import torch

    return (a.embeds.shape == b.embeds.shape and a.visual_spans == b.visual_spans
            and torch.equal(a.embeds, b.embeds.to(a.embeds.device)))


def _engine(vlm):
    from vlopt.engine import ModelDraft, SpeculativeEngine

    engine = vlm.decoding.engine
    if not isinstance(engine, SpeculativeEngine) or not isinstance(engine.draft, ModelDraft):
        raise VloptError("this model does not decode with a speculative draft model; apply "
                         "{type: speculative, draft: {...}} first")
    return engine


def draft_model(vlm):
    """The draft `VLModel` of a model the speculative pass was applied to."""
    return _engine(vlm).draft.vlm


def pair(vlm, target_inp, draft_inp) -> None:
    """Decode `target_inp` with `draft_inp` as the draft's input (both built from one scene)."""
    inputs = _engine(vlm).draft.inputs
    if isinstance(inputs, PairedInputs):
        inputs.add(target_inp, draft_inp)


def _render(draft, dwl, scene, question):
    """The draft's stage-4 input for `scene` asked `question`, rendered in the draft's own modality."""
    from vlopt import scenes

    return draft.encode(draft.preprocess(scenes.render(scene, dwl.input_kind), question, dwl))


def pair_scene(vlm, scene, *, question=None, workload=None, draft_workload=None):
    """Render `scene` for the target and for the draft, run each model's stages 1–3 on the same
    question (default: the scene's evaluation question in the target's modality), pair the inputs and
    return the target's `Stage4Input`."""
    from vlopt import scenes

    draft = draft_model(vlm)
    workload = vlm.workload(workload) if workload is None or isinstance(workload, str) else workload
    dwl = draft.workload(draft_workload) if draft_workload is None or isinstance(draft_workload, str) else draft_workload
    question = question or scenes.question(scene, workload.input_kind).question
    target_inp = vlm.encode(vlm.preprocess(scenes.render(scene, workload.input_kind), question, workload))
    pair(vlm, target_inp, _render(draft, dwl, scene, question))
    return target_inp


# ---- checks ---------------------------------------------------------------------------------------------
def check_shared_tokenizer(target, draft) -> None:
    """Refuse a draft whose token ids the target cannot verify (meta-device models suffice)."""
    same = target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
    rows_t, rows_d = target.lm_head.weight.shape[0], draft.lm_head.weight.shape[0]
    if not same or rows_t != rows_d or target.eos_token_id != draft.eos_token_id:
        raise VloptError(f"speculative: the draft ({draft.name}, {len(draft.tokenizer)} tokenizer ids, {rows_d} output "
                         f"rows) does not share the target's tokenizer ({target.name}, {len(target.tokenizer)} ids, "
                         f"{rows_t} rows), so its tokens cannot be verified; use a draft built with the target's "
                         "tokenizer (the trained tiny models share one)")


def shares_stages_1_to_3(target, draft) -> bool:
    """Same adapter and the same weights outside the decoder layers, final norm and lm_head (vision,
    projector, embeddings): the draft's stage-4 input is the target's."""
    import torch

    if type(target) is not type(draft):
        return False
    p = target.decoder_prefix
    decoder = (f"{p}.layers.", f"{p}.norm.", "lm_head.")
    t = {k: v for k, v in target.hf.state_dict().items() if not k.startswith(decoder)}
    d = {k: v for k, v in draft.hf.state_dict().items() if not k.startswith(decoder)}
    return t.keys() == d.keys() and all(t[k].shape == d[k].shape and not t[k].is_meta and
                                        torch.equal(t[k], d[k].to(t[k].device)) for k in t)


def load_draft(spec: DraftModel, target):
    """The draft model on the target's device and dtype; the tokenizer check runs before a preset's
    weights are built (a refused 7b draft costs no memory)."""
    import torch

    from vlopt.models import load_model
    from vlopt.plugins import get_registry

    device = target.device.type
    dtype = str(target.dtype).removeprefix("torch.")
    if spec.preset is not None:
        families = get_registry().models
        if spec.family not in families:
            raise VloptError(f"speculative.draft.family: unknown model '{spec.family}'; choose one of {sorted(families)}")
        if spec.preset not in families[spec.family].presets:
            raise VloptError(f"speculative.draft.preset: unknown preset '{spec.preset}' for {spec.family}")
        check_shared_tokenizer(target, families[spec.family].build(spec.preset, dtype=torch.bfloat16, device="cpu",
                                                                   meta=True))
        return load_model(spec.family, preset=spec.preset, dtype=dtype, device=device)
    folder = Path(spec.path)
    if (folder / "vlopt_manifest.json").is_file():
        from vlopt.manager import load_optimized

        draft = load_optimized(folder, device=device)
        draft.hf.to(target.dtype)
    else:
        draft = load_model(path=str(folder), dtype=dtype, device=device)
    if spec.family is not None and draft.name != spec.family:
        raise VloptError(f"speculative.draft: {spec.path} holds a {draft.name} model, not {spec.family}")
    return draft


# ---- the pass -------------------------------------------------------------------------------------------
def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    from vlopt.engine import LayerDraft, ModelDraft, SpeculativeEngine

    layers = len(vlm.text_model.layers)
    if cfg.draft == "self":
        if cfg.draft_layers >= layers:
            raise VloptError(f"speculative.draft_layers must be below the decoder's {layers} layers, "
                             f"got {cfg.draft_layers}")
        engine = SpeculativeEngine(LayerDraft(cfg.draft_layers), draft_tokens=cfg.draft_tokens)
        notes = vlm.decoding.install(engine, by="speculative")
        return PassOutcome(touched=[f"{vlm.decoder_prefix}.layers[:{cfg.draft_layers}] (draft)"],
                           skipped=list(vlm.vision_modules),
                           notes=[f"self-draft: {cfg.draft_layers}/{layers} layers draft {cfg.draft_tokens} tokens", *notes])
    draft = load_draft(cfg.draft, vlm)
    check_shared_tokenizer(vlm, draft)
    shared = shares_stages_1_to_3(vlm, draft)
    dwl = draft.workload(cfg.draft.workload)
    inputs = (lambda inp: inp) if shared else PairedInputs(render=lambda scene, q: _render(draft, dwl, scene, q))
    size = sum(p.numel() for p in draft.hf.parameters())
    name = f"{draft.name} ({cfg.draft.preset or cfg.draft.path}, {len(draft.text_model.layers)} layers)"
    engine = SpeculativeEngine(ModelDraft(draft, inputs, name=name), draft_tokens=cfg.draft_tokens)
    notes = vlm.decoding.install(engine, by="speculative")
    info = {"draft": name, "draft_params": size, "draft_input": "the target's" if shared else "paired"}
    if not shared:
        from vlopt.models.tokenizer import DEFAULT_QUESTION, QUESTIONS

        workload = ctx.workload or vlm.workload()
        questions = QUESTIONS[: workload.questions] if workload.questions > 1 else [DEFAULT_QUESTION]
        for q in questions:   # the benchmark's demo input: each family's demo input, same question
            inputs.add(vlm.run_stages(None, workload, q), draft.run_stages(None, dwl, q))
        notes.append(f"the draft decodes from its own input ({dwl.name}); the benchmark's demo input is paired for "
                     f"{len(questions)} question(s), other prompts need vlopt_passes.speculative.pair")
    return PassOutcome(touched=["stage-4 engine"], skipped=list(vlm.vision_modules),
                       notes=[f"draft model {name}, {size / 1e6:.2f} M params, drafts {cfg.draft_tokens} tokens",
                              *notes], info=info)


@hookimpl
def register_passes(register):
    register(Config, apply)

"""What every model adapter provides: stages 1–3 producing a model-agnostic `Stage4Input`.

Stage 4 is then the same code for both models: the LLaMA decoder generating from `inputs_embeds`.
Passes change a model through its modules or through these declared extension points:
`decoding` (the stage-4 holder, `vlopt.stage4.Decoding`), `feature_store` (a cache of visual rows
in front of stages 1–3), `feature_filters` (functions choosing visual rows) and `need_cls_attention`
(ask `features()` for per-row CLS scores).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Protocol

import torch

from vlopt.models import Workload, get_workload
from vlopt.stage4 import Decoding, Stage4Input, VisualFeatures

__all__ = ["VLModel", "Stage4Input", "VisualFeatures", "Workload", "FeatureStore", "seeded_init"]

# The config attribute that says where the weights come from ("trained" | "random"): set on load by
# `vlopt.models.load_model`, so every checkpoint written from the model (save_pretrained) keeps it.
WEIGHTS_MARK = "vlopt_weights"


class FeatureStore(Protocol):
    """Visual rows kept across calls (feature_cache): `key` names what the rows of one input depend
    on; `get` returns stored rows or None; `put` stores them."""

    def key(self, vlm, raw_path: str | None, workload: Workload) -> str: ...

    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, rows: torch.Tensor) -> None: ...


class VLModel:
    """A vision-language model as vlopt sees it. Subclasses implement stages 1–3."""

    name: ClassVar[str]
    default_workload: ClassVar[str]
    vision_modules: ClassVar[list[str]]     # qualified names of the stage-3 modules

    @property
    def default_ignore(self) -> list[str]:
        """What a weight pass leaves alone unless told otherwise: the vision side and the output head."""
        return [*self.vision_modules, "lm_head"]

    def __init__(self, hf, tokenizer, *, source: dict):
        from vlopt.decode import HFGenerate

        self.hf = hf                  # the transformers module: save_pretrained / from_pretrained
        self.tokenizer = tokenizer
        self.source = source          # how it was built: {"preset": ...} or {"path": ...}
        self.decoding = Decoding(self, HFGenerate())   # stage 4; engine passes install or wrap engines here
        self.feature_store: FeatureStore | None = None  # visual rows kept across calls (feature_cache)
        self.feature_filters = []     # (vlm, VisualFeatures) -> VisualFeatures, e.g. visual-token pruning
        self.need_cls_attention = False   # features() also scores each row by its CLS attention

    # ---- stages 1–3, per model ------------------------------------------------------------------
    def load_input(self, path: str | None, workload: Workload) -> Any:
        """Stage 1: read the raw input (or the deterministic demo input when `path` is None)."""
        raise NotImplementedError

    def preprocess(self, raw: Any, question: str, workload: Workload) -> dict:
        """Stage 2: raw input → pixel tensors on the device, prompt → ids."""
        raise NotImplementedError

    def prompt(self, question: str, workload: Workload) -> dict:
        """The text half of stage 2: prompt ids (with placeholders) and what `assemble` needs."""
        raise NotImplementedError

    def features(self, prepared: dict) -> VisualFeatures:
        """Stage 3's vision half: the visual rows (question-independent), with CLS scores and groups
        when `need_cls_attention` is set."""
        raise NotImplementedError

    def assemble(self, prepared: dict, feats: torch.Tensor) -> Stage4Input:
        """Stage 3's text half: splice the visual rows `feats` [rows, hidden] into the prompt embeddings."""
        raise NotImplementedError

    @torch.no_grad()
    def visual(self, prepared: dict) -> torch.Tensor:
        """Visual rows after every feature filter (what a feature store keeps)."""
        feats = self.features(prepared)
        for keep_rows in self.feature_filters:
            feats = keep_rows(self, feats)
        return feats.rows

    @property
    def feature_tag(self) -> str:
        """Names the filters, so cached features are keyed by what produced them."""
        return "|".join(getattr(f, "tag", type(f).__name__) for f in self.feature_filters)

    @torch.no_grad()
    def encode(self, prepared: dict) -> Stage4Input:
        """Stage 3: vision encoder → projector (→ adaptor, pooling) → spliced into embeddings."""
        return self.assemble(prepared, self.visual(prepared))

    # ---- the decoder, the same for both models ----------------------------------------------------
    @property
    def text_model(self):
        """The `LlamaModel`: embed_tokens, layers, norm, rotary_emb."""
        raise NotImplementedError

    @property
    def decoder_prefix(self) -> str:
        """Qualified name of `text_model` inside `hf` (module selection is by qualified name)."""
        raise NotImplementedError

    @property
    def lm_head(self):
        return self.hf.lm_head

    def decoder_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The stage-4 modules with their qualified names: embeddings, layers, final norm, lm_head."""
        tm, p = self.text_model, self.decoder_prefix
        return [(f"{p}.embed_tokens", tm.embed_tokens), (f"{p}.layers", tm.layers), (f"{p}.norm", tm.norm),
                ("lm_head", self.lm_head)]

    @property
    def vision_dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(ids.to(self.device))

    @property
    def weights_trained(self) -> bool | None:
        """Whether answers can mean anything (quality is measured only then): True for trained
        weights, False for a preset's seeded random init, None when nothing says (a checkpoint
        without a mark, e.g. a release). Read from `source["weights"]` ("trained" | "random"; the
        builder or loader sets it, `load_model` fills it in) or the mark the weights carry in their
        config (`WEIGHTS_MARK`, saved with them); vlopt.train's fresh model has `source["trained"]`."""
        mark = self.source.get("weights") or getattr(self.hf.config, WEIGHTS_MARK, None)
        if mark is None and "trained" in self.source:
            mark = "trained"
        if mark is None and "preset" in self.source:   # a preset builder that loads weights says so
            mark = "random"
        return {"trained": True, "random": False}.get(mark)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def workload(self, name: str | None = None) -> Workload:
        """A workload of this model (its default when `name` is None)."""
        return get_workload(name or self.default_workload, model=self.name)

    def stage4(self, inp: Stage4Input, *, new_tokens: int, fixed: bool = True):
        """Stage 4 through the installed engine and the wrappers around it."""
        return self.decoding.generate(inp, new_tokens=new_tokens, fixed=fixed)

    def run_stages(self, raw_path: str | None, workload: Workload, question: str, timer=None) -> Stage4Input:
        """Stages 1–3, each inside `timer(stage)` (a context manager such as `Stopwatch.phase`). With a
        feature store, stored rows of this input skip loading, preprocessing and the vision encoder:
        only the prompt is tokenized and spliced."""
        timer = timer or _no_timer
        store = self.feature_store
        if store is not None:
            with timer("1"):
                key = store.key(self, raw_path, workload)
                rows = store.get(key)
            if rows is not None:
                with timer("2"):
                    prepared = self.prompt(question, workload)
                with timer("3"):
                    return self.assemble(prepared, rows.to(self.device))
        with timer("1"):
            raw = self.load_input(raw_path, workload)
        with timer("2"):
            prepared = self.preprocess(raw, question, workload)
        with timer("3"):
            rows = self.visual(prepared)
            if store is not None:
                store.put(key, rows)
            return self.assemble(prepared, rows)


def seeded_init(device: str, seed: int = 0):
    """Random weights that are the same on every build of a preset (per device kind), without
    disturbing the caller's random state."""
    @contextlib.contextmanager
    def scope():
        devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return scope()


def _no_timer(stage: str):
    return contextlib.nullcontext()

"""What every model adapter provides: stages 1–3 producing a model-agnostic `Stage4Input`.

Stage 4 is then the same code for both models: the LLaMA decoder generating from `inputs_embeds`.
Passes change a model through two documented extension points of `VLModel`: `engine` (how stage 4
decodes) and `vision` (how stages 1–3 produce features), or by changing the modules of `hf` in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlopt.errors import VloptError
from vlopt.models import Workload  # noqa: F401  (adapters import it from here)


@dataclass
class Stage4Input:
    """What every stage-4 pass and the benchmark see."""

    embeds: torch.Tensor                   # [1, L, hidden]: text embeddings with visual rows spliced in
    attention_mask: torch.Tensor           # [1, L]
    visual_spans: list[tuple[int, int]]    # [start, end) of the visual rows
    visual_meta: dict[str, Any] = field(default_factory=dict)  # e.g. per-row CLS attention (pruning)

    @property
    def context_tokens(self) -> int:
        return int(self.embeds.shape[1])

    @property
    def visual_tokens(self) -> int:
        return sum(e - s for s, e in self.visual_spans)


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
        self.engine = HFGenerate()    # stage 4; a decode-engine pass replaces it
        self.vision = None            # optional cache in front of stages 1–3 (feature_cache)
        self.stop_rule = None         # optional early end of the answer (early_stop); engines honour it
        self.feature_filters = []     # (vlm, prepared, feats) -> feats, e.g. visual-token pruning
        self.need_cls_attention = False   # features() also records each row's CLS-attention score

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

    def features(self, prepared: dict) -> torch.Tensor:
        """Stage 3's vision half: [rows, hidden] visual features (question-independent)."""
        raise NotImplementedError

    def assemble(self, prepared: dict, feats: torch.Tensor) -> Stage4Input:
        """Stage 3's text half: splice `feats` into the prompt embeddings."""
        raise NotImplementedError

    @torch.no_grad()
    def visual(self, prepared: dict) -> torch.Tensor:
        """Visual rows after every feature filter (what a feature cache stores)."""
        feats = self.features(prepared)
        for keep_rows in self.feature_filters:
            feats = keep_rows(self, prepared, feats)
        return feats

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
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def replace_engine(self, engine) -> None:
        """Install another stage-4 engine (engine passes call this). An engine that must not be
        replaced — one whose effect lives in transformers' own forward — says why in `exclusive`."""
        why = getattr(self.engine, "exclusive", None)
        if why:
            raise VloptError(why)
        self.engine = engine

    def stage4(self, inp: Stage4Input, *, new_tokens: int, fixed: bool = True):
        """Stage 4 through the current engine."""
        return self.engine.generate(self, inp, new_tokens=new_tokens, fixed=fixed)

    def run_stages(self, raw_path: str | None, workload: Workload, question: str, timer=None) -> Stage4Input:
        """Stages 1–3, each inside `timer(stage)` (a context manager), through the feature cache
        when a pass installed one."""
        timer = timer or _no_timer
        if self.vision is not None:
            return self.vision.run_stages(self, raw_path, workload, question, timer)
        with timer("1"):
            raw = self.load_input(raw_path, workload)
        with timer("2"):
            prepared = self.preprocess(raw, question, workload)
        with timer("3"):
            return self.encode(prepared)


def seeded_init(device: str, seed: int = 0):
    """Random weights that are the same on every build of a preset (per device kind), without
    disturbing the caller's random state."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return scope()


class _NoTimer:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_timer(stage: str) -> _NoTimer:
    return _NoTimer()

"""The stage-4 contract: what model adapters hand to stage 4, what an engine is, and how passes
change decoding by declaring what they need instead of reaching into each other.

- `Stage4Input` (what stage 4 decodes from) and `VisualFeatures` (what an adapter's `features()`
  returns: rows, and per-row CLS scores and groups when asked for).
- `Engine`: `generate` and `score`, and the `capabilities` it offers; optionally `generate_batch`
  (B prompts in one pass; without it `generate_rows` runs them one at a time).
- `Decoding`: the holder on every model (`vlm.decoding`). It runs the installed engine inside the
  wrappers passes added, carries the decoding options passes set (stop rule, prefix reuse, head
  shards), and checks compatibility from what each engine offers and each wrapper needs.
- Module protocols the engine looks for: `DensePrefill` (a dense weight for many-row products) and
  `Fusable` (a module class that stacks its own kind for fused projections); for weights that are
  tensor subclasses, `register_row_stacker` (a weight pass says how its tensors stack by rows).
- `Stopwatch`: the one timing helper (device-synchronized laps) used by every engine and the bench.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from vlopt.errors import VloptError

if TYPE_CHECKING:      # importing this module (a pass declaring a wrapper) must not import torch
    import torch

# What an engine can offer; a wrapper or a pass names the one it needs.
TRANSFORMERS_FORWARD = "transformers_forward"   # decodes through transformers' own forward (hooks, kernels apply)
PREFIX_REUSE = "prefix_reuse"                   # keeps the KV of a prompt prefix shared with the previous call


# ---- what stage 4 decodes from ---------------------------------------------------------------------
@dataclass
class Stage4Input:
    """What every stage-4 pass and the benchmark see."""

    embeds: torch.Tensor                   # [1, L, hidden]: text embeddings with visual rows spliced in
    attention_mask: torch.Tensor           # [1, L]
    visual_spans: list[tuple[int, int]]    # [start, end) of the visual rows
    # (scene, question) when built from a synthetic scene (`vlopt.scenes`): a draft model of another
    # modality renders the same scene from it. Not part of what stage 4 decodes.
    origin: tuple | None = field(default=None, compare=False, repr=False)

    @property
    def context_tokens(self) -> int:
        return int(self.embeds.shape[1])

    @property
    def visual_tokens(self) -> int:
        return sum(e - s for s, e in self.visual_spans)


@dataclass
class VisualFeatures:
    """Stage 3's vision half: the visual rows in placeholder order, and — when the model is asked for
    them (`vlm.need_cls_attention`) — each row's CLS-attention score and its group (frame index;
    -1: a row every selection keeps)."""

    rows: torch.Tensor                     # [rows, hidden]
    cls_scores: torch.Tensor | None = None  # [rows]
    groups: torch.Tensor | None = None     # [rows], long

    def select(self, keep: torch.Tensor) -> VisualFeatures:
        """The rows where the boolean mask `keep` is set, in order."""
        cpu = keep.to("cpu")
        return VisualFeatures(self.rows[keep.to(self.rows.device)],
                              None if self.cls_scores is None else self.cls_scores[cpu.to(self.cls_scores.device)],
                              None if self.groups is None else self.groups[cpu.to(self.groups.device)])


@dataclass
class Stage4Result:
    tokens: list[int]          # the new tokens only
    prefill_s: float           # prompt forward → first token
    decode_s: float            # every later token
    info: dict = field(default_factory=dict)   # engine-specific (acceptance rate, kernel, …)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


@dataclass
class StopRule:
    """End the answer early: force EOS once P(EOS) ≥ `eos_threshold`, and/or after `max_sentences`
    sentence-ending tokens. Honoured by every engine in natural-length mode."""

    eos_threshold: float | None = None
    max_sentences: int | None = None
    sentence_end_ids: tuple[int, ...] = ()

    def sentences_done(self, tokens: list[int]) -> int | None:
        """Index after which the sentence budget is spent, or None."""
        if not self.max_sentences:
            return None
        seen = 0
        for i, t in enumerate(tokens):
            if t in self.sentence_end_ids:
                seen += 1
                if seen >= self.max_sentences:
                    return i
        return None


def answer_tokens(tokens: list[int], *, fixed: bool, eos: int, rule: StopRule | None) -> list[int]:
    """The answer an engine returns from the tokens it produced. A fixed budget keeps them all (EOS
    was masked while producing them); natural length ends where the stop rule's sentence budget is
    spent (EOS appended) or at the first EOS, which is kept — as transformers' `generate` does."""
    if fixed:
        return tokens
    if rule is not None and (cut := rule.sentences_done(tokens)) is not None:
        tokens = tokens[: cut + 1] + [eos]
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens


# ---- engines and the holder ------------------------------------------------------------------------
class Engine(Protocol):
    """How stage 4 decodes. `generate` times and produces tokens: a fixed budget is exactly
    transformers' `generate(min_new_tokens=N, max_new_tokens=N)` (EOS masked until N tokens);
    natural length stops at EOS or the model's stop rule. `score` returns the teacher-forced
    logits [len(tokens), vocab] (float32, CPU) of `tokens` through the engine's own math."""

    name: str
    capabilities: frozenset[str]

    def generate(self, vlm, inp: Stage4Input, *, new_tokens: int, fixed: bool = True) -> Stage4Result: ...

    def score(self, vlm, inp: Stage4Input, tokens: list[int]) -> torch.Tensor: ...

    # Optional: `generate_batch(vlm, inputs: list[Stage4Input], *, new_tokens, fixed) -> list[Stage4Result]`,
    # one result per input, the greedy answers those of `generate` on each input alone. An engine
    # without it is served by `generate_rows`.


def generate_rows(engine, vlm, inputs: list[Stage4Input], *, new_tokens: int, fixed: bool = True) -> list[Stage4Result]:
    """Every engine's batch: the engine's own `generate_batch` when it has one, else its `generate`
    on each input in turn (each result then has its own row's times and `info["batch"] == 1`)."""
    if hasattr(engine, "generate_batch"):
        return engine.generate_batch(vlm, inputs, new_tokens=new_tokens, fixed=fixed)
    results = [engine.generate(vlm, inp, new_tokens=new_tokens, fixed=fixed) for inp in inputs]
    for r in results:
        r.info = {**r.info, "batch": 1}
    return results


class Wrapper:
    """Something a pass puts around every stage-4 call (a kernel choice, hooks armed for the call).

    `needs`: the engine capability it works through (None: any engine). When an engine without it
    is installed later, a wrapper with `refuses_other_engines` stops that with `why`; any other is
    left out, and `why` becomes a note of the pass that installed the engine."""

    name: ClassVar[str] = "wrapper"
    needs: ClassVar[str | None] = None
    refuses_other_engines: ClassVar[bool] = False
    # True: `around_batch(inputs)` serves a whole batch in one call (a wrapper that does not depend
    # on the input). False: a batch runs row by row, each row inside `around(inp)`.
    batches: ClassVar[bool] = False
    why: str = ""

    def around(self, inp: Stage4Input):
        return contextlib.nullcontext()

    def around_batch(self, inputs: list[Stage4Input]):
        return self.around(inputs[0])

    def info(self) -> dict:
        """Merged into each result's `info` (what the report shows per row)."""
        return {}


class Decoding:
    """Stage 4 of one model (`vlm.decoding`): the installed engine, the wrappers around it and the
    decoding options passes declare. Engines read the options; nothing else touches an engine."""

    def __init__(self, vlm, engine: Engine):
        self.vlm = vlm
        self.engine = engine
        self.installed_by: str | None = None     # the pass that installed the engine (None: the baseline)
        self.wrappers: list[Wrapper] = []
        self.stop_rule: StopRule | None = None   # early_stop; engines honour it in natural-length mode
        self.reuse_prefix = False                # feature_cache prefix; needs PREFIX_REUSE
        self.shards = 1                          # tensor_parallel: the decoder's heads are split this many ways
        self._needs: list[tuple[str, str]] = []  # (capability, why) that passes require of every engine

    @property
    def name(self) -> str:
        return "+".join([self.engine.name, *(w.name for w in self.wrappers)])

    def install(self, engine: Engine, *, by: str) -> list[str]:
        """Replace the engine (an engine pass). Refused when another pass installed the current one,
        or when something in place needs a capability the new engine lacks and refuses other
        engines. Returns the notes of wrappers left out because the new engine does not run them."""
        if self.installed_by is not None:
            raise VloptError(f"{by} would replace the stage-4 engine that {self.installed_by} installed "
                             f"({self.engine.name}); each decodes stage 4 its own way, so use one of them")
        refusals = [why for cap, why in self._needs if cap not in engine.capabilities]
        refusals += [w.why for w in self.wrappers
                     if w.needs and w.needs not in engine.capabilities and w.refuses_other_engines]
        if refusals:
            raise VloptError(refusals[0])
        dropped = [w for w in self.wrappers if w.needs and w.needs not in engine.capabilities]
        self.wrappers = [w for w in self.wrappers if w not in dropped]
        self.engine, self.installed_by = engine, by
        return [w.why for w in dropped]

    def wrap(self, wrapper: Wrapper) -> None:
        """Run every later stage-4 call inside `wrapper.around(inp)`."""
        if wrapper.needs and wrapper.needs not in self.engine.capabilities:
            raise VloptError(wrapper.why)
        self.wrappers.append(wrapper)

    def require(self, capability: str, why: str) -> None:
        """Declare that a pass needs `capability` of this engine and of any engine installed later."""
        if capability not in self.engine.capabilities:
            raise VloptError(why)
        self._needs.append((capability, why))

    def wrapper(self, name: str) -> Wrapper:
        return next(w for w in self.wrappers if w.name == name)

    @contextlib.contextmanager
    def _wrapped(self, inp: Stage4Input):
        with contextlib.ExitStack() as stack:
            for w in self.wrappers:
                stack.enter_context(w.around(inp))
            yield

    def generate(self, inp: Stage4Input, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        with self._wrapped(inp):
            result = self.engine.generate(self.vlm, inp, new_tokens=new_tokens, fixed=fixed)
        for w in self.wrappers:
            result.info = {**result.info, **w.info()}
        return result

    def unbatched(self) -> list[str]:
        """Names of the wrappers that cannot serve a batch in one call (a batch then runs row by row)."""
        return [w.name for w in self.wrappers if not w.batches]

    def generate_batch(self, inputs: list[Stage4Input], *, new_tokens: int, fixed: bool = True) -> list[Stage4Result]:
        """Stage 4 of several inputs: one result per input, in order. In one pass of the engine when
        it batches and every wrapper does; otherwise row by row through `generate` (each result's
        info says `batch: 1` and, when a wrapper was the reason, `unbatched_by`)."""
        if not inputs:
            return []
        blockers = self.unbatched()
        if blockers:
            results = [self.generate(inp, new_tokens=new_tokens, fixed=fixed) for inp in inputs]
            for r in results:
                r.info = {**r.info, "batch": 1, "unbatched_by": blockers}
            return results
        with contextlib.ExitStack() as stack:
            for w in self.wrappers:
                stack.enter_context(w.around_batch(inputs))
            results = generate_rows(self.engine, self.vlm, inputs, new_tokens=new_tokens, fixed=fixed)
        for r in results:
            for w in self.wrappers:
                r.info = {**r.info, **w.info()}
        return results

    def score(self, inp: Stage4Input, tokens: list[int]) -> torch.Tensor:
        with self._wrapped(inp):
            return self.engine.score(self.vlm, inp, tokens)


# ---- what the engine looks for in modules ----------------------------------------------------------
@runtime_checkable
class DensePrefill(Protocol):
    """A Linear-like module with a dense form of its weight: multiplying hundreds of prompt rows by
    it beats a one-row low-bit kernel (int4's modules offer it)."""

    def prefill_weight(self) -> torch.Tensor: ...


@runtime_checkable
class Fusable(Protocol):
    """A module class that can stack modules of its own kind into one whose output is theirs side by
    side (fast_decode's fused q/k/v and gate/up), or return None to stay unfused. The originals must
    keep working: transformers' forward still calls them."""

    @staticmethod
    def fuse(modules: list) -> Any: ...


ROW_STACKERS: dict[str, Any] = {}


def register_row_stacker(tensor_type: str, stack) -> None:
    """Declare that weights of `tensor_type` ("module.QualName" of a weight pass's quantized tensor
    class, kept in ordinary Linear modules; a name, so declaring it imports nothing) stack along
    their output rows: `stack(weights)` returns one tensor of that type whose product is theirs side
    by side and whose row slices are views, or None when these cannot be stacked. fast_decode then
    fuses q/k/v and gate/up of such weights as it fuses plain ones — also in a model loaded with
    them, where the pass itself does not run again."""
    ROW_STACKERS[tensor_type] = stack


def row_stacker(tensor_type: type):
    return ROW_STACKERS.get(f"{tensor_type.__module__}.{tensor_type.__qualname__}")


# ---- shared math ----------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding of `x` with cos/sin already broadcastable to it."""
    return x * cos + rotate_half(x) * sin


# ---- timing ---------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds per named phase. The device is synchronized at every boundary: CUDA work is
    asynchronous, so a host clock alone would time the launches, not the work."""

    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._mark = None

    def start(self) -> None:
        sync(self.device)
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Add the time since `start` or the previous lap to `phase`."""
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def phase(self, name: str):
        self.start()
        yield
        self.lap(name)

"""vlopt's stage-4 decode loop (gpt-fast style) on the model's own decoder modules.

The phases are functions of a `Decoder` (the model's layers over a static KV cache):
- `prefill(dec, embeds, start)`: the prompt through every layer, writing its KV; eager (compute-bound);
- `decode_one_token(dec, token, pos)`: one token through every layer — the unit `compile_step`
  compiles and, on CUDA, captures once as a graph that is replayed per token (one launch instead
  of hundreds of kernel launches from Python);
- `decode_n_tokens(step, token, pos, n, …)`: the loop; tokens stay on the device and the host syncs
  every `check_every` tokens only in natural-length mode, to look for EOS;
- `FastDecodeEngine.generate`: prefill, then decode_n_tokens, timed by one `Stopwatch`.

Weights are never copied: each step calls the HF modules (`q_proj`, `mlp`, norms, `lm_head`), so
torchao weight-only tensors dispatch to their own kernels inside the compiled step. What the loop
does beyond that comes from declared contracts (`vlopt.stage4`): modules offering `DensePrefill` or
`Fusable`, and the model's decoding options (stop rule, prefix reuse, head shards).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from vlopt.stage4 import (PREFIX_REUSE, DensePrefill, Fusable, Stage4Result, Stopwatch, answer_tokens,
                          apply_rope, sync)

_NO_DEQUANTIZE: set[type] = set()   # tensor types whose dequantize() is not implemented
DENSE_ROWS = 16                     # from this many rows on, a product runs on dense weights


def linear(module, x: torch.Tensor, dense: bool) -> torch.Tensor:
    """`module(x)`, except that for many rows (prefill) a weight-only quantized weight is made dense
    first: low-bit GEMV kernels are built for one row and slow at hundreds of rows, while
    dequantizing a layer costs one pass over its weights. A module offering `DensePrefill` gives its
    own dense form (int4's modules, whose packed layouts torchao cannot dequantize); a torchao
    tensor is dequantized where torchao implements it; anything else keeps its own kernel."""
    if dense and isinstance(module, DensePrefill):
        return F.linear(x, module.prefill_weight().to(x.dtype), module.bias)
    kind = type(getattr(module, "weight", None))
    if dense and kind not in (torch.nn.Parameter, torch.Tensor, type(None)) and kind not in _NO_DEQUANTIZE:
        try:
            dense_w = module.weight.dequantize()
        except (NotImplementedError, RuntimeError, AttributeError):
            _NO_DEQUANTIZE.add(kind)
        else:
            return F.linear(x, dense_w.to(x.dtype), module.bias)
    return module(x)


def fuse_projections(vlm) -> list | None:
    """Per layer, [q;k;v] and [gate;up] in one buffer each, so a decode step reads them in two large
    products instead of five small ones (measured: bench/results/h100/fuse.md). The modules'
    weights become views into those buffers — same values, no extra memory, and the HF forward and
    checkpoints see the usual per-module tensors. Plain weights without bias are concatenated;
    modules whose class is `Fusable` (vlopt's int4) stack their own kind; anything else stays
    unfused (None), e.g. torchao int8."""
    mods = [(a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
            for a, m in ((layer.self_attn, layer.mlp) for layer in vlm.text_model.layers)]
    kind = type(mods[0][0])
    if isinstance(mods[0][0], Fusable) and all(type(x) is kind for group in mods for x in group):
        fused = [(kind.fuse(list(group[:3])), kind.fuse(list(group[3:]))) for group in mods]
        return None if any(f is None for pair in fused for f in pair) else fused
    if any(type(getattr(x, "weight", None)) is not torch.nn.Parameter or type(x.weight.data) is not torch.Tensor
           or x.bias is not None for group in mods for x in group):
        return None
    fused = []
    for group in mods:
        buffers = []
        for part in (group[:3], group[3:]):
            buffer = torch.cat([x.weight.detach() for x in part])
            start = 0
            for x in part:
                rows = x.weight.shape[0]
                x.weight = torch.nn.Parameter(buffer[start:start + rows], requires_grad=x.weight.requires_grad)
                start += rows
            buffers.append(buffer)
        fused.append(tuple(buffers))
    return fused


def weights_signature(vlm) -> tuple:
    """Identity of the weights a decoder, its fused buffers and a compiled step were built on. A later
    weight pass (int8/int4 after fast_decode) replaces parameter objects, so all are rebuilt."""
    tm = vlm.text_model
    params = [*tm.layers[0].parameters(), *tm.layers[-1].parameters(), *vlm.lm_head.parameters()]
    return (id(vlm), tm.config._attn_implementation, vlm.dtype,
            tuple((id(p), type(p.data).__name__) for p in params))


class StaticCache:
    """One K and one V tensor per layer, [1, kv_heads, max_len, head_dim], at fixed addresses (the
    captured graph writes into them)."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (1, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len


class Decoder:
    """The model's decoder layers over a static KV cache of `max_len` positions (the gpt-fast
    `Transformer`). Token choice follows three inputs: `temperature`, the stop rule's
    `eos_threshold`, and `eos_bias` — a [vocab] tensor, -inf at EOS while a fixed budget forbids it,
    set per call without rebuilding a compiled step."""

    def __init__(self, vlm, *, max_len: int, fused: list | None, temperature: float = 0.0,
                 eos_threshold: float | None = None):
        tm = vlm.text_model
        cfg = tm.config
        self.vlm = vlm
        self.layers = list(tm.layers)
        self.fused = fused
        self.temperature = temperature
        self.eos_threshold = eos_threshold
        self.eos_id = vlm.eos_token_id
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shards = vlm.decoding.shards                 # heads this process holds (tensor_parallel)
        self.n_heads = cfg.num_attention_heads // shards
        self.kv_heads = (cfg.num_key_value_heads or cfg.num_attention_heads) // shards
        self.cache = StaticCache(len(self.layers), self.kv_heads, max_len, self.head_dim, vlm.dtype, vlm.device)
        positions = torch.arange(max_len, device=vlm.device)[None]
        probe = torch.empty(1, dtype=vlm.dtype, device=vlm.device)
        cos, sin = tm.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]                       # [max_len, head_dim]
        self.key_positions = torch.arange(max_len, device=vlm.device)
        self.eos_bias = torch.zeros(vlm.lm_head.weight.shape[0], dtype=vlm.dtype, device=vlm.device)
        self.weights = weights_signature(vlm)       # after fusing: fused projections are new (view) parameters

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def forbid_eos(self, forbid: bool) -> None:
        """Mask EOS out of every token choice (a fixed budget: transformers' min_new_tokens)."""
        self.eos_bias[self.eos_id] = float("-inf") if forbid else 0.0

    def forward(self, x: torch.Tensor, pos: torch.Tensor, *, causal: bool, layers: int | None = None) -> torch.Tensor:
        """x [1, T, hidden] at positions `pos` [T] → final hidden states [1, T, hidden] (normed),
        through the first `layers` layers (all by default). `causal`: positions 0..T-1, attending
        over what they just wrote; otherwise each row attends to every cached position ≤ its own."""
        T = x.shape[1]
        cos = self.cos[pos][None, None]
        sin = self.sin[pos][None, None]
        mask = None if causal else (self.key_positions[None, :] <= pos[:, None])[None, None]   # [1,1,T,max_len]
        dense = T >= DENSE_ROWS
        q_rows, kv_rows = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers[:layers]):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            if self.fused:
                q, k, v = _fused(self.fused[i][0], h, dense).split([q_rows, kv_rows, kv_rows], -1)
            else:
                q, k, v = linear(attn.q_proj, h, dense), linear(attn.k_proj, h, dense), linear(attn.v_proj, h, dense)
            q = apply_rope(q.view(1, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            kc, vc = self.cache.k[i], self.cache.v[i]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            gqa = self.n_heads != self.kv_heads
            if causal:
                o = F.scaled_dot_product_attention(q, kc[:, :, :T], vc[:, :, :T], is_causal=True, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=gqa)
            x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(1, T, q_rows), dense)
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            if self.fused:
                gate, up = _fused(self.fused[i][1], h, dense).chunk(2, -1)
            else:
                gate, up = linear(mlp.gate_proj, h, dense), linear(mlp.up_proj, h, dense)
            x = x + linear(mlp.down_proj, mlp.act_fn(gate) * up, dense)
        return self.vlm.text_model.norm(x)

    def pick(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next token after each row of final hidden states [..., hidden] → [...]."""
        logits = self.vlm.lm_head(hidden) + self.eos_bias
        if self.temperature <= 0:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / self.temperature, -1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p, and stays graph-capturable.
            token = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
        if self.eos_threshold is not None:
            p_eos = torch.softmax(logits.float(), -1)[..., self.eos_id]
            token = torch.where(p_eos >= self.eos_threshold, torch.full_like(token, self.eos_id), token)
        return token


def decoder_for(vlm, current: Decoder | None, needed: int, *, fuse: bool = False, temperature: float = 0.0,
                block: int = 256) -> Decoder:
    """`current` when it was built on the model's current weights and stop rule and holds `needed`
    positions; else a new decoder (cache length rounded up to `block`, so one compiled step serves a
    workload). Projections are fused once per set of weights."""
    rule = vlm.decoding.stop_rule
    threshold = rule.eos_threshold if rule else None
    same_weights = current is not None and current.weights == weights_signature(vlm)
    if same_weights and current.max_len >= needed and current.eos_threshold == threshold:
        return current
    fused = current.fused if same_weights else (fuse_projections(vlm) if fuse else None)
    max_len = max(-(-needed // block) * block, current.max_len if same_weights else 0)
    return Decoder(vlm, max_len=max_len, fused=fused, temperature=temperature, eos_threshold=threshold)


def _fused(weight_or_module, h: torch.Tensor, dense: bool) -> torch.Tensor:
    """A fused projection: a stacked plain weight, or a module that a weight pass stacked."""
    if isinstance(weight_or_module, torch.Tensor):
        return F.linear(h, weight_or_module)
    return linear(weight_or_module, h, dense)


# ---- the phases --------------------------------------------------------------------------------------
@torch.no_grad()
def prefill(dec: Decoder, embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Write the KV of prompt rows `embeds` at positions start.. and return the first new token [1]."""
    pos = torch.arange(start, start + embeds.shape[1], device=embeds.device)
    h = dec.forward(embeds.to(dec.vlm.dtype), pos, causal=(start == 0))
    return dec.pick(h[:, -1])[0].reshape(1)


def decode_one_token(dec: Decoder, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The token after `token` [1] at position `pos` [1] (its KV written into the cache)."""
    x = dec.vlm.text_model.embed_tokens(token)[None]          # [1,1,hidden]
    return dec.pick(dec.forward(x, pos, causal=False)[:, -1])[0].reshape(1)


@torch.no_grad()
def teacher_forced(dec: Decoder, inp, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] (float32, CPU) predicting each of `tokens` after the prompt and the
    tokens before it: one causal prefill over both (it overwrites the cache from position 0)."""
    vlm = dec.vlm
    ids = torch.tensor([tokens[:-1]], device=vlm.device)
    embeds = torch.cat([inp.embeds.to(vlm.dtype), vlm.embed(ids)], dim=1)
    h = dec.forward(embeds, torch.arange(embeds.shape[1], device=vlm.device), causal=True)
    L = inp.context_tokens
    return vlm.lm_head(h[0, L - 1: L - 1 + len(tokens)]).float().cpu()


class CompiledStep:
    """`decode_one_token` of one decoder as it runs: compiled (`torch.compile`, fullgraph, static
    shapes) and, on CUDA, captured once as a graph over static token/position buffers."""

    def __init__(self, dec: Decoder, *, compile: bool, cuda_graph: bool, mode: str | None, tune: bool):
        self.dec = dec

        def fn(token, pos):
            return decode_one_token(dec, token, pos)

        if compile:
            fn = torch.compile(fn, fullgraph=True, dynamic=False, **({"mode": mode} if mode else {}))
        self.fn, self.compiled, self.tune = fn, compile, tune
        self.use_graph = cuda_graph and dec.vlm.device.type == "cuda"
        self.graph = None
        self.compile_s = self.capture_s = 0.0

    def _tuning(self):
        """Inductor's coordinate-descent tuning of the step's Triton kernels (block sizes, warps) while
        the step compiles: measured on the H100 to matter at batch 1 (bench/results/h100/fuse.md)."""
        if not (self.compiled and self.tune):
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config
        return inductor_config.patch(coordinate_descent_tuning=True)

    def warm(self, pos: int) -> None:
        """Compile (and capture) now, outside any timed region. The warm-up writes one KV row at
        `pos`, a position the next prefill or decode step overwrites before reading it."""
        device = self.dec.vlm.device
        token = torch.zeros(1, dtype=torch.long, device=device)
        position = torch.tensor([pos], device=device)
        watch = Stopwatch(device)
        if self.compiled or self.use_graph:
            watch.start()
            with self._tuning():
                if self.use_graph:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):     # warm-up (compiles) outside the capture
                        for _ in range(3):
                            self.fn(token, position)
                    torch.cuda.current_stream().wait_stream(stream)
                else:
                    self.fn(token, position)
            watch.lap("compile")
        if self.use_graph:
            self.token, self.pos = token, position
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.fn(self.token, self.pos)
            watch.lap("capture")
            self.graph = graph
        self.compile_s += watch.seconds["compile"]
        self.capture_s += watch.seconds["capture"]

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.token.copy_(token)
            self.pos.copy_(pos)
            self.graph.replay()
            return self.out
        return self.fn(token, pos)


@torch.no_grad()
def decode_n_tokens(step, first: torch.Tensor, pos: int, n: int, *, done=None, check_every: int = 8) -> list[int]:
    """`first` and the tokens after it, n in all, one `step` each from position `pos`. With `done`
    (natural length), the host looks at the tokens every `check_every` and stops once
    `done(tokens)` is true."""
    out = torch.empty(n, dtype=torch.long, device=first.device)
    out[0] = first[0]
    position = torch.tensor([pos], device=first.device)
    token, produced = first, 1
    for i in range(1, n):
        token = step(token, position)
        out[i] = token[0]
        position += 1
        produced = i + 1
        if done is not None and produced % check_every == 0 and done(out[:produced].tolist()):
            break
    return out[:produced].tolist()


class FastDecodeEngine:
    """The `fast_decode` engine: static KV cache, eager prefill, compiled decode step replayed as a
    CUDA graph. The decoder, its fused projections and the step are rebuilt when the weights change
    (a weight pass after fast_decode), the cache and step when a call needs more positions."""

    name = "fast_decode"
    capabilities = frozenset({PREFIX_REUSE})

    def __init__(self, *, compile: bool = True, cuda_graph: bool = True, compile_mode: str | None = None,
                 block: int = 256, check_every: int = 8, temperature: float = 0.0,
                 fuse_projections: bool = False, tune: bool = False):
        self.compile, self.cuda_graph, self.compile_mode, self.tune = compile, cuda_graph, compile_mode, tune
        self.block = block                      # cache lengths round up to this, so one graph serves a workload
        self.check_every = check_every
        self.temperature = temperature
        self.fuse = fuse_projections
        self.decoder: Decoder | None = None
        self.step: CompiledStep | None = None
        self._prev_prompt = None                # prefix reuse: the previous prompt, whose KV is in the cache
        self.compile_s = self.capture_s = 0.0

    @property
    def fused(self) -> list | None:
        return self.decoder.fused if self.decoder is not None else None

    def bind(self, vlm, needed: int = 1) -> Decoder:
        """The decoder for the model's current weights with at least `needed` cache positions; a new
        one drops the compiled step and any reusable prefix."""
        dec = decoder_for(vlm, self.decoder, needed, fuse=self.fuse, temperature=self.temperature, block=self.block)
        if dec is not self.decoder:
            self.decoder, self.step, self._prev_prompt = dec, None, None
        return dec

    def compile_step(self, dec: Decoder, pos: int) -> CompiledStep:
        """The one compile step: build `decode_one_token`'s compiled/captured form once per decoder."""
        if self.step is None:
            self.step = CompiledStep(dec, compile=self.compile, cuda_graph=self.cuda_graph, mode=self.compile_mode,
                                     tune=self.tune)
            self.step.warm(pos)
            self.compile_s += self.step.compile_s
            self.capture_s += self.step.capture_s
        return self.step

    @torch.no_grad()
    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        L = inp.context_tokens
        dec = self.bind(vlm, L + new_tokens)
        dec.forbid_eos(fixed)
        step = self.compile_step(dec, L)
        rule = None if fixed else vlm.decoding.stop_rule
        eos = dec.eos_id
        done = None if fixed else (lambda seen: eos in seen or (rule is not None and rule.sentences_done(seen) is not None))
        watch = Stopwatch(vlm.device)
        watch.start()
        reused = self._common_prefix(inp.embeds) if vlm.decoding.reuse_prefix else 0
        first = prefill(dec, inp.embeds[:, reused:], start=reused)
        self._prev_prompt = inp.embeds.detach() if vlm.decoding.reuse_prefix else None
        watch.lap("prefill")
        tokens = decode_n_tokens(step, first, L, new_tokens, done=done, check_every=self.check_every)
        watch.lap("decode")
        return Stage4Result(answer_tokens(tokens, fixed=fixed, eos=eos, rule=rule),
                            watch.seconds["prefill"], watch.seconds["decode"], info={
                                "compile_s": self.compile_s, "capture_s": self.capture_s, "cache_len": dec.max_len,
                                "cuda_graph": self.step.graph is not None, "compiled": self.compile,
                                "prefix_reused": reused})

    def _common_prefix(self, embeds: torch.Tensor) -> int:
        """Rows at the start of this prompt identical to the previous prompt's, whose KV is still in
        the cache (decode only writes at positions past the previous prompt). At least one row is
        always recomputed, so prefill has a last position to predict from."""
        prev = self._prev_prompt
        if prev is None or prev.shape[-1] != embeds.shape[-1]:
            return 0
        n = min(prev.shape[1], embeds.shape[1]) - 1
        if n <= 0:
            return 0
        same = (prev[0, :n] == embeds[0, :n]).all(-1)
        return int(n if bool(same.all()) else int(same.long().argmin()))

    def score(self, vlm, inp, tokens: list[int]) -> torch.Tensor:
        """Teacher-forced logits of `tokens` through this engine's own math."""
        dec = self.bind(vlm, inp.context_tokens + len(tokens))
        self._prev_prompt = None                  # scoring overwrites the cache from position 0
        return teacher_forced(dec, inp, tokens)

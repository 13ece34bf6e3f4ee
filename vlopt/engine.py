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
                          apply_rope, row_stacker, sync)

_NO_DEQUANTIZE: set[type] = set()   # tensor types whose dequantize() is not implemented
DENSE_ROWS = 16                     # from this many rows on, a product runs on dense weights


def linear(module, x: torch.Tensor, dense: bool) -> torch.Tensor:
    """`module(x)`, except that for many rows (prefill) a weight-only quantized weight is made dense
    first: low-bit GEMV kernels are built for one row and slow at hundreds of rows, while
    dequantizing a layer costs one pass over its weights. A module offering `DensePrefill` gives its
    own dense form (int4's modules, whose packed layouts torchao cannot dequantize); a torchao
    tensor is dequantized where torchao implements it; anything else keeps its own kernel. Only a
    weight type that defines its own `dequantize` counts: torch's inherited one casts the stored
    codes (bitsandbytes' int8 / packed 4-bit data) to float without their scales."""
    if dense and isinstance(module, DensePrefill):
        return F.linear(x, module.prefill_weight().to(x.dtype), module.bias)
    kind = type(getattr(module, "weight", None))
    if (dense and kind not in _NO_DEQUANTIZE
            and getattr(kind, "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize):
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
    checkpoints see the usual per-module tensors. Plain weights without bias are concatenated, and
    so are tensor-subclass weights whose type a weight pass registered as row-stackable (torchao
    int8); modules whose class is `Fusable` (vlopt's int4) stack their own kind; anything else stays
    unfused (None)."""
    mods = [(a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
            for a, m in ((layer.self_attn, layer.mlp) for layer in vlm.text_model.layers)]
    kind = type(mods[0][0])
    if isinstance(mods[0][0], Fusable) and all(type(x) is kind for group in mods for x in group):
        fused = [(kind.fuse(list(group[:3])), kind.fuse(list(group[3:]))) for group in mods]
        return None if any(f is None for pair in fused for f in pair) else fused

    def kind_of(module):
        """torch.Tensor for a plain weight, the subclass for a Parameter of a tensor subclass (torchao's
        quantized weights), else None (a bias, or a Parameter subclass holding plain data: bitsandbytes')."""
        weight = getattr(module, "weight", None)
        if getattr(module, "bias", None) is not None or not isinstance(weight, torch.nn.Parameter):
            return None
        kind = type(weight.data)
        return kind if type(weight) in (torch.nn.Parameter, kind) else None

    weight_kind = kind_of(mods[0][0])
    stack = torch.cat if weight_kind is torch.Tensor else row_stacker(weight_kind) if weight_kind else None
    if stack is None or any(kind_of(x) is not weight_kind for group in mods for x in group):
        return None
    stacked = [[stack([x.weight.detach() for x in part]) for part in (group[:3], group[3:])] for group in mods]
    if any(buffer is None for pair in stacked for buffer in pair):
        return None
    for group, buffers in zip(mods, stacked):
        for part, buffer in zip((group[:3], group[3:]), buffers):
            start = 0
            for x in part:
                rows = x.weight.shape[0]
                x.weight = torch.nn.Parameter(buffer[start:start + rows], requires_grad=x.weight.requires_grad)
                start += rows
    return [tuple(buffers) for buffers in stacked]


def weights_signature(vlm) -> tuple:
    """Identity of the weights a decoder, its fused buffers and a compiled step were built on. A later
    weight pass (int8/int4 after fast_decode) replaces parameter objects, so all are rebuilt."""
    tm = vlm.text_model
    params = [*tm.layers[0].parameters(), *tm.layers[-1].parameters(), *vlm.lm_head.parameters()]
    return (id(vlm), tm.config._attn_implementation, vlm.dtype,
            tuple((id(p), type(p.data).__name__) for p in params))


class StaticCache:
    """One K and one V tensor per layer, [batch, kv_heads, max_len, head_dim], at fixed addresses (the
    captured graph writes into them)."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype, device, batch: int = 1):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len


class Decoder:
    """The model's decoder layers over a static KV cache of `max_len` positions (the gpt-fast
    `Transformer`). Token choice follows three inputs: `temperature`, the stop rule's
    `eos_threshold`, and `eos_bias` — a [vocab] tensor, -inf at EOS while a fixed budget forbids it,
    set per call without rebuilding a compiled step.

    With `batch` > 1 the cache holds that many rows, left-padded: every row's prompt ends at the
    same slot, so a decode step writes one slot for all rows, and `row_start` [batch] (a fixed
    buffer, set per call) says where each row's prompt begins — its RoPE position is slot −
    row_start and it attends to slots ≥ row_start only."""

    def __init__(self, vlm, *, max_len: int, fused: list | None, temperature: float = 0.0,
                 eos_threshold: float | None = None, batch: int = 1):
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
        self.batch = batch
        self.cache = StaticCache(len(self.layers), self.kv_heads, max_len, self.head_dim, vlm.dtype, vlm.device,
                                 batch=batch)
        self.row_start = torch.zeros(batch, dtype=torch.long, device=vlm.device)
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
        mask = None if causal else (self.key_positions[None, :] <= pos[:, None])[None, None]   # [1,1,T,max_len]
        return self.layers_forward(x, pos, self.cos[pos][None, None], self.sin[pos][None, None], mask=mask,
                                   causal_from=0 if causal else None, layers=layers)

    def layers_forward(self, x: torch.Tensor, write: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                       mask: torch.Tensor | None = None, causal_from: int | None = None, rows: slice = slice(None),
                       layers: int | None = None) -> torch.Tensor:
        """The layers over cache rows `rows`: x [B, T, hidden] with rotary cos/sin [B or 1, 1, T, head_dim]
        → final hidden states (normed). K/V are written at cache slots `write` [T]. Attention: with
        `causal_from`, causal among the T new rows (the cache's slots causal_from..+T); otherwise
        over the whole cache through the boolean `mask` [B, 1, T, max_len]."""
        B, T = x.shape[:2]
        dense = T >= DENSE_ROWS
        q_rows, kv_rows = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers[:layers]):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            if self.fused:
                q, k, v = _fused(self.fused[i][0], h, dense).split([q_rows, kv_rows, kv_rows], -1)
            else:
                q, k, v = linear(attn.q_proj, h, dense), linear(attn.k_proj, h, dense), linear(attn.v_proj, h, dense)
            q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            kc, vc = self.cache.k[i][rows], self.cache.v[i][rows]
            kc.index_copy_(2, write, k)
            vc.index_copy_(2, write, v)
            gqa = self.n_heads != self.kv_heads
            if causal_from is not None:
                span = slice(causal_from, causal_from + T)
                o = F.scaled_dot_product_attention(q, kc[:, :, span], vc[:, :, span], is_causal=True, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=gqa)
            x = x + linear(attn.o_proj, o.transpose(1, 2).reshape(B, T, q_rows), dense)
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

    def __init__(self, dec: Decoder, *, compile: bool, cuda_graph: bool, mode: str | None, tune: bool,
                 phase=None):
        self.dec = dec
        phase = phase or decode_one_token       # decode_one_token_batch for a batch decoder

        def fn(token, pos):
            return phase(dec, token, pos)

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
        token = torch.zeros(self.dec.batch, dtype=torch.long, device=device)
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


# ---- the batched phases (B prompts at once, left-padded into one cache; see `Decoder`) ---------------
@torch.no_grad()
def prefill_rows(dec: Decoder, inputs) -> torch.Tensor:
    """Write each prompt's KV into its cache row so that all prompts end at slot P (the longest),
    set `dec.row_start`, and return the first new token of every row [B]. Each row is prefilled on
    its own, at its own positions 0..L-1: the same math as a one-row prefill (so the first token is
    the single-row one), with a prefill's memory at any batch size; prefill is compute-bound, so
    stacking prompts would gain little."""
    lengths = [inp.context_tokens for inp in inputs]
    end = max(lengths)
    dec.row_start.copy_(torch.tensor([end - n for n in lengths], device=dec.row_start.device))
    first = []
    for b, (inp, n) in enumerate(zip(inputs, lengths)):
        h = dec.layers_forward(inp.embeds.to(dec.vlm.dtype), torch.arange(end - n, end, device=dec.vlm.device),
                               dec.cos[:n][None, None], dec.sin[:n][None, None], causal_from=end - n,
                               rows=slice(b, b + 1))
        first.append(dec.pick(h[:, -1]).reshape(1))
    return torch.cat(first)


def decode_one_token_batch(dec: Decoder, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The tokens after `token` [B], all written at cache slot `pos` [1]; row b is at RoPE position
    pos − row_start[b] and attends to slots row_start[b]..pos (its own prompt and answer)."""
    x = dec.vlm.text_model.embed_tokens(token)[:, None]                  # [B,1,hidden]
    rope = pos - dec.row_start                                           # [B]
    keys = dec.key_positions[None]
    mask = ((keys <= pos[:, None]) & (keys >= dec.row_start[:, None]))[:, None, None]   # [B,1,1,max_len]
    h = dec.layers_forward(x, pos, dec.cos[rope][:, None, None], dec.sin[rope][:, None, None], mask=mask)
    return dec.pick(h[:, -1])


@torch.no_grad()
def decode_n_tokens_batch(step, first: torch.Tensor, pos: int, n: int, *, done=None,
                          check_every: int = 8) -> list[list[int]]:
    """`decode_n_tokens` for B rows: `first` [B] and the tokens after it, n per row. With `done`
    (natural length), the loop ends once every row is done; a row that is done keeps stepping with
    the others (its extra tokens are cut by `answer_tokens`), so the step's shapes never change."""
    rows = first.shape[0]
    out = torch.empty(rows, n, dtype=torch.long, device=first.device)
    out[:, 0] = first
    position = torch.tensor([pos], device=first.device)
    token, produced = first, 1
    for i in range(1, n):
        token = step(token, position)
        out[:, i] = token
        position += 1
        produced = i + 1
        if done is not None and produced % check_every == 0 and all(map(done, out[:, :produced].tolist())):
            break
    return out[:, :produced].tolist()


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
        self.batch_decoder: Decoder | None = None   # the latest batch size's cache and step (one at a time:
        self.batch_step: CompiledStep | None = None  # a 7b batch-32 cache is tens of GB)

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

    def bind_batch(self, vlm, batch: int, needed: int) -> Decoder:
        """The batch decoder: `batch` cache rows of at least `needed` positions, on the single-row
        decoder's weights and fused projections (fused once per set of weights). A new one drops the
        previous batch size's cache and step first."""
        single = self.bind(vlm)
        cur = self.batch_decoder
        if (cur is not None and cur.weights == single.weights and cur.batch == batch and cur.max_len >= needed
                and cur.eos_threshold == single.eos_threshold):
            return cur
        keep = cur.max_len if cur is not None and cur.weights == single.weights and cur.batch == batch else 0
        self.batch_decoder = self.batch_step = None
        self.batch_decoder = Decoder(vlm, max_len=max(-(-needed // self.block) * self.block, keep), fused=single.fused,
                                     temperature=self.temperature, eos_threshold=single.eos_threshold, batch=batch)
        return self.batch_decoder

    def compile_batch_step(self, dec: Decoder, pos: int) -> CompiledStep:
        """`decode_one_token_batch` compiled (and captured) once per batch decoder."""
        if self.batch_step is None:
            self.batch_step = CompiledStep(dec, compile=self.compile, cuda_graph=self.cuda_graph,
                                           mode=self.compile_mode, tune=self.tune, phase=decode_one_token_batch)
            self.batch_step.warm(pos)
            self.compile_s += self.batch_step.compile_s
            self.capture_s += self.batch_step.capture_s
        return self.batch_step

    @torch.no_grad()
    def generate_batch(self, vlm, inputs, *, new_tokens: int, fixed: bool = True) -> list[Stage4Result]:
        """B prompts in one pass: each prefilled into its own cache row (left-padded to the longest),
        then one compiled step per token for all rows. A fixed budget gives every row `new_tokens`
        (EOS masked); natural length ends each row at its EOS or stop rule, and the loop once every
        row has ended. Each result carries the batch's times (every row waited for them)."""
        if len(inputs) == 1:
            return [self.generate(vlm, inputs[0], new_tokens=new_tokens, fixed=fixed)]
        end = max(inp.context_tokens for inp in inputs)
        dec = self.bind_batch(vlm, len(inputs), end + new_tokens)
        dec.forbid_eos(fixed)
        step = self.compile_batch_step(dec, end)
        rule = None if fixed else vlm.decoding.stop_rule
        eos = dec.eos_id
        done = None if fixed else (lambda seen: eos in seen or (rule is not None and rule.sentences_done(seen) is not None))
        watch = Stopwatch(vlm.device)
        watch.start()
        first = prefill_rows(dec, inputs)
        watch.lap("prefill")
        rows = decode_n_tokens_batch(step, first, end, new_tokens, done=done, check_every=self.check_every)
        watch.lap("decode")
        info = {"compile_s": self.compile_s, "capture_s": self.capture_s, "cache_len": dec.max_len,
                "cuda_graph": step.graph is not None, "compiled": self.compile, "batch": len(inputs),
                "prefix_reused": 0}
        return [Stage4Result(answer_tokens(tokens, fixed=fixed, eos=eos, rule=rule), watch.seconds["prefill"],
                             watch.seconds["decode"], info=dict(info)) for tokens in rows]

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


# ---- speculative decoding: one verification loop, drafts differ ------------------------------------
class LayerDraft:
    """The target's own first `layers` layers (+ final norm + lm_head) on the target's decoder and
    cache (LayerSkip's self-draft). The verify forward rewrites those layers' KV at every drafted
    position, so nothing needs rolling back."""

    def __init__(self, layers: int):
        self.layers = layers
        self.name = f"self (first {layers} layers)"
        self.info = {"draft": "self", "draft_layers": layers}

    def begin(self, dec: Decoder, inp, *, needed: int, fixed: bool) -> None:
        self.dec, self.start = dec, inp.context_tokens

    @torch.no_grad()
    def propose(self, out: list[int], k: int) -> list[int]:
        dec = self.dec
        dev = dec.vlm.device
        t, pos, drafts = torch.tensor([out[-1]], device=dev), self.start + len(out) - 1, []
        for p in range(pos, pos + k):
            h = dec.forward(dec.vlm.text_model.embed_tokens(t)[None], torch.tensor([p], device=dev), causal=False,
                            layers=self.layers)
            t = dec.pick(h[:, -1])
            drafts.append(t)
        return torch.cat(drafts).tolist() if drafts else []

    def keep(self, accepted: int) -> None:
        pass


class ModelDraft:
    """Another model drafting for the target: its own decoder on its own static cache, decoding from
    its own stage-4 input (`inputs(target_input)` gives it: the target's input itself when both share
    stages 1–3, else the draft's rendering of the same scene). Its cache keeps the KV of the accepted
    tokens it has seen (`have`); tokens it has not (the target's correction, a last accepted draft)
    are fed in one forward before the next drafts."""

    def __init__(self, vlm, inputs, *, name: str):
        self.vlm, self.inputs, self.name = vlm, inputs, name
        self.info = {"draft": name}
        self.dec: Decoder | None = None

    @torch.no_grad()
    def begin(self, dec: Decoder, inp, *, needed: int, fixed: bool) -> None:
        own = self.inputs(inp)
        self.dec = decoder_for(self.vlm, self.dec, own.context_tokens + needed)
        self.dec.forbid_eos(fixed)
        prefill(self.dec, own.embeds)
        self.start, self.have, self.fed = own.context_tokens, 0, 0

    @torch.no_grad()
    def propose(self, out: list[int], k: int) -> list[int]:
        self.fed = 0
        if k == 0:
            return []
        dec, dev = self.dec, self.vlm.device
        embed = self.vlm.text_model.embed_tokens
        pending = torch.tensor(out[self.have:], device=dev)
        pos = torch.arange(self.start + self.have, self.start + len(out), device=dev)
        t = dec.pick(dec.forward(embed(pending)[None], pos, causal=False)[:, -1])
        self.have, drafts = len(out), [t]
        for p in range(self.start + len(out), self.start + len(out) + k - 1):
            t = dec.pick(dec.forward(embed(t)[None], torch.tensor([p], device=dev), causal=False)[:, -1])
            drafts.append(t)
        self.fed = k - 1                          # drafts whose KV is in the cache (all but the last)
        return torch.cat(drafts).tolist()

    def keep(self, accepted: int) -> None:
        self.have += min(accepted, self.fed)


@torch.no_grad()
def verify_drafts(dec: Decoder, draft, first: int, *, start: int, new_tokens: int, draft_tokens: int,
                  done=None) -> tuple[list[int], dict]:
    """The verification loop every speculative engine shares. From the target's `first` token at
    position `start`, the draft proposes up to `draft_tokens` tokens; the target runs [last token,
    drafts] in one forward, keeps the longest prefix it agrees with plus its own next token, and the
    draft is told how many it kept (at natural length a proposal ends at a drafted EOS). Greedy: the
    tokens are the target's own (its `pick`, EOS bias included). Rejected KV rows lie beyond every
    later query's position until overwritten. Stops at
    `new_tokens` or once `done(tokens)` (natural length)."""
    dev = dec.vlm.device
    embed = dec.vlm.text_model.embed_tokens
    out, verifies, drafted, accepted = [first], 0, 0, 0
    while len(out) < new_tokens and not (done is not None and done(out)):
        k = min(draft_tokens, new_tokens - len(out) - 1)
        drafts = draft.propose(out, k) if k else []
        if done is not None and dec.eos_id in drafts:     # natural length: nothing after a drafted EOS counts
            drafts = drafts[: drafts.index(dec.eos_id) + 1]
        pos = start + len(out) - 1
        seq = torch.tensor([out[-1], *drafts], device=dev)
        preds = dec.pick(dec.forward(embed(seq)[None], torch.arange(pos, pos + len(seq), device=dev),
                                     causal=False)[0]).tolist()
        m = 0
        while m < len(drafts) and drafts[m] == preds[m]:
            m += 1
        draft.keep(m)
        out += drafts[:m] + [preds[m]]
        verifies, drafted, accepted = verifies + 1, drafted + len(drafts), accepted + m
    return out, {"verify_forwards": verifies, "drafted": drafted, "accepted": accepted,
                 "acceptance_rate": accepted / max(1, drafted), "tokens_per_verify": (len(out) - 1) / max(1, verifies)}


class SpeculativeEngine:
    """Greedy speculative decoding on the fast_decode phases: the target's prefill, then
    `verify_drafts` with any draft (`LayerDraft`: the target's first layers; `ModelDraft`: another
    model). The output is the target's greedy output, EOS masked under a fixed budget as in every
    engine. Eager (no graph): the accepted length varies per step."""

    capabilities = frozenset()

    def __init__(self, draft, *, draft_tokens: int, name: str = "speculative"):
        self.draft, self.draft_tokens, self.name = draft, draft_tokens, name
        self.decoder: Decoder | None = None

    @torch.no_grad()
    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        L, n = inp.context_tokens, self.draft_tokens
        self.decoder = dec = decoder_for(vlm, self.decoder, L + new_tokens + n + 1)
        dec.forbid_eos(fixed)
        rule = None if fixed else vlm.decoding.stop_rule
        eos = dec.eos_id
        done = None if fixed else (lambda seen: eos in seen or (rule is not None and rule.sentences_done(seen) is not None))
        watch = Stopwatch(vlm.device)
        watch.start()
        first = int(prefill(dec, inp.embeds))
        self.draft.begin(dec, inp, needed=new_tokens + n + 1, fixed=fixed)
        watch.lap("prefill")
        tokens, stats = verify_drafts(dec, self.draft, first, start=L, new_tokens=new_tokens, draft_tokens=n, done=done)
        watch.lap("decode")
        return Stage4Result(answer_tokens(tokens, fixed=fixed, eos=eos, rule=rule), watch.seconds["prefill"],
                            watch.seconds["decode"], info={**stats, **self.draft.info, "draft_tokens": n})

    def score(self, vlm, inp, tokens: list[int]) -> torch.Tensor:
        self.decoder = decoder_for(vlm, self.decoder, inp.context_tokens + len(tokens))
        return teacher_forced(self.decoder, inp, tokens)

"""A stage-4 decode loop owned by vlopt (gpt-fast style), on the model's own decoder modules.

- static KV cache sized to context + budget (rounded up, so one graph serves a workload);
- `prefill` (eager: it is compute-bound) and `decode_one_token` (compiled) as separate steps;
- on CUDA the compiled decode step is captured once as a CUDA graph and replayed per token, so a
  token costs one graph launch instead of hundreds of kernel launches from Python;
- tokens stay on the device; the host syncs only every `check_every` tokens to look for EOS.

Weights are never copied: each step calls the HF modules (`q_proj`, `mlp`, norms, `lm_head`), so
torchao weight-only int8/int4 tensors dispatch to their own kernels inside the compiled step.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from vlopt.decode import Stage4Result, sync


_NO_DEQUANTIZE: set[type] = set()   # tensor types whose dequantize() is not implemented


def _linear(module, x: torch.Tensor, dense: bool) -> torch.Tensor:
    """`module(x)`, except that for many rows (prefill) a weight-only quantized weight is dequantized
    first: low-bit GEMV kernels are built for one row and slow at hundreds of rows, while
    dequantizing a layer costs one pass over its weights. A weight pass may attach
    `module.prefill_weight()` (int4 does for tinygemm's tile-packed layout, which torchao cannot
    dequantize, and so does a module with int4 codes of vlopt's own); tensor types with neither keep
    their own kernel."""
    if dense and hasattr(module, "prefill_weight"):            # a weight pass's own dense form
        return F.linear(x, module.prefill_weight().to(x.dtype), module.bias)
    kind = type(getattr(module, "weight", None))
    if dense and kind not in (torch.nn.Parameter, torch.Tensor, type(None)):
        w = module.weight
        if kind not in _NO_DEQUANTIZE:
            try:
                dense_w = w.dequantize()
            except (NotImplementedError, RuntimeError, AttributeError):
                _NO_DEQUANTIZE.add(kind)
            else:
                return F.linear(x, dense_w.to(x.dtype), module.bias)
    return module(x)


def _fused(weight_or_module, h: torch.Tensor, dense: bool) -> torch.Tensor:
    """A fused projection: a stacked plain weight, or a module that a weight pass stacked."""
    if isinstance(weight_or_module, torch.Tensor):
        return F.linear(h, weight_or_module)
    return _linear(weight_or_module, h, dense)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StaticCache:
    """One K and one V tensor per layer, [1, kv_heads, max_len, head_dim], at fixed addresses (the
    captured graph writes into them)."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (1, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len


class DecodeEngine:
    """`VLModel.engine` replacement. `compile`: torch.compile the decode step; `cuda_graph`: capture it."""

    name = "fast_decode"

    def __init__(self, *, compile: bool = True, cuda_graph: bool = True, compile_mode: str | None = None,
                 block: int = 256, check_every: int = 8, temperature: float = 0.0, num_layers: int | None = None,
                 fuse_projections: bool = False, tune: bool = False):
        self.compile = compile
        self.fuse_projections = fuse_projections   # one q/k/v and one gate/up product per layer
        self.fused = None
        self.tune = tune
        self.cuda_graph = cuda_graph
        self.compile_mode = compile_mode
        self.block = block
        self.check_every = check_every
        self.temperature = temperature
        self.num_layers = num_layers       # a draft model uses only the first layers (layer_skip)
        self.cache: StaticCache | None = None
        self._vlm = None
        self._step = None
        self._graph = None
        self.compile_s = 0.0
        self.capture_s = 0.0
        self.eos_threshold = None          # set from VLModel.stop_rule at each natural-length call
        self.reuse_prefix = False          # feature_cache scope "prefix": keep the shared prompt KV
        self._prev_prompt = None

    # ---- the model's pieces ---------------------------------------------------------------------
    def _signature(self, vlm) -> tuple:
        """Identity of the weights the compiled step and the graph were built on. A later weight
        pass (int8/int4 after fast_decode) replaces parameter objects, so both are rebuilt."""
        tm = vlm.text_model
        params = [*tm.layers[0].parameters(), *tm.layers[-1].parameters(), *vlm.lm_head.parameters()]
        return (id(vlm), tm.config._attn_implementation, vlm.dtype,
                tuple((id(p), type(p.data).__name__) for p in params))

    def _bind(self, vlm) -> None:
        sig = self._signature(vlm)
        if getattr(self, "_sig", None) != sig:
            self._sig = sig
            self._vlm = vlm
            self._prev_prompt = None              # new weights: any cached prefix KV is stale
            self.cache = None
            self._step = None
            self._graph = None
            self.fused = self._fuse(vlm) if self.fuse_projections else None
            self._sig = self._signature(vlm)      # fusing gave the projections new (view) parameters
        tm = vlm.text_model
        cfg = tm.config
        self.layers = list(tm.layers)[: self.num_layers or len(tm.layers)]
        self.eos_id = vlm.eos_token_id
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Heads this process holds: all of them, or its shard under tensor_parallel.
        attn = self.layers[0].self_attn
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim

    @staticmethod
    def _fuse(vlm) -> list | None:
        """Per layer, [q;k;v] and [gate;up] weights in one buffer each, so a decode step reads them in
        two large products instead of five small ones (measured: bench/results/h100/fuse.md). The
        modules' weights become views into those buffers — same values, no extra memory, and the HF
        forward and checkpoints see the usual per-module tensors. Plain weights without bias, or
        modules whose class stacks its own kind (`fuse(modules)`, e.g. vlopt's int4); None (unfused)
        otherwise, e.g. after torchao int8."""
        mods = [(a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
                for a, m in ((layer.self_attn, layer.mlp) for layer in vlm.text_model.layers)]
        kind = type(mods[0][0])
        if hasattr(kind, "fuse") and all(type(x) is kind for group in mods for x in group):
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

    def _ensure_cache(self, vlm, needed: int) -> None:
        if self.cache is not None and self.cache.max_len >= needed:
            return
        self._prev_prompt = None
        max_len = -(-needed // self.block) * self.block
        self.cache = StaticCache(len(self.layers), self.kv_heads, max_len, self.head_dim, vlm.dtype, vlm.device)
        positions = torch.arange(max_len, device=vlm.device)[None]
        probe = torch.empty(1, dtype=vlm.dtype, device=vlm.device)
        cos, sin = vlm.text_model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]                       # [max_len, head_dim]
        self.key_positions = torch.arange(max_len, device=vlm.device)
        self._graph = None                                          # shapes changed: capture again

    # ---- the math ---------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, pos: torch.Tensor, *, causal_prefill: bool,
                 num_layers: int | None = None) -> torch.Tensor:
        """x [1, T, hidden] at positions `pos` [T] → final hidden states [1, T, hidden] (normed),
        through the first `num_layers` layers (all by default)."""
        T = x.shape[1]
        cos = self.cos[pos][None, None]
        sin = self.sin[pos][None, None]
        if causal_prefill:
            mask = None
        else:
            mask = (self.key_positions[None, :] <= pos[:, None])[None, None]    # [1,1,T,max_len]
        dense = T >= 16
        for i, layer in enumerate(self.layers[:num_layers]):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            if self.fused:
                q, k, v = _fused(self.fused[i][0], h, dense).split(
                    [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
            else:
                q, k, v = _linear(attn.q_proj, h, dense), _linear(attn.k_proj, h, dense), _linear(attn.v_proj, h, dense)
            q = q.view(1, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(1, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.cache.k[i], self.cache.v[i]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            gqa = self.n_heads != self.kv_heads
            if causal_prefill:   # positions 0..T-1: attend over what was just written, causally
                o = F.scaled_dot_product_attention(q, kc[:, :, :T], vc[:, :, :T], is_causal=True, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=gqa)
            x = x + _linear(attn.o_proj, o.transpose(1, 2).reshape(1, T, self.n_heads * self.head_dim), dense)
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            if self.fused:
                gate, up = _fused(self.fused[i][1], h, dense).chunk(2, -1)
            else:
                gate, up = _linear(mlp.gate_proj, h, dense), _linear(mlp.up_proj, h, dense)
            x = x + _linear(mlp.down_proj, mlp.act_fn(gate) * up, dense)
        return self._vlm.text_model.norm(x)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
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

    def _decode_one_token(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self._vlm.text_model.embed_tokens(token)[None]          # [1,1,hidden]
        h = self._forward(x, pos, causal_prefill=False)
        return self._pick(self._vlm.lm_head(h[:, -1]))[0].reshape(1)

    @torch.no_grad()
    def prefill(self, vlm, embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write the prompt's KV and return the first new token [1]."""
        T = embeds.shape[1]
        pos = torch.arange(start, start + T, device=vlm.device)
        h = self._forward(embeds.to(vlm.dtype), pos, causal_prefill=(start == 0))
        return self._pick(vlm.lm_head(h[:, -1]))[0].reshape(1)

    # ---- compile and capture -------------------------------------------------------------------
    def _tuning(self):
        """Inductor's coordinate-descent tuning of the step's Triton kernels (block sizes, warps) while
        the step compiles: measured on the H100 to matter at batch 1 (bench/results/h100/fuse.md)."""
        if not (self.compile and self.tune):
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config
        return inductor_config.patch(coordinate_descent_tuning=True)

    def _ensure_step(self, vlm) -> None:
        if self._step is None:
            if self.compile:
                kwargs = {"fullgraph": True, "dynamic": False}
                if self.compile_mode:
                    kwargs["mode"] = self.compile_mode
                self._step = torch.compile(self._decode_one_token, **kwargs)
            else:
                self._step = self._decode_one_token
        use_graph = self.cuda_graph and vlm.device.type == "cuda"
        if use_graph and self._graph is None:
            self._static_token = torch.zeros(1, dtype=torch.long, device=vlm.device)
            self._static_pos = torch.zeros(1, dtype=torch.long, device=vlm.device)
            start = time.perf_counter()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):     # warm-up (compiles) outside the capture
                for _ in range(3):
                    self._step(self._static_token, self._static_pos)
            torch.cuda.current_stream().wait_stream(stream)
            sync(vlm.device)
            self.compile_s += time.perf_counter() - start
            start = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_out = self._step(self._static_token, self._static_pos)
            sync(vlm.device)
            self.capture_s += time.perf_counter() - start
            self._graph = graph

    def _run_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self._graph is not None:
            self._static_token.copy_(token)
            self._static_pos.copy_(pos)
            self._graph.replay()
            return self._static_out
        return self._step(token, pos)

    # ---- the engine interface ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        self._bind(vlm)
        rule = None if fixed else vlm.stop_rule
        threshold = rule.eos_threshold if rule else None
        if threshold != self.eos_threshold:       # part of the compiled step: rebuild it
            self.eos_threshold, self._step, self._graph = threshold, None, None
        L = inp.context_tokens
        self._ensure_cache(vlm, L + new_tokens)
        first_use = self._step is None or (self._graph is None and self.cuda_graph and vlm.device.type == "cuda")
        if first_use:
            start = time.perf_counter()
            with self._tuning():
                self._ensure_step(vlm)
                if self._graph is None and self.compile:   # compile now, not inside the timed loop
                    self._step(torch.zeros(1, dtype=torch.long, device=vlm.device),
                               torch.tensor([L], device=vlm.device))
                    self.compile_s += time.perf_counter() - start
        sync(vlm.device)
        t0 = time.perf_counter()
        reused = self._common_prefix(inp.embeds) if self.reuse_prefix else 0
        token = self.prefill(vlm, inp.embeds[:, reused:], start=reused)
        if self.reuse_prefix:
            self._prev_prompt = inp.embeds.detach()
        sync(vlm.device)
        t1 = time.perf_counter()
        out = torch.empty(new_tokens, dtype=torch.long, device=vlm.device)
        out[0] = token[0]
        pos = torch.tensor([L], device=vlm.device)
        eos = vlm.eos_token_id
        produced = 1
        for i in range(1, new_tokens):
            token = self._run_step(token, pos)
            out[i] = token[0]
            pos += 1
            produced = i + 1
            if not fixed and produced % self.check_every == 0:
                seen = out[:produced].tolist()
                if eos in seen or (rule is not None and rule.sentences_done(seen) is not None):
                    break
        sync(vlm.device)
        t2 = time.perf_counter()
        tokens = out[:produced].tolist()
        if rule is not None and (cut := rule.sentences_done(tokens)) is not None:
            tokens = tokens[: cut + 1] + [eos]
        if not fixed and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        return Stage4Result(tokens, t1 - t0, t2 - t1, info={
            "compile_s": self.compile_s, "capture_s": self.capture_s, "cache_len": self.cache.max_len,
            "cuda_graph": self._graph is not None, "compiled": self.compile, "prefix_reused": reused})

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

    @torch.no_grad()
    def score(self, vlm, inp, tokens: list[int]) -> torch.Tensor:
        """Teacher-forced logits of `tokens` through this engine's own math (one causal prefill)."""
        self._bind(vlm)
        ids = torch.tensor([tokens[:-1]], device=vlm.device)
        embeds = torch.cat([inp.embeds.to(vlm.dtype), vlm.embed(ids)], dim=1)
        self._ensure_cache(vlm, embeds.shape[1] + 1)
        self._prev_prompt = None                  # score overwrites the cache from position 0
        pos = torch.arange(embeds.shape[1], device=vlm.device)
        h = self._forward(embeds, pos, causal_prefill=True)
        L = inp.context_tokens
        return vlm.lm_head(h[0, L - 1: L - 1 + len(tokens)]).float().cpu()


class SelfSpeculativeEngine(DecodeEngine):
    """LayerSkip-style self-speculative greedy decoding on the same static cache: the first
    `draft_layers` layers (+ final norm + lm_head) draft `draft_tokens` tokens one by one; the full
    model verifies them in one forward over [last token, drafts] and keeps the agreeing run plus its
    own next token. Draft layers write the same KV the full model would for accepted positions;
    rejected positions are masked out (their key position lies beyond every later query) and
    overwritten. The output is the full model's greedy output. Eager (no graph): the accepted length
    varies per step."""

    name = "layer_skip"

    def __init__(self, *, draft_layers: int, draft_tokens: int):
        super().__init__(compile=False, cuda_graph=False)
        self.draft_layers = draft_layers
        self.draft_tokens = draft_tokens

    @torch.no_grad()
    def generate(self, vlm, inp, *, new_tokens: int, fixed: bool = True) -> Stage4Result:
        self._bind(vlm)
        L = inp.context_tokens
        n = self.draft_tokens
        self._ensure_cache(vlm, L + new_tokens + n + 1)
        dev, eos = vlm.device, vlm.eos_token_id
        embed, head = vlm.text_model.embed_tokens, vlm.lm_head
        sync(dev)
        t0 = time.perf_counter()
        token = self.prefill(vlm, inp.embeds)
        sync(dev)
        t1 = time.perf_counter()
        out, pos, verifies, accepted_total = [int(token)], L, 0, 0
        while len(out) < new_tokens and (fixed or eos not in out):
            drafts, t, p = [], token, pos
            for _ in range(n):
                h = self._forward(embed(t)[None], torch.tensor([p], device=dev), causal_prefill=False,
                                  num_layers=self.draft_layers)
                t = head(h[:, -1]).argmax(-1)
                drafts.append(t)
                p += 1
            seq = torch.cat([token, *drafts])
            h = self._forward(embed(seq)[None], torch.arange(pos, pos + n + 1, device=dev), causal_prefill=False)
            preds = head(h[0]).argmax(-1).tolist()
            drafted = torch.cat(drafts).tolist()
            m = 0
            while m < n and drafted[m] == preds[m]:
                m += 1
            out += drafted[:m] + [preds[m]]
            token = torch.tensor([preds[m]], device=dev)
            pos += m + 1
            verifies += 1
            accepted_total += m
        sync(dev)
        t2 = time.perf_counter()
        tokens = out[:new_tokens]
        if not fixed and eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        return Stage4Result(tokens, t1 - t0, t2 - t1, info={
            "verify_forwards": verifies, "acceptance_rate": accepted_total / max(1, verifies * n),
            "tokens_per_verify": (len(out) - 1) / max(1, verifies), "draft_layers": self.draft_layers,
            "draft_tokens": n})

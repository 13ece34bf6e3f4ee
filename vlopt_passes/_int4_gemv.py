"""vlopt's own int4 weight layout and its batch-1 GEMV, a Triton kernel.

tinygemm (torchao's CUDA int4 kernel) reads its weights at ~1.3 TB/s on an H100, under half the
bandwidth (bench/results/h100/profile.md), and its tile-packed layout serves neither prefill nor
other kernels. Here the layout is chosen for the one-row product that decode is:

- codes q ∈ [0, 15], w = (q − 8) · scale + zero per group of `group_size` along K (tinygemm's
  convention, so the quantized values are the same as torchao's);
- K is padded to a multiple of 2 · group_size, Kp; byte b of a row holds column b in its low nibble
  and column Kp/2 + b in its high nibble, so one span of bytes serves one group of each half;
- rows come in tiles of 64 (N padded up): for each group, a tile's 64 rows of bytes are stored
  together, so a kernel step reads one contiguous 8 KB block rather than 64 scattered 128-byte
  pieces (measured about as fast as the untiled layout, bench/results/h100/int4-triton.md; kept
  because whole tiles stack along N, so fused q/k/v or gate/up codes are a concatenation whose
  parts stay views). scale and zero are tiled the same way, [Np/64, Kp/group_size, 64].

The kernel factors the scale out of each group's dot product, Σ w·x = s·Σ q·x + (z − 8s)·Σ x, and
turns codes into floats by placing them in a float's mantissa bits (no int→float converts), so a
code costs about one shift-and-mask instruction and one FMA. K is split over `split` programs when N
alone is too few rows to fill the GPU; the [split, N] float32 partial sums are added by the caller,
inside the compiled step by an Inductor kernel. (Adding them inside the kernel instead — the last
program of a row block sums them — measured slower in the decode step: bench/results/h100/int4-triton.md.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


TILE_ROWS = 64      # rows per tile: a kernel step reads one tile's group as one contiguous block (8 KB at group 128)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    split: int = 4
    num_warps: int = 4
    prefetch: bool = True      # load the next step's words before computing this one's


class Int4Codes:
    """A [N, K] weight as 4-bit codes in vlopt's layout (module docstring). `dense()` rebuilds it."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 shape: tuple[int, int]):
        self.packed, self.scale, self.zero = packed, scale, zero     # [Np/R, Kp/2g, R, g] uint8; [Np/R, Kp/g, R] ×2
        self.group_size, self.shape = group_size, tuple(shape)
        self.config = GemvConfig()
        self.use_kernel = packed.is_cuda or _interpreting()     # else gemv() multiplies the dense rebuild
        if self.use_kernel:
            register_op()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   shape: tuple[int, int] | None = None) -> Int4Codes:
        """codes [N', K'] uint8 in 0..15; scale, zero [N', K'/g] (any strides). N' ≥ N and K' ≥ K may
        be padded (torchao pads K to multiples of 1024); the padding is kept or extended."""
        rows, cols = codes.shape
        step = 2 * group_size
        padded = -(-cols // step) * step
        if padded != cols:
            codes = torch.nn.functional.pad(codes, (0, padded - cols), value=8)
            extra = (padded - cols) // group_size
            scale = torch.nn.functional.pad(scale, (0, extra))
            zero = torch.nn.functional.pad(zero, (0, extra))
        padded_rows = -(-rows // TILE_ROWS) * TILE_ROWS
        if padded_rows != rows:
            codes = torch.nn.functional.pad(codes, (0, 0, 0, padded_rows - rows), value=8)
            scale = torch.nn.functional.pad(scale, (0, 0, 0, padded_rows - rows))
            zero = torch.nn.functional.pad(zero, (0, 0, 0, padded_rows - rows))
        half = padded // 2
        packed = (codes[:, :half] | codes[:, half:] << 4).to(torch.uint8)
        t = padded_rows // TILE_ROWS
        tiles = packed.view(t, TILE_ROWS, half // group_size, group_size).permute(0, 2, 1, 3)
        scale, zero = (v.reshape(t, TILE_ROWS, -1).permute(0, 2, 1).contiguous() for v in (scale, zero))
        return cls(tiles.contiguous(), scale, zero, group_size, shape or (rows, cols))

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> Int4Codes:
        """Asymmetric min/max int4 per group (tinygemm's scheme): scale = (max − min)/15 and
        zero = min + 8·scale, stored in the weight's dtype; codes are rounded against the stored values."""
        rows, cols = weight.shape
        padded = -(-cols // (2 * group_size)) * (2 * group_size)
        w = torch.nn.functional.pad(weight.detach().float(), (0, padded - cols)).view(rows, -1, group_size)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(weight.dtype)
        zero = (low + 8 * scale.float()).to(weight.dtype)
        q = ((w - (zero.float() - 8 * scale.float())[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
        return cls.from_codes(q.to(torch.uint8).view(rows, padded), scale, zero, group_size, (rows, cols))

    def dense(self) -> torch.Tensor:
        fn = _dequantize_compiled() if self.packed.is_cuda else _dequantize
        return fn(self.packed, self.scale, self.zero, self.group_size, *self.shape)

    __call__ = dense       # the engine's `prefill_weight()` protocol

    def codes(self) -> torch.Tensor:
        """[Np, Kp] uint8 codes in plain order, for tests and inspection."""
        packed = _untile(self.packed)
        return torch.cat((packed & 15, packed >> 4), dim=1)

    def cat(self, others: list[Int4Codes]) -> Int4Codes:
        """Stack weights with the same K and groups along N (fused q/k/v or gate/up); each must fill
        whole tiles of rows, so the stacked rows are the parts' rows in order. The parts' tensors
        become views into the stacked ones."""
        parts = [self, *others]
        if len({(p.packed.shape[1:], p.group_size, p.shape[1]) for p in parts}) != 1:
            raise ValueError("int4 weights to fuse must share K and group size")
        if any(p.shape[0] % TILE_ROWS for p in parts):
            raise ValueError(f"int4 weights to fuse must have a multiple of {TILE_ROWS} rows")
        fused = Int4Codes(torch.cat([p.packed for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]), self.group_size,
                          (sum(p.shape[0] for p in parts), self.shape[1]))
        start = 0
        for p in parts:      # the parts become views into the fused tensors: no extra memory
            end = start + p.packed.shape[0]
            p.packed, p.scale, p.zero = fused.packed[start:end], fused.scale[start:end], fused.zero[start:end]
            start = end
        return fused

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] with one row → [..., N] in x's dtype. CUDA: the Triton kernel; elsewhere the
        same sum through dense() (the kernel runs on CPU only in Triton's interpreter, for tests)."""
        if not self.use_kernel:
            return torch.nn.functional.linear(x, self.dense().to(x.dtype))
        c = self.config
        out = torch.ops.vlopt.int4_gemv(x.reshape(-1), self.packed, self.scale, self.zero, self.shape[1],
                                        self.group_size, c.block_n, c.split, c.num_warps, c.prefetch)
        return out[: self.shape[0]].to(x.dtype).view(*x.shape[:-1], self.shape[0])


class Int4Linear(torch.nn.Module):
    """A Linear whose weight is int4 codes: a one-row input (a decode step) goes through the GEMV,
    more rows through the dense rebuild (`prefill_weight()`, which fast_decode's prefill calls too).
    `fuse` stacks modules for fast_decode's fused projections."""

    def __init__(self, codes: Int4Codes, bias: torch.nn.Parameter | None):
        super().__init__()
        self.codes = codes
        self.bias = bias
        self.out_features, self.in_features = codes.shape
        self._expose_codes()

    def _expose_codes(self) -> None:
        """The codes' tensors as (unsaved) buffers, so byte counts and memory reports see them."""
        for name in ("packed", "scale", "zero"):
            self.register_buffer(name, getattr(self.codes, name), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            y = self.codes.gemv(x)
        else:
            y = torch.nn.functional.linear(x, self.codes.dense().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def prefill_weight(self) -> torch.Tensor:
        return self.codes.dense()

    @staticmethod
    def fuse(modules: list[torch.nn.Module]) -> Int4Linear | None:
        """One module computing `modules`' outputs side by side, or None when they cannot be stacked.
        The modules keep working: their codes become views into the stacked codes."""
        if any(type(m) is not Int4Linear or m.bias is not None for m in modules):
            return None
        try:
            codes = modules[0].codes.cat([m.codes for m in modules[1:]])
        except ValueError:
            return None
        for m in modules:
            m._expose_codes()          # now views into the stacked codes
        if codes.packed.is_cuda:
            tune(codes)
        return Int4Linear(codes, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.codes.group_size}, kernel=triton")


def _untile(tiles: torch.Tensor) -> torch.Tensor:
    """[Np/R, Kp/2g, R, g] → [Np, Kp/2] bytes in row order."""
    t, groups, r, group = tiles.shape
    return tiles.permute(0, 2, 1, 3).reshape(t * r, groups * group)


def _dequantize(packed, scale, zero, group_size: int, rows: int, cols: int):
    packed = _untile(packed)
    codes = torch.cat((packed & 15, packed >> 4), dim=1)                       # [Np, Kp]
    n, padded = codes.shape
    scale, zero = (v.permute(0, 2, 1).reshape(n, -1, 1) for v in (scale, zero))  # [Np, Kp/g, 1]
    w = (codes.view(n, -1, group_size).to(scale.dtype) - 8) * scale + zero
    return w.view(n, padded)[:rows, :cols].contiguous()


@functools.cache
def _dequantize_compiled():
    """One fused kernel per weight shape on the GPU (eager, the unpacking steps cost ~3× the matrix
    products of a prefill: bench/results/h100/int4-prefill.md)."""
    return torch.compile(_dequantize, dynamic=False)


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int4_gemv_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, out_ptr, N, K, half_k,
                         groups_per_split, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
                         PREFETCH: tl.constexpr, USE_ASM: tl.constexpr, PROBE: tl.constexpr):
        # A program: BLOCK_N rows × its share of K. Per step, one group of each half: GROUP/4 int32 words
        # per row, word i holding bytes 4i..4i+3, i.e. nibble j is column (j % 2)·half_k + 4i + j // 2.
        # Partial products stay per (row, word) in registers; one reduction at the end.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        words = tl.arange(0, GROUP // 4)
        half_groups = half_k // GROUP
        first = pid_k * groups_per_split
        last = tl.minimum(first + groups_per_split, half_groups)
        acc = tl.zeros([BLOCK_N, GROUP // 4], dtype=tl.float32)      # Σ s·Σf·x' per (row, word)
        acc_rows = tl.zeros([BLOCK_N], dtype=tl.float32)              # the x-only terms per row
        # Rows come in tiles of TILE; a tile's words for one group are contiguous (TILE · GROUP/4 words).
        tile_base = (pid_n * BLOCK_N) // TILE * half_groups
        tile_rows = (pid_n * BLOCK_N) % TILE + tl.arange(0, BLOCK_N)
        in_tile = tile_rows[:, None] * (GROUP // 4) + words[None, :]
        w_next = tl.load(words_ptr + (tile_base + first) * (TILE * GROUP // 4) + in_tile, mask=first < last, other=0)
        for g in range(first, last):
            if PREFETCH:     # next step's words in flight while this step computes
                w = w_next
                w_next = tl.load(words_ptr + (tile_base + g + 1) * (TILE * GROUP // 4) + in_tile, mask=g + 1 < last,
                                 other=0)
            else:
                w = tl.load(words_ptr + (tile_base + g) * (TILE * GROUP // 4) + in_tile)
            # No int→float converts (a slow instruction): a nibble masked into bits [b, b+4) of the
            # mantissa of 1.0 is f = 1 + q·2^(b−23), so with x' = x·2^(23−b), f·x' = x' + q·x. Four shifted
            # copies of the word put each pair of nibbles at b = 15 and 19 (lower b would need x' so large that
            # float32 loses q·x); one LOP3 per nibble then masks and ORs. Σ(q − 8)·x = Σf·x' − Σx' − 8·Σx, per
            # half (low nibbles: first half of K, high nibbles: second).
            dot_lo = tl.zeros([BLOCK_N, GROUP // 4], dtype=tl.float32)
            dot_hi = tl.zeros([BLOCK_N, GROUP // 4], dtype=tl.float32)
            sx_lo = tl.zeros([1, GROUP // 4], dtype=tl.float32)       # Σx' + 8·Σx, per word
            sx_hi = tl.zeros([1, GROUP // 4], dtype=tl.float32)
            xsum_lo = tl.zeros([1, GROUP // 4], dtype=tl.float32)     # Σx, per word
            xsum_hi = tl.zeros([1, GROUP // 4], dtype=tl.float32)
            for j in tl.static_range(8):
                if j < 2:
                    shifted = w << 15
                elif j < 4:
                    shifted = w << 7
                elif j < 6:
                    shifted = w >> 1
                else:
                    shifted = w >> 9
                b = 15 + 4 * (j % 2)
                mask = 15 << b
                if USE_ASM:
                    bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                                     [shifted, tl.full(w.shape, mask, tl.int32),
                                                      tl.full(w.shape, 0x3F800000, tl.int32)],
                                                     dtype=tl.int32, is_pure=True, pack=1)
                else:
                    bits = (shifted & mask) | 0x3F800000
                f = bits.to(tl.float32, bitcast=True)
                cols = (j % 2) * half_k + g * GROUP + 4 * words + j // 2
                x = tl.load(x_ptr + cols[None, :], mask=cols[None, :] < K, other=0.0).to(tl.float32)
                if PROBE:    # timing probe (bench/gpu/int4_gemv.py): the loads and one FMA per word only
                    if j == 0:
                        dot_lo += w.to(tl.float32, bitcast=True) * x
                else:
                    xs = x * (1 << (23 - b))
                    if j % 2 == 0:
                        dot_lo += f * xs
                        sx_lo += xs + 8 * x
                        xsum_lo += x
                    else:
                        dot_hi += f * xs
                        sx_hi += xs + 8 * x
                        xsum_hi += x
            # scales and zeros are tiled like the words: [tiles, all groups, TILE]
            at_lo = (tile_base * 2 + g) * TILE + tile_rows
            at_hi = at_lo + half_groups * TILE
            s_lo = tl.load(scale_ptr + at_lo).to(tl.float32)[:, None]
            z_lo = tl.load(zero_ptr + at_lo).to(tl.float32)[:, None]
            s_hi = tl.load(scale_ptr + at_hi).to(tl.float32)[:, None]
            z_hi = tl.load(zero_ptr + at_hi).to(tl.float32)[:, None]
            # Σw·x = s·Σ(q − 8)·x + z·Σx = s·Σf·x' + (z·Σx − s·(Σx' + 8·Σx)); the last term needs the
            # group's x sums only, so it is added per row rather than per (row, word)
            acc += s_lo * dot_lo + s_hi * dot_hi
            acc_rows += tl.sum(z_lo * tl.sum(xsum_lo, 1) - s_lo * tl.sum(sx_lo, 1), 1)
            acc_rows += tl.sum(z_hi * tl.sum(xsum_hi, 1) - s_hi * tl.sum(sx_hi, 1), 1)
        tl.store(out_ptr + pid_k * N + rows, tl.sum(acc, 1) + acc_rows, mask=row_ok)

    return int4_gemv_kernel


def _launch(x, packed, scale, zero, k: int, group_size: int, block_n: int, split: int, num_warps: int,
            prefetch: bool, out, launch=None, probe: bool = False):
    tiles, half_groups, tile_rows, _ = packed.shape
    n, half_k = tiles * tile_rows, half_groups * group_size
    per_split = -(-half_groups // split)
    kernel = (launch or (lambda f: f))(_kernel())
    grid = (-(-n // block_n), split)
    kernel[grid](x, packed.view(torch.int32), scale, zero, out, n, k, half_k, per_split, GROUP=group_size,
                 BLOCK_N=block_n, TILE=tile_rows, PREFETCH=prefetch, USE_ASM=not _interpreting(), PROBE=probe, num_warps=num_warps, num_stages=1)


@functools.cache
def register_op() -> None:
    """`torch.ops.vlopt.int4_gemv`: a torch op around the kernel, so torch.compile inlines it into the
    compiled decode step (and it is captured in the step's CUDA graph)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("vlopt::int4_gemv", mutates_args=())
    def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int,
                  group_size: int, block_n: int, split: int, num_warps: int, prefetch: bool) -> torch.Tensor:
        partial = torch.empty(split, packed.shape[0] * packed.shape[2], dtype=torch.float32, device=x.device)
        _launch(x, packed, scale, zero, k, group_size, block_n, split, num_warps, prefetch, partial,
                launch=wrap_triton)
        return partial.sum(0)


def tune(codes: Int4Codes, configs: list[GemvConfig] | None = None) -> GemvConfig:
    """Set the fastest kernel config for this weight's shape on this GPU, timed once per shape (cached)
    on random weights of that shape: enough copies to overflow L2, read in turn, as a decode step
    reads its layers."""
    key = (tuple(codes.packed.shape), codes.group_size, str(codes.scale.dtype),
           torch.cuda.get_device_name(codes.packed.device))
    if key not in _TUNED:
        nbytes = codes.packed.numel() + 2 * codes.scale.numel() * codes.scale.element_size()
        weights = [Int4Codes(torch.randint_like(codes.packed, 0, 256), torch.rand_like(codes.scale) * 0.01,
                             torch.randn_like(codes.zero) * 0.01, codes.group_size, codes.shape)
                   for _ in range(max(4, -(-256 * 2**20 // nbytes)))]
        _TUNED[key] = min(configs or candidate_configs(codes.shape[0]), key=lambda c: time_config(weights, c))
    codes.config = _TUNED[key]
    return codes.config


_TUNED: dict[tuple, GemvConfig] = {}


def candidate_configs(n: int, wide: bool = False) -> list[GemvConfig]:
    """Configs worth timing for N rows: between one and sixteen waves of programs on 132 SMs."""
    out = []
    for block_n in (8, 16, 32, 64) if wide else (16, 32, 64):     # each divides TILE_ROWS
        programs = -(-n // block_n)
        for split in (1, 2, 4, 8, 16) if wide else (1, 2, 4, 8):
            if programs * split < 132 or programs * split > 132 * 16:
                continue
            for num_warps in (1, 2, 4, 8) if wide else (2, 4, 8):
                for prefetch in (False, True) if wide else (True,):
                    out.append(GemvConfig(block_n, split, num_warps, prefetch))
    return out or [GemvConfig()]


def time_config(weights: list[Int4Codes], config: GemvConfig, replays: int = 10, probe: bool = False) -> float:
    """Median milliseconds per GEMV kernel with `config`, run over every weight in turn (`graph_ms`).
    The partial-sum reduction is left out: in the compiled step Inductor fuses it with what follows."""
    x = torch.randn(weights[0].shape[1], dtype=weights[0].scale.dtype, device=weights[0].packed.device)
    out = torch.empty(config.split, max(w.packed.shape[0] * w.packed.shape[2] for w in weights), dtype=torch.float32,
                      device=x.device)
    return graph_ms([functools.partial(_launch, x, w.packed, w.scale, w.zero, w.shape[1], w.group_size, config.block_n,
                                       config.split, config.num_warps, config.prefetch, out, probe=probe)
                     for w in weights], replays)


def graph_ms(calls: list, replays: int = 10) -> float:
    """Median milliseconds per call: one CUDA graph runs `calls` in turn (launch gaps out, as in the
    decode step's graph; enough different weights overflow L2), replayed `replays` times."""
    for call in calls:                      # compiles what needs compiling, outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


class PackedLinear(torch.nn.Linear):
    """A Linear whose weight torchao tile-packed for tinygemm, which keeps the same 4-bit values in
    vlopt's layout as well: `prefill_weight()` (the engine's `DensePrefill`) rebuilds the dense
    weight from them, which torchao cannot do from the tile-packed layout."""

    def __init__(self, linear: torch.nn.Linear, codes: Int4Codes):
        torch.nn.Module.__init__(self)          # the weight is linear's, already quantized: allocate none
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.codes = codes

    def prefill_weight(self) -> torch.Tensor:
        return self.codes.dense()

"""`int4` with `kernel: triton`: vlopt's own int4 layout, its Triton GEMV (run here in Triton's
interpreter), the Int4Linear modules the pass installs, and fast_decode fusing their codes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vlopt.decode import teacher_forced_logits
from vlopt.errors import VloptError
from vlopt.models import get_workload
from vlopt.plugins import get_registry
from vlopt.testing import assert_fidelity, run_pass
from vlopt_passes._int4_gemv import TILE_ROWS, Int4Codes, Int4Linear


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("rows,cols,group", [(64, 256, 128), (40, 384, 64), (200, 300, 32)])
def test_codes_hold_the_values_they_were_given_in_any_padding(rows, cols, group):
    torch.manual_seed(rows)
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    scale = torch.rand(rows, -(-cols // group)) + 0.1
    zero = torch.randn(rows, -(-cols // group))
    padded = -(-cols // group) * group
    c = Int4Codes.from_codes(torch.nn.functional.pad(codes, (0, padded - cols), value=3), scale, zero, group,
                             shape=(rows, cols))
    assert c.packed.dtype == torch.uint8 and c.packed.numel() * 2 >= rows * cols      # two codes per byte
    assert c.packed.shape[0] * c.packed.shape[2] % TILE_ROWS == 0                     # whole tiles of rows
    assert torch.equal(c.codes()[:rows, :cols], codes)
    per_column = lambda t: t.repeat_interleave(group, dim=1)[:, :cols]               # noqa: E731
    expected = (codes.float() - 8) * per_column(scale) + per_column(zero)
    torch.testing.assert_close(c.dense(), expected, rtol=1e-6, atol=1e-6)


_KERNEL_CHECK = textwrap.dedent("""
    import torch
    from vlopt_passes._int4_gemv import GemvConfig, Int4Codes, Int4Linear
    torch.manual_seed(0)
    worst = 0.0
    for rows, cols, group in [(64, 256, 128), (40, 384, 64), (200, 300, 32), (128, 512, 64)]:
        w = torch.randn(rows, cols)
        c = Int4Codes.quantize(w, group)
        assert c.use_kernel
        for cfg in [GemvConfig(16, 1, 4, True), GemvConfig(32, 3, 2, False), GemvConfig(8, 2, 1, True),
                    GemvConfig(64, 1, 4, False)]:
            c.config = cfg
            x = torch.randn(1, cols)                      # fresh input every time
            ref = c.dense().double() @ x[0].double()
            y = c.gemv(x)
            assert y.shape == (1, rows) and torch.isfinite(y).all()
            worst = max(worst, float((y[0].double() - ref).norm() / ref.norm()))
    # stacked codes: one GEMV gives the parts' outputs side by side, and the parts still work (as views)
    parts = [Int4Linear(Int4Codes.quantize(torch.randn(n, 256), 64), None) for n in (128, 64, 64)]
    x = torch.randn(1, 256)
    alone = [p(x) for p in parts]
    fused = Int4Linear.fuse(parts)
    assert fused.codes.packed.untyped_storage().data_ptr() == parts[2].codes.packed.untyped_storage().data_ptr()
    both = torch.cat(alone, -1)
    worst = max(worst, float((fused(x) - both).norm() / both.norm()))
    worst = max(worst, max(float((p(x) - a).norm() / a.norm()) for p, a in zip(parts, alone)))
    print("worst", worst)
""")


def test_triton_kernel_equals_the_dense_product_in_the_interpreter():
    """The kernel itself (Triton's CPU interpreter: same program, same indexing) against float64 products of
    the rebuilt weight, over paddings, group sizes and launch configs (row blocks, K splits, prefetch)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = float(done.stdout.split("worst")[-1])
    assert worst < 1e-4, worst


@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_the_pass_installs_int4_modules_with_bounded_error(model):
    row = run_pass({"type": "int4", "kernel": "triton", "group_size": 32}, model=model, preset="tiny-random")
    assert_fidelity(row, min_top1=0.5, max_kl=5e-3)
    assert row.fidelity["mean_kl"] > 0
    assert len(row.modules_touched) == 4 * 7 and "lm_head" in row.modules_skipped
    assert any("dense rebuild" in n for n in row.notes)


def test_modules_compute_the_rebuilt_weight_for_one_row_and_many(eventgpt):
    layer = eventgpt.text_model.layers[0]
    original = layer.mlp.down_proj.weight.detach().clone()
    get_registry().apply(eventgpt, {"type": "int4", "kernel": "triton", "group_size": 32})
    down = layer.mlp.down_proj
    assert isinstance(down, Int4Linear) and (down.out_features, down.in_features) == tuple(original.shape)
    assert 0 < _rel(down.prefill_weight(), original) < 0.15            # 4-bit: close, not equal
    x = torch.randn(5, down.in_features)
    torch.testing.assert_close(down(x), x @ down.prefill_weight().T)
    torch.testing.assert_close(down(x[:1]), x[:1] @ down.prefill_weight().T)


def test_fast_decode_fuses_int4_codes_without_copying_them(eventgpt):
    inp = eventgpt.run_stages(None, get_workload(eventgpt.default_workload), "What is here?")
    registry = get_registry()
    registry.apply(eventgpt, {"type": "fast_decode", "compile": False})
    registry.apply(eventgpt, {"type": "int4", "kernel": "triton", "group_size": 32})
    tokens = eventgpt.stage4(inp, new_tokens=8).tokens
    fused = eventgpt.decoding.engine.fused
    assert fused is not None and all(isinstance(m, Int4Linear) for pair in fused for m in pair)
    attn = eventgpt.text_model.layers[0].self_attn
    assert attn.k_proj.codes.packed.untyped_storage().data_ptr() == fused[0][0].codes.packed.untyped_storage().data_ptr()
    ref = teacher_forced_logits(eventgpt, inp, tokens)                # the HF forward over the same Int4Linear
    assert _rel(eventgpt.decoding.score(inp, tokens), ref) < 1e-5
    assert ref.argmax(-1).tolist() == tokens


@pytest.mark.slow
def test_compiled_fast_decode_with_int4_modules_matches_the_hf_forward(videollava):
    inp = videollava.run_stages(None, get_workload(videollava.default_workload), "What is here?")
    registry = get_registry()
    registry.apply(videollava, {"type": "int4", "kernel": "triton", "group_size": 32})
    registry.apply(videollava, {"type": "fast_decode"})
    tokens = videollava.stage4(inp, new_tokens=6).tokens
    assert videollava.decoding.engine.fused is not None
    ref = teacher_forced_logits(videollava, inp, tokens)
    assert _rel(videollava.decoding.score(inp, tokens), ref) < 1e-4
    assert ref.argmax(-1).tolist() == tokens


def test_kernel_belongs_to_the_torchao_backend(eventgpt):
    with pytest.raises(VloptError, match="kernel.*torchao.*nf4"):
        get_registry().apply(eventgpt, {"type": "int4", "backend": "bitsandbytes", "kernel": "triton"})
    with pytest.raises(VloptError, match="kernel"):       # bitsandbytes 4-bit has no kernel choice
        get_registry().apply(eventgpt, {"type": "nf4", "kernel": "triton"})

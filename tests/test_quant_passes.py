
import pytest
import torch

import vlopt
from vlopt.decode import teacher_forced_logits
from vlopt.errors import VloptError
from vlopt.models import get_workload
from vlopt.plugins import get_registry
from vlopt.testing import assert_fidelity, run_pass, run_recipe


def _apply(vlm, cfg):
    return get_registry().apply(vlm, cfg)


def _logits(vlm):
    wl = get_workload(vlm.default_workload)
    return teacher_forced_logits(vlm, vlm.run_stages(None, wl, "q"), [7, 8, 9, 10])


@pytest.mark.parametrize("cfg,max_kl", [
    ({"type": "int8"}, 1e-4),
    ({"type": "int4", "group_size": 32}, 5e-3),
    ({"type": "llm_int8"}, 1e-3),
    ({"type": "nf4", "compute_dtype": "float32"}, 5e-3),
])
@pytest.mark.parametrize("model", ["eventgpt", "videollava"])
def test_quantization_touches_the_decoder_only_with_bounded_error(model, cfg, max_kl):
    row = run_pass(cfg, model=model, preset="tiny-random")
    assert_fidelity(row, min_top1=0.5, max_kl=max_kl)
    assert row.fidelity["mean_kl"] > 0          # it did change the numerics
    touched = row.modules_touched
    assert len(touched) == 4 * 7 and all(".layers." in n for n in touched)   # 4 layers × q,k,v,o,gate,up,down
    assert "lm_head" in row.modules_skipped
    assert any(("tower" in n or "projector" in n) for n in row.modules_skipped)
    if cfg["type"] in ("llm_int8", "nf4"):
        assert any("memory pass" in n and "slower than bf16" in n for n in row.notes)


def test_quantized_types_are_where_the_selection_says(eventgpt):
    _apply(eventgpt, {"type": "int8", "targets": ["re:.*mlp\\..*"]})
    layer = eventgpt.text_model.layers[0]
    assert type(layer.mlp.gate_proj.weight).__name__ == "Int8Tensor"
    assert type(layer.self_attn.q_proj.weight) is torch.nn.Parameter and type(layer.self_attn.q_proj.weight.data) is torch.Tensor
    assert type(eventgpt.lm_head.weight.data) is torch.Tensor
    assert type(eventgpt.hf.model.visual_projector[0].weight.data) is torch.Tensor


def test_a_selection_that_matches_nothing_is_explained(eventgpt):
    with pytest.raises(VloptError, match="select no Linear modules.*model.layers.0.self_attn.q_proj"):
        _apply(eventgpt, {"type": "int8", "targets": ["re:.*attn_proj.*"]})


def test_int8_torchao_checkpoint_holds_quantized_weights(tmp_path):
    result = run_recipe({"model": {"name": "videollava", "dtype": "float32", "device": "cpu"},
                         "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 4},
                         "passes": [{"type": "int8"}]}, tmp_path, output=True)
    assert result.report["passes"][0]["saved_as"] == "weights"
    loaded = vlopt.load(result.output, device="cpu")
    w = loaded.text_model.layers[0].self_attn.q_proj.weight
    assert type(w).__name__ == "Int8Tensor"
    from vlopt.models import load_model
    fresh = load_model("videollava", dtype="float32", device="cpu")
    _apply(fresh, {"type": "int8"})
    torch.testing.assert_close(_logits(loaded), _logits(fresh), rtol=0, atol=0)


def test_int8_weights_fused_by_fast_decode_save_as_separate_quantized_tensors(tmp_path):
    result = run_recipe({"model": {"name": "videollava", "dtype": "float32", "device": "cpu"},
                         "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 4},
                         "passes": [{"type": "fast_decode", "compile": False}, {"type": "int8"}]}, tmp_path, output=True)
    assert result.exit_code == 0, result.failures
    from safetensors import safe_open
    with safe_open(str(result.output / "model.safetensors"), "pt") as f:     # each module's own rows, int8
        for name in ("q_proj", "k_proj", "v_proj"):
            qdata = f.get_slice(f"language_model.model.layers.0.self_attn.{name}._weight_qdata")
            assert qdata.get_dtype() == "I8" and qdata.get_shape() == [160, 160]
    loaded = vlopt.load(result.output, device="cpu")       # fast_decode is re-applied and fuses them again
    loaded.stage4(loaded.run_stages(None, get_workload(loaded.default_workload), "q"), new_tokens=2)
    fused = loaded.decoding.engine.fused
    assert fused is not None and type(fused[0][0]).__name__ == "Int8Tensor"
    from vlopt.models import load_model
    fresh = load_model("videollava", dtype="float32", device="cpu")
    _apply(fresh, {"type": "int8"})
    torch.testing.assert_close(_logits(loaded), _logits(fresh), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [{"type": "int4", "group_size": 32},
                                 {"type": "int4", "group_size": 32, "kernel": "triton"},
                                 {"type": "llm_int8"}])
def test_passes_the_checkpoint_cannot_hold_are_reapplied_on_load(tmp_path, cfg):
    result = run_recipe({"model": {"name": "eventgpt", "dtype": "float32", "device": "cpu"},
                         "benchmark": {"samples": 1, "warmup": 0, "new_tokens": 4},
                         "passes": [cfg]}, tmp_path, output=True)
    row = result.report["passes"][0]
    assert row["saved_as"] == "sidecar"
    from safetensors import safe_open
    with safe_open(str(result.output / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"   # unquantized kept
    loaded = vlopt.load(result.output, device="cpu")
    assert type(loaded.text_model.layers[0].self_attn.q_proj).__name__ != "Linear" or \
        type(loaded.text_model.layers[0].self_attn.q_proj.weight.data) is not torch.Tensor
    from vlopt.models import load_model
    fresh = load_model("eventgpt", dtype="float32", device="cpu")
    _apply(fresh, cfg)
    torch.testing.assert_close(_logits(loaded), _logits(fresh), rtol=1e-6, atol=1e-6)


def test_quantizing_twice_is_a_recipe_conflict(tmp_path):
    with pytest.raises(VloptError, match="repeats 'int4'.*may appear once"):
        run_recipe({"model": {"name": "eventgpt"}, "passes": [{"type": "int4"}, {"type": "int4"}]}, tmp_path)


def test_int4_codes_rebuild_the_tinygemm_dequantized_weight():
    """The dense-prefill form of CUDA int4 (tinygemm tile-packed, which torchao cannot dequantize):
    torchao's own tinygemm quantizer on the CPU, then vlopt's Int4Codes against torchao's dequantizer."""
    from torchao.quantization.quant_primitives import (
        MappingType, _choose_qparams_affine_tinygemm, _dequantize_affine_tinygemm, _quantize_affine_tinygemm)
    from vlopt.stage4 import DensePrefill
    from vlopt_passes._int4_gemv import Int4Codes
    from vlopt_passes.int4 import plain_codes

    torch.manual_seed(0)
    w = torch.randn(48, 256, dtype=torch.bfloat16)
    scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, (1, 64), torch.int32, 0, 15,
                                                  scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
    codes = _quantize_affine_tinygemm(w, [1, 64], scale, zero, torch.uint8, 0, 15)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15 and len(codes.unique()) == 16
    expected = _dequantize_affine_tinygemm(codes, [1, 64], scale, zero, torch.uint8, 0, 15, output_dtype=torch.bfloat16)
    plain = Int4Codes.from_codes(codes, scale, zero, 64)
    assert plain.packed.numel() == 64 * 128 and plain.packed.dtype == torch.uint8    # two codes per byte, rows to 64
    assert torch.equal(plain.codes()[:48], codes)
    torch.testing.assert_close(plain(), expected, rtol=0, atol=float(scale.abs().max()) * 2 ** -7)
    assert (plain() - w).abs().max() < scale.abs().max()                           # within a quantization step
    # codes of a padded weight (torchao pads K to a multiple of 1024) give the unpadded weight back
    cut = Int4Codes.from_codes(codes, scale, zero, 64, shape=(40, 200))()
    assert cut.shape == (40, 200) and cut.is_contiguous()
    torch.testing.assert_close(cut, plain()[:40, :200], rtol=0, atol=0)
    # vlopt's own quantizer (int4 kernel: triton) uses the same scheme: torchao rounds in bfloat16, so
    # near-ties may land one code apart
    ours = Int4Codes.quantize(w, 64)
    torch.testing.assert_close(ours.dense(), expected, rtol=0, atol=float(scale.abs().max()) * 1.01)
    differ = ours.codes()[:48, :256].int() - codes.int()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.05
    # a weight that is not tile-packed gets nothing attached
    linear = torch.nn.Linear(256, 48)
    assert plain_codes(linear, linear.weight.detach(), 64) is None and not isinstance(linear, DensePrefill)


def test_int8_leaves_the_compilers_process_settings_alone():
    """torchao's configs switch Inductor's coordinate-descent tuning on for the whole process unless
    told not to; that overrode fast_decode's `tune: false` (measured on the H200: int8 `tune: false`
    spent 70 s of its first call tuning). int4 sets the same flag on its CUDA config, which the CPU
    form (IntxWeightOnlyConfig) does not have."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False):
        run_pass({"type": "int8"}, model="eventgpt", preset="tiny-random")
        assert inductor_config.coordinate_descent_tuning is False
        assert inductor_config.coordinate_descent_check_all_directions is False

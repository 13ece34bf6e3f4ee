"""distill: a smaller student saved like any weight pass; `vlopt.load` rebuilds it with equal logits."""

import pytest
import torch

import vlopt
from vlopt import train
from vlopt.errors import VloptError
from vlopt.models import load_model
from vlopt.plugins import get_registry
from vlopt.testing import TINY_BENCH, run_recipe

DISTILL = {"type": "distill", "layers": 3, "intermediate": 224, "steps": 2, "pool_scenes": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return train.save_model(train.build_model("eventgpt", seed=1), tmp_path_factory.mktemp("teacher"))


def _logits(vlm, inp, tokens):
    return vlm.decoding.score(inp, tokens)


def test_distilled_output_reloads_with_equal_logits(teacher_folder, tmp_path):
    from vlopt.recipe import BenchmarkSpec

    bench = dict(TINY_BENCH)
    if "quality_scenes" in BenchmarkSpec.model_fields:   # answer quality is the bench's business, not this test's
        bench["quality_scenes"] = 0
    recipe = {"model": {"path": str(teacher_folder), "dtype": "float32", "device": "cpu"},
              "benchmark": bench, "passes": [DISTILL]}
    result = run_recipe(recipe, tmp_path, output=True)
    row = result.rows[0]
    assert row.applied, row.error
    assert row.saved_as == "weights"
    info = row.info
    assert (info["student_layers"], info["student_intermediate"]) == (3, 224)
    assert info["kept_layers"] == [0, 4, 7] and info["student_params"] < info["teacher_params"]

    loaded = vlopt.load(tmp_path / "out", device="cpu")
    tm = loaded.text_model
    assert len(tm.layers) == 3 and tm.config.intermediate_size == 224
    # the same budget and seed on the same teacher give the same student (CPU)
    again = load_model(path=str(teacher_folder), dtype="float32", device="cpu")
    get_registry().apply(again, DISTILL)
    inp = again.run_stages(None, again.workload(), "What is moving?")
    tokens = again.stage4(inp, new_tokens=6).tokens
    assert torch.equal(_logits(loaded, loaded.run_stages(None, loaded.workload(), "What is moving?"), tokens),
                       _logits(again, inp, tokens))


def test_student_keeps_the_teachers_stages_1_to_3(teacher_folder):
    teacher = load_model(path=str(teacher_folder), dtype="float32", device="cpu")
    before = teacher.run_stages(None, teacher.workload(), "What is moving?")
    vision = {k: v.clone() for k, v in teacher.hf.state_dict().items() if not k.startswith(("model.layers.", "model.norm.", "lm_head"))}
    get_registry().apply(teacher, {**DISTILL, "layers": 2, "intermediate": None})
    assert all(torch.equal(v, teacher.hf.state_dict()[k]) for k, v in vision.items())
    assert torch.equal(teacher.run_stages(None, teacher.workload(), "What is moving?").embeds, before.embeds)
    assert len(teacher.text_model.layers) == 2


def test_distill_refusals(teacher_folder):
    teacher = load_model(path=str(teacher_folder), dtype="float32", device="cpu")
    with pytest.raises(VloptError, match="no larger than the teacher"):
        get_registry().apply(teacher, {**DISTILL, "layers": 9})
    llava = load_model("llava", preset="tiny", dtype="float32", device="cpu")
    with pytest.raises(VloptError, match="not llava"):
        get_registry().apply(llava, DISTILL)

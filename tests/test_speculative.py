"""speculative: the answers are the target's own with every draft (the other family on the same scene,
a distilled student, the self-draft), in both budget modes; tokenizers must match."""

from types import SimpleNamespace

import pytest
import torch

from vlopt import scenes, train
from vlopt.errors import VloptError
from vlopt.models import load_model
from vlopt.plugins import get_registry
from vlopt_passes import speculative

MODALITY = {"eventgpt": "events", "videollava": "video"}
NEW_TOKENS = 10


@pytest.fixture(scope="session")
def task_models(tmp_path_factory):
    """Trained-tiny architectures of both families sharing the task tokenizer (untrained weights:
    lossless decoding holds for any weights), saved as checkpoint folders."""
    folders = {}
    for i, family in enumerate(train.FAMILIES):
        folders[family] = train.save_model(train.build_model(family, seed=i), tmp_path_factory.mktemp(family))
    return folders


@pytest.fixture(scope="session")
def student(task_models, tmp_path_factory):
    """A distilled videollava student (2 layers, a tiny budget) saved as a folder."""
    vlm = load_model(path=str(task_models["videollava"]), dtype="float32", device="cpu")
    get_registry().apply(vlm, {"type": "distill", "layers": 2, "steps": 2, "pool_scenes": 4, "batch_size": 4})
    return train.save_model(vlm, tmp_path_factory.mktemp("student"))


def _target(folders, family):
    return load_model(path=str(folders[family]), dtype="float32", device="cpu")


def _inputs(vlm, scene_set):
    wl = vlm.workload()
    out = []
    for s in scene_set:
        q = scenes.question(s, wl.input_kind).question
        out.append(vlm.encode(vlm.preprocess(scenes.render(s, wl.input_kind), q, wl)))
    return out


def _own_answers(vlm, inputs):
    return {fixed: [vlm.stage4(inp, new_tokens=NEW_TOKENS, fixed=fixed).tokens for inp in inputs]
            for fixed in (True, False)}


def _assert_lossless(vlm, inputs, own):
    for fixed in (True, False):
        for inp, expected in zip(inputs, own[fixed]):
            result = vlm.stage4(inp, new_tokens=NEW_TOKENS, fixed=fixed)
            assert result.tokens == expected
            assert 0.0 <= result.info["acceptance_rate"] <= 1.0 and result.info["tokens_per_verify"] >= 1.0
            if fixed:
                assert len(result.tokens) == NEW_TOKENS
                assert vlm.eos_token_id not in result.tokens


@pytest.mark.parametrize("target,draft", [("videollava", "eventgpt"), ("eventgpt", "videollava")])
def test_cross_family_draft_gives_the_targets_answers(task_models, target, draft):
    vlm = _target(task_models, target)
    scene_set = scenes.scenes(3, 3, "eval")
    inputs = _inputs(vlm, scene_set)
    own = _own_answers(vlm, inputs)
    outcome = get_registry().apply(vlm, {"type": "speculative", "draft": {"path": str(task_models[draft])},
                                         "draft_tokens": 3})
    assert outcome.info["draft_input"] == "paired"
    with pytest.raises(VloptError, match="pair"):        # its own rendering of the scene is needed
        vlm.stage4(inputs[0], new_tokens=NEW_TOKENS)
    for s, inp in zip(scene_set, inputs):
        paired = speculative.pair_scene(vlm, s)
        assert torch.equal(paired.embeds, inp.embeds)
    assert speculative.draft_model(vlm).name == draft
    _assert_lossless(vlm, inputs, own)


def test_self_draft_and_student_draft_give_the_targets_answers(task_models, student):
    scene_set = scenes.scenes(4, 3, "eval")
    for spec in ("self", {"path": str(student), "family": "videollava"}):
        vlm = _target(task_models, "videollava")
        inputs = _inputs(vlm, scene_set)
        own = _own_answers(vlm, inputs)
        outcome = get_registry().apply(vlm, {"type": "speculative", "draft": spec, "draft_tokens": 4,
                                             "draft_layers": 2})
        if spec != "self":   # the student keeps the teacher's stages 1–3: it drafts from the target's input
            assert outcome.info["draft_input"] == "the target's"
            assert len(speculative.draft_model(vlm).text_model.layers) == 2
        _assert_lossless(vlm, inputs, own)


def test_the_benchmark_demo_input_is_paired_at_apply_time(task_models):
    vlm = _target(task_models, "eventgpt")
    inp = vlm.run_stages(None, vlm.workload(), "What is moving?")
    own = vlm.stage4(inp, new_tokens=NEW_TOKENS).tokens
    get_registry().apply(vlm, {"type": "speculative", "draft": {"path": str(task_models["videollava"])}})
    # the demo input for the benchmark's question is paired; decoding it gives the target's tokens
    from vlopt.models.tokenizer import DEFAULT_QUESTION
    demo = vlm.run_stages(None, vlm.workload(), DEFAULT_QUESTION)
    assert len(vlm.stage4(demo, new_tokens=NEW_TOKENS).tokens) == NEW_TOKENS
    speculative.pair(vlm, inp, speculative.draft_model(vlm).run_stages(None, speculative.draft_model(vlm).workload(),
                                                                        "What is moving?"))
    assert vlm.stage4(inp, new_tokens=NEW_TOKENS).tokens == own


def test_mismatched_tokenizers_are_refused_in_one_line(task_models):
    presets = get_registry().models["eventgpt"].presets       # the random tiny preset has its own tokenizer
    target = load_model("eventgpt", preset="tiny-random" if "tiny-random" in presets else "tiny", dtype="float32",
                        device="cpu")
    with pytest.raises(VloptError, match="does not share the target's tokenizer") as err:
        get_registry().apply(target, {"type": "speculative", "draft": {"path": str(task_models["eventgpt"])}})
    assert "\n" not in str(err.value)
    with pytest.raises(VloptError, match="does not share the target's tokenizer"):
        get_registry().apply(target, {"type": "speculative", "draft": {"family": "videollava", "preset": "tiny"}})


def test_7b_cross_family_refuses_before_building_weights():
    """The 7b presets' vocabularies differ (32000 vs 32064 rows): refused on the meta device, before
    any draft weights exist. A same-family or self draft is the 7b route."""
    families = get_registry().models
    target = families["eventgpt"].build("7b", dtype=torch.bfloat16, device="cpu", meta=True)
    with pytest.raises(VloptError, match="32064 output rows.*32000 rows"):
        get_registry().apply(target, {"type": "speculative", "draft": {"family": "videollava", "preset": "7b"}})


def test_config_errors():
    cpu = SimpleNamespace(device="cpu")
    with pytest.raises(VloptError, match="one of preset"):
        get_registry().apply(cpu, {"type": "speculative", "draft": {"family": "eventgpt"}})
    with pytest.raises(VloptError, match="needs its family"):
        get_registry().apply(cpu, {"type": "speculative", "draft": {"preset": "tiny"}})


def test_a_recipe_with_the_other_family_as_draft_answers_the_held_out_scenes(tmp_path):
    """The manager's quality step answers held-out scenes nobody paired: each scene input carries its
    origin, so the draft renders the same scene in its own modality; the answers stay the target's."""
    from vlopt.testing import run_recipe

    recipe = {"model": {"name": "eventgpt", "preset": "tiny", "dtype": "float32", "device": "cpu"},
              "benchmark": {"samples": 1, "warmup": 0, "quality_scenes": 4},
              "passes": [{"type": "speculative", "draft": {"family": "videollava", "preset": "tiny"},
                          "draft_tokens": 3}]}
    row = run_recipe(recipe, tmp_path).rows[-1]
    assert row.status == "applied", row.error
    assert row.quality.scenes == 4 and row.quality.answer_agreement == 1.0

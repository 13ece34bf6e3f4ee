"""Answer quality in every pass row (issue 15, item 3): accuracy on held-out scenes, agreement with
the unoptimized model's answers, one example; "not measurable" on random weights."""

import pytest
import torch

from vlopt import evaluate, scenes
from vlopt.errors import VloptError
from vlopt.models import PRESETS, load_model
from vlopt.plugins import get_registry
from vlopt.recipe import load_recipe
from vlopt.report import markdown
from vlopt.rows import PassRow, Quality
from vlopt.testing import run_recipe

BENCH = {"samples": 1, "warmup": 0, "new_tokens": 4, "quality_scenes": 10, "quality_seed": 7}
RANDOM_PRESET = "tiny-random" if "tiny-random" in PRESETS else "tiny"


@pytest.fixture(scope="module")
def trained_run(trained_eventgpt, tmp_path_factory):
    """One run on the trained model: two lossless passes, then one that drops most visual rows."""
    passes = [{"type": "fast_decode", "compile": False}, {"type": "feature_cache", "scope": "request"},
              {"type": "prune_visual", "method": "cls_attention", "keep": 0.1}]
    result = run_recipe({"model": trained_eventgpt, "benchmark": BENCH, "passes": passes},
                        tmp_path_factory.mktemp("run"))
    assert result.exit_code == 0, result.failures
    return result


def test_baseline_and_every_pass_row_carry_quality(trained_run, trained_eventgpt):
    base = Quality.from_dict(trained_run.report["baseline"]["quality"])
    assert base.not_measured is None
    assert base.scenes == 10 and base.seed == 7 and base.answer_agreement == 1.0
    # The baseline's accuracy is the unoptimized model's on the same scenes, evaluated on its own.
    spec = dict(trained_eventgpt)
    fresh = load_model(spec.pop("name", None), path=spec.pop("path", None), **spec)
    alone = evaluate.evaluate_model(fresh, fresh.workload(), scenes_n=10, seed=7)
    assert base.task_accuracy == alone["accuracy"]
    assert set(base.per_kind) <= set(scenes.kinds("events"))
    for row in trained_run.rows:
        q = row.quality
        assert q is not None and q.not_measured is None, row.pass_type
        assert 0.0 <= q.task_accuracy <= 1.0 and 0.0 <= q.answer_agreement <= 1.0
        assert {"question", "expected", "before", "after"} <= set(q.example)
        assert row.fidelity is not None          # KL / top-1 stay beside the answers


def test_lossless_passes_agree_with_every_baseline_answer(trained_run):
    base = trained_run.report["baseline"]["quality"]
    for row in trained_run.rows[:2]:                 # fast_decode (eager, float32), feature_cache
        assert row.quality.answer_agreement == 1.0, row.pass_type
        assert row.quality.task_accuracy == base["task_accuracy"], row.pass_type
        assert row.quality.example["before"] == row.quality.example["after"]


def test_the_example_is_one_where_the_answers_differ_if_any(trained_run):
    pruned = trained_run.rows[2].quality
    ex = pruned.example
    if pruned.answer_agreement < 1.0:
        assert not scenes.score(ex["after"], ex["before"])
    else:
        assert ex["scene"] == 0


def test_the_report_shows_accuracy_agreement_and_the_example(trained_run):
    md = markdown(trained_run.report)
    assert "| step | accuracy | agreement | example question | expected | before | after |" in md
    for row in trained_run.rows:
        ex = row.quality.example
        line = next(l for l in md.splitlines() if l.startswith(f"| {row.pass_type} | {row.quality.task_accuracy:.1%}"))
        for text in (ex["question"], ex["before"], ex["after"]):
            assert text in line
    # The JSON form reads back into the same typed row.
    again = PassRow.from_dict(trained_run.report["passes"][0])
    assert again.quality == trained_run.rows[0].quality


def test_random_weights_say_quality_is_not_measurable(tmp_path):
    model = {"name": "eventgpt", "preset": RANDOM_PRESET, "dtype": "float32", "device": "cpu"}
    result = run_recipe({"model": model, "benchmark": BENCH, "passes": [{"type": "fast_decode", "compile": False}]},
                        tmp_path)
    assert result.exit_code == 0
    assert result.report["baseline"]["quality"]["not_measured"] == evaluate.NOT_MEASURABLE
    q = result.rows[0].quality
    assert q.not_measured == evaluate.NOT_MEASURABLE and q.task_accuracy is None and q.answer_agreement is None
    md = markdown(result.report)
    assert f"| fast_decode | {evaluate.NOT_MEASURABLE} |" in md
    assert "%" not in "".join(l for l in md.splitlines() if l.startswith("| fast_decode | random"))


def test_weights_trained_follows_how_the_model_was_built(trained_eventgpt, tmp_path):
    assert load_model("eventgpt", preset=RANDOM_PRESET, device="cpu").weights_trained is False
    family = get_registry().models["eventgpt"]
    assert family.build("7b", dtype=torch.bfloat16, device="cpu", meta=True).weights_trained is False
    spec = dict(trained_eventgpt)
    trained = load_model(spec.pop("name", None), path=spec.pop("path", None), **spec)
    assert trained.weights_trained is True
    # The mark travels with the weights: a folder saved from either model says the same on load.
    for vlm, expected in ((trained, True), (load_model("eventgpt", preset=RANDOM_PRESET, device="cpu"), False)):
        folder = tmp_path / str(expected)
        vlm.hf.save_pretrained(folder)
        vlm.tokenizer.save_pretrained(folder)
        assert load_model(path=str(folder), device="cpu").weights_trained is expected


def test_stage_inputs_are_reused_only_while_stages_1_to_3_are_unchanged():
    vlm = load_model("eventgpt", preset=RANDOM_PRESET, dtype="float32", device="cpu")
    registry = get_registry()
    state = evaluate.stages_state(vlm)
    registry.apply(vlm, {"type": "fast_decode", "compile": False})       # stage 4 only
    assert evaluate.stages_state(vlm) == state
    registry.apply(vlm, {"type": "feature_cache", "scope": "request"})   # a feature store in front of 1-3
    assert evaluate.stages_state(vlm) != state
    state = evaluate.stages_state(vlm)
    registry.apply(vlm, {"type": "prune_visual", "method": "cls_attention", "keep": 0.5})
    assert evaluate.stages_state(vlm) != state
    state = evaluate.stages_state(vlm)
    registry.apply(vlm, {"type": "dtype", "dtype": "bfloat16"})          # the embeddings are cast
    assert evaluate.stages_state(vlm) != state


@pytest.mark.parametrize("model, workload", [("eventgpt", "eventgpt"), ("videollava", "videollava"),
                                             ("videollava", "videollava-image")])
def test_answers_go_through_the_models_real_path(model, workload):
    """Answers through the rendered files equal the renderers' raw input through preprocess →
    encode → generate (stage 1 reads back exactly what was rendered)."""
    vlm = load_model(model, preset=RANDOM_PRESET, dtype="float32", device="cpu")
    wl = vlm.workload(workload)
    qset = evaluate.QualitySet.build(wl, 3, 5)
    try:
        got = evaluate.answer(vlm, qset)
        again = evaluate.answer(vlm, qset)            # the kept stage-4 inputs
    finally:
        qset.close()
    direct = scenes.evaluate(vlm, scenes.scenes(5, 3), workload=wl, new_tokens=evaluate.ANSWER_TOKENS)
    assert got == again == [r["answer"] for r in direct["answers"]]


@pytest.mark.parametrize("value, message", [(-1, "greater than or equal to 0"), ("10", "valid integer"),
                                            (10_001, "less than or equal to 10000")])
def test_quality_keys_are_checked_like_every_recipe_key(tmp_path, value, message):
    path = tmp_path / "r.yaml"
    import yaml
    path.write_text(yaml.safe_dump({"model": {"name": "eventgpt"}, "benchmark": {"quality_scenes": value}}))
    with pytest.raises(VloptError, match=f"benchmark.quality_scenes.*{message}"):
        load_recipe(path)

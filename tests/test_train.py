"""Training the trained-tiny models: batched stage 3 equals the models' own, training is
deterministic on CPU and lowers the loss, and a saved model loads back through vlopt's loader."""

import pytest
import torch

from vlopt import scenes as S
from vlopt import train as T


@pytest.fixture(scope="module", params=T.FAMILIES)
def fresh(request):
    torch.set_num_threads(1)
    return request.param, T.build_model(request.param, seed=0)


def test_batched_stage3_equals_the_models_own_encode(fresh):
    from vlopt.models import get_workload

    family, vlm = fresh
    for modality in T.MODALITIES[family]:
        workload = get_workload(T.WORKLOADS[modality])
        preps = [vlm.preprocess(S.render(s, modality), S.question(s, modality).question, workload)
                 for s in S.scenes(0, 2, "eval")]
        with torch.no_grad():
            feats = T.batch_features(vlm, modality, torch.stack([T._pixels(p) for p in preps]))
            seqs = [T.expanded_prompt(vlm, p["input_ids"], feats.shape[1]) for p in preps]
            embeds, mask = T.splice_batch(vlm, seqs, list(feats))
        for b, prep in enumerate(preps):
            ref = vlm.encode(prep)
            n = ref.context_tokens
            torch.testing.assert_close(embeds[b, :n], ref.embeds[0], rtol=1e-5, atol=1e-5)
            assert mask[b, :n].all() and not mask[b, n:].any()


def test_training_is_deterministic_on_cpu_and_lowers_the_loss(fresh):
    family, _ = fresh
    kwargs = dict(steps=10, seed=1, device="cpu", batch_size=4, pool_scenes=4, lr=3e-3, eval_scenes=0, threads=1,
                  log=lambda *_: None)
    first, second = T.train(family, **kwargs), T.train(family, **kwargs)
    assert first["loss"] == second["loss"] and first["exit_ce"] == second["exit_ce"]
    assert first["vision_attribute"] == second["vision_attribute"] and len(first["vision_attribute"]) == 10
    assert len(first["loss"]) == 10 and len(first["exit_ce"][0]) == T.TEXT["num_hidden_layers"] - 1
    assert sum(first["loss"][-3:]) < 0.7 * sum(first["loss"][:3])
    other = T.train(family, **{**kwargs, "seed": 2, "steps": 2})
    assert other["loss"] != first["loss"][:2]


def test_the_decoder_phase_leaves_the_vision_side_as_the_vision_phase_left_it():
    result = T.train("eventgpt", steps=3, vision_steps=0, seed=1, batch_size=2, pool_scenes=2, eval_scenes=0,
                     threads=1, log=lambda *_: None)
    fresh = T.build_model("eventgpt", seed=1).hf.state_dict()
    trained = result["model"].hf.state_dict()
    vision = [k for k in fresh if k.startswith(tuple(result["model"].vision_modules))]
    rescaled = {k for k in vision if k.startswith("model.feature_adaptor.")}     # the rows' scale, set between phases
    assert vision and rescaled and all(torch.equal(fresh[k], trained[k]) for k in vision if k not in rescaled)
    for k in rescaled:
        torch.testing.assert_close(trained[k], fresh[k] * result["row_scale"])
    assert not torch.equal(fresh["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])


def test_the_joint_phase_trains_the_vision_side_too_and_is_deterministic():
    kwargs = dict(steps=2, vision_steps=0, joint_steps=3, seed=1, batch_size=2, pool_scenes=2, eval_scenes=0,
                  threads=1, log=lambda *_: None)
    first, second = T.train("videollava", **kwargs), T.train("videollava", **kwargs)
    assert len(first["loss"]) == 2 and len(first["joint"]["loss"]) == 3 and first["joint_steps"] == 3
    assert first["joint"]["loss"] == second["joint"]["loss"]
    before = T.train("videollava", **{**kwargs, "joint_steps": 0})["model"].hf.state_dict()
    after = first["model"].hf.state_dict()
    vision = [k for k in before if k.startswith(tuple(first["model"].vision_modules))]
    assert any(not torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])


def test_training_from_a_trained_folder_keeps_its_vision_side_and_its_rows_scale(tmp_path):
    kwargs = dict(seed=1, batch_size=2, pool_scenes=2, eval_scenes=0, threads=1, log=lambda *_: None)
    first = T.train("eventgpt", steps=2, vision_steps=2, out=tmp_path / "first", **kwargs)
    again = T.train("eventgpt", steps=2, vision_steps=0, init=tmp_path / "first", **kwargs)
    assert again["row_scale"] == 1.0 and again["init"] == str(tmp_path / "first")
    before, after = first["model"].hf.state_dict(), again["model"].hf.state_dict()
    vision = [k for k in before if k.startswith(tuple(first["model"].vision_modules))]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_a_saved_model_loads_back_with_equal_logits(fresh, tmp_path):
    from vlopt.models import get_workload, load_model

    family, vlm = fresh
    T.save_model(vlm, tmp_path)
    loaded = load_model(path=str(tmp_path), device="cpu", dtype="float32")
    assert type(loaded) is type(vlm)
    assert loaded.tokenizer.get_vocab() == vlm.tokenizer.get_vocab()
    modality = next(iter(T.MODALITIES[family]))
    workload = get_workload(T.WORKLOADS[modality])
    scene = S.scenes(0, 1, "eval")[0]
    raw, question = S.render(scene, modality), S.question(scene, modality).question
    logits = [m.hf(inputs_embeds=m.encode(m.preprocess(raw, question, workload)).embeds).logits
              for m in (vlm, loaded)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_exit_weights_rise_with_depth_and_sum_to_one():
    w = T.exit_weights(8)
    assert len(w) == 7 and w == sorted(w) and w[0] < w[-1] and sum(w) == pytest.approx(1.0)


def test_acceptance_follows_the_layer_skip_rule():
    # All drafts right: every draft is accepted (the last verify drafts only what is left).
    assert T.acceptance_from_matches([True] * 7, 4) == 1.0
    assert T.acceptance_from_matches([True], 4) == 1.0
    assert T.acceptance_from_matches([False] * 8, 4) == 0.0
    # One miss in the middle: 2 accepted, the full model's token at the miss, then 4 accepted.
    assert T.acceptance_from_matches([True, True, False, True, True, True, True], 4) == pytest.approx(6 / 8)


def test_draft_agreement_reports_every_exit(fresh):
    family, vlm = fresh
    stats = T.draft_agreement(vlm, S.scenes(0, 2, "eval"), new_tokens=6)
    assert sorted(stats) == list(range(1, T.TEXT["num_hidden_layers"]))
    assert all(0 <= s["agreement"] <= 1 and 0 <= s["acceptance"] <= 1 for s in stats.values())


def test_vision_overrides_keep_batched_stage3_equal():
    from vlopt.models import get_workload

    vlm = T.build_model("eventgpt", vision={"patch_size": 8})
    scene = S.scenes(0, 1, "eval")[0]
    prep = vlm.preprocess(S.render(scene, "events"), S.question(scene, "events").question, get_workload("eventgpt"))
    with torch.no_grad():
        feats = T.batch_features(vlm, "events", T._pixels(prep)[None])
    assert feats.shape[1] == 5 + (S.SIZE // 8) ** 2 + 1
    embeds, _ = T.splice_batch(vlm, [T.expanded_prompt(vlm, prep["input_ids"], feats.shape[1])], list(feats))
    torch.testing.assert_close(embeds[0], vlm.encode(prep).embeds[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        T.build_model("eventgpt", vision={"patch_size": 7})


def test_a_time_budget_lowers_the_step_count_once_and_records_it(monkeypatch):
    monkeypatch.setattr(T, "BUDGET_PROBE_STEPS", 3)
    kwargs = dict(steps=8, vision_steps=0, seed=1, device="cpu", batch_size=2, pool_scenes=2, eval_scenes=0,
                  threads=1, log=lambda *_: None)
    short = T.train("eventgpt", time_budget=1e-9, **kwargs)     # nothing fits: stop right after the timed steps
    assert short["steps"] == 4 and len(short["loss"]) == 4 and short["time_budget"] == 1e-9
    roomy = T.train("eventgpt", time_budget=1e6, **kwargs)
    assert roomy["steps"] == 8 and len(roomy["loss"]) == 8


def test_train_refuses_options_of_the_other_family_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    shipped = str(Path(T.__file__).parent / "weights" / "videollava-tiny")
    for args, message in ((["eventgpt", "--image-weight", "1"], "--image-weight is for videollava"),
                          (["eventgpt", "--patch-size", "6"], "--patch-size must be even and divide"),
                          (["eventgpt", "--init", shipped, "--steps", "1", "--eval-scenes", "1", "--pool-scenes", "1"],
                           "holds a videollava model, not eventgpt"),
                          (["eventgpt", "--init", str(Path(T.__file__).parent)], "no trained model there")):
        proc = subprocess.run([sys.executable, "-m", "vlopt.train", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("family", T.FAMILIES)
def test_rescaled_rows_are_what_the_rescaled_model_computes(family):
    vlm = T.build_model(family, seed=0)
    pool = T.build_pool(vlm, family, S.scenes(0, 3, "train"))
    rows = T.visual_rows(vlm, pool)
    factor = T.rescale_rows(vlm, rows)
    assert factor > 0
    again = T.visual_rows(vlm, pool)
    for modality in rows:
        torch.testing.assert_close(again[modality], rows[modality], rtol=1e-5, atol=1e-5)
    rms = torch.cat([r.flatten() for r in again.values()]).pow(2).mean().sqrt()
    assert abs(float(rms) - T.ROW_RMS) < 1e-4


def test_the_kind_curriculum_draws_the_kinds_with_the_highest_loss_most():
    curriculum = T.KindCurriculum(["events"])
    kinds = S.kinds("events")
    assert curriculum.weights()["events"] == pytest.approx([1 / len(kinds)] * len(kinds))   # all start equal
    hard = kinds[1]
    draws = [T.Draw(0, "events", [], [], k) for k in kinds] * 200
    curriculum.update(draws, [1.2 if d.kind == hard else 0.0 for d in draws])
    w = dict(zip(kinds, curriculum.weights()["events"]))
    assert sum(w.values()) == pytest.approx(1.0)
    assert w[hard] > 0.5 and all(v > 0 for v in w.values())          # learned kinds keep the floor
    vlm = T.build_model("eventgpt", seed=0)
    pool = T.build_pool(vlm, "eventgpt", S.scenes(0, 2, "train"))
    sampler = T.Sampler(vlm, "eventgpt", pool, seed=0)
    sampler.kind_weights = {"events": [1.0 if k == hard else 0.0 for k in kinds]}
    assert {d.kind for d in sampler.draw(16)} == {hard}


def test_each_answers_own_loss_averages_to_the_batch_loss():
    vlm = T.build_model("eventgpt", seed=0)
    pool = T.build_pool(vlm, "eventgpt", S.scenes(0, 3, "train"))
    draws = T.Sampler(vlm, "eventgpt", pool, seed=0).draw(6)
    with torch.no_grad():
        rows = T.visual_rows(vlm, pool)["events"]
        ce, _, _, per_answer = T.decoder_loss(vlm, draws, [rows[d.index] for d in draws], exit_weight=0.5)
        lengths = [len(d.answer) for d in draws]
        assert float(ce) == pytest.approx(sum(c * n for c, n in zip(per_answer, lengths)) / sum(lengths), rel=1e-5)
        alone, _, _, _ = T.decoder_loss(vlm, draws[:1], [rows[draws[0].index]], exit_weight=0.5)
    assert per_answer[0] == pytest.approx(float(alone), rel=1e-4)

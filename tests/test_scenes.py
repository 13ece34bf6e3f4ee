"""The synthetic scene task: seeded, disjoint splits, renderers that feed the families' stage 1–2 code,
a grammar whose answers are short and decidable, and the evaluation loop."""

import numpy as np
import pytest

from vlopt import scenes as S


def _content(scene):
    return (scene.things, scene.direction, scene.travel)


def test_a_seed_gives_the_same_scenes_and_renders_twice():
    a, b = S.scenes(3, 5, "eval"), S.scenes(3, 5, "eval")
    assert a == b
    for x, y in zip(a, b):
        ex, ey = S.render_events(x), S.render_events(y)
        assert all(np.array_equal(ex[k], ey[k]) for k in "xypt")
        assert all(np.array_equal(f, g) for f, g in zip(S.render_video(x), S.render_video(y)))
    assert {_content(s) for s in S.scenes(4, 5, "eval")}.isdisjoint({_content(s) for s in a})


def test_training_and_evaluation_scenes_are_disjoint_for_any_seeds():
    train = {_content(s) for seed in range(4) for s in S.scenes(seed, 40, "train")}
    evaluation = {_content(s) for seed in range(4) for s in S.scenes(seed, 40, "eval")}
    assert len(train) == 160 and len(evaluation) == 160
    assert train.isdisjoint(evaluation)
    # A larger set extends a smaller one (scene i depends only on seed, split and i).
    assert S.scenes(0, 3, "train") == S.scenes(0, 6, "train")[:3]
    with pytest.raises(ValueError):
        S.scenes(0, 1, "test")


def test_scenes_have_unique_shapes_and_colours_inside_the_frame():
    for s in S.scenes(0, 60, "train"):
        assert 1 <= len(s.things) <= 3
        assert len({t.shape for t in s.things}) == len(s.things) == len({t.colour for t in s.things})
        for t in s.things:
            for f in (0.0, 1.0):
                mask = S.shape_mask(t.shape, S.RADIUS[t.size], *s.centre(t, f))
                assert mask.sum() > 20
                ys, xs = np.nonzero(mask)
                assert xs.min() > 0 and ys.min() > 0 and xs.max() < S.SIZE - 1 and ys.max() < S.SIZE - 1
        masks = [S.shape_mask(t.shape, S.RADIUS[t.size], *s.centre(t, 0.5)) for t in s.things]
        assert sum(m.astype(int) for m in masks).max() <= 1       # no overlap


def test_events_go_through_eventgpts_stage_1_2_code_at_sensor_size():
    from vlopt.events import render_frames, validate_events
    from vlopt.frames import clip_preprocess

    scene = S.scenes(0, 1, "eval")[0]
    ev = validate_events(S.render_events(scene))
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"].max() < S.DURATION_US
    frames = render_frames(ev, 5)
    assert all(f.shape == (S.SIZE, S.SIZE, 3) for f in frames)
    pixels = clip_preprocess(frames, S.SIZE)
    assert pixels.shape == (5, 3, S.SIZE, S.SIZE)
    # No resampling at sensor size: each pixel keeps its own event colour (the Bayer sites survive).
    red = (frames[0] == (255, 0, 0)).all(-1)
    assert red.any() and (pixels[0, 2][red] < pixels[0, 0][red]).all()


def _leading_edge_polarities(colour, direction):
    """ON fraction per Bayer channel on the leading edge of one large square."""
    thing = S.Thing("square", colour, "large", (20.0, 28.0) if direction == "right" else (36.0, 28.0))
    scene = S.Scene((thing,), direction, 20.0, "eval", 0, 0, 0)
    ev = S.render_events(scene)
    x, p = ev["x"].astype(float) + 0.5, ev["p"]
    channel = S.bayer_channel()[ev["y"], ev["x"]]
    sign = 1 if direction == "right" else -1
    centre = thing.start[0] + sign * 20.0 * ev["t"] / S.DURATION_US     # where the square is at each event
    ahead = (x - centre) * sign > 0
    return [p[ahead & (channel == c)].mean() for c in range(3)]


def test_the_colour_event_camera_shows_colour_and_brightness():
    # Brighter channel than the background: ON on the leading edge; darker: OFF.
    assert _leading_edge_polarities("white", "right") == pytest.approx([1, 1, 1], abs=0.05)
    assert _leading_edge_polarities("red", "right") == pytest.approx([1, 0, 0], abs=0.05)
    assert _leading_edge_polarities("blue", "left") == pytest.approx([0, 0, 1], abs=0.05)
    assert _leading_edge_polarities("green", "left") == pytest.approx([0, 1, 0], abs=0.05)


def test_direction_is_decidable_from_the_five_event_frames():
    from vlopt.events import render_frames

    for scene in S.scenes(1, 30, "eval"):
        frames = render_frames(S.render_events(scene), 5)
        dx, dy = S.DIRECTIONS[scene.direction]
        centroids = []
        for f in frames:
            ys, xs = np.nonzero((f != 255).any(-1))
            centroids.append(xs.mean() * dx + ys.mean() * dy)
        steps = np.diff(centroids)
        # Straight edges cross a pixel column all at once, so chunks move on unevenly; never backwards.
        assert (steps > 0.5).all() and centroids[-1] - centroids[0] > 8, (scene, steps)


def test_video_and_image_have_video_llavas_input_form():
    scene = S.scenes(0, 1, "eval")[0]
    video, image = S.render_video(scene), S.render_image(scene)
    assert len(video) == S.VIDEO_FRAMES and len(image) == 1
    assert all(f.dtype == np.uint8 and f.shape == (S.SIZE, S.SIZE, 3) for f in video + image)
    for t in scene.things:
        seen = np.abs(image[0].astype(int) - S.COLOURS[t.colour]).max(-1) < 15
        assert seen.sum() > 20


def test_the_grammar_gives_short_answers_each_question_one_answer():
    from vlopt.models.task_tokenizer import build_task_tokenizer

    tok = build_task_tokenizer()
    for scene in S.scenes(2, 40, "train"):
        for modality in S.MODALITIES:
            items = S.questions(scene, modality)
            assert len({q.question for q in items}) == len(items)
            assert S.question(scene, modality) in items
            for item in items:
                ids = tok(" " + item.answer, add_special_tokens=False).input_ids
                assert len(ids) <= 17
                assert tok.decode(ids).strip() == item.answer
            if modality == "image":
                assert not {q.kind for q in items} & {"direction", "moving"}
                assert all(d not in q.answer for q in items for d in S.DIRECTIONS)
    assert S.score("  Red ", "red") and not S.score("red.", "red")


def test_evaluation_kinds_are_spread():
    picked = [S.question(s, "events").kind for s in S.scenes(0, 300, "eval")]
    counts = [picked.count(k) for k in S.MOTION_KINDS]
    assert min(counts) > 300 / len(S.MOTION_KINDS) / 2


def test_the_task_tokenizer_keeps_task_words_whole_with_the_usual_special_ids():
    from vlopt.models.task_tokenizer import build_task_tokenizer

    tok = build_task_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.convert_tokens_to_ids(["<image>", "<video>"]) == [4, 5]
    assert tok("USER: <video>\n").input_ids.count(5) == 1
    words = {w.strip(".,?") for text in S.task_texts() for w in text.split()}
    assert all(len(tok(" " + w, add_special_tokens=False).input_ids) == 1 for w in words)
    assert len(tok) <= 1024


class _AlwaysOne:
    """A stand-in model that answers "one" to everything."""

    default_workload = "eventgpt"

    def __init__(self):
        from vlopt.models.task_tokenizer import build_task_tokenizer
        self.tokenizer = build_task_tokenizer()

    def preprocess(self, raw, question, workload):
        assert {"x", "y", "p", "t"} <= set(raw)
        return {"question": question}

    def encode(self, prepared):
        return prepared

    def stage4(self, inp, *, new_tokens, fixed):
        from vlopt.decode import Stage4Result
        assert not fixed
        return Stage4Result(self.tokenizer(" One").input_ids[1:] + [2], 0.0, 0.0)


def test_evaluate_scores_exact_matches_per_kind():
    scene_set = S.scenes(5, 30, "eval")
    result = S.evaluate(_AlwaysOne(), scene_set)
    expected = [S.question(s, "events") for s in scene_set]
    assert result["scenes"] == 30 and len(result["answers"]) == 30
    assert result["accuracy"] == pytest.approx(sum(q.answer == "one" for q in expected) / 30)
    counts = [q for q in expected if q.kind == "count"]
    assert result["per_kind"]["count"] == pytest.approx(sum(q.answer == "one" for q in counts) / len(counts))
    assert result["per_kind"]["direction"] == 0.0

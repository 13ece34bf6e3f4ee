
import numpy as np
import pytest
import torch

from vlopt.errors import VloptError
from vlopt.events import load_events, render_frames, save_events, synthetic_events
from vlopt.frames import CLIP_MEAN, CLIP_STD, clip_preprocess, load_frames, sample_uniform, synthetic_video


def test_synthetic_events_are_deterministic_and_time_ordered():
    a, b = synthetic_events(seed=3), synthetic_events(seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in "xypt")
    assert (np.diff(a["t"]) >= 0).all() and set(np.unique(a["p"])) == {0, 1}
    assert not np.array_equal(a["x"], synthetic_events(seed=4)["x"])


def test_render_splits_by_event_count_and_colours_by_polarity():
    ev = {"x": np.array([0, 1, 2, 0, 1, 2, 0]), "y": np.array([0, 0, 0, 1, 1, 1, 1]),
          "p": np.array([1, 0, 1, 0, 1, 0, 0]), "t": np.arange(7)}
    frames = render_frames(ev, 3)          # chunks of 2, 2 and 3 (the last takes the remainder)
    assert len(frames) == 3 and frames[0].shape == (2, 3, 3)
    red, blue, white = [255, 0, 0], [0, 0, 255], [255, 255, 255]
    assert frames[0][0, 0].tolist() == red and frames[0][0, 1].tolist() == blue
    assert frames[0][1, 2].tolist() == white                 # no event there in chunk 0
    assert frames[2][1, 1].tolist() == red and frames[2][1, 2].tolist() == blue
    assert frames[2][1, 0].tolist() == blue and frames[2][0, 0].tolist() == white


def test_later_event_overwrites_earlier_at_the_same_pixel():
    ev = {"x": np.array([1, 1]), "y": np.array([1, 1]), "p": np.array([1, 0]), "t": np.array([0, 1])}
    assert render_frames(ev, 1)[0][1, 1].tolist() == [0, 0, 255]


def test_event_files_round_trip_npz_and_structured_npy(tmp_path):
    ev = synthetic_events(num_events=1000)
    loaded = load_events(save_events(tmp_path / "ev.npz", ev))
    assert all(np.array_equal(loaded[k], ev[k]) for k in "xypt")
    rec = np.zeros(1000, dtype=[("x", "u2"), ("y", "u2"), ("p", "u1"), ("t", "i8")])
    for k in "xypt":
        rec[k] = ev[k]
    np.save(tmp_path / "ev.npy", rec)
    assert np.array_equal(load_events(tmp_path / "ev.npy")["t"], ev["t"])


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {"x": np.array([0]), "y": np.array([0]), "p": np.array([1]), "t": np.array([0])}


def test_pickled_event_file_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "orig.npy"
    np.save(path, np.array(_Payload(), dtype=object), allow_pickle=True)
    with pytest.raises(VloptError, match="pickle.*--allow-pickle"):
        load_events(path)
    assert not _Payload.ran
    # The original release's dict-in-.npy loads only with the explicit opt-in.
    orig = tmp_path / "dict.npy"
    np.save(orig, np.array({k: v for k, v in synthetic_events(num_events=50).items()}, dtype=object),
            allow_pickle=True)
    assert len(load_events(orig, allow_pickle=True)["x"]) == 50


@pytest.mark.parametrize("arrays,message", [
    ({"x": [1], "y": [1], "p": [1]}, "lacks arrays \\['t'\\]"),
    ({"x": [1, 2], "y": [1], "p": [1], "t": [0]}, "one length"),
    ({"x": [], "y": [], "p": [], "t": []}, "no events"),
    ({"x": [1], "y": [1], "p": [3], "t": [0]}, "polarity"),
])
def test_malformed_event_streams_are_explained(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: np.array(v) for k, v in arrays.items()})
    with pytest.raises(VloptError, match=message):
        load_events(path)


def test_missing_and_wrong_kind_event_files(tmp_path):
    with pytest.raises(VloptError, match="does not exist"):
        load_events(tmp_path / "nope.npz")
    (tmp_path / "ev.txt").write_text("1 2 3")
    with pytest.raises(VloptError, match="must be .npz or .npy"):
        load_events(tmp_path / "ev.txt")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(VloptError, match="not a readable numpy file"):
        load_events(tmp_path / "broken.npz")


def test_too_few_events_for_the_frames():
    ev = {"x": np.array([0, 1]), "y": np.array([0, 0]), "p": np.array([1, 0]), "t": np.array([0, 1])}
    with pytest.raises(VloptError, match="fewer than the 5 frames"):
        render_frames(ev, 5)


def test_clip_preprocess_resizes_crops_and_normalizes():
    img = np.full((40, 80, 3), 255, np.uint8)
    out = clip_preprocess([img, img], 28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.float32
    expected = torch.from_numpy((1.0 - CLIP_MEAN) / CLIP_STD)
    torch.testing.assert_close(out[0, :, 10, 10], expected)


def test_frames_from_folder_array_and_image(tmp_path):
    from PIL import Image

    video = synthetic_video(num_frames=12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(video):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    from_folder = load_frames(folder)
    assert len(from_folder) == 12 and np.array_equal(from_folder[3], video[3])
    np.save(tmp_path / "v.npy", video)
    assert len(load_frames(tmp_path / "v.npy")) == 12
    assert len(load_frames(folder / "000.png")) == 1
    picked = sample_uniform(from_folder, 8)
    assert len(picked) == 8 and np.array_equal(picked[0], video[0]) and np.array_equal(picked[-1], video[-1])


def test_bad_frame_inputs_are_explained(tmp_path):
    with pytest.raises(VloptError, match="does not exist"):
        load_frames(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VloptError, match="holds no"):
        load_frames(tmp_path / "empty")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(VloptError, match="expected uint8 frames"):
        load_frames(tmp_path / "flat.npy")
    (tmp_path / "fake.png").write_bytes(b"no image")
    with pytest.raises(VloptError, match="not a readable image"):
        load_frames(tmp_path / "fake.png")
    with open(tmp_path / "p.npy", "wb") as fh:
        np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VloptError, match="pickle is refused"):
        load_frames(tmp_path / "p.npy")


def _events(**change):
    ev = {"x": np.array([1, 2, 3]), "y": np.array([0, 1, 2]), "p": np.array([0, 1, 1]), "t": np.array([0, 5, 9])}
    return {**ev, **{k: np.array(v) for k, v in change.items()}}


@pytest.mark.parametrize("change,message", [
    ({"x": [1, 34_500_000, 3]}, "ev.npz: x reaches 34500000, beyond the 4096×4096 sensors vlopt handles"),
    ({"y": [0, 5000, 2]}, "ev.npz: y reaches 5000, beyond the 4096×4096"),
    ({"x": [1, -2, 3]}, "negative pixel coordinates \\(x down to -2\\)"),
    ({"x": [1.0, np.nan, 3.0]}, "x must be whole pixel indices"),
    ({"y": [0.0, 0.5, 1.0]}, "y must be whole pixel indices"),
    ({"x": ["a", "b", "c"]}, "array x holds <U1 values; it must hold numbers"),
    ({"t": [0.0, np.nan, 9.0]}, "timestamps t hold NaN or infinite values"),
    ({"t": [0.0, 1.0, np.inf]}, "timestamps t hold NaN or infinite values"),
    ({"t": [-5, 0, 9]}, "timestamps t go down to -5; t must be non-negative"),
    ({"t": [0, 10, 9]}, "not in time order \\(t\\[2\\] = 9 < t\\[1\\] = 10\\); sort all four arrays by t"),
    ({"p": [0, 1, 2]}, "polarity"),
])
def test_out_of_range_coordinates_and_bad_timestamps_are_one_line_errors(tmp_path, change, message):
    path = tmp_path / "ev.npz"
    np.savez(path, **_events(**change))
    with pytest.raises(VloptError, match=message) as info:
        load_events(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_given_sensor_size_bounds_the_coordinates(tmp_path):
    path = tmp_path / "ev.npz"
    np.savez(path, **_events())
    assert len(load_events(path, sensor_size=(4, 3))["x"]) == 3
    with pytest.raises(VloptError, match="x reaches 3, outside the 3×3 sensor \\(x < 3\\)"):
        load_events(path, sensor_size=(3, 3))
    with pytest.raises(VloptError, match="sensor size 5000×10 is over the 4096×4096 limit"):
        load_events(path, sensor_size=(5000, 10))
    # The file may carry its sensor size as scalar arrays width and height.
    np.savez(path, **_events(), width=np.array(3), height=np.array(3))
    with pytest.raises(VloptError, match="outside the 3×3 sensor"):
        load_events(path)
    np.savez(path, **_events(), width=np.array(2.5), height=np.array(3))
    with pytest.raises(VloptError, match="'width' must be one whole number"):
        load_events(path)


def test_valid_streams_still_load_and_render_at_their_size(tmp_path):
    ev = synthetic_events(num_events=500)
    loaded = load_events(save_events(tmp_path / "ev.npz", ev), sensor_size=(640, 480))
    assert all(np.array_equal(loaded[k], ev[k]) for k in "xypt")
    frames = render_frames(_events(t=[0.0, 0.5, 0.5]), 1)        # float times, equal ones allowed
    assert frames[0].shape == (3, 4, 3)
    with pytest.raises(VloptError, match="x reaches 9999"):   # rendering a stream built in code is bounded too
        render_frames({"x": np.array([9999]), "y": np.array([0]), "p": np.array([1]), "t": np.array([0])}, 1)

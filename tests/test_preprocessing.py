"""Stage 2 against transformers' own processors, and video files (PyAV) in stage 1."""

import numpy as np
import pytest
import torch

from vlopt.errors import VloptError
from vlopt.frames import clip_preprocess, load_frames, read_video, resized_size, sample_uniform

# (height, width): camera and video frames (4:3, 16:9, 3:4, the DSEC 480×640, the 1080×1440 clips),
# squares, odd sizes, images smaller than the crop, extreme aspect ratios.
SIZES = [(240, 320), (480, 640), (1080, 1440), (720, 1280), (320, 240), (1088, 1440), (224, 224),
         (336, 336), (300, 300), (100, 333), (333, 100), (337, 501), (64, 48), (17, 400), (500, 223)]


def _random_sizes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(8, 700, 2)) for _ in range(n)]


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil_processor(size):
    """transformers' PIL CLIP processor as the CLIP-L/14 folders configure it (shortest edge and crop
    `size`, bicubic, CLIP mean/std)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("size", [224, 336])
def test_clip_preprocessing_equals_transformers_for_every_aspect_ratio(size):
    from transformers import VideoLlavaImageProcessor

    processors = [_pil_processor(size)]
    if size == 224:   # Video-LLaVA-7B-hf ships VideoLlavaImageProcessor (shortest edge 224, crop 224)
        processors.append(VideoLlavaImageProcessor())
    for k, (h, w) in enumerate(SIZES + _random_sizes(20, seed=size)):
        img = _image(h, w, seed=k)
        ours = clip_preprocess([img], size)[0]
        for proc in processors:
            kwargs = {"return_legacy_image_output": False} if "VideoLlava" in type(proc).__name__ else {}
            theirs = torch.as_tensor(np.asarray(proc(images=[img], return_tensors="np", **kwargs)["pixel_values"][0]))
            assert torch.equal(ours, theirs), f"{h}×{w} at {size} differs from {type(proc).__name__}"


def test_the_long_side_is_truncated_as_transformers_does():
    from transformers.image_transforms import get_resize_output_image_size

    for h, w in SIZES + _random_sizes(200):
        expected_h, expected_w = get_resize_output_image_size(np.zeros((h, w, 3)), 224, default_to_square=False,
                                                              input_data_format="channels_last")
        assert resized_size(w, h, 224) == (expected_w, expected_h)
    assert resized_size(320, 240, 224) == (298, 224)


def _write_mp4(path, n_frames, height=48, width=64):
    """A small H.264 mp4 written with PyAV; frame i is flat grey at 20·i (i < 13), so it can be
    recognised after lossy coding."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _frame_index(frame):
    return int(round(float(frame.mean()) / 20))


def test_mp4_frames_are_sampled_as_the_original_video_llava_does(tmp_path):
    video = _write_mp4(tmp_path / "clip.mp4", 12)
    frames = read_video(video)
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert [_frame_index(f) for f in frames] == list(range(12))
    picked = load_frames(video, num_frames=8)
    # The original: np.linspace(0, n - 1, 8, dtype=int) → 0 1 3 4 6 7 9 11 for 12 frames.
    assert [_frame_index(f) for f in picked] == np.linspace(0, 11, 8, dtype=int).tolist() == [0, 1, 3, 4, 6, 7, 9, 11]
    assert [_frame_index(f) for f in load_frames(video, num_frames=1)] == [0]


def test_videollava_runs_on_an_mp4(videollava, tmp_path):
    from vlopt.models import get_workload

    video = _write_mp4(tmp_path / "clip.mp4", 12, height=120, width=160)
    inp = videollava.run_stages(str(video), get_workload("videollava"), "What is here?")
    assert inp.visual_tokens == videollava.visual_rows_for(get_workload("videollava"))
    image = videollava.run_stages(str(video), get_workload("videollava-image"), "What is here?")
    assert image.visual_tokens == videollava.patches


def test_one_image_is_not_repeated_into_a_video(videollava, tmp_path):
    from PIL import Image

    from vlopt.models import get_workload

    Image.fromarray(_image(60, 80)).save(tmp_path / "photo.png")
    with pytest.raises(VloptError, match="single image cannot be sampled into 8 video frames.*image workload"):
        videollava.run_stages(str(tmp_path / "photo.png"), get_workload("videollava"), "q")
    with pytest.raises(VloptError, match="single image"):
        load_frames(_write_mp4(tmp_path / "one.mp4", 1), num_frames=8)
    # Two or more frames: the original's rule repeats frames of a short clip.
    assert len(sample_uniform([_image(4, 4, 0), _image(4, 4, 1)], 8)) == 8


def test_bad_video_files_are_explained(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VloptError, match="not a readable video file"):
        load_frames(tmp_path / "broken.mp4")

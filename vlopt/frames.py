"""Frames and images for Video-LLaVA and LLaVA (stage 1) and CLIP preprocessing for every model
(stage 2).

CLIP preprocessing is done here with PIL and numpy and equals transformers' PIL image processors
(`CLIPImageProcessorPil`, `VideoLlavaImageProcessor`) exactly; transformers' torchvision processors
and its video processors need torchvision, which does not import beside the CPU torch. Video files
are decoded with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlopt.errors import VloptError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to `size`. The long side is truncated, not
    rounded, with transformers' own float expression (`get_resize_output_image_size`): 4:3 at 224
    gives 298 columns, not 299."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def clip_preprocess(images: list[np.ndarray], size: int):
    """Resize the short side to `size` (PIL bicubic), center-crop `size`², rescale by 1/255 (in
    float64, then float32, as transformers does), normalize with CLIP's mean and std in float32.
    Returns a float32 tensor [T, 3, size, size]."""
    import torch
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        w, h = resized_size(*pil.size, size)
        pil = pil.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(pil.crop((left, top, left + size, top + size)))
        scaled = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((scaled - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise VloptError(f"{path} is not a readable image: {err}") from None


def load_frames(path: str | Path, num_frames: int | None = None) -> list[np.ndarray]:
    """The frames of a video given as a video file (.mp4, …, decoded with PyAV), a folder of images
    (sorted by name) or an array file (.npy/.npz, uint8 [T, H, W, 3]; pickle refused), or one image
    file (one frame). With `num_frames`, only those frames, picked by `sample_uniform`'s rule."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return read_video(path, num_frames)
    frames = _read_frames(path)
    return frames if num_frames is None else sample_uniform(frames, num_frames)


def _read_frames(path: Path) -> list[np.ndarray]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VloptError(f"folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} frames")
        return [_read_image(p) for p in files]
    if not path.is_file():
        raise VloptError(f"video input {path} does not exist (give a video file ({'/'.join(VIDEO_SUFFIXES)}), "
                         "a folder of frames, an .npy/.npz array [T,H,W,3] or an image)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [_read_image(path)]
    if path.suffix not in (".npy", ".npz"):
        raise VloptError(f"video input {path}: expected a video file ({'/'.join(VIDEO_SUFFIXES)}), a folder, "
                         f".npy/.npz or an image, not '{path.suffix}'")
    try:
        arr = np.load(path, allow_pickle=False)
        if isinstance(arr, np.lib.npyio.NpzFile):
            if not arr.files:
                raise VloptError(f"{path} holds no arrays")
            arr = arr[arr.files[0]]
    except ValueError as err:
        raise VloptError(f"{path} is not a plain numpy array file (pickle is refused): {err}") from None
    except OSError as err:
        raise VloptError(f"{path} is not a readable numpy file: {err}") from None
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VloptError(f"{path} holds an array {arr.shape}; expected uint8 frames [T, H, W, 3]")
    return [np.asarray(f, dtype=np.uint8) for f in arr]


def uniform_indices(total: int, n: int) -> list[int]:
    """`n` indices spread over `total` frames the way the original Video-LLaVA picks them
    (`np.linspace(0, total - 1, n, dtype=int)`: truncated, first and last frame included). A clip
    shorter than `n` frames (but longer than one) repeats frames, as the original does."""
    if total < 1:
        raise VloptError("the video has no frames")
    if total == 1 and n > 1:
        # One picture is not a video: repeating it would time a shape that shows nothing moving.
        raise VloptError(f"a single image cannot be sampled into {n} video frames; give a video (a video file, "
                         "a folder of frames or an array [T, H, W, 3]) or use an image workload")
    return np.linspace(0, total - 1, n, dtype=int).tolist()


def sample_uniform(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    """`n` frames spread uniformly (`uniform_indices`)."""
    return [frames[i] for i in uniform_indices(len(frames), n)]


def read_video(path: str | Path, num_frames: int | None = None) -> list[np.ndarray]:
    """Decode a video file's first video stream into RGB frames with PyAV; with `num_frames`, keep
    only the frames `uniform_indices` picks (the others are decoded but not converted)."""
    path = Path(path)
    total = _count_frames(path)
    wanted = list(range(total)) if num_frames is None else uniform_indices(total, num_frames)
    kept = _decode(path, set(wanted))
    if len(kept) < len(set(wanted)):   # the container's frame count was too high: count by decoding
        total = _count_frames(path, trust_header=False)
        wanted = list(range(total)) if num_frames is None else uniform_indices(total, num_frames)
        kept = _decode(path, set(wanted))
    return [kept[i] for i in wanted]


def _open_video(path: Path):
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise VloptError(f"{path} is not a readable video file: {err}") from None
    if not container.streams.video:
        container.close()
        raise VloptError(f"{path} holds no video stream")
    return container


def _count_frames(path: Path, trust_header: bool = True) -> int:
    import av

    with _open_video(path) as container:
        stream = container.streams.video[0]
        if trust_header and stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for _ in container.decode(stream))
        except av.FFmpegError as err:
            raise VloptError(f"{path}: decoding failed: {err}") from None


def _decode(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    import av

    kept = {}
    last = max(wanted, default=-1)
    with _open_video(path) as container:
        try:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except av.FFmpegError as err:
            raise VloptError(f"{path}: decoding failed: {err}") from None
    return kept


def synthetic_video(*, num_frames: int = 16, height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A deterministic clip of two coloured squares moving over a gradient: uint8 [T, H, W, 3]."""
    rng = np.random.default_rng(seed)
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
    base[..., 2] = np.linspace(200, 40, height, dtype=np.uint8)[:, None]
    colours = rng.integers(0, 256, (2, 3), dtype=np.uint8)
    out = np.repeat(base[None], num_frames, axis=0)
    for t in range(num_frames):
        for k, (x0, y0, dx, dy) in enumerate([(20, 30, 12, 4), (200, 150, -8, -5)]):
            x, y = x0 + dx * t, y0 + dy * t
            out[t, max(0, y):max(0, y + 40), max(0, x):max(0, x + 40)] = colours[k]
    return out

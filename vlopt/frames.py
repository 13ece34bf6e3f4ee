"""Frames and images for Video-LLaVA (stage 1) and CLIP preprocessing for both models (stage 2).

CLIP preprocessing is done here with PIL and numpy — the transformers video processors need
torchvision, which does not import beside the CPU torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlopt.errors import VloptError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def clip_preprocess(images: list[np.ndarray], size: int):
    """Resize the shortest side to `size` (bicubic), center-crop `size`², scale to [0,1], normalize.
    Returns a float32 tensor [T, 3, size, size]."""
    import torch
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        w, h = pil.size
        scale = size / min(w, h)
        pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append(((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise VloptError(f"{path} is not a readable image: {err}") from None


def load_frames(path: str | Path) -> list[np.ndarray]:
    """All frames of a video given as a folder of images (sorted by name) or an array file
    (.npy/.npz, uint8 [T, H, W, 3]; pickle refused), or one image file (one frame)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VloptError(f"folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} frames")
        return [_read_image(p) for p in files]
    if not path.is_file():
        raise VloptError(f"video input {path} does not exist (give a folder of frames, an .npy/.npz "
                         "array [T,H,W,3] or an image)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [_read_image(path)]
    if path.suffix not in (".npy", ".npz"):
        raise VloptError(f"video input {path}: expected a folder, .npy/.npz or an image, not '{path.suffix}'")
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


def sample_uniform(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    """`n` frames spread uniformly (np.linspace, as the original evaluation sampled)."""
    if len(frames) < 1:
        raise VloptError("the video has no frames")
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


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

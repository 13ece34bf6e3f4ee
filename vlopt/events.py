"""Event streams (stage 1 of EventGPT) and their rendering into frames (stage 2).

An event stream is four equal-length arrays: x, y (pixel), p (polarity 0/1) and t (microseconds).
Rendering follows the original EventGPT code: N chunks of equal event count (the last takes the
remainder), each drawn on a white image, p=1 red and p=0 blue, a later event overwriting an earlier one.

Validation: x and y are whole, non-negative pixel indices inside the sensor. The sensor size is given
(`sensor_size=(width, height)`, or scalar arrays `width` and `height` in the .npz), else inferred from
the largest coordinate; either way at most MAX_SENSOR × MAX_SENSOR pixels, since every frame is drawn at
that size. t is finite, non-negative and in time order: an unsorted stream is an error, not re-sorted,
because the frames are chunks of consecutive events.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlopt.errors import VloptError

FIELDS = ("x", "y", "p", "t")
MAX_SENSOR = 4096          # pixels per side: a frame is drawn at the sensor size (4096² × 3 B = 48 MiB)


def load_events(path: str | Path, *, allow_pickle: bool = False,
                sensor_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Read an event stream from `.npz` (arrays x, y, p, t; optional scalars width, height), a
    structured `.npy` with those fields, or — only with `allow_pickle=True`, because unpickling runs
    code — the original pickled-dict `.npy`."""
    path = Path(path)
    if not path.is_file():
        raise VloptError(f"event file {path} does not exist (give an .npz or .npy with arrays x, y, p, t)")
    if path.suffix not in (".npz", ".npy"):
        raise VloptError(f"event file {path} must be .npz or .npy, not '{path.suffix}'")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:4] != b"PK\x03\x04" and magic != b"\x93NUMPY":
        raise VloptError(f"{path} is not a readable numpy file (no .npy/.npz header)")
    try:
        loaded = np.load(path, allow_pickle=allow_pickle)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise VloptError(
                f"{path} holds a pickled object; unpickling can run code, so it is refused. "
                "If you trust the file (the original EventGPT .npy dicts), pass --allow-pickle, "
                "or convert it once to .npz with arrays x, y, p, t") from None
        raise VloptError(f"{path} is not a readable numpy file: {err}") from None
    except (OSError, EOFError) as err:
        raise VloptError(f"{path} is not a readable numpy file: {err}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        arrays = {k: loaded[k] for k in loaded.files}
    elif loaded.dtype.names:
        arrays = {k: loaded[k] for k in loaded.dtype.names}
    elif loaded.dtype == object and loaded.shape == ():
        arrays = loaded.item()
        if not isinstance(arrays, dict):
            raise VloptError(f"{path} holds a pickled {type(arrays).__name__}, expected a dict of x, y, p, t")
    else:
        raise VloptError(f"{path} holds a plain {loaded.dtype} array {loaded.shape}; expected arrays x, y, p, t")
    if sensor_size is None and "width" in arrays and "height" in arrays:
        sensor_size = (_scalar(arrays["width"], "width", str(path)), _scalar(arrays["height"], "height", str(path)))
    return validate_events(arrays, source=str(path), sensor_size=sensor_size)


def _scalar(value, name: str, source: str) -> int:
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in "iu":
        raise VloptError(f"{source}: '{name}' must be one whole number (the sensor's {name} in pixels)")
    return int(value.reshape(-1)[0])


def _check_sensor(width: int, height: int, source: str, given: bool) -> None:
    """`given`: a sensor size the user gave; else the size the largest x and y imply."""
    if width < 1 or height < 1:
        raise VloptError(f"{source}: sensor size {width}×{height} must be at least 1×1")
    if given and (width > MAX_SENSOR or height > MAX_SENSOR):
        raise VloptError(f"{source}: sensor size {width}×{height} is over the {MAX_SENSOR}×{MAX_SENSOR} limit; "
                         "give the sensor's real width and height in pixels")
    for axis, size in (("x", width), ("y", height)):
        if not given and size > MAX_SENSOR:
            raise VloptError(f"{source}: {axis} reaches {size - 1}, beyond the {MAX_SENSOR}×{MAX_SENSOR} sensors vlopt "
                             f"handles; x and y must be pixel indices from 0 (check the file's {axis} array)")


def validate_events(arrays: dict, *, source: str = "event stream",
                    sensor_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Check an event stream (see the module docstring) and return its four arrays, flattened."""
    missing = [k for k in FIELDS if k not in arrays]
    if missing:
        raise VloptError(f"{source} lacks arrays {missing}; an event stream needs x, y, p, t")
    ev = {k: np.asarray(arrays[k]).reshape(-1) for k in FIELDS}
    lengths = {k: len(v) for k, v in ev.items()}
    if len(set(lengths.values())) != 1:
        raise VloptError(f"{source}: arrays x, y, p, t must have one length, got {lengths}")
    if lengths["x"] == 0:
        raise VloptError(f"{source} has no events")
    for k in FIELDS:
        if ev[k].dtype.kind not in "biuf":
            raise VloptError(f"{source}: array {k} holds {ev[k].dtype} values; it must hold numbers")
    for k in ("x", "y"):
        v = ev[k]
        if v.dtype.kind == "f" and not (np.isfinite(v).all() and (v == np.round(v)).all()):
            raise VloptError(f"{source}: {k} must be whole pixel indices; it holds NaN, infinite or fractional values")
        if v.min() < 0:
            raise VloptError(f"{source} has negative pixel coordinates ({k} down to {v.min()}); x and y count from 0")
    if sensor_size is not None:
        width, height = (int(n) for n in sensor_size)
        _check_sensor(width, height, source, given=True)
        for k, size in (("x", width), ("y", height)):
            if ev[k].max() >= size:
                raise VloptError(f"{source}: {k} reaches {ev[k].max()}, outside the {width}×{height} sensor "
                                 f"({k} < {size}); fix the coordinates or the sensor size")
    else:
        _check_sensor(int(ev["x"].max()) + 1, int(ev["y"].max()) + 1, source, given=False)
    if not np.isin(ev["p"], (0, 1)).all():
        raise VloptError(f"{source}: polarity p must be 0 or 1")
    t = ev["t"]
    if not np.isfinite(t).all():
        raise VloptError(f"{source}: timestamps t hold NaN or infinite values; t must be finite microseconds")
    if t.min() < 0:
        raise VloptError(f"{source}: timestamps t go down to {t.min()}; t must be non-negative microseconds")
    if (np.diff(t) < 0).any():
        first = int(np.argmax(np.diff(t) < 0)) + 1
        raise VloptError(f"{source}: events are not in time order (t[{first}] = {t[first]} < t[{first - 1}] = "
                         f"{t[first - 1]}); sort all four arrays by t, e.g. with np.argsort(t, kind='stable')")
    return ev


def save_events(path: str | Path, ev: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    np.savez(path, **{k: ev[k] for k in FIELDS})
    return path


def synthetic_events(*, seed: int = 0, width: int = 640, height: int = 480,
                     num_events: int = 60_000, duration_us: int = 50_000) -> dict[str, np.ndarray]:
    """A deterministic stream of three squares moving across the sensor: the demo and test input.

    Events fire on the leading (p=1) and trailing (p=0) edges of each square, in time order."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, duration_us, num_events))
    phase = t / duration_us
    shape = rng.integers(0, 3, num_events)
    size = np.array([60, 90, 40])[shape]
    cx = np.array([100, 300, 500])[shape] + (np.array([200, -150, 80])[shape] * phase)
    cy = np.array([120, 260, 380])[shape] + (np.array([40, 60, -120])[shape] * phase)
    leading = rng.random(num_events) < 0.5
    side = np.where(leading, 1, -1) * size / 2
    along = (rng.random(num_events) - 0.5) * size
    x = np.clip(cx + side + rng.normal(0, 1.5, num_events), 0, width - 1).astype(np.uint16)
    y = np.clip(cy + along, 0, height - 1).astype(np.uint16)
    return {"x": x, "y": y, "p": leading.astype(np.uint8), "t": t.astype(np.int64)}


def render_frames(ev: dict[str, np.ndarray], num_frames: int = 5) -> list[np.ndarray]:
    """Split into `num_frames` chunks of equal event count and draw each as an RGB uint8 image."""
    n = len(ev["x"])
    if num_frames < 1:
        raise VloptError(f"num_frames must be at least 1, got {num_frames}")
    if n < num_frames:
        raise VloptError(f"the event stream has {n} events, fewer than the {num_frames} frames asked for")
    height, width = int(ev["y"].max()) + 1, int(ev["x"].max()) + 1
    _check_sensor(width, height, "event stream", given=False)
    per = n // num_frames
    frames = []
    for i in range(num_frames):
        sl = slice(i * per, n if i == num_frames - 1 else (i + 1) * per)
        img = np.full((height, width, 3), 255, dtype=np.uint8)
        # numpy assigns repeated indices in order, so the later event wins, as in the original.
        img[ev["y"][sl].astype(np.intp), ev["x"][sl].astype(np.intp)] = np.where(
            ev["p"][sl, None] == 1, np.array([255, 0, 0], np.uint8), np.array([0, 0, 255], np.uint8))
        frames.append(img)
    return frames

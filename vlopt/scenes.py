"""A seeded synthetic visual question-answering task shared by both model families.

A scene is 1–3 objects — each with its own shape and colour, small or large — moving together in one
direction (left/right/up/down) at one speed over a plain gray background, during a 50 ms clip. It is
rendered as what a user's file gives the families' stage 1, so a scene goes through the same stage 1–2
code as real inputs:

- `render_events`: an event stream (x, y, p, t in µs), as `vlopt.events.load_events` returns it, for
  EventGPT (`render_frames` → `clip_preprocess`, as `EventGPT.preprocess` does);
- `render_video` (8 RGB frames) and `render_image` (one frame), as Video-LLaVA's `load_input` returns
  them.

Event cameras see brightness changes, not colour, and an ON/OFF polarity alone tells only "brighter"
from "darker" (the frame rendering overwrites pixels, so event counts do not show). So the simulated
sensor is a colour event camera (an RGGB Bayer filter over the pixels, as on the Color-DAVIS346): each
pixel sees one colour channel and fires ON where that channel's log intensity rises, OFF where it
falls. A red object's leading edge is then ON on the red sites and OFF on the green and blue sites,
which tells red from blue — and from white (all ON). The palette has no two colours whose patterns
are each other's inverse (red/cyan, blue/yellow, white/black): an object's trailing edge shows the
inverse pattern, and that must not read as another colour moving the other way. Sensor size = frame
size = the models' CLIP input size, so `clip_preprocess` does not resample and the Bayer sites stay
whole pixels.

The objects travel 16–24 px over the clip, so each of EventGPT's five equal-event-count frames moves
3–5 px on from the last one: direction is decidable. Speed is never asked: equal-count framing erases it.

Questions and answers come from a fixed grammar (`questions`), short and deterministic, so exact match
is a fair metric (`score`). Scene sets are `scenes(seed, n, split)`; the "train" and "eval" splits draw
from different `SeedSequence` spawn keys, so no seed can give a training scene to an evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SIZE = 56                                  # sensor / frame side in pixels (= the trained models' CLIP input)
BACKGROUND = (128, 128, 128)               # plain gray
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 60, 230), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")  # also the order in which answers list objects
RADIUS = {"small": 5.0, "large": 8.0}      # half the object's extent in pixels
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
COUNT_WORDS = ("one", "two", "three")
LANE_CENTRES = (10.0, 28.0, 46.0)          # across the motion: room for three large objects, 1 px margin
TRAVEL_PX = (16.0, 24.0)                   # how far the objects move during the clip (the speed)
DURATION_US = 50_000
VIDEO_FRAMES = 8
EVENT_THRESHOLD = 0.25                     # log-intensity change per event (a typical DVS contrast threshold)
SIM_STEPS = 100                            # ≤ 0.24 px of motion per simulation step
NOISE_FRACTION = 0.01                      # background-activity events, relative to the signal events
VIDEO_NOISE_STD = 3.0                      # sensor noise of the RGB frames, in 8-bit levels
SPLITS = {"train": 0, "eval": 1}           # SeedSequence spawn keys: the two splits never share a stream

MOTION_KINDS = ("count", "direction", "moving", "colour", "shape", "size", "describe")
STILL_KINDS = ("count", "objects", "colour", "shape", "size", "describe")
MODALITIES = ("events", "video", "image")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    start: tuple[float, float]      # centre (x, y) in pixels at the start of the clip


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]       # in SHAPES order (shapes are unique within a scene)
    direction: str
    travel: float                   # pixels moved over the clip
    split: str
    seed: int
    index: int
    ask: int                        # picks the question this scene asks in an evaluation

    def centre(self, thing: Thing, f: float) -> tuple[float, float]:
        """Where `thing` is at clip fraction `f` ∈ [0, 1]."""
        dx, dy = DIRECTIONS[self.direction]
        return thing.start[0] + f * self.travel * dx, thing.start[1] + f * self.travel * dy

    def render_rng(self, stream: int) -> np.random.Generator:
        """Noise for renderer `stream` (0 events, 1 video), fixed per scene."""
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(SPLITS[self.split], self.index, 1,
                                                                                  stream)))


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


# ---- scene sets ----------------------------------------------------------------------------------

def scenes(seed: int, n: int, split: str = "eval") -> list[Scene]:
    """`n` scenes from `seed`. Scene i of a split comes from `SeedSequence(seed, spawn_key=(split, i))`,
    so a larger `n` extends a set and the splits are disjoint whatever the seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    return [make_scene(seed, i, split) for i in range(n)]


def make_scene(seed: int, index: int, split: str) -> Scene:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index)))
    count = int(rng.integers(1, 4))
    shapes = sorted(rng.choice(len(SHAPES), count, replace=False).tolist())
    colours = rng.choice(list(COLOURS), count, replace=False).tolist()
    sizes = rng.choice(list(RADIUS), count).tolist()
    direction = str(rng.choice(list(DIRECTIONS)))
    travel = float(rng.uniform(*TRAVEL_PX))
    # Objects move in separate lanes across the motion, so they never overlap.
    lanes = rng.choice(3, count, replace=False)
    dx, dy = DIRECTIONS[direction]
    moving_sign = dx + dy                      # +1: towards larger coordinates
    things = []
    for shape, colour, size, lane in zip(shapes, colours, sizes, lanes):
        r = RADIUS[size]
        across = LANE_CENTRES[lane] + rng.uniform(-0.5, 0.5)
        low, high = r + 1, SIZE - r - 1 - travel   # the whole path stays inside the frame
        along = rng.uniform(low, high)
        if moving_sign < 0:
            along += travel
        start = (along, across) if dy == 0 else (across, along)
        things.append(Thing(SHAPES[shape], str(colour), str(size), (float(start[0]), float(start[1]))))
    return Scene(tuple(things), direction, travel, split, int(seed), int(index), int(rng.integers(0, 2**31)))


# ---- rendering -----------------------------------------------------------------------------------

@functools.cache
def _pixel_centres() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    xs.flags.writeable = ys.flags.writeable = False     # shared by every call
    return xs, ys


def shape_mask(shape: str, r: float, cx: float, cy: float) -> np.ndarray:
    """[SIZE, SIZE] bool: pixels whose centre lies inside the shape."""
    xs, ys = _pixel_centres()
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.9 * r
    if shape == "triangle":   # apex up, base 2r wide
        return (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= (dy + r) / 1.8)
    raise ValueError(f"unknown shape {shape!r}")


def render_rgb(scene: Scene, f: float) -> np.ndarray:
    """The noiseless RGB image [SIZE, SIZE, 3] uint8 at clip fraction `f`."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    for thing in scene.things:
        img[shape_mask(thing.shape, RADIUS[thing.size], *scene.centre(thing, f))] = COLOURS[thing.colour]
    return img


def bayer_channel() -> np.ndarray:
    """[SIZE, SIZE] channel index (0 R, 1 G, 2 B) each pixel sees through an RGGB filter."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    return np.array([[0, 1], [1, 2]])[ys % 2, xs % 2]


def render_events(scene: Scene) -> dict[str, np.ndarray]:
    """The scene seen by a colour event camera: a time-ordered stream of arrays x, y, p (1 ON, 0 OFF),
    t (µs), with ~1 % background-activity noise (two noise events sit on the last column and row, so
    the rendered frames have the sensor's size)."""
    rng = scene.render_rng(0)
    channel = bayer_channel()
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]

    def log_intensity(f):
        return np.log(render_rgb(scene, f)[rows, cols, channel].astype(np.float64))

    ref = log_intensity(0.0)
    dt = DURATION_US / SIM_STEPS
    xs, ys, ps, ts = [], [], [], []
    for step in range(1, SIM_STEPS + 1):
        diff = log_intensity(step / SIM_STEPS) - ref
        crossings = np.floor(np.abs(diff) / EVENT_THRESHOLD).astype(np.int64)
        y, x = np.nonzero(crossings)
        if len(x) == 0:
            continue
        n = crossings[y, x]
        rising = diff[y, x] > 0
        ref[y, x] += np.where(rising, 1.0, -1.0) * n * EVENT_THRESHOLD
        xs.append(np.repeat(x, n))
        ys.append(np.repeat(y, n))
        ps.append(np.repeat(rising, n))
        # A pixel's events spread over the step in which its change happened.
        ts.append((step - 1 + rng.random(int(n.sum()))) * dt)
    x, y, p, t = (np.concatenate(a) for a in (xs, ys, ps, ts))
    k = max(2, round(NOISE_FRACTION * len(x)))
    nx, ny = rng.integers(0, SIZE, k), rng.integers(0, SIZE, k)
    nx[0], ny[1] = SIZE - 1, SIZE - 1
    x, y = np.concatenate([x, nx]), np.concatenate([y, ny])
    p = np.concatenate([p, rng.random(k) < 0.5])
    t = np.concatenate([t, rng.random(k) * DURATION_US])
    order = np.argsort(t, kind="stable")
    return {"x": x[order].astype(np.uint16), "y": y[order].astype(np.uint16), "p": p[order].astype(np.uint8),
            "t": t[order].astype(np.int64)}


def render_video(scene: Scene, frames: int = VIDEO_FRAMES) -> list[np.ndarray]:
    """`frames` RGB uint8 frames [SIZE, SIZE, 3] spread over the clip, with a little sensor noise."""
    rng = scene.render_rng(1)
    out = []
    for i in range(frames):
        img = render_rgb(scene, i / max(1, frames - 1)).astype(np.float64)
        img += rng.normal(0.0, VIDEO_NOISE_STD, img.shape)
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return out


def render_image(scene: Scene) -> list[np.ndarray]:
    """The still image (mid-clip), as a one-frame list like Video-LLaVA's `load_input` gives."""
    return render_video(scene, frames=3)[1:2]


def render(scene: Scene, modality: str):
    """The raw stage-1 input for `modality` ("events", "video" or "image")."""
    if modality == "events":
        return render_events(scene)
    if modality == "video":
        return render_video(scene)
    if modality == "image":
        return render_image(scene)
    raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")


# ---- the grammar ---------------------------------------------------------------------------------

QUESTION_TEXT = {
    "count": "How many objects are there?",
    "direction": "Which direction are the objects moving?",
    "moving": "What is moving?",
    "objects": "What objects are in the image?",
    "colour": "What colour is the {shape}?",
    "shape": "What shape is the {colour} object?",
    "size": "Is the {shape} small or large?",
    "describe": {"motion": "Describe the scene in one sentence.", "still": "Describe the image in one sentence."},
}


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def kinds(modality: str) -> tuple[str, ...]:
    """The question kinds a modality can answer (a still image shows no motion)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    return STILL_KINDS if modality == "image" else MOTION_KINDS


def qa(scene: Scene, kind: str, thing: Thing | None = None, *, still: bool = False) -> QA:
    """The question of `kind` (about `thing` for colour/shape/size) and its answer."""
    things = scene.things
    if kind == "count":
        return QA(kind, QUESTION_TEXT[kind], COUNT_WORDS[len(things) - 1])
    if kind == "direction":
        return QA(kind, QUESTION_TEXT[kind], scene.direction)
    if kind in ("moving", "objects"):
        return QA(kind, QUESTION_TEXT[kind], _listing([f"a {t.colour} {t.shape}" for t in things]))
    if kind == "colour":
        return QA(kind, QUESTION_TEXT[kind].format(shape=thing.shape), thing.colour)
    if kind == "shape":
        return QA(kind, QUESTION_TEXT[kind].format(colour=thing.colour), thing.shape)
    if kind == "size":
        return QA(kind, QUESTION_TEXT[kind].format(shape=thing.shape), thing.size)
    if kind == "describe":
        listing = _listing([f"a {t.size} {t.colour} {t.shape}" for t in things])
        listing = listing[0].upper() + listing[1:]
        if still:
            return QA(kind, QUESTION_TEXT[kind]["still"], listing + ".")
        verb = "moves" if len(things) == 1 else "move"
        return QA(kind, QUESTION_TEXT[kind]["motion"], f"{listing} {verb} {scene.direction}.")
    raise ValueError(f"unknown question kind {kind!r}")


PER_OBJECT = ("colour", "shape", "size")


def questions(scene: Scene, modality: str) -> list[QA]:
    """Every question the scene answers in `modality` (training uses them all)."""
    still = modality == "image"
    out = []
    for kind in kinds(modality):
        if kind in PER_OBJECT:
            out += [qa(scene, kind, t, still=still) for t in scene.things]
        else:
            out.append(qa(scene, kind, still=still))
    return out


def question(scene: Scene, modality: str) -> QA:
    """The one question an evaluation asks of this scene: kinds uniform, then a uniform object."""
    ks = kinds(modality)
    kind = ks[scene.ask % len(ks)]
    thing = scene.things[(scene.ask // len(ks)) % len(scene.things)]
    return qa(scene, kind, thing, still=modality == "image")


def task_texts() -> list[str]:
    """Every question and answer the grammar can produce (the tokenizer's training text)."""
    texts = set()
    for q in QUESTION_TEXT.values():
        for form in (q.values() if isinstance(q, dict) else [q]):
            texts |= {form.format(shape=s, colour=c) for s in SHAPES for c in COLOURS}
    texts |= set(COUNT_WORDS) | set(DIRECTIONS) | set(COLOURS) | set(SHAPES) | set(RADIUS)
    from itertools import combinations, permutations, product

    for count in (1, 2, 3):
        for shapes in combinations(SHAPES, count):
            for colours in permutations(COLOURS, count):
                for sizes in product(RADIUS, repeat=count):
                    things = tuple(Thing(s, c, z, (0.0, 0.0)) for s, c, z in zip(shapes, colours, sizes))
                    for direction in DIRECTIONS:
                        scene = Scene(things, direction, 0.0, "train", 0, 0, 0)
                        texts |= {a.answer for a in questions(scene, "video") + questions(scene, "image")}
    return sorted(texts)


# ---- scoring and evaluation ----------------------------------------------------------------------

def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def score(answer: str, expected: str) -> bool:
    """Exact match after lower-casing and whitespace normalisation."""
    return normalize(answer) == normalize(expected)


def modality_of(workload) -> str:
    return workload.input_kind


def evaluate(vlm, scene_set: list[Scene], *, workload=None, new_tokens: int = 32,
             all_questions: bool = False) -> dict:
    """Accuracy of `vlm` on `scene_set`: each scene's input goes through the model's stages 1–3
    (`preprocess` → `encode`, raw input rendered instead of read from a file) and stage 4 at natural
    length, greedy, through the model's current engine. One question per scene (`question`), or every
    question with `all_questions`."""
    from vlopt.models import get_workload

    workload = workload or get_workload(vlm.default_workload)
    if isinstance(workload, str):
        workload = get_workload(workload)
    modality = modality_of(workload)
    records = []
    for scene in scene_set:
        raw = render(scene, modality)
        for item in (questions(scene, modality) if all_questions else [question(scene, modality)]):
            prepared = vlm.preprocess(raw, item.question, workload)
            result = vlm.stage4(vlm.encode(prepared), new_tokens=new_tokens, fixed=False)
            answer = vlm.tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
            records.append({"scene": scene.index, "kind": item.kind, "question": item.question,
                            "expected": item.answer, "answer": answer, "correct": score(answer, item.answer)})
    per_kind = {}
    for kind in kinds(modality):
        hits = [r["correct"] for r in records if r["kind"] == kind]
        if hits:
            per_kind[kind] = sum(hits) / len(hits)
    return {"accuracy": sum(r["correct"] for r in records) / max(1, len(records)), "per_kind": per_kind,
            "answers": records, "scenes": len(scene_set), "questions": len(records), "modality": modality,
            "workload": workload.name}

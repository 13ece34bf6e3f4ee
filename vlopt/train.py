"""Training the "trained tiny" models of both families on the synthetic scene task (`vlopt.scenes`).

    vlopt train eventgpt --steps 3000 --seed 0 --device cuda --out out/trained/eventgpt
    vlopt train videollava --steps 3000 --seed 0 --device cuda --out out/trained/videollava

(`python -m vlopt.train ...` is the same command.)

The models have the families' real structure, built through the same classes as the presets, at
sizes that train in minutes: a CLIP tower at the scene's 56 px (patch 14: 16 patches + CLS), the
projector (EventGPT: + feature_adaptor and the T+N pooling of 5 frames; Video-LLaVA: image and video
towers, layer −2 features, 8 frames), and an 8-layer LLaMA decoder. Both use the task tokenizer
(`vlopt.models.task_tokenizer`).

Training data goes through the families' own stage 1–2 code: each training scene is rendered
(`vlopt.scenes.render`) and passed to `vlm.preprocess`, once, into a pool of pixel tensors; a step
samples (scene, question) pairs from the pool — question kinds by their running loss (`KindCurriculum`) —
and runs stage 3 batched from the model's own submodules (`batch_features`, tested equal to
`vlm.features`). The loss is cross-entropy on the answer tokens and EOS, plus a LayerSkip-style early-exit
loss: the shared final norm and lm_head read every intermediate layer, weighted rising with depth, so
that the first k layers draft what the full model would say (what `layer_skip` needs).

Seeded: on CPU the same seed and steps give the same loss history. The output folder is
`save_pretrained` weights (safetensors) + the tokenizer, which `vlopt.load_model(path=DIR)` loads, and
`vlopt_training.json` (arguments, loss history, evaluation).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from vlopt import scenes

FAMILIES = ("eventgpt", "videollava")
# Which inputs each family trains on (with sampling weights), and the workload that runs each.
MODALITIES = {"eventgpt": {"events": 1.0}, "videollava": {"video": 1.0, "image": 1.0}}
WORKLOADS = {"events": "eventgpt", "video": "videollava", "image": "videollava-image"}

VISION = dict(patch_size=14, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, hidden_act="quick_gelu")
TEXT = dict(hidden_size=160, intermediate_size=448, num_hidden_layers=8, num_attention_heads=5,
            max_position_embeddings=1024, rms_norm_eps=1e-5)


# ---- the models ------------------------------------------------------------------------------------

def build_model(family: str, *, seed: int = 0, device: str = "cpu", vision: dict | None = None):
    """A freshly initialised trained-tiny model of `family` (a `VLModel` with the task tokenizer).
    Built on the CPU, so the initial weights do not depend on the device. `vision` overrides
    CLIPVisionConfig fields of `VISION` (e.g. patch_size 8, num_hidden_layers 4)."""
    import torch

    from vlopt.models.base import seeded_init
    from vlopt.models.task_tokenizer import build_task_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    tokenizer = build_task_tokenizer()
    vision = dict(VISION, image_size=scenes.SIZE, **(vision or {}))
    if scenes.SIZE % vision["patch_size"] or vision["patch_size"] % 2:
        raise ValueError(f"patch_size must be even (the colour sensor's 2×2 mosaic) and divide {scenes.SIZE}, "
                         f"not {vision['patch_size']}")
    text = dict(TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"), seeded_init("cpu", seed):
            if family == "eventgpt":
                from vlopt.models.eventgpt import EventGPT, EventGPTConfig, EventGPTForCausalLM, register_auto_classes

                register_auto_classes()
                config = EventGPTConfig(**text, vision_config=vision, tie_word_embeddings=False)
                vlm = EventGPT(EventGPTForCausalLM(config), tokenizer, source={"trained": family})
            else:
                from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

                from vlopt.models.videollava import VideoLLaVA

                image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
                patches = (vision["image_size"] // vision["patch_size"]) ** 2
                config = VideoLlavaConfig(
                    text_config=dict(model_type="llama", **text),
                    vision_config=dict(model_type="clip_vision_model", **vision),
                    image_token_index=image_id, video_token_index=video_id, pad_token_id=tokenizer.pad_token_id,
                    image_seq_length=patches, video_seq_length=scenes.VIDEO_FRAMES * (patches + 1),
                    vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
                vlm = VideoLLaVA(VideoLlavaForConditionalGeneration(config), tokenizer, source={"trained": family})
    finally:
        torch.set_default_dtype(previous)
    vlm.hf.to(device)
    return vlm


def trained_start(folder: str | Path, family: str, device: str):
    """A trained model of `family` from `folder` (as `vlopt.load_model(path=...)` reads it), in float32, to
    train further."""
    from vlopt.errors import VloptError
    from vlopt.models import load_model

    vlm = load_model(path=str(folder), dtype="float32", device=device)
    if vlm.name != family:
        raise VloptError(f"--init {folder} holds a {vlm.name} model, not {family}")
    for p in vlm.hf.parameters():
        p.requires_grad_(True)
    return vlm


def save_model(vlm, out: str | Path) -> Path:
    """A folder `vlopt.load_model(path=out)` reads: safetensors weights, config, tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm.hf.save_pretrained(out, safe_serialization=True)
    vlm.tokenizer.save_pretrained(out)
    return out


# ---- stage 3, batched --------------------------------------------------------------------------------

def batch_features(vlm, modality: str, pixels):
    """Stage 3's vision half for a batch: pixels [B, T, 3, S, S] (as `preprocess` makes them, stacked)
    → [B, rows, hidden], from the model's own submodules; per sample equal to `vlm.features`."""
    import torch

    if vlm.name == "eventgpt":
        m = vlm.hf.model
        B, T = pixels.shape[:2]
        hidden = m.visual_tower(pixels.flatten(0, 1)).last_hidden_state
        feats = m.feature_adaptor(m.visual_projector(hidden))
        feats = feats.view(B, T, *feats.shape[1:])
        # EventGPT's spatio-temporal pooling: one mean per frame, then one mean over frames per position.
        return torch.cat([feats.mean(dim=2), feats.mean(dim=1)], dim=1)
    m = vlm.hf.model
    if modality == "image":
        return m.get_image_features(pixel_values=pixels[:, 0], return_dict=True).pooler_output
    B = pixels.shape[0]
    out = m.get_video_features(pixel_values_videos=pixels, return_dict=True).pooler_output
    return out.reshape(B, -1, out.shape[-1])


VISUAL = -1   # marks a visual row in an expanded prompt


def expanded_prompt(vlm, ids: list[int], rows: int) -> list[int]:
    """The prompt ids with one `VISUAL` marker per visual row where the model splices its features."""
    if vlm.name == "eventgpt":
        from vlopt.models.eventgpt import EVENT_TOKEN_INDEX

        pos = ids.index(EVENT_TOKEN_INDEX)
        return ids[:pos] + [VISUAL] * rows + ids[pos + 1:]
    cfg = vlm.hf.config
    placeholders = {cfg.image_token_index, cfg.video_token_index}
    out = [VISUAL if i in placeholders else i for i in ids]
    if out.count(VISUAL) != rows:
        raise ValueError(f"{out.count(VISUAL)} placeholders for {rows} visual rows")
    return out


def splice_batch(vlm, sequences: list[list[int]], feats: list):
    """Right-padded input embeddings [B, L, hidden] and attention mask [B, L] of `sequences` (token ids
    with `VISUAL` markers), the visual markers replaced by the rows of `feats` (one tensor a sample)."""
    import torch

    dev = vlm.device
    pad = vlm.tokenizer.pad_token_id
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    visual = ids == VISUAL
    embeds = vlm.text_model.embed_tokens(ids.clamp(min=0))
    rows = torch.cat([f.to(embeds.dtype) for f in feats], dim=0)
    embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), rows)
    return embeds, mask


# ---- the training pool -----------------------------------------------------------------------------

def _pixels(prepared: dict):
    """The pixel tensor of a prepared input (whatever key the adapter stores it under)."""
    import torch

    found = [v for v in prepared.values() if torch.is_tensor(v) and v.dim() == 4]
    if len(found) != 1:
        raise ValueError(f"expected one pixel tensor in the prepared input, found keys {list(prepared)}")
    return found[0]


def _render_one(args):

    scene, modalities = args
    return [scenes.render(scene, m) for m in modalities]


@dataclass
class Pool:
    """Pre-rendered training scenes: per modality a pixel tensor [scenes, T, 3, S, S] on the device,
    and each scene's attributes [scenes, groups] (for the attribute probe)."""

    scenes: list
    pixels: dict
    attributes: object = None


def build_pool(vlm, family: str, scene_set: list, *, workers: int = 1) -> Pool:
    """Render each scene once for every modality the family trains on and run it through the
    model's stage 2 (`vlm.preprocess`)."""
    import torch

    from vlopt.models import get_workload

    modalities = list(MODALITIES[family])
    jobs = [(s, modalities) for s in scene_set]
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            raws = ex.map(_render_one, jobs, chunksize=16)
            per_scene = list(raws)
    else:
        per_scene = [_render_one(j) for j in jobs]
    pixels = {}
    for k, modality in enumerate(modalities):
        workload = get_workload(WORKLOADS[modality])
        stacked = [_pixels(vlm.preprocess(raw[k], "", workload)).cpu() for raw in per_scene]
        pixels[modality] = torch.stack(stacked).to(vlm.device)
    attributes = torch.tensor([scene_attributes(s) for s in scene_set], dtype=torch.long, device=vlm.device)
    return Pool(list(scene_set), pixels, attributes)


class Draw(NamedTuple):
    index: int              # the pool scene
    modality: str
    prompt: list            # prompt ids (one placeholder for the visual rows)
    answer: list            # answer ids, EOS last
    kind: str               # the question kind (`scenes.kinds`)


class Sampler:
    """Seeded (scene, modality, question) draws: modality by weight, kind uniform or by `kind_weights`
    (modality -> one weight per kind of `scenes.kinds`), object uniform."""

    def __init__(self, vlm, family: str, pool: Pool, seed: int, weights: dict | None = None):
        import numpy as np

        from vlopt.models import get_workload

        self.vlm, self.pool = vlm, pool
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
        self.modalities = list(MODALITIES[family])
        w = np.array([(weights or MODALITIES[family])[m] for m in self.modalities], dtype=float)
        self.weights = w / w.sum()
        self.workloads = {m: get_workload(WORKLOADS[m]) for m in self.modalities}
        self._prompts: dict = {}
        self._answers: dict = {}
        self.kind_weights: dict | None = None

    def prompt_ids(self, modality: str, question: str) -> list[int]:
        key = (modality, question)
        if key not in self._prompts:
            self._prompts[key] = list(self.vlm.prompt(question, self.workloads[modality])["input_ids"])
        return self._prompts[key]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            tok = self.vlm.tokenizer
            self._answers[answer] = tok(" " + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        return self._answers[answer]

    def draw(self, batch_size: int) -> list[tuple]:

        out = []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.pool.scenes)))
            modality = self.modalities[int(self.rng.choice(len(self.modalities), p=self.weights))]
            scene = self.pool.scenes[i]
            kinds = scenes.kinds(modality)
            if self.kind_weights is None:
                kind = kinds[int(self.rng.integers(len(kinds)))]
            else:
                kind = kinds[int(self.rng.choice(len(kinds), p=self.kind_weights[modality]))]
            thing = scene.things[int(self.rng.integers(len(scene.things)))]
            item = scenes.qa(scene, kind, thing, still=modality == "image")
            out.append(Draw(i, modality, self.prompt_ids(modality, item.question), self.answer_ids(item.answer), kind))
        return out


# ---- the loss ----------------------------------------------------------------------------------------

def exit_weights(num_layers: int) -> list[float]:
    """Weights of the early exits after layers 1 … num_layers−1: rising with depth, summing to 1."""
    raw = list(range(1, num_layers))
    return [w / sum(raw) for w in raw]


# The scene attributes a training-only probe reads off the visual features: count, direction, and for
# each shape its colour and its size (class 0: the shape is absent).
ATTRIBUTE_CLASSES = (len(scenes.COUNT_WORDS), len(scenes.DIRECTIONS), *(1 + len(scenes.COLOURS) for _ in scenes.SHAPES),
                     *(1 + len(scenes.RADIUS) for _ in scenes.SHAPES))


def scene_attributes(scene) -> list[int]:
    colour = {t.shape: 1 + list(scenes.COLOURS).index(t.colour) for t in scene.things}
    size = {t.shape: 1 + list(scenes.RADIUS).index(t.size) for t in scene.things}
    return [len(scene.things) - 1, list(scenes.DIRECTIONS).index(scene.direction),
            *(colour.get(s, 0) for s in scenes.SHAPES), *(size.get(s, 0) for s in scenes.SHAPES)]


def frame_summaries(vlm, modality: str, feats):
    """[B, T, hidden]: one row per input frame, in time order, from batched visual rows [B, rows, hidden]
    RMS-normalised as the decoder's first layer sees them — EventGPT's temporal rows, the mean of each
    video frame's rows, the mean of an image's rows."""
    import torch.nn.functional as F

    feats = F.rms_norm(feats, (feats.shape[-1],), eps=vlm.text_model.config.rms_norm_eps)
    if vlm.name == "eventgpt":
        return feats[:, :vlm.hf.config.num_event_frames]
    if modality == "image":
        return feats.mean(dim=1, keepdim=True)
    return feats.view(feats.shape[0], scenes.VIDEO_FRAMES, -1, feats.shape[-1]).mean(dim=2)


def attribute_probe(vlm, family: str, seed: int):
    """A training-only linear readout of the scene's attributes, per modality: `still` reads what a
    single picture shows (count, colours, sizes) from every visual row on its own (events) or from each
    frame's mean row (video, image; see `attribute_loss`), `motion` reads the
    direction from the frame summaries in order. Reading every row makes each row carry the scene, so
    a decoder head attending to any of them finds it (with a probe reading only the concatenated frame
    summaries the decoder was at 38 % after 500 steps). The probe is not part of the saved model."""
    import torch
    from torch import nn

    frames = {"events": vlm.hf.config.num_event_frames if vlm.name == "eventgpt" else 5,
              "video": scenes.VIDEO_FRAMES, "image": 1}
    hidden = vlm.text_model.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.ModuleDict({m: nn.ModuleDict({"still": nn.Linear(hidden, sum(ATTRIBUTE_CLASSES)),
                                                 "motion": nn.Linear(frames[m] * hidden, ATTRIBUTE_CLASSES[DIRECTION])})
                               for m in MODALITIES[family]})
    return probe.to(vlm.device)


DIRECTION = 1    # the attribute group a still picture cannot show


def _standardised(x):
    """Per feature over the batch: the probe reads what varies between scenes, whatever the scale
    (the part common to every scene is penalised in `vision_phase`)."""
    return (x - x.mean(dim=0)) / (x.std(dim=0) + 1e-6) if x.shape[0] > 1 else x * 0


def attribute_loss(probe, modality: str, rows, summaries, labels):
    """Mean cross-entropy over the attribute groups: what a still picture shows from each visual row
    [B, rows, hidden] (RMS-normalised) alone, the direction from the frame summaries [B, T, hidden]
    (left out for a still image)."""
    import torch.nn.functional as F

    # Every row on its own for events; for video frames and images, each frame's mean (a patch of a
    # frame cannot be made to carry the whole scene: the probe loss stayed at 0.65 after 2000 steps).
    seen = rows if modality == "events" else summaries
    R = seen.shape[1]
    still = probe[modality]["still"](_standardised(seen)).flatten(0, 1)
    every_row = labels.repeat_interleave(R, dim=0)
    losses, start = [], 0
    for g, n in enumerate(ATTRIBUTE_CLASSES):
        if g != DIRECTION:
            losses.append(F.cross_entropy(still[:, start:start + n], every_row[:, g]))
        start += n
    if modality != "image":
        motion = probe[modality]["motion"](_standardised(summaries.flatten(1)))
        losses.append(F.cross_entropy(motion, labels[:, DIRECTION]))
    return sum(losses) / len(losses)


def decoder_loss(vlm, draws: list[Draw], feats: list, *, exit_weight: float) -> tuple:
    """(answer cross-entropy, per-exit cross-entropies, their weighted total, each draw's own answer
    cross-entropy) of the decoder on `draws` with each sample's visual rows `feats`."""
    import torch
    import torch.nn.functional as F

    sequences, labels = [], []
    for d, f in zip(draws, feats):
        prompt = expanded_prompt(vlm, d.prompt, f.shape[0])
        sequences.append(prompt + d.answer[:-1])
        labels.append([-100] * (len(prompt) - 1) + d.answer)
    embeds, mask = splice_batch(vlm, sequences, feats)
    target = torch.full(mask.shape, -100, dtype=torch.long)
    for b, lab in enumerate(labels):
        target[b, :len(lab)] = torch.tensor(lab)
    target = target.to(vlm.device)
    answer_rows = target != -100

    tm, head = vlm.text_model, vlm.lm_head
    captured = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in tm.layers[:-1]]
    try:
        final = tm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    y = target[answer_rows]
    token_ce = F.cross_entropy(head(final[answer_rows]).float(), y, reduction="none")
    ce = token_ce.mean()
    exits = [F.cross_entropy(head(tm.norm(h[answer_rows])).float(), y) for h in captured]
    total = ce + exit_weight * sum(w * e for w, e in zip(exit_weights(len(tm.layers)), exits))
    sample = torch.arange(len(draws), device=y.device).unsqueeze(1).expand_as(answer_rows)[answer_rows]
    per_answer = torch.zeros(len(draws), device=y.device).index_add_(0, sample, token_ce.detach())
    per_answer /= answer_rows.sum(dim=1)
    return ce.detach(), [e.detach() for e in exits], total, per_answer.tolist()


# ---- early-exit agreement ----------------------------------------------------------------------------

def acceptance_from_matches(matches: list[bool], draft_tokens: int) -> float:
    """The acceptance rate of `accepted_drafts`."""
    accepted, drafted = accepted_drafts(matches, draft_tokens)
    return accepted / max(1, drafted)


def accepted_drafts(matches: list[bool], draft_tokens: int) -> tuple[int, int]:
    """(accepted, drafted): the acceptance of self-speculative decoding (accepted drafts / drafts that could count) on
    one answer, given for each answer token after the first whether the draft layers' greedy token
    equals the full model's. At natural length drafts past the answer's end cannot count, so a verify
    near the end drafts only what is left (a two-token answer drafts one). Exact: the draft layers see
    the same prefix and KV as the full model's first layers, so teacher forcing on the full model's
    answer is what they see during decoding."""
    i, accepted, drafted = 0, 0, 0
    while i < len(matches):
        n = min(draft_tokens, len(matches) - i)
        m = 0
        while m < n and matches[i + m]:
            m += 1
        accepted += m
        drafted += n
        i += m + 1          # the accepted drafts, then the full model's own token
    return accepted, drafted


def draft_agreement(vlm, scene_set: list, *, workload=None, draft_tokens: int = 4, new_tokens: int = 32) -> dict:
    """For every early exit k: how often the first k layers' greedy token equals the full model's on
    the full model's own answers (the first answer token, from prefill, is not drafted), and the
    layer_skip acceptance rate that gives for `draft_tokens` (pooled over the answers)."""
    import torch

    from vlopt.models import get_workload

    workload = get_workload(workload or vlm.default_workload) if not hasattr(workload, "input_kind") else workload
    modality = workload.input_kind
    tm, head = vlm.text_model, vlm.lm_head
    n_layers = len(tm.layers)
    matches = {k: [] for k in range(1, n_layers)}
    counts = {k: [0, 0] for k in range(1, n_layers)}      # accepted, drafted
    with torch.no_grad():
        for scene in scene_set:
            item = scenes.question(scene, modality)
            inp = vlm.encode(vlm.preprocess(scenes.render(scene, modality), item.question, workload))
            tokens = vlm.stage4(inp, new_tokens=new_tokens, fixed=False).tokens
            ids = torch.tensor([tokens[:-1]], device=vlm.device, dtype=torch.long)
            embeds = torch.cat([inp.embeds, vlm.embed(ids).to(inp.embeds.dtype)], dim=1)
            captured = []
            hooks = [layer.register_forward_hook(
                lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
                for layer in tm.layers[:-1]]
            try:
                final = tm(inputs_embeds=embeds).last_hidden_state
            finally:
                for h in hooks:
                    h.remove()
            L = inp.context_tokens
            full = head(final[0, L - 1:]).argmax(-1)
            for k, h in enumerate(captured, start=1):
                draft = head(tm.norm(h[0, L - 1:])).argmax(-1)
                same = (draft == full).tolist()
                matches[k] += same[1:]
                accepted, drafted = accepted_drafts(same[1:], draft_tokens)
                counts[k][0] += accepted
                counts[k][1] += drafted
    return {k: {"agreement": sum(matches[k]) / max(1, len(matches[k])),
                "acceptance": counts[k][0] / max(1, counts[k][1])} for k in matches}


# ---- training ----------------------------------------------------------------------------------------

class KindCurriculum:
    """Question kinds drawn in proportion to their running answer loss (plus a floor), per modality.
    Drawn uniformly, the kinds the decoder has already learned keep most of each batch: EventGPT's
    direction stayed at 58 % after 1500 steps, yet 300 further steps of direction questions alone took
    it to 99 % on the same visual rows. The loss of a kind is a moving average of its answers' own
    cross-entropy (every kind starts at `START`)."""

    START, DECAY, FLOOR = 1.0, 0.98, 0.05

    def __init__(self, modalities):
        self.loss = {m: {k: self.START for k in scenes.kinds(m)} for m in modalities}

    def update(self, draws, per_answer) -> None:
        for d, ce in zip(draws, per_answer):
            old = self.loss[d.modality][d.kind]
            self.loss[d.modality][d.kind] = self.DECAY * old + (1 - self.DECAY) * ce

    def weights(self) -> dict:
        out = {}
        for m, by_kind in self.loss.items():
            w = [by_kind[k] + self.FLOOR for k in scenes.kinds(m)]
            out[m] = [x / sum(w) for x in w]
        return out


BUDGET_PROBE_STEPS = 50    # decoder steps timed before a time budget sets their count (inside the warm-up)
JOINT_DECODER_LR = 0.25    # phase 3's decoder learning rate, as a share of phase 2's: the decoder is already trained


def live_rows(vlm, pool: Pool, draws: list) -> list:
    """Each draw's visual rows, computed now by the (training) vision side, batched per modality."""
    import torch

    out = [None] * len(draws)
    for modality in {d.modality for d in draws}:
        which = [i for i, d in enumerate(draws) if d.modality == modality]
        idx = torch.as_tensor([draws[i].index for i in which], device=vlm.device)
        for i, r in zip(which, batch_features(vlm, modality, pool.pixels[modality][idx])):
            out[i] = r
    return out


def decoder_phase(vlm, name: str, rows_for, groups: list, *, steps: int, sampler, curriculum, batch_size: int,
                  exit_weight: float, weight_decay: float, time_budget: float | None, history: dict, log_every: int,
                  eval_every: int, evaluate, log, family: str) -> int:
    """Phases 2 and 3: `steps` of the decoder loss on the sampler's draws, each draw's visual rows from
    `rows_for(draws)`; `groups` is [(named parameters, learning rate)], one optimizer each. Appends to
    `history`; returns the steps trained (fewer when `time_budget` seconds do not fit them)."""
    import torch

    opts = [(adamw(params, group_lr, weight_decay), group_lr) for params, group_lr in groups]
    trained = [p for params, _ in groups for _, p in params]
    warmup = 100 if time_budget else min(100, max(1, steps // 10))
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        if time_budget and step == BUDGET_PROBE_STEPS:
            fits = int(time_budget / ((time.perf_counter() - t0) / step))
            if fits < steps:
                log(f"[{family}] {steps} {name} steps do not fit in {time_budget:.0f} s: training {fits}")
                steps = max(fits, step + 1)
        for opt, group_lr in opts:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, group_lr, warmup)
        draws = sampler.draw(batch_size)
        ce, exits, loss, per_answer = decoder_loss(vlm, draws, rows_for(draws), exit_weight=exit_weight)
        curriculum.update(draws, per_answer)
        sampler.kind_weights = curriculum.weights()
        for opt, _ in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        for opt, _ in opts:
            opt.step()
        history["loss"].append(float(loss.detach()))
        history["ce"].append(float(ce))
        history["exit_ce"].append([float(e) for e in exits])
        if (step + 1) % log_every == 0 or step + 1 == steps:
            window = history["ce"][-log_every:]
            log(f"[{family}] {name} step {step + 1}/{steps}  answer ce {sum(window) / len(window):.4f}  "
                f"exit ce {' '.join(f'{float(e):.2f}' for e in exits)}  "
                f"lr {lr_at(step, steps, groups[0][1], warmup):.2e}  {time.perf_counter() - t0:.0f} s")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            result = evaluate()
            history["evals"].append({"step": step + 1, **{m: r["accuracy"] for m, r in result.items()}})
            log(f"[{family}] step {step + 1} eval accuracy " + " ".join(f"{m} {r['accuracy']:.3f}" for m, r in result.items()))
        step += 1
    return steps


def adamw(params, lr: float, weight_decay: float):
    """AdamW with weight decay on matrices only (not norms, biases, embeddings)."""
    import torch

    named = list(params)
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), fused=False)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def vision_phase(vlm, pool: Pool, probe, rng, *, steps: int, batch_size: int, lr: float, weight_decay: float,
                 weights: dict, log, family: str) -> list[float]:
    """Phase 1: the vision side (towers, projector, adaptor) learns to describe the scene, read by the
    attribute probe (`attribute_probe`), in visual rows that differ from scene to scene; the decoder is
    not involved. Returns the losses. The probe standardises its input, so it cannot see the part of
    the RMS-normalised rows common to every scene of a batch; left alone that part grows to 99.8 %
    (measured after 1000 probe-only steps), and a decoder reading rows that are nearly one constant
    vector stays at the answer prior; its mean square is added to the loss."""
    import torch
    import torch.nn.functional as F

    params = [(n, p) for n, p in vlm.hf.named_parameters() if n.startswith(tuple(vlm.vision_modules))]
    params += [(f"probe.{n}", p) for n, p in probe.named_parameters()]
    opt = adamw(params, lr, weight_decay)
    modalities = list(weights)
    share = [weights[m] for m in modalities]
    losses = []
    warmup = min(100, max(1, steps // 10))
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        counts = rng.multinomial(batch_size, share)
        loss = torch.zeros((), device=vlm.device)
        for modality, n in zip(modalities, counts):
            if n:
                idx = torch.as_tensor(rng.integers(0, len(pool.scenes), int(n)), device=vlm.device)
                out = batch_features(vlm, modality, pool.pixels[modality][idx])
                rows = F.rms_norm(out, (out.shape[-1],), eps=vlm.text_model.config.rms_norm_eps)
                loss = loss + (attribute_loss(probe, modality, rows, frame_summaries(vlm, modality, out),
                                              pool.attributes[idx]) + rows.mean(dim=0).pow(2).mean()) * (n / batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"[{family}] vision step {step + 1}/{steps}  attributes {sum(losses[-100:]) / len(losses[-100:]):.4f}  "
                f"{time.perf_counter() - t0:.0f} s")
    return losses


ROW_RMS = 1.5    # the visual rows' RMS after phase 1: that of the jointly trained rows the decoder read best


def output_layer(vlm):
    """The vision side's last linear layer: scaling it scales every visual row (the pooling is linear)."""
    m = vlm.hf.model
    return m.feature_adaptor if vlm.name == "eventgpt" else m.multi_modal_projector.linear_2


def rescale_rows(vlm, rows: dict) -> float:
    """Scale the vision side's output layer (and `rows`, in place) so the visual rows have RMS `ROW_RMS`;
    returns the factor. Phase 1's losses read RMS-normalised rows, so they leave the rows' scale
    wherever it drifts, but the decoder's residual stream does not normalise: rows far smaller than
    that (phase 1 has left them at RMS ~0.0007) are drowned by the prompt text mixed in by the first layers, and the
    decoder learned 3× slower (CPU, EventGPT, 300 steps)."""
    import torch

    rms = torch.cat([r.flatten() for r in rows.values()]).pow(2).mean().sqrt()
    factor = float(ROW_RMS / rms)
    layer = output_layer(vlm)
    with torch.no_grad():
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)
        for r in rows.values():
            r.mul_(factor)
    return factor


def visual_rows(vlm, pool: Pool) -> dict:
    """Every pool scene's visual rows per modality [scenes, rows, hidden], from the (now fixed) vision side."""
    import torch

    with torch.no_grad():
        return {m: torch.cat([batch_features(vlm, m, px[i:i + 128]) for i in range(0, len(px), 128)])
                for m, px in pool.pixels.items()}


def evaluate_family(vlm, family: str, *, scenes_n: int, seed: int) -> dict:
    """Accuracy on `scenes_n` evaluation-split scenes of `seed`, for every modality of the family."""

    was_training = vlm.hf.training
    vlm.hf.eval()
    try:
        scene_set = scenes.scenes(seed, scenes_n, "eval")
        out = {}
        for modality in MODALITIES[family]:
            r = scenes.evaluate(vlm, scene_set, workload=WORKLOADS[modality])
            out[modality] = {"accuracy": r["accuracy"], "per_kind": r["per_kind"], "scenes": r["scenes"],
                             "examples": r["answers"][:3]}
        return out
    finally:
        vlm.hf.train(was_training)


def train(family: str, *, steps: int, vision_steps: int | None = None, seed: int = 0, device: str = "cpu",
          out: str | Path | None = None, batch_size: int = 32, lr: float = 2e-3, vision_lr: float = 1e-3,
          weight_decay: float = 0.01, pool_scenes: int = 4000, exit_weight: float = 0.5, log_every: int = 50,
          eval_scenes: int = 100, eval_every: int = 0, eval_seed: int = 0, vision: dict | None = None,
          modality_weights: dict | None = None, threads: int | None = None, workers: int = 1,
          time_budget: float | None = None, joint_steps: int = 0, joint_vision_lr: float = 2e-4,
          init: str | Path | None = None, log=print) -> dict:
    """Train a trained-tiny model of `family` in two phases; returns the loss history and evaluation
    (and saves the model to `out` when given). Deterministic on CPU for a given seed.

    1. `vision_steps` (default `steps`) of the vision side alone against the attribute probe, at `vision_lr`.
    2. `steps` of the decoder (cross-entropy on the answer and EOS, plus the early-exit loss) on the
       visual rows the fixed vision side gives each pool scene, computed once; question kinds are drawn
       by their running loss (`KindCurriculum`), so the logged answer CE is over that mix.
    3. `joint_steps` (default 0) of the same loss with the vision side trained too, at `joint_vision_lr`
       (the decoder at `JOINT_DECODER_LR` of `lr`), its rows computed live from the pool's pixels.

    Why two phases: trained jointly from scratch, the decoder learns the answer prior first and takes
    thousands of steps to start reading a vision side that is still moving (3500 GPU steps, shipped
    earlier: EventGPT 52 %); on fixed rows that already describe the scene (a linear probe reads every
    attribute of held-out scenes at 97–100 %) the same decoder reached 72 % in 800 CPU steps. Fixed rows
    also make a decoder step cheaper (no vision forward or backward). `time_budget` (seconds of phase
    2): after `BUDGET_PROBE_STEPS` steps their count is lowered, once, to what fits at the measured
    speed; the count trained is recorded, and `steps=<that count>` reruns the same schedule. Phase 3
    has the same budget of its own.

    `init`: a trained model's folder to start from instead of fresh weights (its rows keep their scale),
    e.g. to train a shipped model's decoder further with `vision_steps=0`."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    vision_steps = steps if vision_steps is None else vision_steps
    started = time.perf_counter()
    scene_set = scenes.scenes(seed, pool_scenes, "train")
    if init is None:
        vlm = build_model(family, seed=seed, device=device, vision=vision)
    else:
        vlm = trained_start(init, family, device)
    pool = build_pool(vlm, family, scene_set, workers=workers)
    log(f"[{family}] {sum(p.numel() for p in vlm.hf.parameters()) / 1e6:.2f} M params, pool of {pool_scenes} "
        f"scenes rendered in {time.perf_counter() - started:.1f} s")
    sampler = Sampler(vlm, family, pool, seed, weights=modality_weights)
    curriculum = KindCurriculum(sampler.modalities)
    weights = dict(zip(sampler.modalities, sampler.weights.tolist()))
    vlm.hf.train()
    t0 = time.perf_counter()
    probe = attribute_probe(vlm, family, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
    history = {"vision_attribute": vision_phase(vlm, pool, probe, rng, steps=vision_steps, batch_size=batch_size,
                                                lr=vision_lr, weight_decay=weight_decay, weights=weights, log=log,
                                                family=family),
               "ce": [], "exit_ce": [], "loss": [], "evals": []}
    vision_s = time.perf_counter() - t0
    vision_names = tuple(vlm.vision_modules)
    for name, p in vlm.hf.named_parameters():
        p.requires_grad_(not name.startswith(vision_names))
    rows = visual_rows(vlm, pool)
    if init is None:
        factor = rescale_rows(vlm, rows)
        log(f"[{family}] visual rows rescaled by {factor:.3g} to RMS {ROW_RMS}")
    else:
        factor = 1.0        # a trained decoder already reads these rows at their scale
    decoder = [(n, p) for n, p in vlm.hf.named_parameters() if p.requires_grad]
    t1 = time.perf_counter()
    phase = dict(sampler=sampler, curriculum=curriculum, batch_size=batch_size, exit_weight=exit_weight,
                 weight_decay=weight_decay, time_budget=time_budget, log_every=log_every, log=log, family=family)
    steps = decoder_phase(vlm, "decoder", lambda draws: [rows[d.modality][d.index] for d in draws],
                          [(decoder, lr)], steps=steps, history=history, eval_every=eval_every,
                          evaluate=lambda: evaluate_family(vlm, family, scenes_n=eval_scenes, seed=eval_seed), **phase)
    decoder_s = time.perf_counter() - t1
    if joint_steps:
        del rows
        for p in vlm.hf.parameters():
            p.requires_grad_(True)
        vision_params = [(n, p) for n, p in vlm.hf.named_parameters() if n.startswith(vision_names)]
        history["joint"] = {"ce": [], "exit_ce": [], "loss": [], "evals": []}
        groups = [(decoder, lr * JOINT_DECODER_LR), (vision_params, joint_vision_lr)]
        joint_steps = decoder_phase(vlm, "joint", lambda draws: live_rows(vlm, pool, draws), groups,
                                    steps=joint_steps, history=history["joint"], eval_every=0, evaluate=None, **phase)
    for p in vlm.hf.parameters():
        p.requires_grad_(True)
    vlm.hf.eval()
    result = {"family": family, "steps": steps, "vision_steps": vision_steps, "joint_steps": joint_steps,
              "seed": seed, "device": device, "batch_size": batch_size, "lr": lr, "vision_lr": vision_lr,
              "joint_vision_lr": joint_vision_lr, "pool_scenes": pool_scenes, "exit_weight": exit_weight,
              "vision": vision or {}, "modality_weights": weights, "time_budget": time_budget, "row_scale": factor,
              "init": str(init) if init is not None else None, "kind_loss": curriculum.loss,
              "vision_seconds": vision_s, "decoder_seconds": decoder_s,
              "joint_seconds": time.perf_counter() - t1 - decoder_s, "train_seconds": time.perf_counter() - t0,
              **history}
    if eval_scenes:
        result["eval"] = evaluate_family(vlm, family, scenes_n=eval_scenes, seed=eval_seed)
        result["eval_seed"] = eval_seed
        log(f"[{family}] final eval on {eval_scenes} scenes (eval seed {eval_seed}): " + "  ".join(
            f"{m} {r['accuracy']:.3f} ({', '.join(f'{k} {v:.2f}' for k, v in r['per_kind'].items())})"
            for m, r in result["eval"].items()))
    if out is not None:
        save_model(vlm, out)
        (Path(out) / "vlopt_training.json").write_text(json.dumps(result, indent=1))
        log(f"[{family}] saved to {out}")
    result["model"] = vlm
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m vlopt.train ...` is `vlopt train ...`."""
    from vlopt.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

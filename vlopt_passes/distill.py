"""`distill`: replace the model with a smaller student trained from it on the synthetic scene task
(`vlopt.scenes`, through `vlopt.train`'s pool, sampler and batched stage 3).

The student keeps the teacher's stages 1–3 (vision tower, projector/adaptor, token embeddings: copied
and frozen), so it decodes from the teacher's own stage-4 input — and drafts from it, as a
`speculative` draft for its teacher. Its decoder is smaller: `layers` of the teacher's layers
(evenly spaced, last one included) and, with `intermediate`, MLPs narrowed to the teacher's
neurons with the largest weights. The student starts from those teacher weights and trains for
`steps` steps on teacher logits (KL at `temperature`) plus the answers' cross-entropy.

Weights: the student replaces `vlm.hf`, so `save_pretrained` writes its config (fewer layers,
narrower MLP) and `vlopt.load` builds the student from it. Only the vlopt families that
`vlopt.train` knows (eventgpt, videollava) can be distilled.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

from pydantic import Field

from vlopt.errors import VloptError
from vlopt.hookspecs import hookimpl
from vlopt.passes import WEIGHTS, PassConfig, PassOutcome


class Config(PassConfig):
    type: Literal["distill"] = "distill"
    layers: int | None = Field(None, ge=1)          # student decoder layers (default: half the teacher's)
    intermediate: int | None = Field(None, ge=1)    # student MLP width (default: the teacher's)
    steps: int = Field(300, ge=0, le=100_000)
    batch_size: int = Field(16, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    pool_scenes: int = Field(256, ge=1, le=100_000)   # training scenes rendered once
    temperature: float = Field(2.0, gt=0.0, le=20.0)
    kd_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    seed: int = 0
    eval_scenes: int = Field(0, ge=0, le=10_000)     # >0: teacher and student accuracy in the row's info
    persistence: ClassVar[str] = WEIGHTS
    lossless: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    why_nondeterministic: ClassVar[str] = ("training on CUDA is not bitwise reproducible; on the CPU the same seed "
                                           "and budget give the same student")
    once: ClassVar[bool] = True


def _text_config(config):
    return getattr(config, "text_config", None) or config


def student_config(vlm, layers: int, intermediate: int):
    """The teacher's config with a smaller decoder."""
    cfg = copy.deepcopy(vlm.hf.config)
    text = _text_config(cfg)
    text.num_hidden_layers = layers
    text.intermediate_size = intermediate
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]
    return cfg


def kept_layers(teacher_layers: int, layers: int) -> list[int]:
    """Evenly spaced teacher layers, the first and the last included."""
    if layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (layers - 1)) for i in range(layers)]


def build_student(vlm, layers: int, intermediate: int):
    """A student `VLModel` (float32, on the teacher's device) initialised from the teacher's weights."""
    import torch

    prefix = f"{vlm.decoder_prefix}.layers."
    keep = kept_layers(len(vlm.text_model.layers), layers)
    teacher = vlm.hf.state_dict()
    neurons = {}
    for j, i in enumerate(keep):
        mlp = vlm.text_model.layers[i].mlp
        weight = (mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)
                  * mlp.down_proj.weight.float().norm(dim=0))
        neurons[j] = weight.topk(intermediate).indices.sort().values
    state = {}
    for key, value in teacher.items():
        if not key.startswith(prefix):
            state[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) not in keep:
            continue
        j = keep.index(int(index))
        if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            value = value[neurons[j].to(value.device)]
        elif rest.startswith("mlp.down_proj."):
            value = value[:, neurons[j].to(value.device)]
        state[f"{prefix}{j}.{rest}"] = value
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(vlm.device):
            hf = type(vlm.hf)(student_config(vlm, layers, intermediate))
    finally:
        torch.set_default_dtype(previous)
    hf.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return type(vlm)(hf, vlm.tokenizer, source=dict(vlm.source))


def _frozen_outside_decoder(student) -> list:
    """Freeze stages 1–3 (shared with the teacher); return the decoder's parameters."""
    p = student.decoder_prefix
    trainable = []
    for name, param in student.hf.named_parameters():
        keep = name.startswith((f"{p}.layers.", f"{p}.norm.", "lm_head."))
        param.requires_grad_(keep)
        if keep:
            trainable.append(param)
    return trainable


def _batch(vlm, pool, draws):
    """Input embeddings, mask and answer targets of a batch (the teacher's stages 1–3)."""
    import torch

    from vlopt import train

    feats = [None] * len(draws)
    for modality in pool.pixels:
        members = [b for b, d in enumerate(draws) if d[1] == modality]
        if members:
            idx = torch.tensor([draws[b][0] for b in members], device=vlm.device)
            out = train.batch_features(vlm, modality, pool.pixels[modality][idx])
            for row, b in enumerate(members):
                feats[b] = out[row]
    sequences, labels = [], []
    for d, f in zip(draws, feats):
        prompt = train.expanded_prompt(vlm, d.prompt, f.shape[0])
        sequences.append(prompt + d.answer[:-1])
        labels.append([-100] * (len(prompt) - 1) + d.answer)
    embeds, mask = train.splice_batch(vlm, sequences, feats)
    target = torch.full(mask.shape, -100, dtype=torch.long)
    for b, lab in enumerate(labels):
        target[b, :len(lab)] = torch.tensor(lab)
    return embeds, mask, target.to(vlm.device)


def distill_loss(teacher, student, embeds, mask, target, *, temperature: float, kd_weight: float,
                 ce_weight: float):
    """(total, KL, CE) on the answer positions: teacher logits at `temperature` and the answers."""
    import torch
    import torch.nn.functional as F

    rows = target != -100
    with torch.no_grad():
        t_logits = teacher.lm_head(teacher.text_model(inputs_embeds=embeds, attention_mask=mask)
                                   .last_hidden_state[rows]).float()
    s_logits = student.lm_head(student.text_model(inputs_embeds=embeds.float(), attention_mask=mask)
                               .last_hidden_state[rows]).float()
    kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s_logits, target[rows])
    return kd_weight * kl + ce_weight * ce, kl.detach(), ce.detach()


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    import time

    import torch

    from vlopt import scenes, train

    if vlm.name not in train.FAMILIES:
        raise VloptError(f"distill trains on vlopt's scene task, which has {'/'.join(train.FAMILIES)} models, "
                         f"not {vlm.name}")
    tm_cfg = vlm.text_model.config
    teacher_layers, width = len(vlm.text_model.layers), tm_cfg.intermediate_size
    layers = cfg.layers or max(1, teacher_layers // 2)
    intermediate = cfg.intermediate or width
    if layers > teacher_layers or intermediate > width:
        raise VloptError(f"distill: the student must be no larger than the teacher ({teacher_layers} layers, "
                         f"intermediate {width}), got layers {layers}, intermediate {intermediate}")
    started = time.perf_counter()
    was_training = vlm.hf.training
    vlm.hf.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        student = build_student(vlm, layers, intermediate)
        params = _frozen_outside_decoder(student)
        pool = train.build_pool(vlm, vlm.name, scenes.scenes(cfg.seed, cfg.pool_scenes, "train"))
        sampler = train.Sampler(vlm, vlm.name, pool, cfg.seed)
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
        warmup = min(100, max(1, cfg.steps // 10))
        history = []
        student.hf.train()
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = train.lr_at(step, cfg.steps, cfg.lr, warmup)
            with torch.no_grad():
                embeds, mask, target = _batch(vlm, pool, sampler.draw(cfg.batch_size))
            loss, kl, ce = distill_loss(vlm, student, embeds, mask, target, temperature=cfg.temperature,
                                        kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append((float(kl), float(ce)))
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                ctx.log(f"distill step {step + 1}/{cfg.steps}: kl {float(kl):.4f} ce {float(ce):.4f}")
    student.hf.eval().requires_grad_(False)
    student.hf.to(vlm.dtype)
    vlm.hf.train(was_training)
    info = {"teacher_params": sum(p.numel() for p in vlm.hf.parameters()),
            "student_params": sum(p.numel() for p in student.hf.parameters()),
            "teacher_layers": teacher_layers, "student_layers": layers, "kept_layers": kept_layers(teacher_layers, layers),
            "teacher_intermediate": width, "student_intermediate": intermediate, "steps": cfg.steps,
            "final_kl": history[-1][0] if history else None, "final_ce": history[-1][1] if history else None,
            "train_s": time.perf_counter() - started}
    if cfg.eval_scenes:
        eval_set = scenes.scenes(cfg.seed, cfg.eval_scenes, "eval")
        info["teacher_accuracy"] = scenes.evaluate(vlm, eval_set)["accuracy"]
        info["student_accuracy"] = scenes.evaluate(student, eval_set)["accuracy"]
    vlm.hf = student.hf                      # the student is the model now: save_pretrained writes its config
    p = vlm.decoder_prefix
    return PassOutcome(touched=[f"{p}.layers", f"{p}.norm", "lm_head"], skipped=list(vlm.vision_modules),
                       notes=[f"student: {layers}/{teacher_layers} layers (teacher layers {info['kept_layers']}), "
                              f"intermediate {intermediate}/{width}, {info['student_params'] / 1e6:.2f} M of "
                              f"{info['teacher_params'] / 1e6:.2f} M params, {cfg.steps} steps"
                              + (f", accuracy {info['student_accuracy']:.2f} vs the teacher's "
                                 f"{info['teacher_accuracy']:.2f}" if cfg.eval_scenes else "")],
                       info=info)


@hookimpl
def register_passes(register):
    register(Config, apply)

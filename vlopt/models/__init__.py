"""Model families, their workloads, presets and loading.

A family is declared as data (`ModelFamily`) and registered through the `register_models` hook, by
vlopt's own families (`vlopt/models/families/`) exactly as by a plugin's. The declaration names the
module that builds and loads the model; that module (torch, transformers) is imported only when a
model is built, so listing what is registered stays light."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from vlopt.errors import VloptError

__all__ = ["ModelFamily", "Workload", "get_workload", "PRESETS", "load_model", "describe", "resolve_device",
           "resolve_dtype"]

# tiny: the trained tiny model where one ships (vlopt/weights/), else seeded random weights;
# tiny-random: seeded random weights of the same small kind (shape-only tests); 7b: exact full-size
# shapes, random weights (speed only).
PRESETS = ("tiny", "tiny-random", "7b")


@dataclass(frozen=True)
class Workload:
    """One benchmark shape: which model, what input, how many frames and new tokens."""

    name: str
    model: str               # the family that declares it
    input_kind: str          # "events" | "video" | "image"
    frames: int
    new_tokens: int
    questions: int = 1       # >1: several questions about one clip (prefix-reuse workloads)


@dataclass(frozen=True)
class ModelFamily:
    """A model family: its recipe name, the module that builds it, the checkpoints it recognises and
    its benchmark workloads.

    `module` defines `build(preset, *, dtype, device, meta=False) -> VLModel` and
    `load_checkpoint(path, config_dict, *, dtype, device) -> VLModel`. A checkpoint folder is this
    family's when its `config.json` has a `model_type` in `model_types`."""

    name: str
    module: str
    model_types: tuple[str, ...] = ()
    workloads: tuple[Workload, ...] = ()
    presets: tuple[str, ...] = PRESETS

    def build(self, preset: str, **kwargs):
        return importlib.import_module(self.module).build(preset, **kwargs)

    def load(self, path, config: dict, **kwargs):
        return importlib.import_module(self.module).load_checkpoint(path, config, **kwargs)

    def recognizes(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types


def _registry():
    from vlopt.plugins import get_registry
    return get_registry()


def get_workload(name: str, *, model: str | None = None) -> Workload:
    """A registered workload; with `model`, also check that it is that model's."""
    workloads = _registry().workloads
    if name not in workloads:
        raise VloptError(f"unknown workload '{name}'; choose one of {sorted(workloads)}")
    workload = workloads[name]
    if model is not None and workload.model != model:
        raise VloptError(f"workload '{name}' is for {workload.model}, not {model}")
    return workload


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise VloptError(f"device must be cpu, cuda or auto, not '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise VloptError("device cuda was asked for, but this machine has no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu")
    return device


def resolve_dtype(name: str, device: str):
    """A torch dtype; "saved" gives None: keep each tensor's dtype as stored in the checkpoint."""
    import torch

    if name == "saved":
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in table:
        raise VloptError(f"dtype must be one of {['auto', *table]}, not '{name}'")
    return table[name]


def load_model(name: str | None = None, *, preset: str = "tiny", path: str | None = None,
               dtype: str = "auto", device: str = "auto", allow_pickle: bool = False):
    """Build a preset (`name` + `preset`) or load a local checkpoint folder (`path`)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    families = _registry().models
    if path is not None:
        folder = Path(path)
        cfg_file = folder / "config.json"
        if not folder.is_dir() or not cfg_file.is_file():
            raise VloptError(f"{path} is not a checkpoint folder (no config.json); give a folder written by "
                             "save_pretrained, the original EventGPT release or a Video-LLaVA-hf folder")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise VloptError(f"{cfg_file} is not valid JSON: {err}") from None
        matches = [f for f in families.values() if f.recognizes(config)]
        if not matches:
            known = "; ".join(f"{f.name}: {'/'.join(f.model_types)}" for f in families.values() if f.model_types)
            raise VloptError(f"{path}: model_type {config.get('model_type')!r} is none of the known layouts "
                             f"({', '.join(families)}); expected one of the model_types {known}")
        vlm = matches[0].load(folder, config, dtype=torch_dtype, device=device)
    else:
        if name not in families:
            raise VloptError(f"unknown model '{name}'; choose one of {sorted(families)} or give a checkpoint path")
        family = families[name]
        if preset not in family.presets:
            raise VloptError(f"unknown preset '{preset}' for {name}; choose one of {list(family.presets)}")
        if torch_dtype is None:
            raise VloptError("dtype 'saved' applies to checkpoints only; give a dtype for a preset")
        vlm = family.build(preset, dtype=torch_dtype, device=device)
    vlm.source["allow_pickle"] = allow_pickle
    _mark_weights(vlm, Path(path) if path is not None else None)
    return vlm


TRAINING_RECORD = "vlopt_training.json"   # what `python -m vlopt.train --out DIR` writes beside the weights


def _mark_weights(vlm, folder: Path | None) -> None:
    """Say where the weights come from (`VLModel.weights_trained`), in `vlm.source["weights"]` and in
    the config, so that checkpoints written from this model keep it. A mark already there (the
    builder's, or one saved in the config) wins; else a preset is its seeded random init and a
    folder with vlopt.train's record is trained; other folders stay unmarked (unknown)."""
    from vlopt.models.base import WEIGHTS_MARK

    mark = vlm.source.get("weights") or getattr(vlm.hf.config, WEIGHTS_MARK, None)
    if mark is None and folder is None:
        mark = "random"
    elif mark is None and (folder / TRAINING_RECORD).is_file():
        mark = "trained"
    if mark is not None:
        vlm.source["weights"] = mark
        setattr(vlm.hf.config, WEIGHTS_MARK, mark)


def describe(name: str, preset: str) -> dict:
    """Parameter count, visual rows and context length of the default workload, on the meta device."""
    family = _registry().models.get(name)
    if family is None:
        raise VloptError(f"unknown model '{name}'; choose one of {sorted(_registry().models)}")
    import torch

    vlm = family.build(preset, dtype=torch.bfloat16, device="cpu", meta=True)
    workload = get_workload(vlm.default_workload)
    return {"model": name, "preset": preset, "params": sum(p.numel() for p in vlm.hf.parameters()),
            "visual_tokens": vlm.visual_rows_for(workload), "context_tokens": vlm.context_tokens_for(workload),
            "workload": workload.name}

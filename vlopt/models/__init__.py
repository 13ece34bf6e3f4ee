"""Model families, presets and loading. Families register through the `register_models` hook; the
two built-in ones are registered the same way (see `vlopt.plugins`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlopt.errors import VloptError
from vlopt.models.base import WORKLOADS, Stage4Input, VLModel, Workload, get_workload

__all__ = ["ModelFamily", "Stage4Input", "VLModel", "Workload", "WORKLOADS", "get_workload",
           "PRESETS", "load_model", "describe", "resolve_device", "resolve_dtype", "BUILTIN_FAMILIES"]

PRESETS = ("tiny", "7b")


@dataclass(frozen=True)
class ModelFamily:
    """How to build a model from a preset, and how to recognise and load a checkpoint folder."""

    name: str
    build: Callable[..., VLModel]               # build(preset, *, dtype, device, meta=False)
    load: Callable[..., VLModel]                # load(path, config_dict, *, dtype, device)
    recognizes: Callable[[dict], bool]          # recognizes(config_dict) -> bool
    presets: tuple[str, ...] = PRESETS


def _eventgpt_build(*a, **k):
    from vlopt.models import eventgpt
    return eventgpt.build(*a, **k)


def _eventgpt_load(*a, **k):
    from vlopt.models import eventgpt
    return eventgpt.load_checkpoint(*a, **k)


def _videollava_build(*a, **k):
    from vlopt.models import videollava
    return videollava.build(*a, **k)


def _videollava_load(*a, **k):
    from vlopt.models import videollava
    return videollava.load_checkpoint(*a, **k)


BUILTIN_FAMILIES = [
    ModelFamily("eventgpt", _eventgpt_build, _eventgpt_load,
                lambda c: c.get("model_type") in ("EventChat_llama", "eventgpt")),
    ModelFamily("videollava", _videollava_build, _videollava_load,
                lambda c: c.get("model_type") == "video_llava"),
]


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


def _families() -> dict[str, ModelFamily]:
    from vlopt.plugins import get_registry
    return get_registry().models


def load_model(name: str | None = None, *, preset: str = "tiny", path: str | None = None,
               dtype: str = "auto", device: str = "auto", allow_pickle: bool = False) -> VLModel:
    """Build a preset (`name` + `preset`) or load a local checkpoint folder (`path`)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    families = _families()
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
            raise VloptError(f"{path}: model_type {config.get('model_type')!r} is neither of the known layouts "
                             f"({', '.join(families)}); expected EventChat_llama/eventgpt or video_llava")
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
    return vlm


def describe(name: str, preset: str) -> dict:
    """Parameter count, visual rows and context length of the default workload, on the meta device."""
    family = _families().get(name)
    if family is None:
        raise VloptError(f"unknown model '{name}'; choose one of {sorted(_families())}")
    import torch

    vlm = family.build(preset, dtype=torch.bfloat16, device="cpu", meta=True)
    workload = get_workload(vlm.default_workload)
    return {"model": name, "preset": preset, "params": sum(p.numel() for p in vlm.hf.parameters()),
            "visual_tokens": vlm.visual_rows_for(workload), "context_tokens": vlm.context_tokens_for(workload),
            "workload": workload.name}

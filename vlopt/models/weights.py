"""Reading weights from a local folder: safetensors (single file or sharded); a legacy
`pytorch_model.bin` only through `torch.load(weights_only=True)`, which refuses code."""

from __future__ import annotations

import json
from pathlib import Path

from vlopt.errors import VloptError


def read_state_dict(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError and friends: the file wants to run code
            raise VloptError(f"{folder}/pytorch_model.bin is not a plain tensor file ({err}); "
                             "convert it to safetensors") from None
    else:
        raise VloptError(f"{folder} holds no weights (model.safetensors, a sharded index, or pytorch_model.bin)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors raises SafetensorError / OSError on damage
            raise VloptError(f"{f} is not a valid safetensors file: {err}") from None
    return state


def saved_dtypes(folder: Path) -> dict:
    """The dtype of every floating tensor as stored in the folder's safetensors files (header only)."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name.startswith("._"):           # a macOS resource fork beside the real file, not weights
            continue
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                dt = names.get(fh.get_slice(key).get_dtype())
                if dt is not None:
                    out[key] = dt
    return out


def from_pretrained_strict(cls, folder: Path, **kwargs):
    """`cls.from_pretrained`, refusing a folder whose weights leave modules uninitialised or hold
    tensors the model has no place for (transformers only warns and fills missing ones randomly)."""
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise VloptError(f"{folder}: the weights do not match {cls.__name__}: "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    return model


def from_pretrained_keeping_dtypes(cls, folder: Path, *, dtype, **kwargs):
    """`from_pretrained_strict`, but with `dtype=None` every tensor keeps the dtype it was saved in
    (a bf16 decoder next to a float32 vision tower stays that way). transformers' "auto" casts the
    whole model to one dtype, so a mixed folder is loaded in float32 and narrowed tensor by tensor."""
    import torch

    if dtype is not None:
        return from_pretrained_strict(cls, folder, dtype=dtype, **kwargs)
    stored = saved_dtypes(folder)
    kinds = set(stored.values())
    if len(kinds) <= 1:
        return from_pretrained_strict(cls, folder, dtype=next(iter(kinds), "auto"), **kwargs)
    model = from_pretrained_strict(cls, folder, dtype=torch.float32, **kwargs)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        want = stored.get(name)
        if want is not None and tensor.is_floating_point() and tensor.dtype != want and type(tensor.data) is torch.Tensor:
            tensor.data = tensor.data.to(want)
    return model

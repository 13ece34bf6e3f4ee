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

"""The trained tiny models that ship inside the package: the `tiny` preset of a family that has one.

Each lives in `vlopt/weights/<family>-tiny/` as a checkpoint folder `vlopt.train` wrote
(`save_pretrained` weights, the shared task tokenizer, `vlopt_training.json` with the command, commit
and evaluation) plus `SHA256SUMS` (`sha256sum` format, so `sha256sum -c` checks it too). Every file
is hash-checked before it is loaded, like any checkpoint vlopt reads.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from vlopt.errors import VloptError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SUMS = "SHA256SUMS"
TRAINED_PRESET = "tiny"
RANDOM_PRESET = "tiny-random"


def folder(family: str) -> Path:
    return WEIGHTS_DIR / f"{family}-{TRAINED_PRESET}"


def available(family: str) -> bool:
    return (folder(family) / SUMS).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sums(path: Path) -> None:
    """Hash every file of a trained-model folder into its SHA256SUMS (run after training)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != SUMS)
    (path / SUMS).write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))


def verify(path: Path) -> None:
    sums = path / SUMS
    if not sums.is_file():
        raise VloptError(f"{path} has no {SUMS}; reinstall vlopt, or retrain with `vlopt train` and "
                         "`python -m vlopt.models.shipped DIR`")
    for line in sums.read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        file = path / name
        if not file.is_file():
            raise VloptError(f"the shipped model file {file} is missing; reinstall vlopt")
        if _sha256(file) != expected:
            raise VloptError(f"the shipped model file {file} does not match its sha256 in {sums}; "
                             "reinstall vlopt (or restore the file with git)")


def load(family: str, *, dtype, device: str, meta: bool = False):
    """The trained tiny model of `family`. `meta` (shapes only) loads it on the CPU: it is small."""
    path = folder(family)
    verify(path)
    config = json.loads((path / "config.json").read_text())
    module = importlib.import_module(f"vlopt.models.{family}")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()     # a package's own small model: no "Loading weights" bar
    try:
        vlm = module.load_checkpoint(path, config, dtype=dtype, device="cpu" if meta else device)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    vlm.source = {**vlm.source, "preset": TRAINED_PRESET, "weights": "trained"}
    return vlm


def training_record(family: str) -> dict:
    return json.loads((folder(family) / "vlopt_training.json").read_text())


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        write_sums(Path(arg))
        print(f"wrote {Path(arg) / SUMS}")

"""Machine facts recorded in every benchmark and report: where and with what a number was measured."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the vlopt source tree, with `+dirty` when it has uncommitted changes.
    VLOPT_COMMIT wins when set: a copied tree (the lent GPU's) can carry a stale `.git`."""
    if os.environ.get("VLOPT_COMMIT"):
        return os.environ["VLOPT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VLOPT_COMMIT")
    if not sha or sha == "HEAD":
        return os.environ.get("VLOPT_COMMIT")
    return sha + ("+dirty" if dirty else "")


def machine_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": _version("transformers"), "torchao": _version("torchao"),
        "bitsandbytes": _version("bitsandbytes"), "flash_attn": _version("flash-attn"),
        "vlopt": _version("vlopt"), "commit": git_commit(),
        "cuda": torch.version.cuda, "gpu": None, "gpu_count": 0, "driver": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return info

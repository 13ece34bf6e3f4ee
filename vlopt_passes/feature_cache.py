"""`feature_cache`: run stages 1–3 once per clip.

`scope: request` — visual features kept in memory, keyed by the input's content: a repeated clip
(another question about it) skips loading, preprocessing and the vision encoder; only the prompt
is tokenized and spliced.
`scope: disk` — the same, stored as safetensors under `cache_dir`, keyed by a hash of the input
content and the model's vision fingerprint (vision weights, config, dtype); at most `max_mb`, oldest
entries evicted; a corrupt or mismatched entry is ignored and rebuilt, never used.
`scope: prefix` — request caching plus KV-prefix reuse in the fast_decode engine: for several
questions about one clip, the shared prompt prefix (system text + visual rows) is prefilled once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from vlopt.hookspecs import hookimpl
from vlopt.passes import PassConfig, PassOutcome
from vlopt.stage4 import PREFIX_REUSE


class Config(PassConfig):
    type: Literal["feature_cache"] = "feature_cache"
    scope: Literal["request", "disk", "prefix"] = "request"
    cache_dir: str = "~/.cache/vlopt/features"
    max_mb: float = Field(2048.0, gt=0)
    max_entries: int = Field(64, ge=1)          # in-memory scopes
    lossless: ClassVar[bool] = True
    once: ClassVar[bool] = True


def input_digest(path: str | None, workload) -> str:
    h = hashlib.sha256(f"{workload.input_kind}:{workload.frames}".encode())
    if path is None:
        h.update(b"synthetic-demo")
    else:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:32]


def vision_fingerprint(vlm) -> str:
    """Hash of everything the visual features depend on: vision-side weights, config, dtypes."""
    h = hashlib.sha256(vlm.hf.config.to_json_string().encode())
    for prefix in vlm.vision_modules:
        for name, t in vlm.hf.get_submodule(prefix).state_dict().items():
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu").contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class FeatureCache:
    """The model's `feature_store`: visual rows keyed by the input's content and the feature filters
    that produced them, kept in memory or on disk."""

    def __init__(self, cfg: Config, fingerprint: str):
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.memory: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = self.rejected = 0
        self.dir = Path(os.path.expanduser(cfg.cache_dir)) if cfg.scope == "disk" else None

    def key(self, vlm, raw_path, workload) -> str:
        return hashlib.sha256(f"{input_digest(raw_path, workload)}|{vlm.feature_tag}".encode()).hexdigest()[:32]

    def get(self, key: str):
        feats = self._load(key)
        if feats is None:
            self.misses += 1
        else:
            self.hits += 1
        return feats

    def _load(self, key: str):
        import torch
        from safetensors import safe_open

        if self.dir is None:
            return self.memory.get(key)
        f = self.dir / f"{key}.safetensors"
        if not f.is_file():
            return None
        try:
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata() or {}
                feats = fh.get_tensor("features")
            ok = meta.get("fingerprint") == self.fingerprint and meta.get("key") == key and feats.ndim == 2 \
                and bool(torch.isfinite(feats).all())
        except Exception:   # truncated, not safetensors, wrong tensor: never used, rebuilt
            ok = False
        if not ok:
            self.rejected += 1
            return None
        os.utime(f)
        return feats

    def put(self, key: str, feats) -> None:
        from safetensors.torch import save_file

        if self.dir is None:
            self.memory[key] = feats
            while len(self.memory) > self.cfg.max_entries:
                self.memory.popitem(last=False)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        save_file({"features": feats.detach().to("cpu").contiguous()}, str(tmp),
                  metadata={"fingerprint": self.fingerprint, "key": key})
        tmp.replace(self.dir / f"{key}.safetensors")
        entries = sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.cfg.max_mb * 2**20:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


def apply(vlm, cfg: Config, ctx) -> PassOutcome:
    notes = []
    if cfg.scope == "prefix":
        vlm.decoding.require(PREFIX_REUSE, "feature_cache scope 'prefix' reuses KV in the fast_decode engine; "
                                           "put `{type: fast_decode}` before it")
        vlm.decoding.reuse_prefix = True
        notes.append("the shared prompt prefix (system text + visual rows) is prefilled once per clip")
    start = time.perf_counter()
    store = vlm.feature_store = FeatureCache(cfg, vision_fingerprint(vlm))
    notes.append(f"stages 1–3 run once per clip ({cfg.scope}); vision fingerprint "
                 f"{store.fingerprint[:12]} took {time.perf_counter() - start:.2f} s")
    return PassOutcome(touched=list(vlm.vision_modules), notes=notes,
                       info={"cache_dir": str(store.dir) if store.dir else None})


@hookimpl
def register_passes(register):
    register(Config, apply)

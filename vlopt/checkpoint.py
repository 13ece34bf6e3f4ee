"""Optimized checkpoints, I/O only: written whole or not at all, verified by a sha256 manifest written
last. (Which passes are replayed on load is the manager's: `vlopt.manager.load_optimized`.)

Layout: what `save_pretrained` writes (safetensors only) and the tokenizer; `vlopt_recipe.yaml` (the
resolved recipe, with plugin versions and which passes to re-apply on load); the three report
files; `vlopt_manifest.json` (sha256 of every other file). Everything is written into a temporary
sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from vlopt.errors import VloptError

MANIFEST = "vlopt_manifest.json"
RECIPE = "vlopt_recipe.yaml"
# Files that file browsers and notebooks drop into any folder they open. They are no part of a
# checkpoint: verify and load ignore them (and `vlopt verify` says so) instead of refusing it.
JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
JUNK_DIRS = {".ipynb_checkpoints", "__MACOSX"}


def is_junk(relative: Path) -> bool:
    """A well-known junk file (Finder's .DS_Store and ._* resource forks, Explorer's Thumbs.db,
    Jupyter's .ipynb_checkpoints), given relative to the checkpoint folder."""
    return (relative.name in JUNK_NAMES or relative.name.startswith("._")
            or any(part in JUNK_DIRS for part in relative.parts[:-1]))


def check_output(out: Path, *, force: bool) -> None:
    """Refuse, before any work, an output that exists as a file, is not empty (without --force), or
    cannot be created: a file on the way to it, or a directory there that this process cannot write."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise VloptError(f"output {out} exists and is a file; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise VloptError(f"output {out} exists and is not empty; pass --force to replace it, or choose "
                         "another output path")
    check_creatable(out)


def check_creatable(path: Path, what: str = "output") -> None:
    """Refuse a path that cannot be created: a file on the way to it, or its nearest existing folder
    not writable by this process."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VloptError(f"{what} {path} cannot be created: {ancestor} is a file, not a directory; choose "
                         "another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise VloptError(f"{what} {path} cannot be created: {ancestor} is not writable; choose another "
                         "path or make it writable")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys. The format is an 8-byte little-endian header
    length, a JSON header (tensor dtypes, shapes, data offsets relative to the data section, and
    `__metadata__`), then the data. safetensors writes `__metadata__` from a hash map, so its order
    — and the file's bytes — change from run to run; sorting makes equal weights give equal files.
    Offsets are relative to the data section, so only the header is rewritten."""
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        data = fh.read()
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)          # keep the data section 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        fh.write(data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _separate_views(state: dict) -> dict | None:
    """Weights that are different views of one buffer (fast_decode's fused projections) as separate
    CPU copies: safetensors refuses tensors that share memory unless they are one tied tensor.
    None when there are none (save_pretrained then reads the model itself)."""
    import torch

    by_storage: dict = {}
    for name, t in state.items():
        if type(t) is torch.Tensor:
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    shared = [names for names in by_storage.values()
              if len({(state[n].data_ptr(), tuple(state[n].shape)) for n in names}) > 1]
    if not shared:
        return None
    state = dict(state)
    for names in shared:
        for n in names:
            state[n] = state[n].detach().to("cpu", copy=True)
    return state


def _sweep_leftovers(out: Path) -> None:
    """Remove the `.NAME.vlopt-tmp-PID` / `.NAME.vlopt-old-PID` siblings that a killed vlopt run left
    for this output (its process is gone). A live process's are left alone; nothing else is touched."""
    for leftover in out.parent.glob(f".{out.name}.vlopt-*-*"):
        kind, _, pid = leftover.name[len(out.name) + 2:].rpartition("-")   # ".NAME." prefix
        if kind in ("vlopt-tmp", "vlopt-old") and pid.isdigit() and leftover.is_dir() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def _save_pretrained(hf, folder: Path, **kwargs) -> None:
    """`save_pretrained` without the load-time conversions transformers cannot invert. A model loaded
    from a torchao checkpoint (an int8 output) carries a deserializing converter with no reverse,
    and saving it raised NotImplementedError; the module names are already the saved ones, so those
    converters are set aside while saving, as for a model built in memory."""
    conversions = getattr(hf, "_weight_conversions", None)
    if conversions:
        hf._weight_conversions = [c for c in conversions if _reversible(c)] or None
    try:
        hf.save_pretrained(str(folder), **kwargs)
    finally:
        if conversions:
            hf._weight_conversions = conversions


def _reversible(conversion) -> bool:
    try:
        conversion.reverse_transform()
    except (NotImplementedError, ValueError):
        return False
    return True


def _same_modes(folder: Path) -> None:
    """Every file readable as the umask allows (safetensors wrote weights 0600, the rest 0644)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def _sigint_held():
    """Hold Ctrl-C across the two renames that swap an output in, so that an interrupt cannot fall
    between them and leave no output at all: SIGINT is blocked for this thread (pthread_sigmask), and,
    since any other thread (torch's) may still take the signal, the Python handler meanwhile only
    notes it. The held Ctrl-C is raised again right after, to the handler that was in place."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)     # one pending at the OS level arrives now: held
        signal.signal(signal.SIGINT, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(signal.SIGINT)


def write_output(out: Path, *, vlm, resolved: dict, report: dict, state_dict=None, force: bool = False) -> Path:
    """Write the whole directory next to `out`, then rename it into place. `vlm=None` writes the
    report and recipe only (a run that failed: no weights to trust). If writing fails, the temporary
    sibling is removed; an error raised here names it if it could not be."""
    import yaml

    from vlopt import report as report_files

    out = Path(out).absolute()
    check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(out)
    tmp = out.parent / f".{out.name}.vlopt-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if vlm is not None:
            state_dict = state_dict if state_dict is not None else _separate_views(vlm.hf.state_dict())
            kwargs = {"state_dict": state_dict} if state_dict is not None else {}
            _save_pretrained(vlm.hf, tmp, **kwargs)
            vlm.tokenizer.save_pretrained(str(tmp))
            stray = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
            if stray:
                raise VloptError(f"save_pretrained wrote pickle files {stray}; vlopt writes safetensors only")
            for f in tmp.glob("*.safetensors"):
                canonicalize_safetensors(f)
        (tmp / RECIPE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        report_files.write(report, tmp)
        _same_modes(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"complete": vlm is not None,
                    "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
        for p in files:
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))   # last: its presence means complete
        with open(tmp / MANIFEST, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.exists() and isinstance(err, Exception):
            raise VloptError(f"{err}; the partial output {tmp} could not be removed, delete it") from err
        raise
    old = out.parent / f".{out.name}.vlopt-old-{os.getpid()}" if out.exists() else None
    try:
        with _sigint_held():
            if old is not None:
                out.rename(old)
            tmp.rename(out)
        _fsync_dir(out.parent)
    finally:
        if old is not None and old.exists():
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:                       # the swap failed half-way: the previous output goes back
                old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def verify(folder: Path) -> list[str]:
    """Problems with a checkpoint directory (empty list: every file is present and unaltered)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a directory"]
    mf = folder / MANIFEST
    if not mf.is_file():
        return [f"{MANIFEST} is missing: the directory was not written completely by vlopt"]
    try:
        manifest = json.loads(mf.read_text())
        expected = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{MANIFEST} is damaged"]
    problems = []
    for name, digest in expected.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"missing file {name}")
        elif _sha256(p) != digest:
            problems.append(f"altered file {name}")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    present = {name for name in present if name in expected or not is_junk(Path(name))}
    problems += [f"extra file {name}" for name in sorted(present - set(expected))]
    return problems


def junk_files(folder: Path) -> list[str]:
    """The well-known junk files in a checkpoint folder that verification ignores (`is_junk`)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and is_junk(p.relative_to(folder)))


def is_vlopt_output(folder: Path) -> bool:
    """A folder `vlopt apply` wrote (or began to): it has the manifest or the saved recipe. Such a
    folder is loaded only through its verified manifest, by `vlopt.load` and `vlopt bench` alike."""
    return (Path(folder) / MANIFEST).exists() or (Path(folder) / RECIPE).exists()


def holds_weights(folder: Path) -> bool:
    """False for the report-only folder of a failed run (its manifest says so)."""
    try:
        return bool(json.loads((Path(folder) / MANIFEST).read_text()).get("complete"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_output(folder) -> dict:
    """The saved recipe of a verified, complete `vlopt apply` output (what `vlopt.load` replays)."""
    import yaml

    folder = Path(folder)
    if folder.is_dir() and not is_vlopt_output(folder):
        raise VloptError(f"{folder} was not written by `vlopt apply` (no {MANIFEST} or {RECIPE}); load plain "
                         "weights with vlopt.load_model(path=...) or time them with `vlopt bench --model`")
    problems = verify(folder)
    if problems:
        raise VloptError(f"{folder} fails verification: " + "; ".join(problems))
    manifest = json.loads((folder / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise VloptError(f"{folder} holds the report of a run that failed; it has no weights to load")
    return yaml.safe_load((folder / RECIPE).read_text())

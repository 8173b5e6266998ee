"""Atomic file writing and output folders.

Every file sharpscope writes goes through here: the content goes to a temporary file in the destination folder,
is flushed to disk, then renamed over the destination (``os.replace`` is atomic on POSIX and Windows), so a crash
never leaves a half-written file that a later command would trust.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError


def _file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the destination's suffix so writers that infer a format from it (matplotlib,
    numpy) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.fchmod(fd, _file_mode())  # mkstemp creates 0600; results are shared like any other file
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def to_json(obj: Any) -> str:
    """Serialise ``obj`` as indented JSON (numpy scalars/arrays and paths allowed; NaN written as null)."""
    return json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False) + "\n"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically."""
    return write_text(path, to_json(obj))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line, rewriting the file atomically (metrics files are small: one line per epoch)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    write_text(path, old + json.dumps(_nan_to_none(record), default=_json_default) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Save arrays as an uncompressed ``.npz`` atomically (opens with ``numpy.load`` alone)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return write_bytes(path, buf.getvalue())


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. Only tensors, numbers, strings, lists and dicts: loadable with weights_only."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    kwargs.setdefault("dpi", 120)
    kwargs.setdefault("bbox_inches", "tight")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    return path


#: Folders that :func:`prepare_out_dir` created in this process (newest last), for :func:`remove_if_still_empty`.
_CREATED_OUT_DIRS: list[Path] = []


def prepare_out_dir(out: str | os.PathLike, *, outputs: list[str], overwrite: bool, resume: bool = False) -> Path:
    """Create ``out`` and check that none of ``outputs`` (file names) would be overwritten.

    With ``overwrite`` the old outputs are left to be replaced; with ``resume`` partial work found there is
    kept for the caller to continue. Otherwise existing outputs are an error: results are never silently lost.
    Temporary files that a killed writer left behind are deleted (by the main process only under torchrun: the
    caller must not let other ranks write into ``out`` before rank 0 has returned from here).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SharpscopeError(f"--out {str(out)!r} is a file; give a folder")
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not (overwrite or resume):
        raise SharpscopeError(
            f"{out}/ already holds {', '.join(existing)}; pass --overwrite to replace it or choose another --out"
        )
    missing = []  # out and the parents mkdir is about to create, deepest first
    folder = out
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    _CREATED_OUT_DIRS.extend(reversed(missing))  # popped deepest first
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") == "0":
        remove_stale_temporaries(out)
    return out


def remove_if_still_empty() -> None:
    """Remove the ``--out`` folders this process created that are still empty: a command that failed before
    writing anything leaves the disk as it found it (called by the CLI on an error)."""
    while _CREATED_OUT_DIRS:
        folder = _CREATED_OUT_DIRS.pop()
        with contextlib.suppress(OSError):  # not empty (another rank wrote there), or already gone: keep it
            folder.rmdir()


_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")  # atomic_path's mkstemp names


def is_temporary(name: str) -> bool:
    """True for the name of an :func:`atomic_path` temporary (``.STEM.XXXXXXXX.tmp.SUFFIX``)."""
    return _TEMPORARY.match(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete temporary files that a killed writer left in ``folder`` (``.NAME.XXXX.tmp.SUFFIX``); return their names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if is_temporary(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]

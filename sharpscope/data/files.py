"""Where dataset files are looked for, and the error that says so when they are missing.

Search order (DESIGN.md section 3), first folder holding every needed file wins:

1. ``data_dir`` (``--data-dir``) and ``data_dir/<name>``;
2. ``$SHARPSCOPE_DATA`` and ``$SHARPSCOPE_DATA/<name>``;
3. the user cache ``$XDG_CACHE_HOME/sharpscope/<name>`` (default ``~/.cache/sharpscope/<name>``), where
   ``download=True`` puts files;
4. system folders a dataset names, e.g. ``/usr/share/datasets/fashion-mnist`` (Debian's
   ``dataset-fashion-mnist`` package).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from sharpscope.errors import SharpscopeError


def cache_dir(name: str) -> Path:
    """The user cache folder of dataset ``name``: ``$XDG_CACHE_HOME/sharpscope/<name>`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sharpscope" / name


def search_dirs(name: str, data_dir: str | os.PathLike | None = None, *,
                system_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The folders searched for dataset ``name``, in order (see the module docstring); duplicates removed."""
    dirs: list[Path] = []
    for root in (data_dir, os.environ.get("SHARPSCOPE_DATA") or None):
        if root is not None:
            root = Path(root).expanduser()
            dirs += [root, root / name]
    dirs.append(cache_dir(name))
    dirs += [Path(d) for d in system_dirs]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_first(dirs: Sequence[Path], locate: Callable[[Path], object | None]) -> object | None:
    """The first non-None ``locate(folder)`` over existing ``dirs``, or None."""
    for d in dirs:
        if d.is_dir():
            found = locate(d)
            if found is not None:
                return found
    return None


def missing_files_error(name: str, wanted: str, dirs: Sequence[Path], *,
                        apt_package: str | None = None) -> SharpscopeError:
    """One line: which files are missing, where we looked, and the ways to get them."""
    ways = [f"`apt-get install {apt_package}`"] if apt_package else []
    ways += [f"run `sharpscope train --dataset {name} --download` (download=True in Python)",
             f"or put them in {cache_dir(name)} (or --data-dir / $SHARPSCOPE_DATA)"]
    return SharpscopeError(
        f"dataset {name!r}: {wanted} not found; looked in {', '.join(str(d) for d in dirs)}. "
        f"To get them: {', '.join(ways)}"
    )

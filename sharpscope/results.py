"""Provenance for result files: every ``.json`` sidecar says how, from what and by which versions it was made."""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import sys
from pathlib import Path
from typing import Any

from sharpscope import __version__


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(checkpoint_paths: list[str | Path] | None = None, *, command: list[str] | None = None) -> dict[str, Any]:
    """A provenance record: time, command line, versions, and each input checkpoint's path and hash."""
    import numpy
    import torch

    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else sys.argv,
        "versions": {
            "sharpscope": __version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "checkpoints": [
            {"path": str(Path(p)), "sha256": file_sha256(p)} for p in (checkpoint_paths or []) if Path(p).is_file()
        ],
    }

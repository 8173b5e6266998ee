"""Download official dataset files with checksum verification.

A file is streamed to a temporary name next to its destination while its digest is computed, and renamed into
place (:func:`sharpscope.io.atomic_path`) only when the digest matches, so an interrupted or corrupted download
never leaves a file that a later run would trust. The official checksums are MD5 (what the dataset authors and
torchvision publish); MD5 here checks integrity against accidents, not against an attacker.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sharpscope.errors import SharpscopeError
from sharpscope.io import atomic_path

_BLOCK = 1 << 20  # 1 MiB read size


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset, where to get it and how to check it."""

    filename: str  # name in the destination folder
    url: str  # where to fetch it (http(s):// or file://)
    md5: str | None = None  # expected hex MD5 (the official checksums are MD5)
    sha256: str | None = None  # expected hex SHA-256, checked too when given


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of the file at ``path`` (``algorithm``: any :func:`hashlib.new` name), read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digests(what: str, found: dict[str, str], *, md5: str | None, sha256: str | None, fix: str) -> None:
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None and found[algorithm] != expected.lower():
            raise SharpscopeError(f"{what}: {algorithm} is {found[algorithm]}, expected {expected.lower()}; {fix}")


def verify_file(path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`SharpscopeError` unless the file at ``path`` has the given MD5 and/or SHA-256."""
    path = Path(path)
    if md5 is None and sha256 is None:
        raise SharpscopeError(f"verify_file({str(path)!r}): give md5= or sha256= to check against")
    if not path.is_file():
        raise SharpscopeError(f"cannot verify {path}: no such file")
    found = {a: file_digest(path, a) for a, e in (("md5", md5), ("sha256", sha256)) if e is not None}
    _check_digests(str(path), found, md5=md5, sha256=sha256,
                   fix="the file is corrupt or a different version: delete it and download it again")


def download_file(remote: RemoteFile, dest_dir: str | os.PathLike, *, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """Fetch ``remote`` into ``dest_dir/remote.filename`` atomically and verify its checksum.

    An existing destination that already verifies is kept (no download). Returns the destination path.

    Raises:
        SharpscopeError: network failure (the message says where to put the file by hand) or a checksum
            mismatch (nothing is written).
    """
    dest = Path(dest_dir) / remote.filename
    if dest.is_file() and (remote.md5 or remote.sha256):
        try:
            verify_file(dest, md5=remote.md5, sha256=remote.sha256)
            return dest
        except SharpscopeError:
            pass  # a stale or partial file from elsewhere: fetch a fresh copy over it
    from tqdm.auto import tqdm

    digests = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    try:
        with urllib.request.urlopen(remote.url, timeout=timeout) as response, atomic_path(dest) as tmp:
            total = response.headers.get("Content-Length")
            with open(tmp, "wb") as out, tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                                              desc=remote.filename, disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(_BLOCK), b""):
                    out.write(block)
                    for d in digests.values():
                        d.update(block)
                    bar.update(len(block))
            _check_digests(f"download of {remote.url}", {a: d.hexdigest() for a, d in digests.items()},
                           md5=remote.md5, sha256=remote.sha256,
                           fix=f"nothing was written; retry, or fetch it by hand into {dest}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, SharpscopeError):
            raise
        reason = getattr(exc, "reason", None) or exc
        raise SharpscopeError(
            f"could not download {remote.url} ({reason}); fetch it by hand and put it at {dest}"
        ) from None
    return dest


def download_files(remotes: Sequence[RemoteFile], dest_dir: str | os.PathLike, *, progress: bool = True) -> list[Path]:
    """:func:`download_file` for each of ``remotes`` into ``dest_dir``; returns the destination paths."""
    return [download_file(r, dest_dir, progress=progress) for r in remotes]

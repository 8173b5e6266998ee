"""``cifar10`` and ``cifar100`` (Krizhevsky 2009): 3x32x32, the official "python version" pickle archives.

Layout: ``cifar-10-batches-py/data_batch_1..5`` + ``test_batch`` (10 classes, labels under ``b"labels"``) and
``cifar-100-python/train`` + ``test`` (100 fine classes, ``b"fine_labels"``). Each file is a pickled dict whose
``b"data"`` is a uint8 array (N, 3072) holding the red, green and blue 32x32 planes of each image row-major.
They are read from the extracted folder or straight from the ``.tar.gz`` (streamed once, never extracted).

Why a restricted unpickler: ``pickle.load`` executes whatever callables a file names, so a tampered archive
could run code. These files only need numpy's array reconstruction, so :class:`_ArrayUnpickler` resolves exactly
those names (plus ``_codecs.encode``, which Python 3 uses for bytes in protocol-2 pickles) and refuses every
other global.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sharpscope.data.dataset import ImageDataset, channel_stats
from sharpscope.data.download import RemoteFile, download_file
from sharpscope.data.files import cache_dir, find_first, missing_files_error, search_dirs
from sharpscope.data.registry import register_dataset
from sharpscope.errors import SharpscopeError

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's ndarray reconstructor, whatever module it lives in
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy's protocol-5 reconstructor
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # what the official (numpy 1.x era) files name
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2 spelling
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, numbers and numpy arrays (see the module docstring)."""

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only numpy "
                                         "arrays and plain data") from None


def read_cifar_batch(data: bytes, *, source: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one CIFAR batch file's bytes into uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Raises:
        SharpscopeError: naming ``source``, when the bytes are not a safe pickle of the expected dict.
    """
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # pickle reports corruption as many types (UnpicklingError, EOFError, ValueError...)
        raise SharpscopeError(f"{source}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
                              "the file is corrupt or truncated, replace it with a fresh copy") from None
    if not isinstance(batch, dict):
        raise SharpscopeError(f"{source}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    images, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise SharpscopeError(f"{source}: expected b'data' as a uint8 (N, 3072) array, found {found}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(images),):
        raise SharpscopeError(f"{source}: expected {len(images)} labels under {label_key!r}, "
                              f"found shape {labels.shape}")
    return images.reshape(-1, 3, 32, 32), labels


@dataclass(frozen=True)
class _CifarLayout:
    """File names of one CIFAR variant."""

    folder: str  # folder inside the archive, and on disk once extracted
    archive: str  # official archive name
    train: list[str]  # train batch file names
    test: list[str]  # test batch file names
    label_key: bytes  # dict key of the labels used (CIFAR-100: the 100 fine labels)


LAYOUTS = {
    "cifar10": _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                            [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], b"fine_labels"),
}
REMOTES = {
    "cifar10": RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                           md5="eb9058c3a382ffc7106e4002c42a8d85"),
}


def _locate(layout: _CifarLayout, folder: Path) -> Path | None:
    """The extracted batch folder or the archive in ``folder``, or None."""
    names = layout.train + layout.test
    for candidate in (folder / layout.folder, folder):
        if all((candidate / n).is_file() for n in names):
            return candidate
    archive = folder / layout.archive
    return archive if archive.is_file() else None


def _read_members(layout: _CifarLayout, source: Path) -> dict[str, tuple[bytes, str]]:
    """``{batch name: (bytes, where it came from)}`` from a folder or a .tar.gz (streamed in one pass)."""
    names = layout.train + layout.test
    if source.is_dir():
        return {n: ((source / n).read_bytes(), str(source / n)) for n in names}
    wanted = {f"{layout.folder}/{n}": n for n in names}
    found: dict[str, tuple[bytes, str]] = {}
    try:
        with tarfile.open(source, mode="r|gz") as tar:  # stream mode: one sequential pass over the archive
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = (tar.extractfile(member).read(), f"{source}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise SharpscopeError(f"{source}: cannot read the archive ({exc}); it is corrupt or truncated, delete it "
                              "and download it again") from None
    missing = [m for m, n in wanted.items() if n not in found]
    if missing:
        raise SharpscopeError(f"{source}: the archive lacks {', '.join(missing)}; is it the official "
                              f"{layout.archive}?")
    return found


def load_cifar(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """Load ``name`` ("cifar10" or "cifar100") from an extracted folder or the official archive."""
    layout = LAYOUTS[name]
    dirs = search_dirs(name, data_dir)
    source = find_first(dirs, lambda folder: _locate(layout, folder))
    if source is None and download:
        source = download_file(REMOTES[name], cache_dir(name))
    if source is None:
        wanted = f"{layout.folder}/ ({', '.join(layout.train + layout.test)}) or {layout.archive}"
        raise missing_files_error(name, wanted, dirs)
    members = _read_members(layout, source)
    splits = {}
    for split, batch_names in (("train", layout.train), ("test", layout.test)):
        parts = [read_cifar_batch(members[n][0], source=members[n][1], label_key=layout.label_key)
                 for n in batch_names]
        splits[split] = (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                         torch.from_numpy(np.concatenate([p[1] for p in parts])))
    num_classes = 10 if name == "cifar10" else 100
    mean, std = channel_stats(splits["train"][0])
    return ImageDataset(name=name, train_images=splits["train"][0], train_labels=splits["train"][1],
                        test_images=splits["test"][0], test_labels=splits["test"][1], num_classes=num_classes,
                        mean=mean, std=std, augment="crop-flip")


@register_dataset("cifar10", in_channels=3, image_size=32, num_classes=10, augment="crop-flip",
                  summary="CIFAR-10 (Krizhevsky 2009), python pickle archive; 50000 train / 10000 test")
def load_cifar10(*, data_dir=None, download: bool = False) -> ImageDataset:
    """Load ``cifar10`` (see :func:`load_cifar`)."""
    return load_cifar("cifar10", data_dir=data_dir, download=download)


@register_dataset("cifar100", in_channels=3, image_size=32, num_classes=100, augment="crop-flip",
                  summary="CIFAR-100 (Krizhevsky 2009), 100 fine labels, python pickle archive; 50000 / 10000")
def load_cifar100(*, data_dir=None, download: bool = False) -> ImageDataset:
    """Load ``cifar100`` (see :func:`load_cifar`)."""
    return load_cifar("cifar100", data_dir=data_dir, download=download)

"""``fashion-mnist`` and ``mnist``: 28x28 grayscale, 10 classes, in the IDX format (LeCun et al.).

An IDX file is a 4-byte magic number ``00 00 TT DD`` (TT = 0x08: unsigned bytes; DD = number of dimensions), DD
big-endian uint32 sizes, then the data. Images are ``idx3`` (N, 28, 28), labels ``idx1`` (N,). Files may be raw
or gzip-compressed (``.gz``); the gzip magic is detected from the content, not the name. The official 60,000 /
10,000 train/test split is used.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from sharpscope.data.dataset import ImageDataset, channel_stats
from sharpscope.data.download import RemoteFile, download_files
from sharpscope.data.files import cache_dir, find_first, missing_files_error, search_dirs
from sharpscope.data.registry import register_dataset
from sharpscope.errors import SharpscopeError

IDX_UBYTE = 0x08  # the only IDX element type these datasets use

#: (images, labels) file stems of each split; on disk as the stem or the stem + ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Official locations and the MD5 of the .gz files (as published by the authors and used by torchvision).
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_BASE_URL = {"mnist": _MNIST_URL, "fashion-mnist": _FASHION_URL}
REMOTES = {name: [RemoteFile(f, _BASE_URL[name] + f, md5=md5) for f, md5 in files.items()]
           for name, files in _MD5.items()}
#: Debian's ``dataset-fashion-mnist`` package installs the four .gz files here.
SYSTEM_DIRS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"], "mnist": []}
APT_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist", "mnist": None}
#: torchvision keeps the same files in ``<root>/<folder>/raw``; a torchvision root works as data_dir too.
TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def read_idx(path: str | os.PathLike, *, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip) with ``ndim`` dimensions into a uint8 array.

    Raises:
        SharpscopeError: naming the file, when it cannot be decompressed, has the wrong magic number (not IDX,
            not unsigned bytes, or another number of dimensions) or is shorter/longer than its header says.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise SharpscopeError(f"{path}: cannot read or decompress it ({exc}); the file is corrupt or truncated, "
                              "replace it with a fresh copy") from None
    expected_magic = bytes([0, 0, IDX_UBYTE, ndim])
    if raw[:4] != expected_magic:
        raise SharpscopeError(f"{path}: magic number {raw[:4].hex() or '(empty file)'} is not {expected_magic.hex()} "
                              f"(IDX, unsigned bytes, {ndim} dimensions); is this the right file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SharpscopeError(f"{path}: truncated header ({len(raw)} bytes, expected at least {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise SharpscopeError(f"{path}: {len(raw)} bytes but its header promises {expected} for shape {shape}; "
                              "the file is truncated or corrupt, replace it with a fresh copy")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _locate(folder: Path) -> dict[str, Path] | None:
    """Map each IDX stem to its file in ``folder`` (raw preferred over .gz), or None when one is missing."""
    found = {}
    for stems in IDX_FILES.values():
        for stem in stems:
            candidates = [folder / stem, folder / f"{stem}.gz"]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                return None
            found[stem] = path
    return found


def load_idx_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                     num_classes: int = 10) -> ImageDataset:
    """Load ``name`` ("mnist" or "fashion-mnist") from the first folder holding all four IDX files.

    ``download`` fetches the official .gz files into the user cache when none is found.
    """
    dirs = search_dirs(name, data_dir, system_dirs=SYSTEM_DIRS[name])
    files = find_first(dirs, lambda d: _locate(d) or _locate(d / TORCHVISION_FOLDERS[name] / "raw"))
    if files is None and download:
        download_files(REMOTES[name], cache_dir(name))
        files = _locate(cache_dir(name))
    if files is None:
        wanted = ", ".join(f"{stem}[.gz]" for stems in IDX_FILES.values() for stem in stems)
        raise missing_files_error(name, wanted, dirs, apt_package=APT_PACKAGES[name])
    arrays = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        images = read_idx(files[image_stem], ndim=3)
        labels = read_idx(files[label_stem], ndim=1)
        if len(images) != len(labels):
            raise SharpscopeError(f"{files[image_stem]} holds {len(images)} images but {files[label_stem]} holds "
                                  f"{len(labels)} labels; the two files do not belong together")
        if labels.size and int(labels.max()) >= num_classes:
            raise SharpscopeError(f"{files[label_stem]}: label {int(labels.max())} is out of range for "
                                  f"{num_classes} classes; is this the right file?")
        arrays[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    mean, std = channel_stats(arrays["train"][0])
    return ImageDataset(name=name, train_images=arrays["train"][0], train_labels=arrays["train"][1],
                        test_images=arrays["test"][0], test_labels=arrays["test"][1], num_classes=num_classes,
                        mean=mean, std=std, augment="none")


@register_dataset("fashion-mnist", in_channels=1, image_size=28, num_classes=10, augment="none",
                  summary="Fashion-MNIST (Xiao et al. 2017), IDX files; 60000 train / 10000 test")
def load_fashion_mnist(*, data_dir=None, download: bool = False) -> ImageDataset:
    """Load ``fashion-mnist`` (see :func:`load_idx_dataset`)."""
    return load_idx_dataset("fashion-mnist", data_dir=data_dir, download=download)


@register_dataset("mnist", in_channels=1, image_size=28, num_classes=10, augment="none",
                  summary="MNIST (LeCun et al. 1998), IDX files; 60000 train / 10000 test")
def load_mnist(*, data_dir=None, download: bool = False) -> ImageDataset:
    """Load ``mnist`` (see :func:`load_idx_dataset`)."""
    return load_idx_dataset("mnist", data_dir=data_dir, download=download)

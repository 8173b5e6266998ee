"""``svhn``: Street View House Numbers (Netzer et al. 2011), cropped digits, 3x32x32, 10 classes.

The official ``train_32x32.mat`` (73,257 images) and ``test_32x32.mat`` (26,032) are MATLAB files read with
:func:`scipy.io.loadmat`: ``X`` is uint8 (32, 32, 3, N) and ``y`` is (N, 1) with labels 1..10, where 10 stands
for the digit 0 and is mapped to 0. The ``extra`` split is not used. Augmentation is pad-crop only: a mirrored
digit is not the same digit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sharpscope.data.dataset import ImageDataset, channel_stats
from sharpscope.data.download import RemoteFile, download_files
from sharpscope.data.files import cache_dir, find_first, missing_files_error, search_dirs
from sharpscope.data.registry import register_dataset
from sharpscope.errors import SharpscopeError

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
REMOTES = [
    RemoteFile("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
               md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
    RemoteFile("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
               md5="eb5a983be6a315427106f1b69d8e5a5d"),
]


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``.mat`` file into uint8 images (N, 3, 32, 32) and int64 labels (N,) in 0..9.

    Raises:
        SharpscopeError: naming the file, when it is not a readable MATLAB file with the expected X and y.
    """
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy reports corrupt files as ValueError, MatReadError, OSError, TypeError...
        raise SharpscopeError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc}); it is corrupt or "
                              "truncated, replace it with a fresh copy") from None
    images, labels = mat.get("X"), mat.get("y")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[:3] != (32, 32, 3) \
            or images.ndim != 4:
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else "nothing"
        raise SharpscopeError(f"{path}: expected X as uint8 (32, 32, 3, N), found {found}")
    count = images.shape[3]
    if not isinstance(labels, np.ndarray) or labels.size != count:
        found = labels.shape if isinstance(labels, np.ndarray) else "nothing"
        raise SharpscopeError(f"{path}: expected y with {count} labels, found {found}")
    labels = labels.reshape(-1).astype(np.int64)
    if count and (labels.min() < 1 or labels.max() > 10):
        raise SharpscopeError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 1..10 (10 = digit 0)")
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def _locate(folder: Path) -> dict[str, Path] | None:
    paths = {split: folder / name for split, name in SVHN_FILES.items()}
    return paths if all(p.is_file() for p in paths.values()) else None


@register_dataset("svhn", in_channels=3, image_size=32, num_classes=10, augment="crop",
                  summary="SVHN cropped digits (Netzer et al. 2011), .mat files; 73257 train / 26032 test")
def load_svhn(*, data_dir: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """Load ``svhn`` from ``train_32x32.mat`` and ``test_32x32.mat`` (search order: :mod:`sharpscope.data.files`)."""
    dirs = search_dirs("svhn", data_dir)
    files = find_first(dirs, _locate)
    if files is None and download:
        download_files(REMOTES, cache_dir("svhn"))
        files = _locate(cache_dir("svhn"))
    if files is None:
        raise missing_files_error("svhn", " and ".join(SVHN_FILES.values()), dirs)
    splits = {split: tuple(torch.from_numpy(a) for a in read_svhn_mat(path)) for split, path in files.items()}
    mean, std = channel_stats(splits["train"][0])
    return ImageDataset(name="svhn", train_images=splits["train"][0], train_labels=splits["train"][1],
                        test_images=splits["test"][0], test_labels=splits["test"][1], num_classes=10,
                        mean=mean, std=std, augment="crop")

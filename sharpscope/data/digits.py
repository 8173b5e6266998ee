"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download).

The images hold integer ink counts 0..16 (the UCI "optdigits" 4x4-block counts); they are mapped to uint8 by
``round(v * 255 / 16)`` so they are treated like every other 8-bit image set.

Split (fixed and documented, since the set ships without one): ``numpy.random.default_rng(0).permutation(1797)``;
the last 360 indices (about 20 %) are the test split, the first 1,437 the train split, each kept in permutation
order. Mean and std are computed on the train split.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from sharpscope.data.dataset import ImageDataset, channel_stats
from sharpscope.data.registry import register_dataset

NUM_TEST = 360  # last 360 of the seed-0 permutation, ~20 % of 1,797
SPLIT_SEED = 0


@register_dataset("digits", in_channels=1, image_size=8, num_classes=10, augment="none",
                  summary="scikit-learn 8x8 digits, bundled; 1437 train / 360 test (seed-0 permutation)")
def load_digits(*, data_dir=None, download: bool = False) -> ImageDataset:
    """Load ``digits`` (``data_dir`` and ``download`` are ignored: the data ship with scikit-learn)."""
    flat, labels = _read_sklearn_digits()
    images = np.rint(flat.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # (1797, 1, 8, 8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    train, test = order[:-NUM_TEST], order[-NUM_TEST:]
    train_images = torch.from_numpy(images[train])
    mean, std = channel_stats(train_images)
    return ImageDataset(
        name="digits",
        train_images=train_images,
        train_labels=torch.from_numpy(labels[train]),
        test_images=torch.from_numpy(images[test]),
        test_labels=torch.from_numpy(labels[test]),
        num_classes=10,
        mean=mean,
        std=std,
        augment="none",
    )


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(data (1797, 64) float64, target (1797,) int64)`` as ``sklearn.datasets.load_digits`` returns them.

    Read from scikit-learn's bundled ``datasets/data/digits.csv.gz`` directly (64 pixel columns, then the label),
    which takes 0.1 s, where importing ``sklearn.datasets`` takes 1.2 s of every command's start on the 2-core
    machine. Falls back to ``load_digits`` if the file is not where scikit-learn keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as handle:
                table = np.loadtxt(handle, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    return raw.data, raw.target.astype(np.int64)

"""``synthetic``: a tiny seeded image set for tests (256 train / 128 test, 1x8x8, 4 classes).

Each class has a fixed pattern (class 0 a horizontal bar, 1 a vertical bar, 2 the main diagonal, 3 the
anti-diagonal; more classes get seeded random patterns); a sample is its class pattern plus Gaussian pixel noise,
clipped to uint8. A linear model learns it in a few dozen steps, yet it is noisy enough that the loss does not
collapse to zero at once.
"""

from __future__ import annotations

import numpy as np
import torch

from sharpscope.data.dataset import ImageDataset, channel_stats
from sharpscope.data.registry import register_dataset
from sharpscope.errors import SharpscopeError


def _patterns(num_classes: int, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(num_classes, channels, size, size) float patterns in [0, 255]."""
    patterns = np.zeros((num_classes, channels, size, size))
    band = slice(size // 2 - max(1, size // 8), size // 2 + max(1, size // 8))
    eye = np.eye(size, dtype=bool)
    shapes = [("row", band), ("col", band), ("diag", eye), ("anti", eye[:, ::-1])]
    for k in range(num_classes):
        if k < len(shapes):
            kind, where = shapes[k]
            if kind == "row":
                patterns[k, :, where, :] = 220.0
            elif kind == "col":
                patterns[k, :, :, where] = 220.0
            else:
                patterns[k, :, where] = 220.0
        else:
            patterns[k] = rng.uniform(0.0, 220.0, size=(channels, size, size))
    return patterns


def make_synthetic(*, num_train: int = 256, num_test: int = 128, num_classes: int = 4, channels: int = 1,
                   image_size: int = 8, noise: float = 60.0, seed: int = 0, augment: str = "none") -> ImageDataset:
    """A seeded pattern-plus-noise dataset (see the module docstring); the same arguments give the same data.

    Labels are balanced (sample ``i`` has class ``i % num_classes`` before a seeded shuffle). ``noise`` is the
    pixel noise std on the 0..255 scale.
    """
    if min(num_train, num_test, channels, image_size) < 1 or num_classes < 2 or noise < 0:
        raise SharpscopeError(
            f"make_synthetic: expected num_train, num_test, channels, image_size >= 1, num_classes >= 2 and "
            f"noise >= 0, found {num_train}, {num_test}, {channels}, {image_size}, {num_classes}, {noise}"
        )
    rng = np.random.default_rng(seed)
    patterns = _patterns(num_classes, channels, image_size, rng)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.permutation(np.arange(n) % num_classes)
        pixels = patterns[labels] + rng.normal(0.0, noise, size=(n, channels, image_size, image_size))
        images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    train_images, train_labels = draw(num_train)
    test_images, test_labels = draw(num_test)
    mean, std = channel_stats(train_images)
    return ImageDataset(name="synthetic", train_images=train_images, train_labels=train_labels,
                        test_images=test_images, test_labels=test_labels, num_classes=num_classes,
                        mean=mean, std=std, augment=augment)


@register_dataset("synthetic", in_channels=1, image_size=8, num_classes=4, augment="none",
                  summary="seeded 1x8x8 patterns + noise, 4 classes; 256 train / 128 test (for tests)")
def load_synthetic(*, data_dir=None, download: bool = False) -> ImageDataset:
    """Load ``synthetic`` with its defaults (``data_dir`` and ``download`` are ignored)."""
    return make_synthetic()

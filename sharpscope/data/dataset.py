"""The in-memory image dataset every loader returns: uint8 images, int64 labels, per-channel statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError

#: Augmentations a dataset can ask for (applied by :class:`~sharpscope.data.DeviceLoader`, batched on the device):
#: "none"; "crop" = random 4-pixel pad-and-crop; "crop-flip" = that plus a random horizontal flip.
AUGMENTATIONS = ("none", "crop", "crop-flip")

SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A whole dataset held in memory as uint8 tensors, with the statistics to normalise it.

    Images stay uint8 (4x smaller than float32); :func:`~sharpscope.data.normalize` turns a batch into
    ``(x / 255 - mean) / std`` in float32 when it is used.
    """

    name: str  # registry name, e.g. "fashion-mnist"
    train_images: Tensor  # uint8 (N_train, C, H, W), CPU, H == W
    train_labels: Tensor  # int64 (N_train,), values in [0, num_classes)
    test_images: Tensor  # uint8 (N_test, C, H, W), CPU
    test_labels: Tensor  # int64 (N_test,)
    num_classes: int  # number of classes (labels are 0 .. num_classes - 1)
    mean: tuple[float, ...]  # per-channel mean of the train split, pixels scaled to [0, 1]
    std: tuple[float, ...]  # per-channel (population) std of the train split, pixels scaled to [0, 1]
    augment: str  # standard training augmentation: "none" | "crop" | "crop-flip"

    def __post_init__(self) -> None:
        for split in SPLITS:
            images, labels = self.split(split)
            where = f"dataset {self.name!r} {split} split"
            if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
                found = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
                raise SharpscopeError(f"{where}: expected uint8 images of shape (N, C, H, W), found {found}")
            if images.shape[2] != images.shape[3]:
                raise SharpscopeError(f"{where}: expected square images, found H x W = {images.shape[2]} x "
                                      f"{images.shape[3]}; crop or pad them to a square first")
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                found = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
                raise SharpscopeError(f"{where}: expected int64 labels of shape ({images.shape[0]},), found {found}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise SharpscopeError(f"{where}: labels span {int(labels.min())}..{int(labels.max())}, expected "
                                      f"0..{self.num_classes - 1} for num_classes={self.num_classes}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise SharpscopeError(f"dataset {self.name!r}: train images are {tuple(self.train_images.shape[1:])} "
                                  f"but test images are {tuple(self.test_images.shape[1:])}")
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise SharpscopeError(f"dataset {self.name!r}: expected {channels} per-channel mean/std values with "
                                  f"std > 0, found mean={self.mean} std={self.std}")
        if self.augment not in AUGMENTATIONS:
            raise SharpscopeError(f"dataset {self.name!r}: augment {self.augment!r} is not one of {AUGMENTATIONS}")

    @property
    def in_channels(self) -> int:
        """Number of image channels C."""
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        """Height (= width) of the images in pixels."""
        return self.train_images.shape[2]

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of ``split`` ("train" or "test")."""
        if split == "train":
            return self.train_images, self.train_labels
        if split == "test":
            return self.test_images, self.test_labels
        raise SharpscopeError(f"unknown split {split!r}; expected 'train' or 'test'")

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.train_images.shape[1:])
        return (f"ImageDataset(name={self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"image={shape}, num_classes={self.num_classes}, augment={self.augment!r})")


def channel_stats(images: Tensor, *, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 ``images`` (N, C, H, W), pixels scaled to [0, 1].

    Exact: sums of values and squared values are accumulated in int64 (at most 255^2 * N * H * W, far below
    2^63) in chunks of ``chunk`` images, so a 50,000-image set never needs a float copy of itself.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise SharpscopeError(f"channel_stats needs a non-empty uint8 (N, C, H, W) tensor, "
                              f"found {images.dtype} {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.int64)
    total_sq = torch.zeros(channels, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.int64)
        total += x.sum(dim=(0, 2, 3)).cpu()
        total_sq += (x * x).sum(dim=(0, 2, 3)).cpu()
    count = images.numel() // channels
    mean = total.double() / count
    var = (total_sq.double() / count - mean * mean).clamp_min(0.0)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).tolist())

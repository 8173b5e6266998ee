"""Device-resident data: the training loader (:class:`DeviceLoader`) and fixed evaluation sets (:class:`EvalBatches`).

Small image datasets fit on the accelerator as uint8 (CIFAR-10 train: 150 MB), so batches are index-gathered
there, augmented with a batched gather (:mod:`sharpscope.data.augment`) and normalised to float32 on the fly: no
worker processes, no per-sample Python, no host round trip per step (as in Keller Jordan's cifar10-airbench).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from sharpscope.data.augment import PADDING, pad_crop_flip, sample_augmentation
from sharpscope.data.dataset import AUGMENTATIONS, ImageDataset
from sharpscope.errors import SharpscopeError, unknown_name_error


def _scale_shift(mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, channels: int,
                 device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(1, C, 1, 1) float32 ``1 / (255 std)`` and ``mean / std``, so that x * scale - shift = (x/255 - mean)/std."""
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std = torch.as_tensor(std, dtype=torch.float64).flatten()
    if mean.numel() != channels or std.numel() != channels or bool((std <= 0).any()):
        raise SharpscopeError(f"expected {channels} per-channel mean and std values (std > 0), found "
                              f"mean={mean.tolist()} std={std.tolist()}")
    scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, channels, 1, 1).to(device)
    shift = (mean / std).to(torch.float32).view(1, channels, 1, 1).to(device)
    return scale, shift


def _apply_scale_shift(images: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    out = images.to(dtype).mul_(scale.to(dtype)).sub_(shift.to(dtype))
    if out.dim() == 4 and out.shape[1] == 1 and out.stride(1) != out.shape[2] * out.shape[3]:
        # One channel makes the strides ambiguous: (HW, 1, W, 1) is contiguous *and* channels-last, and torch then
        # runs the model channels-last. Under vmap that raises ("NYI: querying is_contiguous inside of vmap")
        # and cached Hessian-vector products ran 1.6x slower on the digits ConvNet; give it standard strides.
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor, *,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """``(images / 255 - mean) / std`` per channel, as ``dtype``, for uint8 images (N, C, H, W) on any device.

    Computed as ``images * (1 / (255 std)) - mean / std`` (one multiply-subtract; equal to the formula up to
    float rounding). The memory format of ``images`` (e.g. channels_last) is kept.
    """
    if images.dim() != 4:
        raise SharpscopeError(f"normalize expects images of shape (N, C, H, W), found {tuple(images.shape)}")
    scale, shift = _scale_shift(mean, std, images.shape[1], images.device)
    return _apply_scale_shift(images, scale, shift, dtype)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed for (seed, epoch), so nearby pairs give unrelated streams."""
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


class DeviceLoader:
    """Shuffled, augmented, normalised training batches from a whole split held on ``device`` as uint8.

    Each epoch is planned up front from one CPU ``torch.Generator`` seeded by ``(seed, epoch)``: a permutation of
    the samples (``shuffle``), crop offsets and flip flags (``augment``). The plan is moved to the device once per
    epoch, so the same (seed, epoch) gives identical batches on every device, and iteration never syncs with the
    host. Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``): iterating twice without it
    replays the same epoch.

    Args:
        images: uint8 (N, C, H, W).
        labels: integer (N,) (stored as int64).
        batch_size: samples per batch (per rank).
        mean, std: per-channel statistics of pixels in [0, 1] (``ImageDataset.mean/std``).
        shuffle: permute the samples every epoch; otherwise keep their order.
        augment: "none", "crop" (pad 4 with zeros, random crop back) or "crop-flip" (plus random horizontal
            flip), see :mod:`sharpscope.data.augment`.
        drop_last: drop the last incomplete batch (and, with several ranks, the samples beyond an even split).
        device: where the data live and batches are made.
        seed: base seed (>= 0) of the per-epoch generator.
        channels_last: return batches in ``torch.channels_last`` memory format (faster convolutions on CUDA).
        num_replicas, rank: data-parallel sharding like ``DistributedSampler``: every rank draws the same
            permutation and takes positions ``rank, rank + num_replicas, ...``; without ``drop_last`` the
            permutation wraps around so every rank gets ``ceil(N / num_replicas)`` samples.

    Yields:
        ``(x, y)``: x float32 (B, C, H, W) normalised, y int64 (B,), both on ``device``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
        shuffle: bool = True,
        augment: str = "none",
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise SharpscopeError(f"DeviceLoader expects uint8 images (N, C, H, W), found {images.dtype} "
                                  f"{tuple(images.shape)}; pass the dataset's train_images, not normalised floats")
        if labels.dim() != 1 or len(labels) != len(images) or len(images) == 0:
            raise SharpscopeError(f"DeviceLoader expects one label per image and at least one image, found "
                                  f"{len(images)} images and labels of shape {tuple(labels.shape)}")
        if augment not in AUGMENTATIONS:
            raise unknown_name_error("augmentation", augment, AUGMENTATIONS)
        if batch_size < 1 or seed < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise SharpscopeError(f"DeviceLoader expects batch_size >= 1, seed >= 0 and 0 <= rank < num_replicas, "
                                  f"found batch_size={batch_size}, seed={seed}, rank={rank}, "
                                  f"num_replicas={num_replicas}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self._scale, self._shift = _scale_shift(mean, std, images.shape[1], self.device)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.channels_last = seed, channels_last
        self.num_replicas, self.rank = num_replicas, rank
        total = len(images)
        self.num_samples = total // num_replicas if drop_last else math.ceil(total / num_replicas)  # per rank
        if len(self) == 0:
            raise SharpscopeError(f"DeviceLoader: batch_size={batch_size} with drop_last leaves no batch of "
                                  f"{self.num_samples} samples per rank; lower the batch size or unset drop_last")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        if epoch < 0:
            raise SharpscopeError(f"set_epoch expects epoch >= 0, found {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches per epoch (per rank)."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """This rank's sample order for the current epoch and its crop offsets / flip flags, on the CPU."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        total = len(self.labels)
        order = torch.randperm(total, generator=generator) if self.shuffle else torch.arange(total)
        padded = self.num_samples * self.num_replicas
        if padded > total:  # wrap around so each rank has the same count (DistributedSampler semantics)
            order = torch.cat([order, order[: padded - total]])
        offsets, flips = sample_augmentation(padded, self.augment, generator=generator, padding=PADDING)
        mine = slice(self.rank, padded, self.num_replicas)
        return (order[:padded][mine], None if offsets is None else offsets[mine],
                None if flips is None else flips[mine])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, offsets, flips = (None if t is None else t.to(self.device) for t in self.epoch_plan())
        stop = len(self) * self.batch_size if self.drop_last else self.num_samples
        for start in range(0, stop, self.batch_size):
            window = slice(start, min(start + self.batch_size, stop))
            index = order[window]
            x = pad_crop_flip(self.images[index], offsets=None if offsets is None else offsets[window],
                              flips=None if flips is None else flips[window], padding=PADDING)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield _apply_scale_shift(x, self._scale, self._shift, torch.float32), self.labels[index]

    def __repr__(self) -> str:
        return (f"DeviceLoader({len(self.labels)} samples, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"augment={self.augment!r}, device={str(self.device)!r}, epoch={self.epoch})")


class EvalBatches:
    """A fixed, ordered sequence of ``(x, y)`` batches: the same samples in the same order on every pass.

    Analyses (Hessian, sharpness, landscapes) average over it; iterating is free (the batches are stored
    tensors, already normalised and on their device). Averages over it should weight batch ``b`` by
    ``len(y_b) / num_samples``.
    """

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        self._batches = tuple((x, y) for x, y in batches)
        if not self._batches:
            raise SharpscopeError("EvalBatches needs at least one (x, y) batch, found none")
        for i, (x, y) in enumerate(self._batches):
            if len(x) != len(y) or len(x) == 0:
                raise SharpscopeError(f"EvalBatches batch {i}: x has {len(x)} samples and y {len(y)}; expected "
                                      "the same non-zero number")
        self.num_samples = sum(len(y) for _, y in self._batches)  # samples over all batches

    @classmethod
    def from_tensors(cls, x: Tensor, y: Tensor, *, batch_size: int) -> EvalBatches:
        """Split ``x`` (N, ...) and ``y`` (N, ...) into consecutive batches of ``batch_size`` (the last may be
        smaller); the batches are views, no copy."""
        if batch_size < 1:
            raise SharpscopeError(f"EvalBatches.from_tensors expects batch_size >= 1, found {batch_size}")
        if len(x) != len(y):
            raise SharpscopeError(f"EvalBatches.from_tensors: x has {len(x)} samples but y has {len(y)}")
        return cls(zip(x.split(batch_size), y.split(batch_size)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EvalBatches:
        """A copy on ``device`` with inputs cast to ``dtype`` (targets too when they are floating point;
        integer class labels stay integers)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return EvalBatches((move(x), move(y)) for x, y in self._batches)

    @property
    def device(self) -> torch.device:
        """Device of the first batch's inputs."""
        return self._batches[0][0].device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._batches[index]

    def __repr__(self) -> str:
        x = self._batches[0][0]
        return (f"EvalBatches({self.num_samples} samples in {len(self)} batches, x {tuple(x.shape[1:])} "
                f"{x.dtype}, device={str(x.device)!r})")


def eval_batches(dataset: ImageDataset, *, split: str = "train", num_samples: int | None = None,
                 batch_size: int = 512, device: torch.device | str = "cpu") -> EvalBatches:
    """The first ``num_samples`` of ``dataset``'s ``split`` (all when None), normalised, no augmentation, as
    fixed batches of ``batch_size`` on ``device``.

    The stored split order is the fixed order (for the official sets the file order, already shuffled by their
    authors; for ``digits`` the documented seed-0 permutation).
    """
    images, labels = dataset.split(split)
    available = len(labels)
    if num_samples is None:
        num_samples = available
    if not 1 <= num_samples <= available:
        raise SharpscopeError(f"num_samples={num_samples}, but the {split} split of {dataset.name!r} has "
                              f"{available} samples; choose 1..{available}")
    x = normalize(images[:num_samples].to(device), dataset.mean, dataset.std)
    return EvalBatches.from_tensors(x, labels[:num_samples].to(device), batch_size=batch_size)

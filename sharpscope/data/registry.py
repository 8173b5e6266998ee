"""The dataset registry: ``load_dataset(name)``, ``list_datasets()``, ``dataset_info(name)``.

Each format module registers its datasets with :func:`register_dataset`; an entry is a loader function
``(*, data_dir, download) -> ImageDataset`` plus the shape facts (channels, size, classes) that let a model be
built without reading any file.

Your own data need no registration: ``load_dataset("mypkg.data:make_data")`` (``--dataset mypkg.data:make_data``
on the command line, arguments as ``mypkg.data:make_data:size=500``) imports ``make_data`` (also from the
current folder) and calls it with those keyword arguments; it must return an :class:`ImageDataset`, the object
every registered loader returns (uint8 images (N, C, H, W), int64 labels, per-channel mean/std from
:func:`~sharpscope.data.dataset.channel_stats`, an augmentation name). A run trained on it records the spec,
so analyses of its checkpoints load the same data again with no ``--dataset``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass

from sharpscope.data.dataset import AUGMENTATIONS, ImageDataset
from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.specs import call_factory, is_factory_spec, parse_spec

Loader = Callable[..., ImageDataset]


@dataclass(frozen=True)
class DatasetInfo:
    """What a registered dataset is, known without loading it."""

    name: str  # registry name
    in_channels: int  # image channels C
    image_size: int  # image height = width in pixels
    num_classes: int  # number of classes
    augment: str  # standard training augmentation: "none" | "crop" | "crop-flip"
    summary: str  # one line: source, split sizes
    loader: Loader  # (*, data_dir: str | None, download: bool) -> ImageDataset


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str, *, in_channels: int, image_size: int, num_classes: int, augment: str, summary: str
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(*, data_dir, download) -> ImageDataset`` under ``name``."""
    if augment not in AUGMENTATIONS:
        raise SharpscopeError(f"register_dataset({name!r}): augment {augment!r} is not one of {AUGMENTATIONS}")

    def decorate(loader: Loader) -> Loader:
        if name in _DATASETS:
            raise SharpscopeError(f"dataset {name!r} is already registered (by {_DATASETS[name].loader.__module__}); "
                                  "choose another name")
        _DATASETS[name] = DatasetInfo(name, in_channels, image_size, num_classes, augment, summary, loader)
        return loader

    return decorate


def list_datasets(pattern: str | None = None) -> list[str]:
    """Registered dataset names, sorted; ``pattern`` filters them with shell wildcards (``"cifar*"``)."""
    return sorted(n for n in _DATASETS if pattern is None or fnmatch.fnmatchcase(n, pattern))


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (shapes, classes, augmentation) without loading any data.

    For a ``package.module:factory`` spec the facts come from calling the factory (loading the data)."""
    if is_factory_spec(name):
        dataset = _from_factory(name)
        return DatasetInfo(name, dataset.in_channels, dataset.image_size, dataset.num_classes, dataset.augment,
                           f"{dataset!r} from {name}", lambda *, data_dir=None, download=False: _from_factory(name))
    try:
        return _DATASETS[name]
    except KeyError:
        raise unknown_name_error("dataset", name, _DATASETS) from None


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """Load the whole dataset ``name`` into memory (uint8 images, int64 labels, CPU).

    Args:
        name: one of :func:`list_datasets` (digits, synthetic, fashion-mnist, mnist, cifar10, cifar100, svhn),
            or ``package.module:factory[:key=value,...]``: your own function returning an :class:`ImageDataset`
            (``data_dir`` and ``download`` are not passed to it).
        data_dir: folder searched first for the dataset's files (then ``$SHARPSCOPE_DATA``, the user cache
            ``~/.cache/sharpscope/<name>``, and system folders such as ``/usr/share/datasets/fashion-mnist``).
            Ignored by the built-in digits and synthetic sets.
        download: fetch the official files into the user cache when they are not found, verifying checksums.

    Raises:
        SharpscopeError: unknown name; a factory that cannot be imported or returns something other than an
            ImageDataset; files missing (the message says where it looked and how to get them);
            corrupt or truncated files (the message names the file).
    """
    if is_factory_spec(name):
        return _from_factory(name)
    info = dataset_info(name)
    dataset = info.loader(data_dir=data_dir, download=download)
    found = (dataset.in_channels, dataset.image_size, dataset.num_classes)
    if found != (info.in_channels, info.image_size, info.num_classes):
        raise SharpscopeError(
            f"dataset {name!r}: expected {info.in_channels}x{info.image_size}x{info.image_size} images in "
            f"{info.num_classes} classes, the files hold {found[0]}x{found[1]}x{found[1]} in {found[2]}; "
            "are they the right dataset?"
        )
    return dataset


def _from_factory(spec: str) -> ImageDataset:
    """Call the user's dataset factory named by ``spec`` and check it returned an :class:`ImageDataset`."""
    name, kwargs = parse_spec(spec, what="dataset")
    dataset = call_factory(name, kwargs, what="dataset")
    if not isinstance(dataset, ImageDataset):
        raise SharpscopeError(
            f"dataset factory {name!r} returned {type(dataset).__name__}, not a sharpscope.data.ImageDataset; "
            "build one from uint8 images (N, C, H, W), int64 labels and channel_stats(train_images)"
        )
    return dataset

"""Datasets and device-resident loaders (DESIGN.md section 3).

- :func:`load_dataset` / :func:`list_datasets` / :func:`dataset_info`: the registry (digits, synthetic,
  fashion-mnist, mnist, cifar10, cifar100, svhn), each returning an :class:`ImageDataset` of uint8 tensors.
- :class:`DeviceLoader`: training batches gathered, augmented and normalised on the device.
- :class:`EvalBatches` / :func:`eval_batches`: the fixed evaluation set every analysis averages over.
"""

from sharpscope.data.dataset import AUGMENTATIONS, ImageDataset, channel_stats
from sharpscope.data.loader import DeviceLoader, EvalBatches, eval_batches, normalize
from sharpscope.data.registry import DatasetInfo, dataset_info, list_datasets, load_dataset, register_dataset

# Format modules register their datasets on import.
from sharpscope.data import cifar, digits, idx, svhn, synthetic  # noqa: E402,F401  isort: skip
from sharpscope.data.synthetic import make_synthetic  # noqa: E402

__all__ = [
    # registry
    "load_dataset",
    "list_datasets",
    "dataset_info",
    "register_dataset",
    "DatasetInfo",
    "ImageDataset",
    "make_synthetic",
    # loading onto the device
    "DeviceLoader",
    "EvalBatches",
    "eval_batches",
    "normalize",
    "channel_stats",
    "AUGMENTATIONS",
]

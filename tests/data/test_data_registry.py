"""The dataset registry, the built-in digits and synthetic sets, ImageDataset validation and the real Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sharpscope.data import (
    ImageDataset,
    channel_stats,
    dataset_info,
    list_datasets,
    load_dataset,
    make_synthetic,
    register_dataset,
)
from sharpscope.errors import SharpscopeError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_list_and_info():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist", "svhn", "synthetic"]
    assert list_datasets("cifar*") == ["cifar10", "cifar100"]
    info = dataset_info("cifar100")
    assert (info.in_channels, info.image_size, info.num_classes, info.augment) == (3, 32, 100, "crop-flip")
    assert (dataset_info("svhn").augment, dataset_info("fashion-mnist").image_size) == ("crop", 28)


def test_unknown_names():
    with pytest.raises(SharpscopeError, match=r"unknown dataset 'digts'; did you mean 'digits'\?"):
        load_dataset("digts")
    with pytest.raises(SharpscopeError, match=r"unknown dataset 'cifar'; did you mean .*'cifar10'"):
        dataset_info("cifar")


def test_register_refuses_duplicates_and_bad_augment():
    with pytest.raises(SharpscopeError, match=r"dataset 'digits' is already registered"):
        register_dataset("digits", in_channels=1, image_size=8, num_classes=10, augment="none", summary="")(
            lambda **kw: None)
    with pytest.raises(SharpscopeError, match=r"augment 'rotate' is not one of"):
        register_dataset("mine", in_channels=1, image_size=8, num_classes=10, augment="rotate", summary="")


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_builtin_sets_match_their_registry_entry(name):
    ds, info = load_dataset(name), dataset_info(name)
    assert (ds.in_channels, ds.image_size, ds.num_classes, ds.augment) == (
        info.in_channels, info.image_size, info.num_classes, info.augment)


def test_digits_documented_split():
    """Spec (digits.py): uint8 = round(v * 255 / 16); seed-0 default_rng permutation, last 360 are the test split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load_dataset("digits")
    order = np.random.default_rng(0).permutation(1797)
    images = np.rint(raw.images * 255 / 16).astype(np.uint8)
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(ds.test_images[:, 0].numpy(), images[order[-360:]])
    np.testing.assert_array_equal(ds.train_labels.numpy(), raw.target[order[:-360]])
    assert int(ds.train_images.max()) == 255 and int(ds.train_images.min()) == 0
    # mean/std over the train split, float64 numpy ground truth
    pixels = images[order[:-360]] / 255.0
    assert ds.mean == pytest.approx((pixels.mean(),), rel=1e-12)
    assert ds.std == pytest.approx((pixels.std(),), rel=1e-12)


def test_digits_read_without_importing_sklearn_equals_its_loader(monkeypatch):
    """The bundled CSV read directly equals ``sklearn.datasets.load_digits``; so does the fallback through it."""
    import importlib.util

    from sklearn.datasets import load_digits

    from sharpscope.data import digits

    raw = load_digits()
    data, target = digits._read_sklearn_digits()
    np.testing.assert_array_equal(data, raw.data)
    np.testing.assert_array_equal(target, raw.target)
    assert target.dtype == np.int64
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # scikit-learn's files not found
    data, target = digits._read_sklearn_digits()
    np.testing.assert_array_equal(data, raw.data)
    np.testing.assert_array_equal(target, raw.target)


def test_channel_stats_exact():
    images = torch.randint(0, 256, (37, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images, chunk=8)  # several chunks, the last one partial
    ref = images.double().div(255)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-12, atol=0)
    with pytest.raises(SharpscopeError, match=r"channel_stats needs a non-empty uint8"):
        channel_stats(images.float())


def test_synthetic_is_seeded_balanced_and_learnable():
    a, b = make_synthetic(), load_dataset("synthetic")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape == (256, 1, 8, 8) and a.test_images.shape == (128, 1, 8, 8)
    assert torch.bincount(a.train_labels).tolist() == [64] * 4
    assert not torch.equal(make_synthetic(seed=1).train_images, a.train_images)
    # learnable: a nearest-class-mean classifier fitted on train classifies the test split well
    x, xt = a.train_images.flatten(1).double(), a.test_images.flatten(1).double()
    centroids = torch.stack([x[a.train_labels == k].mean(0) for k in range(4)])
    predicted = torch.cdist(xt, centroids).argmin(1)
    assert (predicted == a.test_labels).double().mean() > 0.9


def test_make_synthetic_shapes_and_errors():
    ds = make_synthetic(num_train=10, num_test=5, num_classes=6, channels=3, image_size=32, augment="crop-flip")
    assert (ds.in_channels, ds.image_size, ds.num_classes, len(ds.mean)) == (3, 32, 6, 3)
    with pytest.raises(SharpscopeError, match=r"make_synthetic: expected .* num_classes >= 2"):
        make_synthetic(num_classes=1)


def _dataset(**overrides) -> ImageDataset:
    fields = dict(name="t", train_images=torch.zeros(4, 1, 3, 3, dtype=torch.uint8),
                  train_labels=torch.zeros(4, dtype=torch.int64),
                  test_images=torch.zeros(2, 1, 3, 3, dtype=torch.uint8),
                  test_labels=torch.ones(2, dtype=torch.int64), num_classes=2, mean=(0.5,), std=(0.25,),
                  augment="none")
    return ImageDataset(**{**fields, **overrides})


def test_image_dataset_validation():
    ds = _dataset()
    assert (ds.in_channels, ds.image_size) == (1, 3) and "train=4, test=2" in repr(ds)
    assert ds.split("test")[1].tolist() == [1, 1]
    cases = [
        (dict(train_images=torch.zeros(4, 1, 3, 3)), r"train split: expected uint8 images .* found torch.float32"),
        (dict(test_images=torch.zeros(2, 1, 3, 4, dtype=torch.uint8)),
         r"test split: expected square images, found H x W = 3 x 4"),
        (dict(train_labels=torch.zeros(4, dtype=torch.int32)), r"train split: expected int64 labels of shape \(4,\)"),
        (dict(test_labels=torch.tensor([0, 2])), r"test split: labels span 0..2, expected 0..1 for num_classes=2"),
        (dict(test_images=torch.zeros(2, 3, 3, 3, dtype=torch.uint8)),
         r"train images are \(1, 3, 3\) but test images are \(3, 3, 3\)"),
        (dict(std=(0.0,)), r"expected 1 per-channel mean/std values with std > 0"),
        (dict(mean=(0.1, 0.2)), r"expected 1 per-channel mean/std values"),
        (dict(augment="flip"), r"augment 'flip' is not one of"),
    ]
    for overrides, message in cases:
        with pytest.raises(SharpscopeError, match=message):
            _dataset(**overrides)
    with pytest.raises(SharpscopeError, match=r"unknown split 'val'; expected 'train' or 'test'"):
        ds.split("val")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path, monkeypatch):
    """Found through the default search path (empty cache, no $SHARPSCOPE_DATA) in /usr/share/datasets."""
    monkeypatch.delenv("SHARPSCOPE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    # published Fashion-MNIST statistics: mean 0.2860, std 0.3530 (pixels in [0, 1])
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4) and ds.std[0] == pytest.approx(0.3530, abs=1e-4)

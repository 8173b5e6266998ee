"""DeviceLoader (shuffle, batched augmentation, normalisation, sharding) and EvalBatches, against serial references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sharpscope.data import DeviceLoader, EvalBatches, eval_batches, load_dataset, make_synthetic, normalize
from sharpscope.data.augment import pad_crop_flip, sample_augmentation
from sharpscope.errors import SharpscopeError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def images_uint8(n: int, channels: int = 3, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def loader(n=10, *, channels=3, size=6, **kwargs) -> DeviceLoader:
    """Labels are the sample indices, so each y says which image each x came from."""
    kwargs = {"batch_size": 4, "mean": MEAN[:channels], "std": STD[:channels], **kwargs}
    return DeviceLoader(images_uint8(n, channels, size), torch.arange(n), **kwargs)


def collect(dl: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*dl)
    return torch.cat(xs), torch.cat(ys)


def test_normalize_matches_formula():
    images = images_uint8(5)
    reference = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    out = normalize(images, MEAN, STD)
    assert out.dtype == torch.float32
    # float32 result of a multiply-subtract vs the float64 formula: a few float32 ulps of values up to ~4
    torch.testing.assert_close(out.double(), reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(SharpscopeError, match=r"expected 3 per-channel mean and std values \(std > 0\)"):
        normalize(images, MEAN[:2], STD[:2])
    with pytest.raises(SharpscopeError, match=r"normalize expects images of shape \(N, C, H, W\), found \(3, 6, 6\)"):
        normalize(images[0], MEAN, STD)


def test_sequential_loader_is_the_normalised_split(device):
    dl = loader(10, shuffle=False, device=device)
    assert len(dl) == 3
    sizes = [len(y) for _, y in dl]
    assert sizes == [4, 4, 2]
    x, y = collect(dl)
    assert x.device.type == torch.device(device).type and y.dtype == torch.int64
    assert torch.equal(y.cpu(), torch.arange(10))
    torch.testing.assert_close(x.cpu(), normalize(images_uint8(10), MEAN, STD), rtol=0, atol=0)


def test_shuffle_is_a_permutation_deterministic_per_seed_and_epoch(device):
    a, b = loader(50, device=device), loader(50, device=device)
    a.set_epoch(3)
    b.set_epoch(3)
    xa, ya = collect(a)
    xb, yb = collect(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(ya.tolist()) == list(range(50)) and ya.tolist() != list(range(50))
    assert torch.equal(collect(a)[1], ya), "iterating again without set_epoch replays the epoch"
    a.set_epoch(4)
    assert not torch.equal(collect(a)[1], ya)
    other_seed = loader(50, device=device, seed=1)
    other_seed.set_epoch(3)
    assert not torch.equal(collect(other_seed)[1], ya)


def test_same_batches_on_every_device(device):
    """The epoch plan comes from a CPU generator, so CPU and CUDA loaders agree exactly."""
    on_cpu, here = loader(30, augment="crop-flip"), loader(30, augment="crop-flip", device=device)
    on_cpu.set_epoch(2)
    here.set_epoch(2)
    for (x1, y1), (x2, y2) in zip(on_cpu, here):
        assert torch.equal(y1, y2.cpu())
        torch.testing.assert_close(x1, x2.cpu(), rtol=0, atol=0)


def test_drop_last():
    dl = loader(10, drop_last=True)
    assert len(dl) == 2 and [len(y) for _, y in dl] == [4, 4]


def serial_crop_flip(image: np.ndarray, offset, flip, padding=4) -> np.ndarray:
    """The textbook per-image recipe: zero-pad, slice the window, mirror."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    out = padded[:, offset[0]:offset[0] + h, offset[1]:offset[1] + w] if offset is not None else image
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("augment", ["crop", "crop-flip"])
def test_augmented_batches_match_serial_reference(device, augment):
    dl = loader(13, size=5, augment=augment, device=device, batch_size=5)
    dl.set_epoch(7)
    order, offsets, flips = dl.epoch_plan()
    assert (flips is None) == (augment == "crop")
    images = images_uint8(13, 3, 5).numpy()
    x, y = collect(dl)
    assert torch.equal(y.cpu(), order)
    for position, sample in enumerate(order.tolist()):
        expected = serial_crop_flip(images[sample], offsets[position].tolist(),
                                    flips is not None and bool(flips[position]))
        expected = (expected / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
        # float32 normalisation vs float64 reference (values up to ~4 in size)
        np.testing.assert_allclose(x[position].cpu().double().numpy(), expected, rtol=1e-6, atol=1e-6,
                                   err_msg=f"position {position}, sample {sample}")


def test_augmentation_parameters_are_spread():
    """Offsets cover 0..8 in both axes, flips are about half (seeded: this cannot flake)."""
    offsets, flips = sample_augmentation(4000, "crop-flip", generator=torch.Generator().manual_seed(0))
    assert offsets.min() == 0 and offsets.max() == 8
    assert torch.bincount(offsets.flatten(), minlength=9).min() > 700  # ~889 expected per value
    assert 0.45 < flips.double().mean() < 0.55
    assert sample_augmentation(5, "none", generator=torch.Generator()) == (None, None)
    with pytest.raises(SharpscopeError, match=r"unknown augmentation 'crop_flip'; did you mean 'crop-flip'"):
        sample_augmentation(5, "crop_flip", generator=torch.Generator())


def test_pad_crop_flip_identity_cases():
    images = images_uint8(4)
    centre = torch.full((4, 2), 4)
    assert torch.equal(pad_crop_flip(images, offsets=centre, flips=None), images)
    assert torch.equal(pad_crop_flip(images, offsets=None, flips=torch.ones(4, dtype=torch.bool)), images.flip(3))
    assert pad_crop_flip(images, offsets=None, flips=None) is images
    corner = pad_crop_flip(images, offsets=torch.zeros(4, 2, dtype=torch.long), flips=None)
    assert torch.equal(corner[:, :, 4:, 4:], images[:, :, :2, :2]) and not corner[:, :, :4].any()


def test_channels_last(device):
    plain, last = loader(8, shuffle=False, device=device), loader(8, shuffle=False, device=device, channels_last=True)
    for (x1, _), (x2, _) in zip(plain, last):
        assert x2.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x1, x2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_over_ranks(drop_last):
    ranks = [loader(10, num_replicas=3, rank=r, drop_last=drop_last, batch_size=3) for r in range(3)]
    for dl in ranks:
        dl.set_epoch(1)
    shards = [collect(dl)[1].tolist() for dl in ranks]
    per_rank = 3 if drop_last else 4
    assert all(len(s) == per_rank for s in shards) and all(len(dl) == (1 if drop_last else 2) for dl in ranks)
    everything = sum(shards, [])
    if drop_last:
        assert len(set(everything)) == 9  # disjoint, one sample dropped
    else:
        assert set(everything) == set(range(10))  # all covered, two wrapped duplicates


def test_device_loader_errors():
    images, labels = images_uint8(10), torch.arange(10)
    kw = dict(batch_size=4, mean=MEAN, std=STD)
    cases = [
        ((images.float(), labels), kw, r"expects uint8 images \(N, C, H, W\), found torch.float32"),
        ((images, labels[:9]), kw, r"one label per image .* found 10 images and labels of shape \(9,\)"),
        ((images, labels), {**kw, "augment": "flip"}, r"unknown augmentation 'flip'"),
        ((images, labels), {**kw, "batch_size": 0}, r"expects batch_size >= 1.*found batch_size=0"),
        ((images, labels), {**kw, "num_replicas": 2, "rank": 2}, r"0 <= rank < num_replicas.*rank=2"),
        ((images, labels), {**kw, "batch_size": 11, "drop_last": True},
         r"batch_size=11 with drop_last leaves no batch"),
        ((images, labels), {**kw, "std": (1.0, 0.0, 1.0)}, r"expected 3 per-channel mean and std values \(std > 0\)"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(SharpscopeError, match=message):
            DeviceLoader(*args, **kwargs)
    with pytest.raises(SharpscopeError, match=r"set_epoch expects epoch >= 0, found -1"):
        DeviceLoader(images, labels, **kw).set_epoch(-1)


def test_eval_batches_from_tensors():
    x, y = torch.randn(10, 3), torch.arange(10)
    eb = EvalBatches.from_tensors(x, y, batch_size=4)
    assert (len(eb), eb.num_samples, [len(b[1]) for b in eb]) == (3, 10, [4, 4, 2])
    first, second = list(eb), list(eb)
    assert all(a[0] is b[0] for a, b in zip(first, second)), "every pass yields the same stored batches"
    assert torch.equal(torch.cat([b[0] for b in eb]), x) and eb[2][1].tolist() == [8, 9]
    as64 = eb.to(dtype=torch.float64)
    assert as64[0][0].dtype == torch.float64 and as64[0][1].dtype == torch.int64 and as64.num_samples == 10
    regression = EvalBatches.from_tensors(x, torch.randn(10), batch_size=5).to(dtype=torch.float64)
    assert regression[0][1].dtype == torch.float64
    assert "10 samples in 3 batches" in repr(eb) and eb.device == torch.device("cpu")


def test_eval_batches_errors():
    with pytest.raises(SharpscopeError, match=r"needs at least one \(x, y\) batch"):
        EvalBatches([])
    with pytest.raises(SharpscopeError, match=r"batch 1: x has 2 samples and y 3"):
        EvalBatches([(torch.zeros(2), torch.zeros(2)), (torch.zeros(2), torch.zeros(3))])
    with pytest.raises(SharpscopeError, match=r"expects batch_size >= 1, found 0"):
        EvalBatches.from_tensors(torch.zeros(3), torch.zeros(3), batch_size=0)
    with pytest.raises(SharpscopeError, match=r"x has 3 samples but y has 2"):
        EvalBatches.from_tensors(torch.zeros(3), torch.zeros(2), batch_size=2)


def test_eval_batches_of_a_dataset(device):
    ds = make_synthetic()
    eb = eval_batches(ds, split="test", num_samples=100, batch_size=32, device=device)
    assert [len(y) for _, y in eb] == [32, 32, 32, 4] and eb.num_samples == 100
    assert eb.device.type == torch.device(device).type
    x = torch.cat([b[0] for b in eb]).cpu()
    torch.testing.assert_close(x, normalize(ds.test_images[:100], ds.mean, ds.std), rtol=0, atol=0)
    assert torch.equal(torch.cat([b[1] for b in eb]).cpu(), ds.test_labels[:100])
    assert eval_batches(ds).num_samples == 256  # the whole train split by default
    with pytest.raises(SharpscopeError, match=r"num_samples=300, but the train split of 'synthetic' has 256 samples"):
        eval_batches(ds, num_samples=300)
    with pytest.raises(SharpscopeError, match=r"unknown split 'val'"):
        eval_batches(ds, split="val")


def test_loader_trains_a_model_on_synthetic():
    """End to end: the loader's batches are learnable (a linear model beats chance by far in 3 epochs)."""
    torch.manual_seed(0)
    ds = load_dataset("synthetic")
    dl = DeviceLoader(ds.train_images, ds.train_labels, batch_size=32, mean=ds.mean, std=ds.std, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        dl.set_epoch(epoch)
        for x, y in dl:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    test = eval_batches(ds, split="test")
    accuracy = sum((model(x).argmax(1) == y).sum() for x, y in test) / test.num_samples
    assert accuracy > 0.9

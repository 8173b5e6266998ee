"""Readers of the on-disk formats, on small files written here in the real formats, plus corrupt variants.

IDX (MNIST / Fashion-MNIST) with the real magic numbers, gzip or raw; CIFAR batches pickled like the official
ones (dicts with bytes keys b"data", b"labels"), as a folder or a .tar.gz; SVHN .mat files via scipy.io.savemat.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from sharpscope.data import load_dataset
from sharpscope.data.cifar import read_cifar_batch
from sharpscope.data.files import missing_files_error
from sharpscope.data.idx import read_idx
from sharpscope.data.svhn import read_svhn_mat
from sharpscope.errors import SharpscopeError


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path, monkeypatch):
    """No $SHARPSCOPE_DATA, and a user cache inside tmp_path, so only the files written here are found."""
    monkeypatch.delenv("SHARPSCOPE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------- IDX
def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding: 00 00 08 ndim, big-endian uint32 sizes, the uint8 data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_set(folder: Path, *, n_train=20, n_test=10, size=28, gz=True, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_dataset_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "d", gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path / "d")
    assert ds.train_images.shape == (20, 1, 28, 28) and ds.test_images.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_labels.dtype == torch.int64 and ds.augment == "none"
    # mean/std come from the train split (ground truth: numpy float64 over the written pixels)
    pixels = arrays["train-images-idx3-ubyte"] / 255.0
    assert ds.mean[0] == pytest.approx(pixels.mean(), rel=1e-12)
    assert ds.std[0] == pytest.approx(pixels.std(), rel=1e-12)


def test_idx_search_order(tmp_path, monkeypatch):
    """data_dir beats $SHARPSCOPE_DATA/<name>, which beats the user cache."""
    cache = write_idx_set(tmp_path / "cache" / "sharpscope" / "mnist", seed=1)
    assert torch.equal(load_dataset("mnist").train_labels, torch.from_numpy(cache["train-labels-idx1-ubyte"]).long())
    env = write_idx_set(tmp_path / "env" / "mnist", seed=2)
    monkeypatch.setenv("SHARPSCOPE_DATA", str(tmp_path / "env"))
    assert torch.equal(load_dataset("mnist").train_labels, torch.from_numpy(env["train-labels-idx1-ubyte"]).long())
    direct = write_idx_set(tmp_path / "direct", seed=3)
    got = load_dataset("mnist", data_dir=tmp_path / "direct").train_labels
    assert torch.equal(got, torch.from_numpy(direct["train-labels-idx1-ubyte"]).long())


def test_idx_torchvision_layout(tmp_path):
    written = write_idx_set(tmp_path / "MNIST" / "raw", gz=False)
    labels = load_dataset("mnist", data_dir=tmp_path).test_labels
    assert labels.tolist() == written["t10k-labels-idx1-ubyte"].tolist()


def test_missing_files_message_names_the_apt_package():
    error = missing_files_error("fashion-mnist", "train-images-idx3-ubyte[.gz]", [Path("/nowhere")],
                                apt_package="dataset-fashion-mnist")
    assert "\n" not in str(error)
    with pytest.raises(SharpscopeError, match=r"'fashion-mnist': train-images-idx3-ubyte\[\.gz\] not found; looked in "
                                              r"/nowhere\. To get them: `apt-get install dataset-fashion-mnist`, "
                                              r"run `sharpscope train --dataset fashion-mnist --download` "
                                              r"\(download=True in Python\)"):
        raise error


def test_idx_missing_files_message(tmp_path):
    incomplete = tmp_path / "incomplete"
    write_idx_set(incomplete)
    (incomplete / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SharpscopeError, match=r"'mnist': train-images-idx3-ubyte\[\.gz\].* not found; looked in "
                       rf"{incomplete}, .*download=True.*put them in {tmp_path / 'cache' / 'sharpscope' / 'mnist'}"):
        load_dataset("mnist", data_dir=incomplete)


def test_idx_wrong_image_size_is_refused(tmp_path):
    write_idx_set(tmp_path / "d", size=8)
    with pytest.raises(SharpscopeError, match=r"expected 1x28x28 images in 10 classes, the files hold 1x8x8"):
        load_dataset("mnist", data_dir=tmp_path / "d")


def test_read_idx_corrupt_files(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    cases = {
        "truncated.gz": (gzip.compress(good)[:-20], r"truncated.gz: cannot read or decompress"),
        "truncated": (good[:-5], r"truncated: 2363 bytes but its header promises 2368 for shape \(3, 28, 28\)"),
        "labels-as-images": (idx_bytes(np.zeros(3, np.uint8)),
                             r"labels-as-images: magic number 00000801 is not 00000803"),
        "empty": (b"", r"empty: magic number \(empty file\)"),
        "header-only": (bytes([0, 0, 8, 3, 0, 0]), r"header-only: truncated header \(6 bytes, expected at least 16\)"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SharpscopeError, match=message):
            read_idx(tmp_path / name, ndim=3)


def test_idx_inconsistent_pair(tmp_path):
    folder = tmp_path / "d"
    write_idx_set(folder)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(19, np.uint8))))
    with pytest.raises(SharpscopeError, match=r"holds 20 images but .*train-labels-idx1-ubyte.gz holds 19 labels"):
        load_dataset("mnist", data_dir=folder)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(20, 10, np.uint8))))
    with pytest.raises(SharpscopeError, match=r"train-labels-idx1-ubyte.gz: label 10 is out of range for 10 classes"):
        load_dataset("mnist", data_dir=folder)


# -------------------------------------------------------------------------------------------------- CIFAR
def cifar_batch(n: int, *, num_classes: int = 10, label_key: bytes = b"labels", seed: int = 0) -> dict:
    """A dict shaped like an official batch: uint8 (n, 3072) data, a list of int labels, bytes keys."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar10(root: Path, *, protocol: int = 2, per_batch: int = 3) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(per_batch, seed=i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(per_batch, seed=9)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_folder(tmp_path, protocol):
    batches = write_cifar10(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.augment == "crop-flip" and ds.num_classes == 10
    first = batches["data_batch_1"][b"data"][0]
    # row-major planes: the first 1024 values are the red channel, pixel (0, 1) is value 1
    np.testing.assert_array_equal(ds.train_images[0, 0].flatten().numpy(), first[:1024])
    assert int(ds.train_images[0, 2, 0, 1]) == first[2048 + 1]
    assert ds.train_labels[3:6].tolist() == batches["data_batch_2"][b"labels"]
    assert ds.test_labels.tolist() == batches["test_batch"][b"labels"]


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the official files were (Python 2 cPickle, protocol 2, numpy 1.x): strings are
    py2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING) and the array names ``numpy.core.multiarray._reconstruct``.
    Python 3's pickler cannot write these opcodes, so the stream is assembled by hand."""
    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def int32(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    # dtype('u1') with state (3, '|', None, None, None, -1, -1, 0)
    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"\x89\x88\x87R"
             + b"(K\x03" + string(b"|") + b"NNN" + int32(-1) + int32(-1) + b"K\x00tb")
    # _reconstruct(ndarray, (0,), 'b') then state (1, shape, dtype, fortran=False, raw bytes)
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + string(b"b")
             + b"\x87R(K\x01" + int32(data.shape[0]) + int32(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + string(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


def test_cifar_batch_written_by_python2():
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    images, labels = read_cifar_batch(py2_cifar_pickle(data, [7, 0, 9]), source="py2", label_key=b"labels")
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [7, 0, 9]
    np.testing.assert_array_equal(images.reshape(3, -1), data)


def test_cifar100_from_archive(tmp_path):
    """The official .tar.gz is read directly; cifar-100 uses the 100 fine labels."""
    train = cifar_batch(4, num_classes=100, label_key=b"fine_labels", seed=1)
    test = cifar_batch(2, num_classes=100, label_key=b"fine_labels", seed=2)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, batch in (("train", train), ("test", test), ("meta", {b"x": 1})):
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.train_labels.tolist() == train[b"fine_labels"] and ds.num_classes == 100
    np.testing.assert_array_equal(ds.test_images.reshape(2, -1).numpy(), test[b"data"])


def test_cifar_archive_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(SharpscopeError, match=r"cifar-10-python.tar.gz: cannot read the archive"):
        load_dataset("cifar10", data_dir=tmp_path / "bad")
    (tmp_path / "partial").mkdir()
    with tarfile.open(tmp_path / "partial" / "cifar-10-python.tar.gz", "w:gz") as tar:
        data = pickle.dumps(cifar_batch(2), protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SharpscopeError, match=r"the archive lacks cifar-10-batches-py/data_batch_2, .*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "partial")


class _Payload:
    """Pickles as a call to builtins.open(path, "w"), which would create ``path`` if it were executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_batch_corrupt_and_unsafe(tmp_path):
    good = pickle.dumps(cifar_batch(2), protocol=2)
    with pytest.raises(SharpscopeError, match=r"batch_x: not a readable CIFAR batch"):
        read_cifar_batch(good[: len(good) // 2], source="batch_x", label_key=b"labels")
    target = tmp_path / "created-by-pickle"
    evil = pickle.dumps({b"data": _Payload(str(target)), b"labels": []}, protocol=2)
    with pytest.raises(SharpscopeError,
                       match=r"evil: not a readable CIFAR batch .*refusing to load (builtins|io)\.open"):
        read_cifar_batch(evil, source="evil", label_key=b"labels")
    assert not target.exists(), "the unpickler ran a callable from the file"
    with pytest.raises(SharpscopeError, match=r"x: expected a pickled dict, found list"):
        read_cifar_batch(pickle.dumps([1, 2]), source="x", label_key=b"labels")
    no_data = pickle.dumps({b"labels": [1]})
    with pytest.raises(SharpscopeError, match=r"x: expected b'data' as a uint8 \(N, 3072\) array, found NoneType"):
        read_cifar_batch(no_data, source="x", label_key=b"labels")
    short_labels = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]})
    with pytest.raises(SharpscopeError, match=r"x: expected 2 labels under b'labels', found shape \(1,\)"):
        read_cifar_batch(short_labels, source="x", label_key=b"labels")


def test_cifar_missing_message(tmp_path):
    with pytest.raises(SharpscopeError, match=r"'cifar10': cifar-10-batches-py/ \(data_batch_1, .*test_batch\) or "
                                              r"cifar-10-python.tar.gz not found; looked in"):
        load_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------- SVHN
def write_svhn(folder: Path, *, n_train=5, n_test=3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0] = 10  # the digit 0
        scipy.io.savemat(folder / name, {"X": x, "y": y})
        written[name] = (x, y)
    return written


def test_svhn_round_trip(tmp_path):
    written = write_svhn(tmp_path / "svhn")
    ds = load_dataset("svhn", data_dir=tmp_path)  # found in data_dir/<name>
    x, y = written["train_32x32.mat"]
    assert ds.train_images.shape == (5, 3, 32, 32) and ds.augment == "crop"
    # X[h, w, c, n] -> images[n, c, h, w]
    assert int(ds.train_images[2, 1, 5, 7]) == x[5, 7, 1, 2]
    expected = y[:, 0].astype(np.int64)
    expected[expected == 10] = 0
    assert ds.train_labels.tolist() == expected.tolist() and ds.train_labels[0] == 0


def test_svhn_bad_files(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 20)
    with pytest.raises(SharpscopeError, match=r"junk.mat: not a readable MATLAB file"):
        read_svhn_mat(tmp_path / "junk.mat")
    scipy.io.savemat(tmp_path / "shape.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(SharpscopeError,
                       match=r"shape.mat: expected X as uint8 \(32, 32, 3, N\), found uint8 \(28, 28, 1, 2\)"):
        read_svhn_mat(tmp_path / "shape.mat")
    scipy.io.savemat(tmp_path / "count.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(SharpscopeError, match=r"count.mat: expected y with 2 labels, found \(3, 1\)"):
        read_svhn_mat(tmp_path / "count.mat")
    scipy.io.savemat(tmp_path / "range.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [11]])})
    with pytest.raises(SharpscopeError, match=r"range.mat: labels span 0..11, expected 1..10"):
        read_svhn_mat(tmp_path / "range.mat")
    with pytest.raises(SharpscopeError, match=r"'svhn': train_32x32.mat and test_32x32.mat not found"):
        load_dataset("svhn", data_dir=tmp_path)


def test_user_home_expanded(tmp_path, monkeypatch):
    """``~`` in data_dir / $SHARPSCOPE_DATA means the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_svhn(tmp_path / "sets")
    monkeypatch.setenv("SHARPSCOPE_DATA", "~/sets")
    assert len(load_dataset("svhn").test_labels) == 3
    assert os.environ["SHARPSCOPE_DATA"] == "~/sets"

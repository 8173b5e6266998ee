"""Training throughput (samples/s), data pipeline included: sharpscope's trainer path vs a plain PyTorch loop.

Both train ``resnet20`` on CIFAR-sized data (3x32x32, 10 classes, pad-4 random crop + horizontal flip, per-channel
normalisation), SGD with momentum, batch 128:

* **plain loop** — the usual script: uint8 images in a ``torch.utils.data.TensorDataset`` behind a
  ``DataLoader`` (shuffle, ``num_workers``, ``pin_memory`` on CUDA), per-sample ``RandomCrop`` / flip in the worker
  processes (written with torch ops, torchvision is not a dependency), ``.to(device, non_blocking=True)``,
  normalise, forward, ``loss.backward()``, ``optimizer.step()``; ``loss.item()`` every step for the log line;
* **sharpscope SGD / SAM** — what ``sharpscope train`` runs per step: ``DeviceLoader`` (data resident on the
  device, batched augmentation there) and ``training_step`` (SAM: two passes, BN statistics frozen on the second),
  with the trainer's precision policy (``--precision auto``: bf16 autocast and channels-last on CUDA, fp32 on CPU).

The data are CIFAR-10's train split when ``--data-dir`` holds it (``cifar-10-batches-py``), else a seeded random
stand-in of the same shape (throughput does not depend on pixel values). Each column runs ``--warmup`` steps, then
is timed over ``--steps`` steps (device synchronised), in ``--rounds`` interleaved rounds; the table gives the
median samples/s and its ratio to the plain loop measured in the same run.

    python benchmarks/bench_train_throughput.py                         # CPU, ~3 minutes on 2 cores
    python benchmarks/bench_train_throughput.py --device cuda --steps 200 --rounds 5 --workers 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from sharpscope.data import DeviceLoader
from sharpscope.models import create_model
from sharpscope.optim import create_optimizer, training_step

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
HP = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def load_images(data_dir: str | None, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """uint8 (N, 3, 32, 32) images and int64 labels: CIFAR-10 if found, else a seeded random stand-in."""
    if data_dir:
        try:
            from sharpscope.data import load_dataset

            data = load_dataset("cifar10", data_dir=data_dir)
            return data.train_images[:num_samples], data.train_labels[:num_samples], "CIFAR-10 train split"
        except Exception as exc:  # a benchmark falls back and says so
            print(f"(CIFAR-10 not loaded from {data_dir}: {exc}; using random images)")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_samples, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (num_samples,), generator=generator)
    return images, labels, "random uint8 images of CIFAR-10's shape"


class _AugmentedCifar(torch.utils.data.Dataset):
    """Per-sample pad-4 random crop and horizontal flip, as torchvision's RandomCrop(32, 4) + RandomHorizontalFlip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = nn.functional.pad(self.images[index], (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        image = image[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


def plain_loop(model: nn.Module, images, labels, *, batch_size: int, device: torch.device,
               workers: int) -> Iterator[None]:
    """The textbook loop, one step per ``next()``."""
    loader = torch.utils.data.DataLoader(_AugmentedCifar(images, labels), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), **HP)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    while True:
        for x, y in loader:
            x = (x.to(device, non_blocking=True).float() / 255 - mean) / std
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            loss.item()  # the usual per-step log line
            yield


def sharpscope_loop(model: nn.Module, images, labels, *, batch_size: int, device: torch.device,
                    optimizer_name: str) -> Iterator[None]:
    """The trainer's hot path: DeviceLoader + training_step, with its default precision policy."""
    cuda = device.type == "cuda"
    loader = DeviceLoader(images, labels, batch_size=batch_size, mean=CIFAR_MEAN, std=CIFAR_STD, shuffle=True,
                          augment="crop-flip", drop_last=True, device=device, seed=0, channels_last=cuda)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model.parameters(), name=optimizer_name, base="sgd", rho=0.05, **HP)
    loss_fn = nn.CrossEntropyLoss()
    autocast_dtype = torch.bfloat16 if cuda else None
    model.train()
    epoch = 0
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        for x, y in loader:
            training_step(model, optimizer, loss_fn, x, y, autocast_dtype=autocast_dtype)
            yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(columns: dict[str, Iterator[None]], *, steps: int, warmup: int, rounds: int, batch_size: int,
                 device: torch.device) -> dict[str, list[float]]:
    """samples/s of each column per round; columns alternate within a round so machine drift hits them alike."""
    for step in columns.values():
        for _ in range(warmup):
            next(step)
    rates: dict[str, list[float]] = {name: [] for name in columns}
    for _ in range(rounds):
        for name, step in columns.items():
            _sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                next(step)
            _sync(device)
            rates[name].append(steps * batch_size / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per column and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the plain loop")
    parser.add_argument("--num-samples", type=int, default=5000, help="training images held (50000 for all)")
    parser.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, labels, source = load_images(args.data_dir, args.num_samples)
    torch.manual_seed(0)
    model = create_model(args.model, in_channels=3, num_classes=10, image_size=32).to(device)
    builders: dict[str, Callable[[], Iterator[None]]] = {
        "plain PyTorch loop (DataLoader), SGD": lambda: plain_loop(
            copy.deepcopy(model), images, labels, batch_size=args.batch_size, device=device, workers=args.workers),
        "sharpscope SGD": lambda: sharpscope_loop(
            copy.deepcopy(model), images, labels, batch_size=args.batch_size, device=device, optimizer_name="sgd"),
        "sharpscope SAM": lambda: sharpscope_loop(
            copy.deepcopy(model), images, labels, batch_size=args.batch_size, device=device, optimizer_name="sam"),
    }
    columns = {name: build() for name, build in builders.items()}
    rates = timed_rounds(columns, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                         batch_size=args.batch_size, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch_size}, {source}, {name}, torch {torch.__version__}; "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| loop | samples/s | x plain loop |")
    print("|---|---:|---:|")
    reference = statistics.median(rates["plain PyTorch loop (DataLoader), SGD"])
    for column, values in rates.items():
        median = statistics.median(values)
        print(f"| {column} | {median:.0f} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()

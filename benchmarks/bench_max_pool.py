"""Time sharpscope's CPU max pooling (:mod:`sharpscope.max_pool`) against torch's own, kernel by kernel and in use.

1. The kernel: ``F.max_pool2d(x, 2)`` against :func:`sharpscope.max_pool.max_pool2d` on ConvNet-sized inputs, forward
   alone (no_grad) and forward + backward, with the values and gradients checked equal (``torch.equal``).
2. In use: an eval forward of the registry ConvNet (what a loss-surface point runs) and SGD / SAM training steps
   (``training_step``), each with the pools swapped in as the library does and with them pinned to torch's
   function, in interleaved rounds (a block of calls of each column, then again), medians over the rounds.

    python benchmarks/bench_max_pool.py                  # 1 thread, about a minute
    python benchmarks/bench_max_pool.py --threads 2      # the trainer's default on this machine

Measured 2026-12-06 night (this machine, idle; medians in ms, torch -> ours; one run at each thread count):

    kernel, forward + backward   1 thread        2 threads
    16 x 32 x 8 x 8              0.22 -> 0.20    0.13 -> 0.21 (not used: BACKWARD_MIN_ELEMENTS_PER_THREAD)
    128 x 64 x 4 x 4             0.91 -> 0.64    0.45 -> 0.49 (not used)
    128 x 32 x 8 x 8             1.79 -> 1.18    0.96 -> 0.83
    128 x 32 x 28 x 28           21.0 -> 12.8    9.45 -> 7.58

    in use, batch 128            1 thread        2 threads
    eval forward 8x8 / 28x28     0.54x / 0.51x   0.70x / 0.54x
    SGD step 8x8 / 28x28         0.89x / 0.90x   0.99x / 0.94x
    SAM step 8x8 / 28x28         0.88x / 0.99x   0.98x / 0.93x

The README's Speed section has the forwards and steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.max_pool import fast_max_pools, max_pool2d, pays, torch_max_pools
from sharpscope.models import create_model
from sharpscope.optim import create_optimizer, training_step

SHAPES = [(16, 32, 8, 8), (128, 32, 8, 8), (128, 64, 4, 4), (128, 32, 28, 28), (128, 64, 14, 14)]
HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05}


def median_ms(fn: Callable[[], object], *, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernel_row(shape: tuple[int, ...], repeats: int) -> list[float]:
    """Forward (torch, ours) and forward + backward (torch, ours) medians in ms, after an exactness check."""
    x = torch.randn(shape).relu().requires_grad_()  # ReLU'd: many tied windows, as in a ConvNet
    g = torch.randn(F.max_pool2d(x, 2).shape)
    ours, theirs = max_pool2d(x, 2), F.max_pool2d(x, 2)
    if not (torch.equal(ours, theirs) and torch.equal(torch.autograd.grad(ours, x, g)[0],
                                                       torch.autograd.grad(theirs, x, g)[0])):
        raise SystemExit(f"{shape}: the kernel differs from torch's")
    plain = x.detach()
    return [median_ms(lambda: F.max_pool2d(plain, 2), repeats=repeats),
            median_ms(lambda: max_pool2d(plain, 2), repeats=repeats),
            median_ms(lambda: torch.autograd.grad(F.max_pool2d(x, 2), x, g), repeats=repeats),
            median_ms(lambda: torch.autograd.grad(max_pool2d(x, 2), x, g), repeats=repeats)]


def bench_kernel(repeats: int) -> None:
    print(f"\n1. the kernel (median of {repeats}; 'used' says whether fast_max_pools picks it with a backward here)")
    print(f"  {'input':<20}{'fwd torch':>11}{'fwd ours':>10}{'fwd+bwd torch':>15}{'fwd+bwd ours':>14}{'used':>6}")
    for shape in SHAPES:
        row = kernel_row(shape, repeats)
        used = "yes" if pays(torch.empty(shape, requires_grad=True)) else "no"
        label = "x".join(map(str, shape))
        print(f"  {label:<20}{row[0]:>11.3f}{row[1]:>10.3f}{row[2]:>15.3f}{row[3]:>14.3f}{used:>6}")


def use_columns(image: int, batch: int) -> dict[str, tuple[Callable, Callable]]:
    """(torch's pooling, ours) callables for an eval forward and SGD / SAM steps of the ConvNet on ``image`` pixels."""
    torch.manual_seed(0)
    model = create_model("convnet", in_channels=1, num_classes=10, image_size=image)
    x, y = torch.randn(batch, 1, image, image), torch.randint(0, 10, (batch,))
    evaluated = copy.deepcopy(model).eval()

    def forward(pin: bool) -> None:
        with torch.no_grad(), (torch_max_pools(evaluated) if pin else fast_max_pools(evaluated)):
            evaluated(x)

    def step_fn(name: str, pin: bool) -> Callable[[], None]:
        net = copy.deepcopy(model).train()
        opt = create_optimizer(net.parameters(), name=name, base="sgd", **HP)

        def step() -> None:
            with torch_max_pools(net) if pin else contextlib.nullcontext():  # training_step swaps ours in itself
                training_step(net, opt, nn.CrossEntropyLoss(), x, y)
        return step

    columns = {f"eval forward, {image}x{image}, {batch} samples": (lambda: forward(True), lambda: forward(False))}
    for name in ("sgd", "sam"):
        columns[f"{name} step, {image}x{image}, batch {batch}"] = (step_fn(name, True), step_fn(name, False))
    return columns


def bench_use(rounds: int) -> None:
    print(f"\n2. in use (median over {rounds} interleaved rounds, ms; ours = as the library runs, torch = pinned)")
    print(f"  {'config':<44}{'torch':>9}{'ours':>9}{'ratio':>7}")
    for image, batch in ((8, 128), (28, 128)):
        columns = use_columns(image, batch)
        calls = 10 if image == 8 else 2
        times: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in columns}
        for fns in columns.values():
            for fn in fns:
                fn()
        for _ in range(rounds):
            for key, fns in columns.items():
                for which, fn in enumerate(fns):
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    times[key][which].append((time.perf_counter() - start) / calls)
        for key, (theirs, ours) in times.items():
            a, b = statistics.median(theirs) * 1e3, statistics.median(ours) * 1e3
            print(f"  {key:<44}{a:>9.2f}{b:>9.2f}{b / a:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per kernel measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the in-use columns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s)")
    bench_kernel(args.repeats)
    bench_use(args.rounds)


if __name__ == "__main__":
    main()

"""Time one training step: SGD vs SAM vs m-SAM (batched or looped micro-batches) vs SAM every 2 vs pytorch-optimizer.

Every column except pytorch-optimizer's runs ``sharpscope.optim.training_step`` (the trainer's hot path) on fixed
random data held on the device, so only the optimizer's work differs. Columns are timed in interleaved rounds (a
block of consecutive steps of sgd, of sam, ..., then again) so drift on a shared machine hits them alike; a block
runs one column for about ``--block-ms`` (at least 2 steps: the digits configs run 10-30 steps a block, as a
training run does, the large ones 2); the table gives the median over rounds of the mean step time in a block, and
its ratio to our SGD step measured in the same run.

    python benchmarks/bench_sam_step.py                       # every config, CPU, a few minutes on 2 cores
    python benchmarks/bench_sam_step.py --rounds 10 --device cuda --models resnet20
    python benchmarks/bench_sam_step.py --models digits-b16,digits-b128    # the m-SAM targets only

m-SAM runs with each config's ``m``: "m-sam" is the micro-batches as one pass through the network's own layers
(:mod:`sharpscope.optim.micro_batches`, ``vectorize=True``), "m-sam vmap" the batched path of models it cannot run
(``torch.func.vmap`` over the micro-batches; forced here), "m-sam loop" is ``vectorize=False`` (one micro-batch after
the other, the reference); the last column of those rows is the cost relative to the loop. A line under each table
says which of them ``training_step``'s default takes at that size (on the CPU the loop, above
``LOOP_FROM_ELEMENTS`` input elements per micro-batch).

Measured 2026-12-07 (``--models digits-b16,digits-b128 --rounds 8``, 1 thread, five runs: the range), step time x
SGD on a loaded host (SGD 2.1-3.2 and 7.1-8.6 ms; 1.75 idle), freed CPU memory retained as ``sharpscope train`` does:

    config (digits ConvNet)   SAM         m-SAM (layers)   m-SAM vmap   m-SAM loop   pytorch-optimizer SAM
    batch 16, m = 4           1.94-2.33   2.09-2.97        3.69-5.39    3.93-5.26    1.68-2.16
    batch 128, m = 8          1.95-2.10   2.11-2.24        4.09-4.22    6.72-8.25    2.23-2.34

Batch 16 meets its 2.5x goal on a quiet host (2.38, SGD 1.75 ms) and misses it under load (median 2.71 above): the
m-SAM step, which runs the most operations, moves most with the load. Its passes run on a tape for chain models
(:mod:`sharpscope.optim.tape`), 3-4.5% faster than on autograd's graph (README, Speed).

pytorch-optimizer (optional ``bench`` extra) is timed as its docs use it: first_step / second_step with its
``disable_running_stats`` / ``enable_running_stats`` BatchNorm helpers.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from sharpscope.cpu_memory import retain_freed_memory
from sharpscope.models import create_model
from sharpscope.optim import create_optimizer, micro_batches, training_step
from sharpscope.optim.step import LOOP_FROM_ELEMENTS, loop_is_faster

HP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05}  # the anchor study's settings (sam.md s.9)
CONFIGS = {
    # name: (registry model, model kwargs, batch size, m of m-SAM)
    "digits-b16": ("convnet", {"in_channels": 1, "num_classes": 10, "image_size": 8}, 16, 4),
    "digits-b128": ("convnet", {"in_channels": 1, "num_classes": 10, "image_size": 8}, 128, 8),
    "convnet": ("convnet", {"in_channels": 1, "num_classes": 10, "image_size": 28}, 128, 32),
    "resnet20": ("resnet20", {"in_channels": 3, "num_classes": 10, "image_size": 32}, 64, 16),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model: nn.Module, m: int) -> dict[str, Callable | str]:
    """One step function per column (each with its own copy of the model), or a string saying why it is absent."""
    loss_fn = nn.CrossEntropyLoss()
    steps: dict[str, Callable | str] = {}

    def ours(name: str, *, force_vmap: bool = False, **step_kwargs):
        net = copy.deepcopy(model)
        if force_vmap:  # the previous batched path: vmap of functional_call over the micro-batches
            micro_batches.refuse(net, "the benchmark's vmap column")
        extra = {"sam_every": step_kwargs.pop("sam_every")} if "sam_every" in step_kwargs else {}
        opt = create_optimizer(net.parameters(), name=name, base="sgd", **HP, **extra)
        return lambda x, y: training_step(net, opt, loss_fn, x, y, **step_kwargs)

    steps["sgd"] = ours("sgd")
    steps["sam"] = ours("sam")
    steps[f"m-sam m={m}"] = ours("sam", micro_batch_size=m, vectorize=True)  # through the layers, at any size
    steps[f"m-sam m={m} vmap"] = ours("sam", micro_batch_size=m, force_vmap=True, vectorize=True)
    steps[f"m-sam m={m} loop"] = ours("sam", micro_batch_size=m, vectorize=False)
    steps["sam every 2"] = ours("sam", sam_every=2)
    try:
        from pytorch_optimizer import SAM as PtoSAM
        from pytorch_optimizer.optimizer.utils import disable_running_stats, enable_running_stats
    except ImportError:
        steps["pytorch-optimizer sam"] = "not installed (pip install -e '.[bench]')"
    else:
        net = copy.deepcopy(model)
        opt = PtoSAM(net.parameters(), torch.optim.SGD, rho=HP["rho"], lr=HP["lr"], momentum=HP["momentum"],
                     weight_decay=HP["weight_decay"])

        def pto_step(x, y):
            enable_running_stats(net)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.first_step(zero_grad=True)
            disable_running_stats(net)
            loss_fn(net(x), y).backward()
            opt.second_step(zero_grad=True)
            return loss

        steps["pytorch-optimizer sam"] = pto_step
    return steps


def bench_model(name: str, *, rounds: int, block_ms: float, device: torch.device) -> list[tuple[str, float | str]]:
    model_name, kwargs, batch_size, m = CONFIGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, **kwargs).to(device).train()
    x = torch.randn(batch_size, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"], device=device)
    y = torch.randint(0, kwargs["num_classes"], (batch_size,), device=device)
    columns = make_steps(model, m)
    runnable = {k: f for k, f in columns.items() if callable(f)}
    blocks = {}
    for key, f in runnable.items():  # warm-up (allocator, lazy state, first-call overheads), then the block length
        for _ in range(2):
            f(x, y)
        _sync(device)
        start = time.perf_counter()
        for _ in range(2):
            f(x, y)
        _sync(device)
        blocks[key] = block_length((time.perf_counter() - start) / 2, block_ms)
    # One sample = the mean step time over a block of consecutive steps (a training run's steady state, not one
    # step just after another column's code); blocks of an even length so that "sam every 2" averages one SAM and
    # one plain step.
    times: dict[str, list[float]] = {k: [] for k in runnable}
    for _ in range(rounds):
        for key, f in runnable.items():
            start = time.perf_counter()
            for _ in range(blocks[key]):
                f(x, y)
            _sync(device)
            times[key].append((time.perf_counter() - start) / blocks[key])
    return [(k, statistics.median(times[k]) if k in times else columns[k]) for k in columns]


def block_length(step_seconds: float, block_ms: float) -> int:
    """Consecutive steps per timed block: an even number, at least 2, spanning about ``block_ms``."""
    return max(2, 2 * math.ceil(block_ms / 1e3 / step_seconds / 2))


def step_exactness(name: str, *, steps: int = 3) -> dict[str, tuple[float, float]]:
    """m-SAM through the layers and through ``vmap`` against the loop: ``steps`` steps from the same weights on the
    same batches, float32; per path (max |w - w_loop|, max |w_loop - w_start|) over the floating-point parameters and
    buffers (BatchNorm's running statistics included; its step counters must agree exactly)."""
    model_name, kwargs, batch_size, m = CONFIGS[name]
    torch.manual_seed(0)
    model = create_model(model_name, **kwargs).train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch_size, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"],
                            generator=g), torch.randint(0, kwargs["num_classes"], (batch_size,), generator=g))
               for _ in range(steps)]
    finals = {}
    for path in ("layers", "vmap", "loop"):
        net = copy.deepcopy(model)
        if path == "vmap":
            micro_batches.refuse(net, "the benchmark's vmap column")
        opt = create_optimizer(net.parameters(), name="sam", base="sgd", **HP)
        for x, y in batches:
            training_step(net, opt, nn.CrossEntropyLoss(), x, y, micro_batch_size=m, vectorize=path != "loop")
        finals[path] = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    start = {k: t.detach() for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
    if any(not torch.equal(finals[path][k], finals["loop"][k]) for path in ("layers", "vmap")
           for k in finals["loop"] if k not in start):  # integer buffers (num_batches_tracked) must agree exactly
        raise SystemExit(f"{name}: an integer buffer differs from the loop's")

    def max_diff(a: dict, b: dict) -> float:
        return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in start)
    moved = max_diff(finals["loop"], start)
    return {path: (max_diff(finals[path], finals["loop"]), moved) for path in ("layers", "vmap")}


def print_exactness(names: list[str]) -> None:
    print("\nexactness (float32, 3 m-SAM steps from the same weights): max |w - w_loop| over parameters and running "
          "statistics")
    for name in names:
        for path, (diff, moved) in step_exactness(name).items():
            print(f"  {name:<12} {path:<7} {diff:.3g}  (the loop moved the weights by up to {moved:.3g})")


def print_table(name: str, rows: list[tuple[str, float | str]], device: torch.device) -> None:
    """``rows`` of :func:`bench_model` for config ``name``: ms, x SGD, x the loop; then which path the default takes."""
    model_name, kwargs, batch_size, m = CONFIGS[name]
    shape = (kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    print(f"\n{name}: {model_name} ({'x'.join(map(str, shape))}, batch {batch_size}, m {m})")
    print(f"  {'step':<24}{'median ms':>12}{'x sgd':>9}{'x loop':>9}")
    sgd, loop = dict(rows)["sgd"], dict(rows)[f"m-sam m={m} loop"]
    for key, value in rows:
        if isinstance(value, str):
            print(f"  {key:<24}{'-':>12}{'-':>9}   {value}")
        else:
            vs_loop = f"{value / loop:>9.2f}" if key.startswith("m-sam") else ""
            print(f"  {key:<24}{value * 1e3:>12.2f}{value / sgd:>9.2f}{vs_loop}")
    micro_batch = torch.empty(m, *shape, device=device)
    default = "the loop" if loop_is_faster(micro_batch, m) else "the layers"
    print(f"  training_step's default here: {default} ({micro_batch.numel():,} input elements per micro-batch; the "
          f"CPU takes the loop above {LOOP_FROM_ELEMENTS:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6,
                        help="interleaved rounds: timed blocks per column and model, the median taken (default 6)")
    parser.add_argument("--block-ms", type=float, default=60.0,
                        help="each block runs consecutive steps of one column for about this long (at least 2 steps; "
                             "default 60)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="retain: freed CPU memory stays in the process, as in sharpscope train "
                             "(sharpscope.cpu_memory); default: glibc's own thresholds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    retained = args.malloc == "retain" and retain_freed_memory()
    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s), {args.rounds} interleaved blocks of "
          f"~{args.block_ms:g} ms (>= 2 steps) per column; freed CPU memory "
          f"{'retained' if retained else 'returned (glibc default)'}; hp {HP}")
    for name in args.models.split(","):
        print_table(name, bench_model(name, rounds=args.rounds, block_ms=args.block_ms, device=device), device)
    print_exactness(args.models.split(","))


if __name__ == "__main__":
    main()

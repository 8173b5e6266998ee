"""Cost of m-sharpness per chunk size: the batched (structured) path vs vmap over per-chunk weights vs the serial loop.

Worst-case sharpness (Auto-PGD ascent, ``--steps`` steps, rho 0.05, p = 2) of the digits ConvNet (BatchNorm,
~53k parameters, float32, as the CLI runs it) on ``--samples`` training digits, for every ``m`` of ``--m``:
seconds per measure and the ratio to ``m = --samples`` (one chunk: the plain batched cost) of the same path.
Paths are timed interleaved, ``--rounds`` times, medians (the machine is shared: read ratios, not seconds).
Then exactness: the max abs difference of the per-chunk values against the serial loop, in float32 on the
ConvNet (the float64 exactness checks on BatchNorm/LayerNorm/GroupNorm/attention models are the test suite's).
``--checkpoint`` measures a trained model instead (e.g. ``runs/sgd/final.pt`` of ``sharpscope train``: the
README's sharpness tour), on the first ``--samples`` training samples of its dataset, as the CLI does.
Then m-sharpness in training (``--sam-step``, on by default): the m-SAM step costs of ``bench_sam_step.py`` (against
SGD and against the loop over micro-batches) and the exactness of its batched paths against that loop, so one run
prints every number issue 15 asks for.

    python benchmarks/bench_sharpness.py                      # m = 1, 8, 32, 128, 1024; a few minutes
    python benchmarks/bench_sharpness.py --m 1,1024 --rounds 3 --paths structured,vmap
    python benchmarks/bench_sharpness.py --checkpoint runs/sgd/final.pt --paths structured --steps 20 --threads 1

Measured 2026-12-06 on a shared 2-core machine, 1 thread, process CPU seconds of one (m, rho = 0.05) cell of the
trained digits ConvNet (``runs/sgd/final.pt``), 20 steps, 1,024 samples, versions alternated in separate processes:
before (HEAD d0fadf8) m = 1 20-23 s, m = 1,024 4.6-5.6 s; after m = 1 12-15 s, m = 1,024 2.7-3.4 s (one chunk
now runs the layers' own kernels with ``W + D``, as the loop does). Read the ratios as +-20% (shared machine).
Then (issue 15, HEAD bdf280f -> the ascent working in reused stacks with lazy best-point copies, bit-identical
values): one cell per process, 4 interleaved rounds, medians: m = 1 12.95 -> 10.92 s, m = 1,024 2.95 -> 2.96 s,
ratio 4.39 -> 3.69. This script (both cells in one process, 3 rounds): m = 1 12.24 -> 11.2-11.7 s, m = 1,024
2.46 -> 2.3-2.5 s, ratio 4.99 -> 4.6-4.9. Most of the spread is page faults: glibc returns freed stacks to the
system and faults them in again (0.05-0.56 M minor faults per m = 1 cell, by allocation history); with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` (no faults; one process, 2 rounds) m = 1
9.9-10.7 -> 9.3-10.4 s, m = 1,024 1.9-2.1 s, ratio 5.1-5.3 -> 4.8-4.9: what remains at m = 1 is the per-chunk
objective (~5.5 s) and the ascent's memory traffic (~3.5 s, 18 passes over the (G, params) stacks per step).
2026-12-07: the Linear layers' perturbations kept factored where they pay (``sharpscope/sharpness/span.py``; p = 2,
zero start): this script's model, m = 1 against m = 1,024 interleaved in one process (medians of 3, 1 thread),
dense 2.39 s = 6.16x -> 1.25 s = 3.28x at 5 steps, 8.87 s = 6.03x -> 5.73 s = 3.71x at 20; one run of this script
(load varying) read m = 1 1.75 s = 3.74x, m = 8 1.73x, m = 32 1.65x, m = 128 1.59x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sharpscope.data import eval_batches, load_dataset
from sharpscope.hessian.operator import eval_mode
from sharpscope.models.convnet import convnet
from sharpscope.sharpness._objective import ChunkedObjective, make_chunks, stack_data
from sharpscope.sharpness.worst_case import _worst_case_on_chunks

PATHS = {"structured": "structured", "vmap": "vmap", "loop": False}


def measure(model, data, *, m, path, steps, rho, batch_size, max_chunks=None):
    objective = ChunkedObjective(model, nn.CrossEntropyLoss(), batch_size=batch_size, vectorize=PATHS[path])
    x, y = stack_data(data, device=objective.device, dtype=objective.dtype)
    xc, yc = make_chunks(x, y, m=m, shuffle=True, seed=0, max_chunks=max_chunks)
    with eval_mode(model):
        start, cpu = time.perf_counter(), time.process_time()
        trace, _, _ = _worst_case_on_chunks(
            objective, xc, yc, rho=rho, p=2.0, adaptive=False, eta=0.01, steps=steps, random_init=False, seed=0,
            keep_perturbation=False, on_progress=None,
        )
        return time.perf_counter() - start, time.process_time() - cpu, trace[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,8,32,128,1024")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=500, help="the CLI's default evaluation batch size")
    parser.add_argument("--paths", default="structured,vmap,loop")
    parser.add_argument("--loop-chunks", type=int, default=64,
                        help="the loop (and vmap at m < 32) run on this many chunks, their time scaled to all chunks")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpoint", default=None,
                        help="a sharpscope checkpoint to measure instead of the randomly initialised ConvNet")
    parser.add_argument("--sam-step", default="digits-b16,digits-b128",
                        help="then time m-SAM training steps of these bench_sam_step.py configs against SGD and the "
                             "loop, with their exactness against the loop ('' to skip)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m_values = [int(v) for v in args.m.split(",")]
    paths = args.paths.split(",")
    torch.manual_seed(0)
    if args.checkpoint:
        from sharpscope.inputs import analysis_inputs

        checkpoint, data = analysis_inputs(args.checkpoint, num_samples=args.samples, batch_size=args.batch_size)
        model, what = checkpoint.model, f"{args.checkpoint} ({checkpoint.dataset})"
    else:
        dataset = load_dataset("digits")
        data = eval_batches(dataset, num_samples=args.samples, batch_size=args.batch_size)
        model, what = convnet(in_channels=1, num_classes=10, image_size=8), "digits ConvNet"
        # a trained-like state: random BatchNorm statistics so eval mode is not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    print(f"{what}, {sum(p.numel() for p in model.parameters())} params, {args.samples} samples, "
          f"{args.steps} steps, rho {args.rho}, batch size {args.batch_size}, {torch.get_num_threads()} threads")
    times = {(m, path): [] for m in m_values for path in paths}
    cpu_times = {(m, path): [] for m in m_values for path in paths}
    values = {}
    for _ in range(args.rounds):
        for m in m_values:
            for path in paths:
                chunks = args.samples // m
                limit = args.loop_chunks if (path == "loop" or (path == "vmap" and m < 32)) else None
                limit = limit if limit is not None and limit < chunks else None
                seconds, cpu, value = measure(model, data, m=m, path=path, steps=args.steps, rho=args.rho,
                                              batch_size=args.batch_size, max_chunks=limit)
                times[(m, path)].append(seconds * (chunks / limit if limit else 1))
                cpu_times[(m, path)].append(cpu * (chunks / limit if limit else 1))
                values[(m, path)] = value
    full = args.samples
    for label, table in (("wall", times), ("process CPU", cpu_times)):
        print(f"\n{label} seconds, medians of {args.rounds}")
        print(f"{'m':>6} " + " ".join(f"{p + ' s':>14} {'x m=' + str(full):>9}" for p in paths))
        for m in m_values:
            row = []
            for path in paths:
                t = statistics.median(table[(m, path)])
                ref = statistics.median(table[(full, path)]) if (full, path) in table else float("nan")
                row.append(f"{t:14.3f} {t / ref:9.2f}")
            print(f"{m:>6} " + " ".join(row))
    print("(loop, and vmap at m < 32: timed on the first --loop-chunks chunks, scaled)")
    if "loop" in paths:
        print("\nexactness, float32 ConvNet: max |value - loop value| over the chunks both ran")
        for m in m_values:
            for path in paths:
                if path == "loop":
                    continue
                a, b = values[(m, path)], values[(m, "loop")]
                n = min(len(a), len(b))
                print(f"  m={m:<5} {path:<11} {float((a[:n] - b[:n]).abs().max()):.3g}  (values ~{float(b.abs().mean()):.3g})")
    if args.sam_step:
        sam_step_costs(args.sam_step.split(","))


def sam_step_costs(configs: list[str]) -> None:
    """m-SAM in training: benchmarks/bench_sam_step.py's rows for ``configs`` (1 thread) and its exactness check."""
    import importlib.util
    from pathlib import Path

    from sharpscope.cpu_memory import retain_freed_memory

    spec = importlib.util.spec_from_file_location("bench_sam_step", Path(__file__).with_name("bench_sam_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    retained = retain_freed_memory()  # as sharpscope train does (sharpscope.cpu_memory)
    try:
        print("\nm-SAM training steps (bench_sam_step.py, 1 thread, 8 interleaved blocks of ~60 ms; freed CPU memory "
              f"{'retained, as in sharpscope train' if retained else 'returned (glibc default)'})")
        cpu = torch.device("cpu")
        for name in configs:
            bench.print_table(name, bench.bench_model(name, rounds=8, block_ms=60.0, device=cpu), cpu)
        bench.print_exactness(configs)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()

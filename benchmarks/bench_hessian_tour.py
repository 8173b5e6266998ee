"""Budgets set by precision against the old fixed budgets: the trace and density stages of ``hessian-spectrum``.

    python benchmarks/bench_hessian_tour.py [--threads 1] [--tour DIR]

Part 1 (always, ~1-3 minutes): the digits ``mlp:hidden=32`` (2,410 parameters, 5 SGD epochs, 1000 samples, as in
``bench_hessian.py``), whose dense float64 Hessian is the truth. For each stage, old fixed budget vs the new
default: Hessian-vector products, wall time, estimate +- standard error, and the error against the truth:

* trace: Hutch++ with 99 products (the old CLI default) / 30 (the report's) vs adaptive Hutch++ (``rtol = 0.02``,
  sketch 8 + the top-5 Lanczos eigenvectors as extra deflation directions), over 5 seeds;
* density: SLQ 90 steps x 5 runs vs the W1-bound stop (``tol = 0.01``): W1 distance to the exact eigenvalue
  distribution relative to the spectral range, and the implied trace +- its standard error across runs.

Part 2 (``--tour DIR`` holding ``runs/sgd`` and ``runs/sam`` from ``sharpscope train``): the README's two
``hessian-spectrum`` commands with the old budgets (``--trace-matvecs 99 --density-tol 0``) and the new defaults,
each timed as a subprocess (wall and CPU seconds) with its HVP counts from ``spectrum.json``. Minutes on a quiet
CPU; on a shared machine compare the CPU seconds and the HVP counts, not the wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_hessian import train  # noqa: E402  (the same digits MLP and evaluation set)

from sharpscope.hessian import HessianOperator, hutchpp_trace, lanczos_eigs, spectral_density  # noqa: E402
from sharpscope.hessian.reference import dense_hessian  # noqa: E402


def w1_to_spectrum(density, eigenvalues) -> float:
    """Exact W1 between the runs' averaged quadrature measure and the eigenvalue distribution, / range."""
    nodes = density.nodes.reshape(-1)
    weights = density.weights.reshape(-1) / density.nodes.shape[0]
    points = torch.cat([nodes, eigenvalues])
    mass = torch.cat([weights, -torch.full_like(eigenvalues, 1.0 / eigenvalues.numel())])
    order = points.argsort()
    points, mass = points[order], mass[order]
    w1 = float((mass.cumsum(0)[:-1].abs() * (points[1:] - points[:-1])).sum())
    return w1 / float(eigenvalues[-1] - eigenvalues[0])


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def library_part(seeds: int) -> None:
    model, batches = train("mlp", {"hidden": 32}, epochs=5)
    loss_fn = torch.nn.CrossEntropyLoss()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model.double(), loss_fn,
                                                      [(x.double(), y) for x, y in batches]))
    model.float()
    truth = float(eigenvalues.sum())
    print(f"digits mlp:hidden=32, n = {eigenvalues.numel()}, 1000 samples; exact trace {truth:.4f}, spectrum "
          f"[{float(eigenvalues[0]):.4f}, {float(eigenvalues[-1]):.4f}]\n")
    H = HessianOperator(model, loss_fn, batches)
    top = lanczos_eigs(H, 5)  # what hessian-spectrum computes before the trace anyway (not counted below)
    print("| stage | budget | seed | HVPs | seconds | estimate +- stderr | error vs dense | |error| / stderr |")
    print("|---|---|---|---|---|---|---|---|")
    configs = [
        ("trace", "Hutch++ 99 (old CLI default)", lambda s: hutchpp_trace(H, num_matvecs=99, seed=s)),
        ("trace", "Hutch++ 30 (report)", lambda s: hutchpp_trace(H, num_matvecs=30, seed=s)),
        ("trace", "adaptive Hutch++ rtol 0.02 + top-5 (new)",
         lambda s: hutchpp_trace(H, rtol=0.02, deflate=top, seed=s)),
    ]
    for stage, name, run in configs:
        for seed in range(seeds):
            estimate, seconds = timed(lambda: run(seed))
            error = estimate.value - truth
            print(f"| {stage} | {name} | {seed} | {estimate.num_matvecs} | {seconds:.2f} | {estimate.value:.3f} +- "
                  f"{estimate.stderr:.3f} | {error:+.3f} ({100 * error / truth:+.1f}%) | "
                  f"{abs(error) / estimate.stderr:.2f} |")
    for name, kwargs in [("90 steps x 5 runs (old)", {"num_iters": 90}), ("tol 0.01, <= 90 x 5 (new)", {})]:
        for seed in range(min(seeds, 3)):
            density, seconds = timed(lambda: spectral_density(H, seed=seed, **kwargs))
            error = density.trace_estimate - truth
            print(f"| density | {name} | {seed} | {density.num_matvecs} | {seconds:.2f} | SLQ trace "
                  f"{density.trace_estimate:.3f} +- {density.trace_stderr:.3f} | trace {error:+.3f}; W1/range "
                  f"{w1_to_spectrum(density, eigenvalues.float().double()):.1e}, steps "
                  f"{density.num_steps.tolist()} | {abs(error) / density.trace_stderr:.2f} |")


def cli_part(root: Path) -> None:
    rows = [  # (label, budgets, arguments): the README's two commands, the first also at the residual criterion
        ("spectrum", "residual tol 1e-6", ["runs/sgd", "runs/sam", "--top-k", "5"]),
        ("spectrum", "eigenvalue tol 1e-6 (README)", ["runs/sgd", "runs/sam", "--top-k", "5", "--criterion",
                                                       "eigenvalue"]),
        ("density", "old", ["runs/sgd/final.pt", "runs/sam/final.pt", "--trace", "--density", "--trace-matvecs",
                            "99", "--density-tol", "0"]),
        ("density", "new (README)", ["runs/sgd/final.pt", "runs/sam/final.pt", "--trace", "--density"]),
    ]
    print("\n| command | budgets | wall s | CPU s | HVPs: top / trace / density / total | trace +- stderr | "
          "SLQ trace +- stderr |")
    print("|---|---|---|---|---|---|---|")
    for label, budget, arguments in rows:
        with tempfile.TemporaryDirectory() as out:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sharpscope", "-q", "hessian-spectrum", *arguments,
                            "--out", out], cwd=root, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            records = json.loads((Path(out) / "spectrum.json").read_text())["checkpoints"]
        top = sum(r["top_matvecs"] for r in records)
        trace = sum(r["trace"]["num_matvecs"] for r in records if r.get("trace"))
        density = sum(r["density"]["num_matvecs"] for r in records if r.get("density"))
        total = sum(r["num_matvecs"] for r in records)
        traces = "; ".join(f"{r['run']} {r['trace']['value']:.3f} +- {r['trace']['stderr']:.3f}"
                           for r in records if r.get("trace")) or "-"
        slq = "; ".join(f"{r['run']} {r['density']['slq_trace']:.2f} +- {r['density'].get('slq_trace_stderr') or 0:.2f}"
                        for r in records if r.get("density")) or "-"
        print(f"| {label} | {budget} | {wall:.1f} | {cpu:.1f} | {top} / {trace} / {density} / {total} | "
              f"{traces} | {slq} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5, help="trace seeds (density: min(seeds, 3))")
    parser.add_argument("--tour", type=Path, default=None, help="folder holding runs/sgd and runs/sam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    library_part(args.seeds)
    if args.tour is not None:
        cli_part(args.tour)


if __name__ == "__main__":
    main()

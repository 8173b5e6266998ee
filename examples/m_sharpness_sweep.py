"""Foret et al. 2021 (SAM), section 4.1 and Fig. 3, on Fashion-MNIST: m-SAM over a grid of rho and m, then how well
m-sharpness predicts the generalization gap.

The grid (ConvNet, batch 128, lr 0.1, momentum 0.9, weight decay 1e-4, cosine schedule: DESIGN.md section 9):

* rho in {0, 0.01, 0.02, 0.05, 0.1, 0.2} x m in {4, 16, 64, 128} x seeds {0, 1}; rho = 0 is plain SGD, which has
  no m, so it is trained once per seed (2 + 5 x 4 x 2 = 42 runs). m-SAM takes one SAM perturbation per
  micro-batch of m samples of each batch (``sharpscope train --optimizer sam --m m``; m = 128 is plain SAM).
* Budget (a background run of about 30-40 minutes on a 2-core CPU): each run trains 4 epochs on the first
  4,096 training samples (``--train-samples``; Fashion-MNIST's file order is already shuffled), 128 steps. On the
  full 60,000 samples one SAM epoch alone (469 steps) costs about as much as this whole run. The models are far
  from converged (~75% test accuracy, vs 87.5% in the paper): the figure's shape, not its numbers, is what this
  reproduces. Measured cost and the estimate of the full sweep: see "Cost" below.

For every final checkpoint (model in eval mode, plain cross-entropy, no augmentation) it measures

* the test error on the 10,000 test samples and the generalization gap = test error - train error, where the
  train error is that of the final weights on the training samples the run saw
  (:func:`sharpscope.sharpness.generalization_gap`);
* m-sharpness for each m in {4, 16, 64, 128}: worst-case sharpness (:func:`sharpscope.sharpness.m_sharpness`,
  rho = 0.05, p = 2, 3 projected-ascent steps) averaged over the chunks of m samples of the first 1,024 training
  samples (the same seeded chunks for every checkpoint),

and writes into ``RESULTS/<tag>/`` (``<tag>`` = ``fashion-mnist-n4096-e4`` for the defaults):

* ``fig_left.png`` (Fig. 3 left): test error vs rho, one line per training m, mean over seeds, error bars from the
  lowest to the highest seed; the rho = 0 point of every line is the same SGD runs;
* ``fig_right.png`` (Fig. 3 right): Kendall's tau-b between m-sharpness at m and the generalization gap over all
  runs (``scipy.stats.kendalltau``, two-sided p-value printed at each point), vs m; the paper finds small m
  predicts the gap best;
* ``table.md`` / ``table.json``: every run's numbers, the test-error grid and the tau values;
* ``runs/<run>.json``: each run's measurements, written atomically as soon as they are done.

How: the runs go through the library in-process, :func:`sharpscope.train.train` (the ``sharpscope train``
trainer, same checkpoints) then the measurements above, one run per task, over ``--workers`` processes (default 1
on the CPU, with all its threads; with N workers each gets cpu_count / N threads; on CUDA one worker per GPU).
Everything resumes: a killed run's folder resumes from its ``last.pt`` (the trainer does this), a run whose
``runs/<run>.json`` matches its ``final.pt`` (sha256) and the measurement settings is skipped, so rerun the same
command after a kill. Do not run two sweeps on the same folders at once.

Cost, measured 2026-12-06 on this 2-core CPU while shared (load average 9-13), one torch thread; CPU time is what
an idle core would take:

* one full run (SAM, rho = 0.05, m = 128; 4 epochs on 4,096 samples; then the gap and m-sharpness at the four m):
  105 s of CPU time (79 user + 28 sys), 592 s wall at that load: training 324 s wall (of which the trainer's
  per-epoch test evaluation of 10,000 samples is a third to a half), measurements 268 s wall. It reached 75.6% test
  accuracy, train error 22.6%, gap +1.8%, m-sharpness 0.18 / 0.10 / 0.056 / 0.040 at m = 4 / 16 / 64 / 128;
* one training step (batch 128, CPU time, medians of 3 interleaved): SGD 106 ms, SAM m = 128 2.01x, m = 16 2.30x,
  m = 4 3.16x SGD (sharpscope/optim/step.py as of that day), so an m = 4 run costs ~15 s of CPU more;
* the whole grid: 40 SAM runs x ~105 s + ~150 s for m = 4 + 2 SGD runs x ~80 s ~= 4,500 CPU-s ~= 75 CPU-minutes:
  about 38 min with ``--workers 2 --threads 1`` on an idle 2-core machine (the command for the background run),
  about 75 min with one single-threaded worker; on a machine loaded as above, several hours. Under load keep one
  thread per worker: with 2 threads a tiny run took 15 s instead of 2 s (thread oversubscription).

    python examples/m_sharpness_sweep.py --workers 2 --threads 1    # the full grid (background run)
    python examples/m_sharpness_sweep.py                            # one run at a time, all threads
    python examples/m_sharpness_sweep.py --tiny                     # digits, 3 rho (SGD + 2) x 2 m x 1 seed: seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The full sweep's defaults (module docstring) and the ``--tiny`` smoke test's: digits, SGD + 2 rho x 2 m x 1 seed,
#: 1 epoch on 256 samples, m-sharpness on 128 samples with 2 ascent steps.
FULL = {"dataset": "fashion-mnist", "rho": "0,0.01,0.02,0.05,0.1,0.2", "m": "4,16,64,128", "seeds": "0,1",
        "epochs": 4, "train_samples": 4096, "sharpness_samples": 1024, "sharpness_steps": 3}
TINY = {"dataset": "digits", "rho": "0,0.05,0.1", "m": "4,16", "seeds": "0",
        "epochs": 1, "train_samples": 256, "sharpness_samples": 128, "sharpness_steps": 2}
BATCH_SIZE = 128  # Foret et al.'s Fashion-MNIST / CIFAR batch size
SHARPNESS_RHO = 0.05  # the radius m-sharpness is measured at (the paper's default rho)
SHARPNESS_SEED = 0  # seeds the permutation that cuts the m-sharpness chunks (the same for every checkpoint)
EVAL_BATCH = 256  # forward batch of the gap measurement (on the CPU 2.4x faster per sample than 1000)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    name: str  # folder and file name: sgd-seed0, sam-rho0.05-m16-seed1
    optimizer: str  # "sgd" (rho = 0) or "sam"
    rho: float  # SAM radius; 0 for SGD
    m: int | None  # m-SAM micro-batch size; None for SGD
    seed: int


@dataclass(frozen=True)
class Settings:
    """What the whole sweep shares; saved in every run's JSON (a changed value re-measures)."""

    dataset: str
    epochs: int
    train_samples: int
    sharpness_m: tuple[int, ...]  # the m values m-sharpness is measured at
    sharpness_samples: int  # the first N training samples the m-sharpness chunks are cut from
    sharpness_steps: int  # projected-ascent steps of the worst-case estimate
    sharpness_rho: float = SHARPNESS_RHO
    data_dir: str | None = None

    @property
    def tag(self) -> str:
        return f"{self.dataset}-n{self.train_samples}-e{self.epochs}"

    def measure_key(self) -> dict[str, Any]:
        """The settings a run's measurements depend on (not data_dir: where the files are)."""
        return {"sharpness_m": list(self.sharpness_m), "sharpness_samples": self.sharpness_samples,
                "sharpness_steps": self.sharpness_steps, "sharpness_rho": self.sharpness_rho,
                "sharpness_seed": SHARPNESS_SEED, "gap_train_samples": self.train_samples}


def grid(rhos: list[float], ms: list[int], seeds: list[int]) -> list[RunSpec]:
    """SGD once per seed for rho = 0, m-SAM for every other (rho, m, seed)."""
    specs = []
    for seed in seeds:
        for rho in rhos:
            if rho == 0:
                specs.append(RunSpec(f"sgd-seed{seed}", "sgd", 0.0, None, seed))
            else:
                specs += [RunSpec(f"sam-rho{rho:g}-m{m}-seed{seed}", "sam", rho, m, seed) for m in ms]
    return specs


# ----------------------------------------------------------------------------------------------- one run
_WORKER: dict[str, Any] = {"device": "cpu"}


def _init_worker(counter, devices: list[str], threads: int) -> None:
    """Pick this worker process's device (round robin over ``devices``) and its thread count."""
    import torch

    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER["device"] = devices[index % len(devices)]
    torch.set_num_threads(threads)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dataset(name: str, data_dir: str | None):
    key = ("dataset", name, data_dir)
    if key not in _WORKER:  # once per process
        from sharpscope.data import load_dataset

        _WORKER[key] = load_dataset(name, data_dir=data_dir)
    return _WORKER[key]


def train_config(spec: RunSpec, settings: Settings):
    from sharpscope.train import TrainConfig

    # TrainConfig wants rho > 0 even for SGD, which ignores it: SGD runs keep the default
    extra = {"rho": spec.rho, "m": spec.m} if spec.optimizer == "sam" else {}
    return TrainConfig(dataset=settings.dataset, model="convnet", optimizer=spec.optimizer, lr=0.1, momentum=0.9,
                       weight_decay=1e-4, batch_size=BATCH_SIZE, epochs=settings.epochs,
                       train_samples=settings.train_samples, seed=spec.seed, save_every=0,
                       data_dir=settings.data_dir, **extra)


def measure(final: Path, settings: Settings, device: str) -> dict[str, Any]:
    """Test error, generalization gap and m-sharpness of one final checkpoint (module docstring)."""
    from torch import nn

    from sharpscope.data import eval_batches
    from sharpscope.sharpness import generalization_gap, m_sharpness
    from sharpscope.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(final, device=device)
    data = _dataset(checkpoint.dataset, settings.data_dir)
    loss_fn = nn.CrossEntropyLoss()
    trained_on = checkpoint.config.get("train_samples") or len(data.train_labels)
    gap = generalization_gap(
        checkpoint.model, loss_fn,
        eval_batches(data, split="train", num_samples=trained_on, batch_size=EVAL_BATCH, device=device),
        eval_batches(data, split="test", batch_size=EVAL_BATCH, device=device))
    sharp_data = eval_batches(data, split="train", num_samples=settings.sharpness_samples, batch_size=EVAL_BATCH,
                              device=device)
    result = m_sharpness(checkpoint.model, loss_fn, sharp_data, m_values=settings.sharpness_m,
                         rho_values=(settings.sharpness_rho,), measure="worst", steps=settings.sharpness_steps,
                         seed=SHARPNESS_SEED)
    sharpness = {str(m): {"value": float(result.values[i, 0]), "stderr": float(result.stderr[i, 0]),
                          "num_chunks": int(result.num_chunks[i])} for i, m in enumerate(result.m_values)}
    return {**gap.to_dict(), "sharpness": sharpness, "checkpoint_sha256": checkpoint.sha256}


def finished_record(spec: RunSpec, settings: Settings, runs_dir: Path, results_dir: Path) -> dict[str, Any] | None:
    """The run's saved measurements if they are of its current ``final.pt`` with the current settings, else None."""
    final = runs_dir / spec.name / "final.pt"
    record_path = results_dir / "runs" / f"{spec.name}.json"
    if not (final.exists() and record_path.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # written atomically, so only a hand-edited file: measure again
    if record.get("measure_settings") != settings.measure_key() or record.get("checkpoint_sha256") != _sha256(final):
        return None
    return record


def run_one(spec: RunSpec, settings: Settings, runs_dir: str, results_dir: str) -> dict[str, Any]:
    """Train (or resume) one run unless its ``final.pt`` exists, then measure it; returns a summary for the
    progress line."""
    from sharpscope.io import write_json
    from sharpscope.train import train

    folder = Path(runs_dir) / spec.name
    record_path = Path(results_dir) / "runs" / f"{spec.name}.json"
    final = folder / "final.pt"
    device = _WORKER["device"]
    trained = "trained earlier"
    train_seconds = 0.0
    if not final.exists():
        started = time.perf_counter()
        resumed = train(train_config(spec, settings), out_dir=folder, device=device, progress=False,
                        log=lambda line: None).resumed_from_epoch
        train_seconds = time.perf_counter() - started
        trained = "trained" if resumed is None else f"resumed after epoch {resumed}"
    started = time.perf_counter()
    measured = measure(final, settings, device)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = {**asdict(spec), "run_dir": str(folder), "checkpoint": str(final), **measured,
              "train_seconds_per_epoch": [m["seconds"] for m in metrics],
              "measure_seconds": time.perf_counter() - started, "device": device,
              "measure_settings": settings.measure_key(), "settings": asdict(settings)}
    write_json(record_path, record)
    return {"name": spec.name, "status": trained, "record": record, "train_seconds": train_seconds}


# --------------------------------------------------------------------------------------------- the sweep
def run_all(specs: list[RunSpec], settings: Settings, runs_dir: Path, results_dir: Path, *, workers: int,
            devices: list[str], threads: int) -> list[dict[str, Any]]:
    """Run every spec not finished yet (over ``workers`` processes of ``threads`` torch threads each, or in this
    process for 1 worker); print one line per run."""
    import multiprocessing

    started = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    done = 0

    def report(summary: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        record = summary["record"]
        records[summary["name"]] = record
        status = summary["status"]
        if status != "skipped":
            status += (f" in {summary['train_seconds']:.0f} s" if summary.get("train_seconds") else "") + \
                      f", measured in {record['measure_seconds']:.0f} s"
        print(f"[{done}/{len(specs)}] {summary['name']}: {status}; test error {record['test_error']:.2%}, "
              f"gap {record['generalization_gap']:+.2%}  ({time.perf_counter() - started:.0f} s)", flush=True)

    todo = []
    for spec in specs:
        record = finished_record(spec, settings, runs_dir, results_dir)
        if record is None:
            todo.append(spec)
        else:
            report({"name": spec.name, "status": "skipped", "record": record})
    if todo and workers == 1:
        import torch

        _WORKER["device"] = devices[0]
        torch.set_num_threads(threads)
        for spec in todo:
            report(run_one(spec, settings, str(runs_dir), str(results_dir)))
    elif todo:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads or CUDA
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context, initializer=_init_worker,
                                 initargs=(context.Value("i", 0), devices, threads)) as pool:
            pending = {pool.submit(run_one, spec, settings, str(runs_dir), str(results_dir)) for spec in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    report(future.result())  # a failed run stops the sweep with its error
    return [records[spec.name] for spec in specs]


# ------------------------------------------------------------------------------------------ aggregation
def kendall_taus(records: list[dict[str, Any]], ms: tuple[int, ...]) -> list[dict[str, Any]]:
    """Kendall's tau-b (scipy, two-sided p) between m-sharpness at each m and the gap, over all runs."""
    from scipy.stats import kendalltau

    gaps = [r["generalization_gap"] for r in records]
    out = []
    for m in ms:
        values = [r["sharpness"][str(m)]["value"] for r in records]
        tau, p = kendalltau(values, gaps) if len(records) >= 2 else (math.nan, math.nan)
        out.append({"m": m, "tau": float(tau), "p_value": float(p), "num_runs": len(records)})
    return out


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.mean(values), min(values), max(values)


def error_grid(records: list[dict[str, Any]], rhos: list[float], ms: list[int]) -> dict[str, dict[str, Any]]:
    """Test error per (m, rho) over seeds: mean, min, max; rho = 0 is the SGD runs for every m."""
    out: dict[str, dict[str, Any]] = {}
    for m in ms:
        out[str(m)] = {}
        for rho in rhos:
            errors = [r["test_error"] for r in records
                      if (r["optimizer"] == "sgd" if rho == 0 else (r["rho"] == rho and r["m"] == m))]
            if errors:
                mean, low, high = _spread(errors)
                out[str(m)][f"{rho:g}"] = {"mean": mean, "min": low, "max": high, "seeds": len(errors)}
    return out


def plot_left(grid_errors: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sharpscope.io import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, cells in grid_errors.items():
        rhos = [float(rho) for rho in cells]
        mean = [100 * cells[r]["mean"] for r in cells]
        low = [100 * (cells[r]["mean"] - cells[r]["min"]) for r in cells]
        high = [100 * (cells[r]["max"] - cells[r]["mean"]) for r in cells]
        ax.errorbar(rhos, mean, yerr=[low, high], marker="o", capsize=3, label=f"m = {m}")
    ax.set_xlabel("ρ (training; 0 = SGD)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="m-SAM", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_right(taus: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sharpscope.io import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ms = [t["m"] for t in taus]
    values = [t["tau"] for t in taus]
    ax.plot(ms, values, marker="o", color="C3")
    for t in taus:
        if math.isfinite(t["tau"]):
            ax.annotate(f"p = {t['p_value']:.2g}", (t["m"], t["tau"]), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_ylim(-1.05, 1.1)
    ax.margins(x=0.12)
    ax.set_xlabel("m (samples per perturbation of m-sharpness)")
    ax.set_ylabel("Kendall τ with the generalization gap")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def tabulate(records: list[dict[str, Any]], taus: list[dict[str, Any]], grid_errors: dict[str, dict[str, Any]],
             settings: Settings, rhos: list[float], results: Path) -> str:
    from sharpscope.io import write_json, write_text

    ms = settings.sharpness_m
    about = (f"{settings.dataset}, convnet, batch {BATCH_SIZE}, {settings.epochs} epochs on the first "
             f"{settings.train_samples} training samples, {len(records)} runs. m-sharpness: worst case, "
             f"rho = {settings.sharpness_rho}, {settings.sharpness_steps} ascent steps, first "
             f"{settings.sharpness_samples} training samples; gap = test error - train error of the final weights "
             "(eval mode) on the test set and on the training samples the run saw.")
    lines = ["# m-sharpness sweep (Foret et al. 2021, section 4.1, Fig. 3)", "", about, "",
             "## Kendall τ between m-sharpness and the generalization gap (all runs)", "",
             "| m | τ | p-value | runs |", "|---|---|---|---|"]
    lines += [f"| {t['m']} | {t['tau']:+.3f} | {t['p_value']:.3g} | {t['num_runs']} |" for t in taus]
    lines += ["", "## Test error (%), mean [min, max] over seeds; rho = 0 is SGD", "",
              "| training m | " + " | ".join(f"ρ = {rho:g}" for rho in rhos) + " |",
              "|---|" + "---|" * len(rhos)]
    for m, cells in grid_errors.items():
        row = [f"{100 * c['mean']:.2f} [{100 * c['min']:.2f}, {100 * c['max']:.2f}]" if (c := cells.get(f"{r:g}"))
               else "" for r in rhos]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "## Every run", "",
              "| run | ρ | m | seed | train error % | test error % | gap % | " +
              " | ".join(f"m-sharpness m={m}" for m in ms) + " | train s/epoch |",
              "|---|---|---|---|---|---|---|" + "---|" * len(ms) + "---|"]
    for r in records:
        per_epoch = statistics.median(r["train_seconds_per_epoch"]) if r["train_seconds_per_epoch"] else math.nan
        lines.append(f"| {r['name']} | {r['rho']:g} | {r['m'] or '-'} | {r['seed']} | {100 * r['train_error']:.2f} | "
                     f"{100 * r['test_error']:.2f} | {100 * r['generalization_gap']:+.2f} | " +
                     " | ".join(f"{r['sharpness'][str(m)]['value']:.4f}" for m in ms) + f" | {per_epoch:.1f} |")
    markdown = "\n".join(lines) + "\n"
    write_text(results / "table.md", markdown)
    write_json(results / "table.json", {"settings": asdict(settings), "about": about, "kendall_tau": taus,
                                        "test_error": grid_errors, "runs": records})
    return markdown


# ------------------------------------------------------------------------------------------------- main
def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke test: " + ", ".join(f"{k}={v}" for k, v in
                                                                                       TINY.items()))
    parser.add_argument("--dataset", help=f"[default: {FULL['dataset']}; tiny: {TINY['dataset']}]")
    parser.add_argument("--rho", help=f"training radii, 0 = SGD [default: {FULL['rho']}]")
    parser.add_argument("--m", help=f"training m and the m of m-sharpness [default: {FULL['m']}]")
    parser.add_argument("--seeds", help=f"[default: {FULL['seeds']}]")
    parser.add_argument("--epochs", type=int, help=f"[default: {FULL['epochs']}]")
    parser.add_argument("--train-samples", type=int, help=f"train on the first N samples [default: "
                                                          f"{FULL['train_samples']}]")
    parser.add_argument("--sharpness-samples", type=int, help=f"[default: {FULL['sharpness_samples']}]")
    parser.add_argument("--sharpness-steps", type=int, help=f"[default: {FULL['sharpness_steps']}]")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs [default: 1 on the CPU, one per GPU on CUDA]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker [default: cpu count / workers]; use 1 on a busy machine")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--runs", default="runs/m-sharpness", help="where the run folders go (RUNS/<tag>/)")
    parser.add_argument("--results", default="results/m-sharpness", help="figures and tables (RESULTS/<tag>/)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    defaults = TINY if args.tiny else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the paths written and the tau values (for tests)."""
    args = parse_args(argv)
    rhos, ms, seeds = sorted(set(_floats(args.rho))), sorted(set(_ints(args.m))), sorted(set(_ints(args.seeds)))
    problems = [text for bad, text in [
        (not rhos or min(rhos) < 0, f"--rho needs values >= 0, got {args.rho!r}"),
        (not ms or min(ms) < 1 or max(ms) > BATCH_SIZE, f"--m needs values in 1..{BATCH_SIZE}, got {args.m!r}"),
        (not seeds or min(seeds) < 0, f"--seeds needs values >= 0, got {args.seeds!r}"),
        (args.epochs < 1 or args.train_samples < 1, "--epochs and --train-samples must be >= 1"),
        (args.sharpness_samples < max(ms, default=1), f"--sharpness-samples must be >= the largest m {max(ms)}"),
        (args.sharpness_steps < 1, "--sharpness-steps must be >= 1"),
        (args.workers is not None and args.workers < 1, "--workers must be >= 1"),
        (args.threads is not None and args.threads < 1, "--threads must be >= 1"),
    ] if bad]
    if problems:
        raise SystemExit(f"m_sharpness_sweep.py: error: {problems[0]}")

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and not gpus:
        raise SystemExit("m_sharpness_sweep.py: error: --device cuda, but torch sees no CUDA device")
    devices = [f"cuda:{i}" for i in range(gpus)] if device == "cuda" else [device]
    workers = args.workers or (gpus if device == "cuda" and gpus else 1)
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    settings = Settings(dataset=args.dataset, epochs=args.epochs, train_samples=args.train_samples,
                        sharpness_m=tuple(ms), sharpness_samples=args.sharpness_samples,
                        sharpness_steps=args.sharpness_steps, data_dir=args.data_dir)
    runs_dir, results = Path(args.runs) / settings.tag, Path(args.results) / settings.tag
    specs = grid(rhos, ms, seeds)
    print(f"m-sharpness sweep: {len(specs)} runs ({settings.dataset}, {settings.epochs} epochs on "
          f"{settings.train_samples} samples) on {', '.join(devices)} with {workers} worker(s) x {threads} "
          f"thread(s)\n"
          f"  runs -> {runs_dir}/   results -> {results}/", flush=True)
    started = time.perf_counter()
    records = run_all(specs, settings, runs_dir, results, workers=workers, devices=devices, threads=threads)

    taus = kendall_taus(records, settings.sharpness_m)
    grid_errors = error_grid(records, rhos, ms)
    what = f"{settings.dataset}, {settings.epochs} epochs on {settings.train_samples} samples, seeds {seeds}"
    plot_left(grid_errors, results / "fig_left.png", f"m-SAM test error vs ρ ({what})\nmean, bars: min-max over seeds")
    plot_right(taus, results / "fig_right.png",
               f"m-sharpness (ρ = {settings.sharpness_rho}) vs generalization gap\n"
               f"Kendall τ over {len(records)} runs ({what})")
    markdown = tabulate(records, taus, grid_errors, settings, rhos, results)
    print("\n" + markdown.split("## Every run")[0].rstrip())
    outputs = {name: results / name for name in ("fig_left.png", "fig_right.png", "table.md", "table.json")}
    print(f"\nwrote {', '.join(str(p) for p in outputs.values())} and {results}/runs/*.json "
          f"({time.perf_counter() - started:.0f} s)")
    return {"outputs": outputs, "kendall_tau": taus, "records": records}


if __name__ == "__main__":
    main()

"""Rerun the README's digits tables from a clean clone: SGD vs SAM on the bundled digits data, several seeds.

1. ``sharpscope train --optimizer {sgd,sam} --seed N --threads 1`` for every seed   -> OUT/runs/{sgd,sam}-seedN/
   (``--jobs`` trainings at a time, one thread each)
2. ``sharpscope report`` of the seed-0 pair (the README's table, section "5. Everything in one page")
                                                                                   -> OUT/report-seed0/
3. ``sharpscope report --summary-only`` of every seed (a mean +- std row per optimizer; the difference judged by
   the spread between seeds)                                                       -> OUT/report-seeds/
4. both tables as Markdown, printed and written                                    -> OUT/tables.md

Every step is skipped when its result is on disk (a finished run's final.pt, a report made with the same settings
re-rendered from its analyses), so the script can be killed and rerun. The other README tables have their own
scripts (listed by ``--list``, run after these with ``--all``): the Fashion-MNIST reproduction
(examples/reproduce_fashion_mnist.py, hours) and the m-sharpness sweep (examples/m_sharpness_sweep.py, hours).

    python examples/reproduce_readme.py                       # seeds 0..4, 2 trainings at a time -> results/readme/
    python examples/reproduce_readme.py --seeds 0,1 --jobs 1 --out /tmp/readme
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OPTIMIZERS = ("sgd", "sam")
#: The report settings of the README's table (section 5 of the tour).
REPORT_ARGS = ("--grid", "-1:1:11", "--m", "8,32,128")
#: The README tables that come from other scripts (expensive: real Fashion-MNIST, dozens of trainings, timings).
OTHER_SCRIPTS = (
    ("Reproducing the SAM paper's Fashion-MNIST experiment", "examples/reproduce_fashion_mnist.py",
     ["--epochs", "5", "--seeds", "0,1,2"]),
    ("Reproducing the SAM paper's m-sharpness figure", "examples/m_sharpness_sweep.py", []),
    # the Speed section's tables: timings (ratios against references measured in the same run; minutes each)
    ("Speed: SAM step cost", "benchmarks/bench_sam_step.py",
     ["--models", "digits-b16,digits-b128", "--rounds", "8"]),
    ("Speed: training throughput", "benchmarks/bench_train_throughput.py", []),
    ("Speed: data-parallel scaling", "benchmarks/bench_distributed.py", []),
    ("Speed: loss-surface throughput", "benchmarks/bench_landscape.py", []),
    ("Speed: m-sharpness per chunk size", "benchmarks/bench_sharpness.py",
     ["--m", "1,1024", "--rounds", "1", "--threads", "1"]),
    ("Speed: Hessian eigenvalues", "benchmarks/bench_hessian.py", []),
    ("Speed: Hessian-vector product cost", "benchmarks/bench_hessian.py", ["--cost-only"]),
    ("Speed: budgets set by precision", "benchmarks/bench_hessian_tour.py", []),
)
EXAMPLES = Path(__file__).resolve().parent


def sharpscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "sharpscope", *args]


def run(cmd: list[str], log: Path | None = None) -> float:
    """Run one command (its output to ``log`` when given, else to ours) on one CPU thread (jobs run side by
    side on a small machine; ``train --threads 1`` makes the runs reproducible); stop the script on failure."""
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with log.open("w") as stream:
            result = subprocess.run(cmd, stdout=stream, stderr=subprocess.STDOUT, env=env)
        if result.returncode:
            sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{log.read_text()[-2000:]}")
    seconds = time.time() - started
    print(f"  done in {seconds:.0f} s: {cmd[cmd.index('--out') + 1] if '--out' in cmd else ' '.join(cmd[1:])}",
          flush=True)
    return seconds


def train_all(runs: Path, seeds: list[int], *, jobs: int, extra: list[str]) -> dict[str, list[Path]]:
    """Train every (optimizer, seed) missing a final.pt, ``jobs`` at a time; the folders by optimizer."""
    folders = {name: [runs / f"{name}-seed{seed}" for seed in seeds] for name in OPTIMIZERS}
    todo = []
    for seed in seeds:
        for name in OPTIMIZERS:
            out = runs / f"{name}-seed{seed}"
            if (out / "final.pt").exists():
                continue
            # an interrupted run (no final.pt yet) is resumed by train itself, bit-identically
            cmd = sharpscope("-q", "train", "--optimizer", name, "--seed", str(seed), "--threads", "1",
                             *extra, "--out", str(out))
            todo.append((cmd, runs / f"{name}-seed{seed}.log"))
    runs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(lambda job: run(*job), todo))
    return folders


def report(folders: list[Path], out: Path, extra: list[str]) -> None:
    """``sharpscope report`` of ``folders`` into ``out`` (reused and re-rendered when already made); of more than
    two runs, only the analyses of the summary table (``--summary-only``: the landscapes and trajectory spectra
    of ten runs would take most of an hour and no number of the table comes from them)."""
    summary_only = ["--summary-only"] if len(folders) > 2 else []
    run(sharpscope("-q", "report", *map(str, folders), *REPORT_ARGS, *summary_only, *extra, "--out", str(out)),
        log=out.with_suffix(".log"))


# ------------------------------------------------------------------------------------------------------ tables


def _decimals(stderr: float) -> int:
    """Decimal places that show ``stderr`` to two significant digits (the value is rounded to the same place)."""
    return max(0, 1 - math.floor(math.log10(abs(stderr)))) if stderr > 0 and math.isfinite(stderr) else 4


def cell(value: float, stderr: float = math.nan, *, scale: float = 1.0) -> str:
    """``98.61 ± 0.62``: the value to the decimal place of its error's second significant digit; 4 significant
    digits when exact (stderr 0) or the error is unknown."""
    if not math.isfinite(value):
        return "-"
    value, stderr = value * scale, stderr * scale
    if not (math.isfinite(stderr) and stderr > 0):
        return f"{value:.4g}"
    places = _decimals(stderr)
    return f"{value:.{places}f} ± {stderr:.{places}f}"


def _optimizer_label(run) -> str:
    optimizer = str(run.config.get("optimizer", "?"))
    return f"{optimizer.upper()} (ρ {run.config.get('rho'):g})" if optimizer in ("sam", "asam") else optimizer.upper()


def _header(analyses, run) -> str:
    from sharpscope.report import summary_sharpness

    _, where = summary_sharpness(analyses, run)  # "m=8, rho=0.05"
    m, rho = (part.split("=")[1] for part in where.split(", ")) if where else ("?", "?")
    return (f"| run | test acc (%) | gap (pp) | λ_max | trace (adaptive Hutch++) | "
            f"worst-case m-sharpness, ρ {rho}, m {m} |\n|---|---|---|---|---|---|")


COLUMNS = ("test acc (%)", "gap (pp)", "λ_max", "trace", "m-sharpness")
SCALES = {"test acc (%)": 100.0, "gap (pp)": 100.0}


def seed0_table(report_dir: Path, folders: list[Path]) -> str:
    """The README's table: one row per run with each number's own standard error, then whether each difference
    exceeds 2 standard errors of the difference (``sharpscope.report.resolution``)."""
    from sharpscope.report import read_analyses, read_run, resolution, summary_estimates

    runs = [read_run(f) for f in folders]
    analyses = read_analyses(report_dir)
    estimates = [summary_estimates(analyses, r) for r in runs]
    lines = [_header(analyses, runs[0])]
    for run, est in zip(runs, estimates):
        lines.append(f"| {_optimizer_label(run)} | "
                     + " | ".join(cell(est[c].value, est[c].stderr, scale=SCALES.get(c, 1.0)) for c in COLUMNS) + " |")
    lines.append("| difference | " + " | ".join(resolution([e[c] for e in estimates]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def seeds_table(report_dir: Path, folders: dict[str, list[Path]]) -> str:
    """Mean ± standard deviation over seeds per optimizer, then whether the optimizers' means differ by more than
    2 standard errors of the difference, each mean's error being std / sqrt(seeds) (the report's rule)."""
    from sharpscope.report import Estimate, read_analyses, read_run, resolution, summary_estimates

    analyses = read_analyses(report_dir)
    means, rows, header = [], [], ""
    for name in OPTIMIZERS:
        runs = [read_run(f) for f in folders[name]]
        header = header or _header(analyses, runs[0])
        per_run = [summary_estimates(analyses, r) for r in runs]
        row, mean = [], {}
        for c in COLUMNS:
            values = [e[c].value for e in per_run if math.isfinite(e[c].value)]
            if not values:
                row.append("-")
                mean[c] = Estimate(math.nan)
                continue
            avg = sum(values) / len(values)
            std = math.sqrt(sum((v - avg) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            mean[c] = Estimate(avg, std / math.sqrt(len(values)))
            row.append(cell(avg, std, scale=SCALES.get(c, 1.0)))
        rows.append(f"| {_optimizer_label(runs[0])}, {len(runs)} seeds | " + " | ".join(row) + " |")
        means.append(mean)
    rows.append("| difference | " + " | ".join(resolution([m[c] for m in means]) for c in COLUMNS) + " |")
    return header + "\n" + "\n".join(rows)


# -------------------------------------------------------------------------------------------------------- main


def _options(options: list[str]) -> list[str]:
    """``["--epochs=1", "--m=8,32"]`` -> ``["--epochs", "1", "--m", "8,32"]`` (a flag stays one word)."""
    return [word for option in options for word in option.split("=", 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/readme", help="folder for runs, reports and tables.md")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma-separated (the first: table 1)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings (and the two reports) run at a time")
    parser.add_argument("--list", action="store_true", help="list the scripts of the other README tables and stop")
    parser.add_argument("--all", action="store_true", help="then run those scripts too (hours)")
    quick = parser.add_argument_group("smaller settings (for tests; the README's numbers use the defaults)")
    quick.add_argument("--train-option", action="append", default=[], metavar="OPTION",
                       help="extra `sharpscope train` option, e.g. --train-option=--epochs=1 (repeatable)")
    quick.add_argument("--report-option", action="append", default=[], metavar="OPTION",
                       help="extra `sharpscope report` option, e.g. --report-option=--num-samples=128 (repeatable)")
    args = parser.parse_args(argv)
    if args.list or args.all:
        for title, script, options in OTHER_SCRIPTS:
            print(f"{title}: python {script} {' '.join(options)}".rstrip())
        if args.list:
            return
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2")
    if not seeds or args.jobs < 1:
        parser.error("--seeds needs at least one seed and --jobs at least 1")
    out = Path(args.out)
    started = time.time()
    folders = train_all(out / "runs", seeds, jobs=args.jobs, extra=_options(args.train_option))
    extra = _options(args.report_option)
    pair = [folders[name][0] for name in OPTIMIZERS]
    everything = [f for name in OPTIMIZERS for f in folders[name]]
    reports = [(pair, out / "report-seed0")] + ([(everything, out / "report-seeds")] if len(seeds) > 1 else [])
    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(reports)))) as pool:
        list(pool.map(lambda job: report(*job, extra), reports))

    seed = seeds[0]
    shown = " ".join(os.path.relpath(folder) for folder in pair)
    parts = [f"Seed {seed} (`sharpscope report {shown} {' '.join(REPORT_ARGS)}`):\n",
             seed0_table(out / "report-seed0", pair)]
    if len(seeds) > 1:
        parts += [f"\nSeeds {args.seeds} (`sharpscope report --summary-only` of all {len(everything)} runs): mean "
                  f"± standard deviation over seeds; a difference is resolved when it exceeds 2 standard errors "
                  f"of the difference of the means (std / sqrt({len(seeds)}) each):\n",
                  seeds_table(out / "report-seeds", folders)]
    markdown = "\n".join(parts) + "\n"
    from sharpscope.io import write_json, write_text

    write_text(out / "tables.md", markdown)
    write_json(out / "tables.json", {"seeds": seeds, "train_args": _options(args.train_option),
                                     "report_args": [*REPORT_ARGS, *extra],
                                     "seconds": round(time.time() - started, 1)})
    print()
    print(markdown)
    print(f"wrote {out / 'tables.md'} ({time.time() - started:.0f} s)")
    if args.all:
        for _, script, options in OTHER_SCRIPTS:
            run([sys.executable, str(EXAMPLES.parent / script), *options])


if __name__ == "__main__":
    main()

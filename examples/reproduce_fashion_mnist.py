"""Reproduce the seed experiment of DESIGN.md section 9 on the real Fashion-MNIST: ConvNet, SGD vs SAM.

Setting (as in the SAM paper's Fashion-MNIST runs): p = 2, rho = 0.05, cosine schedule, lr 0.1, momentum 0.9,
weight decay 1e-4, batch 128. They report SGD 87.30% vs SAM 87.51% test accuracy. On a 2-core CPU we train
fewer epochs (default 5) and several seeds, then measure every final model:

1. ``sharpscope train`` for each optimizer and seed             -> RUNS/e{epochs}/{sgd,sam}-seed{N}/
2. ``sharpscope report`` of the seed-0 pair (surfaces, spectra over the trajectory, density, m-sharpness)
                                                                -> RESULTS/e{epochs}/report/report.html
3. ``sharpscope hessian-spectrum`` of the other seeds' final.pt (lambda_max, Hutch++ trace; the seed-0 pair's come
   from the report's ``spectrum-final/``, computed with the same settings)
                                                                -> RESULTS/e{epochs}/hessian/
4. ``sharpscope sharpness`` of every final.pt (worst-case m-sharpness, rho = 0.05, m = 8 and 128)
                                                                -> RESULTS/e{epochs}/sharpness/
5. the table (mean +- std over seeds)                           -> RESULTS/e{epochs}/table.{md,json}

Every step resumes or reuses what is already on disk, so the script can be killed and rerun at any time.

    python examples/reproduce_fashion_mnist.py --epochs 5 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPTIMIZERS = ("sgd", "sam")
SHARPNESS_M = (8, 128)  # samples per chunk of m-sharpness (Foret et al. section 4.1)
SHARPNESS_RHO = 0.05
SHARPNESS_STEPS = 20  # projected-ascent steps of the worst-case estimate (Andriushchenko et al. 2023 use 20)


def run(cmd: list[str]) -> None:
    """Run one sharpscope command, echoing it; stop the script on failure."""
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    print(f"  done in {time.time() - started:.0f}s", flush=True)


def sharpscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "sharpscope", *args]


def train_all(runs: Path, seeds: list[int], epochs: int, data_dir: str | None) -> dict[str, list[Path]]:
    folders: dict[str, list[Path]] = {name: [] for name in OPTIMIZERS}
    for seed in seeds:
        for optimizer in OPTIMIZERS:
            out = runs / f"{optimizer}-seed{seed}"
            folders[optimizer].append(out)
            if (out / "final.pt").exists():
                continue
            sam = ["--rho", "0.05"] if optimizer == "sam" else []  # train refuses SAM options for plain SGD
            cmd = sharpscope("train", "--dataset", "fashion-mnist", "--model", "convnet", "--optimizer", optimizer,
                             *sam, "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
                             "--batch-size", "128", "--epochs", str(epochs), "--seed", str(seed),
                             "--save-every", "1", "--out", str(out))
            if data_dir:
                cmd += ["--data-dir", data_dir]
            run(cmd)
    return folders


def analyse_all(folders: dict[str, list[Path]], results: Path, data_dir: str | None) -> None:
    finals = [str(folder / "final.pt") for name in OPTIMIZERS for folder in folders[name]]
    extra = ["--data-dir", data_dir] if data_dir else []
    if not (results / "report" / "report.html").exists():
        pair = [str(folders[name][0]) for name in OPTIMIZERS]
        run(sharpscope("report", *pair, *extra, "--out", str(results / "report")))
    # the report measured the seed-0 pair's lambda_max and trace (spectrum-final: top-1 at the residual rule, Hutch++
    # to 2%, the same evaluation set and seed as this step): only the other seeds' final models are left
    others = [str(folder / "final.pt") for name in OPTIMIZERS for folder in folders[name][1:]]
    hessian_json = results / "hessian" / "spectrum.json"
    if others and (not hessian_json.exists() or _missing(hessian_json, others)):
        run(sharpscope("hessian-spectrum", *others, "--top-k", "1", "--trace", "--no-warm-start", *extra,
                       "--out", str(results / "hessian")))
    if not (results / "sharpness" / "sharpness.json").exists() or _missing(results / "sharpness" / "sharpness.json",
                                                                            finals):
        run(sharpscope("sharpness", *finals, "--measure", "worst", "--m", ",".join(map(str, SHARPNESS_M)),
                       "--rho", str(SHARPNESS_RHO), "--steps", str(SHARPNESS_STEPS), "--max-chunks", "32", *extra,
                       "--out", str(results / "sharpness")))


def _missing(json_path: Path, finals: list[str]) -> bool:
    """True when the results file does not cover every final checkpoint yet (then the command resumes it)."""
    listed = {entry["path"] for entry in json.loads(json_path.read_text())["checkpoints"]}
    return not set(finals) <= listed


def _mean_std(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [scale * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def tabulate(folders: dict[str, list[Path]], results: Path, epochs: int, seeds: list[int]) -> str:
    spectrum = {}
    for path in (results / "report" / "spectrum-final" / "spectrum.json", results / "hessian" / "spectrum.json"):
        if path.exists():
            # keyed by the resolved path: the report may name a checkpoint otherwise than this script does
            spectrum.update({str(Path(c["path"]).resolve()): c for c in json.loads(path.read_text())["checkpoints"]})
    sharp_rows = json.loads((results / "sharpness" / "sharpness.json").read_text())["rows"]
    sharp = {(r["checkpoint"], r["m"]): r["value"] for r in sharp_rows if r["rho"] == SHARPNESS_RHO}
    table: dict[str, list[dict]] = {}
    for name in OPTIMIZERS:
        table[name] = []
        for folder in folders[name]:
            metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            final = str(folder / "final.pt")
            measured = spectrum[str(Path(final).resolve())]
            table[name].append({
                "run": str(folder), "test_acc": metrics[-1]["test_acc"], "train_acc": metrics[-1]["train_acc"],
                "seconds": sum(m["seconds"] for m in metrics),
                "lambda_max": measured["top_eigenvalues"][0], "trace": measured["trace"]["value"],
                **{f"sharpness_m{m}": sharp[(final, m)] for m in SHARPNESS_M}})
    m_small, m_large = SHARPNESS_M
    rows = [f"| optimizer | test accuracy % | train accuracy % (running, last epoch) | λ_max | trace | "
            f"m-sharpness, m = {m_small} | "
            f"m-sharpness, m = {m_large} | s/epoch, fastest seed |", "|---|---|---|---|---|---|---|---|"]
    for name, entries in table.items():
        column = {key: [e[key] for e in entries] for key in entries[0] if key != "run"}
        per_epoch = min(column["seconds"]) / epochs  # the machine is shared: the fastest seed is the least disturbed
        rows.append(f"| {name.upper()} | {_mean_std(column['test_acc'], 2, 100)} | "
                    f"{_mean_std(column['train_acc'], 2, 100)} | {_mean_std(column['lambda_max'], 2)} | "
                    f"{_mean_std(column['trace'], 0)} | {_mean_std(column[f'sharpness_m{m_small}'], 4)} | "
                    f"{_mean_std(column[f'sharpness_m{m_large}'], 4)} | {per_epoch:.0f} |")
    note = (f"\nFashion-MNIST, convnet, {epochs} epochs, seeds {','.join(map(str, seeds))}; mean ± std over seeds. "
            f"λ_max and trace (Hutch++) of the training loss Hessian and worst-case m-sharpness (ρ = {SHARPNESS_RHO}, "
            f"{SHARPNESS_STEPS} ascent steps) on the first 1024 training samples, each final model in eval mode.\n")
    markdown = "\n".join(rows) + "\n" + note

    from sharpscope.io import write_json, write_text

    write_json(results / "table.json", {"epochs": epochs, "seeds": seeds, "runs": table})
    write_text(results / "table.md", markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="runs/fashion-mnist", help="where the run folders go (RUNS)")
    parser.add_argument("--results", default="results/fashion-mnist", help="where analyses and table go (RESULTS)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-analyses", action="store_true", help="train only, then tabulate accuracies")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, results = Path(args.runs) / f"e{args.epochs}", Path(args.results) / f"e{args.epochs}"
    folders = train_all(runs, seeds, args.epochs, args.data_dir)
    if args.no_analyses:
        for name in OPTIMIZERS:
            accs = [json.loads((f / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"] for f in folders[name]]
            print(f"{name.upper()}: test accuracy {_mean_std(accs, 2, 100)} %")
        return
    analyse_all(folders, results, args.data_dir)
    print(tabulate(folders, results, args.epochs, seeds))
    print(f"wrote {results}/table.md, {results}/table.json and {results}/report/report.html")


if __name__ == "__main__":
    main()

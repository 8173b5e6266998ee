"""``sharpscope sharpness``: sharpness measures of checkpoints, and how well they rank generalization.

A thin shell over :func:`sharpscope.sharpness.run_measure`: load each checkpoint and its fixed evaluation set,
measure its generalization gap (:func:`sharpscope.sharpness.generalization_gap`) and run every ``--measure``,
writing after each (checkpoint, measure) so an interrupted run resumes; then write the arrays, the figures and
(for several checkpoints) Kendall's tau with the gap.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from sharpscope.cli.options import (
    MAX_COUNT,
    FloatList,
    IntList,
    device_option,
    eval_set_options,
    model_spec_option,
    default_out,
    out_options,
    resolve_device,
    seed_option,
    show_progress,
)

OUTPUTS = ["sharpness.json", "sharpness.npz", "sharpness_vs_rho.png", "kendall_tau.json", "kendall_tau.png"]
#: At most this many checkpoints side by side in sharpness_vs_rho.png; with more, the last one of each run folder.
MAX_PANELS = 6


class MeasureList(click.ParamType):
    """Measure names, comma-separated and/or repeated: ``worst,average`` or ``--measure worst --measure keskar``."""

    name = "MEASURE,..."

    def convert(self, value: Any, param, ctx) -> list[str]:
        from sharpscope.errors import unknown_name_error
        from sharpscope.sharpness.suite import MEASURES

        if isinstance(value, list):
            return value
        names = [v.strip() for v in str(value).split(",") if v.strip()]
        if not names:
            self.fail(f"expected measure names like worst,average, got {value!r}", param, ctx)
        for name in names:
            if name not in MEASURES:
                self.fail(str(unknown_name_error("measure", name, MEASURES)), param, ctx)
        return names


def _labels(paths: list[Path]) -> dict[Path, str]:
    """``run/file`` per checkpoint, with run names that tell distinct folders apart (``seedA/sgd/final.pt`` and
    ``seedB/sgd/final.pt``, not two ``sgd/final.pt``): the labels key the figure's panels."""
    from sharpscope.cli.inputs import run_names

    names = run_names([path.parent for path in paths])
    return {path: f"{name}/{path.name}" for path, name in zip(paths, names)}


def _same_config(old: dict, new: dict) -> bool:
    """Whether a previous sharpness.json's config matches; one written before the gap was measured (no "gap"
    settings) matches on the rest: its entries stay valid, and each checkpoint's gap is measured and added."""
    if "gap" not in old:
        new = {key: value for key, value in new.items() if key != "gap"}
    return old == new


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


@click.command(context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--measure", "measures", multiple=True, type=MeasureList(), default=["worst"],
              help="Measures to compute, comma-separated or repeated.  " + (
                  "worst: worst-case (ascent) on --m x --rho; average: average-case (noise) on --m x --rho; "
                  "adaptive: worst-case with c = |w|+eta on --m x --adaptive-rho; keskar: Keskar et al. 2017 "
                  "eps-sharpness for each --keskar-eps; pacbayes / pacbayes-mag: Jiang et al. 2020 PAC-Bayes "
                  "flatness 1/sigma'^2 (plain / magnitude-aware)."))
@click.option("--m", "m_values", type=IntList(), default="1,8,32,128",
              help="Samples per chunk B (m-sharpness, Foret et al. 2021 sec. 4.1); each must be <= --num-samples.")
@click.option("--rho", "rho_values", type=FloatList(positive=True), default="0.01,0.05,0.1",
              help="Radii of worst/average. For --p inf use far smaller ones (~1e-3).")
@click.option("--adaptive-rho", "adaptive_rho_values", type=FloatList(positive=True), default="0.5,1,2",
              help="Radii of adaptive (relative to |w|+eta, so larger, as for ASAM).")
@click.option("--p", "p", type=click.Choice(["2", "inf"]), default="2",
              help="Norm of the ball (worst, adaptive); Gaussian (2) or uniform (inf) noise (average).")
@click.option("--steps", type=click.IntRange(min=1), default=20,
              help="Ascent steps of worst/adaptive/keskar (1 = SAM's one-step estimate; 20 as Andriushchenko "
                   "et al. 2023).")
@click.option("--num-draws", type=click.IntRange(min=1), default=20, help="Noise draws per chunk of average.")
@click.option("--eta", type=click.FloatRange(min=0, min_open=True), default=0.01, help="c = |w| + eta of adaptive.")
@click.option("--max-chunks", type=click.IntRange(min=1), default=None,
              help="Use at most this many chunks per m (bounds the cost of small m) [default: all].")
@click.option("--keskar-eps", type=FloatList(positive=True), default="0.001,0.0005",
              help="Box sizes of keskar (Keskar et al. 2017 use 1e-3 and 5e-4).")
@click.option("--pacbayes-draws", type=click.IntRange(min=1), default=10, help="Noise draws per sigma of pacbayes.")
@click.option("--gap-samples", type=click.IntRange(min=1, max=MAX_COUNT), default=None,
              help="Measure the generalization gap on the first N samples of each of the train and test splits "
                   "(bounds its cost on big datasets; more than a split has = all of it) [default: whole splits].")
@model_spec_option
@eval_set_options
@seed_option
@device_option
@out_options
@click.pass_context
def command(ctx, checkpoints, measures, m_values, rho_values, adaptive_rho_values, p, steps, num_draws, eta,
            max_chunks, keskar_eps, pacbayes_draws, gap_samples, model_spec, dataset, split, num_samples, batch_size,
            data_dir, seed, device, out, overwrite):
    """Sharpness of checkpoints: m-sharpness grids, Keskar and PAC-Bayes measures, and their Kendall tau with
    the generalization gap.

    \b
    Examples:
      sharpscope sharpness runs/*/final.pt --m 1,8,32,128 --rho 0.01,0.05,0.1 --out results/sharpness
      sharpscope sharpness runs/sgd runs/sam --measure worst,keskar,pacbayes --steps 5 --out results/traj
      sharpscope sharpness runs/sam/final.pt --measure adaptive --p inf --adaptive-rho 0.001,0.002 --out r/ada

    CHECKPOINTS are checkpoint files or run folders (all their checkpoints). Every measure uses the same fixed
    evaluation set (--split, first --num-samples samples, no augmentation), the model in eval mode and plain
    cross-entropy (no label smoothing). Chunks of m samples are cut from a --seed shuffled copy of it; the last
    num-samples mod m samples are left out.

    Each checkpoint's generalization gap = test error - train error is measured at its weights (eval mode, no
    augmentation) on the train and test splits of its dataset (--dataset): whole splits, or the first
    --gap-samples of each. (The metrics' train_acc a trainer logs is a running average over an epoch of moving
    weights and augmented data, so the gap it gives is biased; it is kept as metrics_generalization_gap.)

    Writes into --out: sharpness.json (config, provenance, per checkpoint: train_error, test_error,
    generalization_gap; per checkpoint/measure/m/rho: value, stderr, steps), sharpness.npz,
    sharpness_vs_rho.png and, with two or more checkpoints, kendall_tau.json/.png (also printed).
    sharpness.json is rewritten after each (checkpoint, measure): rerunning the same command resumes.
    """
    from sharpscope.cli.inputs import expand_checkpoints
    from sharpscope.errors import SharpscopeError
    from sharpscope.io import prepare_out_dir
    from sharpscope.sharpness.suite import SuiteConfig

    names = list(dict.fromkeys(name for group in measures for name in group))
    config = SuiteConfig(
        measures=tuple(names), m_values=tuple(m_values), rho_values=tuple(rho_values),
        adaptive_rho_values=tuple(adaptive_rho_values), p=math.inf if p == "inf" else 2.0, steps=steps,
        num_draws=num_draws, eta=eta, max_chunks=max_chunks, keskar_eps=tuple(keskar_eps),
        pacbayes_draws=pacbayes_draws, seed=seed, batch_size=batch_size,
    )
    full_config = {"suite": config.to_dict(),
                   "eval": {"dataset": dataset, "split": split, "num_samples": num_samples, "data_dir": data_dir,
                            **({"model_spec": model_spec} if model_spec else {})},
                   "gap": {"num_samples": gap_samples}}
    paths = list(dict.fromkeys(expand_checkpoints(list(checkpoints))))
    out = Path(out or default_out("sharpness", [str(c) for c in checkpoints]))
    json_path = out / "sharpness.json"
    previous = None
    if json_path.exists() and not overwrite:
        try:
            previous = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is None or not _same_config(previous.get("config") or {}, full_config):
            diff = _config_differences((previous or {}).get("config") or {}, full_config)
            raise SharpscopeError(
                f"{json_path} holds results of a different configuration ({'; '.join(diff[:4]) or 'unreadable'}); "
                "pass --overwrite to replace them or choose another --out"
            )
    prepare_out_dir(out, outputs=OUTPUTS, overwrite=overwrite, resume=previous is not None)
    from sharpscope import distributed

    # under torchrun the chunks of the grid measures are split over the ranks and gathered (the same numbers as
    # one process); keskar and pacbayes run whole on every rank; rank 0 alone writes and prints
    rank_info, dev = distributed.setup(resolve_device(device))
    shard = (rank_info.rank, rank_info.world_size) if rank_info.enabled else None
    try:
        _run(ctx, paths, names, config, full_config, previous, out, json_path, overwrite, rank_info, shard, dev,
             dataset, split, num_samples, batch_size, data_dir, model_spec, gap_samples)
    finally:
        if rank_info.enabled:  # leave together: a rank exiting while gloo still talks to it aborts the job
            distributed.barrier()
            distributed.teardown()


def _run(ctx, paths, names, config, full_config, previous, out, json_path, overwrite, rank_info, shard, dev,
         dataset, split, num_samples, batch_size, data_dir, model_spec, gap_samples) -> None:
    """The body of the command (after the arguments are checked), on every rank."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from sharpscope.cli.inputs import analysis_inputs, check_finite_loss
    from sharpscope.io import write_json
    from sharpscope.results import file_sha256, provenance
    from sharpscope.sharpness.generalization import generalization_gap
    from sharpscope.sharpness.suite import progress_total, run_measure

    if rank_info.is_main:
        for derived in OUTPUTS[1:]:  # rebuilt from sharpness.json at the end; stale ones must not outlive it
            (out / derived).unlink(missing_ok=True)
    done = {(e["sha256"], e["measure"]): e for e in (previous or {}).get("entries", [])}
    # a record without a measured gap (written before it was measured) is rebuilt
    known = {c["sha256"]: c for c in (previous or {}).get("checkpoints", []) if "train_error" in c}
    labels = _labels(paths)
    datasets: dict[str, Any] = {}  # name -> ImageDataset, loaded once for the gaps of all checkpoints
    loss_fn = torch.nn.CrossEntropyLoss()
    progress = show_progress(ctx) and rank_info.is_main
    records: list[dict] = []
    entries: list[dict] = []
    reused = 0

    sources = provenance(paths)

    def save() -> None:
        if not rank_info.is_main:
            return
        write_json(json_path, {"config": full_config, "provenance": sources, "checkpoints": records,
                               "entries": entries, "rows": _rows(records, entries)})

    for path in paths:
        sha = file_sha256(path)
        todo = [name for name in names if (sha, name) not in done]
        record = known.get(sha)
        checkpoint = data = None
        if todo or record is None:
            checkpoint, data = analysis_inputs(path, dataset=dataset, split=split, num_samples=num_samples,
                                               batch_size=batch_size, device=dev, data_dir=data_dir,
                                               model_spec=model_spec)
            check_finite_loss(checkpoint.model, loss_fn, data, path)
        if record is None:  # saved with the checkpoint's first entry (a failing first measure leaves no file)
            train_batches, test_batches, total = _gap_batches(datasets, dataset or checkpoint.dataset, data_dir,
                                                              gap_samples, batch_size, dev)
            # every rank measures the whole gap (one pass over both splits: cheap next to the measures)
            with tqdm(total=total, desc=f"{labels[path]} gap", unit="sample", leave=False, disable=not progress,
                      file=sys.stderr) as bar:
                gap = generalization_gap(checkpoint.model, loss_fn, train_batches, test_batches, progress=bar.update)
            record = {"epoch": checkpoint.epoch, "metrics": checkpoint.metrics, **gap.to_dict(),
                      "metrics_generalization_gap": checkpoint.generalization_gap,
                      "num_eval_samples": data.num_samples}
        record = {**record, "path": str(path), "label": labels[path], "sha256": sha}
        records.append(record)
        for name in names:
            if (sha, name) in done:
                entries.append({**done[(sha, name)], "checkpoint": str(path)})
                reused += 1
                continue
            total = progress_total(name, config, record["num_eval_samples"])
            started = time.perf_counter()
            with tqdm(total=total, desc=f"{labels[path]} {name}", unit="chunk" if total else "it", leave=False,
                      disable=not progress, file=sys.stderr) as bar:
                result = run_measure(name, checkpoint.model, loss_fn, data, config, progress=bar.update, shard=shard)
            entries.append({"checkpoint": str(path), "sha256": sha, "measure": name,
                            "seconds": round(time.perf_counter() - started, 3), "result": result})
            save()
        del checkpoint, data
    if not rank_info.is_main:
        return
    save()
    written = [json_path]
    written.append(_write_arrays(out, config, records, entries, np))
    figure = _write_sharpness_figure(out, records, entries)
    if figure:
        written.append(figure)
    table = _kendall_table(records, entries)
    if table is not None:
        pvalues = _kendall_pvalues(records, entries, table)
        written += _write_kendall(out, records, table, pvalues)
    _print_summary(records, entries, table, reused, pvalues if table is not None else None)
    for path in written:
        click.echo(f"wrote {path}")


def _gap_batches(datasets: dict, name: str, data_dir: str | None, gap_samples: int | None, batch_size: int,
                 device) -> tuple[Any, Any, int]:
    """``(train batches, test batches, samples in both)`` the generalization gap is measured on: the first
    ``gap_samples`` (all when None or more) of each split of dataset ``name``, normalised as in training, no
    augmentation, in the stored order; built one batch at a time (a whole normalised split can be large)."""
    from sharpscope.data import load_dataset, normalize

    if name not in datasets:
        datasets[name] = load_dataset(name, data_dir=data_dir)  # analysis_inputs just read it: no error here
    data = datasets[name]

    def batches(images, labels):
        for start in range(0, len(labels), batch_size):
            window = slice(start, start + batch_size)
            yield normalize(images[window].to(device), data.mean, data.std), labels[window].to(device)

    splits = []
    for split in ("train", "test"):
        images, labels = data.split(split)
        count = len(labels) if gap_samples is None else min(gap_samples, len(labels))
        splits.append((images[:count], labels[:count]))
    total = sum(len(labels) for _, labels in splits)
    return batches(*splits[0]), batches(*splits[1]), total


# ------------------------------------------------------------------------------------------------- outputs
def _rows(records: list[dict], entries: list[dict]) -> list[dict]:
    """The flat table of sharpness.json: one row per checkpoint, measure, m and rho."""
    by_path = {r["path"]: r for r in records}
    rows = []
    for entry in entries:
        ckpt = by_path[entry["checkpoint"]]
        base = {"checkpoint": ckpt["path"], "label": ckpt["label"], "measure": entry["measure"],
                "generalization_gap": ckpt["generalization_gap"]}
        result = entry["result"]
        if result["kind"] == "grid":
            for m, values, errors in zip(result["m_values"], result["values"], result["stderr"]):
                for rho, value, error in zip(result["rho_values"], values, errors):
                    rows.append({**base, "m": m, "rho": rho, "value": value, "stderr": error,
                                 "steps": result["steps"]})
        elif result["kind"] == "keskar":
            for eps, value in zip(result["eps_values"], result["values"]):
                rows.append({**base, "m": result["num_samples"], "rho": eps, "value": value, "stderr": None,
                             "steps": result["steps"]})
        else:
            rows.append({**base, "m": None, "rho": None, "value": result["measure"], "stderr": None,
                         "steps": result["evaluations"], "sigma": result["sigma"]})
    return rows


def _write_arrays(out: Path, config, records: list[dict], entries: list[dict], np) -> Path:
    """sharpness.npz: per measure arrays stacked over checkpoints (NaN where not computed)."""
    from sharpscope.io import write_npz

    index = {r["path"]: i for i, r in enumerate(records)}
    n = len(records)
    arrays: dict[str, Any] = {
        "checkpoints": np.array([r["path"] for r in records]),
        **{key: np.array([r[key] for r in records], dtype=np.float64)
           for key in ("train_error", "test_error", "generalization_gap")},
        "m_values": np.array(config.m_values), "rho_values": np.array(config.rho_values),
        "adaptive_rho_values": np.array(config.adaptive_rho_values), "keskar_eps": np.array(config.keskar_eps),
    }
    for name in config.measures:
        for entry in (e for e in entries if e["measure"] == name):
            i, result = index[entry["checkpoint"]], entry["result"]
            key = name.replace("-", "_")
            if result["kind"] == "grid":
                for field in ("values", "stderr"):
                    grid = np.array(result[field], dtype=np.float64)
                    arrays.setdefault(f"{key}_{field}", np.full((n, *grid.shape), np.nan))[i] = grid
            elif result["kind"] == "keskar":
                arrays.setdefault(f"{key}_values", np.full((n, len(result["values"])), np.nan))[i] = result["values"]
            else:
                arrays.setdefault(f"{key}_sigma", np.full(n, np.nan))[i] = result["sigma"]
                arrays.setdefault(f"{key}_values", np.full(n, np.nan))[i] = result["measure"]
    return write_npz(out / "sharpness.npz", **arrays)


def _figure_checkpoints(records: list[dict]) -> list[dict]:
    if len(records) <= MAX_PANELS:
        return records
    last_per_run: dict[str, dict] = {}
    for record in records:
        last_per_run[str(Path(record["path"]).parent)] = record
    return list(last_per_run.values())[-MAX_PANELS:]


def _write_sharpness_figure(out: Path, records: list[dict], entries: list[dict]) -> Path | None:
    from sharpscope.io import save_figure
    from sharpscope.plots.sharpness import sharpness_vs_rho
    from sharpscope.sharpness.result import SharpnessResult

    panels: dict[str, dict[str, SharpnessResult]] = {}
    for record in _figure_checkpoints(records):
        grids = {e["measure"]: SharpnessResult.from_dict(e["result"]) for e in entries
                 if e["checkpoint"] == record["path"] and e["result"]["kind"] == "grid"}
        if grids:
            panels[record["label"]] = grids
    if not panels:
        return None
    return save_figure(sharpness_vs_rho(panels), out / "sharpness_vs_rho.png")


def _kendall_columns(records: list[dict], entries: list[dict]) -> dict[str, list[float]]:
    """Every scalar measure (:func:`~sharpscope.sharpness.ranking_values`) as one value per checkpoint of
    ``records``, NaN where a checkpoint lacks it."""
    from sharpscope.sharpness.suite import ranking_values

    columns: dict[str, dict[str, float]] = {}
    for entry in entries:
        for label, value in ranking_values(entry["measure"], entry["result"]).items():
            columns.setdefault(label, {})[entry["checkpoint"]] = value
    return {label: [values.get(r["path"], math.nan) for r in records] for label, values in columns.items()}


def _kendall_table(records: list[dict], entries: list[dict]) -> dict[str, float] | None:
    """Kendall tau of every scalar measure (:func:`_kendall_columns`) with the measured gaps across the
    checkpoints, NaN where a checkpoint lacks the measure; None for fewer than 2 checkpoints."""
    from sharpscope.sharpness.correlation import kendall_tau

    if len(records) < 2:
        return None
    gaps = [r["generalization_gap"] for r in records]
    return {label: kendall_tau(column, gaps) if all(math.isfinite(v) for v in column) else math.nan
            for label, column in _kendall_columns(records, entries).items()}


def _kendall_pvalues(records: list[dict], entries: list[dict], table: dict[str, float]) -> dict[str, float]:
    """Two-sided p-value of each tau of :func:`_kendall_table` (NaN where the tau is)."""
    from sharpscope.sharpness.correlation import kendall_tau_pvalue

    gaps = [r["generalization_gap"] for r in records]
    columns = _kendall_columns(records, entries)
    return {label: kendall_tau_pvalue(columns[label], gaps) if math.isfinite(tau) else math.nan
            for label, tau in table.items()}


def _write_kendall(out: Path, records: list[dict], table: dict[str, float], pvalues: dict[str, float]) -> list[Path]:
    """kendall_tau.json and kendall_tau.png of :func:`_kendall_table`'s table."""
    from sharpscope.io import save_figure, write_json
    from sharpscope.plots.sharpness import kendall_tau_bars

    document = {"num_checkpoints": len(records), "checkpoints": [r["path"] for r in records],
                "generalization_gap": [r["generalization_gap"] for r in records], "tau": table, "p_value": pvalues,
                "definition": "Kendall tau-b between each measure and the generalization gap (test error - train "
                              "error, measured at each checkpoint's weights) across checkpoints"}
    paths = [write_json(out / "kendall_tau.json", document)]
    paths.append(save_figure(kendall_tau_bars(table, num_models=len(records), pvalues=pvalues),
                             out / "kendall_tau.png"))
    return paths


def _print_summary(records: list[dict], entries: list[dict], table: dict[str, float] | None, reused: int,
                   pvalues: dict[str, float] | None = None) -> None:
    for record in records:
        click.echo(f"{record['label']}  (train error {record['train_error']:.4f}, test error "
                   f"{record['test_error']:.4f}, generalization gap {record['generalization_gap']:+.4f})")
        for entry in (e for e in entries if e["checkpoint"] == record["path"]):
            result, name = entry["result"], entry["measure"]
            if result["kind"] == "grid":
                header = "  ".join(f"rho={rho:<8g}" for rho in result["rho_values"])
                click.echo(f"  {name:<9} {header}")
                for m, values in zip(result["m_values"], result["values"]):
                    cells = "  ".join(f"{'nan' if v is None else format(v, '.4g'):<12}" for v in values)
                    click.echo(f"    m={m:<5} {cells}")
            elif result["kind"] == "keskar":
                cells = ", ".join(f"eps={e:g}: {v:.4g}" for e, v in zip(result["eps_values"], result["values"]))
                click.echo(f"  {name:<9} {cells}")
            else:
                flag = "" if result["bracketed"] else " (at the end of the search range)"
                click.echo(f"  {name:<9} sigma'={result['sigma']:.4g}  1/sigma'^2={result['measure']:.4g}{flag}")
    if table is not None:
        click.echo(f"Kendall tau with the generalization gap ({len(records)} checkpoints):")
        width = max(map(len, table))
        for label, tau in table.items():
            p = (pvalues or {}).get(label, math.nan)
            click.echo(f"  {label:<{width}}  {'n/a' if math.isnan(tau) else format(tau, '+.3f')}"
                       + ("" if math.isnan(p) else f"  (p = {p:.2g})"))
    if reused:
        click.echo(f"reused {reused} result(s) from a previous run with the same configuration")

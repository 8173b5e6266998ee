"""``sharpscope hessian-spectrum``: a thin shell over :func:`sharpscope.hessian.analyze_checkpoint`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from sharpscope.cli.options import (
    device_option,
    eval_set_options,
    model_spec_option,
    default_out,
    out_options,
    resolve_device,
    seed_option,
    show_progress,
)

FORMAT = "sharpscope-hessian-spectrum"
FORMAT_VERSION = 1
JSON_NAME, NPZ_NAME = "spectrum.json", "spectrum.npz"
#: Results of checkpoints whose eigenvectors take at most this many bytes are kept for reuse by a later identical file.
TWIN_BYTES = 256 << 20
TOP_FIGURE, DENSITY_FIGURE = "top_eigenvalues.png", "density.png"


@click.command(context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--top-k", type=click.IntRange(min=1), default=5, help="Largest eigenvalues per checkpoint.")
@click.option("--bottom-k", type=click.IntRange(min=0), default=0,
              help="Smallest (most negative) eigenvalues per checkpoint (a second Lanczos run).")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=1e-6,
              help="Lanczos stopping rule: ||Hv - lambda v|| <= tol * |lambda_max| for every pair (see --criterion).")
@click.option("--criterion", type=click.Choice(["residual", "eigenvalue"]), default="residual",
              help="Lanczos convergence test: residual (accurate eigenvectors too, best for warm starts) or "
                   "eigenvalue (estimated relative eigenvalue error residual^2/gap <= tol: about half the products).")
@click.option("--max-matvecs", type=click.IntRange(min=1), default=None,
              help="Hessian-vector product budget per Lanczos run [default: max(300, 30 k)].")
@click.option("--trace", is_flag=True,
              help="Estimate the trace with Hutch++, deflated by the top-k eigenvectors, until --trace-rtol.")
@click.option("--trace-rtol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Relative standard error the trace estimate stops at (stderr <= rtol * |trace|)  "
                   "[default: 0.02]")
@click.option("--trace-matvecs", type=click.IntRange(min=4), default=None,
              help="A fixed budget of products for the trace instead (classical Hutch++, m/3 sketch).")
@click.option("--density", is_flag=True,
              help="Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).")
@click.option("--density-tol", type=click.FloatRange(min=0), default=0.01,
              help="Each density run stops when the Chebyshev-Markov-Stieltjes bound on its quadrature's "
                   "Wasserstein-1 error is below this fraction of its spectral range; 0: always --density-iters.")
@click.option("--density-iters", type=click.IntRange(min=1), default=90,
              help="Most Lanczos steps per density run (exactly this many with --density-tol 0).")
@click.option("--density-runs", type=click.IntRange(min=1), default=5, help="Random start vectors for the density.")
@click.option("--per-layer", is_flag=True, help="Also the top eigenvalue of each layer's own Hessian block.")
@click.option("--warm-start/--no-warm-start", default=True,
              help="Start each checkpoint's Lanczos run from the previous checkpoint's eigenvectors (same run).")
@model_spec_option
@eval_set_options
@device_option
@seed_option
@out_options
@click.pass_context
def command(ctx, checkpoints, top_k, bottom_k, tol, criterion, max_matvecs, trace, trace_rtol, trace_matvecs, density,
            density_tol, density_iters, density_runs, per_layer, warm_start, model_spec, dataset, split, num_samples, batch_size, data_dir,
            device, seed, out, overwrite):
    """Hessian top eigenvalues (and trace, spectral density) of checkpoints along training.

    \b
    Examples:
      sharpscope hessian-spectrum runs/sgd/final.pt --out results/spectrum
      sharpscope hessian-spectrum runs/sgd runs/sam --top-k 5 --density --trace --out results/spectrum
      sharpscope hessian-spectrum runs/sam/ckpt-*.pt --bottom-k 1 --per-layer --out results/sam-spectrum

    CHECKPOINTS are checkpoint files or run folders (their ckpt-epoch*.pt and final.pt). They are grouped by
    run (the parent folder's name) and sorted by epoch. The Hessian is that of the mean loss over a fixed
    evaluation set: by default the first 1024 training samples in batches of 500, model in eval mode.

    Budgets follow precision: the trace (adaptive Hutch++ deflated by the top-k eigenvectors) stops at the
    relative standard error --trace-rtol, each density run when its quadrature's Wasserstein-1 error bound is
    below --density-tol of the spectral range; --trace-matvecs N and --density-tol 0 give the classical fixed
    budgets. The summary prints every estimate with its standard error and products spent.

    Writes spectrum.json (per checkpoint: run, epoch, top eigenvalues, residuals, Hessian-vector products,
    convergence, trace +- stderr, density summary), the arrays in spectrum.npz, top_eigenvalues.png (one panel
    per run) and, with --density, density.png (all checkpoints overlaid) and one density-RUN_CKPT.png each.
    Results are saved after every checkpoint: rerunning with the same settings reuses finished checkpoints (an
    interrupted run resumes), and naming further checkpoints adds them to the results already in --out.
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from sharpscope.cli.inputs import analysis_inputs, check_finite_loss, expand_checkpoints, run_names
    from sharpscope.errors import SharpscopeError
    from sharpscope.hessian import analyze_checkpoint
    from sharpscope.io import prepare_out_dir, save_figure, save_torch
    from sharpscope.plots.spectrum import plot_densities, plot_density, plot_top_eigenvalues
    from sharpscope.results import provenance
    from sharpscope.train.checkpoint import read_checkpoint_file

    if trace_rtol is not None and trace_matvecs is not None:
        raise click.UsageError("give --trace-rtol (a precision target) or --trace-matvecs (a fixed budget), not both")
    if trace_matvecs is None and trace_rtol is None:
        from sharpscope.hessian.trace import DEFAULT_RTOL

        trace_rtol = DEFAULT_RTOL
    config = {
        "top_k": top_k, "bottom_k": bottom_k, "tol": tol, "max_matvecs": max_matvecs, "trace": trace,
        "trace_matvecs": trace_matvecs, "trace_rtol": trace_rtol, "trace_method": "hutch++", "density": density,
        "density_iters": density_iters, "density_tol": density_tol, "density_runs": density_runs,
        "per_layer": per_layer,
        "dataset": dataset, "split": split, "num_samples": num_samples, "batch_size": batch_size,
        "model_spec": model_spec, "seed": seed, "eval_mode": True, "criterion": criterion,
    }
    out_dir = Path(out or default_out("hessian-spectrum", [str(c) for c in checkpoints]))
    previous = _previous_results(out_dir / JSON_NAME)
    resume = False
    if previous is not None and not overwrite:
        # files from before --criterion, --trace-rtol and --density-tol (fixed budgets then)
        before = {"criterion": "residual", "trace_rtol": None, "density_tol": 0, **(previous.get("config") or {})}
        if before != config:
            changed = sorted(k for k in set(config) | set(before) if config.get(k) != before.get(k))
            raise SharpscopeError(
                f"{out_dir}/ holds results computed with other settings ({', '.join(changed)} differ); pass "
                "--overwrite to replace them or choose another --out"
            )
        resume = True
    prepare_out_dir(out_dir, outputs=[JSON_NAME, NPZ_NAME], overwrite=overwrite, resume=resume)
    from sharpscope import distributed

    # under torchrun every rank runs the top-k Lanczos (identical, seeded) and its share of the trace probes and
    # density runs (gathered, so the results equal one process's); rank 0 alone writes and prints
    rank_info, torch_device = distributed.setup(resolve_device(device))

    # Metadata first (epoch, hash) so checkpoints are processed grouped by run and in epoch order.
    entries = []
    seen: set[Path] = set()
    for path in expand_checkpoints(list(checkpoints)):
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        payload, sha256 = read_checkpoint_file(path)
        epoch = payload.get("epoch") if isinstance(payload, dict) else None
        entries.append({"path": path, "sha256": sha256, "epoch": epoch if isinstance(epoch, int) else None})
        del payload
    # runs are named by their folder (lengthened where two folders share a name: seed0/sgd, seed1/sgd) and kept
    # in the order they were given; within a run, checkpoints go in epoch order
    for entry, run in zip(entries, run_names([e["path"].parent for e in entries])):
        entry["run"] = run
    run_order = {run: i for i, run in enumerate(dict.fromkeys(e["run"] for e in entries))}
    entries.sort(key=lambda e: (run_order[e["run"]], e["epoch"] if e["epoch"] is not None else float("inf"),
                                e["path"].name))
    keys: set[str] = set()
    for entry in entries:
        key = base = _safe(f"{entry['run']}_{entry['path'].stem}")
        suffix = 1
        while key in keys:  # same run folder name and file name from two different places
            suffix += 1
            key = f"{base}_{suffix}"
        entry["key"] = key
        keys.add(key)

    made_by = provenance([e["path"] for e in entries])
    # A finished record is reused when the same file content sits at the same run/name (its key).
    done = {(r["key"], r["sha256"]): r for r in (previous or {}).get("checkpoints", [])} if resume else {}
    arrays: dict[str, np.ndarray] = {}
    if resume and (out_dir / NPZ_NAME).exists():
        with np.load(out_dir / NPZ_NAME) as stored:
            arrays = {name: stored[name] for name in stored.files}

    # Earlier results for checkpoints not named this time stay in the folder's study (never silently dropped).
    records: list[dict[str, Any]] = [r for r in (previous or {}).get("checkpoints", [])
                                     if resume and r["key"] not in keys]
    densities: dict[str, Any] = {r["key"]: _StoredDensity(arrays[f"{r['key']}__density_grid"],
                                                          arrays[f"{r['key']}__density"])
                                 for r in records if r.get("density") is not None}
    outputs = [out_dir / JSON_NAME, out_dir / NPZ_NAME]
    loss_fn = torch.nn.CrossEntropyLoss()
    previous_top: dict[str, Any] = {}  # run -> EigenResult of its last computed checkpoint (warm start)
    same_weights: dict[str, Any] = {}  # _weights_key -> result of a checkpoint computed in this command
    bar = tqdm(entries, desc="hessian-spectrum", unit="ckpt", disable=not (show_progress(ctx) and rank_info.is_main),
               file=click.get_text_stream("stderr"))
    for entry in bar:
        bar.set_postfix_str(f"{entry['run']}/{entry['path'].name}")
        cached = done.get((entry["key"], entry["sha256"]))
        if cached is not None:
            record = {**cached, "path": str(entry["path"])}
            if warm_start:  # a resumed series starts the next Lanczos run where the killed one would have
                vectors = _load_warm_start(out_dir, entry)
                if vectors is not None:
                    previous_top[entry["run"]] = vectors.to(torch_device)
            if record.get("density") is not None:
                stored = _StoredDensity(arrays[f"{entry['key']}__density_grid"], arrays[f"{entry['key']}__density"])
                densities[entry["key"]] = stored
                if rank_info.is_main and not (out_dir / record["density"]["figure"]).exists():
                    save_figure(plot_density(stored, label=_label(entry)), out_dir / record["density"]["figure"])
            records.append(record)
            continue
        checkpoint, batches = analysis_inputs(
            entry["path"], dataset=dataset, split=split, num_samples=num_samples, batch_size=batch_size,
            device=torch_device, data_dir=data_dir, model_spec=model_spec,
        )
        # The same model and weights seen earlier in this command (runs that share their seed's initialisation
        # start from the same weights, in files that differ by their config): reuse that result.
        weights = _weights_key(checkpoint)
        result = same_weights.get(weights)
        if result is None:
            check_finite_loss(checkpoint.model, loss_fn, batches, entry["path"])
            result = analyze_checkpoint(
                checkpoint.model, loss_fn, batches, top_k=top_k, bottom_k=bottom_k, tol=tol, criterion=criterion,
                max_matvecs=max_matvecs,
                trace=trace and not rank_info.enabled, trace_matvecs=trace_matvecs, trace_rtol=trace_rtol,
                density=density and not rank_info.enabled, **_density_budget(density_tol, density_iters),
                density_runs=density_runs, per_layer=per_layer,
                warm_start=previous_top.get(entry["run"]) if warm_start else None, seed=seed,
                progress=lambda stage: bar.set_postfix_str(f"{entry['run']}/{entry['path'].name}: {stage}"),
            )
            if rank_info.enabled and (trace or density):
                result = _sharded_trace_density(result, checkpoint.model, loss_fn, batches, trace=trace,
                                                density=density, shard=(rank_info.rank, rank_info.world_size))
            if result.top.eigenvectors.numel() * 8 <= TWIN_BYTES:
                same_weights[weights] = result
        previous_top[entry["run"]] = result.top
        record, new_arrays = _record(entry, checkpoint, result)
        arrays.update(new_arrays)
        if result.density is not None:
            densities[entry["key"]] = result.density
            if rank_info.is_main:
                figure = plot_density(result.density, label=_label(entry))
                save_figure(figure, out_dir / record["density"]["figure"])
        records.append(record)
        if rank_info.is_main:
            if warm_start:  # saved before the record that makes it reusable; the run's older one removed after
                save_torch({"sha256": entry["sha256"], "eigenvectors": result.top.eigenvectors.cpu()},
                           _warm_start_path(out_dir, entry))
            _write(out_dir, config, records, arrays, made_by, run_order)
            if warm_start:
                for old in out_dir.glob(f".warm-start.{_safe(entry['run'])}.*.pt"):
                    if old != _warm_start_path(out_dir, entry):
                        old.unlink(missing_ok=True)
        del checkpoint, batches, result
    bar.close()
    if rank_info.enabled:  # leave together: a rank exiting while gloo still talks to it aborts the job
        distributed.barrier()
        distributed.teardown()
    if not rank_info.is_main:
        return
    _write(out_dir, config, records, arrays, made_by, run_order)

    records.sort(key=lambda r: _order(r, run_order))
    runs: dict[str, list] = {}
    for index, record in enumerate(records):
        runs.setdefault(record["run"], []).append(
            (record["epoch"] if record["epoch"] is not None else index, record["top_eigenvalues"]))
    save_figure(plot_top_eigenvalues(runs), out_dir / TOP_FIGURE)
    outputs.append(out_dir / TOP_FIGURE)
    if densities:
        labelled = [(densities[r["key"]], _label(r)) for r in records if r["key"] in densities]
        save_figure(plot_densities([d for d, _ in labelled], [label for _, label in labelled]),
                    out_dir / DENSITY_FIGURE)
        outputs.append(out_dir / DENSITY_FIGURE)
        outputs.extend(out_dir / r["density"]["figure"] for r in records if r.get("density"))

    _print_summary(records, bottom_k=bottom_k)
    for path in outputs:
        click.echo(f"wrote {path}")


def _density_budget(density_tol: float, density_iters: int) -> dict[str, Any]:
    """``--density-tol 0``: exactly ``--density-iters`` steps; otherwise adaptive with that cap."""
    if density_tol == 0:
        return {"density_iters": density_iters}
    return {"density_tol": density_tol, "density_max_iters": density_iters}


def _sharded_trace_density(result, model, loss_fn, batches, *, trace: bool, density: bool, shard: tuple[int, int]):
    """``result`` with the trace and density that :func:`analyze_checkpoint` would have computed (same method,
    settings and seeds), their probes / runs split over the ranks of ``shard`` and gathered on every rank."""
    from dataclasses import replace

    from sharpscope.hessian import HessianOperator
    from sharpscope.hessian.series import estimate_density, estimate_trace

    settings = {**result.config, "trace": trace, "density": density}
    operator = HessianOperator(model, loss_fn, batches, eval_mode=settings["eval_mode"], check_deterministic=False)
    extra_matvecs = 0
    trace_estimate = density_estimate = None
    if trace:
        trace_estimate = estimate_trace(operator, settings, top=result.top, shard=shard)
        extra_matvecs += trace_estimate.num_matvecs
    if density:
        density_estimate = estimate_density(operator, settings, shard=shard)
        extra_matvecs += density_estimate.num_matvecs
    return replace(result, trace=trace_estimate, density=density_estimate,
                   num_matvecs=result.num_matvecs + extra_matvecs)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _warm_start_path(out_dir: Path, entry: dict[str, Any]) -> Path:
    """Hidden file with the top eigenvectors of the run's last analysed checkpoint: the warm start a resumed or
    extended series continues from (one per run; the older ones are removed)."""
    return out_dir / f".warm-start.{_safe(entry['run'])}.{entry['key']}.pt"


def _load_warm_start(out_dir: Path, entry: dict[str, Any]):
    """The saved top eigenvectors of ``entry`` (an (n, k) float64 tensor), or None when not saved for this file."""
    import torch

    path = _warm_start_path(out_dir, entry)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged hint only costs a cold start
        return None
    if not isinstance(saved, dict) or saved.get("sha256") != entry["sha256"]:
        return None
    vectors = saved.get("eigenvectors")
    return vectors if isinstance(vectors, torch.Tensor) and vectors.ndim == 2 else None


def _order(record: dict[str, Any], run_order: dict[str, int]) -> tuple:
    """Records are grouped by run (in the order the runs were given), then in epoch order (unknown epochs last)."""
    return (run_order.get(record["run"], len(run_order)), record["run"], record["epoch"] if record["epoch"] is not None else float("inf"), record["key"])


class _StoredDensity:
    """A density reloaded from spectrum.npz (grid and values are all the plots need)."""

    def __init__(self, grid, density):
        self.grid, self.density = grid, density


def _label(entry: dict[str, Any]) -> str:
    epoch = entry.get("epoch")
    return f"{entry['run']} epoch {epoch}" if epoch is not None else f"{entry['run']} {Path(entry['path']).stem}"


def _finite(value: float) -> float | None:
    """JSON has no nan: an undefined standard error (one run) is written as null."""
    import math

    return value if math.isfinite(value) else None


def _floats(tensor) -> list[float]:
    return [float(v) for v in tensor.detach().cpu().reshape(-1)]


def _eigen_record(result) -> dict[str, Any]:
    return {
        "eigenvalues": _floats(result.eigenvalues),
        "residuals": _floats(result.residuals),
        "converged": [bool(c) for c in result.converged],
        "num_matvecs": result.num_matvecs,
    }


def _record(entry: dict[str, Any], checkpoint, result) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON record and the npz arrays of one analysed checkpoint."""
    key = entry["key"]
    top = _eigen_record(result.top)
    record: dict[str, Any] = {
        "path": str(entry["path"]),
        "sha256": entry["sha256"],
        "run": entry["run"],
        "epoch": entry["epoch"],
        "key": key,
        "model": checkpoint.model_name,
        "dataset": checkpoint.dataset,
        "metrics": checkpoint.metrics,
        "num_params": result.num_params,
        "num_samples": result.num_samples,
        "loss": result.loss,
        "top_eigenvalues": top["eigenvalues"],
        "top_residuals": top["residuals"],
        "top_converged": top["converged"],
        "top_matvecs": top["num_matvecs"],
        "bottom": _eigen_record(result.bottom) if result.bottom is not None else None,
        "trace": None,
        "density": None,
        "per_layer": ({name: _eigen_record(r) for name, r in result.per_layer.items()}
                      if result.per_layer is not None else None),
        "num_matvecs": result.num_matvecs,
        "seconds": result.seconds,
    }
    arrays = {
        f"{key}__top_eigenvalues": result.top.eigenvalues.numpy(),
        f"{key}__top_residuals": result.top.residuals.numpy(),
    }
    if result.bottom is not None:
        arrays[f"{key}__bottom_eigenvalues"] = result.bottom.eigenvalues.numpy()
    if result.trace is not None:
        record["trace"] = {"value": result.trace.value, "stderr": result.trace.stderr,
                           "method": result.trace.method, "num_matvecs": result.trace.num_matvecs,
                           "rtol": result.trace.rtol, "converged": result.trace.converged,
                           "deflation_rank": result.trace.deflation_rank}
    if result.density is not None:
        d = result.density
        record["density"] = {
            "figure": f"density-{key}.png",
            "arrays": [f"{key}__density_grid", f"{key}__density", f"{key}__density_nodes",
                       f"{key}__density_weights"],
            "lambda_min": d.lambda_min, "lambda_max": d.lambda_max, "sigma": d.sigma,
            "slq_trace": d.trace_estimate, "slq_trace_stderr": _finite(d.trace_stderr), "num_matvecs": d.num_matvecs,
            "num_steps": [int(k) for k in d.num_steps], "error_bounds": _floats(d.error_bounds), "tol": d.tol,
            "converged": d.converged,
        }
        arrays.update({f"{key}__density_grid": d.grid.numpy(), f"{key}__density": d.density.numpy(),
                       f"{key}__density_nodes": d.nodes.numpy(), f"{key}__density_weights": d.weights.numpy()})
    return record, arrays


def _write(out_dir: Path, config: dict[str, Any], records: list[dict[str, Any]], arrays: dict[str, Any],
           made_by: dict[str, Any], run_order: dict[str, int]) -> None:
    """Rewrite spectrum.npz and spectrum.json (atomically) with every record so far (by run, then epoch)."""
    from sharpscope.io import write_json, write_npz

    records.sort(key=lambda r: _order(r, run_order))
    live = {r["key"] for r in records}
    kept = {name: value for name, value in arrays.items() if name.rsplit("__", 1)[0] in live}  # drop replaced
    write_npz(out_dir / NPZ_NAME, **kept)
    write_json(out_dir / JSON_NAME, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": config, "checkpoints": records,
        "provenance": made_by,
    })


def _weights_key(checkpoint) -> str:
    """What a checkpoint's Hessian depends on besides the command's settings: its architecture, evaluation dataset
    and every parameter and buffer, by value (files with other configs or optimizer states but the same weights
    get the same key)."""
    import hashlib

    import torch

    digest = hashlib.sha256(f"{checkpoint.model_name}|{checkpoint.model_kwargs}|{checkpoint.dataset}".encode())
    for name, tensor in checkpoint.model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _previous_results(path: Path) -> dict[str, Any] | None:
    import json

    from sharpscope.errors import SharpscopeError

    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SharpscopeError(f"{path} exists but cannot be read ({exc}); pass --overwrite to replace it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SharpscopeError(f"{path} is not a hessian-spectrum result; pass --overwrite or choose another --out")
    return data


def _print_summary(records: list[dict[str, Any]], *, bottom_k: int) -> None:
    shown = min(3, max((len(r["top_eigenvalues"]) for r in records), default=0))
    header = f"{'run':<12} {'epoch':>5} " + " ".join(f"{f'lambda_{i + 1}':>11}" for i in range(shown))
    if bottom_k:
        header += f" {'lambda_min':>11}"
    show_trace = any(r.get("trace") for r in records)
    show_density = any(r.get("density") for r in records)
    if show_trace:
        header += f" {'trace +- stderr (HVPs)':>26}"
    if show_density:
        header += f" {'SLQ trace +- stderr (HVPs)':>28}"
    header += f" {'HVPs':>6}  converged"
    click.echo(header)
    for r in records:
        epoch = "-" if r["epoch"] is None else str(r["epoch"])
        line = f"{r['run'][:12]:<12} {epoch:>5} " + " ".join(f"{v:>11.5g}" for v in r["top_eigenvalues"][:shown])
        if bottom_k:
            line += f" {r['bottom']['eigenvalues'][0]:>11.5g}" if r.get("bottom") else f" {'-':>11}"
        if show_trace:
            t = r.get("trace")
            line += f" {_with_error(t['value'], t['stderr'], t['num_matvecs']) if t else '-':>26}"
        if show_density:
            d = r.get("density")
            line += (f" {_with_error(d['slq_trace'], d.get('slq_trace_stderr'), d['num_matvecs']) if d else '-':>28}")
        converged = all(r["top_converged"]) and (not r.get("bottom") or all(r["bottom"]["converged"]))
        converged = converged and (not r.get("trace") or r["trace"].get("converged") is not False)
        converged = converged and (not r.get("density") or r["density"].get("converged") is not False)
        line += f" {r['num_matvecs']:>6}  {'yes' if converged else 'NO'}"
        click.echo(line)


def _with_error(value: float, stderr: float | None, matvecs: int) -> str:
    """``8.913 +- 0.15 (37)``: the estimate, its standard error (``?`` when undefined) and the products spent."""
    error = "?" if stderr is None else f"{stderr:.2g}"
    return f"{value:.5g} +- {error} ({matvecs})"

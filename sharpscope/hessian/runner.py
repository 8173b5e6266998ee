"""``sharpscope.hessian.run``: the Hessian spectrum of checkpoint files along training, written to a folder.

This is the library function behind ``sharpscope hessian-spectrum`` (the command parses options, calls
:func:`run` and prints). It groups checkpoints by run, analyses each with
:func:`~sharpscope.hessian.analyze_checkpoint` (top-k eigenvalues by Lanczos, optionally bottom-k, Hutch++ trace,
SLQ density, per-layer blocks), warm-starting Lanczos along each run, and writes into ``out``:

* ``spectrum.json``: per checkpoint its run, epoch, eigenvalues, residuals, products, convergence, trace and
  density summary, per-layer and bottom eigenvalues; the config and provenance;
* ``spectrum.npz``: the arrays (``KEY__top_eigenvalues``, ``KEY__density_grid``, ...);
* figures (one file per format of ``figure_output``): ``top_eigenvalues`` (all runs on shared axes: over training,
  or per run when each run has one checkpoint), with ``bottom_k`` ``bottom_eigenvalues``, with ``per_layer``
  ``per_layer`` (top eigenvalue of each layer, last checkpoint of each run), with ``density`` ``density`` (all
  checkpoints overlaid) and one ``density-KEY`` each.

Results are saved after every checkpoint: a rerun with the same settings reuses finished checkpoints (an
interrupted run resumes), and naming further checkpoints adds them to the results already in ``out``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError, UsageError
from sharpscope.inputs import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_EVAL_SPLIT,
    DEFAULT_NUM_SAMPLES,
)
from sharpscope.plots.output import FigureOutput

__all__ = ["SpectrumRun", "run", "check_memory"]

FORMAT = "sharpscope-hessian-spectrum"
FORMAT_VERSION = 1
JSON_NAME, NPZ_NAME = "spectrum.json", "spectrum.npz"
#: Results of checkpoints whose eigenvectors take at most this many bytes are kept for reuse by a later identical file.
TWIN_BYTES = 256 << 20
#: Figure stems (one file per format of the FigureOutput).
TOP_STEM, BOTTOM_STEM, PER_LAYER_STEM, DENSITY_STEM = "top_eigenvalues", "bottom_eigenvalues", "per_layer", "density"


@dataclass(frozen=True)
class SpectrumRun:
    """What :func:`run` computed and wrote."""

    out_dir: Path  # the folder written into
    records: tuple[dict[str, Any], ...]  # spectrum.json's per-checkpoint records, by run (order given) then epoch
    outputs: tuple[Path, ...]  # every file written or updated: spectrum.json, spectrum.npz, then the figures
    config: dict[str, Any] = field(default_factory=dict)  # the settings (spectrum.json's "config")
    is_main: bool = True  # False on torchrun ranks other than 0 (they compute but write nothing)

    @property
    def runs(self) -> list[str]:
        """Run names in the order given."""
        return list(dict.fromkeys(r["run"] for r in self.records))

    def __repr__(self) -> str:
        tops = ", ".join(f"{run}: {last['top_eigenvalues'][0]:.4g}" for run in self.runs
                         for last in [[r for r in self.records if r["run"] == run][-1]])
        return (f"SpectrumRun({len(self.records)} checkpoints in {len(self.runs)} runs, lambda_max at the last "
                f"checkpoint {{{tops}}}, {len(self.outputs)} files in {str(self.out_dir)!r})")


def run(
    checkpoints: Sequence[str | Path],
    *,
    top_k: int = 5,
    bottom_k: int = 0,
    tol: float = 1e-6,
    criterion: str = "residual",
    max_matvecs: int | None = None,
    trace: bool = False,
    trace_rtol: float | None = None,
    trace_matvecs: int | None = None,
    density: bool = False,
    density_tol: float = 0.01,
    density_iters: int = 90,
    density_runs: int = 5,
    per_layer: bool = False,
    warm_start: bool = True,
    model_spec: str | None = None,
    loss: str | None = None,
    dataset: str | None = None,
    split: str = DEFAULT_EVAL_SPLIT,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    data_dir: str | None = None,
    device: Any = None,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    figure_output: FigureOutput = FigureOutput(),
    progress: bool = False,
) -> SpectrumRun:
    """Hessian top eigenvalues (and bottom eigenvalues, trace, density, per-layer spectra) of checkpoints.

    The Hessian is that of the mean loss over a fixed evaluation set (the first ``num_samples`` samples of
    ``split``, batches of ``batch_size``), model in eval mode: the loss each checkpoint recorded (``config["loss"]``;
    plain cross-entropy when none), or ``loss``.

    Args:
        checkpoints: checkpoint files or run folders (their ``ckpt-epoch*.pt`` and ``final.pt``), grouped by run
            (the parent folder's name, lengthened where two folders share it) in the order given, then by epoch.
        top_k, bottom_k: largest eigenvalues per checkpoint; smallest (most negative) ones, a second Lanczos run.
        tol, criterion, max_matvecs: Lanczos stopping rule ``||Hv - lambda v|| <= tol |lambda_max|``
            (``"residual"``) or relative eigenvalue error ``<= tol`` (``"eigenvalue"``); product budget per run
            [default ``max(300, 30 k)``].
        trace, trace_rtol, trace_matvecs: Hutch++ trace deflated by the top-k eigenvectors until the relative
            standard error ``trace_rtol`` [default 0.02], or a fixed budget of ``trace_matvecs`` products
            (classical Hutch++, Meyer et al. 2021); not both.
        density, density_tol, density_iters, density_runs: SLQ density (Ghorbani et al. 2019): each of
            ``density_runs`` runs stops when its quadrature's Wasserstein-1 error bound is below ``density_tol`` of
            its spectral range, within ``density_iters`` steps; ``density_tol=0``: exactly ``density_iters`` steps.
        per_layer: also the top eigenvalue of each module's diagonal Hessian block.
        warm_start: start each checkpoint's Lanczos run from the previous checkpoint's eigenvectors (same run).
        model_spec, dataset, split, num_samples, batch_size, data_dir: which model a plain state_dict holds, and
            the evaluation set (default dataset: the checkpoint's; :func:`sharpscope.inputs.analysis_inputs`).
        loss: a ``package.module:factory[:k=v]`` loss spec (:func:`sharpscope.specs.load_loss`) used instead of the
            recorded ones; without it, checkpoints that recorded different losses are refused.
        device: ``"cpu"``, ``"cuda"``, a ``torch.device`` [default: cuda when available].
        seed: seeds every random vector.
        out: folder to write into [default ``results/RUNS-hessian-spectrum``]; refused when it holds results of
            other settings unless ``overwrite``.
        figure_output: figure formats and dpi.
        progress: a progress bar on stderr.

    Returns:
        :class:`SpectrumRun` (records as in spectrum.json, the files written).

    Raises:
        SharpscopeError: bad settings (``UsageError``), unreadable or mismatched inputs, results of other settings
            in ``out``, or a stage whose vectors would not fit in the device's free memory (refused before it
            allocates, see :func:`check_memory`).
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from sharpscope import distributed
    from sharpscope.inputs import (
        AnalysisLoss,
        analysis_inputs,
        check_finite_loss,
        default_out,
        expand_checkpoints,
        resolve_device,
        run_names,
    )
    from sharpscope.io import prepare_out_dir, save_torch
    from sharpscope.plots.spectrum import plot_density
    from sharpscope.results import provenance
    from sharpscope.train.checkpoint import read_checkpoint_file

    if not checkpoints:
        raise UsageError("give at least one checkpoint file or run folder")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"top_k must be an integer >= 1, got {top_k!r}")
    if isinstance(bottom_k, bool) or not isinstance(bottom_k, int) or bottom_k < 0:
        raise UsageError(f"bottom_k must be an integer >= 0, got {bottom_k!r}")
    if trace_rtol is not None and trace_matvecs is not None:
        raise UsageError("give --trace-rtol (a precision target) or --trace-matvecs (a fixed budget), not both")
    if not isinstance(figure_output, FigureOutput):
        raise UsageError(f"figure_output must be a FigureOutput, got {type(figure_output).__name__}")
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
    entries = _entries(checkpoints, expand_checkpoints, read_checkpoint_file, run_names)
    # one loss for every checkpoint (refused before any work when their recorded losses differ); named in the
    # config only when it is not the default cross-entropy, so results of classification runs stay as they were
    analysis_loss = AnalysisLoss(loss)
    for entry in entries:
        analysis_loss.check(entry["path"], entry["config"])
    if analysis_loss.spec is not None:
        config["loss"] = analysis_loss.spec
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
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    prepare_out_dir(out_dir, outputs=[JSON_NAME, NPZ_NAME], overwrite=overwrite, resume=resume)

    # under torchrun every rank runs the top-k Lanczos (identical, seeded) and its share of the trace probes and
    # density runs (gathered, so the results equal one process's); rank 0 alone writes
    rank_info, torch_device = distributed.setup(torch_device)

    run_order = {name: i for i, name in enumerate(dict.fromkeys(e["run"] for e in entries))}
    keys = {e["key"] for e in entries}
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
    loss_fn = analysis_loss.for_checkpoint(entries[0]["path"], entries[0]["config"])
    previous_top: dict[str, Any] = {}  # run -> EigenResult of its last computed checkpoint (warm start)
    same_weights: dict[str, Any] = {}  # _weights_key -> result of a checkpoint computed in this call
    budget = _density_budget(density_tol, density_iters)
    bar = tqdm(entries, desc="hessian-spectrum", unit="ckpt", disable=not (progress and rank_info.is_main))
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
                    figure_output.save(plot_density(stored, label=_label(entry)), out_dir,
                                       Path(record["density"]["figure"]).stem)
            records.append(record)
            continue
        checkpoint, batches = analysis_inputs(
            entry["path"], dataset=dataset, split=split, num_samples=num_samples, batch_size=batch_size,
            device=torch_device, data_dir=data_dir, model_spec=model_spec,
        )
        # The same model and weights seen earlier in this call (runs that share their seed's initialisation
        # start from the same weights, in files that differ by their config): reuse that result.
        weights = _weights_key(checkpoint)
        result = same_weights.get(weights)
        if result is None:
            check_memory(checkpoint.model, config, device=torch_device, label=entry["path"].name)
            check_finite_loss(checkpoint.model, loss_fn, batches, entry["path"])
            # looked up at call time so the package attribute can be wrapped (tests count calls)
            import sharpscope.hessian as hessian

            result = hessian.analyze_checkpoint(
                checkpoint.model, loss_fn, batches, top_k=top_k, bottom_k=bottom_k, tol=tol, criterion=criterion,
                max_matvecs=max_matvecs,
                trace=trace and not rank_info.enabled, trace_matvecs=trace_matvecs, trace_rtol=trace_rtol,
                density=density and not rank_info.enabled, **budget,
                density_runs=density_runs, per_layer=per_layer,
                warm_start=previous_top.get(entry["run"]) if warm_start else None, seed=seed,
                on_progress=lambda stage: bar.set_postfix_str(f"{entry['run']}/{entry['path'].name}: {stage}"),
            )
            if rank_info.enabled and (trace or density):
                result = _sharded_trace_density(result, checkpoint.model, loss_fn, batches, trace=trace,
                                                density=density, shard=(rank_info.rank, rank_info.world_size))
            if result.top.eigenvectors.numel() * 8 <= TWIN_BYTES:
                same_weights[weights] = result
        previous_top[entry["run"]] = result.top
        record, new_arrays = _record(entry, checkpoint, result, figure_output)
        arrays.update(new_arrays)
        if result.density is not None:
            densities[entry["key"]] = result.density
            if rank_info.is_main:
                figure_output.save(plot_density(result.density, label=_label(entry)), out_dir,
                                   f"{DENSITY_STEM}-{entry['key']}")
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
    records.sort(key=lambda r: _order(r, run_order))
    if not rank_info.is_main:
        return SpectrumRun(out_dir=out_dir, records=tuple(records), outputs=(), config=config, is_main=False)
    _write(out_dir, config, records, arrays, made_by, run_order)
    outputs.extend(_summary_figures(out_dir, records, densities, figure_output))
    return SpectrumRun(out_dir=out_dir, records=tuple(records), outputs=tuple(outputs), config=config)


# ------------------------------------------------------------------------------------------------ memory


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def stage_bytes(num_params: int, config: dict[str, Any], *, layer_sizes: Sequence[int] = ()) -> dict[str, int]:
    """Estimated peak bytes of float64 vectors each stage of :func:`~sharpscope.hessian.analyze_checkpoint` holds
    for an ``n = num_params`` Hessian (``config`` as :func:`run` builds it), the top-k eigenvectors that every later
    stage keeps alive included:

    * top / bottom Lanczos: basis ``n x (m + 1)``, locked pairs ``n x k``, 4 work vectors, ``m`` the default
      Krylov dimension (``max(2k + 10, 30)``, bottom ``max(2k + 10, 100)``, capped at ``n``);
    * trace, fixed budget ``M``: sketch ``S``, ``HS``, ``Q`` (``M // 3`` columns each), probes ``G`` and their
      projection (``M - 2 (M // 3)`` each), a 16-column product block; adaptive: sketch (8) and deflation vectors
      (``k``) twice, three 16-column probe blocks;
    * density (SLQ): per run the reorthogonalisation basis ``n x steps`` plus 4 work vectors, ``steps =
      min(density_iters, n)`` (the cap of the adaptive rule too);
    * per-layer: the top Lanczos of the largest block (sizes ``layer_sizes``), k = 1.

    Graph caches and activations are not counted (the operator bounds those itself).
    """
    n = num_params
    top = min(config["top_k"], n)
    held = 8 * n * top
    stages = {"top-k Lanczos": 8 * n * (min(max(2 * top + 10, 30), n) + 1 + top + 4)}
    if config.get("bottom_k"):
        k = min(config["bottom_k"], n)
        stages["bottom-k Lanczos"] = held + 8 * n * (min(max(2 * k + 10, 100), n) + 1 + k + 4)
    if config.get("trace"):
        matvecs = config.get("trace_matvecs")
        if matvecs is not None:
            s = min(matvecs // 3, n)
            columns = 3 * s + 2 * (matvecs - 2 * s) + 16
        else:
            columns = 2 * (8 + top) + 3 * 16
        stages["trace"] = held + 8 * n * columns
    if config.get("density"):
        steps = min(config["density_iters"], n)
        stages["density"] = held + 8 * n * config["density_runs"] * (steps + 4)
    if config.get("per_layer") and layer_sizes:
        largest = max(layer_sizes)
        stages["per-layer"] = held + 8 * largest * (min(30, largest) + 1 + 1 + 4)
    return stages


#: How to shrink each stage, for the refusal message.
_FIXES = {
    "top-k Lanczos": "ask for fewer eigenpairs (--top-k)",
    "bottom-k Lanczos": "ask for fewer bottom eigenpairs (--bottom-k)",
    "trace": "lower --trace-matvecs or use the adaptive --trace-rtol",
    "density": "lower --density-runs or --density-iters",
    "per-layer": "leave out --per-layer",
}


def check_memory(model: Any, config: dict[str, Any], *, device: Any, label: str = "",
                 free_bytes: int | None = None) -> None:
    """Refuse, in one line and before anything is allocated, an analysis of ``model`` one of whose stages
    (:func:`stage_bytes`) would need more float64 vectors than the memory free on ``device`` (``free_bytes``
    overrides the measurement, e.g. to plan for another machine).

    Raises:
        SharpscopeError: naming the stage, the estimate, the free memory and the option that shrinks it.
    """
    from sharpscope.hessian.operator import _available_memory
    from sharpscope.hessian.series import parameter_groups

    names = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    layer_sizes = [sum(names[p] for p in group) for group in parameter_groups(model).values()] \
        if config.get("per_layer") else []
    stages = stage_bytes(sum(names.values()), config, layer_sizes=layer_sizes)
    free = _available_memory(device) if free_bytes is None else free_bytes
    for stage, needed in stages.items():
        if needed > free:
            where = f"{label}: " if label else ""
            raise SharpscopeError(
                f"{where}the {stage} stage needs about {_gib(needed)} of float64 vectors for a "
                f"{sum(names.values()):,}-parameter Hessian on {device}, but only {_gib(free)} are free; "
                f"{_FIXES[stage]}"
            )


# ------------------------------------------------------------------------------------------------ figures


def _summary_figures(out_dir: Path, records: list[dict[str, Any]], densities: dict[str, Any],
                     figure_output: FigureOutput) -> list[Path]:
    """Write the figures of all records (every run on shared axes); returns their paths."""
    from sharpscope.plots.spectrum import (
        plot_bottom_eigenvalues,
        plot_densities,
        plot_per_layer,
        plot_top_eigenvalues,
    )

    written: list[Path] = []
    top: dict[str, list] = {}
    bottom: dict[str, list] = {}
    layers: dict[str, dict[str, float]] = {}
    for index, record in enumerate(records):
        epoch = record["epoch"] if record["epoch"] is not None else index
        top.setdefault(record["run"], []).append((epoch, record["top_eigenvalues"]))
        if record.get("bottom"):
            bottom.setdefault(record["run"], []).append((epoch, record["bottom"]["eigenvalues"]))
    for run_name in dict.fromkeys(r["run"] for r in records):
        last = [r for r in records if r["run"] == run_name and r.get("per_layer")]
        if last:  # the run's last checkpoint with per-layer results
            label = run_name if last[-1]["epoch"] is None else f"{run_name} (epoch {last[-1]['epoch']})"
            layers[label] = {name: result["eigenvalues"][0] for name, result in last[-1]["per_layer"].items()}
    written += figure_output.save(plot_top_eigenvalues(top, layout="overlay"), out_dir, TOP_STEM)
    if bottom:
        written += figure_output.save(plot_bottom_eigenvalues(bottom), out_dir, BOTTOM_STEM)
    if layers:
        written += figure_output.save(plot_per_layer(layers), out_dir, PER_LAYER_STEM)
    if densities:
        labelled = [(densities[r["key"]], _label(r)) for r in records if r["key"] in densities]
        written += figure_output.save(plot_densities([d for d, _ in labelled], [label for _, label in labelled]),
                                      out_dir, DENSITY_STEM)
        for r in records:
            if r.get("density"):
                written += [out_dir / name for name in figure_output.names(Path(r["density"]["figure"]).stem)]
    return written


# ------------------------------------------------------------------------------------------------ records


def _entries(checkpoints, expand_checkpoints, read_checkpoint_file, run_names) -> list[dict[str, Any]]:
    """Metadata first (epoch, hash), so checkpoints are processed grouped by run and in epoch order.

    Runs are named by their folder (lengthened where two folders share a name: seed0/sgd, seed1/sgd) and kept in
    the order they were given; within a run, checkpoints go in epoch order. Each gets a unique file-safe key.
    """
    entries = []
    seen: set[Path] = set()
    for path in expand_checkpoints([str(c) for c in checkpoints]):
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        payload, sha256 = read_checkpoint_file(path)
        epoch = payload.get("epoch") if isinstance(payload, dict) else None
        config = payload.get("config") if isinstance(payload, dict) else None
        entries.append({"path": path, "sha256": sha256, "epoch": epoch if isinstance(epoch, int) else None,
                        "config": config if isinstance(config, dict) else None})
        del payload
    for entry, name in zip(entries, run_names([e["path"].parent for e in entries])):
        entry["run"] = name
    run_order = {name: i for i, name in enumerate(dict.fromkeys(e["run"] for e in entries))}
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
    return entries


def _density_budget(density_tol: float, density_iters: int) -> dict[str, Any]:
    """``density_tol == 0``: exactly ``density_iters`` steps; otherwise adaptive with that cap."""
    if density_tol == 0:
        return {"density_iters": density_iters}
    return {"density_tol": density_tol, "density_max_iters": density_iters}


def _sharded_trace_density(result, model, loss_fn, batches, *, trace: bool, density: bool, shard: tuple[int, int]):
    """``result`` with the trace and density that :func:`analyze_checkpoint` would have computed (same method,
    settings and seeds), their probes / runs split over the ranks of ``shard`` and gathered on every rank."""
    from dataclasses import replace

    from sharpscope.hessian.operator import HessianOperator
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
    return (run_order.get(record["run"], len(run_order)), record["run"],
            record["epoch"] if record["epoch"] is not None else float("inf"), record["key"])


class _StoredDensity:
    """A density reloaded from spectrum.npz (grid and values are all the plots need)."""

    def __init__(self, grid, density):
        self.grid, self.density = grid, density


def _label(entry: dict[str, Any]) -> str:
    epoch = entry.get("epoch")
    return f"{entry['run']} epoch {epoch}" if epoch is not None else f"{entry['run']} {Path(entry['path']).stem}"


def _finite(value: float) -> float | None:
    """JSON has no nan: an undefined standard error (one run) is written as null."""
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


def _record(entry: dict[str, Any], checkpoint, result, figure_output: FigureOutput
            ) -> tuple[dict[str, Any], dict[str, Any]]:
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
            "figure": figure_output.names(f"{DENSITY_STEM}-{key}")[0],
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
    """What a checkpoint's Hessian depends on besides the settings: its architecture, evaluation dataset and every
    parameter and buffer, by value (files with other configs or optimizer states but the same weights get the
    same key)."""
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

    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SharpscopeError(f"{path} exists but cannot be read ({exc}); pass --overwrite to replace it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SharpscopeError(f"{path} is not a hessian-spectrum result; pass --overwrite or choose another --out")
    return data

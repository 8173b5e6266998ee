"""``sharpscope.landscape.run``: the whole ``sharpscope landscape`` analysis as one library function.

It plans the cuts (one job per surface: the checkpoint, its evaluation set, its directions, the grid), shares one
random draw between the models (each normalised to its own weights), refuses before any allocation a job that
would not fit in memory (:mod:`sharpscope.landscape.memory`), computes every surface (resumable, sharded over
``torchrun`` ranks), and writes into ``out``: ``surface[-LABEL].npz`` + ``.json``, the figures, an interactive
``surface.html`` and the directions (``directions[-LABEL].pt``) for ``directions_from``. The CLI
(:mod:`sharpscope.cli.landscape`) parses options, calls :func:`run` and prints what it returns.

    from sharpscope.landscape import run
    result = run("runs/sam/final.pt", compare=["runs/sgd/final.pt"], x=(-1, 1, 21), out="results/landscape")
    result.surfaces[0].loss, result.written
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError, UsageError
from sharpscope.inputs import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_EVAL_SPLIT,
    DEFAULT_NUM_SAMPLES,
)
from sharpscope.plots.output import FigureOutput

DIRECTION_KINDS = ("random", "interpolate", "pca", "hessian")
LOSS_SCALES = ("auto", "linear", "log")
DEFAULT_GRID = (-1.0, 1.0, 51)  # the paper code's --x=-1:1:51 (Li et al. 2018)
DEFAULT_INTERPOLATION_GRID = (-0.5, 1.5, 41)
PLANE_POINTS = 41  # grid points per axis of a plane through three checkpoints (covering them)
PCA_POINTS = 21  # grid points per axis of a PCA plane (covering the projected path): the path, not detail, matters
DEFAULT_LEVELS = 20  # contour levels of the 2-D figures


@dataclass(frozen=True)
class LandscapeResult:
    """What :func:`run` computed and wrote (on ``torchrun`` ranks other than 0: nothing, ``surfaces`` empty)."""

    out: Path  # the output folder
    directions: str  # the kind of cut: random, interpolate, pca or hessian
    labels: tuple[str, ...]  # one per surface: the run's folder name (sgd, sam), "sgd-to-sam", "plane"
    surfaces: tuple[Any, ...]  # the computed :class:`~sharpscope.landscape.Surface` objects, in ``labels``' order
    written: tuple[Path, ...]  # every file written, figures in all requested formats included
    log_scale: bool  # whether the figures draw log10(loss) (``loss_scale`` resolved)
    barrier: float | None  # interpolation between two checkpoints: the loss barrier along the path, else None
    notes: tuple[str, ...]  # remarks worth printing (a PCA path leaving the grid)
    ranks: int  # torchrun ranks that computed the grid (1 without torchrun)

    def __repr__(self) -> str:
        """A few lines: the cut, each surface in one line, the barrier, how many files went where."""
        lines = [f"LandscapeResult({self.directions} directions, {'log' if self.log_scale else 'linear'} loss scale, "
                 f"{len(self.written)} files in {str(self.out)!r}"]
        lines += [f"  {surface!r}" for surface in self.surfaces]
        if self.barrier is not None:
            lines.append(f"  loss barrier {self.barrier:.4g}")
        return "\n".join(lines) + ")"


def run(
    checkpoint: str | Path,
    compare: Sequence[str | Path] = (),
    *,
    out: str | Path,
    directions: str | None = None,
    dim: int | None = None,
    directions_from: str | Path | None = None,
    x: tuple[float, float, int] | None = None,
    y: tuple[float, float, int] | None = None,
    norm: str | None = None,
    include_bias_bn: bool | None = None,
    model_spec: str | None = None,
    loss: str | None = None,
    dataset: str | None = None,
    split: str = DEFAULT_EVAL_SPLIT,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    data_dir: str | None = None,
    seed: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    compile: bool = False,
    loss_scale: str = "auto",
    cmap: str | None = None,
    levels: int = DEFAULT_LEVELS,
    vmin: float | None = None,
    vmax: float | None = None,
    overwrite: bool = False,
    figure_output: FigureOutput = FigureOutput(),
    progress: bool = False,
) -> LandscapeResult:
    """Loss along lines and over planes around ``checkpoint`` (and each of ``compare``), written into ``out``.

    The options are those of ``sharpscope landscape`` (its ``--help`` describes each); ``None`` means "not given":
    ``directions`` random (or the kind saved in ``directions_from``), ``dim`` 2 (1 for interpolation between two
    checkpoints), ``norm`` filter and ``include_bias_bn`` False (or the saved run's), ``seed`` 0, ``x``/``y`` as
    ``(start, stop, num)`` (defaults per kind: -1:1:51, interpolation -0.5:1.5:41, planes covering their points).

    Figures: ``loss_scale`` ``auto`` draws log10(loss) when the finite positive losses drawn span more than
    1.5 decades (:func:`sharpscope.plots.surface.auto_log_scale`), else the loss; ``cmap``, ``levels`` (contour
    levels) and ``vmin``/``vmax`` (loss colour limits, in loss units) shape the 2-D figures; ``figure_output``
    the formats and resolution. Without accuracy (a regression loss, a language model's
    :class:`~sharpscope.batches.BatchLoss`) the figures show the loss alone.

    The loss is the one the checkpoints recorded (``config["loss"]``; plain cross-entropy when none), or ``loss``
    (a ``package.module:factory[:k=v]`` spec) for all of them; checkpoints that recorded different losses are
    refused without ``loss``. Raises :class:`~sharpscope.errors.SharpscopeError` (one line) for bad options
    or a job that would not fit in memory, before anything is written.
    """
    from sharpscope import distributed
    from sharpscope.inputs import AnalysisLoss, resolve_device

    compare = [str(c) for c in compare]
    checkpoint = str(checkpoint)
    figure = _figure_settings(loss_scale, cmap, levels, vmin, vmax)
    saved = None
    if directions_from is not None:
        saved, directions, norm, include_bias_bn = _saved_directions(directions_from, directions, norm,
                                                                     include_bias_bn, seed)
        if dim is not None and dim != len(saved):
            raise SharpscopeError(
                f"--directions-from {directions_from} holds {len(saved)} direction(s) (a {len(saved)}-D cut); "
                f"drop --dim {dim}"
            )
        dim = len(saved)
    else:
        directions = directions or "random"
        if directions not in DIRECTION_KINDS:
            from sharpscope.errors import unknown_name_error

            raise unknown_name_error("--directions", directions, DIRECTION_KINDS)
        if directions != "random":
            _refuse_random_only_options(norm, include_bias_bn,
                                        f"applies to random directions only, not --directions {directions}")
        if directions == "interpolate" and len(compare) not in (1, 2):
            raise SharpscopeError(
                f"--directions interpolate needs one --compare (a line to it) or two (a plane through three), "
                f"got {len(compare)}"
            )
        if directions == "pca" and compare:
            raise SharpscopeError("--directions pca draws one run's trajectory; drop --compare and run it per run")
        if directions == "interpolate":
            needed = len(compare)
            if dim is not None and dim != needed:
                raise SharpscopeError(
                    f"--directions interpolate with {needed} --compare is {needed}-D (a "
                    f"{'line' if needed == 1 else 'plane'}); drop --dim {dim} or give {dim} --compare"
                )
            dim = needed
        elif directions == "pca":
            if dim not in (None, 2):
                raise SharpscopeError("--directions pca is a plane (--dim 2); drop --dim 1")
            dim = 2
    dim = dim or 2
    if dim not in (1, 2):
        raise UsageError(f"--dim {dim}: expected 1 (a curve) or 2 (a surface)")
    if dim == 1 and y is not None:
        raise SharpscopeError("--y is for 2-D surfaces; drop it or pass --dim 2")
    norm = norm or "filter"
    include_bias_bn = bool(include_bias_bn)
    seed = 0 if seed is None else seed
    renormalised = directions == "random" and (saved is None or saved[0].kind == "draw")

    # under torchrun every rank computes every world_size-th grid point; rank 0 gathers, writes and returns them
    rank_info, dev = distributed.setup(resolve_device(device))
    progress = progress and rank_info.is_main
    eval_kwargs = dict(dataset=dataset, split=split, num_samples=num_samples, batch_size=batch_size, device=dev,
                       data_dir=data_dir, model_spec=model_spec)
    config = {
        "checkpoint": checkpoint, "compare": list(compare), "directions": directions, "dim": dim,
        # normalisation of random directions; None where the directions are used as they are
        "norm": norm if renormalised else None, "ignore_bias_bn": not include_bias_bn if renormalised else None,
        "seed": saved[0].seed if saved is not None else seed, "dataset": dataset, "split": split,
        "num_samples": num_samples, "batch_size": batch_size, "device": str(dev), "loss_scale": loss_scale,
        "cmap": cmap, "levels": levels, "vmin": vmin, "vmax": vmax,
        "precision": precision, "compile": compile,
        **({"model_spec": model_spec} if model_spec else {}),  # only when given: older results stay comparable
        **({"directions_from": str(directions_from)} if directions_from is not None else {}),
    }
    out = Path(out)
    plan = _Plan(checkpoint=checkpoint, compare=compare, kind=directions, dim=dim, x=x, y=y, norm=norm,
                 include_bias_bn=include_bias_bn, seed=seed, saved=saved, loss=AnalysisLoss(loss),
                 eval_kwargs=eval_kwargs, progress=progress, device=dev)
    try:
        if saved is not None:
            jobs = _saved_jobs(plan)
        elif directions in ("random", "hessian"):
            jobs = _independent_jobs(plan)
        elif directions == "interpolate":
            jobs = _interpolation_job(plan)
        else:
            jobs = _pca_job(plan)
        if plan.loss.spec is not None:  # named only when not the default cross-entropy: older results unchanged
            config["loss"] = plan.loss.spec

        multi = len(jobs) > 1
        stems = [f"surface-{job['label']}" if multi else "surface" for job in jobs]
        direction_files = _direction_files(jobs)
        outputs = _output_names(jobs, stems, dim, multi, direction_files, figure_output)
        from sharpscope.io import prepare_out_dir

        prepare_out_dir(out, outputs=outputs, overwrite=overwrite, resume=False)
        distributed.barrier()  # rank 0 has removed stale temporaries before any rank writes its partial file
        rank_suffix = f".rank{rank_info.rank}-of-{rank_info.world_size}" if rank_info.enabled else ""
        partials = [out / f".{stem}.partial{rank_suffix}.npz" for stem in stems]
        if overwrite:
            for p in partials:
                p.unlink(missing_ok=True)
        surfaces = _compute_all(jobs, partials, plan.loss_fn, progress, rank_info, config)
        if not rank_info.is_main:
            return LandscapeResult(out=out, directions=directions, labels=tuple(j["label"] for j in jobs),
                                   surfaces=(), written=(), log_scale=False, barrier=None, notes=(),
                                   ranks=rank_info.world_size)
        log_scale = _resolve_log_scale(surfaces, loss_scale)
        config["log_scale"] = log_scale  # as drawn (loss_scale resolved)
        writer = _Writer(out=out, config=config, dim=dim, multi=multi, log_scale=log_scale, figure=figure,
                         figure_output=figure_output)
        written, barrier = writer.write(jobs, surfaces, stems, direction_files)
        for p in out.glob(".surface*.partial*.npz"):  # every rank's resume file: the results are written
            p.unlink(missing_ok=True)
        notes = tuple(note for job in jobs for note in job.get("notes", []))
        return LandscapeResult(out=out, directions=directions, labels=tuple(j["label"] for j in jobs),
                               surfaces=tuple(surfaces), written=tuple(written), log_scale=log_scale,
                               barrier=barrier, notes=notes, ranks=rank_info.world_size)
    finally:
        if rank_info.enabled:  # leave together: a rank exiting while gloo still talks to it aborts the job
            distributed.barrier()
            distributed.teardown()


# ----------------------------------------------------------------------------------------------------------------
# options and saved directions


@dataclass
class _Plan:
    """The resolved options the job builders read."""

    checkpoint: str
    compare: list[str]
    kind: str
    dim: int
    x: tuple | None
    y: tuple | None
    norm: str
    include_bias_bn: bool
    seed: int
    saved: tuple | None
    loss: Any  # the AnalysisLoss: the checkpoints' recorded loss, or the one given
    eval_kwargs: dict
    progress: bool
    device: Any
    loss_fn: Any = None  # the loss function, set by _load_all from the first checkpoint (the same for all)


def _figure_settings(loss_scale: str, cmap: str | None, levels: int, vmin: float | None,
                     vmax: float | None) -> dict:
    """Check the figure options (one usage line each) and return them as plot keyword arguments."""
    if loss_scale not in LOSS_SCALES:
        from sharpscope.errors import unknown_name_error

        raise unknown_name_error("--loss-scale", loss_scale, LOSS_SCALES)
    if cmap is not None:
        from matplotlib import colormaps

        if cmap not in colormaps:
            from sharpscope.errors import unknown_name_error

            raise unknown_name_error("--cmap colour map", cmap, list(colormaps))
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 200:
        raise UsageError(f"--levels {levels!r}: expected a whole number of contour levels, 2..200")
    for name, value in (("--vmin", vmin), ("--vmax", vmax)):
        if value is not None and not (abs(value) < float("inf")):
            raise UsageError(f"{name} {value}: expected a finite loss value")
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise UsageError(f"--vmin {vmin:g} --vmax {vmax:g}: expected vmin < vmax")
    if loss_scale == "log" and any(v is not None and v <= 0 for v in (vmin, vmax)):
        raise UsageError("--vmin/--vmax must be > 0 with --loss-scale log (log10 of the loss is drawn)")
    return {"cmap": cmap, "levels": levels, "vmin": vmin, "vmax": vmax}


def _resolve_log_scale(surfaces: list, loss_scale: str) -> bool:
    from sharpscope.plots.surface import auto_log_scale

    return auto_log_scale(surfaces) if loss_scale == "auto" else loss_scale == "log"


def _refuse_random_only_options(norm: str | None, include_bias_bn: bool | None, reason: str) -> None:
    """Bad usage (exit 2) if an option that only shapes random directions (--norm, --include-bias-bn /
    --ignore-bias-bn) was given where it would do nothing; ``reason`` says why."""
    given = ["--norm"] if norm is not None else []
    if include_bias_bn is not None:
        given.append("--include-bias-bn" if include_bias_bn else "--ignore-bias-bn")
    if given:
        raise UsageError(f"{given[0]}: {reason}; drop it")


def _saved_directions(path, direction_kind, norm, include_bias_bn, seed):
    """The directions of ``--directions-from``, the kind of cut they make, and the normalisation of a raw random
    draw: the saved run's unless given."""
    from sharpscope.landscape import load_directions

    saved = load_directions(path)
    if len(saved) not in (1, 2):
        raise SharpscopeError(f"--directions-from {path} holds {len(saved)} directions; expected 1 (a curve) or 2")
    kind = saved[0].kind
    if seed is not None:
        raise UsageError(f"--seed: the directions come from {path} (seed {saved[0].seed}); drop --seed")
    cli_kind = {"draw": "random", "plane": "interpolate"}.get(kind, kind)
    if direction_kind is not None and direction_kind != cli_kind:
        raise UsageError(f"--directions: {path} holds {kind} directions, which decide the cut; drop --directions")
    if kind == "draw":
        normalize = saved[0].info.get("normalize") or {}
        norm = norm if norm is not None else normalize.get("norm", "filter")
        if include_bias_bn is None:
            include_bias_bn = not normalize.get("ignore_bias_bn", True)
    else:
        _refuse_random_only_options(norm, include_bias_bn,
                                    f"applies to a raw random draw only; {path} holds {kind} directions, used as saved")
    return saved, cli_kind, norm, include_bias_bn


def _for_file(directions, coords, **info) -> tuple:
    """The directions as ``directions.pt`` stores them: each with the grid along its axis (``[start, stop, num]``,
    the default grid of ``--directions-from``) and ``info`` in its ``info``."""
    axes = [coords] if len(directions) == 1 else list(coords)
    return tuple(replace(d, info={**d.info, "grid": [float(c[0]), float(c[-1]), int(len(c))], **info})
                 for d, c in zip(directions, axes))


def _direction_files(jobs: list[dict]) -> list[tuple[str, tuple, list[str]]]:
    """``(file name, directions, labels of the models cut along them)``: one ``directions.pt`` when every model
    shares them (a random draw, directions read from a file, a single model), else one file per model."""
    prints = [tuple(d.fingerprint() for d in job["save"]) for job in jobs]
    if len(set(prints)) == 1:
        return [("directions.pt", jobs[0]["save"], [job["label"] for job in jobs])]
    return [(f"directions-{job['label']}.pt", job["save"], [job["label"]]) for job in jobs]


def _describe(directions) -> str:
    d = directions[0]
    count = f"{len(directions)} direction{'s' if len(directions) > 1 else ''}"
    if d.kind == "draw":
        normalize = d.info.get("normalize") or {}
        bias = "biases/BN left out" if normalize.get("ignore_bias_bn", True) else "biases/BN perturbed"
        return (f"{count}: the raw Gaussian draw of seed {d.seed}, not normalised; sharpscope landscape CKPT "
                f"--directions-from FILE normalises it to each model ({normalize.get('norm', 'filter')} "
                f"normalisation, {bias}, in the run that wrote it)")
    return f"{count} of kind {d.kind!r}; sharpscope landscape CKPT --directions-from FILE cuts CKPT along them as saved"


# ----------------------------------------------------------------------------------------------------------------
# jobs: what to compute for each model


def _labels_for(paths: list[str], checkpoints: list[Any]) -> list[str]:
    """Run folder names (``runs/sam/final.pt`` -> ``sam``), made unique and file-name safe."""
    labels = [ck.run_name for ck in checkpoints]
    if len(set(labels)) < len(labels):
        labels = [f"{ck.run_name}-{Path(p).stem}" for p, ck in zip(paths, checkpoints)]
    labels = [re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "model" for label in labels]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return unique


def _grid(rng, default):
    from sharpscope.landscape import grid

    start, stop, num = rng if rng is not None else default
    return grid(start, stop, num)


def _load_all(paths: list[str], plan: _Plan) -> list[tuple[Any, Any]]:
    """Each checkpoint with its evaluation set; a diverged one (non-finite loss) is refused before any work."""
    from sharpscope.inputs import analysis_inputs, check_finite_loss

    loaded = []  # every checkpoint is loaded (and a different recorded loss refused) before any surface is computed
    for p in paths:
        checkpoint, batches = analysis_inputs(p, **plan.eval_kwargs)
        plan.loss_fn = plan.loss.for_checkpoint(p, checkpoint.config)
        check_finite_loss(checkpoint.model, plan.loss_fn, batches, p)
        loaded.append((checkpoint, batches))
    return loaded


def _check_memory(plan: _Plan, loaded: list, points: int, *, extra_models: int = 0) -> None:
    """Refuse (one line) a job that would not fit, before its directions and grids are allocated."""
    from sharpscope.landscape.memory import check_fits, estimate_landscape_memory

    model, batches = loaded[0][0].model, loaded[0][1]
    estimate = estimate_landscape_memory(model, batches, surfaces=len(loaded) if plan.kind != "interpolate" else 1,
                                         points=points, dim=plan.dim, models=len(loaded) + extra_models,
                                         loss_fn=plan.loss_fn)
    check_fits(estimate, plan.device)


def _count(rng, default_num: int) -> int:
    return int(rng[2]) if rng is not None else int(default_num)


def _independent_jobs(plan: _Plan) -> list[dict]:
    from sharpscope.landscape import gaussian_draw, hessian_directions, normalize_draw

    paths = [plan.checkpoint, *plan.compare]
    loaded = _load_all(paths, plan)
    y_range = plan.y if plan.y is not None else plan.x
    points = _count(plan.x, DEFAULT_GRID[2]) * (_count(y_range, DEFAULT_GRID[2]) if plan.dim == 2 else 1)
    _check_memory(plan, loaded, points)
    labels = _labels_for(paths, [ck for ck, _ in loaded])
    xs = _grid(plan.x, DEFAULT_GRID)
    ys = _grid(y_range, DEFAULT_GRID) if plan.dim == 2 else None
    coords = xs if ys is None else (xs, ys)
    jobs = []
    for path, (ck, batches), label in zip(paths, loaded, labels):
        if plan.kind == "random":
            # the raw draw is saved: normalised to another model it gives that model's comparable directions
            draw = gaussian_draw(ck.model, dim=plan.dim, seed=plan.seed)
            directions = normalize_draw(ck.model, draw, norm=plan.norm, ignore_bias_bn=not plan.include_bias_bn)
            save = _for_file(draw, coords, normalize={"norm": plan.norm, "ignore_bias_bn": not plan.include_bias_bn})
        else:
            if plan.progress:
                import sys

                print(f"{label}: top-{plan.dim} Hessian eigenvectors (Lanczos)...", file=sys.stderr)
            directions = hessian_directions(ck.model, plan.loss_fn, batches, k=plan.dim, seed=plan.seed)
            save = _for_file(directions, coords)
        jobs.append({"label": label, "paths": [path], "checkpoint": ck, "batches": batches,
                     "directions": directions, "coords": coords, "save": save})
    return jobs


def _saved_jobs(plan: _Plan) -> list[dict]:
    """Every model cut along the directions of ``--directions-from``: a raw draw normalised to each model, other
    directions as they are; the grid of the run that saved them unless --x/--y are given."""
    from sharpscope.landscape import normalize_draw

    saved = plan.saved
    paths = [plan.checkpoint, *plan.compare]
    loaded = _load_all(paths, plan)

    def saved_grid(direction):
        recorded = direction.info.get("grid")
        return tuple(recorded) if isinstance(recorded, (list, tuple)) and len(recorded) == 3 else DEFAULT_GRID

    y_range = plan.y if plan.y is not None else plan.x
    points = _count(plan.x, saved_grid(saved[0])[2])
    if plan.dim == 2:
        points *= _count(y_range, saved_grid(saved[1])[2])
    _check_memory(plan, loaded, points)
    labels = _labels_for(paths, [ck for ck, _ in loaded])
    xs = _grid(plan.x, saved_grid(saved[0]))
    ys = _grid(y_range, saved_grid(saved[1])) if plan.dim == 2 else None
    coords = xs if ys is None else (xs, ys)
    draw = saved[0].kind == "draw"
    normalize = {"norm": plan.norm, "ignore_bias_bn": not plan.include_bias_bn}
    save = _for_file(saved, coords, **({"normalize": normalize} if draw else {}))
    jobs = []
    for path, (ck, batches), label in zip(paths, loaded, labels):
        directions = (normalize_draw(ck.model, saved, norm=plan.norm, ignore_bias_bn=not plan.include_bias_bn)
                      if draw else saved)
        jobs.append({"label": label, "paths": [path], "checkpoint": ck, "batches": batches,
                     "directions": directions, "coords": coords, "save": save})
    return jobs


def _interpolation_job(plan: _Plan) -> list[dict]:
    from sharpscope.landscape import difference_direction, plane_through

    paths = [plan.checkpoint, *plan.compare]
    loaded = _load_all(paths, plan)
    if len(plan.compare) == 1:
        points = _count(plan.x, DEFAULT_INTERPOLATION_GRID[2])
    else:
        points = _count(plan.x, PLANE_POINTS) * _count(plan.y if plan.y is not None else plan.x, PLANE_POINTS)
    _check_memory(plan, loaded, points)
    checkpoints = [ck for ck, _ in loaded]
    labels = _labels_for(paths, checkpoints)
    ck, batches = loaded[0]
    if len(plan.compare) == 1:
        direction = difference_direction(ck.model, checkpoints[1].model, include_buffers=True)
        coords = _grid(plan.x, DEFAULT_INTERPOLATION_GRID)
        return [{"label": f"{labels[0]}-to-{labels[1]}", "paths": paths, "checkpoint": ck, "batches": batches,
                 "directions": (direction,), "coords": coords, "endpoints": labels,
                 "save": _for_file((direction,), coords)}]
    basis = plane_through(ck.model, checkpoints[1].model, checkpoints[2].model, include_buffers=True)
    xs, ys = _cover(basis.coords, plan.x, plan.y, PLANE_POINTS)
    return [{"label": "plane", "paths": paths, "checkpoint": ck, "batches": batches,
             "directions": (basis.d1, basis.d2), "coords": (xs, ys), "points": basis.coords, "endpoints": labels,
             "save": _for_file((basis.d1, basis.d2), (xs, ys), points=basis.coords.tolist(), point_labels=labels)}]


def _cover(points, x_range, y_range, num: int):
    """The grids of a plane: --x/--y as given (--y defaults to --x), else covering ``points`` (``(k, 2)``) and the
    origin with a 25% margin, 0 on the grid."""
    from sharpscope.landscape import covering_grid, grid

    xs = grid(*x_range) if x_range is not None else covering_grid(points[:, 0], num=num)
    y_range = y_range if y_range is not None else x_range
    ys = grid(*y_range) if y_range is not None else covering_grid(points[:, 1], num=num)
    return xs, ys


def _trajectory_paths(checkpoint: str) -> list[Path]:
    """``ckpt-epoch*.pt`` of CHECKPOINT's folder, then CHECKPOINT itself (the trajectory up to it)."""
    from sharpscope.train.checkpoint import read_checkpoint_file

    final = Path(checkpoint)
    found = sorted(p for p in final.parent.glob("ckpt-epoch*.pt") if p.resolve() != final.resolve())
    final_epoch = read_checkpoint_file(final)[0].get("epoch") if final.exists() else None
    keep = []
    for p in found:
        epoch = read_checkpoint_file(p)[0].get("epoch")
        if final_epoch is None or epoch is None or epoch < final_epoch:
            keep.append((epoch if epoch is not None else -1, p))
    return [p for _, p in sorted(keep)] + [final]


def _pca_job(plan: _Plan) -> list[dict]:
    import numpy as np

    from sharpscope.landscape import evaluate, trajectory_pca
    from sharpscope.train.checkpoint import load_checkpoint

    checkpoint = plan.checkpoint
    loaded = _load_all([checkpoint], plan)
    ck, batches = loaded[0]
    paths = _trajectory_paths(checkpoint)
    if len(paths) < 3:
        raise SharpscopeError(
            f"--directions pca needs at least 3 checkpoints of one run; found {len(paths)} in "
            f"{Path(checkpoint).parent}/ (ckpt-epoch*.pt and {Path(checkpoint).name}); train with --save-every 1"
        )
    points = _count(plan.x, PCA_POINTS) * _count(plan.y if plan.y is not None else plan.x, PCA_POINTS)
    _check_memory(plan, loaded, points, extra_models=len(paths) - 1)
    models = [load_checkpoint(p, device=plan.device).model for p in paths[:-1]] + [ck.model]
    pca = trajectory_pca(models)
    # each checkpoint's own loss: where it lies off the plane, the surface under its projection differs
    own = [evaluate(m, plan.loss_fn, batches) for m in models]
    xs, ys = _cover(pca.path, plan.x, plan.y, PCA_POINTS)
    label = _labels_for([checkpoint], [ck])[0]
    notes = []
    for axis, coords, values in (("--x", xs, pca.path[:, 0]), ("--y", ys, pca.path[:, 1])):
        if values.min() < coords[0] or values.max() > coords[-1]:
            notes.append(f"{label}: the projected path reaches {axis.strip('-')} = {values.min() + 0.0:.3g} to "
                         f"{values.max() + 0.0:.3g}, outside {axis} {coords[0]:.3g}:{coords[-1]:.3g}; the figures "
                         f"show part of it (omit {axis} to cover it)")
    return [{"label": label, "paths": [str(p) for p in paths], "checkpoint": ck, "batches": batches,
             "directions": (pca.d1, pca.d2), "coords": (xs, ys), "pca": pca,
             "checkpoint_loss": np.array([e.loss for e in own]),
             "checkpoint_accuracy": np.array([e.accuracy for e in own]), "notes": notes,
             "save": _for_file((pca.d1, pca.d2), (xs, ys), path=pca.path.tolist(),
                               checkpoints=[str(p) for p in paths])}]


def _figure_stems(jobs, dim: int, multi: bool) -> list[str]:
    """Every figure's file stem, in the order written."""
    stems = []
    for job in jobs:
        suffix = f"-{job['label']}" if multi else ""
        stems += [f"curve{suffix}"] if dim == 1 else [f"{k}{suffix}" for k in ("contour", "contourf", "heatmap",
                                                                                "surface3d")]
    if dim == 2 and not multi:
        stems.append("accuracy")
    if multi:
        stems.append("curve" if dim == 1 else "comparison")
    if "pca" in jobs[0]:
        stems.append("trajectory")
    return stems


def _output_names(jobs, stems, dim, multi, direction_files, figure_output: FigureOutput) -> list[str]:
    names = []
    for stem in stems:
        names += [f"{stem}.npz", f"{stem}.json"]
    for stem in _figure_stems(jobs, dim, multi):
        names += figure_output.names(stem)
    if "pca" in jobs[0]:
        names.append("trajectory.npz")
    names += [name for name, _, _ in direction_files]
    names.append("surface.html")
    return names


# ----------------------------------------------------------------------------------------------------------------
# compute, write


def _compute_all(jobs, partials, loss_fn, progress: bool, rank_info, config: dict) -> list:
    """Every job's surface, computed (or resumed from its partial file), gathered on rank 0 (empty elsewhere)."""
    from sharpscope import distributed
    from sharpscope.landscape import loss_surface

    shard = (rank_info.rank, rank_info.world_size) if rank_info.enabled else None
    surfaces = []
    for job, partial in zip(jobs, partials):
        surface = loss_surface(job["checkpoint"].model, loss_fn, job["batches"], directions=job["directions"],
                               coords=job["coords"], checkpoint_path=partial, progress=progress, label=job["label"],
                               shard=shard, precision=config["precision"], compile=config["compile"])
        parts = distributed.gather_to_main(surface)  # [surface] when not distributed; None on ranks > 0
        if parts is not None:
            merged = parts[0]
            for part in parts[1:]:
                merged = merged.merge(part)
            computed = sum(part.metadata.get("points_computed_this_run", 0) for part in parts)
            surfaces.append(replace(merged, metadata={**merged.metadata, "points_computed_this_run": computed,
                                                      "ranks": rank_info.world_size}))
    return surfaces


@dataclass
class _Writer:
    """Writes the results of every job: arrays, JSON sidecars, figures, the HTML page and the directions."""

    out: Path
    config: dict
    dim: int
    multi: bool
    log_scale: bool
    figure: dict  # cmap, levels, vmin, vmax as given (loss units)
    figure_output: FigureOutput

    def _limits(self, surfaces) -> tuple[float | None, float | None]:
        """The loss colour limits in drawn units (log10 with log scale); a shared range for 3-D panels shown side
        by side (the report) where none is given."""
        import math

        from sharpscope.plots.surface import shared_range

        vmin, vmax = self.figure["vmin"], self.figure["vmax"]
        if self.log_scale:
            # --vmin/--vmax <= 0 cannot be drawn on a log scale: auto resolved to log, so ignore them there
            vmin = math.log10(vmin) if vmin is not None and vmin > 0 else None
            vmax = math.log10(vmax) if vmax is not None and vmax > 0 else None
        if self.multi and self.dim == 2 and (vmin is None or vmax is None):
            lo, hi = shared_range(surfaces, log_scale=self.log_scale)
            vmin, vmax = (lo if vmin is None else vmin), (hi if vmax is None else vmax)
        return vmin, vmax

    def _save(self, fig, stem: str) -> list[Path]:
        return self.figure_output.save(fig, self.out, stem)

    def write(self, jobs, surfaces, stems, direction_files) -> tuple[list[Path], float | None]:
        import numpy as np

        from sharpscope.io import write_json, write_npz, write_text
        from sharpscope.landscape import save_directions
        from sharpscope.landscape.interpolation import loss_barrier
        from sharpscope.plots.surface import (
            has_accuracy,
            plot_comparison,
            plot_contour,
            plot_curves,
            plot_interpolation,
            plot_surface_3d,
            plot_trajectory,
            plotly_html,
        )
        from sharpscope.results import provenance

        out, log_scale, multi = self.out, self.log_scale, self.multi
        cmap, levels = self.figure["cmap"], self.figure["levels"]
        vmin, vmax = self._limits(surfaces)
        written: list[Path] = []
        barrier = None
        file_of = {label: name for name, _, labels in direction_files for label in labels}
        for job, surface, stem in zip(jobs, surfaces, stems):
            written.append(surface.save(out / f"{stem}.npz"))
            record = {
                "command": "landscape",
                "label": job["label"],
                "checkpoints": [str(p) for p in job["paths"]],
                "config": self.config,
                "directions_file": file_of[job["label"]],
                **surface.to_json_dict(),
                "provenance": provenance([str(p) for p in job["paths"]]),
            }
            line = self.dim == 1 and "endpoints" in job
            if line:
                b = loss_barrier(surface.xs, np.where(surface.done, surface.loss, np.nan))
                barrier = b.barrier
                record["barrier"] = {"value": b.barrier, "t": b.t, "max_loss": b.max_loss,
                                     "endpoint_losses": [b.loss_start, b.loss_end],
                                     "definition": "max_{0<=t<=1} L(t) - max(L(0), L(1))"}
            if "points" in job:
                record["plane_points"] = {"labels": job["endpoints"], "coords": job["points"].tolist()}
            if "pca" in job:
                pca = job["pca"]
                record["pca"] = {"explained_variance_ratio": pca.explained_variance_ratio.tolist(),
                                 "path": pca.path.tolist(), "residual_norms": pca.residual_norms.tolist(),
                                 "singular_values": pca.singular_values.tolist(),
                                 "checkpoint_loss": job["checkpoint_loss"].tolist()}
            written.append(write_json(out / f"{stem}.json", record))
            suffix = f"-{job['label']}" if multi else ""
            if self.dim == 1:
                if line:
                    fig = plot_interpolation(surface, endpoints=job["endpoints"], log_scale=log_scale)
                else:
                    fig = plot_curves(surface, accuracy=has_accuracy(surface), log_scale=log_scale)
                written += self._save(fig, f"curve{suffix}")
                continue
            marks = {"points": job["points"], "point_labels": job["endpoints"]} if "points" in job else {}
            for k in ("contour", "contourf", "heatmap"):
                written += self._save(plot_contour(surface, kind=k, log_scale=log_scale, cmap=cmap, levels=levels,
                                                   vmin=vmin, vmax=vmax, **marks), f"{k}{suffix}")
            if not multi and has_accuracy(surface):
                written += self._save(plot_contour(surface, kind="contourf", quantity="accuracy", levels=levels,
                                                   **marks), "accuracy")
            written += self._save(plot_surface_3d(surface, log_scale=log_scale, vmin=vmin, vmax=vmax,
                                                  **({"cmap": cmap} if cmap else {})), f"surface3d{suffix}")
        if multi and self.dim == 1:  # the main 1-D figure: every model's curve on one set of axes
            written += self._save(plot_curves(surfaces, accuracy=any(has_accuracy(s) for s in surfaces),
                                              log_scale=log_scale,
                                              title="loss along the same directions"), "curve")
        elif multi:
            written += self._save(plot_comparison(surfaces, kind="contourf", log_scale=log_scale, accuracy=True,
                                                  cmap=cmap, levels=levels, vmin=vmin, vmax=vmax), "comparison")
        html_extra: dict[str, Any] = {}
        if "pca" in jobs[0]:
            job, pca = jobs[0], jobs[0]["pca"]
            written += self._save(plot_trajectory(surfaces[0], pca.path,
                                                  explained_variance_ratio=pca.explained_variance_ratio,
                                                  residual_norms=pca.residual_norms, log_scale=log_scale,
                                                  levels=levels, **({"cmap": cmap} if cmap else {})),
                                  "trajectory")
            written.append(write_npz(out / "trajectory.npz", path_coords=pca.path,
                                     explained_variance_ratio=pca.explained_variance_ratio,
                                     residual_norms=pca.residual_norms, singular_values=pca.singular_values,
                                     checkpoint_loss=job["checkpoint_loss"],
                                     checkpoint_accuracy=job["checkpoint_accuracy"],
                                     checkpoints=[str(p) for p in job["paths"]]))
            html_extra = {
                "title": f"{job['label']}: loss on the PCA plane of the trajectory, the path projected on it",
                "path": pca.path,
                "path_labels": [f"{Path(p).name}: its own loss {loss:.4g}, {residual:.3g} off the plane"
                                for p, loss, residual in zip(job["paths"], job["checkpoint_loss"],
                                                             pca.residual_norms)],
            }
        written.append(write_text(out / "surface.html", plotly_html(surfaces, log_scale=log_scale, **html_extra)))
        for name, directions, labels in direction_files:
            paths = [str(p) for job in jobs if job["label"] in labels for p in job["paths"]]
            written.append(save_directions(out / name, directions, about={
                "what": _describe(directions), "command": "landscape", "models": labels, "config": self.config,
                "provenance": provenance(paths)}))
        return written, barrier

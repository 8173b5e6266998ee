"""``sharpscope landscape``: a thin shell over :mod:`sharpscope.landscape` and :mod:`sharpscope.plots.surface`."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from sharpscope.cli.options import (
    GridRange,
    device_option,
    eval_set_options,
    model_spec_option,
    default_out,
    out_options,
    resolve_device,
    seed_option,
    show_progress,
)

DIRECTION_KINDS = ("random", "interpolate", "pca", "hessian")
DEFAULT_GRID = (-1.0, 1.0, 51)  # the paper code's --x=-1:1:51 (Li et al. 2018)
DEFAULT_INTERPOLATION_GRID = (-0.5, 1.5, 41)
PLANE_POINTS = 41  # grid points per axis of a plane through three checkpoints (covering them)
PCA_POINTS = 21  # grid points per axis of a PCA plane (covering the projected path): the path, not detail, matters


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--compare", "compare", multiple=True, type=click.Path(dir_okay=False), metavar="CKPT",
              help="Another checkpoint, cut the same way and drawn side by side (repeatable). With --directions "
                   "interpolate: the other end of the line (one) or the two other corners of a plane (two).")
@click.option("--directions", "direction_kind", type=click.Choice(DIRECTION_KINDS), default="random",
              help="random: filter-normalised Gaussian directions (Li et al. 2018); interpolate: towards --compare "
                   "(BN statistics too); pca: PCA plane of the run's trajectory (ckpt-epoch*.pt next to CHECKPOINT, "
                   "CHECKPOINT last); hessian: the top Hessian eigenvectors.")
@click.option("--dim", type=click.IntRange(1, 2), default=None,
              help="1 = a curve, 2 = a surface [default: 2; 1 for interpolation between two checkpoints].")
@click.option("--directions-from", "directions_from", type=click.Path(dir_okay=False), default=None,
              metavar="FILE",
              help="Cut along the directions an earlier run wrote (its directions.pt) instead of --directions: a "
                   "random draw is normalised to each model again (a comparable cut of another model; --norm and "
                   "the bias/BN choice default to the saved run's), other kinds are used as saved. The grid "
                   "defaults to the saved run's.")
@click.option("--x", "x_range", type=GridRange(), default=None,
              help="Grid along direction 1 [default: -1:1:51; interpolate: -0.5:1.5:41; pca: covers the path "
                   "(21 points); --directions-from: the saved run's].")
@click.option("--y", "y_range", type=GridRange(), default=None,
              help="Grid along direction 2 [default: as --x; pca and planes without --x: covers the points].")
@click.option("--norm", type=click.Choice(["filter", "layer", "none"]), default="filter",
              help="Normalisation of random directions: per filter (the paper), per layer, or raw.")
@click.option("--include-bias-bn/--ignore-bias-bn", "include_bias_bn", default=False,
              help="Random directions: also perturb biases and BatchNorm gamma/beta (each normalised as a whole), "
                   "or leave them (zero direction, the paper's default).")
@model_spec_option
@eval_set_options
@seed_option
@device_option
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              help="Forward passes in float32 (exact) or under bf16 autocast (GPU speed, ~1e-2 relative error).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the forward passes (large grids on a GPU).")
@click.option("--log-scale", is_flag=True, help="Draw log10(loss) (surfaces) or a log loss axis (curves).")
@out_options
@click.pass_context
def command(ctx, checkpoint, compare, direction_kind, dim, directions_from, x_range, y_range, norm, include_bias_bn,
            model_spec, dataset, split, num_samples, batch_size, data_dir, seed, device, precision, compile_, log_scale,
            out, overwrite):
    """Loss along lines and over planes around checkpoints (Li et al. 2018), side by side.

    \b
    Examples:
      sharpscope landscape runs/sam/final.pt --compare runs/sgd/final.pt --out results/landscape
      sharpscope landscape runs/sgd/final.pt --dim 1 --x -1:1:101 --out results/sgd-1d
      sharpscope landscape runs/sgd/final.pt --compare runs/sam/final.pt --directions interpolate --out results/interp
      sharpscope landscape runs/sgd/final.pt --directions pca --out results/sgd-pca
      sharpscope landscape runs/sgd/final.pt --directions hessian --x -0.5:0.5:21 --out results/sgd-hessian
      sharpscope landscape runs/asam/final.pt --directions-from results/landscape/directions.pt --out results/asam

    Every point (a, b) is the model at w + a d1 + b d2, evaluated in eval mode on a fixed set: the first
    --num-samples samples of --split (by default training samples: the loss the optimizer saw). The grid
    centre is the checkpoint itself. Random directions are drawn from --seed, the same draw for every model,
    each normalised to its own weights. Writes into --out: surface.npz + surface.json (one surface-LABEL.* per
    model with --compare), the figures (curve or contour, filled contour, heatmap, accuracy, 3-D PNGs on one z
    scale and a comparison panel of loss and accuracy) and an interactive surface.html, and the directions in
    directions.pt (random: the raw seeded draw; one directions-LABEL.pt per model where they differ, as Hessian
    eigenvectors do) for --directions-from. An interrupted run resumes where it stopped when rerun.
    """
    import torch

    from sharpscope.errors import SharpscopeError

    saved = None
    if directions_from is not None:
        saved, direction_kind, norm, include_bias_bn = _saved_directions(ctx, directions_from, direction_kind, norm,
                                                                        include_bias_bn)
        if _given(ctx, "dim") and dim != len(saved):
            raise SharpscopeError(
                f"--directions-from {directions_from} holds {len(saved)} direction(s) (a {len(saved)}-D cut); "
                f"drop --dim {dim}"
            )
        dim = len(saved)
    else:
        if direction_kind != "random":
            _refuse_random_only_options(ctx, include_bias_bn,
                                        f"applies to random directions only, not --directions {direction_kind}")
        if direction_kind == "interpolate" and len(compare) not in (1, 2):
            raise SharpscopeError(
                f"--directions interpolate needs one --compare (a line to it) or two (a plane through three), "
                f"got {len(compare)}"
            )
        if direction_kind == "pca" and compare:
            raise SharpscopeError("--directions pca draws one run's trajectory; drop --compare and run it per run")
        if direction_kind == "interpolate":
            needed = len(compare)
            if dim is not None and dim != needed:
                raise SharpscopeError(
                    f"--directions interpolate with {needed} --compare is {needed}-D (a "
                    f"{'line' if needed == 1 else 'plane'}); drop --dim {dim} or give {dim} --compare"
                )
            dim = needed
        elif direction_kind == "pca":
            if dim not in (None, 2):
                raise SharpscopeError("--directions pca is a plane (--dim 2); drop --dim 1")
            dim = 2
    dim = dim or 2
    if dim == 1 and y_range is not None:
        raise SharpscopeError("--y is for 2-D surfaces; drop it or pass --dim 2")
    renormalised = direction_kind == "random" and (saved is None or saved[0].kind == "draw")

    from sharpscope import distributed

    # under torchrun every rank computes every world_size-th grid point; rank 0 gathers, writes and prints
    rank_info, dev = distributed.setup(resolve_device(device))
    progress = show_progress(ctx) and rank_info.is_main
    eval_kwargs = dict(dataset=dataset, split=split, num_samples=num_samples, batch_size=batch_size, device=dev,
                       data_dir=data_dir, model_spec=model_spec)
    config = {
        "checkpoint": str(checkpoint), "compare": list(compare), "directions": direction_kind, "dim": dim,
        # normalisation of random directions; None where the directions are used as they are
        "norm": norm if renormalised else None, "ignore_bias_bn": not include_bias_bn if renormalised else None,
        "seed": saved[0].seed if saved is not None else seed, "dataset": dataset, "split": split,
        "num_samples": num_samples, "batch_size": batch_size, "device": str(dev), "log_scale": log_scale,
        "precision": precision, "compile": compile_,
        **({"model_spec": model_spec} if model_spec else {}),  # only when given: older results stay comparable
        **({"directions_from": str(directions_from)} if directions_from is not None else {}),
    }
    loss_fn = torch.nn.CrossEntropyLoss()
    out = Path(out or default_out("landscape", [str(checkpoint), *map(str, compare)]))

    if saved is not None:
        jobs = _saved_jobs(checkpoint, compare, saved, dim, x_range, y_range, norm, include_bias_bn, loss_fn,
                           eval_kwargs)
    elif direction_kind in ("random", "hessian"):
        jobs = _independent_jobs(checkpoint, compare, direction_kind, dim, x_range, y_range, norm,
                                 include_bias_bn, seed, loss_fn, eval_kwargs, progress)
    elif direction_kind == "interpolate":
        jobs = _interpolation_job(checkpoint, compare, x_range, y_range, loss_fn, eval_kwargs)
    else:
        jobs = _pca_job(checkpoint, x_range, y_range, dev, eval_kwargs, loss_fn)

    multi = len(jobs) > 1
    stems = [f"surface-{job['label']}" if multi else "surface" for job in jobs]
    direction_files = _direction_files(jobs)
    outputs = _output_names(jobs, stems, dim, multi, direction_files)
    from sharpscope.io import prepare_out_dir

    prepare_out_dir(out, outputs=outputs, overwrite=overwrite, resume=False)
    distributed.barrier()  # rank 0 has removed stale temporaries before any rank writes its partial file
    rank_suffix = f".rank{rank_info.rank}-of-{rank_info.world_size}" if rank_info.enabled else ""
    partials = [out / f".{stem}.partial{rank_suffix}.npz" for stem in stems]
    if overwrite:
        for p in partials:
            p.unlink(missing_ok=True)

    try:
        _run_jobs(out, jobs, stems, partials, loss_fn, progress, rank_info, config, dim, multi, log_scale,
                  direction_files)
    finally:
        if rank_info.enabled:  # leave together: a rank exiting while gloo still talks to it aborts the job
            distributed.barrier()
            distributed.teardown()


def _run_jobs(out, jobs, stems, partials, loss_fn, progress, rank_info, config, dim, multi, log_scale,
              direction_files) -> None:
    from sharpscope import distributed

    shard = (rank_info.rank, rank_info.world_size) if rank_info.enabled else None
    surfaces = []
    for job, partial in zip(jobs, partials):
        surface = _compute(job, partial, loss_fn, progress, shard, config)
        parts = distributed.gather_to_main(surface)  # [surface] when not distributed; None on ranks > 0
        if parts is not None:
            merged = parts[0]
            for part in parts[1:]:
                merged = merged.merge(part)
            computed = sum(part.metadata.get("points_computed_this_run", 0) for part in parts)
            surfaces.append(replace(merged, metadata={**merged.metadata, "points_computed_this_run": computed,
                                                      "ranks": rank_info.world_size}))
    if not rank_info.is_main:
        return
    written = _write_results(out, jobs, surfaces, stems, config, dim, multi, log_scale, direction_files)
    for p in out.glob(".surface*.partial*.npz"):  # every rank's resume file: the results are written
        p.unlink(missing_ok=True)
    _print_summary(jobs, surfaces, written, rank_info.world_size)


# ----------------------------------------------------------------------------------------------------------------
# options and saved directions


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through its environment variable)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT,
                                              ParameterSource.PROMPT)


def _refuse_random_only_options(ctx: click.Context, include_bias_bn: bool, reason: str) -> None:
    """Bad usage (exit 2) if an option that only shapes random directions (--norm, --include-bias-bn /
    --ignore-bias-bn) was given where it would do nothing; ``reason`` says why."""
    given = ["--norm"] if _given(ctx, "norm") else []
    if _given(ctx, "include_bias_bn"):
        given.append("--include-bias-bn" if include_bias_bn else "--ignore-bias-bn")
    if given:
        raise click.BadParameter(f"{reason}; drop it", param_hint=given[0])


def _saved_directions(ctx, path, direction_kind, norm, include_bias_bn):
    """The directions of ``--directions-from``, the kind of cut they make, and the normalisation of a raw random
    draw: the saved run's unless given on the command line."""
    from sharpscope.errors import SharpscopeError
    from sharpscope.landscape import load_directions

    saved = load_directions(path)
    if len(saved) not in (1, 2):
        raise SharpscopeError(f"--directions-from {path} holds {len(saved)} directions; expected 1 (a curve) or 2")
    kind = saved[0].kind
    if _given(ctx, "seed"):
        raise click.BadParameter(f"the directions come from {path} (seed {saved[0].seed}); drop --seed",
                                 param_hint="--seed")
    cli_kind = {"draw": "random", "plane": "interpolate"}.get(kind, kind)
    if _given(ctx, "direction_kind") and direction_kind != cli_kind:
        raise click.BadParameter(f"{path} holds {kind} directions, which decide the cut; drop --directions",
                                 param_hint="--directions")
    if kind == "draw":
        normalize = saved[0].info.get("normalize") or {}
        norm = norm if _given(ctx, "norm") else normalize.get("norm", norm)
        if not _given(ctx, "include_bias_bn"):
            include_bias_bn = not normalize.get("ignore_bias_bn", not include_bias_bn)
    else:
        _refuse_random_only_options(ctx, include_bias_bn,
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


def _load_all(paths: list[str], eval_kwargs: dict, loss_fn) -> list[tuple[Any, Any]]:
    """Each checkpoint with its evaluation set; a diverged one (non-finite loss) is refused before any work."""
    from sharpscope.cli.inputs import analysis_inputs, check_finite_loss

    loaded = []
    for p in paths:
        checkpoint, batches = analysis_inputs(p, **eval_kwargs)
        check_finite_loss(checkpoint.model, loss_fn, batches, p)
        loaded.append((checkpoint, batches))
    return loaded


def _independent_jobs(checkpoint, compare, kind, dim, x_range, y_range, norm, include_bias_bn, seed, loss_fn,
                      eval_kwargs, progress) -> list[dict]:
    from sharpscope.landscape import gaussian_draw, hessian_directions, normalize_draw

    paths = [checkpoint, *compare]
    loaded = _load_all(paths, eval_kwargs, loss_fn)
    labels = _labels_for(paths, [ck for ck, _ in loaded])
    xs = _grid(x_range, DEFAULT_GRID)
    ys = _grid(y_range if y_range is not None else x_range, DEFAULT_GRID) if dim == 2 else None
    coords = xs if ys is None else (xs, ys)
    jobs = []
    for path, (ck, batches), label in zip(paths, loaded, labels):
        if kind == "random":
            # the raw draw is saved: normalised to another model it gives that model's comparable directions
            draw = gaussian_draw(ck.model, dim=dim, seed=seed)
            directions = normalize_draw(ck.model, draw, norm=norm, ignore_bias_bn=not include_bias_bn)
            save = _for_file(draw, coords, normalize={"norm": norm, "ignore_bias_bn": not include_bias_bn})
        else:
            if progress:
                click.echo(f"{label}: top-{dim} Hessian eigenvectors (Lanczos)...", err=True)
            directions = hessian_directions(ck.model, loss_fn, batches, k=dim, seed=seed)
            save = _for_file(directions, coords)
        jobs.append({"label": label, "paths": [path], "checkpoint": ck, "batches": batches,
                     "directions": directions, "coords": coords, "save": save})
    return jobs


def _saved_jobs(checkpoint, compare, saved, dim, x_range, y_range, norm, include_bias_bn, loss_fn,
                eval_kwargs) -> list[dict]:
    """Every model cut along the directions of ``--directions-from``: a raw draw normalised to each model, other
    directions as they are; the grid of the run that saved them unless --x/--y are given."""
    from sharpscope.landscape import normalize_draw

    paths = [checkpoint, *compare]
    loaded = _load_all(paths, eval_kwargs, loss_fn)
    labels = _labels_for(paths, [ck for ck, _ in loaded])

    def saved_grid(direction):
        recorded = direction.info.get("grid")
        return tuple(recorded) if isinstance(recorded, (list, tuple)) and len(recorded) == 3 else DEFAULT_GRID

    xs = _grid(x_range, saved_grid(saved[0]))
    ys = _grid(y_range if y_range is not None else x_range, saved_grid(saved[1])) if dim == 2 else None
    coords = xs if ys is None else (xs, ys)
    draw = saved[0].kind == "draw"
    normalize = {"norm": norm, "ignore_bias_bn": not include_bias_bn}
    save = _for_file(saved, coords, **({"normalize": normalize} if draw else {}))
    jobs = []
    for path, (ck, batches), label in zip(paths, loaded, labels):
        directions = normalize_draw(ck.model, saved, norm=norm, ignore_bias_bn=not include_bias_bn) if draw else saved
        jobs.append({"label": label, "paths": [path], "checkpoint": ck, "batches": batches,
                     "directions": directions, "coords": coords, "save": save})
    return jobs


def _interpolation_job(checkpoint, compare, x_range, y_range, loss_fn, eval_kwargs) -> list[dict]:
    from sharpscope.landscape import difference_direction, plane_through

    paths = [checkpoint, *compare]
    loaded = _load_all(paths, eval_kwargs, loss_fn)
    checkpoints = [ck for ck, _ in loaded]
    labels = _labels_for(paths, checkpoints)
    ck, batches = loaded[0]
    if len(compare) == 1:
        direction = difference_direction(ck.model, checkpoints[1].model, include_buffers=True)
        coords = _grid(x_range, DEFAULT_INTERPOLATION_GRID)
        return [{"label": f"{labels[0]}-to-{labels[1]}", "paths": paths, "checkpoint": ck, "batches": batches,
                 "directions": (direction,), "coords": coords, "endpoints": labels,
                 "save": _for_file((direction,), coords)}]
    basis = plane_through(ck.model, checkpoints[1].model, checkpoints[2].model, include_buffers=True)
    xs, ys = _cover(basis.coords, x_range, y_range, PLANE_POINTS)
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


def _pca_job(checkpoint, x_range, y_range, dev, eval_kwargs, loss_fn) -> list[dict]:
    import numpy as np

    from sharpscope.errors import SharpscopeError
    from sharpscope.landscape import evaluate, trajectory_pca
    from sharpscope.train.checkpoint import load_checkpoint

    ck, batches = _load_all([checkpoint], eval_kwargs, loss_fn)[0]
    paths = _trajectory_paths(checkpoint)
    if len(paths) < 3:
        raise SharpscopeError(
            f"--directions pca needs at least 3 checkpoints of one run; found {len(paths)} in "
            f"{Path(checkpoint).parent}/ (ckpt-epoch*.pt and {Path(checkpoint).name}); train with --save-every 1"
        )
    models = [load_checkpoint(p, device=dev).model for p in paths[:-1]] + [ck.model]
    pca = trajectory_pca(models)
    # each checkpoint's own loss: where it lies off the plane, the surface under its projection differs
    own = [evaluate(m, loss_fn, batches) for m in models]
    xs, ys = _cover(pca.path, x_range, y_range, PCA_POINTS)
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


def _output_names(jobs, stems, dim, multi, direction_files) -> list[str]:
    names = []
    for job, stem in zip(jobs, stems):
        names += [f"{stem}.npz", f"{stem}.json"]
        suffix = f"-{job['label']}" if multi else ""
        names += [f"curve{suffix}.png"] if dim == 1 else [
            f"{k}{suffix}.png" for k in ("contour", "contourf", "heatmap", "surface3d")]
    if dim == 2 and not multi:
        names.append("accuracy.png")
    if multi:
        names.append("comparison.png")
    if "pca" in jobs[0]:
        names += ["trajectory.png", "trajectory.npz"]
    names += [name for name, _, _ in direction_files]
    names.append("surface.html")
    return names


# ----------------------------------------------------------------------------------------------------------------
# compute, write, report


def _compute(job: dict, partial: Path, loss_fn, progress: bool, shard: tuple[int, int] | None, config: dict):
    from sharpscope.landscape import loss_surface

    return loss_surface(job["checkpoint"].model, loss_fn, job["batches"], directions=job["directions"],
                        coords=job["coords"], checkpoint_path=partial, progress=progress, label=job["label"],
                        shard=shard, precision=config["precision"], compile=config["compile"])


def _write_results(out: Path, jobs, surfaces, stems, config, dim, multi, log_scale, direction_files) -> list[Path]:
    from sharpscope.io import save_figure, write_json, write_npz, write_text
    from sharpscope.landscape import save_directions
    from sharpscope.plots.surface import (
        has_accuracy,
        plot_comparison,
        plot_contour,
        plot_curves,
        plot_surface_3d,
        plot_trajectory,
        plotly_html,
        shared_range,
    )
    from sharpscope.results import provenance

    written: list[Path] = []
    file_of = {label: name for name, _, labels in direction_files for label in labels}
    # 3-D panels shown next to each other (the report) share one z range, as the comparison panels do
    zlim = shared_range(surfaces, log_scale=log_scale) if multi and dim == 2 else (None, None)
    for job, surface, stem in zip(jobs, surfaces, stems):
        written.append(surface.save(out / f"{stem}.npz"))
        record = {
            "command": "landscape",
            "label": job["label"],
            "checkpoints": [str(p) for p in job["paths"]],
            "config": config,
            "directions_file": file_of[job["label"]],
            **surface.to_json_dict(),
            "provenance": provenance([str(p) for p in job["paths"]]),
        }
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
        if dim == 1:
            title = f"interpolation {job['endpoints'][0]} -> {job['endpoints'][1]}" if "endpoints" in job else None
            written.append(save_figure(plot_curves(surface, accuracy=True, log_scale=log_scale, title=title),
                                       out / f"curve{suffix}.png"))
            continue
        marks = {"points": job["points"], "point_labels": job["endpoints"]} if "points" in job else {}
        for k in ("contour", "contourf", "heatmap"):
            written.append(save_figure(plot_contour(surface, kind=k, log_scale=log_scale, **marks),
                                       out / f"{k}{suffix}.png"))
        if not multi and has_accuracy(surface):
            written.append(save_figure(plot_contour(surface, kind="contourf", quantity="accuracy", **marks),
                                       out / "accuracy.png"))
        written.append(save_figure(plot_surface_3d(surface, log_scale=log_scale, vmin=zlim[0], vmax=zlim[1]),
                                   out / f"surface3d{suffix}.png"))
    if multi:
        written.append(save_figure(plot_comparison(surfaces, kind="contourf", log_scale=log_scale, accuracy=True),
                                   out / "comparison.png"))
    html_extra: dict[str, Any] = {}
    if "pca" in jobs[0]:
        job, pca = jobs[0], jobs[0]["pca"]
        written.append(save_figure(plot_trajectory(surfaces[0], pca.path,
                                                   explained_variance_ratio=pca.explained_variance_ratio,
                                                   residual_norms=pca.residual_norms, log_scale=log_scale),
                                   out / "trajectory.png"))
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
                            for p, loss, residual in zip(job["paths"], job["checkpoint_loss"], pca.residual_norms)],
        }
    written.append(write_text(out / "surface.html", plotly_html(surfaces, log_scale=log_scale, **html_extra)))
    for name, directions, labels in direction_files:
        paths = [str(p) for job in jobs if job["label"] in labels for p in job["paths"]]
        written.append(save_directions(out / name, directions, about={
            "what": _describe(directions), "command": "landscape", "models": labels, "config": config,
            "provenance": provenance(paths)}))
    return written


def _print_summary(jobs, surfaces, written, world_size: int) -> None:
    import numpy as np

    for job, s in zip(jobs, surfaces):
        facts = s.summary()
        acc = f" (accuracy {s.center_accuracy:.2%})" if s.center_accuracy == s.center_accuracy else ""
        grid_shape = "x".join(str(n) for n in reversed(s.shape))
        seconds = s.metadata.get("seconds_this_run", 0.0)
        computed = s.metadata.get("points_computed_this_run", 0)
        resumed = facts["points_total"] - computed
        resumed_text = f", {resumed} resumed" if resumed else ""
        ranks_text = f" over {world_size} ranks" if world_size > 1 else ""
        click.echo(f"{job['label']}: centre loss {s.center_loss:.4f}{acc}; grid {grid_shape} loss "
                   f"{facts['loss_min']:.4g}..{facts['loss_max']:.4g}; {computed} points in "
                   f"{seconds:.2f} s{ranks_text}{resumed_text} on {s.num_samples} samples")
        bad = int((~np.isfinite(s.loss)).sum())
        if bad:
            why = (" (likely BatchNorm running variances extrapolated below 0 away from the checkpoints)"
                   if "endpoints" in job else "")
            click.echo(f"{job['label']}: {bad} of {s.loss.size} points have a non-finite loss{why}; the figures "
                       "leave them blank")
    for job in jobs:
        for note in job.get("notes", []):
            click.echo(note)
    for path in written:
        click.echo(f"wrote {path}")

"""``sharpscope landscape``: options -> :func:`sharpscope.landscape.run` -> printed summary."""

from __future__ import annotations

import click

from sharpscope.cli.options import (
    GridRange,
    default_out,
    device_option,
    eval_set_options,
    figure_options,
    loss_option,
    model_spec_option,
    out_options,
    seed_option,
    show_progress,
)

# the choices, without importing torch (the runner's module-level imports are light; keep --help instant)
DIRECTION_KINDS = ("random", "interpolate", "pca", "hessian")
LOSS_SCALES = ("auto", "linear", "log")


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
@loss_option
@eval_set_options
@seed_option
@device_option
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              help="Forward passes in float32 (exact) or under bf16 autocast (GPU speed, ~1e-2 relative error).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the forward passes (large grids on a GPU).")
@click.option("--loss-scale", type=click.Choice(LOSS_SCALES), default="auto",
              help="Loss colour/axis scale of the figures: log10(loss) (surfaces) or a log loss axis (curves); "
                   "auto = log when the losses drawn span more than 1.5 decades.")
@click.option("--cmap", default=None, metavar="NAME",
              help="Matplotlib colour map of the loss figures [default: viridis].")
@click.option("--levels", type=click.IntRange(2, 200), default=20, help="Contour levels of the 2-D figures.")
@click.option("--vmin", type=float, default=None, help="Lower loss colour limit of the 2-D figures [default: data].")
@click.option("--vmax", type=float, default=None, help="Upper loss colour limit of the 2-D figures [default: data].")
@figure_options
@out_options
@click.pass_context
def command(ctx, checkpoint, compare, direction_kind, dim, directions_from, x_range, y_range, norm, include_bias_bn,
            model_spec, loss, dataset, split, num_samples, batch_size, data_dir, seed, device, precision, compile_,
            loss_scale, cmap, levels, vmin, vmax, figure_output, out, overwrite):
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
    model with --compare), the figures in each --format (1-D: curve, the models overlaid on one set of axes;
    interpolation: loss and accuracy with the loss barrier marked; 2-D: contour, filled contour, heatmap, accuracy,
    3-D on one z scale and a comparison panel of loss and accuracy) and an interactive surface.html, and the directions in
    directions.pt (random: the raw seeded draw; one directions-LABEL.pt per model where they differ, as Hessian
    eigenvectors do) for --directions-from. An interrupted run resumes where it stopped when rerun. A job that
    would not fit in memory (grid, directions, figures) is refused before any work, with the estimate.
    """
    from sharpscope.landscape import run

    result = run(
        checkpoint, compare, out=out or default_out("landscape", [str(checkpoint), *map(str, compare)]),
        directions=direction_kind if _given(ctx, "direction_kind") else None,
        dim=dim, directions_from=directions_from, x=x_range, y=y_range,
        norm=norm if _given(ctx, "norm") else None,
        include_bias_bn=include_bias_bn if _given(ctx, "include_bias_bn") else None,
        model_spec=model_spec, loss=loss, dataset=dataset, split=split, num_samples=num_samples, batch_size=batch_size,
        data_dir=data_dir, seed=seed if _given(ctx, "seed") else None, device=device, precision=precision,
        compile=compile_, loss_scale=loss_scale, cmap=cmap, levels=levels, vmin=vmin, vmax=vmax,
        overwrite=overwrite, figure_output=figure_output, progress=show_progress(ctx),
    )
    if result.surfaces:  # torchrun: rank 0 alone prints
        _print_summary(result)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option ``name`` (on the command line or through its environment variable)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT,
                                              ParameterSource.PROMPT)


def _print_summary(result) -> None:
    import numpy as np

    for label, s in zip(result.labels, result.surfaces):
        facts = s.summary()
        acc = f" (accuracy {s.center_accuracy:.2%})" if s.center_accuracy == s.center_accuracy else ""
        grid_shape = "x".join(str(n) for n in reversed(s.shape))
        seconds = s.metadata.get("seconds_this_run", 0.0)
        computed = s.metadata.get("points_computed_this_run", 0)
        resumed = facts["points_total"] - computed
        resumed_text = f", {resumed} resumed" if resumed else ""
        ranks_text = f" over {result.ranks} ranks" if result.ranks > 1 else ""
        click.echo(f"{label}: centre loss {s.center_loss:.4f}{acc}; grid {grid_shape} loss "
                   f"{facts['loss_min']:.4g}..{facts['loss_max']:.4g}; {computed} points in "
                   f"{seconds:.2f} s{ranks_text}{resumed_text} on {s.num_samples} samples")
        bad = int((~np.isfinite(s.loss)).sum())
        if bad:
            why = (" (likely BatchNorm running variances extrapolated below 0 away from the checkpoints)"
                   if result.directions == "interpolate" else "")
            click.echo(f"{label}: {bad} of {s.loss.size} points have a non-finite loss{why}; the figures "
                       "leave them blank")
    if result.barrier is not None:
        click.echo(f"{result.labels[0]}: loss barrier {result.barrier:.4g} (max loss for 0 <= t <= 1 minus the "
                   "larger endpoint loss)")
    for note in result.notes:
        click.echo(note)
    for path in result.written:
        click.echo(f"wrote {path}")

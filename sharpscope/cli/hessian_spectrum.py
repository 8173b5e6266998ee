"""``sharpscope hessian-spectrum``: a thin shell over :func:`sharpscope.hessian.run` (options in, tables out)."""

from __future__ import annotations

from typing import Any

import click

from sharpscope.cli.options import (
    device_option,
    eval_set_options,
    figure_options,
    loss_option,
    model_spec_option,
    out_options,
    seed_option,
    show_progress,
)


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
@loss_option
@eval_set_options
@device_option
@seed_option
@out_options
@figure_options
@click.pass_context
def command(ctx, checkpoints, top_k, bottom_k, tol, criterion, max_matvecs, trace, trace_rtol, trace_matvecs, density,
            density_tol, density_iters, density_runs, per_layer, warm_start, model_spec, loss, dataset, split, num_samples, batch_size, data_dir,
            device, seed, out, overwrite, figure_output):
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
    convergence, trace +- stderr, density summary), the arrays in spectrum.npz, top_eigenvalues.png (every run
    on shared axes, one colour per run: over epochs, or per run when each has one checkpoint), with --bottom-k
    bottom_eigenvalues.png, with --per-layer per_layer.png (each layer's top eigenvalue, last checkpoint of each
    run), with --density density.png (all checkpoints overlaid) and one density-RUN_CKPT.png each (--format
    pdf,svg: those files in each format). --bottom-k and --per-layer results are also printed as tables.
    Results are saved after every checkpoint: rerunning with the same settings reuses finished checkpoints (an
    interrupted run resumes), and naming further checkpoints adds them to the results already in --out.
    """
    from sharpscope.hessian import run

    result = run(
        checkpoints, top_k=top_k, bottom_k=bottom_k, tol=tol, criterion=criterion, max_matvecs=max_matvecs,
        trace=trace, trace_rtol=trace_rtol, trace_matvecs=trace_matvecs, density=density, density_tol=density_tol,
        density_iters=density_iters, density_runs=density_runs, per_layer=per_layer, warm_start=warm_start,
        model_spec=model_spec, loss=loss, dataset=dataset, split=split, num_samples=num_samples, batch_size=batch_size,
        data_dir=data_dir, device=device, seed=seed, out=out, overwrite=overwrite, figure_output=figure_output,
        progress=show_progress(ctx),
    )
    if not result.is_main:
        return
    records = list(result.records)
    _print_summary(records, bottom_k=bottom_k)
    if bottom_k > 1:
        _print_bottom(records)
    if per_layer:
        _print_per_layer(records)
    for path in result.outputs:
        click.echo(f"wrote {path}")


def _print_bottom(records: list[dict[str, Any]]) -> None:
    """The bottom-k eigenvalues of each checkpoint, most negative first (``*``: not converged)."""
    shown = max((len(r["bottom"]["eigenvalues"]) for r in records if r.get("bottom")), default=0)
    click.echo("")
    click.echo(f"{'run':<12} {'epoch':>5} " + " ".join(f"{f'lambda_min,{i + 1}':>13}" for i in range(shown)))
    for r in records:
        if not r.get("bottom"):
            continue
        epoch = "-" if r["epoch"] is None else str(r["epoch"])
        cells = [f"{v:.5g}{'' if ok else '*'}" for v, ok in zip(r["bottom"]["eigenvalues"], r["bottom"]["converged"])]
        click.echo(f"{r['run'][:12]:<12} {epoch:>5} " + " ".join(f"{c:>13}" for c in cells))


def _print_per_layer(records: list[dict[str, Any]]) -> None:
    """Top eigenvalue of each layer's block (rows) at the last checkpoint of each run (columns)."""
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("per_layer"):
            last[r["run"]] = r
    if not last:
        return
    layers = list(dict.fromkeys(name for r in last.values() for name in r["per_layer"]))
    header = "per-layer lambda_1"
    width = max(len(header), *(len(name) for name in layers))
    columns = [run if r["epoch"] is None else f"{run}@{r['epoch']}" for run, r in last.items()]
    click.echo("")
    click.echo(f"{header:<{width}} " + " ".join(f"{c[:13]:>13}" for c in columns))
    for name in layers:
        cells = []
        for r in last.values():
            block = r["per_layer"].get(name)
            cells.append("-" if block is None else
                         f"{block['eigenvalues'][0]:.5g}{'' if all(block['converged']) else '*'}")
        click.echo(f"{name:<{width}} " + " ".join(f"{c:>13}" for c in cells))


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

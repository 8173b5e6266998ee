"""``sharpscope report``: a thin shell over :func:`sharpscope.report.run` (every analysis of a set of training runs,
run or reused, and one HTML page)."""

from __future__ import annotations

import click

from sharpscope.cli.options import FloatList, GridRange, IntList, OutDir, device_option, figure_options, seed_option


@click.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=OutDir(),
              help="Folder for the report and analyses [default: results/RUNS-report].")
@click.option("--overwrite", is_flag=True, help="Recompute the analyses already in --out and replace the report.")
@click.option("--grid", type=GridRange(), default="-1:1:21", help="2D landscape grid for each axis (START:STOP:NUM).")
@click.option("--m", "m_values", type=IntList(), default="1,8,32,128", help="m values of m-sharpness.")
@click.option("--rho", "rho_values", type=FloatList(positive=True), default="0.01,0.05,0.1",
              help="rho values of m-sharpness.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, help="Hessian top eigenvalues per checkpoint.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1024, help="Evaluation samples (train split).")
@click.option("--density-iters", type=click.IntRange(min=2), default=90,
              help="Most Lanczos steps per spectral-density run (Ghorbani et al. 2019 use 90); each run stops "
                   "earlier, once its quadrature's error bound is 1% of the spectral range.")
@click.option("--sharpness-steps", type=click.IntRange(min=1), default=5,
              help="Ascent steps of worst-case sharpness (1 = SAM's estimate).")
@click.option("--max-chunks", type=click.IntRange(min=1), default=64,
              help="At most this many m-sample chunks per (m, rho) cell of m-sharpness.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the dataset files.")
@click.option("--summary-only", is_flag=True,
              help="Compute only the analyses of the summary table (spectrum-final/, sharpness/): no landscapes, no "
                   "spectrum over the trajectories (a many-seed comparison at a fraction of the cost).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Analyses computed side by side, each a process on its share of the CPU threads [default: 2 on "
                   "a CPU with 2 cores or more, 1 on CUDA or with OMP_NUM_THREADS=1]; 1 runs them in this process, "
                   "one after the other.")
@seed_option
@device_option
@figure_options
@click.pass_context
def command(ctx, runs, out, overwrite, grid, m_values, rho_values, top_k, num_samples, density_iters, sharpness_steps,
            max_chunks, data_dir, summary_only, jobs, seed, device, figure_output):
    """Compare training runs (SGD vs SAM ...) in one self-contained HTML report.

    \b
    Examples:
      sharpscope report runs/sgd runs/sam --out results/report
      sharpscope report runs/fashion-mnist/*-seed0 --grid -1:1:31 --out results/fm-report

    For the RUNS (folders written by `sharpscope train`) it computes, or reuses when already in --out:
    landscape/ (2D filter-normalized surfaces around each final.pt, side by side), interpolation/ (1D, from the
    first run's final.pt to the last's), spectrum/ (Hessian top eigenvalues over each trajectory),
    spectrum-final/ (trace and spectral density of each final.pt) and sharpness/ (worst-case m-sharpness of
    each final.pt). Then it draws its own figures from those results (learning_curves.png, top_eigenvalues.png,
    density.png, sharpness_vs_rho.png, and kendall_tau.png with 3 runs or more), every one with the runs in the
    order given, and writes report.html (figures embedded; opens offline) and report.json (its settings).
    --format/--dpi apply to the report's figures and to those of the analyses it computes; the page embeds the
    PNGs, so png is always written. The analyses run --jobs at a time (the trajectory spectrum, the longest,
    beside the others), each with its output in logs/NAME.log.

    Run again with the same RUNS and settings, it reuses every analysis and re-renders the report; with other
    settings it refuses unless --overwrite (which recomputes everything).
    """
    from sharpscope.report import run

    result = run(runs, out=out, overwrite=overwrite, grid=grid, m=m_values, rho=rho_values, top_k=top_k,
                 num_samples=num_samples, density_iters=density_iters, sharpness_steps=sharpness_steps,
                 max_chunks=max_chunks, data_dir=data_dir, summary_only=summary_only, jobs=jobs, seed=seed,
                 device=device, figure_output=figure_output, quiet=bool(ctx.find_root().obj.get("quiet")),
                 echo=lambda line: click.echo(line, err=True))
    click.echo(_text_table(result.summary_header, result.summary_rows))
    click.echo(f"wrote {result.report} (open it in a browser), its figures "
               f"({', '.join(result.figures)}) and the analyses in {result.out_dir}/")


def _text_table(columns: list[str], rows: list[list[str]]) -> str:
    header = ["run", *columns]
    table = [header] + [[r[0], *r[2:]] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in table)

"""``sharpscope report``: run (or reuse) every analysis on a set of training runs and write one HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sharpscope.cli.options import FloatList, GridRange, IntList, OutDir, device_option, seed_option
from sharpscope.errors import SharpscopeError


STAGE_FILE = "stage.json"  # in each analysis folder: the command that computed it, to reuse it only for the same


def _comparable(args: list[str]) -> list[str]:
    """``args`` with the paths of existing files and folders made absolute (``runs/a`` and ``./runs/a/`` agree)."""
    return [str(Path(a).resolve()) if a and Path(a).exists() else a for a in args]


def _check_stage_settings(stage_out: Path, args: list[str]) -> None:
    """Refuse to reuse an analysis folder computed by another command (other runs, grid, m, rho, ...)."""
    record = stage_out / STAGE_FILE
    if not record.exists():  # computed before stage files existed, or killed between finishing and recording
        return
    before = json.loads(record.read_text()).get("command")
    now = _comparable(args)
    if before != now:
        changed = sorted({a for a in now if a not in (before or [])} | {a for a in (before or []) if a not in now})
        raise SharpscopeError(f"{stage_out}/ holds an analysis computed with other settings ({' '.join(changed)} "
                              "differ); pass --overwrite to recompute it or choose another --out")


def _run_stage(ctx: click.Context, args: list[str]) -> None:
    """Run another sharpscope command in this process (its errors propagate as one-line errors)."""
    from sharpscope.cli.main import cli

    quiet = ["-q"] if ctx.find_root().obj.get("quiet") else []
    cli.main([*quiet, *args], standalone_mode=False, prog_name="sharpscope")


@click.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=OutDir(), help="Folder for the report and analyses.")
@click.option("--overwrite", is_flag=True, help="Recompute the analyses already in --out and replace the report.")
@click.option("--grid", type=GridRange(), default="-1:1:21", help="2D landscape grid for each axis (START:STOP:NUM).")
@click.option("--m", "m_values", type=IntList(), default="1,8,32,128", help="m values of m-sharpness.")
@click.option("--rho", "rho_values", type=FloatList(positive=True), default="0.01,0.05,0.1",
              help="rho values of m-sharpness.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, help="Hessian top eigenvalues per checkpoint.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1024, help="Evaluation samples (train split).")
@click.option("--density-iters", type=click.IntRange(min=2), default=40,
              help="Lanczos steps per spectral-density run (Ghorbani et al. 2019 use 90; 40 resolves the bulk "
                   "and the outliers of the small models here at half the cost).")
@click.option("--sharpness-steps", type=click.IntRange(min=1), default=5,
              help="Ascent steps of worst-case sharpness (1 = SAM's estimate).")
@click.option("--max-chunks", type=click.IntRange(min=1), default=64,
              help="At most this many m-sample chunks per (m, rho) cell of m-sharpness.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the dataset files.")
@seed_option
@device_option
@click.pass_context
def command(ctx, runs, out, overwrite, grid, m_values, rho_values, top_k, num_samples, density_iters, sharpness_steps,
            max_chunks,
            data_dir, seed, device):
    """Compare training runs (SGD vs SAM ...) in one self-contained HTML report.

    \b
    Examples:
      sharpscope report runs/sgd runs/sam --out results/report
      sharpscope report runs/fashion-mnist/*-seed0 --grid -1:1:31 --out results/fm-report

    For the RUNS (folders written by `sharpscope train`) it computes, or reuses when already in --out:
    landscape/ (2D filter-normalized surfaces around each final.pt, side by side), interpolation/ (1D, from the
    first run's final.pt to the last's), spectrum/ (Hessian top eigenvalues over each trajectory),
    spectrum-final/ (trace and spectral density of each final.pt) and sharpness/ (worst-case m-sharpness of each final.pt). Then it writes
    report.html (figures embedded; opens offline) and learning_curves.png.
    """
    from sharpscope.io import prepare_out_dir, save_figure, write_json, write_text
    from sharpscope.plots.curves import learning_curves
    from sharpscope.report import Section, html_table, read_run, render_report

    # validated above (before hours of stages), passed on to the stages as text
    grid = f"{grid[0]!r}:{grid[1]!r}:{grid[2]}"
    m_values, rho_values = ",".join(map(str, m_values)), ",".join(map(repr, rho_values))
    run_list = [read_run(r) for r in runs]
    labels = [r.label for r in run_list]
    if len(set(labels)) != len(labels):
        raise SharpscopeError(f"runs must have distinct folder names (they label the figures), got {labels}")
    for run in run_list:
        if not (run.path / "final.pt").exists():
            raise SharpscopeError(f"{run.path} has no final.pt: the run has not finished; rerun its train command")
    out_dir = prepare_out_dir(out, outputs=["report.html"], overwrite=overwrite)
    finals = [str(r.path / "final.pt") for r in run_list]
    common = ["--num-samples", str(num_samples), "--seed", str(seed)] + (["--device", device] if device else [])
    common += ["--data-dir", data_dir] if data_dir else []
    stages = {
        "landscape": ["landscape", finals[0], *sum((["--compare", f] for f in finals[1:]), []), "--dim", "2",
                      "--x", grid, "--y", grid],
        "interpolation": ["landscape", finals[0], "--compare", finals[-1], "--directions", "interpolate"],
        "spectrum": ["hessian-spectrum", *[str(r.path) for r in run_list], "--top-k", str(top_k)],
        "spectrum-final": ["hessian-spectrum", *finals, "--top-k", "1", "--trace", "--trace-matvecs", "30",
                           "--density", "--density-iters", str(density_iters), "--density-runs", "3"],
        "sharpness": ["sharpness", *finals, "--m", m_values, "--rho", rho_values, "--steps", str(sharpness_steps),
                      "--max-chunks", str(max_chunks)],
    }
    if len(run_list) < 2:
        del stages["interpolation"]
    done_marker = {"landscape": "comparison.png" if len(run_list) > 1 else "contour.png",
                   "interpolation": "curve.png", "spectrum": "spectrum.json", "spectrum-final": "density.png",
                   "sharpness": "sharpness.json"}
    for name, args in stages.items():
        stage_out = out_dir / name
        args = [*args, *common]
        if (stage_out / done_marker[name]).exists() and not overwrite:
            _check_stage_settings(stage_out, args)
            click.echo(f"reusing {stage_out}/", err=True)
            continue
        click.echo(f"computing {name} -> {stage_out}/", err=True)
        _run_stage(ctx, [*args, "--out", str(stage_out), *(["--overwrite"] if overwrite else [])])
        write_json(stage_out / STAGE_FILE, {"command": _comparable(args)})

    curves = save_figure(learning_curves({r.label: r.metrics for r in run_list}), out_dir / "learning_curves.png")
    spectrum = _read_json(out_dir / "spectrum-final" / "spectrum.json")
    sharpness = _read_json(out_dir / "sharpness" / "sharpness.json")
    summary_rows = []
    for run in run_list:
        final = run.final
        top, trace = _final_spectrum(spectrum, run.label)
        summary_rows.append([
            run.label, run.description, f"{100 * final.get('test_acc', float('nan')):.2f}",
            f"{100 * (final.get('train_acc', float('nan')) - final.get('test_acc', float('nan'))):.2f}",
            f"{top:.4g}" if top is not None else "-", f"{trace:.4g}" if trace is not None else "-",
            _sharpness_value(sharpness, run.path / "final.pt", rho=0.05),
        ])
    sections = [
        Section("Summary", "Generalization gap = train accuracy − test accuracy (percentage points). λ_max and the "
                "trace are those of the Hessian of the training loss on the evaluation set at final.pt; "
                "sharpness is worst-case m-sharpness at rho = 0.05 for the smallest m.",
                tables=[html_table(["run", "what", "test acc (%)", "gap (pp)", "λ_max", "trace",
                                    "m-sharpness"], summary_rows)]),
        Section("Learning curves", figures=[curves]),
        Section("Loss landscapes", "Filter-normalized random directions (Li et al. 2018), the same seed for every "
                "model, biases and BatchNorm unperturbed; panels share axes and colour scale.",
                figures=sorted((out_dir / "landscape").glob("comparison*.png"))
                + sorted((out_dir / "landscape").glob("surface3d*.png"))
                + sorted((out_dir / "interpolation").glob("curve*.png")),
                links=[out_dir / "landscape" / "surface.html", out_dir / "interpolation" / "surface.html"]),
        Section("Hessian spectrum", "Top eigenvalues by Lanczos over each training trajectory, and the spectral "
                "density of the final checkpoints by stochastic Lanczos quadrature (Ghorbani et al. 2019).",
                figures=[out_dir / "spectrum" / "top_eigenvalues.png", out_dir / "spectrum-final" / "density.png"]),
        Section("Sharpness", "Worst-case m-sharpness (Foret et al. 2021 section 4.1) against rho, one line per m.",
                figures=[out_dir / "sharpness" / "sharpness_vs_rho.png", out_dir / "sharpness" / "kendall_tau.png"]),
        Section("Configurations", tables=[
            "<details><summary>" + f"{r.label}</summary><pre>{json.dumps(r.config, indent=2)}</pre></details>"
            for r in run_list]),
    ]
    page = render_report("sharpscope report: " + " vs ".join(labels), sections, out_dir=out_dir,
                         subtitle=f"{len(run_list)} runs: " + "; ".join(r.description for r in run_list))
    report_path = write_text(out_dir / "report.html", page)
    click.echo(_text_table(summary_rows))
    click.echo(f"wrote {report_path} (open it in a browser), {curves} and the analyses in {out_dir}/")


def _text_table(rows: list[list[str]]) -> str:
    header = ["run", "test acc %", "gap pp", "lambda_max", "trace", "m-sharpness"]
    table = [header] + [[r[0], *r[2:]] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in table)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def _final_spectrum(spectrum: dict | None, run_label: str) -> tuple[float | None, float | None]:
    """λ_max and trace of the run's last checkpoint in spectrum.json."""
    if not spectrum:
        return None, None
    records = [r for r in spectrum.get("checkpoints", []) if r.get("run") == run_label]
    if not records:
        return None, None
    last = max(records, key=lambda r: (r.get("epoch") is not None, r.get("epoch") or 0))
    top = last.get("top_eigenvalues") or [None]
    trace = (last.get("trace") or {}).get("value")
    return top[0], trace


def _sharpness_value(sharpness: dict | None, checkpoint: Path, *, rho: float) -> str:
    if not sharpness:
        return "-"
    rows = [r for r in sharpness.get("rows", []) if r.get("measure") == "worst" and r.get("rho") == rho
            and Path(r.get("checkpoint", "")).resolve() == checkpoint.resolve()]
    if not rows:
        return "-"
    row = min(rows, key=lambda r: r["m"])
    error = f" ± {row['stderr']:.2g}" if row.get("stderr") is not None else ""
    return f"{row['value']:.4g}{error} (m={row['m']})"

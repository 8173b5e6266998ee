"""``sharpscope report``: run (or reuse) every analysis on a set of training runs and write one HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sharpscope.cli.options import FloatList, GridRange, IntList, OutDir, default_out, device_option, seed_option
from sharpscope.errors import SharpscopeError


STAGE_FILE = "stage.json"  # in each analysis folder: the command that computed it, to reuse it only for the same
RECORD_FILE = "report.json"  # next to report.html: the settings it was made with, to re-render it only for the same
REPORT_FIGURES = ("learning_curves.png", "top_eigenvalues.png", "density.png", "sharpness_vs_rho.png",
                  "kendall_tau.png")  # drawn by the report itself (sharpscope.report.report_figures)


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


def _report_is_current(out: Path, settings: dict) -> bool:
    """True when ``out`` holds a report.html made with ``settings`` (it is then re-rendered from the analyses);
    False when it holds none, or one that recorded no settings (refused by ``prepare_out_dir`` without
    --overwrite); an error when it holds one made with other settings."""
    if not (out / "report.html").is_file() or not (out / RECORD_FILE).is_file():
        return False
    try:
        before = json.loads((out / RECORD_FILE).read_text()).get("settings", {})
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    changed = _changes(before, settings)
    if changed:
        raise SharpscopeError(f"{out}/ holds a report.html made with other settings ({'; '.join(changed)}); pass "
                              "--overwrite to recompute its analyses and replace it, or choose another --out")
    return True


def _changes(before: dict, now: dict) -> list[str]:
    """What differs between two report settings, briefly: the runs, their weights, or the analyses' arguments."""
    if before.get("runs") != now["runs"]:
        return [f"runs {' '.join(before.get('runs') or [])} -> {' '.join(now['runs'])}"]
    changes = []
    if before.get("final.pt sha256") != now["final.pt sha256"]:
        retrained = [run for run, old, new in zip(now["runs"], before.get("final.pt sha256") or [],
                                                   now["final.pt sha256"]) if old != new]
        changes.append(f"final.pt of {', '.join(retrained) or 'the runs'} changed (retrained?)")
    old_args = {a for args in (before.get("analyses") or {}).values() for a in args}
    new_args = {a for args in now["analyses"].values() for a in args}
    if old_args != new_args:
        changes.append(f"{' '.join(sorted(old_args ^ new_args))} differ")
    elif before.get("analyses") != now["analyses"]:
        changes.append("the analyses' settings differ")
    return changes


def _run_stage(ctx: click.Context, args: list[str]) -> None:
    """Run another sharpscope command in this process (its errors propagate as one-line errors)."""
    from sharpscope.cli.main import cli

    quiet = ["-q"] if ctx.find_root().obj.get("quiet") else []
    cli.main([*quiet, *args], standalone_mode=False, prog_name="sharpscope")


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
    spectrum-final/ (trace and spectral density of each final.pt) and sharpness/ (worst-case m-sharpness of
    each final.pt). Then it draws its own figures from those results (learning_curves.png, top_eigenvalues.png,
    density.png, sharpness_vs_rho.png, and kendall_tau.png with 3 runs or more), every one with the runs in the
    order given, and writes report.html (figures embedded; opens offline) and report.json (its settings).

    Run again with the same RUNS and settings, it reuses every analysis and re-renders the report; with other
    settings it refuses unless --overwrite (which recomputes everything).
    """
    from sharpscope.io import prepare_out_dir, save_figure, write_json, write_text
    from sharpscope.report import read_analyses, read_run, render_report, report_figures, report_sections, summary_rows
    from sharpscope.results import provenance

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
    finals = [str(r.path / "final.pt") for r in run_list]
    common = ["--num-samples", str(num_samples), "--seed", str(seed)] + (["--device", device] if device else [])
    common += ["--data-dir", data_dir] if data_dir else []
    stages = {
        "landscape": ["landscape", finals[0], *sum((["--compare", f] for f in finals[1:]), []), "--dim", "2",
                      "--x", grid, "--y", grid],
        "interpolation": ["landscape", finals[0], "--compare", finals[-1], "--directions", "interpolate"],
        "spectrum": ["hessian-spectrum", *[str(r.path) for r in run_list], "--top-k", str(top_k)],
        "spectrum-final": ["hessian-spectrum", *finals, "--top-k", "1", "--trace", "--density",
                           "--density-iters", str(density_iters), "--density-runs", "3"],
        "sharpness": ["sharpness", *finals, "--m", m_values, "--rho", rho_values, "--steps", str(sharpness_steps),
                      "--max-chunks", str(max_chunks)],
    }
    if len(run_list) < 2:
        del stages["interpolation"]
    stages = {name: [*args, *common] for name, args in stages.items()}
    done_marker = {"landscape": "comparison.png" if len(run_list) > 1 else "contour.png",
                   "interpolation": "curve.png", "spectrum": "spectrum.json", "spectrum-final": "density.png",
                   "sharpness": "sharpness.json"}
    # everything a report depends on: the runs (and their final weights) and the settings of every analysis
    settings = {"runs": _comparable([str(r.path) for r in run_list]),
                "final.pt sha256": [r.final_sha256[:12] for r in run_list],
                "analyses": {name: _comparable(args) for name, args in stages.items()}}
    out = Path(out or default_out("report", [str(r.path) for r in run_list]))
    reused = {name for name in stages if not overwrite and (out / name / done_marker[name]).exists()}
    # every check before any work: a refused report leaves --out as it was
    current = not overwrite and _report_is_current(out, settings)
    for name in sorted(reused, key=list(stages).index):
        _check_stage_settings(out / name, stages[name])
    out_dir = prepare_out_dir(out, outputs=["report.html"], overwrite=overwrite or current)
    if current:
        click.echo(f"{out_dir}/report.html was made with these settings: re-rendering it from the analyses", err=True)
    for name, args in stages.items():
        stage_out = out_dir / name
        if name in reused:
            click.echo(f"reusing {stage_out}/", err=True)
            continue
        click.echo(f"computing {name} -> {stage_out}/", err=True)
        _run_stage(ctx, [*args, "--out", str(stage_out), *(["--overwrite"] if overwrite else [])])
        write_json(stage_out / STAGE_FILE, {"command": _comparable(args)})

    analyses = read_analyses(out_dir)
    figures = {name: save_figure(fig, out_dir / name) for name, fig in report_figures(run_list, analyses).items()}
    for name in REPORT_FIGURES:  # one an earlier report drew that this one does not (kendall_tau.png: fewer runs)
        if name not in figures:
            (out_dir / name).unlink(missing_ok=True)
    page = render_report("sharpscope report: " + " vs ".join(labels), report_sections(run_list, analyses, figures),
                         out_dir=out_dir, subtitle=f"{len(run_list)} runs: " + "; ".join(r.description for r in run_list))
    write_json(out_dir / RECORD_FILE, {"settings": settings, "provenance": provenance(finals)})
    report_path = write_text(out_dir / "report.html", page)
    click.echo(_text_table(summary_rows(run_list, analyses)))
    click.echo(f"wrote {report_path} (open it in a browser), its figures "
               f"({', '.join(figures)}) and the analyses in {out_dir}/")


def _text_table(rows: list[list[str]]) -> str:
    from sharpscope.report import SUMMARY_COLUMNS

    header = ["run", *SUMMARY_COLUMNS]
    table = [header] + [[r[0], *r[2:]] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in table)

"""``sharpscope report`` as a function: run (or reuse) every analysis of a set of training runs and write one HTML
page. :func:`run` plans the analyses, runs them (each is the sharpscope command it names, so it can run in its own
process beside the others), draws the report's own figures and writes ``report.html``; the CLI only parses options
and prints. Exported as :func:`sharpscope.report.run`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError
from sharpscope.inputs import DEFAULT_NUM_SAMPLES
from sharpscope.plots.output import FigureOutput

__all__ = ["run", "ReportRun", "STAGE_FILE", "RECORD_FILE", "REPORT_FIGURES"]

STAGE_FILE = "stage.json"  # in each analysis folder: the command that computed it, to reuse it only for the same
RECORD_FILE = "report.json"  # next to report.html: the settings it was made with, to re-render it only for the same
REPORT_FIGURES = ("learning_curves.png", "top_eigenvalues.png", "density.png", "sharpness_vs_rho.png",
                  "kendall_tau.png")  # drawn by the report itself (sharpscope.report.report_figures)


@dataclass(frozen=True)
class ReportRun:
    """What :func:`run` wrote."""

    out_dir: Path  # the report folder
    report: Path  # report.html
    figures: dict[str, Path]  # the report's own figures (name -> png)
    computed: tuple[str, ...]  # analyses computed by this call (landscape, interpolation, spectrum, ...)
    reused: tuple[str, ...]  # analyses found in out_dir and reused
    summary_header: list[str]  # the summary table's columns (after "run")
    summary_rows: list[list[str]]  # one row per run (then per setting and the "difference" row)

    def __repr__(self) -> str:
        return (f"ReportRun({self.report}: {len(self.figures)} figures; computed {', '.join(self.computed) or '-'}; "
                f"reused {', '.join(self.reused) or '-'})")


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


def _run_stage_here(args: list[str], *, quiet: bool) -> None:
    """Run the sharpscope command ``args`` in this process (its errors propagate as SharpscopeError)."""
    from sharpscope.cli.main import cli

    cli.main([*(["-q"] if quiet else []), *args], standalone_mode=False, prog_name="sharpscope")


def _echo_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(
    runs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    grid: tuple[float, float, int] = (-1.0, 1.0, 21),
    m: Sequence[int] = (1, 8, 32, 128),
    rho: Sequence[float] = (0.01, 0.05, 0.1),
    top_k: int = 5,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    density_iters: int = 90,
    sharpness_steps: int = 5,
    max_chunks: int = 64,
    data_dir: str | None = None,
    summary_only: bool = False,
    jobs: int | None = None,
    seed: int = 0,
    device: str | None = None,
    figure_output: FigureOutput = FigureOutput(),
    quiet: bool = False,
    echo: Callable[[str], Any] = _echo_stderr,
) -> ReportRun:
    """Compare training runs in one self-contained HTML report; the function behind ``sharpscope report``.

    For ``runs`` (folders written by ``sharpscope train`` or :func:`sharpscope.train.fit`) it computes into ``out``,
    or reuses when already there: ``landscape/`` (2-D filter-normalized surfaces around each final.pt, side by
    side), ``interpolation/`` (first run's final.pt to the last's), ``spectrum/`` (top eigenvalues over each
    trajectory), ``spectrum-final/`` (trace and spectral density of each final.pt) and ``sharpness/`` (worst-case
    m-sharpness of each final.pt); with ``summary_only`` only the last two. Then it draws its own figures and
    writes ``report.html`` (figures embedded, opens offline) and ``report.json`` (its settings).

    Args:
        runs: run folders, in the order of every figure and table; their folder names label them.
        out: the report folder [default: ``results/<runs>-report``].
        overwrite: recompute the analyses already in ``out`` and replace the report. Without it, a report made
            with other settings is refused, and one made with the same settings is re-rendered.
        grid: ``(start, stop, num)`` of each axis of the 2-D landscape.
        m, rho, sharpness_steps, max_chunks: the m-sharpness grid (worst case), ascent steps and chunks per cell.
        top_k: Hessian top eigenvalues per checkpoint of the trajectories.
        num_samples: evaluation samples of the train split, shared by every analysis.
        density_iters: most Lanczos steps per spectral-density run.
        summary_only: only the analyses of the summary table (a many-seed comparison at a fraction of the cost).
        jobs: analyses computed side by side, each a process on its share of the CPU threads [default:
            :func:`sharpscope.report.default_jobs`]; 1 runs them in this process, one after the other.
        seed, device, data_dir: as in every analysis command.
        figure_output: formats and dpi of every figure (png is always written: the page embeds it).
        quiet: no progress bars in the analyses.
        echo: where progress lines go (default: stderr).

    Raises:
        SharpscopeError: runs with the same folder name, an unfinished run, an analysis or report in ``out`` made
            with other settings (without ``overwrite``), a failed analysis (naming it and its log).
    """
    from sharpscope.inputs import default_out
    from sharpscope.io import prepare_out_dir, write_json, write_text
    from sharpscope.report import (
        default_jobs,
        read_analyses,
        read_run,
        render_report,
        report_figures,
        report_sections,
        run_stages,
        summary_header,
        summary_rows,
    )
    from sharpscope.results import provenance

    grid_text = f"{float(grid[0])!r}:{float(grid[1])!r}:{int(grid[2])}"
    m_text, rho_text = ",".join(str(int(v)) for v in m), ",".join(repr(float(v)) for v in rho)
    run_list = [read_run(r) for r in runs]
    if not run_list:
        raise SharpscopeError("no runs given; pass one or more run folders written by sharpscope train")
    labels = [r.label for r in run_list]
    if len(set(labels)) != len(labels):
        raise SharpscopeError(f"runs must have distinct folder names (they label the figures), got {labels}")
    for item in run_list:
        if not (item.path / "final.pt").exists():
            raise SharpscopeError(f"{item.path} has no final.pt: the run has not finished; rerun its train command")
    finals = [str(r.path / "final.pt") for r in run_list]
    common = ["--num-samples", str(num_samples), "--seed", str(seed)] + (["--device", device] if device else [])
    common += ["--data-dir", data_dir] if data_dir else []
    stages = {
        "landscape": ["landscape", finals[0], *sum((["--compare", f] for f in finals[1:]), []), "--dim", "2",
                      "--x", grid_text, "--y", grid_text],
        "interpolation": ["landscape", finals[0], "--compare", finals[-1], "--directions", "interpolate"],
        # the trajectory figure needs eigenvalues to plot precision: the eigenvalue criterion stops each run at an
        # estimated relative error of 1e-6 (measured within 2e-6 of the residual rule's, 14% fewer products); the
        # summary's lambda_max comes from spectrum-final, at the residual rule
        "spectrum": ["hessian-spectrum", *[str(r.path) for r in run_list], "--top-k", str(top_k),
                     "--criterion", "eigenvalue"],
        "spectrum-final": ["hessian-spectrum", *finals, "--top-k", "1", "--trace", "--density",
                           "--density-iters", str(density_iters), "--density-runs", "3"],
        "sharpness": ["sharpness", *finals, "--m", m_text, "--rho", rho_text, "--steps", str(sharpness_steps),
                      "--max-chunks", str(max_chunks)],
    }
    if len(run_list) < 2:
        del stages["interpolation"]
    if summary_only:
        stages = {name: args for name, args in stages.items() if name in ("spectrum-final", "sharpness")}
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
    # every check before any work: a refused report leaves out as it was
    current = not overwrite and _report_is_current(out, settings)
    for name in sorted(reused, key=list(stages).index):
        _check_stage_settings(out / name, stages[name])
    out_dir = prepare_out_dir(out, outputs=["report.html"], overwrite=overwrite or current)
    if current:
        echo(f"{out_dir}/report.html was made with these settings: re-rendering it from the analyses")
    # the page embeds PNGs: png first, then the other formats asked for (not part of the settings: a figure format
    # changes no number)
    page_output = FigureOutput(("png", *(f for f in figure_output.formats if f != "png")), figure_output.dpi)
    figure_args = [] if page_output == FigureOutput() else ["--format", ",".join(page_output.formats),
                                                            "--dpi", str(page_output.dpi)]
    todo = {}
    for name, args in stages.items():
        if name in reused:
            echo(f"reusing {out_dir / name}/")
            continue
        echo(f"computing {name} -> {out_dir / name}/")
        todo[name] = [*args, *figure_args, "--out", str(out_dir / name), *(["--overwrite"] if overwrite else [])]
    jobs = min(jobs or default_jobs(device), max(1, len(todo)))
    if jobs == 1:
        for name, args in todo.items():
            _run_stage_here(args, quiet=quiet)
            write_json(out_dir / name / STAGE_FILE, {"command": _comparable(stages[name])})
    else:
        try:
            run_stages(todo, jobs=jobs, log_dir=out_dir / "logs", echo=echo)
        finally:  # the finished ones are reused by the next run
            for name in todo:
                if (out_dir / name / done_marker[name]).exists():
                    write_json(out_dir / name / STAGE_FILE, {"command": _comparable(stages[name])})

    analyses = read_analyses(out_dir)
    figures = {name: page_output.save(fig, out_dir, Path(name).stem)[0]
               for name, fig in report_figures(run_list, analyses).items()}
    for name in REPORT_FIGURES:  # one an earlier report drew that this one does not (kendall_tau.png: fewer runs)
        if name not in figures:
            for stale in page_output.names(Path(name).stem):
                (out_dir / stale).unlink(missing_ok=True)
    page = render_report("sharpscope report: " + " vs ".join(labels), report_sections(run_list, analyses, figures),
                         out_dir=out_dir, subtitle=f"{len(run_list)} runs: " + "; ".join(r.description for r in run_list))
    write_json(out_dir / RECORD_FILE, {"settings": settings, "provenance": provenance(finals)})
    report_path = write_text(out_dir / "report.html", page)
    return ReportRun(out_dir=out_dir, report=report_path, figures=figures, computed=tuple(todo),
                     reused=tuple(n for n in stages if n in reused),
                     summary_header=summary_header(run_list, analyses), summary_rows=summary_rows(run_list, analyses))

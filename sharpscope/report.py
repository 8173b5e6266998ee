"""The study report: one self-contained HTML page comparing training runs (SGD vs SAM ...).

This module computes nothing: it reads run folders (``config.json``, ``metrics.jsonl``) and the results that the
analysis commands wrote into the report folder (``spectrum/``, ``spectrum-final/``, ``sharpness/`` JSON and
arrays, ``landscape/`` and ``interpolation/`` figures), draws the report's own figures from those results, and lays
everything out. So a report can be re-rendered from the analyses on disk at any time.

Every figure and table lists the runs in one order, the order they were given (the command line's). Figures are
embedded as base64 PNGs so the page is one file that opens offline; the interactive plotly surfaces are linked
next to it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError
from sharpscope.sharpness.correlation import MIN_KENDALL_CHECKPOINTS  # Kendall's tau: shown from 3 runs on

#: The rho of the summary table's m-sharpness column (the seed experiment's SAM rho, DESIGN.md section 9); the
#: nearest computed rho when this one was not.
SUMMARY_RHO = 0.05

#: The summary's m-sharpness column uses the smallest computed m at least this large (:func:`headline_m`).
HEADLINE_MIN_M = 8

@dataclass(frozen=True)
class Run:
    """One training run folder, as the report sees it."""

    label: str  # folder name, e.g. "sam"
    path: Path  # the run folder
    config: dict[str, Any]  # config.json (without the environment block)
    environment: dict[str, Any]  # where it ran (versions, device)
    metrics: list[dict[str, Any]]  # metrics.jsonl records, one per epoch

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    @property
    def description(self) -> str:
        c = self.config
        from sharpscope.train.config import optimizer_label

        text = optimizer_label(c.get("optimizer", "?"), c.get("base_optimizer", "sgd")).upper()
        if c.get("optimizer") in ("sam", "asam"):
            text += f" rho={c.get('rho')}" + (f" m={c['m']}" if c.get("m") else "")
        return f"{text}, {c.get('model')} on {c.get('dataset')}, {len(self.metrics)} epochs, seed {c.get('seed')}"

    @cached_property
    def final_sha256(self) -> str:
        """SHA-256 of ``final.pt``: how the analyses' result files name the checkpoint (their paths are as typed)."""
        from sharpscope.results import file_sha256

        return file_sha256(self.path / "final.pt")


def read_run(path: str | Path) -> Run:
    """Read a run folder written by ``sharpscope train``; one clear error if it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "metrics.jsonl").is_file():
        raise SharpscopeError(f"{path} is not a training run folder (it needs config.json and metrics.jsonl "
                              "from `sharpscope train --out`)")
    try:
        config = json.loads((path / "config.json").read_text())
        metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SharpscopeError(f"{path}: config.json or metrics.jsonl is not valid JSON ({exc})") from None
    environment = config.pop("environment", {})
    return Run(label=path.resolve().name, path=path, config=config, environment=environment, metrics=metrics)


@dataclass
class Section:
    """A titled part of the report: prose, tables (HTML), figures (PNG paths) and links."""

    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)


def html_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table; floats are formatted by the caller."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_display_width(data: bytes) -> int | None:
    """The width in CSS pixels (96 per inch) at which a PNG shows at its printed size: its pixel width over the
    resolution matplotlib records in its ``pHYs`` chunk (``savefig(dpi=...)``); ``None`` when it records none.
    So a 5-inch figure shows 480 px wide whatever ``--dpi`` it was written at, and small figures sit side by side."""
    import struct

    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width = struct.unpack(">I", data[16:20])[0]
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"pHYs" and length == 9:
            per_meter, _, unit = struct.unpack(">IIB", data[position + 8:position + 17])
            return round(width / (per_meter * 0.0254) * 96) if unit == 1 and per_meter else None
        if kind == b"IDAT":  # pHYs must come before the image data
            return None
        position += 12 + length
    return None


def _embed_png(path: Path) -> str:
    raw = path.read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    caption = html.escape(path.stem.replace("_", " ").replace("-", " "))
    width = png_display_width(raw)
    size = f' style="width:{width}px"' if width else ""
    return (f'<figure><img alt="{caption}"{size} src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1320px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:100%}
figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:0.85em;color:#555;text-align:center}
pre{background:#f7f7f7;padding:0.8em;overflow:auto;font-size:0.85em} .muted{color:#666}
"""


def render_report(title: str, sections: list[Section], *, out_dir: Path, subtitle: str = "") -> str:
    """The whole page as a string. Links are made relative to ``out_dir`` (where the page is written)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='muted'>{html.escape(subtitle)}</p>")
    parts.append("<nav><ol>" + "".join(
        f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)) + "</ol></nav>")
    for index, section in enumerate(sections):
        parts.append(f"<h2 id='s{index}'>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{section.text}</p>")
        parts.extend(section.tables)
        parts.extend(_embed_png(p) for p in section.figures if p.is_file())
        if section.links:
            items = "".join(
                f"<li><a href='{html.escape(_relative(p, out_dir))}'>{html.escape(_relative(p, out_dir))} (interactive)</a></li>"
                for p in section.links if p.exists())
            parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


# ------------------------------------------------------------------------------------------------ from the analyses


@dataclass(frozen=True)
class Analyses:
    """The analysis results in a report folder, as their commands wrote them (``None`` where missing/unreadable)."""

    out_dir: Path  # the report folder
    spectrum: dict[str, Any] | None  # spectrum/spectrum.json: top eigenvalues over each trajectory
    spectrum_final: dict[str, Any] | None  # spectrum-final/spectrum.json: trace and density of each final.pt
    spectrum_final_arrays: dict[str, Any]  # spectrum-final/spectrum.npz, the density grids and values
    sharpness: dict[str, Any] | None  # sharpness/sharpness.json: m-sharpness grids of each final.pt
    kendall: dict[str, Any] | None  # sharpness/kendall_tau.json: tau of each measure with the gap


def read_analyses(out_dir: str | Path) -> Analyses:
    """Read the analysis results under ``out_dir`` (the folders ``sharpscope report`` computes)."""
    import numpy as np

    out_dir = Path(out_dir)
    arrays: dict[str, Any] = {}
    npz = out_dir / "spectrum-final" / "spectrum.npz"
    if npz.is_file():
        try:
            with np.load(npz) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError):  # damaged: the densities are left out, the rest of the report stands
            arrays = {}
    return Analyses(out_dir=out_dir, spectrum=_read_json(out_dir / "spectrum" / "spectrum.json"),
                    spectrum_final=_read_json(out_dir / "spectrum-final" / "spectrum.json"),
                    spectrum_final_arrays=arrays, sharpness=_read_json(out_dir / "sharpness" / "sharpness.json"),
                    kendall=_read_json(out_dir / "sharpness" / "kendall_tau.json"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _final_record(document: dict | None, run: Run) -> dict | None:
    """The record of ``run``'s final.pt in a result file's ``checkpoints`` (matched by content hash)."""
    for record in (document or {}).get("checkpoints", []):
        if record.get("sha256") == run.final_sha256:
            return record
    return None


def top_eigenvalue_points(analyses: Analyses, run: Run) -> list[tuple[float, list[float]]]:
    """``[(epoch, top eigenvalues descending), ...]`` over ``run``'s trajectory, from spectrum/spectrum.json
    (checkpoints of unknown epoch are placed after the others)."""
    records = [r for r in (analyses.spectrum or {}).get("checkpoints", []) if r.get("run") == run.label]
    known = sorted((r for r in records if r.get("epoch") is not None), key=lambda r: r["epoch"])
    unknown = [r for r in records if r.get("epoch") is None]
    after = known[-1]["epoch"] + 1 if known else 0
    epochs = [r["epoch"] for r in known] + list(range(after, after + len(unknown)))
    return [(float(epoch), list(r.get("top_eigenvalues") or [])) for epoch, r in zip(epochs, known + unknown)]


def final_spectrum(analyses: Analyses, run: Run) -> tuple[float | None, float | None]:
    """λ_max and ``tr(H)`` of ``run``'s final.pt from spectrum-final/spectrum.json (``None`` where missing)."""
    record = _final_record(analyses.spectrum_final, run)
    if record is None:
        return None, None
    top = record.get("top_eigenvalues") or [None]
    return top[0], (record.get("trace") or {}).get("value")


def sharpness_grids(analyses: Analyses, run: Run) -> dict[str, Any]:
    """``{measure: SharpnessResult}`` of ``run``'s final.pt from sharpness/sharpness.json (grid measures only)."""
    from sharpscope.sharpness.result import SharpnessResult

    record = _final_record(analyses.sharpness, run)
    if record is None:
        return {}
    return {e["measure"]: SharpnessResult.from_dict(e["result"]) for e in analyses.sharpness.get("entries", [])
            if e.get("checkpoint") == record.get("path") and e.get("result", {}).get("kind") == "grid"}


def headline_m(m_values: list[int]) -> int:
    """The m of the summary's m-sharpness column: the smallest computed m >= :data:`HEADLINE_MIN_M` (else the
    largest). m = 1 is left out of the headline: one sample per chunk makes the most variable estimate (a
    perturbation fitted to a single sample), which over the chunks a report can afford does not resolve SGD from
    SAM; the full grid, m = 1 included, is in the sharpness figure."""
    eligible = [m for m in m_values if m >= HEADLINE_MIN_M]
    return min(eligible) if eligible else max(m_values)


def summary_sharpness(analyses: Analyses, run: Run, *, rho: float = SUMMARY_RHO) -> tuple[Estimate, str]:
    """Worst-case m-sharpness of ``run``'s final.pt at ``rho`` (or the nearest computed rho) for
    :func:`headline_m`, with its standard error over chunks, and ``"m=.., rho=.."``; NaN when not computed."""
    result = sharpness_grids(analyses, run).get("worst")
    if result is None or not result.m_values:
        return Estimate(math.nan), ""
    i = result.m_values.index(headline_m(list(result.m_values)))
    j = min(range(len(result.rho_values)), key=lambda k: abs(math.log(result.rho_values[k] / rho)))
    return (Estimate(float(result.values[i, j]), float(result.stderr[i, j])),
            f"m={result.m_values[i]}, rho={result.rho_values[j]:g}")


def recorded_gap(analyses: Analyses, run: Run) -> float:
    """Test error − train error of ``run``'s final.pt: as the sharpness analysis measured it (eval mode, fixed
    weights, the train and test splits), else from the training log, whose train accuracy is a running average
    over the last epoch (moving weights, augmented data), so biased low: the logged gap reads too small."""
    record = _final_record(analyses.sharpness, run) or {}
    if record.get("train_error") is not None and record.get("generalization_gap") is not None:
        return float(record["generalization_gap"])
    return run.final.get("train_acc", math.nan) - run.final.get("test_acc", math.nan)


@dataclass(frozen=True)
class Estimate:
    """A summary number with its standard error: NaN when unknown, 0 when exact to the digits shown."""

    value: float
    stderr: float = math.nan

    def text(self, digits: int = 4, scale: float = 1.0) -> str:
        if not math.isfinite(self.value):
            return "-"
        value = f"{self.value * scale:.{digits}g}" if scale == 1.0 else f"{self.value * scale:.2f}"
        return value + (f" ± {self.stderr * scale:.2g}" if math.isfinite(self.stderr) and self.stderr > 0 else "")


#: The summary's columns after run and description: (header, digits or None for percentages).
SUMMARY_COLUMNS = ("test acc (%)", "gap (pp)", "λ_max", "trace", "m-sharpness")

#: A difference between two summary numbers is called resolved when it exceeds this many standard errors of the
#: difference (sqrt(se_a² + se_b²)); 2 is a two-sided test at about 5%.
RESOLVED_SIGMAS = 2.0


def summary_estimates(analyses: Analyses, run: Run) -> dict[str, Estimate]:
    """The summary numbers of ``run`` (:data:`SUMMARY_COLUMNS`) with their standard errors.

    * test accuracy: the trainer's last evaluation; binomial standard error ``sqrt(p(1-p)/n_test)`` when the
      sharpness analysis recorded the test-set size;
    * gap: test error − train error measured at final.pt (:func:`recorded_gap`), standard error of a difference of
      two independent binomial proportions;
    * λ_max: Lanczos to a relative residual of 1e-6, exact at these digits (stderr 0);
    * trace: Hutch++ / Hutchinson with its standard error over probes;
    * m-sharpness: :func:`summary_sharpness`, standard error over chunks.
    """
    record = _final_record(analyses.sharpness, run) or {}
    n_test, n_train = record.get("num_test_samples"), record.get("num_train_samples")
    test = run.final.get("test_acc", math.nan)
    test_se = math.sqrt(test * (1 - test) / n_test) if n_test else math.nan
    gap = recorded_gap(analyses, run)
    gap_se = math.nan
    if n_test and n_train and record.get("train_error") is not None:
        tr, te = float(record["train_error"]), float(record["test_error"])
        # a binomial proportion of 0 or 1 has zero sample variance but not zero uncertainty: the rule of three
        # (95% bound 3/n) gives a floor of about 1/n per proportion
        var = max(tr * (1 - tr), 1 / n_train) / n_train + max(te * (1 - te), 1 / n_test) / n_test
        gap_se = math.sqrt(var)
    top, _ = final_spectrum(analyses, run)
    trace_record = (_final_record(analyses.spectrum_final, run) or {}).get("trace") or {}
    trace = trace_record.get("value")
    trace_se = trace_record.get("stderr")
    sharpness, _ = summary_sharpness(analyses, run)
    return {
        "test acc (%)": Estimate(test, test_se),
        "gap (pp)": Estimate(gap, gap_se),
        "λ_max": Estimate(float(top), 0.0) if top is not None else Estimate(math.nan),
        "trace": Estimate(float(trace), float(trace_se) if trace_se is not None else math.nan)
        if trace is not None else Estimate(math.nan),
        "m-sharpness": sharpness,
    }


def setting_key(run: Run) -> str:
    """What a run is, apart from its seed: runs with the same key are seeds of one setting."""
    config = {k: v for k, v in run.config.items() if k not in ("seed", "out_dir", "data_dir")}
    return json.dumps(config, sort_keys=True, default=str)


def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by :func:`setting_key`, groups and runs in the order given."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    return list(groups.values())


def _over_seeds(estimates: list[Estimate]) -> Estimate:
    """Mean over seeds, with the standard error of that mean from the spread between seeds (std / sqrt(n))."""
    values = [e.value for e in estimates if math.isfinite(e.value)]
    if len(values) < 2:
        return Estimate(values[0] if values else math.nan)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return Estimate(mean, std / math.sqrt(len(values)))


def resolution(estimates: list[Estimate]) -> str:
    """Whether the largest and smallest of ``estimates`` (one per run or setting) differ by more than
    :data:`RESOLVED_SIGMAS` standard errors of their difference: ``"resolved (3.1σ)"``, ``"not resolved
    (0.4σ)"``, or ``"-"`` (fewer than two values, or an uncertainty that is unknown)."""
    known = [e for e in estimates if math.isfinite(e.value)]
    if len(known) < 2:
        return "-"
    high, low = max(known, key=lambda e: e.value), min(known, key=lambda e: e.value)
    if not (math.isfinite(high.stderr) and math.isfinite(low.stderr)):
        return "-"
    spread = math.sqrt(high.stderr**2 + low.stderr**2)
    if spread == 0:
        return "resolved (exact)" if high.value != low.value else "equal"
    sigmas = (high.value - low.value) / spread
    return f"{'resolved' if sigmas > RESOLVED_SIGMAS else 'not resolved'} ({sigmas:.1f}σ)"


def summary_rows(runs: list[Run], analyses: Analyses) -> list[list[str]]:
    """The summary table: one row per run (label, description, then :data:`SUMMARY_COLUMNS` with standard
    errors), one "mean over N seeds" row per setting trained with several seeds, and a last row saying for each
    column whether the runs' (or settings') difference is resolved (:func:`resolution`): with several seeds per
    setting the seed-to-seed spread is the uncertainty, otherwise each number's own standard error."""
    rows, compared = [], []
    shared = _shared_sharpness_setting(runs, analyses)
    for group in seed_groups(runs):
        per_run = [summary_estimates(analyses, run) for run in group]
        for run, estimates in zip(group, per_run):
            rows.append([run.label, run.description, *_cells(estimates, analyses, run, shared=shared)])
        if len(group) > 1:
            mean = {c: _over_seeds([e[c] for e in per_run]) for c in SUMMARY_COLUMNS}
            rows.append([f"mean of {len(group)} seeds", group[0].description.rsplit(", seed", 1)[0] + ", mean ± "
                         "standard error over seeds", *_cells(mean, analyses, group[0], shared=shared)])
            compared.append(mean)
        else:
            compared.append(per_run[0])
    if len(compared) > 1:
        what = "settings" if len(compared) < len(runs) else "runs"
        rows.append([f"difference between {what}", f"largest vs smallest, in standard errors (> "
                     f"{RESOLVED_SIGMAS:g}σ: resolved)", *[resolution([e[c] for e in compared]) for c in SUMMARY_COLUMNS]])
    return rows


def _shared_sharpness_setting(runs: list[Run], analyses: Analyses) -> str:
    """``"m=8, rho=0.05"`` when every run's m-sharpness cell has that setting (it then goes in the header, not in
    every cell); ``""`` otherwise."""
    settings = {summary_sharpness(analyses, run)[1] for run in runs} - {""}
    return settings.pop() if len(settings) == 1 else ""


def summary_header(runs: list[Run], analyses: Analyses) -> list[str]:
    """The headers of :data:`SUMMARY_COLUMNS`, the m-sharpness one naming its m and rho when all runs share them."""
    shared = _shared_sharpness_setting(runs, analyses)
    return [*SUMMARY_COLUMNS[:-1], SUMMARY_COLUMNS[-1] + (f" ({shared})" if shared else "")]


def _cells(estimates: dict[str, Estimate], analyses: Analyses, run: Run, *, shared: str = "") -> list[str]:
    _, where = summary_sharpness(analyses, run)
    return [estimates["test acc (%)"].text(scale=100), estimates["gap (pp)"].text(scale=100),
            estimates["λ_max"].text(), estimates["trace"].text(),
            estimates["m-sharpness"].text() + (f" ({where})" if where and where != shared else "")]


def kendall_shown(analyses: Analyses) -> bool:
    """Whether the Kendall tau table is meaningful: computed over >= :data:`MIN_KENDALL_CHECKPOINTS`."""
    return bool(analyses.kendall) and analyses.kendall.get("num_checkpoints", 0) >= MIN_KENDALL_CHECKPOINTS


def report_figures(runs: list[Run], analyses: Analyses) -> dict[str, Any]:
    """The report's own figures, drawn from the runs and the analyses, every one with the runs in ``runs``' order
    and the runs' curves overlaid on one set of axes (one colour per run, the same in every figure):
    ``{file name: matplotlib Figure}`` for learning_curves.png, top_eigenvalues.png, density.png,
    sharpness_vs_rho.png and (when :func:`kendall_shown`) kendall_tau.png; a figure whose analysis is missing is
    left out."""
    from sharpscope.plots.curves import learning_curves
    from sharpscope.plots.sharpness import kendall_tau_bars, sharpness_vs_rho
    from sharpscope.plots.spectrum import plot_densities, plot_top_eigenvalues

    figures: dict[str, Any] = {"learning_curves.png": learning_curves({r.label: r.metrics for r in runs})}
    top = {r.label: top_eigenvalue_points(analyses, r) for r in runs}
    if any(top.values()):
        figures["top_eigenvalues.png"] = plot_top_eigenvalues({label: p for label, p in top.items() if p},
                                                              layout="overlay")
    densities, labels = [], []
    for run in runs:
        record = _final_record(analyses.spectrum_final, run)
        names = ((record or {}).get("density") or {}).get("arrays") or []
        grid = next((n for n in names if n.endswith("__density_grid")), None)
        values = next((n for n in names if n.endswith("__density")), None)
        if grid in analyses.spectrum_final_arrays and values in analyses.spectrum_final_arrays:
            densities.append(_Density(analyses.spectrum_final_arrays[grid], analyses.spectrum_final_arrays[values]))
            labels.append(run.label)
    if densities:
        figures["density.png"] = plot_densities(densities, labels, title="Hessian eigenvalue densities at final.pt")
    panels = {r.label: grids for r in runs if (grids := sharpness_grids(analyses, r))}
    if panels:
        figures["sharpness_vs_rho.png"] = sharpness_vs_rho(panels, layout="overlay")
    if kendall_shown(analyses):
        taus = {k: math.nan if v is None else float(v) for k, v in analyses.kendall["tau"].items()}  # null = NaN
        pvalues = {k: math.nan if v is None else float(v) for k, v in (analyses.kendall.get("p_value") or {}).items()}
        figures["kendall_tau.png"] = kendall_tau_bars(taus, num_models=analyses.kendall["num_checkpoints"],
                                                      pvalues=pvalues or None)
    return figures


@dataclass(frozen=True)
class _Density:
    grid: Any  # (points,) eigenvalues
    density: Any  # (points,) density at them


def landscape_figures(runs: list[Run], out_dir: Path) -> list[Path]:
    """The landscape and interpolation figures to embed, in ``runs``' order: the side-by-side comparison (one
    run: its filled contours), each run's 3-D surface, then the interpolation curve. A surface is matched to its
    run by the checkpoint hash in its JSON; figures that match no run come last."""
    folder = out_dir / "landscape"
    figures = [folder / ("comparison.png" if len(runs) > 1 else "contourf.png")]
    by_hash: dict[str, list[Path]] = {}
    for record_path in sorted(folder.glob("surface*.json")):
        record = _read_json(record_path) or {}
        for checkpoint in (record.get("provenance") or {}).get("checkpoints", []):
            figure = folder / f"surface3d{record_path.stem[len('surface'):]}.png"
            by_hash.setdefault(checkpoint.get("sha256"), []).append(figure)
    for run in runs:
        figures.extend(by_hash.get(run.final_sha256, []))
    figures.extend(p for p in sorted(folder.glob("surface3d*.png")) if p not in figures)
    figures.extend(sorted((out_dir / "interpolation").glob("curve*.png")))
    return [p for p in figures if p.is_file()]


def report_sections(runs: list[Run], analyses: Analyses, figures: dict[str, Path]) -> list[Section]:
    """The report's sections, from the runs, the analyses and the report's figures (``{file name: path}`` as
    written from :func:`report_figures`)."""
    out_dir = analyses.out_dir
    count = (analyses.kendall or {}).get("num_checkpoints", len(runs))
    if kendall_shown(analyses):
        kendall_text = (f"Below it, Kendall's tau between each measure and the generalization gap over the {count} "
                        "final checkpoints (Jiang et al. 2020): +1 when a measure ranks the models as their gaps do.")
    else:
        trivial = f"over {count} checkpoints it is ±1" if count >= 2 else f"over {count} checkpoint it is undefined"
        kendall_text = (f"Kendall's tau with the generalization gap is omitted: {trivial} whatever the measure; it "
                        f"needs at least {MIN_KENDALL_CHECKPOINTS} runs.")
    figure = figures.get
    sections = [
        Section("Summary", "Generalization gap = train accuracy − test accuracy of final.pt (percentage points), "
                "measured in eval mode by the sharpness analysis (from the training log where it was not). λ_max and "
                "the trace are those of the Hessian of the training loss on the evaluation set at final.pt; "
                f"sharpness is worst-case m-sharpness at rho = {SUMMARY_RHO:g} (or the nearest rho computed) for "
                f"the smallest m >= {HEADLINE_MIN_M} computed. Every number carries its standard error (binomial for "
                "accuracies, over probe vectors for the trace, over chunks for m-sharpness; λ_max is exact at these "
                "digits). With several seeds of one setting the mean row's error is the spread between seeds. The "
                f"last row says whether each difference exceeds {RESOLVED_SIGMAS:g} standard errors: a difference "
                "that does not is not evidence that one run is flatter or better.",
                tables=[html_table(["run", "what", *summary_header(runs, analyses)], summary_rows(runs, analyses))]),
        Section("Learning curves", figures=[p for p in [figure("learning_curves.png")] if p]),
        Section("Loss landscapes", "Filter-normalized random directions (Li et al. 2018), the same seed for every "
                "model, biases and BatchNorm unperturbed; panels share axes and colour scale.",
                figures=landscape_figures(runs, out_dir),
                links=[out_dir / "landscape" / "surface.html", out_dir / "interpolation" / "surface.html"]),
        Section("Hessian spectrum", "Top eigenvalues by Lanczos over each training trajectory, and the spectral "
                "density of the final checkpoints by stochastic Lanczos quadrature (Ghorbani et al. 2019).",
                figures=[p for p in [figure("top_eigenvalues.png"), figure("density.png")] if p]),
        Section("Sharpness", "Worst-case m-sharpness (Foret et al. 2021 section 4.1) against rho, one line per m. "
                + kendall_text,
                figures=[p for p in [figure("sharpness_vs_rho.png"), figure("kendall_tau.png")] if p]),
        Section("Configurations", tables=[
            f"<details><summary>{html.escape(r.label)}</summary><pre>{html.escape(json.dumps(r.config, indent=2))}"
            "</pre></details>" for r in runs]),
    ]
    # a section whose analysis was not computed (``--summary-only``) is left out rather than shown empty
    return [s for s in sections if s.tables or s.figures or s.title == "Summary"]


# ------------------------------------------------------------------------------------------------ computing stages

#: Relative cost of each analysis stage of ``sharpscope report`` (fraction of the serial report's time measured by
#: cProfile on the README's digits pair, 2026-12-06): stages start longest first, so with two workers the
#: trajectory spectrum runs beside all the others.
STAGE_COST = {"spectrum": 0.55, "landscape": 0.16, "spectrum-final": 0.15, "sharpness": 0.12, "interpolation": 0.02}


def default_jobs(device: str | None) -> int:
    """Stages run side by side by default: 2 on a CPU with 2 cores or more (a small convnet's operations use a
    second thread poorly, a second process well), 1 on CUDA (one device shared), on a single core, or where this
    process was given one thread (``OMP_NUM_THREADS=1``: a report sharing the machine with other jobs)."""
    import os

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus = min(cpus, torch.get_num_threads())
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return 1 if on_cuda or cpus < 2 else 2


def run_stages(stages: dict[str, list[str]], *, jobs: int, log_dir: Path, echo=print) -> None:
    """Run the ``sharpscope`` commands ``stages`` (``{name: argv after "sharpscope"}``) as ``jobs`` processes at a
    time, longest first (:data:`STAGE_COST`), each on ``cpu_count // jobs`` threads, its output in
    ``log_dir/NAME.log``. Every stage is awaited; then a failed one raises one :class:`SharpscopeError` with the
    command's own error line."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = str(max(1, torch.get_num_threads() // max(1, jobs)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    order = sorted(stages, key=lambda name: -STAGE_COST.get(name, 0.1))
    log_dir.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> tuple[str, int]:
        log = log_dir / f"{name}.log"
        with log.open("w") as stream:
            code = subprocess.run([sys.executable, "-m", "sharpscope", "-q", *stages[name]], stdout=stream,
                                  stderr=subprocess.STDOUT, env=env).returncode
        echo(f"{'finished' if code == 0 else 'FAILED'} {name} ({log})")
        return name, code

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, order))
    failed = [name for name, code in results if code]
    if failed:
        name = failed[0]
        lines = [line for line in (log_dir / f"{name}.log").read_text(errors="replace").splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("Error:")), lines[-1] if lines else "")
        raise SharpscopeError(f"the {name} analysis failed: {error.removeprefix('Error: ')} (its output: "
                              f"{log_dir / name}.log; rerun the report to resume)")


def __getattr__(name: str) -> Any:
    """``sharpscope.report.run`` and ``ReportRun``: the command as a function, in :mod:`sharpscope.report_runner`
    (which builds on this module; imported on first use, and named ``run`` as in every analysis package)."""
    if name in ("run", "ReportRun"):
        from sharpscope import report_runner

        return getattr(report_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Figures of Hessian spectra: result objects in, ``matplotlib.figure.Figure`` out, no computation.

* :func:`plot_density`: one eigenvalue density on a log y axis (Ghorbani et al. 2019, Fig. 1 style: the bulk near
  zero and the outliers both stay visible).
* :func:`plot_densities`: several densities overlaid on the same axes (e.g. SGD vs SAM, or epochs of one run).
* :func:`plot_top_eigenvalues`: the top eigenvalues of every run on shared axes, one colour per run, so a flatter
  run reads as lower curves: against epoch, or (one checkpoint per run) as a point chart per run.
* :func:`plot_bottom_eigenvalues`: the same for the most negative eigenvalues, with their sign and a zero line.
* :func:`plot_per_layer`: the top eigenvalue of each layer's Hessian block, one bar per run.

Densities are anything with ``grid`` and ``density`` arrays (:class:`~sharpscope.hessian.SpectralDensity`).
Figures are built without pyplot (any backend); save them with :func:`sharpscope.io.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sharpscope.errors import SharpscopeError

__all__ = ["plot_bottom_eigenvalues", "plot_densities", "plot_density", "plot_per_layer", "plot_top_eigenvalues"]

#: Densities are drawn down to this fraction of their peak (log axis); lower values are clipped to it.
DENSITY_FLOOR = 1e-8


def _arrays(density: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        grid = np.asarray(density.grid, dtype=np.float64)
        values = np.asarray(density.density, dtype=np.float64)
    except AttributeError:
        raise SharpscopeError(
            f"expected a spectral density (an object with .grid and .density, e.g. SpectralDensity), got "
            f"{type(density).__name__}"
        ) from None
    if grid.shape != values.shape or grid.ndim != 1:
        raise SharpscopeError(f"grid and density must be 1-D of equal length, got {grid.shape} and {values.shape}")
    return grid, values


def _draw_density(ax, density: Any, *, label: str | None, floor: float, color=None) -> None:
    grid, values = _arrays(density)
    ax.plot(grid, np.clip(values, floor, None), label=label, color=color, linewidth=1.0)


def _style_density_axes(ax, floor: float, peak: float, title: str | None) -> None:
    ax.set_yscale("log")
    ax.set_ylim(floor, peak * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)


def plot_density(density: Any, *, label: str | None = None, title: str | None = None) -> Figure:
    """One spectral density on a log y axis (values below ``DENSITY_FLOOR`` times the peak are clipped)."""
    _, values = _arrays(density)
    peak = float(values.max()) if values.size and values.max() > 0 else 1.0
    floor = peak * DENSITY_FLOOR
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    _draw_density(ax, density, label=label, floor=floor)
    _style_density_axes(ax, floor, peak, title or (f"Hessian eigenvalue density: {label}" if label else None))
    return fig


def plot_densities(densities: Sequence[Any], labels: Sequence[str], *, title: str | None = None) -> Figure:
    """Several spectral densities overlaid on one log-y axis, one colour per label.

    Raises:
        SharpscopeError: if nothing is given or the labels do not match the densities one to one.
    """
    densities = list(densities)
    if not densities:
        raise SharpscopeError("nothing to plot: give at least one spectral density")
    if len(labels) != len(densities):
        raise SharpscopeError(f"got {len(labels)} labels for {len(densities)} densities; give one label per density")
    peak = max(float(_arrays(d)[1].max()) for d in densities) or 1.0
    floor = peak * DENSITY_FLOOR
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(len(densities))
    for density, label, color in zip(densities, labels, colors):
        _draw_density(ax, density, label=label, floor=floor, color=color)
    _style_density_axes(ax, floor, peak, title or "Hessian eigenvalue densities")
    ax.legend(fontsize="small", loc="upper right")
    return fig


def _colors(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](i / max(count - 1, 1)) for i in range(count)]


def plot_top_eigenvalues(
    runs: Mapping[str, Sequence[tuple[float, Sequence[float]]]],
    *,
    title: str | None = None,
    log_scale: bool = False,
    layout: str = "panels",
) -> Figure:
    """Top eigenvalues of every run, sharing the y axis so SGD and SAM read side by side.

    * Some run has several checkpoints: eigenvalue against epoch. ``layout="overlay"`` (what hessian-spectrum
      draws): all runs on one axes, one colour per run, ``lambda_1`` a solid line with markers, the other top-k
      eigenvalues thin dashed lines of the run's colour. ``layout="panels"`` (the default, kept for the report):
      one panel per run titled by its name, one colour per eigenvalue index.
    * Every run has one checkpoint (e.g. only final.pt): a point chart, one column per run, its top-k
      eigenvalues as markers (``lambda_1`` large and labelled with its value), titled for the checkpoint
      rather than "during training".

    Args:
        runs: ``{run name: [(epoch, top eigenvalues descending), ...]}``; line ``i`` follows the ``i``-th largest
            eigenvalue over the run's checkpoints (sorted by epoch here).
        title: figure title [default: says which of the two charts it is].
        log_scale: log y axis (only sensible when every eigenvalue shown is positive).
        layout: ``"panels"`` (default) or ``"overlay"`` (only matters for several checkpoints per run).

    Raises:
        SharpscopeError: if ``runs`` is empty, a run has no checkpoints, or ``layout`` is unknown.
    """
    return _plot_eigenvalues(runs, which="top", title=title, log_scale=log_scale, layout=layout)


def plot_bottom_eigenvalues(
    runs: Mapping[str, Sequence[tuple[float, Sequence[float]]]],
    *,
    title: str | None = None,
) -> Figure:
    """The most negative (smallest) Hessian eigenvalues of every run, with their sign, on shared axes with a
    line at zero: negative values are directions of negative curvature (a saddle), values just above zero a
    locally convex minimum. Same charts as :func:`plot_top_eigenvalues` (over epochs, or per run for one
    checkpoint each).

    Args:
        runs: ``{run name: [(epoch, bottom eigenvalues ascending), ...]}`` (``lambda_min`` first).
        title: figure title.
    """
    return _plot_eigenvalues(runs, which="bottom", title=title, log_scale=False, layout="overlay")


def _check_runs(runs: Mapping[str, Sequence[Any]]) -> None:
    if not runs:
        raise SharpscopeError("nothing to plot: give at least one run with checkpoints")
    empty = [name for name, points in runs.items() if not points]
    if empty:
        raise SharpscopeError(f"run(s) {', '.join(empty)} have no checkpoints to plot")


def _symbol(i: int, which: str) -> str:
    if which == "top":
        return f"$\\lambda_{{{i + 1}}}$"
    return "$\\lambda_{\\min}$" if i == 0 else f"$\\lambda_{{\\min,{i + 1}}}$"


def _plot_eigenvalues(runs, *, which: str, title: str | None, log_scale: bool, layout: str) -> Figure:
    from matplotlib.lines import Line2D

    if layout not in ("overlay", "panels"):
        raise SharpscopeError(f"layout must be 'overlay' or 'panels', got {layout!r}")
    _check_runs(runs)
    count = max(len(values) for points in runs.values() for _, values in points)
    end = "Top" if which == "top" else "Most negative"
    series = {}
    for name, points in runs.items():
        points = sorted(points, key=lambda p: p[0])
        values = np.full((len(points), count), np.nan)
        for row, (_, eigenvalues) in enumerate(points):
            values[row, : len(eigenvalues)] = np.asarray(eigenvalues, dtype=np.float64)
        series[name] = (np.array([p[0] for p in points], dtype=np.float64), values)
    if all(len(epochs) == 1 for epochs, _ in series.values()):
        return _plot_eigenvalues_per_run(series, which=which, title=title, log_scale=log_scale, end=end)
    if layout == "panels":
        return _plot_eigenvalue_panels(series, count=count, title=title, log_scale=log_scale, which=which, end=end)
    run_colors = _colors(len(series))
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for color, (name, (epochs, values)) in zip(run_colors, series.items()):
        for i in range(count - 1, -1, -1):  # lambda_1 drawn last, on top
            first = i == 0
            ax.plot(epochs, values[:, i], color=color, linestyle="-" if first else "--",
                    linewidth=2.0 if first else 0.9, alpha=1.0 if first else 0.55,
                    marker="o" if first else None, markersize=4, label=name if first else None)
    if which == "bottom":
        ax.axhline(0.0, color="0.3", linewidth=0.8, zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Hessian eigenvalue")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if log_scale:
        ax.set_yscale("log")
    handles, _ = ax.get_legend_handles_labels()
    if count > 1:  # which line style is which eigenvalue
        handles += [Line2D([], [], color="0.2", linewidth=2.0, marker="o", markersize=4, label=_symbol(0, which)),
                    Line2D([], [], color="0.2", linewidth=0.9, linestyle="--", alpha=0.55,
                           label=f"{_symbol(1, which)}..{_symbol(count - 1, which)}" if count > 2
                           else _symbol(1, which))]
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.set_title(title or f"{end} Hessian eigenvalues during training")
    return fig


def _plot_eigenvalue_panels(series, *, count: int, title, log_scale: bool, which: str, end: str) -> Figure:
    """One panel per run, shared y axis, one colour per eigenvalue index."""
    colors = _colors(count)
    fig = Figure(figsize=(4.0 * len(series) + 1.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(series), sharey=True, squeeze=False)[0]
    for ax, (name, (epochs, values)) in zip(axes, series.items()):
        for i in range(count):
            ax.plot(epochs, values[:, i], marker="o", markersize=3, color=colors[i],
                    label=_symbol(i, which), linewidth=1.5 if i == 0 else 1.0)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
    axes[0].set_ylabel("Hessian eigenvalue")
    axes[-1].legend(fontsize="small", loc="best")
    fig.suptitle(title or f"{end} Hessian eigenvalues during training")
    return fig


def _plot_eigenvalues_per_run(series, *, which: str, title, log_scale: bool, end: str) -> Figure:
    """One checkpoint per run: a column per run with its eigenvalues as markers, lambda_1 labelled."""
    names = list(series)
    colors = _colors(len(names))
    fig = Figure(figsize=(max(4.0, 1.3 * len(names) + 2.5), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for x, (name, color) in enumerate(zip(names, colors)):
        values = series[name][1][0]
        values = values[np.isfinite(values)]
        ax.scatter(np.full(values.size - 1, x), values[1:], s=400, color=color, alpha=0.7, marker="_",
                   linewidths=2.0)
        ax.scatter([x], values[:1], s=60, color=color, marker="o", zorder=3)
        ax.annotate(f"{values[0]:.4g}", (x, values[0]), xytext=(8, 0), textcoords="offset points",
                    va="center", fontsize="small")
    if which == "bottom":
        ax.axhline(0.0, color="0.3", linewidth=0.8, zorder=0)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    if which == "top" and not log_scale and ax.get_ylim()[0] > 0:
        ax.set_ylim(bottom=0)  # magnitudes compared from zero
    ax.set_ylabel("Hessian eigenvalue")
    ax.grid(True, axis="y", alpha=0.3)
    if log_scale:
        ax.set_yscale("log")
    epochs = {float(series[name][0][0]) for name in names}
    where = f"at epoch {int(epochs.pop()):d}" if len(epochs) == 1 else "at each run's checkpoint"
    k = max(len(series[name][1][0]) for name in names)
    marks = f"{_symbol(0, which)} (dot) and the next {k - 1} (dashes)" if k > 1 else _symbol(0, which)
    ax.set_title(title or f"{end} Hessian eigenvalues {where}\n{marks}", fontsize="medium")
    return fig


def plot_per_layer(
    layers: Mapping[str, Mapping[str, float]],
    *,
    title: str | None = None,
) -> Figure:
    """Top eigenvalue of each layer's own Hessian block (the diagonal block of its parameters), one bar per
    run, grouped by layer (layers top to bottom in network order); a log axis when every value is positive and
    they span more than a factor 30.

    Args:
        layers: ``{run label: {layer name: top eigenvalue of its block}}``.
        title: figure title.

    Raises:
        SharpscopeError: if nothing is given or a run has no layers.
    """
    if not layers:
        raise SharpscopeError("nothing to plot: give at least one run with per-layer eigenvalues")
    empty = [name for name, values in layers.items() if not values]
    if empty:
        raise SharpscopeError(f"run(s) {', '.join(empty)} have no per-layer eigenvalues to plot")
    names = list(dict.fromkeys(layer for values in layers.values() for layer in values))
    runs = list(layers)
    colors = _colors(len(runs))
    height = 0.8 / len(runs)
    fig = Figure(figsize=(7.0, max(2.8, 1.2 + 0.35 * len(names) * max(1, len(runs)))), layout="constrained")
    ax = fig.add_subplot()
    values_all = np.array([v for values in layers.values() for v in values.values()], dtype=np.float64)
    positive = values_all[np.isfinite(values_all)]
    log = bool(positive.size and (positive > 0).all() and positive.max() > 30 * positive.min())
    for j, (run, color) in enumerate(zip(runs, colors)):
        y = np.arange(len(names)) + (j - (len(runs) - 1) / 2) * height
        x = np.array([layers[run].get(layer, np.nan) for layer in names], dtype=np.float64)
        ax.barh(y, x, height=height * 0.9, color=color, label=run)
        for yi, xi in zip(y, x):
            if np.isfinite(xi):
                ax.annotate(f"{xi:.3g}", (xi, yi), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize="x-small")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first layer on top
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.12)
    ax.set_xlabel("top eigenvalue of the layer's Hessian block" + (" (log scale)" if log else ""))
    ax.set_ylabel("layer (module)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    ax.set_title(title or "Per-layer sharpness: top eigenvalue of each layer's block", fontsize="medium")
    return fig

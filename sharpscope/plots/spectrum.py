"""Figures of Hessian spectra: result objects in, ``matplotlib.figure.Figure`` out, no computation.

* :func:`plot_density`: one eigenvalue density on a log y axis (Ghorbani et al. 2019, Fig. 1 style: the bulk near
  zero and the outliers both stay visible).
* :func:`plot_densities`: several densities overlaid on the same axes (e.g. SGD vs SAM, or epochs of one run).
* :func:`plot_top_eigenvalues`: the top eigenvalues against epoch, one panel per run side by side with a shared
  y axis, so a flatter run reads as lower curves.

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

__all__ = ["plot_densities", "plot_density", "plot_top_eigenvalues"]

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
) -> Figure:
    """Top eigenvalues against epoch: one panel per run, side by side, sharing the y axis.

    Args:
        runs: ``{run name: [(epoch, top eigenvalues descending), ...]}``; in each panel line ``i`` follows the
            ``i``-th largest eigenvalue over the run's checkpoints (sorted by epoch here).
        title: figure title.
        log_scale: log y axis (only sensible when every eigenvalue shown is positive).

    Raises:
        SharpscopeError: if ``runs`` is empty or a run has no checkpoints.
    """
    if not runs:
        raise SharpscopeError("nothing to plot: give at least one run with checkpoints")
    empty = [name for name, points in runs.items() if not points]
    if empty:
        raise SharpscopeError(f"run(s) {', '.join(empty)} have no checkpoints to plot")
    count = max(len(values) for points in runs.values() for _, values in points)
    colors = _colors(count)
    fig = Figure(figsize=(4.0 * len(runs) + 1.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (name, points) in zip(axes, runs.items()):
        points = sorted(points, key=lambda p: p[0])
        epochs = np.array([p[0] for p in points], dtype=np.float64)
        values = np.full((len(points), count), np.nan)
        for row, (_, eigenvalues) in enumerate(points):
            values[row, : len(eigenvalues)] = np.asarray(eigenvalues, dtype=np.float64)
        for i in range(count):
            ax.plot(epochs, values[:, i], marker="o", markersize=3, color=colors[i],
                    label=f"$\\lambda_{{{i + 1}}}$", linewidth=1.5 if i == 0 else 1.0)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
    axes[0].set_ylabel("Hessian eigenvalue")
    axes[-1].legend(fontsize="small", loc="best")
    fig.suptitle(title or "Top Hessian eigenvalues during training")
    return fig

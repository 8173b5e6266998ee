"""Figures of loss curves and surfaces: :class:`~sharpscope.landscape.Surface` objects in, figures out.

No computation happens here beyond choosing colour levels. Matplotlib figures are built on
``matplotlib.figure.Figure`` (no pyplot state, any backend); save them with :func:`sharpscope.io.save_figure`.
Interactive figures are plotly ``Figure`` objects; :func:`plotly_html` makes a self-contained HTML page with
plotly.js embedded (``include_plotlyjs=True``), so it opens offline.

Comparisons (DESIGN.md section 8) put every model on the same axes and the same colour scale: shared contour
levels and ``vmin``/``vmax`` over all panels, one colour bar, so a flatter basin reads as a wider one.

``log_scale=True`` draws ``log10(loss)`` for 2-D figures (labelled so) and a log y axis for curves; losses that
explode towards the edge of a grid otherwise flatten the interesting basin into one colour. Points not computed
(NaN) are left blank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sharpscope.errors import SharpscopeError

_CMAP = "viridis"
_LEVELS = 20


def _as_list(surfaces: Any) -> list:
    items = list(surfaces) if isinstance(surfaces, (list, tuple)) else [surfaces]
    if not items:
        raise SharpscopeError("nothing to plot: give at least one surface")
    return items


def _labels(surfaces: list, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [s.label for s in surfaces]
    if len(labels) != len(surfaces):
        raise SharpscopeError(f"got {len(labels)} labels for {len(surfaces)} surfaces; give one label per surface")
    return list(labels)


def _values(surface, log_scale: bool) -> np.ndarray:
    z = np.where(surface.done, surface.loss, np.nan).astype(np.float64)
    z[~np.isfinite(z)] = np.nan
    if log_scale:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(z > 0, z, np.nan))
    return z


def _require_dim(surface, dim: int, what: str) -> None:
    if surface.dim != dim:
        raise SharpscopeError(f"{what} needs a {dim}-D surface, got a {surface.dim}-D one")


def _range(zs: list[np.ndarray], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = np.concatenate([z[np.isfinite(z)].ravel() for z in zs]) if zs else np.zeros(0)
    lo = float(finite.min()) if vmin is None and finite.size else (vmin if vmin is not None else 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    if not hi > lo:
        hi = lo + 1e-12 + abs(lo) * 1e-6
    return lo, hi


def _zlabel(log_scale: bool) -> str:
    return "log10 loss" if log_scale else "loss"


def _axis_labels(surface) -> tuple[str, str]:
    dirs = surface.metadata.get("directions") or [{}]
    kind = dirs[0].get("kind", "random")
    if kind == "interpolate":
        return "t (0 = first model, 1 = second)", ""
    if kind == "pca":
        ratios = dirs[0].get("info", {}).get("explained_variance_ratio") or []
        names = [f"PC{i + 1}" + (f" ({100 * r:.1f}% var.)" if i < len(ratios) else "") for i, r in
                 enumerate(list(ratios)[:2] or [None, None])]
        return names[0], names[1] if len(names) > 1 else "PC2"
    if kind == "plane":
        return "direction 1 (1 = w_b - w_a)", "direction 2 (orthogonal, same length)"
    if kind == "hessian":
        return "top Hessian eigenvector", "2nd Hessian eigenvector"
    norm = dirs[0].get("norm", "none")
    unit = {"filter": "filter-normalised", "layer": "layer-normalised"}.get(norm, "raw")
    return f"direction 1 ({unit})", f"direction 2 ({unit})"


# ----------------------------------------------------------------------------------------------------------------
# 1-D


def plot_curves(
    surfaces: Any,
    *,
    labels: Sequence[str] | None = None,
    accuracy: bool = False,
    log_scale: bool = False,
    title: str | None = None,
    xlabel: str | None = None,
) -> Any:
    """Overlaid 1-D loss curves (one line per surface, the centre marked), optionally the accuracy on a second
    axis (dashed) and a log loss axis. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    items = _as_list(surfaces)
    for s in items:
        _require_dim(s, 1, "plot_curves")
    names = _labels(items, labels)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax2 = ax.twinx() if accuracy else None
    colors = [f"C{i}" for i in range(len(items))]
    for s, name, color in zip(items, names, colors):
        loss = np.where(s.done, s.loss, np.nan)
        ax.plot(s.xs, loss, "-", color=color, lw=1.8, label=f"{name} (loss)" if accuracy else name)
        if s.center_index() is not None:
            ax.plot([0.0], [s.center_loss], "o", color=color, ms=5)
        if ax2 is not None:
            ax2.plot(s.xs, 100 * np.where(s.done, s.accuracy, np.nan), "--", color=color, lw=1.2,
                     label=f"{name} (accuracy)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or _axis_labels(items[0])[0])
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    ax.grid(True, alpha=0.3)
    handles, texts = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("accuracy (%)")
        ax2.set_ylim(0, 100)
        h2, t2 = ax2.get_legend_handles_labels()
        handles, texts = handles + h2, texts + t2
    fig.legend(handles, texts, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    ax.set_title(title or "loss along the cut")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# 2-D


def _draw_2d(ax, surface, z: np.ndarray, *, kind: str, levels: np.ndarray, vmin: float, vmax: float,
             cmap: str) -> Any:
    xs, ys = surface.xs, surface.ys
    if kind == "heatmap":
        mappable = ax.pcolormesh(xs, ys, np.ma.masked_invalid(z), shading="nearest", cmap=cmap, vmin=vmin,
                                 vmax=vmax)
    elif kind == "contourf":
        mappable = ax.contourf(xs, ys, np.ma.masked_invalid(z), levels=levels, cmap=cmap, vmin=vmin, vmax=vmax,
                               extend="both")
        ax.contour(xs, ys, np.ma.masked_invalid(z), levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    elif kind == "contour":
        mappable = ax.contour(xs, ys, np.ma.masked_invalid(z), levels=levels, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.clabel(mappable, inline=True, fontsize=6, fmt="%.3g")
    else:
        from sharpscope.errors import unknown_name_error

        raise unknown_name_error("plot kind", kind, ("contour", "contourf", "heatmap"))
    if surface.center_index() is not None:
        ax.plot([0.0], [0.0], marker="*", color="red", ms=9, mec="white", mew=0.6, ls="none")
    ax.set_aspect("equal" if _similar_spans(xs, ys) else "auto")
    return mappable


def _similar_spans(xs: np.ndarray, ys: np.ndarray) -> bool:
    sx, sy = np.ptp(xs), np.ptp(ys)
    return sx > 0 and sy > 0 and 0.5 <= sx / sy <= 2.0


def _levels(lo: float, hi: float, levels: int | Sequence[float]) -> np.ndarray:
    """About ``levels`` round-valued contour levels covering [lo, hi] (or the given levels)."""
    if isinstance(levels, int):
        from matplotlib.ticker import MaxNLocator

        values = MaxNLocator(nbins=max(levels, 2)).tick_values(lo, hi)  # spans [lo, hi], one step beyond at most
        return values if values.size >= 2 else np.linspace(lo, hi, max(levels, 2) + 1)
    return np.asarray(levels, dtype=np.float64)


def plot_contour(
    surface: Any,
    *,
    kind: str = "contour",
    log_scale: bool = False,
    levels: int | Sequence[float] = _LEVELS,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = _CMAP,
    title: str | None = None,
) -> Any:
    """One 2-D surface as ``contour`` lines (labelled), ``contourf`` (filled, with thin lines) or ``heatmap``
    (cells centred on the grid points); the unperturbed model is a red star. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    _require_dim(surface, 2, "plot_contour")
    z = _values(surface, log_scale)
    lo, hi = _range([z], vmin, vmax)
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    mappable = _draw_2d(ax, surface, z, kind=kind, levels=_levels(lo, hi, levels), vmin=lo, vmax=hi, cmap=cmap)
    fig.colorbar(mappable, ax=ax, label=_zlabel(log_scale))
    xl, yl = _axis_labels(surface)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title or f"{surface.label}: centre loss {surface.center_loss:.4g}")
    return fig


def plot_surface_3d(
    surface: Any,
    *,
    log_scale: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = _CMAP,
    title: str | None = None,
    elev: float = 35.0,
    azim: float = -60.0,
) -> Any:
    """A 2-D surface as a shaded 3-D plot. The 3-D axes are created with ``add_subplot(projection="3d")`` (the
    paper code's ``Axes3D(fig)`` is no longer attached to the figure on current matplotlib and saves a blank
    image). Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    _require_dim(surface, 2, "plot_surface_3d")
    z = _values(surface, log_scale)
    lo, hi = _range([z], vmin, vmax)
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    gx, gy = np.meshgrid(surface.xs, surface.ys)
    shown = np.clip(z, lo, hi)
    mappable = ax.plot_surface(gx, gy, shown, cmap=cmap, vmin=lo, vmax=hi, rstride=1, cstride=1,
                               linewidth=0.1, edgecolor="k", alpha=0.95, antialiased=True)
    ax.set_zlim(lo, hi)
    ax.view_init(elev=elev, azim=azim)
    xl, yl = _axis_labels(surface)
    ax.set_xlabel(xl, fontsize=8)
    ax.set_ylabel(yl, fontsize=8)
    ax.set_zlabel(_zlabel(log_scale), fontsize=8)
    fig.colorbar(mappable, ax=ax, shrink=0.6, pad=0.1, label=_zlabel(log_scale))
    ax.set_title(title or f"{surface.label}: centre loss {surface.center_loss:.4g}")
    return fig


def plot_comparison(
    surfaces: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    kind: str = "contourf",
    log_scale: bool = False,
    levels: int | Sequence[float] = _LEVELS,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = _CMAP,
    accuracy: bool = False,
    title: str | None = None,
) -> Any:
    """Several models side by side. 2-D: one panel per surface, shared x/y axes, the same contour levels and
    colour limits (``vmin``/``vmax`` over all panels unless given), one colour bar. 1-D: the curves overlaid
    (:func:`plot_curves`). Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    items = _as_list(surfaces)
    dims = {s.dim for s in items}
    if len(dims) != 1:
        raise SharpscopeError("cannot compare 1-D curves with 2-D surfaces; compute them with the same --dim")
    if dims == {1}:
        return plot_curves(items, labels=labels, accuracy=accuracy, log_scale=log_scale, title=title)
    names = _labels(items, labels)
    zs = [_values(s, log_scale) for s in items]
    lo, hi = _range(zs, vmin, vmax)
    lv = _levels(lo, hi, levels)
    n = len(items)
    fig = Figure(figsize=(4.4 * n + 1.2, 4.4), layout="constrained")
    axes = fig.subplots(1, n, sharex=True, sharey=True, squeeze=False)[0]
    mappable = None
    for ax, s, z, name in zip(axes, items, zs, names):
        mappable = _draw_2d(ax, s, z, kind=kind, levels=lv, vmin=lo, vmax=hi, cmap=cmap)
        ax.set_title(f"{name}: centre {s.center_loss:.4g}", fontsize=10)
        ax.set_xlabel(_axis_labels(s)[0], fontsize=8)
    axes[0].set_ylabel(_axis_labels(items[0])[1], fontsize=8)
    fig.colorbar(mappable, ax=list(axes), label=_zlabel(log_scale) + " (shared scale)")
    if title:
        fig.suptitle(title)
    return fig


def plot_trajectory(
    surface: Any,
    path: np.ndarray,
    *,
    explained_variance_ratio: Sequence[float] | None = None,
    residual_norms: Sequence[float] | None = None,
    log_scale: bool = False,
    levels: int | Sequence[float] = _LEVELS,
    cmap: str = _CMAP,
    title: str | None = None,
) -> Any:
    """Contours of the loss on the PCA plane with the optimizer's path projected on it (Li et al. 2018, section
    7): ``path`` is ``(T, 2)`` in the surface's coordinates, start marked by a circle, end by a star. Returns a
    matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    _require_dim(surface, 2, "plot_trajectory")
    path = np.asarray(path, dtype=np.float64)
    if path.ndim != 2 or path.shape[1] != 2:
        raise SharpscopeError(f"path: expected a (T, 2) array of coordinates, got shape {path.shape}")
    z = _values(surface, log_scale)
    lo, hi = _range([z], None, None)
    fig = Figure(figsize=(5.8, 5.0), layout="constrained")
    ax = fig.add_subplot()
    mappable = _draw_2d(ax, surface, z, kind="contour", levels=_levels(lo, hi, levels), vmin=lo, vmax=hi,
                        cmap=cmap)
    fig.colorbar(mappable, ax=ax, label=_zlabel(log_scale))
    ax.plot(path[:, 0], path[:, 1], "-", color="crimson", lw=1.5, zorder=3)
    ax.plot(path[:, 0], path[:, 1], "o", color="crimson", ms=3.5, zorder=4)
    ax.plot(path[0, 0], path[0, 1], "o", color="white", mec="crimson", ms=8, zorder=5, label="first checkpoint")
    ax.plot(path[-1, 0], path[-1, 1], "*", color="gold", mec="k", ms=12, zorder=5, label="final")
    ratios = [] if explained_variance_ratio is None else [float(r) for r in explained_variance_ratio]
    ax.set_xlabel(f"PC1 ({100 * ratios[0]:.1f}% of variance)" if ratios else "PC1")
    ax.set_ylabel(f"PC2 ({100 * ratios[1]:.1f}% of variance)" if len(ratios) > 1 else "PC2")
    ax.legend(loc="best", fontsize="small")
    subtitle = ""
    if residual_norms is not None and len(residual_norms):
        subtitle = f"\nmax distance of a checkpoint from the plane: {max(residual_norms):.3g}"
    ax.set_title((title or f"{surface.label}: optimization path on the PCA plane") + subtitle, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# interactive


def plotly_figure(
    surfaces: Any,
    *,
    labels: Sequence[str] | None = None,
    log_scale: bool = False,
    title: str | None = None,
) -> Any:
    """An interactive plotly figure: 3-D surfaces side by side with one shared colour scale (2-D), or overlaid
    curves (1-D)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = _as_list(surfaces)
    names = _labels(items, labels)
    dims = {s.dim for s in items}
    if len(dims) != 1:
        raise SharpscopeError("cannot compare 1-D curves with 2-D surfaces; compute them with the same --dim")
    if dims == {1}:
        fig = go.Figure()
        for s, name in zip(items, names):
            y = np.where(s.done, s.loss, np.nan)
            fig.add_trace(go.Scatter(x=s.xs.tolist(), y=[None if not np.isfinite(v) else float(v) for v in y],
                                     mode="lines+markers", name=name))
        fig.update_layout(title=title or "loss along the cut", xaxis_title=_axis_labels(items[0])[0],
                          yaxis_title="loss", yaxis_type="log" if log_scale else "linear")
        return fig
    zs = [_values(s, log_scale) for s in items]
    lo, hi = _range(zs, None, None)
    fig = make_subplots(rows=1, cols=len(items), specs=[[{"type": "surface"}] * len(items)],
                        subplot_titles=[f"{n}: centre {s.center_loss:.4g}" for s, n in zip(items, names)])
    xl, yl = _axis_labels(items[0])
    for k, (s, z, name) in enumerate(zip(items, zs, names)):
        zlist = [[None if not np.isfinite(v) else float(v) for v in row] for row in z]
        fig.add_trace(
            go.Surface(x=s.xs.tolist(), y=s.ys.tolist(), z=zlist, cmin=lo, cmax=hi, colorscale="Viridis",
                       showscale=(k == len(items) - 1), name=name, colorbar={"title": _zlabel(log_scale)}),
            row=1, col=k + 1,
        )
    scene = {"xaxis_title": xl, "yaxis_title": yl, "zaxis_title": _zlabel(log_scale), "zaxis": {"range": [lo, hi]}}
    fig.update_scenes(**scene)
    fig.update_layout(title=title or "loss surface", height=600, width=max(700, 600 * len(items)))
    return fig


def plotly_html(surfaces: Any, **kwargs: Any) -> str:
    """A self-contained HTML page of :func:`plotly_figure` (plotly.js embedded: opens offline)."""
    return plotly_figure(surfaces, **kwargs).to_html(include_plotlyjs=True, full_html=True)

"""Figures of loss curves and surfaces: :class:`~sharpscope.landscape.Surface` objects in, figures out.

No computation happens here beyond choosing colour levels. Matplotlib figures are built on
``matplotlib.figure.Figure`` (no pyplot state, any backend); save them with :func:`sharpscope.io.save_figure`.
Interactive figures are plotly ``Figure`` objects; :func:`plotly_html` makes a self-contained HTML page with
plotly.js embedded (``include_plotlyjs=True``), so it opens offline.

Comparisons (DESIGN.md section 8) put every model on the same axes and the same colour scale: shared contour
levels and ``vmin``/``vmax`` over all panels, one colour bar, so a flatter basin reads as a wider one.

``log_scale=True`` draws ``log10(loss)`` for 2-D figures (labelled so) and a log y axis for curves; losses that
explode towards the edge of a grid otherwise flatten the interesting basin into one colour. Points not computed
(NaN) are left blank. 2-D figures draw either quantity a surface holds (``quantity="loss"`` or ``"accuracy"``, in
percent, another colour map so the two are not confused; log scale applies to the loss only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sharpscope.errors import SharpscopeError

_CMAP = "viridis"
_ACCURACY_CMAP = "cividis"
_LEVELS = 20
_ACCURACY_LIMITS = (-4.0, 104.0)  # percent axis 0..100 with a margin: a curve at 100% is drawn, not clipped
_LOSS_COLOR, _ACCURACY_COLOR = "C0", "C3"  # interpolation curve: one colour per quantity and its axis
QUANTITIES = ("loss", "accuracy")


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


def _check_quantity(quantity: str) -> None:
    if quantity not in QUANTITIES:
        from sharpscope.errors import unknown_name_error

        raise unknown_name_error("quantity", quantity, QUANTITIES)


def _values(surface, log_scale: bool, quantity: str = "loss") -> np.ndarray:
    """What is drawn: the loss (``log10`` with ``log_scale``) or the accuracy in percent; NaN where not computed
    or not finite."""
    _check_quantity(quantity)
    source = surface.loss if quantity == "loss" else 100.0 * np.asarray(surface.accuracy, dtype=np.float64)
    z = np.where(surface.done, source, np.nan).astype(np.float64)
    z[~np.isfinite(z)] = np.nan
    if log_scale and quantity == "loss":
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(z > 0, z, np.nan))
    return z


#: ``auto`` loss scale: log10 when the largest finite positive loss drawn exceeds the smallest by more than this
#: many decades (a basin at 0.002 under a rim at 3 spans 3.2 decades: linear would paint the basin one colour).
AUTO_LOG_DECADES = 1.5


def auto_log_scale(surfaces: Any) -> bool:
    """Whether the ``auto`` loss scale draws log10(loss): the finite positive losses of all ``surfaces`` span more
    than :data:`AUTO_LOG_DECADES` decades (``log10(max / min) > 1.5``)."""
    values = [np.where(s.done, s.loss, np.nan).ravel() for s in _as_list(surfaces)]
    loss = np.concatenate(values).astype(np.float64)
    loss = loss[np.isfinite(loss) & (loss > 0)]
    return bool(loss.size) and float(np.log10(loss.max() / loss.min())) > AUTO_LOG_DECADES


def has_accuracy(surface: Any) -> bool:
    """Whether ``surface`` holds a finite accuracy anywhere (classification; NaN for other outputs)."""
    return bool(np.isfinite(np.where(surface.done, surface.accuracy, np.nan)).any())


def shared_range(surfaces: Any, *, log_scale: bool = False, quantity: str = "loss") -> tuple[float, float]:
    """``(lo, hi)``: the smallest and largest finite value drawn over all ``surfaces`` (``log10`` loss with
    ``log_scale``; accuracy in percent): the colour limits and z range that comparison panels share. Pass them as
    ``vmin``/``vmax`` to single-surface figures shown next to each other."""
    return _range([_values(s, log_scale, quantity) for s in _as_list(surfaces)], None, None)


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


def _zlabel(log_scale: bool, quantity: str = "loss") -> str:
    if quantity == "accuracy":
        return "accuracy (%)"
    return "log10 loss" if log_scale else "loss"


def _cmap(cmap: str | None, quantity: str) -> str:
    return cmap if cmap is not None else (_ACCURACY_CMAP if quantity == "accuracy" else _CMAP)


def _centre_text(surface, quantity: str) -> str:
    if quantity == "accuracy":
        return f"centre accuracy {100 * surface.center_accuracy:.2f}%"
    return f"centre loss {surface.center_loss:.4g}"


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
        ax2.set_ylim(*_ACCURACY_LIMITS)
        h2, t2 = ax2.get_legend_handles_labels()
        handles, texts = handles + h2, texts + t2
    fig.legend(handles, texts, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")
    ax.set_title(title or "loss along the cut")
    return fig


def plot_interpolation(
    surface: Any,
    *,
    endpoints: Sequence[str] = ("a", "b"),
    log_scale: bool = False,
    title: str | None = None,
) -> Any:
    """The loss along the line ``w_a + t (w_b - w_a)`` (a 1-D surface of :func:`sharpscope.landscape.interpolate`),
    the accuracy on a second y axis (0..100% with a margin), each quantity in its own colour with its axis in that
    colour, the two models marked at ``t = 0`` and ``t = 1`` (``endpoints`` names them) and the loss barrier
    (:func:`sharpscope.landscape.loss_barrier`: ``max_{0<=t<=1} L(t) - max(L(0), L(1))``) drawn as an arrow
    from the higher endpoint's loss up to the maximum, with its value. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    from sharpscope.landscape.interpolation import loss_barrier

    _require_dim(surface, 1, "plot_interpolation")
    names = list(endpoints)
    if len(names) != 2:
        raise SharpscopeError(f"endpoints: expected two names (t = 0 and t = 1), got {len(names)}")
    loss = np.where(surface.done, surface.loss, np.nan).astype(np.float64)
    loss[~np.isfinite(loss)] = np.nan
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(surface.xs, loss, "-", color=_LOSS_COLOR, lw=1.8, label="loss")
    ax.margins(y=0.1)  # headroom for the barrier's value above the maximum
    if log_scale:
        ax.set_yscale("log")
    handles = [ax.lines[0]]
    if has_accuracy(surface):
        ax2 = ax.twinx()
        acc = 100 * np.where(surface.done, surface.accuracy, np.nan)
        handles += ax2.plot(surface.xs, acc, "--", color=_ACCURACY_COLOR, lw=1.5, label="accuracy")
        ax2.set_ylim(*_ACCURACY_LIMITS)
        ax2.set_ylabel("accuracy (%)", color=_ACCURACY_COLOR)
        ax2.tick_params(axis="y", colors=_ACCURACY_COLOR)
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""), color=_LOSS_COLOR)
    ax.tick_params(axis="y", which="both", colors=_LOSS_COLOR)
    ax.set_xlabel(f"t (0 = {names[0]}, 1 = {names[1]})")
    ax.grid(True, alpha=0.3)
    for t in (0.0, 1.0):
        ax.axvline(t, color="0.4", lw=0.8, ls=":")
    # the two models named on a top axis: outside the plot, clear of both curves
    top = ax.secondary_xaxis("top")
    top.set_xticks([0.0, 1.0], labels=names)
    top.tick_params(labelsize=8, colors="0.25")
    try:
        b = loss_barrier(surface.xs, loss)
    except SharpscopeError:
        b = None
    if b is not None:
        base = max(b.loss_start, b.loss_end)
        ax.plot([0.0, 1.0], [b.loss_start, b.loss_end], "o", color=_LOSS_COLOR, ms=5, zorder=4)
        if b.barrier > 0:
            side = 0.0 if b.loss_start >= b.loss_end else 1.0
            ax.hlines(base, min(b.t, side), max(b.t, side), colors="k", lw=0.6, ls="--", zorder=4)
            ax.annotate("", (b.t, b.max_loss), (b.t, base), zorder=5,
                        arrowprops={"arrowstyle": "<->", "color": "k", "lw": 1.0, "shrinkA": 0, "shrinkB": 0})
            ax.annotate(f"{b.barrier:.3g}", (b.t, b.max_loss), xytext=(0, 7), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, zorder=7,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
            text = f"barrier {b.barrier:.3g} (at t = {b.t:.2f})"
        else:
            text = "barrier 0 (none between the models)"
        handles += ax.plot([b.t], [b.max_loss], "v", color="k", ms=6, zorder=6, label=text)
    else:
        text = "barrier: not computed (no finite loss at t = 0 or 1)"
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=len(handles),
               fontsize="small")
    ax.set_title(title or f"interpolation {names[0]} -> {names[1]}")
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
    quantity: str = "loss",
    log_scale: bool = False,
    levels: int | Sequence[float] = _LEVELS,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | None = None,
    title: str | None = None,
    points: Any = None,
    point_labels: Sequence[str] | None = None,
) -> Any:
    """One 2-D surface as ``contour`` lines (labelled), ``contourf`` (filled, with thin lines) or ``heatmap``
    (cells centred on the grid points) of the loss or the accuracy (``quantity``, in percent); the unperturbed model
    is a red star. ``points`` (``(k, 2)`` coordinates, e.g. the checkpoints a plane passes through) are marked and
    labelled with ``point_labels``, each label placed inside the axes. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    _require_dim(surface, 2, "plot_contour")
    z = _values(surface, log_scale, quantity)
    lo, hi = _range([z], vmin, vmax)
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    mappable = _draw_2d(ax, surface, z, kind=kind, levels=_levels(lo, hi, levels), vmin=lo, vmax=hi,
                        cmap=_cmap(cmap, quantity))
    fig.colorbar(mappable, ax=ax, label=_zlabel(log_scale, quantity))
    xl, yl = _axis_labels(surface)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title or f"{surface.label}: {_centre_text(surface, quantity)}")
    if points is not None:
        _mark_points(ax, np.asarray(points, dtype=np.float64).reshape(-1, 2), point_labels)
    return fig


def _mark_points(ax, points: np.ndarray, labels: Sequence[str] | None) -> None:
    """Mark points and label each on the side that faces the middle of the axes, so a point at an edge keeps its
    label inside the axes (clear of the title and the tick labels)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    names = list(labels) if labels is not None else [""] * len(points)
    for (x, y), name in zip(points, names):
        ax.plot([x], [y], "o", color="crimson", mec="white", ms=6, zorder=6)
        if not name:
            continue
        right = (x - x0) / (x1 - x0) > 0.7 if x1 != x0 else False
        top = (y - y0) / (y1 - y0) > 0.75 if y1 != y0 else False
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-6 if right else 6, -7 if top else 7),
                    ha="right" if right else "left", va="top" if top else "bottom", fontsize=8, color="crimson",
                    zorder=7, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})


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
    from matplotlib.ticker import MaxNLocator

    # fewer z ticks and a label pushed out: the default (7-9 ticks, labelpad 0) runs "loss" into the tick labels
    ax.zaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.tick_params(axis="both", labelsize=7, pad=1)
    ax.set_zlabel(_zlabel(log_scale), fontsize=8, labelpad=8)
    fig.colorbar(mappable, ax=ax, shrink=0.6, pad=0.12, label=_zlabel(log_scale))
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
    cmap: str | None = None,
    accuracy: bool = False,
    title: str | None = None,
) -> Any:
    """Several models side by side. 2-D: one panel per surface, shared x/y axes, the same contour levels and
    colour limits (``vmin``/``vmax`` over all panels unless given), one colour bar; with ``accuracy`` a second row
    of the accuracy (percent), its own shared colour scale and bar (left out when no surface has an accuracy).
    1-D: the curves overlaid (:func:`plot_curves`), the accuracy dashed on a second axis with ``accuracy``.
    Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    items = _as_list(surfaces)
    dims = {s.dim for s in items}
    if len(dims) != 1:
        raise SharpscopeError("cannot compare 1-D curves with 2-D surfaces; compute them with the same --dim")
    if dims == {1}:
        return plot_curves(items, labels=labels, accuracy=accuracy, log_scale=log_scale, title=title)
    names = _labels(items, labels)
    quantities = ["loss"] + (["accuracy"] if accuracy and any(has_accuracy(s) for s in items) else [])
    n = len(items)
    fig = Figure(figsize=(4.4 * n + 1.2, 4.4 * len(quantities)), layout="constrained")
    grid_axes = fig.subplots(len(quantities), n, sharex=True, sharey=True, squeeze=False)
    for row, (quantity, axes) in enumerate(zip(quantities, grid_axes)):
        zs = [_values(s, log_scale, quantity) for s in items]
        lo, hi = _range(zs, vmin, vmax) if quantity == "loss" else _range(zs, None, None)
        lv = _levels(lo, hi, levels)
        mappable = None
        for ax, s, z, name in zip(axes, items, zs, names):
            # a given cmap colours the loss; the accuracy keeps its own map so the rows are not confused
            mappable = _draw_2d(ax, s, z, kind=kind, levels=lv, vmin=lo, vmax=hi,
                                cmap=_cmap(cmap if quantity == "loss" else None, quantity))
            centre = (f"{100 * s.center_accuracy:.2f}%" if quantity == "accuracy" else f"{s.center_loss:.4g}")
            ax.set_title(f"{name}: centre {centre}", fontsize=10)
            if row == len(quantities) - 1:
                ax.set_xlabel(_axis_labels(s)[0], fontsize=8)
        axes[0].set_ylabel(_axis_labels(items[0])[1], fontsize=8)
        fig.colorbar(mappable, ax=list(axes), label=_zlabel(log_scale, quantity) + " (shared scale)")
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


def _cells(surface, z: np.ndarray, points: np.ndarray):
    """For each point: the four values around it ``(z00, z10, z01, z11)`` (x then y) and its position ``(tx, ty)``
    in that cell; NaN outside the grid."""
    xs, ys = surface.xs, surface.ys
    corners = np.full((len(points), 4), np.nan)
    t = np.zeros((len(points), 2))
    inside = (xs[0] <= points[:, 0]) & (points[:, 0] <= xs[-1]) & (ys[0] <= points[:, 1]) & (points[:, 1] <= ys[-1])
    i = np.clip(np.searchsorted(xs, points[:, 0]) - 1, 0, xs.size - 2)
    j = np.clip(np.searchsorted(ys, points[:, 1]) - 1, 0, ys.size - 2)
    t[:, 0] = (points[:, 0] - xs[i]) / (xs[i + 1] - xs[i])
    t[:, 1] = (points[:, 1] - ys[j]) / (ys[j + 1] - ys[j])
    corners[inside] = np.stack([z[j, i], z[j, i + 1], z[j + 1, i], z[j + 1, i + 1]], axis=1)[inside]
    return corners, t


def surface_height(surface: Any, points: Any, *, log_scale: bool = False) -> np.ndarray:
    """The drawn surface (loss, ``log10`` loss with ``log_scale``) at arbitrary ``(k, 2)`` coordinates by bilinear
    interpolation between the four grid points around each; NaN outside the grid or next to a point not computed.
    Used to draw a projected path on the surface (a checkpoint's own loss differs from the plane's where the
    checkpoint lies off the plane)."""
    _require_dim(surface, 2, "surface_height")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (z00, z10, z01, z11), (tx, ty) = (c.T for c in _cells(surface, _values(surface, log_scale), points))
    return (1 - tx) * (1 - ty) * z00 + tx * (1 - ty) * z10 + (1 - tx) * ty * z01 + tx * ty * z11


def _rendered_top(surface, z: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The highest of the bilinear value and the two ways of splitting a cell into triangles (a 3-D renderer
    draws one of them): a line drawn there is never hidden inside the drawn surface."""
    (z00, z10, z01, z11), (tx, ty) = (c.T for c in _cells(surface, z, points))
    bilinear = (1 - tx) * (1 - ty) * z00 + tx * (1 - ty) * z10 + (1 - tx) * ty * z01 + tx * ty * z11
    main = np.where(tx >= ty, z00 + tx * (z10 - z00) + ty * (z11 - z10), z00 + ty * (z01 - z00) + tx * (z11 - z01))
    anti = np.where(tx + ty <= 1, z00 + tx * (z10 - z00) + ty * (z01 - z00),
                    z11 + (1 - tx) * (z01 - z11) + (1 - ty) * (z10 - z11))
    return np.max(np.stack([bilinear, main, anti]), axis=0)


def _nullable(values: Any) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


_PLOTLY_HEIGHT = 640  # px: the HTML page fills the window's width, at this height


def plotly_figure(
    surfaces: Any,
    *,
    labels: Sequence[str] | None = None,
    log_scale: bool = False,
    title: str | None = None,
    path: Any = None,
    path_labels: Sequence[str] | None = None,
) -> Any:
    """An interactive plotly figure: 3-D surfaces side by side with one shared colour scale and z range (2-D; the
    accuracy is shown on hover), or overlaid curves (1-D). ``path`` (``(T, 2)`` coordinates of the first surface,
    e.g. the projected trajectory of a PCA plane) is drawn as a line on the first surface, at the surface's height
    (:func:`surface_height`), with a marker per point (hover: ``path_labels``)."""
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
            fig.add_trace(go.Scatter(x=s.xs.tolist(), y=_nullable(y), mode="lines+markers", name=name))
        fig.update_layout(title=title or "loss along the cut", xaxis_title=_axis_labels(items[0])[0],
                          yaxis_title="loss", yaxis_type="log" if log_scale else "linear",
                          margin={"l": 70, "r": 30, "t": 70, "b": 70}, height=_PLOTLY_HEIGHT)
        return fig
    zs = [_values(s, log_scale) for s in items]
    lo, hi = _range(zs, None, None)
    n = len(items)
    fig = make_subplots(rows=1, cols=n, specs=[[{"type": "surface"}] * n], horizontal_spacing=0.02,
                        subplot_titles=[f"{name}: centre {s.center_loss:.4g}" for s, name in zip(items, names)])
    xl, yl = _axis_labels(items[0])
    zl = _zlabel(log_scale)
    for k, (s, z, name) in enumerate(zip(items, zs, names)):
        accuracy = 100 * np.where(s.done, s.accuracy, np.nan)
        fig.add_trace(
            go.Surface(x=s.xs.tolist(), y=s.ys.tolist(), z=[_nullable(row) for row in z], cmin=lo, cmax=hi,
                       colorscale="Viridis", showscale=(k == n - 1), name=name,
                       colorbar={"title": {"text": zl}, "len": 0.75, "thickness": 18},
                       customdata=[_nullable(row) for row in accuracy],
                       hovertemplate=(f"{name}<br>x %{{x:.3g}}, y %{{y:.3g}}<br>{zl} %{{z:.4g}}"
                                      + ("<br>accuracy %{customdata:.2f}%" if has_accuracy(s) else "")
                                      + "<extra></extra>")),
            row=1, col=k + 1,
        )
    if path is not None:
        path = np.asarray(path, dtype=np.float64)
        if path.ndim != 2 or path.shape[1] != 2 or len(path) < 1:
            raise SharpscopeError(f"path: expected a (T, 2) array of coordinates, got shape {path.shape}")
        lift = 0.01 * (hi - lo)  # just above the drawn surface, so the line is not hidden in it
        steps = np.linspace(0.0, 1.0, 17)[:-1, None]
        dense = np.concatenate([a + steps * (b - a) for a, b in zip(path[:-1], path[1:])] + [path[-1:]])
        fig.add_trace(go.Scatter3d(x=dense[:, 0].tolist(), y=dense[:, 1].tolist(),
                                   z=_nullable(_rendered_top(items[0], zs[0], dense) + lift),
                                   mode="lines", line={"color": "crimson", "width": 7}, name="projected path",
                                   hoverinfo="skip"), row=1, col=1)
        texts = list(path_labels) if path_labels is not None else [f"point {i}" for i in range(len(path))]
        colors = ["crimson"] * len(path)
        colors[0], colors[-1] = "white", "gold"
        fig.add_trace(go.Scatter3d(x=path[:, 0].tolist(), y=path[:, 1].tolist(),
                                   z=_nullable(_rendered_top(items[0], zs[0], path) + lift),
                                   customdata=_nullable(surface_height(items[0], path, log_scale=log_scale)),
                                   mode="markers", marker={"size": 5, "color": colors,
                                                           "line": {"color": "black", "width": 1}},
                                   text=texts, name="checkpoints (white: first, gold: final)",
                                   hovertemplate=f"%{{text}}<br>x %{{x:.3g}}, y %{{y:.3g}}<br>{zl} on the plane "
                                                 "%{customdata:.4g}<extra></extra>"), row=1, col=1)
    # a zoomed-out camera and fixed proportions keep every axis title inside its scene; a path (PCA: the first
    # checkpoint has coordinates >= 0) is seen from the negative side, where it runs up the far wall, not behind
    # the near one
    side = -1.0 if path is not None else 1.0
    fig.update_scenes(xaxis_title=xl, yaxis_title=yl, zaxis_title=zl, zaxis={"range": [lo, hi]},
                      aspectmode="manual", aspectratio={"x": 1, "y": 1, "z": 0.7},
                      camera={"eye": {"x": 1.45 * side, "y": 1.45 * side, "z": 1.2}})
    fig.update_layout(title=title or "loss surface", height=_PLOTLY_HEIGHT,
                      margin={"l": 10, "r": 10, "t": 80, "b": 10},
                      legend={"x": 0.0, "y": 0.0, "xanchor": "left", "yanchor": "bottom"})
    return fig


def plotly_html(surfaces: Any, **kwargs: Any) -> str:
    """A self-contained HTML page of :func:`plotly_figure` (plotly.js embedded: opens offline), as wide as the
    browser window."""
    return plotly_figure(surfaces, **kwargs).to_html(include_plotlyjs=True, full_html=True, default_width="100%",
                                                     default_height=f"{_PLOTLY_HEIGHT}px",
                                                     config={"responsive": True})

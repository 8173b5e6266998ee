"""Figures of sharpness measures: :class:`~sharpscope.sharpness.SharpnessResult` grids and Kendall tau tables in,
matplotlib figures out (no computation; save with :func:`sharpscope.io.save_figure`).

* :func:`sharpness_vs_rho`: sharpness against rho, one line per (model, m) with a standard-error band (Foret
  et al. 2021, Fig. 3 left, with sharpness in place of test error). ``layout="overlay"`` (what ``sharpscope
  sharpness`` writes): one panel per measure, every model on the same axes (a colour per model, a line style per
  m), so a flatter model reads as lower lines of its colour; ``layout="panels"``: one column per model, one row
  per measure, y axes shared within a row.
* :func:`kendall_tau_bars`: Kendall's tau between each measure and the generalization gap, as horizontal bars on
  a fixed [-1, 1] axis (Foret et al. 2021, Fig. 3 right; Jiang et al. 2020, Table 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from sharpscope.errors import SharpscopeError

__all__ = ["sharpness_vs_rho", "kendall_tau_bars"]

_CMAP = "viridis"


def _measure_label(result: Any) -> str:
    p = "inf" if result.p == math.inf else f"{result.p:g}"
    kind = {"worst": "worst-case", "average": "average-case"}.get(result.measure, result.measure)
    adaptive = "adaptive " if result.adaptive else ""
    unit = ("step" if result.measure == "worst" else "draw") + ("" if result.steps == 1 else "s")
    return f"{adaptive}{kind} (p={p}, {result.steps} {unit})"


#: Line styles and markers of the m values in the overlaid layout (the colour is the run's).
_DASHES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def sharpness_vs_rho(results: Mapping[str, Any], *, layout: str = "panels", log_x: bool = True,
                     log_y: bool = False, title: str | None = None) -> Figure:
    """Sharpness against rho for several models and m.

    Args:
        results: model label (e.g. ``"sgd"``, ``"sam"``) -> either one ``SharpnessResult`` or a mapping
            measure label (e.g. ``"worst"``, ``"adaptive"``) -> ``SharpnessResult``. Measures are taken in
            order of first appearance.
        layout: ``"overlay"``: one panel per measure with every model on the same axes, one colour per model
            and one line style (and marker) per m, two legends below (models, m) — the comparison reads on one
            scale; ``"panels"``: one row per measure, one column per model, one line per m coloured by m, y axes
            shared within each row (a missing (model, measure) panel says "not computed").
        log_x: logarithmic rho axis (grids are usually geometric).
        log_y: logarithmic sharpness axis.
        title: figure title.

    Returns:
        A ``matplotlib.figure.Figure``, shaded +-1 standard error where defined.
    """
    if not results:
        raise SharpscopeError("nothing to plot: give at least one sharpness result")
    if layout not in ("overlay", "panels"):
        raise SharpscopeError(f"layout must be 'overlay' or 'panels', got {layout!r}")
    columns: dict[str, dict[str, Any]] = {}
    for label, item in results.items():
        columns[label] = dict(item) if isinstance(item, Mapping) else {item.measure: item}
    rows: list[str] = []
    for panels in columns.values():
        rows.extend(r for r in panels if r not in rows)
    if layout == "overlay":
        return _overlay(columns, rows, log_x=log_x, log_y=log_y, title=title)
    all_m = sorted({m for panels in columns.values() for res in panels.values() for m in res.m_values})
    cmap = matplotlib.colormaps[_CMAP]
    colour = {m: cmap(0.85 * i / max(1, len(all_m) - 1)) for i, m in enumerate(all_m)}
    fig = Figure(figsize=(3.6 * len(columns) + 1.2, 3.0 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False, sharey="row", sharex="row")
    for i, row in enumerate(rows):
        for j, (label, panels) in enumerate(columns.items()):
            ax = axes[i][j]
            result = panels.get(row)
            if result is None:
                ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes, color="0.5")
                continue
            rho = np.asarray(result.rho_values, dtype=float)
            for k, m in enumerate(result.m_values):
                value = np.asarray(result.values[k], dtype=float)
                err = np.asarray(result.stderr[k], dtype=float)
                ax.plot(rho, value, marker="o", ms=3, color=colour[m], label=f"m={m}")
                band = np.isfinite(err)
                if band.any():
                    ax.fill_between(rho[band], (value - err)[band], (value + err)[band], color=colour[m], alpha=0.2,
                                    linewidth=0)
            if log_x:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(rho, [f"{r:g}" for r in rho])
            if log_y:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{label}\n{_measure_label(result)}", fontsize=9)
            ax.set_xlabel("rho")
            if j == 0:
                ax.set_ylabel("sharpness (loss increase)")
        handles, labels = [], []
        for ax in axes[i]:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                if text not in labels:
                    handles.append(handle)
                    labels.append(text)
        if handles:
            order = np.argsort([int(t.split("=")[1]) for t in labels])
            axes[i][-1].legend([handles[o] for o in order], [labels[o] for o in order], fontsize=8,
                               loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title)
    return fig


def _overlay(columns: dict[str, dict[str, Any]], measures: list[str], *, log_x: bool, log_y: bool,
             title: str | None) -> Figure:
    """The ``layout="overlay"`` figure of :func:`sharpness_vs_rho`."""
    from matplotlib.lines import Line2D

    all_m = sorted({m for panels in columns.values() for res in panels.values() for m in res.m_values})
    palette = matplotlib.colormaps["tab10"].colors
    colour = {label: palette[i % len(palette)] for i, label in enumerate(columns)}
    dash = {m: _DASHES[i % len(_DASHES)] for i, m in enumerate(all_m)}
    marker = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(all_m)}
    fig = Figure(figsize=(max(4.8, 4.2 * len(measures)), 3.4 + 0.22 * (1 + max(len(columns), len(all_m)) // 4)),
                 layout="constrained")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, measure in zip(axes, measures):
        ticks: set[float] = set()
        shown = None
        for label, panels in columns.items():
            result = panels.get(measure)
            if result is None:
                continue
            shown = shown or result
            rho = np.asarray(result.rho_values, dtype=float)
            ticks.update(rho.tolist())
            for k, m in enumerate(result.m_values):
                value = np.asarray(result.values[k], dtype=float)
                err = np.asarray(result.stderr[k], dtype=float)
                ax.plot(rho, value, color=colour[label], linestyle=dash[m], marker=marker[m], ms=3.5, lw=1.4,
                        label=f"{label}, m={m}")
                band = np.isfinite(err)
                if band.any():
                    ax.fill_between(rho[band], (value - err)[band], (value + err)[band], color=colour[label],
                                    alpha=0.12, linewidth=0)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ticks_sorted = sorted(ticks)
        ax.set_xticks(ticks_sorted, [f"{r:g}" for r in ticks_sorted], fontsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.set_title(_measure_label(shown), fontsize=9)
        ax.set_xlabel("rho")
    axes[0].set_ylabel("sharpness (loss increase)")
    runs = [Line2D([], [], color=colour[label], lw=2.5) for label in columns]
    styles = [Line2D([], [], color="0.25", linestyle=dash[m], marker=marker[m], ms=3.5, lw=1.4) for m in all_m]
    entries = list(columns) + [f"m={m}" for m in all_m]
    if len(measures) == 1:  # a narrow figure: the models, then the m values, in one column at the right
        fig.legend(runs + styles, entries, loc="outside right upper", fontsize=8, frameon=False, handlelength=3.2)
    else:  # one row below the panels when it fits (~1.7 in an entry), else the models' row above the m values'
        fits = int(fig.get_figwidth() / 1.7)
        ncol = len(entries) if len(entries) <= fits else max(len(columns), len(all_m))
        if len(entries) > fits:  # pad the shorter group so each group fills its own row
            pad = Line2D([], [], color="none")
            runs += [pad] * (ncol - len(runs))
            styles += [pad] * (ncol - len(styles))
            entries = list(columns) + [""] * (ncol - len(columns)) + [f"m={m}" for m in all_m] + [""] * (
                ncol - len(all_m))
            # matplotlib fills legends column by column: interleave so row 1 holds the models, row 2 the m values
            handles = [h for pair in zip(runs, styles) for h in pair]
            entries = [t for pair in zip(entries[:ncol], entries[ncol:]) for t in pair]
        else:
            handles = runs + styles
        fig.legend(handles, entries, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False,
                   handlelength=3.2)
    if title:
        fig.suptitle(title)
    return fig


def kendall_tau_bars(table: Mapping[str, float], *, num_models: int | None = None,
                     title: str | None = None, pvalues: Mapping[str, float] | None = None,
                     gap: str = "test error - train error") -> Figure:
    """Kendall's tau of each measure with the generalization gap, one horizontal bar per measure.

    Args:
        table: measure label -> tau (NaN, e.g. for a constant measure, is drawn as "n/a").
        num_models: how many models the taus were computed over (shown in the title).
        title: figure title [default: "Kendall tau with the generalization gap"].
        pvalues: measure label -> two-sided p-value, printed next to each tau; bars with p > 0.05 are drawn pale
            (their ranking is not distinguishable from chance).
        gap: what the generalization gap is, for the axis label (``"test loss - train loss"`` for models without
            accuracy).

    Returns:
        A ``matplotlib.figure.Figure`` with the x axis fixed to [-1, 1] (comparable across figures); positive
        bars (the measure ranks models like their gaps) in blue, negative in red, each labelled with its value
        on the other side of the zero line.
    """
    if not table:
        raise SharpscopeError("nothing to plot: the Kendall tau table is empty")
    labels = list(table)
    taus = np.array([float(table[k]) for k in labels])
    fig = Figure(figsize=(6.4, 0.9 + 0.32 * len(labels)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(labels))[::-1]
    shown = np.nan_to_num(taus, nan=0.0)
    pvals = np.array([float((pvalues or {}).get(k, np.nan)) for k in labels])
    significant = ~(pvals > 0.05)  # NaN (no p-value given) counts as significant: drawn as before
    ax.barh(y, shown, color=["tab:blue" if t >= 0 else "tab:red" for t in shown], height=0.7)
    for bar, strong in zip(ax.patches, significant):
        bar.set_alpha(1.0 if strong else 0.35)
    for yi, tau, pv in zip(y, taus, pvals):
        # the value sits across the zero line from its bar, so it never leaves the fixed [-1, 1] axis
        negative = np.isfinite(tau) and tau < 0
        text = (f"{tau:+.2f}" + (f" (p={pv:.2g})" if np.isfinite(pv) else "")) if np.isfinite(tau) else "n/a"
        ax.text(0.03 if negative or not np.isfinite(tau) else -0.03, yi, text, va="center",
                ha="left" if negative or not np.isfinite(tau) else "right", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(-1.15, 1.15)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel(f"Kendall tau (measure vs {gap})")
    heading = title or "Kendall tau with the generalization gap"
    ax.set_title(heading + (f" ({num_models} models)" if num_models else ""), fontsize=10)
    return fig

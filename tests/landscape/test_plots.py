"""Surface figures: drawn from results, non-blank, shared colour scales, self-contained HTML."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.image import imread

from sharpscope.errors import SharpscopeError
from sharpscope.io import save_figure
from sharpscope.landscape import Surface
from sharpscope.plots.surface import (
    plot_comparison,
    plot_contour,
    plot_curves,
    plot_surface_3d,
    plot_trajectory,
    plotly_figure,
    plotly_html,
)


def _bowl(scale: float, *, label: str, nx: int = 9, ny: int = 7) -> Surface:
    """A synthetic surface (results in, figures out: no model needed)."""
    xs, ys = np.linspace(-1, 1, nx), np.linspace(-1, 1, ny)
    loss = 0.1 + scale * (xs[None, :] ** 2 + 0.5 * ys[:, None] ** 2)
    return Surface(xs=xs, ys=ys, loss=loss, accuracy=1 - loss / loss.max(), done=np.ones_like(loss, bool),
                   center_loss=0.1, center_accuracy=1.0, num_samples=10,
                   metadata={"label": label, "directions": [{"kind": "random", "norm": "filter"}] * 2})


def _curve(scale: float, *, label: str) -> Surface:
    xs = np.linspace(-1, 1, 11)
    loss = 0.1 + scale * xs**2
    done = np.ones_like(loss, bool)
    done[-1] = False  # a partial curve plots its computed points only
    return Surface(xs=xs, ys=None, loss=np.where(done, loss, np.nan), accuracy=np.full_like(loss, 0.5), done=done,
                   center_loss=0.1, center_accuracy=0.5, num_samples=10, metadata={"label": label})


def _not_blank(path) -> float:
    """Standard deviation of the pixels of the central region (a blank figure gives ~0)."""
    image = imread(path)[..., :3]
    h, w = image.shape[:2]
    return float(image[h // 4: 3 * h // 4, w // 4: 3 * w // 4].std())


def test_3d_surface_is_not_blank(tmp_path):
    fig = plot_surface_3d(_bowl(1.0, label="sgd"))
    ax = fig.axes[0]
    assert ax.name == "3d" and len(ax.collections) == 1  # the surface is attached to the figure's axes
    path = save_figure(fig, tmp_path / "s3d.png")
    assert len(ax.collections[0].get_paths()) == 8 * 6  # one projected face per grid cell once drawn
    assert _not_blank(path) > 0.05


@pytest.mark.parametrize("kind", ["contour", "contourf", "heatmap"])
def test_contour_kinds(tmp_path, kind):
    fig = plot_contour(_bowl(2.0, label="sam"), kind=kind, log_scale=(kind == "heatmap"))
    assert len(fig.axes) == 2  # panel + colour bar
    assert _not_blank(save_figure(fig, tmp_path / f"{kind}.png")) > 0.02


def test_comparison_shares_axes_and_one_colour_scale(tmp_path):
    a, b = _bowl(1.0, label="sgd"), _bowl(3.0, label="sam")
    fig = plot_comparison([a, b], kind="contourf")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 and len(fig.axes) == 3  # two panels, one colour bar
    assert panels[0].get_shared_x_axes().joined(panels[0], panels[1])
    clims = {ax.collections[0].get_clim() for ax in panels}
    assert len(clims) == 1  # same vmin/vmax on both panels
    (lo, hi), = clims
    assert lo == pytest.approx(0.1) and hi == pytest.approx(b.loss.max())  # the range of both surfaces
    assert _not_blank(save_figure(fig, tmp_path / "cmp.png")) > 0.02


def test_curves_and_comparison_of_curves(tmp_path):
    curves = [_curve(1.0, label="sgd"), _curve(2.0, label="sam")]
    fig = plot_curves(curves, accuracy=True, log_scale=True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and len(fig.axes) == 2  # loss axis + accuracy twin
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "sgd (loss)" in texts and "sam (accuracy)" in texts
    line = ax.get_lines()[0]
    assert np.isnan(line.get_ydata()[-1])  # the uncomputed point is a gap, not a value
    same = plot_comparison(curves)
    assert len(same.axes[0].get_lines()) == 4  # two curves + two centre markers
    assert _not_blank(save_figure(same, tmp_path / "c.png")) > 0.01


def test_trajectory_plot(tmp_path):
    path = np.array([[0.9, 0.5], [0.5, 0.2], [0.2, -0.1], [0.0, 0.0]])
    fig = plot_trajectory(_bowl(1.0, label="sgd"), path, explained_variance_ratio=[0.8, 0.15],
                          residual_norms=[0.1, 0.0, 0.0, 0.0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "PC1 (80.0% of variance)"
    xdata = np.concatenate([line.get_xdata() for line in ax.get_lines()])
    assert 0.9 in xdata
    assert _not_blank(save_figure(fig, tmp_path / "t.png")) > 0.02
    with pytest.raises(SharpscopeError, match=r"expected a \(T, 2\) array"):
        plot_trajectory(_bowl(1.0, label="x"), np.zeros(3))


def test_plotly_html_is_self_contained(tmp_path):
    html = plotly_html([_bowl(1.0, label="sgd"), _bowl(3.0, label="sam")])
    external = re.findall(r'<script[^>]*\bsrc="[^"]*"', html)
    assert external == []  # no script fetched from the network (the CDN URL inside plotly.js is a config default)
    assert len(html) > 1_000_000  # plotly.js itself is embedded
    fig = plotly_figure([_bowl(1.0, label="sgd"), _bowl(3.0, label="sam")])
    assert [t.showscale for t in fig.data] == [False, True]  # one colour bar
    assert fig.data[0].cmin == fig.data[1].cmin and fig.data[0].cmax == fig.data[1].cmax
    line = plotly_figure([_curve(1.0, label="a")], log_scale=True)
    assert line.layout.yaxis.type == "log" and line.data[0].y[-1] is None


def test_plot_errors():
    a2, a1 = _bowl(1.0, label="a"), _curve(1.0, label="b")
    with pytest.raises(SharpscopeError, match="cannot compare 1-D curves with 2-D surfaces"):
        plot_comparison([a2, a1])
    with pytest.raises(SharpscopeError, match="cannot compare 1-D curves with 2-D surfaces"):
        plotly_figure([a2, a1])
    with pytest.raises(SharpscopeError, match="needs a 2-D surface, got a 1-D one"):
        plot_contour(a1)
    with pytest.raises(SharpscopeError, match="needs a 1-D surface"):
        plot_curves(a2)
    with pytest.raises(SharpscopeError, match="got 1 labels for 2 surfaces"):
        plot_comparison([a2, a2], labels=["x"])
    with pytest.raises(SharpscopeError, match="unknown plot kind 'contours'"):
        plot_contour(a2, kind="contours")
    with pytest.raises(SharpscopeError, match="nothing to plot"):
        plot_comparison([])

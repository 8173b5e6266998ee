"""Surface figures: drawn from results, non-blank, shared colour scales, self-contained HTML."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from matplotlib.image import imread

from sharpscope.errors import SharpscopeError
from sharpscope.io import save_figure
from sharpscope.landscape import Surface
from sharpscope.plots.surface import (
    auto_log_scale,
    has_accuracy,
    plot_comparison,
    plot_contour,
    plot_curves,
    plot_interpolation,
    plot_surface_3d,
    plot_trajectory,
    plotly_figure,
    plotly_html,
    shared_range,
    surface_height,
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


def test_3d_panels_share_one_z_range(tmp_path):
    a, b = _bowl(1.0, label="sam"), _bowl(3.0, label="sgd")
    lo, hi = shared_range([a, b])
    assert (lo, hi) == (pytest.approx(0.1), pytest.approx(b.loss.max()))
    figs = [plot_surface_3d(s, vmin=lo, vmax=hi) for s in (a, b)]
    assert {fig.axes[0].get_zlim() for fig in figs} == {(lo, hi)}
    assert {fig.axes[0].collections[0].get_clim() for fig in figs} == {(lo, hi)}
    assert _not_blank(save_figure(figs[0], tmp_path / "a.png")) > 0.02


def test_2d_accuracy_figures(tmp_path):
    a, b = _bowl(1.0, label="sam"), _bowl(3.0, label="sgd")
    fig = plot_contour(a, kind="contourf", quantity="accuracy")
    panel, bar = fig.axes
    assert bar.get_ylabel() == "accuracy (%)" and panel.get_title() == "sam: centre accuracy 100.00%"
    lo, hi = panel.collections[0].get_clim()
    assert (lo, hi) == (pytest.approx(100 * a.accuracy.min()), pytest.approx(100 * a.accuracy.max()))  # percent
    assert _not_blank(save_figure(fig, tmp_path / "acc.png")) > 0.02
    both = plot_comparison([a, b], kind="contourf", accuracy=True)
    panels = [ax for ax in both.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and len(both.axes) == 6  # loss row and accuracy row, one colour bar each
    assert panels[0].get_shared_x_axes().joined(panels[0], panels[3])
    loss_clims = {ax.collections[0].get_clim() for ax in panels[:2]}
    accuracy_clims = {ax.collections[0].get_clim() for ax in panels[2:]}
    assert len(loss_clims) == 1 and len(accuracy_clims) == 1 and loss_clims != accuracy_clims
    assert _not_blank(save_figure(both, tmp_path / "both.png")) > 0.02
    no_accuracy = replace(a, accuracy=np.full_like(a.loss, np.nan))
    assert not has_accuracy(no_accuracy) and has_accuracy(a)
    assert len(plot_comparison([no_accuracy, no_accuracy], accuracy=True).axes) == 3  # no empty accuracy row
    with pytest.raises(SharpscopeError, match="unknown quantity 'acc'"):
        plot_contour(a, quantity="acc")


def test_point_labels_stay_inside_the_axes(tmp_path):
    s = _bowl(1.0, label="plane")
    fig = plot_contour(s, points=[[0.0, 0.0], [1.0, 0.0], [0.4, 1.0]], point_labels=["a", "b", "c"])
    save_figure(fig, tmp_path / "p.png")  # draws: text extents are known
    ax = fig.axes[0]
    box = ax.get_window_extent()
    labels = [t for t in ax.texts if t.get_text() in ("a", "b", "c")]
    assert len(labels) == 3
    for text in labels:  # "c" sits on the top edge and "b" on the right one: both labelled towards the middle
        extent = text.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, text


def test_surface_height_is_bilinear():
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-1, 2, 4)
    loss = 2.0 + 0.5 * xs[None, :] - ys[:, None] + 0.25 * xs[None, :] * ys[:, None]  # bilinear: reproduced exactly
    s = Surface(xs=xs, ys=ys, loss=loss, accuracy=np.zeros_like(loss), done=np.ones_like(loss, bool),
                center_loss=2.0, center_accuracy=0.0, num_samples=1, metadata={})
    points = np.array([[0.3, 0.7], [-1.0, 2.0], [0.99, -0.2], [1.5, 0.0]])
    want = 2.0 + 0.5 * points[:, 0] - points[:, 1] + 0.25 * points[:, 0] * points[:, 1]
    got = surface_height(s, points)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-12)
    assert np.isnan(got[3])  # outside the grid


def test_plotly_draws_the_path_on_the_surface_and_keeps_titles_in_view():
    s = _bowl(1.0, label="sgd")
    path = np.array([[0.9, 0.5], [0.4, 0.2], [0.0, 0.0]])
    fig = plotly_figure([s], path=path, path_labels=["epoch 0", "epoch 1", "final"])
    line, markers = fig.data[1], fig.data[2]
    assert line.type == markers.type == "scatter3d" and list(markers.text) == ["epoch 0", "epoch 1", "final"]
    height = surface_height(s, path)
    lift = 0.01 * (s.loss.max() - s.loss.min())
    # on (just above) the surface: never below the bilinear height, never more than a cell's bend above it
    assert np.all(np.asarray(markers.z) >= height + lift - 1e-12)
    assert np.all(np.asarray(markers.z) <= height + lift + 0.1)
    np.testing.assert_allclose(markers.customdata, height)  # the hover shows the interpolated loss itself
    assert len(line.x) > len(path)  # densified: the line follows the surface between checkpoints
    assert fig.layout.margin.b is not None and fig.layout.scene.aspectmode == "manual"
    assert fig.layout.scene.zaxis.title.text == "loss"
    with pytest.raises(SharpscopeError, match=r"expected a \(T, 2\) array"):
        plotly_figure([s], path=np.zeros(3))


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


def _line(loss, accuracy, *, xs=None) -> Surface:
    xs = np.linspace(-0.5, 1.5, len(loss)) if xs is None else xs
    loss = np.asarray(loss, dtype=np.float64)
    return Surface(xs=xs, ys=None, loss=loss, accuracy=np.asarray(accuracy, dtype=np.float64),
                   done=np.ones(len(loss), bool), center_loss=float(loss[np.argmin(abs(xs))]), center_accuracy=1.0,
                   num_samples=10, metadata={"label": "a-to-b", "directions": [{"kind": "interpolate"}]})


def test_auto_loss_scale_is_log_beyond_one_and_a_half_decades():
    basin = _bowl(1.0, label="a")  # 0.1 .. 1.6: 1.2 decades
    assert not auto_log_scale(basin)
    deep = replace(basin, loss=np.where(basin.loss == 0.1, 0.002, 3.0 * basin.loss / basin.loss.max()))
    assert auto_log_scale(deep)  # centre 0.002, rim 3: 3.2 decades
    # over all surfaces drawn together; not-computed, non-finite and non-positive points do not count
    assert auto_log_scale([basin, replace(basin, loss=basin.loss * 40)])
    holes = replace(deep, done=deep.loss > 0.01)
    assert not auto_log_scale(replace(holes, loss=np.where(holes.done, basin.loss, np.inf)))


def test_interpolation_figure_twin_axes_and_barrier(tmp_path):
    xs = np.linspace(-0.5, 1.5, 41)
    loss = 0.05 + 0.3 * np.exp(-(((xs - 0.45) / 0.15) ** 2)) + 0.02 * xs
    accuracy = np.where(abs(xs - 0.5) < 0.6, 1.0, 0.9)  # 100% over the middle: drawn, not clipped at the edge
    fig = plot_interpolation(_line(loss, accuracy), endpoints=("sgd", "sam"))
    ax, ax2 = fig.axes[0], fig.axes[-1]
    (loss_line,), (acc_line,) = ax.lines[:1], ax2.lines
    assert loss_line.get_color() != acc_line.get_color()  # one colour per quantity...
    assert ax.yaxis.label.get_color() == loss_line.get_color() and ax2.yaxis.label.get_color() == acc_line.get_color()
    lo, hi = ax2.get_ylim()
    assert lo < 0 and 100 < hi <= 110  # 0..100 with a margin
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    inside = (xs >= 0) & (xs <= 1)
    expected = loss[inside].max() - max(loss[xs == 0][0], loss[np.isclose(xs, 1)][0])
    assert any(f"barrier {expected:.3g}" in t for t in legend), legend
    assert f"{expected:.3g}" in [t.get_text() for t in ax.texts]  # the value next to the arrow on the curve
    assert _not_blank(save_figure(fig, tmp_path / "interp.png")) > 0.05
    flat = plot_interpolation(_line(0.1 + 0.0 * xs, np.ones_like(xs)), endpoints=("a", "b"))
    assert any("barrier 0" in t.get_text() for t in flat.legends[0].get_texts())


def test_curves_of_several_models_share_one_axes():
    fig = plot_curves([_curve(1.0, label="sgd"), _curve(3.0, label="sam")], accuracy=True)
    loss_axes = fig.axes[0]
    assert len(fig.axes) == 2  # one loss axes and its accuracy twin: the models overlaid, not side by side
    assert [line.get_label() for line in loss_axes.lines if not line.get_label().startswith("_")] == [
        "sgd (loss)", "sam (loss)"]
    assert fig.axes[1].get_ylim()[1] > 100  # accuracy not clipped at 100%


def test_3d_z_label_clear_of_the_tick_labels():
    # the default 8-10 z ticks with labelpad 0 ran "loss" into the tick labels (issue 18, checked by eye on the
    # written PNG); a few ticks and a padded label keep them apart
    fig = plot_surface_3d(_bowl(1234.0, label="sgd"))
    ax = fig.axes[0]
    lo, hi = ax.get_zlim()
    shown = [z for z in ax.zaxis.get_ticklocs() if lo <= z <= hi]
    assert 2 <= len(shown) <= 6, shown
    assert ax.zaxis.labelpad >= 6

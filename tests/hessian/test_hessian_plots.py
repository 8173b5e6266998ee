"""sharpscope.plots.spectrum: result objects in, figures out (checked through the artists they draw)."""

import numpy as np
import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import spectral_density
from sharpscope.io import save_figure
from sharpscope.plots.spectrum import (
    DENSITY_FLOOR,
    plot_bottom_eigenvalues,
    plot_densities,
    plot_density,
    plot_per_layer,
    plot_top_eigenvalues,
)


@pytest.fixture(scope="module")
def densities():
    A = torch.diag(torch.linspace(-1.0, 4.0, 30, dtype=torch.float64))
    return [spectral_density(A, num_iters=10, num_runs=2, num_points=300, seed=s) for s in range(2)]


def test_plot_density_log_axis_and_clipping(densities, tmp_path):
    fig = plot_density(densities[0], label="sgd/epoch 3")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    (line,) = ax.get_lines()
    x, y = line.get_data()
    assert np.array_equal(x, densities[0].grid.numpy())
    peak = float(densities[0].density.max())
    assert y.min() >= peak * DENSITY_FLOOR * (1 - 1e-12)  # zeros clipped to the floor, never log(0)
    assert "sgd/epoch 3" in ax.get_title()
    assert save_figure(fig, tmp_path / "density.png").stat().st_size > 0


def test_plot_densities_overlaid(densities):
    fig = plot_densities(densities, ["a", "b"], title="compare")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b"]
    assert ax.get_title() == "compare" and ax.get_yscale() == "log"


def test_plot_top_eigenvalues_overlaid_one_colour_per_run():
    runs = {"sgd": [(2, [5.0, 3.0]), (0, [9.0, 4.0]), (1, [7.0, 3.5])], "sam": [(0, [6.0, 1.0]), (1, [2.0, 1.5])]}
    fig = plot_top_eigenvalues(runs, layout="overlay")
    (ax,) = fig.axes
    assert ax.get_title() == "Top Hessian eigenvalues during training"
    lines = {line.get_label(): line for line in ax.get_lines()}
    x, y = lines["sgd"].get_data()
    assert list(x) == [0, 1, 2] and list(y) == [9.0, 7.0, 5.0]  # lambda_1, sorted by epoch
    assert list(lines["sam"].get_data()[1]) == [6.0, 2.0]
    by_color = {}
    for line in ax.get_lines():
        by_color.setdefault(line.get_color(), []).append(line)
    assert len(by_color) == 2 and all(len(group) == 2 for group in by_color.values())  # lambda_1, lambda_2 per run
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sgd", "sam", "$\\lambda_{1}$", "$\\lambda_{2}$"]


def test_plot_top_eigenvalues_final_checkpoints_only_is_a_per_run_chart():
    """One checkpoint per run: no "during training" panel of lone dots, a column per run with its k values."""
    fig = plot_top_eigenvalues({"sgd": [(3, [17.8, 12.7, 8.9])], "sam": [(3, [22.8, 14.2, 10.3])]})
    (ax,) = fig.axes
    assert "during training" not in ax.get_title() and "at epoch 3" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sgd", "sam"]
    points = sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())
    assert points == [(0, 8.9), (0, 12.7), (0, 17.8), (1, 10.3), (1, 14.2), (1, 22.8)]
    assert [t.get_text() for t in ax.texts] == ["17.8", "22.8"]  # lambda_1 labelled
    assert ax.get_ylim()[0] == 0  # magnitudes compared from zero
    mixed = plot_top_eigenvalues({"sgd": [(3, [1.0])], "sam": [(2, [2.0])]})
    assert "at each run's checkpoint" in mixed.axes[0].get_title()


def test_plot_bottom_eigenvalues_keep_their_sign():
    fig = plot_bottom_eigenvalues({"sgd": [(0, [-0.5, -0.4]), (1, [-3.7, -3.6])], "sam": [(0, [-0.5, -0.4]),
                                                                                        (1, [-2.7, -2.6])]})
    (ax,) = fig.axes
    assert ax.get_title() == "Most negative Hessian eigenvalues during training"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["sgd"].get_data()[1]) == [-0.5, -3.7]
    assert any(list(line.get_data()[1]) == [0.0, 0.0] for line in ax.get_lines())  # the zero line
    single = plot_bottom_eigenvalues({"sgd": [(3, [-0.54, -0.51])], "sam": [(3, [-0.6, -0.58])]})
    assert "Most negative Hessian eigenvalues at epoch 3" in single.axes[0].get_title()
    assert [t.get_text() for t in single.axes[0].texts] == ["-0.54", "-0.6"]


def test_plot_per_layer_bars_per_run_and_layer():
    layers = {"sgd (epoch 3)": {"features.0": 4.6, "classifier.1": 4.1},
              "sam (epoch 3)": {"features.0": 3.7, "classifier.1": 5.5}}
    fig = plot_per_layer(layers)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["features.0", "classifier.1"]
    widths = [[bar.get_width() for bar in container] for container in ax.containers]
    assert widths == [[4.6, 4.1], [3.7, 5.5]] and ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(layers)
    spread = plot_per_layer({"sgd": {"a": 0.05, "b": 8.0}})  # > 30x apart, all positive: log axis
    assert spread.axes[0].get_xscale() == "log"
    with pytest.raises(SharpscopeError, match="give at least one run with per-layer"):
        plot_per_layer({})
    with pytest.raises(SharpscopeError, match=r"run\(s\) sam have no per-layer"):
        plot_per_layer({"sgd": {"a": 1.0}, "sam": {}})


def test_plot_top_eigenvalues_side_by_side_shared_y():
    runs = {"sgd": [(2, [5.0, 3.0]), (0, [9.0, 4.0]), (1, [7.0, 3.5])], "sam": [(0, [6.0]), (1, [2.0])]}
    fig = plot_top_eigenvalues(runs)  # the default layout (the report's): one panel per run
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["sgd", "sam"]
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    x, y = axes[0].get_lines()[0].get_data()
    assert list(x) == [0, 1, 2] and list(y) == [9.0, 7.0, 5.0]  # sorted by epoch
    assert np.isnan(axes[1].get_lines()[1].get_data()[1]).all()  # the run with 1 eigenvalue: no lambda_2


def test_plot_errors(densities):
    with pytest.raises(SharpscopeError, match=r"got 1 labels for 2 densities"):
        plot_densities(densities, ["a"])
    with pytest.raises(SharpscopeError, match=r"give at least one spectral density"):
        plot_densities([], [])
    with pytest.raises(SharpscopeError, match=r"expected a spectral density .*got int"):
        plot_density(3)
    with pytest.raises(SharpscopeError, match=r"grid and density must be 1-D of equal length"):
        plot_density(type("D", (), {"grid": np.zeros(3), "density": np.zeros(4)})())
    with pytest.raises(SharpscopeError, match=r"give at least one run"):
        plot_top_eigenvalues({})
    with pytest.raises(SharpscopeError, match=r"run\(s\) sam have no checkpoints"):
        plot_top_eigenvalues({"sgd": [(0, [1.0])], "sam": []})
    with pytest.raises(SharpscopeError, match=r"layout must be 'overlay' or 'panels', got 'grid'"):
        plot_top_eigenvalues({"sgd": [(0, [1.0])]}, layout="grid")

"""sharpscope.plots.spectrum: result objects in, figures out (checked through the artists they draw)."""

import numpy as np
import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import spectral_density
from sharpscope.io import save_figure
from sharpscope.plots.spectrum import DENSITY_FLOOR, plot_densities, plot_density, plot_top_eigenvalues


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


def test_plot_top_eigenvalues_side_by_side_shared_y():
    runs = {"sgd": [(2, [5.0, 3.0]), (0, [9.0, 4.0]), (1, [7.0, 3.5])], "sam": [(0, [6.0]), (1, [2.0])]}
    fig = plot_top_eigenvalues(runs)
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

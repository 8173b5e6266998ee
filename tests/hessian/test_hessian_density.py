"""Stochastic Lanczos quadrature against exact spectra (closed forms and eigvalsh of the dense Hessian)."""

import pytest
import torch
from hessian_cases import CASES, build

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import HessianOperator, spectral_density
from sharpscope.hessian.density import smoothed_density
from sharpscope.hessian.reference import dense_hessian


def _cdf_distance(density, eigenvalues):
    """W1 distance / range between the smoothed density and the empirical eigenvalue distribution (on the grid)."""
    grid = density.grid
    empirical = (eigenvalues[None, :] <= grid[:, None]).double().mean(dim=1)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                            torch.cumulative_trapezoid(density.density, grid)])
    width = float(eigenvalues.max() - eigenvalues.min())
    return float(torch.trapezoid((cumulative - empirical).abs(), grid)) / width


def test_density_of_model_hessian(problem):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches)).cpu()
    density = spectral_density(H, num_iters=90, num_runs=5, seed=0)
    # A probability density: nonnegative, trapezoid integral 1 (to rounding).
    assert bool((density.density >= 0).all())
    assert float(torch.trapezoid(density.density, density.grid)) == pytest.approx(1.0, abs=1e-10)
    assert bool(torch.allclose(density.weights.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12))
    # The extreme Ritz values converge first: the grid covers the whole exact spectrum.
    assert density.grid[0] <= exact[0] and density.grid[-1] >= exact[-1]
    assert density.lambda_max == pytest.approx(float(exact[-1]), rel=1e-6)
    # The mass sits where the eigenvalues are. With 5 Rademacher runs on n ~ 100-200 parameters the quadrature
    # weights carry O(1/sqrt(5 n)) probe noise; measured W1/range is 0.005-0.02 over seeds, so 0.04 fails only if
    # mass is misplaced (e.g. spurious or shifted nodes).
    assert _cdf_distance(density, exact) < 0.04
    # 90 steps per run, fewer for runs whose Krylov space becomes invariant (rank-deficient Hessians).
    assert density.num_matvecs <= 5 * min(90, H.num_params) and density.num_matvecs == H.num_matvecs


def test_krylov_space_of_full_dimension_gives_exact_nodes():
    """With num_iters = n every run's nodes are the eigenvalues themselves (distinct spectrum)."""
    eigenvalues = torch.linspace(-2.0, 6.0, 40, dtype=torch.float64) ** 3 / 10
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = Q @ torch.diag(eigenvalues) @ Q.T
    density = spectral_density(A, num_iters=90, num_runs=3, seed=1)  # capped at n = 40
    assert density.nodes.shape == (3, 40)
    for run in range(3):
        assert torch.allclose(density.nodes[run], eigenvalues, rtol=0, atol=1e-10 * 21.6)


def test_quadrature_weights_of_low_rank_matrix_in_closed_form():
    """diag(3, -1, 0, ..., 0), n = 30: the Krylov space breaks down after 3 steps; the weights are the squared
    components of v = z / sqrt(n) on each eigenspace: exactly 1/30, 1/30 and 28/30 for any Rademacher z."""
    d = torch.zeros(30, dtype=torch.float64)
    d[0], d[1] = 3.0, -1.0
    density = spectral_density(torch.diag(d), num_iters=90, num_runs=2, seed=0)
    assert density.num_matvecs == 2 * 3
    for run in range(2):
        used = density.weights[run] > 0
        nodes, weights = density.nodes[run][used], density.weights[run][used]
        order = nodes.argsort()
        assert torch.allclose(nodes[order], torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64), atol=1e-12)
        assert torch.allclose(weights[order], torch.tensor([1, 28, 1], dtype=torch.float64) / 30, atol=1e-12)
    assert density.trace_estimate == pytest.approx(2.0, abs=1e-10)
    assert float(torch.trapezoid(density.density, density.grid)) == pytest.approx(1.0, abs=1e-10)


def test_many_runs_converge_to_the_spectrum():
    """Probe noise shrinks like 1/sqrt(num_runs): 200 runs pin W1/range below 0.005 and the SLQ trace within
    4 standard errors of the per-run estimates."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    eigenvalues = torch.randn(60, generator=g, dtype=torch.float64).sort().values
    A = Q @ torch.diag(eigenvalues) @ Q.T
    density = spectral_density(A, num_iters=60, num_runs=200, seed=2)
    assert _cdf_distance(density, eigenvalues) < 0.005
    per_run = 60 * (density.weights * density.nodes).sum(dim=1)
    stderr = float(per_run.std() / 200**0.5)
    assert abs(density.trace_estimate - float(eigenvalues.sum())) < 4 * stderr
    # The quadrature CDF (before smoothing) agrees with the empirical one at the quartiles too.
    quartiles = eigenvalues[[14, 29, 44]]
    assert torch.allclose(density.cdf(quartiles), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), atol=0.03)


def test_without_reorthogonalization_extremes_and_mass_are_kept():
    problem = build(CASES[2])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches))
    density = spectral_density(H, num_iters=40, num_runs=2, reorthogonalize=False, seed=0)
    assert float(torch.trapezoid(density.density, density.grid)) == pytest.approx(1.0, abs=1e-10)
    assert density.lambda_max == pytest.approx(float(exact[-1]), rel=1e-6)
    assert density.lambda_min == pytest.approx(float(exact[0]), rel=1e-3)


def test_explicit_bounds_and_sigma():
    A = torch.diag(torch.linspace(0.0, 10.0, 50, dtype=torch.float64))
    density = spectral_density(A, num_iters=20, num_runs=1, sigma=0.01, num_points=500, bounds=(-5.0, 15.0))
    assert float(density.grid[0]) == -5.0 and float(density.grid[-1]) == 15.0 and density.grid.numel() == 500
    assert density.sigma == pytest.approx(0.01 * (density.lambda_max - density.lambda_min))


def test_smoothed_density_of_one_node_is_a_gaussian():
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    values = smoothed_density(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                              grid, 0.1)
    expected = torch.exp(-0.5 * (grid / 0.1) ** 2) / (0.1 * (2 * torch.pi) ** 0.5)
    assert torch.allclose(values, expected, rtol=1e-6)  # the +-10 sigma grid cuts ~1e-23 of the mass


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_iters": 0}, r"num_iters and num_runs must be >= 1"),
        ({"num_runs": 0}, r"num_iters and num_runs must be >= 1"),
        ({"sigma": 0.0}, r"sigma must be > 0"),
        ({"num_points": 1}, r"num_points must be >= 2"),
        ({"margin": -0.1}, r"margin must be >= 0"),
        ({"bounds": (1.0, 1.0)}, r"bounds must be \(low, high\) with low < high"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(SharpscopeError, match=match):
        spectral_density(torch.eye(4, dtype=torch.float64), **kwargs)

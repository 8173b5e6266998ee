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
        ({"num_runs": 0}, r"max_iters and num_runs must be >= 1"),
        ({"max_iters": 0}, r"max_iters and num_runs must be >= 1"),
        ({"num_iters": 5, "tol": 0.01}, r"give num_iters .* or tol .*, not both"),
        ({"tol": 0.0}, r"tol must be > 0"),
        ({"sigma": 0.0}, r"sigma must be > 0"),
        ({"num_points": 1}, r"num_points must be >= 2"),
        ({"margin": -0.1}, r"margin must be >= 0"),
        ({"bounds": (1.0, 1.0)}, r"bounds must be \(low, high\) with low < high"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(SharpscopeError, match=match):
        spectral_density(torch.eye(4, dtype=torch.float64), **kwargs)


# --------------------------------------------------------------------------------- adaptive steps (tol), moments
def _quadrature_w1(nodes, weights, eigenvalues, eigen_weights):
    """Exact W1 between two discrete measures on the line: integral of |F1 - F2| over the merged atoms."""
    points = torch.cat([nodes, eigenvalues])
    mass = torch.cat([weights, -eigen_weights])
    order = points.argsort()
    points, mass = points[order], mass[order]
    return float((mass.cumsum(0)[:-1].abs() * (points[1:] - points[:-1])).sum())


@pytest.mark.parametrize("steps", [3, 6, 12, 25])
def test_wasserstein_bound_holds_for_each_run(steps):
    """The Chebyshev-Markov-Stieltjes bound is a bound: the exact W1 distance between a run's quadrature measure
    and its own spectral measure mu_v = sum_i (q_i^T v)^2 delta(lambda_i) (from eigh) never exceeds it."""
    from sharpscope.hessian.density import wasserstein_bound

    problem = build(CASES[1])
    H = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    eigenvalues, Q = torch.linalg.eigh(H)
    density = spectral_density(H, num_iters=steps, num_runs=3, seed=4, num_points=200)
    generator = torch.Generator().manual_seed(4)  # the start vectors spectral_density drew (normalised Rademacher)
    from sharpscope.hessian._operators import random_vectors

    v = random_vectors(H.shape[0], 3, generator=generator, distribution="rademacher", device="cpu")
    v /= H.shape[0] ** 0.5
    for run in range(3):
        nodes, weights = density.nodes[run], density.weights[run]
        exact = _quadrature_w1(nodes, weights, eigenvalues, (Q.T @ v[:, run]) ** 2)
        width = float(nodes.max() - nodes.min())
        bound = float(wasserstein_bound(nodes, weights)) * width
        assert exact <= bound * (1 + 1e-9), (run, exact, bound)
        assert float(density.error_bounds[run]) == pytest.approx(bound / width)


def test_tol_stops_early_with_the_dense_spectrum_in_reach(problem):
    """Each run stops at the first step where its bound is <= tol; the averaged quadrature measure then sits within
    W1 <= tol * range + probe noise of the exact spectrum (measured 0.002-0.01 of the range for 5 runs here)."""
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches)).cpu()
    density = spectral_density(H, tol=0.02, num_runs=5, seed=0, num_points=500)
    assert density.tol == 0.02 and density.converged
    assert bool((density.error_bounds <= 0.02).all()) and int(density.num_steps.max()) < min(90, H.num_params)
    assert density.num_matvecs == int(density.num_steps.sum()) == H.num_matvecs
    assert density.nodes.shape == (5, int(density.num_steps.max()))
    width = float(exact[-1] - exact[0])
    w1 = _quadrature_w1(density.nodes.reshape(-1), density.weights.reshape(-1) / 5, exact,
                        torch.full_like(exact, 1 / exact.numel()))
    assert w1 / width < 0.02 + 0.02, w1 / width
    assert density.lambda_max == pytest.approx(float(exact[-1]), rel=1e-3)


def test_moments_and_implied_trace_match_the_exact_spectrum():
    """(1/n) tr(H^p) = E_v[v^T H^p v] and a Gauss rule with m nodes integrates lambda^p exactly for p <= 2m - 1:
    the runs' quadrature moments are unbiased, and their mean lands within 4 standard errors (across runs) of the
    exact moments of eigvalsh of the dense Hessian, for p = 1..4. The implied trace's stderr is that of p = 1."""
    problem = build(CASES[0])
    H = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(H)
    n = exact.numel()
    density = spectral_density(H, num_runs=200, seed=3, num_points=200)
    assert int(density.num_steps.min()) >= 8  # 2 * 8 - 1 >= 4: the first four moments are exact per run
    for order in range(1, 5):
        per_run = density.moments(order)
        stderr = float(per_run.std() / 200**0.5)
        truth = float((exact**order).mean())
        assert abs(float(per_run.mean()) - truth) < 4 * stderr, (order, float(per_run.mean()), truth, stderr)
    assert density.trace_estimate == pytest.approx(n * float(density.moments(1).mean()))
    # The plug-in stderr sqrt(2 tr(H^2) / runs) (tr(H^2) from the runs' second moments) bounds the Rademacher
    # one, sqrt(2 (||H||_F^2 - sum H_ii^2) / runs), which the spread of 200 per-run traces estimates to ~5%.
    plug_in = (2 * float((exact**2).sum()) / 200) ** 0.5
    spread = n * float(density.moments(1).std()) / 200**0.5
    assert density.trace_stderr == pytest.approx(plug_in, rel=0.25)
    assert density.trace_stderr > 0.8 * spread
    rademacher = (2 * float((H**2).sum() - (H.diagonal() ** 2).sum()) / 200) ** 0.5
    assert spread == pytest.approx(rademacher, rel=0.2)
    assert abs(density.trace_estimate - float(exact.sum())) < 4 * density.trace_stderr


def test_fixed_num_iters_keeps_the_classical_budget():
    A = torch.diag(torch.linspace(0.0, 10.0, 50, dtype=torch.float64))
    density = spectral_density(A, num_iters=20, num_runs=2, num_points=300)
    assert density.num_matvecs == 40 and density.tol is None and density.converged is None
    assert density.num_steps.tolist() == [20, 20] and density.nodes.shape == (2, 20)
    assert float(density.error_bounds.max()) > 0.01  # 20 nodes on a uniform spectrum: ~1/20 of the range
    one = spectral_density(A, num_iters=20, num_runs=1, num_points=300)
    assert one.trace_stderr == pytest.approx((2 * float((A**2).sum())) ** 0.5, rel=1e-9)  # exact moment, 1 run

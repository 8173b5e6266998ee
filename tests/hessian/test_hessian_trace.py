"""Trace estimators: exact cases in closed form, and convergence to the exact trace within stated standard errors."""

import pytest
import torch
from hessian_cases import CASES, build

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import HessianOperator, hutchinson_trace, hutchpp_trace
from sharpscope.hessian.reference import dense_hessian

# A correct unbiased estimator lands within 4 standard errors of the truth with probability > 99.99% (normal
# approximation); the seeds are fixed, so these tests are deterministic and fail only if the estimate is biased
# or the standard error is underestimated.
Z = 4.0


def _random_symmetric(n, seed, decay=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.randn(n, generator=g, dtype=torch.float64) if decay is None else decay ** torch.arange(
        n, dtype=torch.float64)
    return Q @ torch.diag(eigenvalues) @ Q.T


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_converges_to_hessian_trace(problem, estimator):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = float(dense_hessian(problem.model, problem.loss_fn, problem.batches).trace())
    estimate = estimator(H, num_matvecs=60, seed=0)
    assert abs(estimate.value - exact) < Z * estimate.stderr, (estimate.value, exact, estimate.stderr)
    assert estimate.num_matvecs == 60 == H.num_matvecs


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_converges_with_many_probes(distribution):
    """On a dense matrix probes are cheap: 20000 of them pin the trace to ~1% of ||A||_F, within 4 stderr."""
    A = _random_symmetric(60, seed=1)
    exact = float(A.trace())
    estimate = hutchinson_trace(A, num_matvecs=20000, seed=5, distribution=distribution, block_size=5000)
    assert abs(estimate.value - exact) < Z * estimate.stderr
    # The stderr itself must be calibrated: Rademacher variance is 2 (||A||_F^2 - sum A_ii^2), Gaussian 2 ||A||_F^2.
    variance = 2 * (A.square().sum() - (A.diagonal().square().sum() if distribution == "rademacher" else 0))
    expected_stderr = float(variance.sqrt()) / 20000**0.5
    assert estimate.stderr == pytest.approx(expected_stderr, rel=0.05)  # sample std of 20000 draws: ~1-2% error


def test_hutchinson_rademacher_is_exact_for_diagonal_matrices():
    """z^T D z = sum_i d_i z_i^2 = tr(D) for every Rademacher z: zero variance."""
    D = torch.diag(torch.linspace(-3, 7, 40, dtype=torch.float64))
    estimate = hutchinson_trace(D, num_matvecs=3, seed=0)
    assert estimate.value == pytest.approx(float(D.trace()), abs=1e-12)
    assert estimate.stderr == pytest.approx(0.0, abs=1e-12)


def test_hutchpp_is_exact_for_low_rank():
    """Rank 5 <= s = 18 // 3 = 6: Q spans the range, the deflated remainder is zero."""
    g = torch.Generator().manual_seed(2)
    U = torch.randn(80, 5, generator=g, dtype=torch.float64)
    A = U @ torch.diag(torch.tensor([5.0, -3.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ U.T
    estimate = hutchpp_trace(A, num_matvecs=18, seed=0)
    assert estimate.value == pytest.approx(float(A.trace()), rel=1e-10)
    assert estimate.stderr < 1e-10 * float(A.abs().max())
    assert estimate.num_matvecs == 18


def test_hutchpp_beats_hutchinson_on_decaying_spectra():
    """Meyer et al. 2021: with fast eigenvalue decay Hutch++'s error is far below Hutchinson's at equal cost."""
    A = _random_symmetric(200, seed=3, decay=0.5)
    plain = hutchinson_trace(A, num_matvecs=30, seed=0)
    deflated = hutchpp_trace(A, num_matvecs=30, seed=0)
    assert deflated.stderr < plain.stderr / 10
    assert abs(deflated.value - float(A.trace())) < Z * deflated.stderr + 1e-12


def test_block_size_does_not_change_the_estimate():
    A = _random_symmetric(30, seed=4)
    one = hutchinson_trace(A, num_matvecs=10, seed=7, block_size=1)
    many = hutchinson_trace(A, num_matvecs=10, seed=7, block_size=4)
    assert one.value == pytest.approx(many.value, rel=1e-12)
    assert torch.equal(one.samples.round(decimals=10), many.samples.round(decimals=10))
    lo, hi = one.interval
    assert lo < one.value < hi


def test_float32_operator():
    problem = build(CASES[0])
    exact = float(dense_hessian(problem.model, problem.loss_fn, problem.batches).trace())
    model = problem.model.float()
    H = HessianOperator(model, problem.loss_fn, [(x.float(), y) for x, y in problem.batches])
    estimate = hutchpp_trace(H, num_matvecs=30, seed=1)
    assert abs(estimate.value - exact) < Z * estimate.stderr + 1e-5 * abs(exact)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda A: hutchinson_trace(A, num_matvecs=1), r"num_matvecs must be >= 2"),
        (lambda A: hutchpp_trace(A, num_matvecs=3), r"hutchpp_trace needs num_matvecs >= 4"),
        (lambda A: hutchinson_trace(A, num_matvecs=4, distribution="uniform"),
         r"unknown distribution 'uniform'.*choices: gaussian, rademacher"),
        (lambda A: hutchpp_trace(A, num_matvecs=6, block_size=0), r"block_size must be >= 1"),
    ],
)
def test_errors(call, match):
    with pytest.raises(SharpscopeError, match=match):
        call(torch.eye(5, dtype=torch.float64))

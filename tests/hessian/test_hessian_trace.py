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


# ------------------------------------------------------------------------------------ adaptive (rtol) estimators
def _case_hessian(index=0):
    problem = build(CASES[index])
    return problem, dense_hessian(problem.model, problem.loss_fn, problem.batches)


@pytest.mark.parametrize(("estimator", "rtol"), [(hutchinson_trace, 0.1), (hutchpp_trace, 0.05)])
def test_rtol_stops_early_and_covers_the_exact_trace(estimator, rtol):
    """Over 40 seeds on the dense Hessian of the mlp-tanh case (n = 92): every run stops as soon as
    stderr <= rtol |estimate| (so well before max_matvecs), and |estimate - tr(H)| <= 3 stderr in >= 90% of them.
    A normal estimate misses 3 stderr with probability 0.3% (t with 15 dof: 0.9%); stopping on an estimated
    stderr biases that slightly. A biased estimator or a stderr underestimated by 2x (coverage ~87%) fails."""
    _, H = _case_hessian(0)
    exact = float(H.trace())
    covered, spent = 0, []
    for seed in range(40):
        estimate = estimator(H, rtol=rtol, seed=seed)
        assert estimate.converged and estimate.rtol == rtol
        assert estimate.stderr <= rtol * abs(estimate.value)
        assert estimate.stderr == pytest.approx(float(estimate.samples.std() / estimate.samples.numel() ** 0.5))
        covered += abs(estimate.value - exact) <= 3 * estimate.stderr
        spent.append(estimate.num_matvecs)
    assert covered >= 36, f"only {covered}/40 seeds within 3 stderr of the exact trace {exact}"
    assert max(spent) < 500 and min(spent) < max(spent), spent  # stopped on precision, not on the budget


def test_rtol_on_the_hessian_operator_with_deflation_by_top_eigenvectors(problem):
    """The model-level path: HessianOperator, Hutch++ sketch joined by the top-3 Lanczos eigenvectors."""
    from sharpscope.hessian import lanczos_eigs

    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = float(dense_hessian(problem.model, problem.loss_fn, problem.batches).trace())
    top = lanczos_eigs(H, 3)
    before = H.num_matvecs
    estimate = hutchpp_trace(H, rtol=0.1, deflate=top, seed=0)
    assert estimate.num_matvecs == H.num_matvecs - before
    assert estimate.deflation_rank == 8 + 3 and estimate.converged
    assert abs(estimate.value - exact) < Z * estimate.stderr, (estimate.value, exact, estimate.stderr)


def test_deflation_by_exact_eigenvectors_removes_their_variance():
    """Rank 6 = the 6 given eigenvectors: tr(Q^T A Q) is the whole trace, every deflated probe is 0."""
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(70, 6, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([4.0, -2.0, 1.5, 1.0, 0.7, 0.2], dtype=torch.float64)) @ Q.T
    for estimate in (hutchinson_trace(A, deflate=Q, seed=1), hutchinson_trace(A, num_matvecs=10, deflate=Q),
                     hutchpp_trace(A, sketch_size=0, deflate=Q, seed=1)):
        assert estimate.value == pytest.approx(float(A.trace()), rel=1e-12)
        assert estimate.stderr < 1e-12
    assert hutchinson_trace(A, num_matvecs=10, deflate=Q).num_matvecs == 10  # 6 for Q^T A Q + 4 probes
    assert hutchinson_trace(A, deflate=Q, seed=1).num_matvecs == 6 + 16  # stops at min_probes


def test_zero_variance_stops_at_min_probes_and_unreachable_rtol_at_the_budget():
    D = torch.diag(torch.linspace(1, 7, 40, dtype=torch.float64))  # Rademacher: every z^T D z = tr(D)
    estimate = hutchinson_trace(D, rtol=1e-6, min_probes=8, block_size=4)
    assert estimate.num_matvecs == 8 and estimate.converged and estimate.value == pytest.approx(float(D.trace()))
    A = _random_symmetric(40, seed=6)  # trace ~0 against a Frobenius norm ~6: 1e-3 is out of reach
    estimate = hutchinson_trace(A, rtol=1e-3, max_matvecs=64)
    assert estimate.num_matvecs == 64 and estimate.converged is False
    assert hutchinson_trace(A, num_matvecs=20).converged is None  # a fixed budget promises nothing


def test_sharded_single_rank_adaptive_matches_plain():
    A = _random_symmetric(50, seed=8, decay=0.8)
    for estimator in (hutchinson_trace, hutchpp_trace):
        plain = estimator(A, rtol=0.05, seed=3, block_size=8)
        sharded = estimator(A, rtol=0.05, seed=3, block_size=8, shard=(0, 1))
        assert sharded.value == pytest.approx(plain.value, rel=1e-12)
        assert sharded.num_matvecs == plain.num_matvecs


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda A: hutchinson_trace(A, num_matvecs=8, rtol=0.1), r"give num_matvecs .* or rtol .*, not both"),
        (lambda A: hutchpp_trace(A, rtol=0.0), r"rtol must be a relative standard error > 0"),
        (lambda A: hutchinson_trace(A, rtol=0.1, max_matvecs=4), r"max_matvecs=4 is below min_probes=16"),
        (lambda A: hutchinson_trace(A, deflate=torch.ones(4, 2)), r"deflate must have shape \(5, q\)"),
        (lambda A: hutchinson_trace(A, deflate="top"), r"deflate must be an \(n, q\) tensor or an EigenResult"),
        (lambda A: hutchpp_trace(A, num_matvecs=9, deflate=torch.eye(5)[:, :1]), r"deflate= needs the adaptive"),
        (lambda A: hutchpp_trace(A, sketch_size=-1), r"sketch_size must be >= 0"),
        (lambda A: hutchinson_trace(A, num_matvecs=3, deflate=torch.eye(5)[:, :2]), r"num_matvecs must be >= 2"),
    ],
)
def test_adaptive_errors(call, match):
    with pytest.raises(SharpscopeError, match=match):
        call(torch.eye(5, dtype=torch.float64))

"""lanczos_eigs against closed forms (diagonal matrices) and against eigvalsh of the dense Hessian."""

import pytest
import torch
from hessian_cases import CASES, allclose_report, build

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import HessianOperator, lanczos_eigs
from sharpscope.hessian.reference import dense_hessian

# Eigenvalue errors are compared relative to the spectral norm |lambda|_max: near-zero eigenvalues have no
# meaningful relative accuracy of their own. tol=1e-8 on the residual gives eigenvalue errors ~ 1e-16 / gap,
# comfortably inside 1e-6.
RTOL = 1e-6


def _expected(eigenvalues_ascending: torch.Tensor, k: int, which: str) -> torch.Tensor:
    top = eigenvalues_ascending.flip(0)[:k]
    bottom = eigenvalues_ascending[:k]
    return {"top": top, "bottom": bottom, "both": torch.cat([top, bottom.flip(0)])}[which]


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_diagonal_matrix_with_known_eigenvalues(which):
    """diag(d) has eigenvalues d and eigenvectors e_i (up to sign); the spectrum includes negatives."""
    d = torch.cat([torch.tensor([9.0, 7.5, 7.0, -3.0, -2.5]), torch.linspace(-1.0, 5.0, 195)]).double()
    result = lanczos_eigs(torch.diag(d), 3, which=which, tol=1e-10, seed=1)
    expected = _expected(torch.sort(d).values, 3, which)
    assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-9 * 9), allclose_report(
        result.eigenvalues, expected, rtol=0, atol=1e-9 * 9)
    assert result.all_converged and bool((result.relative_residuals <= 1e-10).all())
    # Eigenvectors: x_i = +-e_{j} for the matching diagonal entry.
    for i, value in enumerate(result.eigenvalues):
        j = int((d - value).abs().argmin())
        assert abs(abs(float(result.eigenvectors[j, i])) - 1) < 1e-8
    assert torch.allclose(result.eigenvectors.T @ result.eigenvectors, torch.eye(result.eigenvalues.numel(),
                          dtype=torch.float64), atol=1e-10)


def test_small_matrix_whole_space_is_exact():
    """When n <= krylov_dim the Krylov space is everything: all eigenvalues are exact."""
    A = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    A = A + A.T
    result = lanczos_eigs(A, 3, which="both", tol=1e-12)
    expected = _expected(torch.linalg.eigvalsh(A), 3, "both")
    assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-12 * expected.abs().max())


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_model_hessian_matches_eigvalsh(problem, which):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches))
    result = lanczos_eigs(H, 4, which=which, tol=1e-8)
    expected = _expected(exact.cpu(), 4, which)
    # each eigenvalue to RTOL of itself (the "1e-6 relative"); the 1e-12-of-the-scale floor only keeps an
    # eigenvalue that happens to sit near 0 from demanding more than float64 rounding of the products
    atol = 1e-12 * exact.abs().max().item()
    assert torch.allclose(result.eigenvalues, expected, rtol=RTOL, atol=atol), allclose_report(
        result.eigenvalues, expected, rtol=RTOL, atol=atol)
    assert result.all_converged
    assert result.num_matvecs == H.num_matvecs
    assert result.eigenvectors.shape == (H.num_params, result.eigenvalues.numel())
    assert result.eigenvectors.device.type == torch.device(problem.device).type
    # Reported residuals are the true ones: check ||H x - lambda x|| directly (to rounding and 1e-10 of the scale).
    X = result.eigenvectors
    true_residuals = (H @ X - X * result.eigenvalues.to(X.device)).norm(dim=0).cpu()
    assert torch.allclose(true_residuals, result.residuals, rtol=0, atol=1e-10 * result.scale)


def test_top_eigenvalues_of_float32_model_to_float32_accuracy():
    """A float32 model: the basis is float64 but the products carry ~1e-7 relative noise."""
    problem = build(CASES[0])
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches))
    model = problem.model.float()
    H = HessianOperator(model, problem.loss_fn, [(x.float(), y) for x, y in problem.batches])
    result = lanczos_eigs(H, 3, tol=1e-5)
    assert result.all_converged
    # float32 data and weights perturb the Hessian itself by ~1e-6 relative; 1e-4 leaves a margin.
    assert torch.allclose(result.eigenvalues, exact.flip(0)[:3], rtol=1e-4, atol=0)


def test_warm_start_from_previous_eigenvectors_saves_products():
    """A nearby operator (the next checkpoint) converges faster from the previous top eigenvectors."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    d = torch.cat([torch.tensor([10.0, 8.0, 6.5, 5.8, 5.0]), torch.rand(295, generator=g, dtype=torch.float64) * 4])
    A = Q @ torch.diag(d) @ Q.T
    E = torch.randn(300, 300, generator=g, dtype=torch.float64)
    B = A + 1e-3 * (E + E.T)  # the "next checkpoint"
    previous = lanczos_eigs(A, 5, tol=1e-8)
    cold = lanczos_eigs(B, 5, tol=1e-8)
    warm = lanczos_eigs(B, 5, tol=1e-8, v0=previous.eigenvectors)
    assert torch.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-10, atol=0)
    assert warm.num_matvecs < cold.num_matvecs, (warm.num_matvecs, cold.num_matvecs)


def test_budget_exhaustion_reports_unconverged():
    d = torch.linspace(0, 1, 400).double()  # evenly spaced: slow convergence
    result = lanczos_eigs(torch.diag(d), 2, tol=1e-12, max_matvecs=8)
    assert result.num_matvecs == 8
    assert not result.all_converged
    assert bool((result.converged == (result.residuals <= 1e-12 * result.scale)).all())


def test_restarts_with_a_small_krylov_space():
    d = torch.linspace(-2, 3, 300).double()
    result = lanczos_eigs(torch.diag(d), 2, which="both", tol=1e-8, krylov_dim=10, max_matvecs=5000)
    assert result.num_restarts > 0 and result.all_converged
    expected = torch.tensor([3.0, d[-2], d[1], -2.0], dtype=torch.float64)
    assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-7)


def test_same_seed_same_result_and_generic_operator():
    """Anything with .shape and @ on (n, k) tensors is an operator; results are reproducible per seed."""

    class Scaled:
        def __init__(self, A):
            self.A, self.shape = A, A.shape

        def __matmul__(self, V):
            return 2 * (self.A @ V)

    A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    first, second = lanczos_eigs(Scaled(A), 2, seed=4), lanczos_eigs(Scaled(A), 2, seed=4)
    assert torch.equal(first.eigenvalues, second.eigenvalues) and first.num_matvecs == second.num_matvecs
    assert torch.allclose(first.eigenvalues, torch.tensor([100.0, 98.0], dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize(
    ("k", "which", "expected"),
    [(3, "top", [4.0, 0.0, 0.0]), (4, "top", [4.0, 0.0, 0.0, 0.0]), (2, "bottom", [-1.0, 0.0]),
     (2, "both", [4.0, 0.0, 0.0, -1.0])],
)
def test_breakdown_on_low_rank_matrix_finds_repeated_eigenvalues(k, which, expected):
    """diag(4, -1, 0, ..., 0): the Krylov space of any start is invariant after 3 steps and holds one copy of 0;
    the wanted set needs more copies, which only fresh blocks in the complement can supply."""
    d = torch.zeros(50, dtype=torch.float64)
    d[0], d[1] = 4.0, -1.0
    result = lanczos_eigs(torch.diag(d), k, which=which, tol=1e-10)
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(result.eigenvalues, expected, atol=1e-10), allclose_report(
        result.eigenvalues, expected, rtol=0, atol=1e-10)
    assert result.all_converged and result.num_matvecs < 20


@pytest.mark.parametrize("which", ["top", "bottom"])
def test_eigenvalue_criterion_meets_its_tolerance_with_fewer_products(problem, which):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches)).cpu()
    expected = _expected(exact, 3, which)
    for seed in range(4):
        by_value = lanczos_eigs(H, 3, which=which, tol=1e-5, criterion="eigenvalue", seed=seed)
        by_residual = lanczos_eigs(H, 3, which=which, tol=1e-5, seed=seed)
        # the promise: relative eigenvalue error <= tol (the estimate residual^2 / gap is what it stops on)
        error = ((by_value.eigenvalues - expected).abs() / expected.abs()).max().item()
        assert error <= 1e-5, (seed, error)
        assert by_value.all_converged and by_value.criterion == "eigenvalue"
        assert by_value.num_matvecs <= by_residual.num_matvecs, seed
    assert by_value.num_matvecs < by_residual.num_matvecs


@pytest.mark.parametrize(
    ("op", "kwargs", "match"),
    [
        (torch.eye(5), {"which": "largest"}, r"unknown which 'largest'"),
        (torch.eye(5), {"k": 0}, r"expected 1 <= k and k <= n = 5, got k = 0"),
        (torch.eye(5), {"k": 3, "which": "both"}, r"2k <= n = 5, got k = 3"),
        (torch.eye(5), {"tol": 0.0}, r"tol must be > 0"),
        (torch.eye(5), {"criterion": "ritz"}, r"unknown convergence criterion 'ritz'"),
        (torch.eye(50), {"k": 5, "krylov_dim": 4}, r"krylov_dim=4 is too small for 5 eigenpairs"),
        (torch.eye(5), {"max_matvecs": 0}, r"max_matvecs must be >= 1"),
        (torch.eye(5), {"v0": torch.ones(4)}, r"v0 must have shape \(5,\) or \(5, b\)"),
        (torch.eye(5), {"v0": torch.zeros(5)}, r"v0 must be finite and nonzero"),
        (torch.ones(3, 4), {}, r"expected a square \(n, n\) matrix"),
        (torch.triu(torch.ones(4, 4)), {}, r"expected a symmetric matrix"),
        (torch.eye(4, dtype=torch.long), {}, r"expected a floating-point matrix"),
        ("not an operator", {}, r"expected a symmetric operator"),
    ],
)
def test_errors(op, kwargs, match):
    with pytest.raises(SharpscopeError, match=match):
        lanczos_eigs(op, **kwargs)


def test_operator_returning_wrong_shape_is_refused():
    class Broken:
        shape = (4, 4)

        def __matmul__(self, V):
            return V[:2]

    with pytest.raises(SharpscopeError, match=r"returned shape \(2, 1\) for an input of shape \(4, 1\)"):
        lanczos_eigs(Broken(), 1)
    with pytest.raises(SharpscopeError, match=r"expected a square operator of shape \(n, n\), got shape \(4, 3\)"):
        lanczos_eigs(type("Rect", (), {"shape": (4, 3), "__matmul__": lambda self, v: v})(), 1)

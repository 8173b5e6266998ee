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


# --- Honest convergence flags ------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Small dense products are fastest on one thread (and the sweep below runs thousands of them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clustered_case(seed: int, n: int = 120, k: int = 5):
    """Q diag(lam) Q^T with k + 2 outliers in near-degenerate pairs (split 1e-9 .. 1e-6 absolute, below what a
    single Krylov space resolves) above a bulk in [-1, 4], and a start vector with no component along one wanted
    eigenvector (``_start_vector``'s 1% random part leaves a tiny one): single-vector Lanczos then returns the
    (k+1)-th eigenvalue in its place, e.g. 4.6 for a missed 6.7."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    top = torch.tensor([10.0, 8.0, 6.5, 5.5, 5.0, 4.6, 4.4], dtype=torch.float64)[: k + 2]
    top = top + torch.rand(k + 2, generator=g, dtype=torch.float64) * 0.3
    split = 10.0 ** (-9 + 3 * torch.rand(k + 2, generator=g, dtype=torch.float64))
    top[1::2] = top[0::2][: top[1::2].numel()] - split[1::2]
    lam = torch.cat([top, torch.rand(n - k - 2, generator=g, dtype=torch.float64) * 5 - 1])
    missing = torch.argsort(lam, descending=True)[int(torch.randint(0, k, (1,), generator=g))]
    v0 = torch.randn(n, generator=g, dtype=torch.float64)
    v0 = v0 - Q[:, missing] * (Q[:, missing] @ v0)
    return Q @ torch.diag(lam) @ Q.T, torch.sort(lam).values, v0


@pytest.mark.parametrize(
    ("which", "criterion", "tol", "seeds"),
    [("top", "residual", 1e-4, 200), ("top", "eigenvalue", 1e-6, 30),  # ~3 s and ~2 s on one thread
     pytest.param("bottom", "residual", 1e-4, 200, marks=pytest.mark.slow),
     pytest.param("top", "eigenvalue", 1e-6, 200, marks=pytest.mark.slow),
     pytest.param("bottom", "eigenvalue", 1e-6, 200, marks=pytest.mark.slow)],
)
def test_no_false_convergence_on_clustered_spectra_with_a_missing_start_component(one_thread, which, criterion, tol,
                                                                                   seeds):
    """Before the check run, 84 of these 200 seeds (residual, tol 1e-4; 48 with the eigenvalue test at 1e-6)
    flagged all pairs converged with a wanted eigenvalue missing (errors ~0.2 relative). "bottom" negates the matrix.

    The flags promise each eigenvalue to ``tol * scale`` (residual test: |theta - lambda| <= residual for the
    matched eigenvalue) or to ``tol * |lambda|`` (eigenvalue test; its ``residual^2 / gap`` is an estimate, hence
    the factor 10)."""
    false_converged, products = [], []
    for seed in range(seeds):
        A, eigenvalues, v0 = _clustered_case(seed)
        if which == "bottom":
            A, eigenvalues = -A, -eigenvalues.flip(0)
        result = lanczos_eigs(A, 5, which=which, tol=tol, criterion=criterion, v0=v0, seed=seed)
        expected = _expected(eigenvalues, 5, which)
        error = (result.eigenvalues - expected).abs()
        bound = tol * eigenvalues.abs().max() if criterion == "residual" else 10 * tol * expected.abs()
        products.append(result.num_matvecs)
        if result.all_converged and bool((error > bound).any()):
            false_converged.append((seed, result.eigenvalues.tolist(), expected.tolist()))
    assert not false_converged, f"{len(false_converged)} false 'converged', first: {false_converged[:2]}"
    # Cost, measured: residual 43 products on average (27 before the check, which was wrong in 84 of 200 seeds; 38
    # with a fixed 6-step check, which missed 3 of 200 on a real Hessian, see below); eigenvalue 114 (35 before,
    # wrong in 48): with both near-degenerate partners found, the gap in its residual^2 / gap estimate is the
    # 1e-9 .. 1e-6 split, so it asks for far smaller residuals.
    assert sum(products) / seeds < (48 if criterion == "residual" else 130), sum(products) / seeds


def test_check_run_merges_a_missed_eigenvalue():
    """The missed eigenvalue 6.7 (start component ~1e-4) is found by the check run and the run continues."""
    A, eigenvalues, v0 = _clustered_case(11)
    result = lanczos_eigs(A, 5, tol=1e-8, v0=v0, seed=11)
    expected = eigenvalues.flip(0)[:5]
    assert result.all_converged
    assert torch.allclose(result.eigenvalues, expected, rtol=0, atol=1e-7), allclose_report(
        result.eigenvalues, expected, rtol=0, atol=1e-7)


def test_budget_spent_inside_the_check_run_flags_nothing_converged():
    """Every pair meets tol after ~20 products; the check run needs 6 more, which the budget denies."""
    A, _, _ = _clustered_case(0)
    full = lanczos_eigs(A, 2, tol=1e-4, seed=0)
    assert full.all_converged
    cut = lanczos_eigs(A, 2, tol=1e-4, seed=0, max_matvecs=full.num_matvecs - 2)
    assert bool((cut.relative_residuals <= 1e-4).all()) and not bool(cut.converged.any())


def test_hessian_path_does_not_import_scipy():
    """scipy.sparse.linalg costs ~0.85 s to import; the operator check must not import it for torch operators."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from sharpscope.hessian import HessianOperator, lanczos_eigs\n"
        "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()\n"
        "x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))\n"
        "lanczos_eigs(HessianOperator(model, nn.CrossEntropyLoss(), [(x, y)]), 2)\n"
        "print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]", output


def test_scipy_and_numpy_operators_still_work():
    import numpy as np
    from scipy.sparse.linalg import aslinearoperator

    d = np.arange(1.0, 41.0)
    for op in (np.diag(d), aslinearoperator(np.diag(d))):
        result = lanczos_eigs(op, 2, tol=1e-10)
        assert torch.allclose(result.eigenvalues, torch.tensor([40.0, 39.0], dtype=torch.float64), atol=1e-8)


def test_a_basis_that_cannot_fit_is_refused_in_one_line_before_allocating():
    class Huge:
        """A billion-parameter operator: only its shape is ever read, since the run is refused first."""

        shape = (10**9, 10**9)

        def __matmul__(self, V):
            raise AssertionError("no product may be taken")

    with pytest.raises(SharpscopeError, match=r"needs about \d+\.\d GiB of float64 vectors .* only .* GiB are free") as info:
        lanczos_eigs(Huge(), k=5)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def layernorm_mlp_hessian():
    """The issue's model, a 1,088-parameter Linear(64, 14) -> LayerNorm -> tanh -> Linear(14, 10) MLP at its seeded
    initialisation, float64, on the first 300 digits (pixels / 16; all 1,797 take ~20 s to differentiate):
    cross-entropy over one full batch, dense Hessian (~4 s)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images[:300] / 16.0), torch.tensor(labels[:300])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 14), torch.nn.LayerNorm(14), torch.nn.Tanh(),
                                torch.nn.Linear(14, 10)).double()
    assert sum(p.numel() for p in model.parameters()) == 1088
    return dense_hessian(model, torch.nn.CrossEntropyLoss(), [(x, y)])


def test_real_hessian_seeds_that_a_six_step_check_flagged_falsely(one_thread, layernorm_mlp_hessian):
    """Bottom-5 at tol 1e-4 with the eigenvalue test. A fixed 6-step check flagged seeds 137 and 139 of 200 converged
    with the 6th eigenvalue in 5th place (on all 1,797 digits: seeds 93, 110, 169, with -2.7584 for -2.9006, a gap
    of 1% of the spectrum's width, where ``_check_steps`` asks for 11 steps and the cap allows 10). The sweep of 200 seeds with the
    current check finds none (top and bottom, residual and eigenvalue test).
    Each returned value must be within 10 * tol of the truth, relative (the eigenvalue test's promise, with the
    factor 10 for its estimate)."""
    H = layernorm_mlp_hessian
    expected = _expected(torch.linalg.eigvalsh(H), 5, "bottom")
    for seed in (137, 139):
        result = lanczos_eigs(H, 5, which="bottom", tol=1e-4, criterion="eigenvalue", seed=seed)
        assert result.all_converged, seed
        assert torch.allclose(result.eigenvalues, expected, rtol=1e-3, atol=0), (seed, allclose_report(
            result.eigenvalues, expected, rtol=1e-3, atol=0))

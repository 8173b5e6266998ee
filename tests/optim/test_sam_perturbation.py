"""perturbation(): the SAM/ASAM ascent step against its closed form (DESIGN.md s.4), in float64."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from optim_cases import DT, eps_formula

from sharpscope.errors import SharpscopeError
from sharpscope.optim import perturbation

# float64 arithmetic on a handful of numbers: agreement to ~1e-15 relative; 1e-12 leaves room for the different
# (stabilised) evaluation order while still catching any wrong exponent, norm or scale.
RTOL, ATOL = 1e-12, 1e-14

P_VALUES = [2.0, math.inf, 3.0, 1.5, 1.25, 6.0]


def _split(x: np.ndarray) -> list[torch.Tensor]:
    """Two tensors of shapes (2, 2) and (3,): the norm must be joint over both."""
    t = torch.tensor(x, dtype=DT)
    return [t[:4].reshape(2, 2).clone(), t[4:].clone()]


def _cat(ts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.flatten() for t in ts]).numpy()


@pytest.fixture
def gw():
    rng = np.random.default_rng(3)
    return rng.standard_normal(7), rng.standard_normal(7)


@pytest.mark.parametrize("p", P_VALUES, ids=lambda p: f"p={p}")
def test_sam_matches_closed_form(gw, p):
    g, w = gw
    eps = perturbation(_split(g), _split(w), rho=0.07, p=p, adaptive=False)
    np.testing.assert_allclose(_cat(eps), eps_formula(g, rho=0.07, p=p), rtol=RTOL, atol=ATOL)
    # and it lies on the sphere of radius rho in the p-norm (over both tensors jointly)
    assert np.linalg.norm(_cat(eps), ord=p) == pytest.approx(0.07, rel=1e-12)


def test_p2_and_pinf_special_forms(gw):
    g, w = gw
    np.testing.assert_allclose(_cat(perturbation(_split(g), _split(w), rho=0.1, p=2)), 0.1 * g / np.linalg.norm(g),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(_cat(perturbation(_split(g), _split(w), rho=0.1, p=math.inf)), 0.1 * np.sign(g))


def test_asam_p2_matches_kwon_formula(gw):
    g, w = gw
    eta = 0.01
    T = np.abs(w) + eta
    expected = 0.5 * T**2 * g / np.linalg.norm(T * g)  # Kwon et al. 2021's ASAM perturbation
    eps = perturbation(_split(g), _split(w), rho=0.5, p=2, adaptive=True, eta=eta)
    np.testing.assert_allclose(_cat(eps), expected, rtol=RTOL, atol=ATOL)
    # the ball is measured in T^-1 coordinates
    assert np.linalg.norm(_cat(eps) / T) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("p", P_VALUES, ids=lambda p: f"p={p}")
def test_asam_general_p_matches_substitution(gw, p):
    g, w = gw
    T = np.abs(w) + 0.05
    eps = perturbation(_split(g), _split(w), rho=0.3, p=p, adaptive=True, eta=0.05)
    np.testing.assert_allclose(_cat(eps), eps_formula(g, rho=0.3, p=p, T=T), rtol=RTOL, atol=ATOL)
    assert np.linalg.norm(_cat(eps) / T, ord=p) == pytest.approx(0.3, rel=1e-12)


def test_p1_puts_mass_on_the_largest_entries():
    # q = inf limit: all of rho on argmax |g|, split evenly between exact ties (here two entries of magnitude 3)
    g = np.array([0.5, -3.0, 1.0, 3.0, 0.0, -2.0, 0.1])
    eps = _cat(perturbation(_split(g), _split(np.zeros(7)), rho=0.2, p=1))
    np.testing.assert_array_equal(eps, [0, -0.1, 0, 0.1, 0, 0, 0])


def test_p_close_to_one_approaches_the_p1_limit(gw):
    g, w = gw
    near = _cat(perturbation(_split(g), _split(w), rho=0.2, p=1.001))
    limit = _cat(perturbation(_split(g), _split(w), rho=0.2, p=1))
    np.testing.assert_allclose(near, limit, atol=1e-6)  # q = 1001: the runner-up gets (|g_2|/|g_1|)^1000 ~ 0


@pytest.mark.parametrize("p", [2.0, math.inf, 3.0, 1.0, 1.01], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_float32_extreme_gradients_do_not_overflow(p, magnitude):
    # eps is homogeneous of degree 0 in g; a naive fp32 ||g||_2 overflows above 1e19 and underflows below 1e-19.
    torch.manual_seed(0)
    g = [torch.randn(3, 4), torch.randn(5)]
    w = [torch.randn(3, 4), torch.randn(5)]
    ref = perturbation(g, w, rho=0.1, p=p)
    got = perturbation([t * magnitude for t in g], w, rho=0.1, p=p)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # fp32 rounding of the scaled inputs


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_plain_norm_on_the_cpu_agrees_with_the_rescaled_formula(adaptive, monkeypatch):
    # p = 2 on the CPU divides by the plain joint norm where it is safe; scaled by 2^-500 (exact in float64) the
    # norm falls under sqrt(tiny) / eps and the rescaled formula runs: the same eps to float64 rounding
    g = [torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(1)), torch.randn(5, dtype=DT)]
    w = [torch.randn(3, 4, dtype=DT), torch.randn(5, dtype=DT)]
    orders = []
    module = importlib.import_module("sharpscope.optim.perturbation")  # the package exports the function by this name
    real_norm = module._global_norm
    monkeypatch.setattr(module, "_global_norm", lambda ts, order: orders.append(order) or real_norm(ts, order))
    plain = perturbation(g, w, rho=0.1, adaptive=adaptive)
    assert orders == [2.0]  # the plain norm only
    rescaled = perturbation([t * 2.0**-500 for t in g], w, rho=0.1, adaptive=adaptive)
    assert orders[1:] == [2.0, math.inf, 2.0]  # unsafe: the rescaled formula
    for a, b in zip(plain, rescaled):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("p", [2.0, math.inf, 3.0, 1.0], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_not_nan(p, adaptive):
    w = [torch.randn(2, 3, dtype=DT), torch.zeros(4, dtype=DT)]
    eps = perturbation([torch.zeros_like(t) for t in w], w, rho=0.05, p=p, adaptive=adaptive)
    for e in eps:
        assert torch.equal(e, torch.zeros_like(e))


def test_none_gradient_is_left_out_of_the_norm():
    g = torch.tensor([3.0, 4.0], dtype=DT)
    w = [torch.zeros(2, dtype=DT), torch.ones(5, dtype=DT)]
    eps = perturbation([g, None], w, rho=1.0, p=2)
    torch.testing.assert_close(eps[0], g / 5, rtol=RTOL, atol=ATOL)
    assert torch.equal(eps[1], torch.zeros(5, dtype=DT))


def test_rho_zero_gives_zeros(gw):
    g, w = gw
    assert not _cat(perturbation(_split(g), _split(w), rho=0.0)).any()


def test_inputs_are_not_modified(gw):
    g, w = gw
    gs, ws = _split(g), _split(w)
    before = [t.clone() for t in gs + ws]
    perturbation(gs, ws, rho=0.1, p=3, adaptive=True)
    for a, b in zip(gs + ws, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -0.1}, r"rho must be >= 0, got -0.1"),
        ({"rho": math.nan}, r"rho must be >= 0, got nan"),
        ({"rho": 0.1, "p": 0.5}, r"p must be >= 1 .*got 0.5"),
        ({"rho": 0.1, "p": True}, r"p must be >= 1 .*got True"),
        ({"rho": 0.1, "eta": -1.0}, r"eta must be a finite number >= 0, got -1.0"),
        ({"rho": 0.1, "adaptive": "False"}, r"adaptive must be True or False, got 'False'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    w = [torch.ones(2, dtype=DT)]
    with pytest.raises(SharpscopeError, match=match):
        perturbation(w, w, **kwargs)


def test_mismatched_lengths_raise():
    w = [torch.ones(2, dtype=DT)]
    with pytest.raises(SharpscopeError, match=r"pair up one to one, got 2 gradients for 1 tensors"):
        perturbation(w + w, w, rho=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_stacked_rows_equal_the_per_row_perturbation(dtype, p, adaptive, magnitude):
    # m-SAM's G rows at once (float32/16 at p = 2: a float64 norm in one pass) against joint_perturbation per row:
    # the same formula in another summation order, so equal to a few ulps of the dtype (bf16 extremes: 1e30 is
    # inside its range, like float32's)
    from sharpscope.optim.perturbation import joint_perturbation, stacked_joint_perturbation

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)]
    grads = [(magnitude * torch.randn(6, *w.shape, generator=g, dtype=torch.float64)).to(dtype) for w in params]
    grads[1][2] = 0  # one row with a zero part; row 4 all zero: eps 0, never NaN
    grads[0][4] = 0
    grads[1][4] = 0
    settings = dict(rhos=[0.05, 0.1], p=p, adaptive=[adaptive, False], etas=[0.01, 0.01])
    stacked = stacked_joint_perturbation(grads, params, **settings)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    for row in range(6):
        expected = joint_perturbation([t[row] for t in grads], params, **settings)
        for a, b in zip(stacked, expected):
            assert torch.isfinite(a[row]).all()
            torch.testing.assert_close(a[row].double(), b.double(), rtol=tol, atol=tol * 0.1)
    assert all(torch.equal(e[4], torch.zeros_like(e[4])) for e in stacked)

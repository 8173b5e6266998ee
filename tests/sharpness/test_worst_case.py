"""Worst-case sharpness and m-sharpness against closed forms (quadratics) and a serial autograd reference."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sharpness_cases import (
    gradient_at,
    loss_at,
    mean_loss,
    quadratic_case,
    tiny_bn_convnet,
    tiny_mlp,
    trust_region_max,
)
from sharpscope.errors import SharpscopeError
from sharpscope.sharpness import m_sharpness, worst_case_sharpness
from sharpscope.sharpness.worst_case import scaled_norm

CE = nn.CrossEntropyLoss()


def _report(found, expected):
    found = np.asarray(found, dtype=float)
    expected = np.broadcast_to(np.asarray(expected, dtype=float), found.shape)
    worst = int(np.argmax(np.abs(found - expected)))
    return f"worst index {worst}: found {found.flat[worst]!r}, expected {expected.flat[worst]!r}"


# ------------------------------------------------------------------------------------------ quadratic truths
def test_at_minimum_l2_sharpness_is_half_rho_squared_lambda_max():
    # Zero gradient everywhere on the set: ascent needs a random start, then converges to the top eigenvector
    # (eigengap 10 vs 5, linear rate); 50 steps reach float64 rounding, so rtol 1e-9.
    model, data, A = quadratic_case(at_minimum=True)
    rho = 0.1
    result = worst_case_sharpness(model, mean_loss, data, rho=rho, m=16, steps=50, random_init=True)
    expected = rho**2 * torch.linalg.eigvalsh(A)[-1].item() / 2
    assert result.num_chunks == 4
    np.testing.assert_allclose(result.chunk_values, expected, rtol=1e-9, err_msg=_report(result.chunk_values, expected))
    np.testing.assert_allclose(result.clean_loss, 0.0, atol=1e-30)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_away_from_minimum_matches_trust_region_solution(adaptive):
    # Full batch: max_{||d/c|| <= rho} g^T d + d^T A d / 2 is the trust-region problem in u = d / c with
    # gradient c*g and Hessian C A C. 60 ascent steps converge to float64 rounding on this conditioning.
    model, data, A = quadratic_case(seed=1)
    rho, eta = 0.1, 0.05
    w = model.w.detach()
    g = A @ (w - data[0].mean(0))
    c = (w.abs() + eta) if adaptive else torch.ones_like(w)
    expected = trust_region_max((c * g).numpy(), (c[:, None] * A * c[None, :]).numpy(), rho)
    result = worst_case_sharpness(model, mean_loss, data, rho=rho, steps=60, adaptive=adaptive, eta=eta,
                                  return_perturbation=True)
    np.testing.assert_allclose(result.value, expected, rtol=1e-9)
    scale = [w.abs() + eta] if adaptive else None
    assert scaled_norm(result.perturbation, scale, 2.0).item() <= rho * (1 + 1e-12)


def test_m_equal_to_set_size_is_full_batch_sharpness():
    model, data, A = quadratic_case(seed=2, n=40)
    rho = 0.05
    g = A @ (model.w.detach() - data[0].mean(0))
    full = worst_case_sharpness(model, mean_loss, data, rho=rho, m=40, steps=40)
    default = worst_case_sharpness(model, mean_loss, data, rho=rho, steps=40)  # m=None: the whole set
    assert full.num_chunks == default.num_chunks == 1 and full.m == 40
    np.testing.assert_allclose(full.value, trust_region_max(g.numpy(), A.numpy(), rho), rtol=1e-9)
    assert full.value == default.value
    assert math.isnan(full.stderr)


def test_m1_is_the_mean_of_per_sample_trust_region_values():
    # Each chunk is one sample: its own gradient A (w - x_i). Per-chunk values compared one to one (no shuffle).
    model, data, A = quadratic_case(seed=3, n=24)
    rho = 0.1
    w = model.w.detach()
    expected = [trust_region_max((A @ (w - xi)).numpy(), A.numpy(), rho) for xi in data[0]]
    result = worst_case_sharpness(model, mean_loss, data, rho=rho, m=1, steps=60, shuffle=False)
    np.testing.assert_allclose(result.chunk_values, expected, rtol=1e-8, err_msg=_report(result.chunk_values, expected))
    np.testing.assert_allclose(result.stderr, np.std(expected, ddof=1) / np.sqrt(24), rtol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_linf_ascent_stays_in_the_box_and_finds_the_best_vertex(adaptive):
    # A convex quadratic's max over a box sits at a vertex: enumerate all 2^6 vertices (ground truth). Every
    # iterate must be feasible (clamped), and on this case the ascent reaches the global vertex.
    model, data, A = quadratic_case(seed=4, spread=0.3)
    rho, eta = 0.02, 0.1
    w = model.w.detach()
    c = (w.abs() + eta) if adaptive else torch.ones_like(w)
    g = A @ (w - data[0].mean(0))
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=torch.float64) * rho * c
    brute = (vertices @ g + 0.5 * ((vertices @ A) * vertices).sum(1)).max().item()
    result = worst_case_sharpness(model, mean_loss, data, rho=rho, p=math.inf, adaptive=adaptive, eta=eta,
                                  steps=20, return_perturbation=True)
    delta = result.perturbation[0][0]
    assert torch.all(delta.abs() <= rho * c * (1 + 1e-12)), (delta / (rho * c)).tolist()
    np.testing.assert_allclose(result.value, brute, rtol=1e-12)


# ----------------------------------------------------------------------------------------------- the ascent
def test_one_step_is_sams_estimate_against_serial_autograd():
    # steps=1 evaluates L_B(w + rho g/||g||) (p=2) or L_B(w + rho sign(g)) (p=inf), times c if adaptive;
    # the reference computes that per chunk with plain autograd on a model copy. float64: rtol 1e-10.
    model, data = tiny_mlp(n=24)
    x, y = data
    rho, eta, m = 0.2, 0.01, 6
    for p, adaptive in itertools.product([2.0, math.inf], [False, True]):
        result = worst_case_sharpness(model, CE, data, rho=rho, m=m, p=p, adaptive=adaptive, eta=eta, steps=1,
                                      shuffle=False)
        expected = []
        for j in range(4):
            xb, yb = x[j * m:(j + 1) * m], y[j * m:(j + 1) * m]
            grads = gradient_at(model, CE, xb, yb)
            c = [q.detach().abs() + eta if adaptive else torch.ones_like(q) for q in model.parameters()]
            if p == 2.0:
                norm = torch.sqrt(sum(((ci * gi) ** 2).sum() for ci, gi in zip(c, grads)))
                delta = [rho * ci**2 * gi / norm for ci, gi in zip(c, grads)]
            else:
                delta = [rho * ci * gi.sign() for ci, gi in zip(c, grads)]
            gain = loss_at(model, CE, xb, yb, delta) - loss_at(model, CE, xb, yb)
            expected.append(max(gain, 0.0))
        np.testing.assert_allclose(result.chunk_values, expected, rtol=1e-10, atol=1e-14,
                                   err_msg=f"p={p} adaptive={adaptive}: {_report(result.chunk_values, expected)}")


def test_best_value_never_decreases_with_more_steps():
    # The step-size checkpoints are fixed in absolute steps, so a k-step run is a prefix of a 12-step run:
    # its value equals trace[k] exactly, and the trace is non-decreasing (best-so-far).
    model, data = tiny_mlp(n=32)
    long = worst_case_sharpness(model, CE, data, rho=0.5, m=8, steps=12)
    assert np.all(np.diff(long.trace) >= 0), long.trace
    assert long.trace[0] == 0.0 and long.trace[-1] == long.value
    assert long.trace[-1] > long.trace[1]  # more steps found more than SAM's one-step estimate here
    for k in (1, 3, 4, 5, 8):
        short = worst_case_sharpness(model, CE, data, rho=0.5, m=8, steps=k)
        np.testing.assert_allclose(short.value, long.trace[k], rtol=1e-12)


@pytest.mark.parametrize("case", [tiny_mlp, tiny_bn_convnet], ids=["mlp", "bn-convnet"])
def test_vectorized_chunks_match_the_serial_loop(case):
    # vmap over chunks vs one chunk at a time: same arithmetic up to float64 summation order.
    model, data = case()
    kwargs = dict(rho=0.3, m=3, steps=5, p=2.0, adaptive=True, max_chunks=5)
    fast = worst_case_sharpness(model, CE, data, vectorize=True, **kwargs)
    slow = worst_case_sharpness(model, CE, data, vectorize=False, **kwargs)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-10, atol=1e-14)
    assert fast.num_chunks == 5


class _ItemModel(nn.Module):
    """Python control flow on a tensor value: vmap cannot batch this forward. Its weights are used directly
    (no nn.Linear), so the structured path does not apply either and auto mode tries vmap."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))

    def forward(self, x):
        out = x @ self.weight.T
        return out if out.sum().item() > -1e9 else -out


class _ItemLinear(nn.Module):
    """The same control flow around an nn.Linear: the structured path batches it (no vmap involved)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3).double()

    def forward(self, x):
        out = self.linear(x)
        return out if out.sum().item() > -1e9 else -out


def test_unbatchable_model_falls_back_to_the_loop_with_a_warning():
    _, data = tiny_mlp(n=12)
    model = _ItemModel()
    with pytest.warns(RuntimeWarning, match="vmap cannot batch this model's forward"):
        auto = worst_case_sharpness(model, CE, data, rho=0.2, m=3, steps=2)
    loop = worst_case_sharpness(model, CE, data, rho=0.2, m=3, steps=2, vectorize=False)
    np.testing.assert_allclose(auto.chunk_values, loop.chunk_values, rtol=1e-12)


def test_structured_path_batches_what_vmap_cannot():
    _, data = tiny_mlp(n=12)
    model = _ItemLinear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = worst_case_sharpness(model, CE, data, rho=0.2, m=3, steps=2)
    loop = worst_case_sharpness(model, CE, data, rho=0.2, m=3, steps=2, vectorize=False)
    np.testing.assert_allclose(auto.chunk_values, loop.chunk_values, rtol=1e-12)


def test_quadratic_truth_on_every_device(device):
    # The same trust-region ground truth with the model and data on each available device (CUDA on GPU boxes).
    model, (x, y), A = quadratic_case(seed=5)
    g = A @ (model.w.detach() - x.mean(0))
    expected = trust_region_max(g.numpy(), A.numpy(), 0.1)
    result = worst_case_sharpness(model.to(device), mean_loss, (x.to(device), y.to(device)), rho=0.1, steps=60)
    np.testing.assert_allclose(result.value, expected, rtol=1e-9)


def test_chunks_larger_than_batch_size_are_split_without_changing_the_result():
    model, data = tiny_mlp(n=40)
    whole = worst_case_sharpness(model, CE, data, rho=0.3, m=20, steps=4, batch_size=256)
    pieces = worst_case_sharpness(model, CE, data, rho=0.3, m=20, steps=4, batch_size=7)
    np.testing.assert_allclose(pieces.chunk_values, whole.chunk_values, rtol=1e-10)


def test_shuffle_is_a_seeded_permutation_of_the_samples():
    model, data = tiny_mlp(n=24)
    x, y = data
    order = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    shuffled = worst_case_sharpness(model, CE, data, rho=0.3, m=4, steps=2, seed=5)
    permuted = worst_case_sharpness(model, CE, (x[order], y[order]), rho=0.3, m=4, steps=2, shuffle=False)
    np.testing.assert_allclose(shuffled.chunk_values, permuted.chunk_values, rtol=1e-12)
    other = worst_case_sharpness(model, CE, data, rho=0.3, m=4, steps=2, seed=6)
    assert not np.allclose(other.chunk_values, shuffled.chunk_values)


def test_batches_input_mode_restored_weights_untouched_and_params_subset():
    model, (x, y) = tiny_bn_convnet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    from_batches = worst_case_sharpness(model, CE, batches, rho=0.2, m=4, steps=3)
    from_tensors = worst_case_sharpness(model, CE, (x, y), rho=0.2, m=4, steps=3)
    assert from_batches.value == from_tensors.value
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running statistics untouched: evaluated in eval mode
    last_layer = worst_case_sharpness(model, CE, (x, y), rho=0.2, m=4, steps=3, params=["4.weight", "4.bias"],
                                      return_perturbation=True)
    assert [tuple(t.shape) for t in last_layer.perturbation] == [(6, 3, 64), (6, 3)]
    assert last_layer.value < from_tensors.value


def test_random_starts_do_not_depend_on_the_grouping_of_chunks():
    # Each chunk's random start has its own seeded stream: batch_size (chunks per vmapped call) changes nothing.
    model, data = tiny_mlp(n=24)
    kwargs = dict(rho=0.3, m=2, steps=3, random_init=True, seed=2)
    grouped = worst_case_sharpness(model, CE, data, batch_size=256, **kwargs)
    single = worst_case_sharpness(model, CE, data, batch_size=2, **kwargs)
    np.testing.assert_allclose(grouped.chunk_values, single.chunk_values, rtol=1e-10)


def test_max_chunks_limits_the_chunks():
    model, data = tiny_mlp(n=48)
    result = worst_case_sharpness(model, CE, data, rho=0.1, m=2, steps=1, max_chunks=7)
    assert result.num_chunks == 7 and result.chunk_values.shape == (7,)
    ticks = []
    worst_case_sharpness(model, CE, data, rho=0.1, m=2, steps=1, max_chunks=7, on_progress=ticks.append)
    assert sum(ticks) == 7


# ------------------------------------------------------------------------------------------------- the grid
def test_m_sharpness_grid_cells_equal_single_calls():
    model, data = tiny_mlp(n=32)
    grid = m_sharpness(model, CE, data, m_values=[1, 8, 32], rho_values=[0.05, 0.2], steps=3)
    assert grid.values.shape == grid.stderr.shape == (3, 2)
    assert grid.num_chunks.tolist() == [32, 4, 1] and grid.num_samples == 32
    for (i, m), (j, rho) in itertools.product(enumerate([1, 8, 32]), enumerate([0.05, 0.2])):
        single = worst_case_sharpness(model, CE, data, rho=rho, m=m, steps=3)
        np.testing.assert_allclose(grid.values[i, j], single.value, rtol=1e-12)
    assert np.all(grid.values[:, 1] > grid.values[:, 0])  # a larger ball gives a larger max
    assert grid.to_dict()["values"] == grid.values.tolist()


def test_m_sharpness_average_measure():
    model, data = tiny_mlp(n=16)
    grid = m_sharpness(model, CE, data, m_values=[4], rho_values=[0.1], measure="average", num_draws=3)
    assert grid.measure == "average" and grid.steps == 3 and grid.estimates[0].measure == "average"


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(m=100), r"m=100 is larger than the evaluation set \(48 samples\)"),
        (dict(m=0), "m must be a positive integer"),
        (dict(p=3), "p must be 2 or inf"),
        (dict(rho=0.0), "rho must be a positive finite number"),
        (dict(rho=float("nan")), "rho must be a positive finite number"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(adaptive=True, eta=-1.0), "eta must be a positive finite number"),
        (dict(max_chunks=0), "max_chunks must be a positive integer or None"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    model, data = tiny_mlp()
    kwargs = {"rho": 0.1, **kwargs}
    with pytest.raises(SharpscopeError, match=message):
        worst_case_sharpness(model, CE, data, **kwargs)


def test_bad_data_and_losses_are_explained():
    model, (x, y) = tiny_mlp()
    with pytest.raises(SharpscopeError, match="data must be"):
        worst_case_sharpness(model, CE, 3, rho=0.1)
    with pytest.raises(SharpscopeError, match="data holds no samples"):
        worst_case_sharpness(model, CE, [], rho=0.1)
    with pytest.raises(SharpscopeError, match="48 inputs but 47 labels"):
        worst_case_sharpness(model, CE, (x, y[:-1]), rho=0.1)
    with pytest.raises(SharpscopeError, match="loss_fn must return a 0-d mean"):
        worst_case_sharpness(model, nn.CrossEntropyLoss(reduction="none"), (x, y), rho=0.1)
    with pytest.raises(SharpscopeError, match="unknown m-sharpness measure 'wrost'; did you mean 'worst'"):
        m_sharpness(model, CE, (x, y), measure="wrost")
    with pytest.raises(SharpscopeError, match="must each hold at least one value"):
        m_sharpness(model, CE, (x, y), m_values=[], rho_values=[0.1])


class _NoisyModel(nn.Module):
    """Randomness in the forward that eval mode does not switch off."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.linear(x) + torch.randn(x.shape[0], 3, dtype=x.dtype)


def test_nondeterministic_model_is_refused():
    _, data = tiny_mlp()
    with pytest.raises(SharpscopeError, match="the loss is not deterministic"):
        worst_case_sharpness(_NoisyModel(), CE, data, rho=0.1)

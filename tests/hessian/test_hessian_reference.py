"""The dense reference against closed forms: it is the truth everything else is tested against."""

import pytest
import torch
from hessian_cases import CASES, build
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.hessian.reference import dense_hessian, exact_eigenvalues


def test_linear_least_squares_hessian_is_two_xtx_over_n():
    """L(w, b) = mean((x w + b - y)^2) has the constant Hessian (2/N) [X 1]^T [X 1] (bias last in the layout)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 1).double()
    x1, x2 = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    y1, y2 = torch.randn(7, 1, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64)
    hessian = dense_hessian(model, nn.MSELoss(), [(x1, y1), (x2, y2)])
    design = torch.cat([torch.cat([x1, x2]), torch.ones(10, 1, dtype=torch.float64)], dim=1)
    expected = 2 * design.T @ design / 10
    # Exact up to float64 rounding of a handful of sums.
    assert torch.allclose(hessian, expected, rtol=1e-12, atol=1e-13)
    eigenvalues = exact_eigenvalues(model, nn.MSELoss(), [(x1, y1), (x2, y2)])
    assert torch.allclose(eigenvalues, torch.linalg.eigvalsh(expected), rtol=1e-12, atol=1e-13)
    assert bool((eigenvalues[1:] >= eigenvalues[:-1]).all()), "eigenvalues must be ascending"


def test_subset_and_symmetry():
    problem = build(CASES[1])
    full = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    assert torch.allclose(full, full.T, rtol=0, atol=1e-12 * full.abs().max())
    block = dense_hessian(problem.model, problem.loss_fn, problem.batches, params=["0.weight"])
    assert torch.allclose(block, full[:48, :48], rtol=1e-12, atol=1e-14)


def test_refuses_large_models_and_empty_batches():
    problem = build(CASES[0])
    with pytest.raises(SharpscopeError, match=r"92 parameters selected, more than max_params=50"):
        dense_hessian(problem.model, problem.loss_fn, problem.batches, max_params=50)
    with pytest.raises(SharpscopeError, match=r"batches is empty"):
        dense_hessian(problem.model, problem.loss_fn, [])

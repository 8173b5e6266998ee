"""Keskar et al.'s epsilon-sharpness against a brute-force search of the box in 2D."""

import math

import numpy as np
import pytest
import torch

from sharpness_cases import mean_loss, quadratic_case
from sharpscope.sharpness import keskar_sharpness


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_over_the_box_in_2d(seed):
    # Ground truth: the loss on a 401 x 401 grid spanning the box |z_i| <= eps (|w_i| + 1) exactly (its corners
    # included, where a convex quadratic attains the max), reported as 100 (max - L) / (1 + L). The ascent ends on
    # a corner, so the two agree to float64 rounding: rtol 1e-10.
    model, (x, y), A = quadratic_case(d=2, n=20, seed=seed, spread=0.5, eigenvalues=(4.0, 1.0))
    eps = 0.05
    w = model.w.detach()
    half = eps * (w.abs() + 1)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-h, h, 401, dtype=torch.float64) for h in half],
                                      indexing="ij"), -1).reshape(-1, 2)
    residual = (w + grid)[:, None, :] - x[None]  # (points, samples, 2)
    losses = 0.5 * ((residual @ A) * residual).sum(-1).mean(1)
    clean = float(0.5 * (((w - x) @ A) * (w - x)).sum(-1).mean())
    expected = 100 * (float(losses.max()) - clean) / (1 + clean)
    result = keskar_sharpness(model, mean_loss, (x, y), eps=eps, steps=10, return_perturbation=True)
    assert result.measure == "keskar" and result.m == 20 and result.rho == eps and result.p == math.inf
    np.testing.assert_allclose(result.clean_loss, clean, rtol=1e-12)
    np.testing.assert_allclose(result.value, expected, rtol=1e-10)
    assert torch.all(result.perturbation[0][0].abs() <= half * (1 + 1e-12))
    assert math.isnan(result.stderr) and np.all(np.diff(result.trace) >= 0)

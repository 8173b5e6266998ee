"""PAC-Bayes flatness on a toy whose expected accuracy drop is known in closed form."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import erf
from torch import nn

from sharpness_cases import tiny_mlp
from sharpscope.errors import SharpscopeError
from sharpscope.sharpness import pac_bayes_flatness

MARGINS = np.linspace(0.2, 2.0, 40)


class MarginModel(nn.Module):
    """One weight ``w`` (trained value ``center``); sample ``i`` (input ``a_i``) is right iff ``|w - center| < a_i``.

    Under ``w = center + u``, ``u ~ N(0, s^2)``, the expected accuracy is ``mean_i erf(a_i / (s sqrt 2))``:
    monotone in ``s``, 1 at ``s = 0``.
    """

    def __init__(self, center: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([center], dtype=torch.float64))
        self.center = center

    def forward(self, a):
        right = a - (self.w - self.center).abs()
        return torch.stack([right, torch.zeros_like(right)], -1)


def _true_std():
    """The noise std s* at which the expected accuracy drop is exactly 0.1."""
    drop = lambda s: 1 - np.mean(erf(MARGINS / (s * np.sqrt(2)))) - 0.1  # noqa: E731
    return brentq(drop, 1e-3, 10.0, xtol=1e-14)


DATA = (torch.tensor(MARGINS), torch.zeros(len(MARGINS), dtype=torch.long))


def test_plain_sigma_matches_the_closed_form():
    # 4000 noise draws: the Monte-Carlo drop has a standard error ~0.004 at the root, where d drop / d log s is
    # ~0.3, so log sigma is off by ~1.5% (1 sigma); rtol 5% plus the search's own rtol of 1%.
    result = pac_bayes_flatness(MarginModel(0.0), DATA, num_draws=4000, rtol=0.01)
    expected = _true_std()
    assert result.bracketed and result.clean_accuracy == 1.0
    np.testing.assert_allclose(result.sigma, expected, rtol=0.06)
    assert result.accuracy_drop <= 0.1
    np.testing.assert_allclose(result.measure, 1 / result.sigma**2)


def test_magnitude_aware_sigma_is_relative_to_the_weight():
    # Noise std sqrt(sigma^2 w^2 + eps^2) with w = 4: the same s* as above, so sigma = sqrt(s*^2 - eps^2) / 4.
    eps = 0.05
    result = pac_bayes_flatness(MarginModel(4.0), DATA, magnitude_aware=True, eps=eps, num_draws=4000)
    expected = math.sqrt(_true_std() ** 2 - eps**2) / 4
    np.testing.assert_allclose(result.sigma, expected, rtol=0.06)
    assert result.magnitude_aware and result.eps == eps


def test_same_draws_for_every_sigma_make_the_search_deterministic():
    model, (x, _) = tiny_mlp(n=64)
    with torch.no_grad():
        data = (x, model(x).argmax(-1))  # labels the model gets right: clean accuracy 1, drops reach 0.1
    first = pac_bayes_flatness(model, data, num_draws=4, seed=1)
    second = pac_bayes_flatness(model, data, num_draws=4, seed=1, vectorize=False, batch_size=16)
    np.testing.assert_allclose(first.sigma, second.sigma, rtol=1e-12)
    assert first.bracketed and first.clean_accuracy == 1.0 and first.accuracy_drop <= 0.1
    assert first.evaluations <= 60


def test_unbracketed_ends_are_returned_and_flagged():
    high_is_flat = pac_bayes_flatness(MarginModel(0.0), DATA, sigma_range=(1e-4, 1e-2), num_draws=50)
    assert not high_is_flat.bracketed and high_is_flat.sigma == 1e-2 and high_is_flat.evaluations == 1
    low_is_sharp = pac_bayes_flatness(MarginModel(0.0), DATA, sigma_range=(50.0, 100.0), num_draws=50)
    assert not low_is_sharp.bracketed and low_is_sharp.sigma == 50.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sigma_range=(1.0, 0.1)), r"sigma_range must be \(low, high\) with 0 < low < high"),
        (dict(sigma_range="wide"), "sigma_range must be"),
        (dict(num_draws=0), "num_draws must be an integer >= 1"),
        (dict(target_drop=0.0), "target_drop must be a positive finite number"),
        (dict(max_evaluations=1), "max_evaluations must be an integer >= 2"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(SharpscopeError, match=message):
        pac_bayes_flatness(MarginModel(0.0), DATA, **kwargs)

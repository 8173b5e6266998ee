"""Kendall's tau-b against scipy.stats.kendalltau, with and without ties."""

import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from sharpscope.errors import SharpscopeError
from sharpscope.sharpness import kendall_tau, kendall_tau_table


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),  # +1
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]),  # -1
        ([3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]),  # ties in both
        ([1, 1, 1, 2, 2], [1, 2, 3, 4, 5]),  # ties in x only
        ([0.1, 0.4, 0.3, 0.2], [1.0, 1.0, 0.0, 0.0]),  # ties in y only
        ([1, 1, 2, 2], [1, 1, 2, 2]),  # joint ties
    ],
)
def test_matches_scipy_on_hand_made_inputs(x, y):
    # Same formula (tau-b), exact integer counts: agreement to float rounding.
    np.testing.assert_allclose(kendall_tau(x, y), kendalltau(x, y).statistic, rtol=1e-12)


def test_matches_scipy_on_random_inputs_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, 15), rng.normal(size=15).round(1)
        np.testing.assert_allclose(kendall_tau(x, y), kendalltau(x, y).statistic, rtol=1e-12)


def test_constant_input_gives_nan_like_scipy():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendalltau([1, 1, 1], [1, 2, 3]).statistic)


def test_table_has_one_tau_per_measure():
    table = kendall_tau_table({"up": [1, 2, 3], "down": [3, 2, 1]}, gaps=[0.1, 0.2, 0.3])
    assert table == {"up": 1.0, "down": -1.0}


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([1, 2, 3], [1, 2], "x and y must have the same length, got 3 and 2"),
        ([1], [1], "Kendall's tau needs at least 2 models, got 1"),
        ([1, float("nan")], [1, 2], r"x holds NaN or infinite values at positions \[1\]"),
        ([[1, 2]], [[1, 2]], "x must be a 1-D sequence"),
    ],
)
def test_bad_input_is_explained(x, y, message):
    with pytest.raises(SharpscopeError, match=message):
        kendall_tau(x, y)


def test_pvalue_matches_scipy_and_says_how_little_few_models_show():
    from sharpscope.sharpness.correlation import kendall_tau_pvalue

    rng = np.random.default_rng(0)
    for n in (3, 5, 9, 60):
        x, y = rng.normal(size=n), rng.normal(size=n)
        np.testing.assert_allclose(kendall_tau_pvalue(x, y), kendalltau(x, y).pvalue, rtol=1e-12)
    # a perfect ranking of 4 models: only 2 of the 4! = 24 orders give |tau| = 1, so p = 2/24
    assert kendall_tau_pvalue([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1 / 12)
    assert math.isnan(kendall_tau_pvalue([1, 1, 1], [1, 2, 3]))
    with pytest.raises(SharpscopeError, match="same length"):
        kendall_tau_pvalue([1, 2], [1, 2, 3])

"""Kendall's rank correlation between a measure and the generalization gap across checkpoints.

Foret et al. 2021 (Fig. 3, right) and Jiang et al. 2020 (section 2.2) rank models by a measure and by their
generalization gap (test error - train error) and report Kendall's tau; +1 means the measure orders the models
exactly as their gaps, -1 exactly reversed. We use tau-b, which corrects for ties:

.. math::

    \\tau_b = \\frac{n_c - n_d}{\\sqrt{(n_0 - n_1)(n_0 - n_2)}}, \\qquad n_0 = n(n-1)/2,

with ``n_c``/``n_d`` the concordant/discordant pairs, ``n_1`` the pairs tied in ``x`` and ``n_2`` the pairs tied
in ``y`` (Kendall 1945; the default of ``scipy.stats.kendalltau``). Without ties it equals Jiang et al.'s
``mean_{i != j} sign(x_i - x_j) sign(y_i - y_j)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sharpscope.errors import SharpscopeError

__all__ = ["kendall_tau", "kendall_tau_pvalue", "kendall_tau_table", "MIN_KENDALL_CHECKPOINTS"]

#: Fewest models a Kendall tau is computed and shown for: two models give tau = +-1 whatever the measure, at p = 1
#: (three give at best p = 0.33; a perfect ranking is significant at 5% from five models on, p = 0.017).
MIN_KENDALL_CHECKPOINTS = 3


def _as_vector(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise SharpscopeError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise SharpscopeError(f"{name} holds NaN or infinite values at positions "
                              f"{np.flatnonzero(~np.isfinite(array)).tolist()}; drop those models first")
    return array


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (module docstring); NaN if either is constant.

    O(n^2) memory and time in the number of models, which is small (checkpoints, trained networks).
    """
    x, y = _as_vector("x", x), _as_vector("y", y)
    if x.shape != y.shape:
        raise SharpscopeError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n < 2:
        raise SharpscopeError(f"Kendall's tau needs at least 2 models, got {n}")
    i, j = np.triu_indices(n, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    pairs = n * (n - 1) / 2
    untied_x = pairs - np.count_nonzero(sx == 0)
    untied_y = pairs - np.count_nonzero(sy == 0)
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float(np.sum(sx * sy) / np.sqrt(untied_x * untied_y))


def kendall_tau_pvalue(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of Kendall's tau-b under the null hypothesis of no association (NaN if either is constant).

    The exact permutation distribution for small samples without ties (``n <= 50``), otherwise the normal
    approximation with the tie-corrected variance: ``scipy.stats.kendalltau(method="auto")``. With 4 models even
    a perfect ranking has p = 0.083, so a tau over a handful of checkpoints says little on its own; the p-value
    says how little.
    """
    from scipy.stats import kendalltau

    x, y = _as_vector("x", x), _as_vector("y", y)
    if x.shape != y.shape or x.shape[0] < 2:
        raise SharpscopeError(f"x and y must have the same length >= 2, got {x.shape[0]} and {y.shape[0]}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(kendalltau(x, y).pvalue)


def kendall_tau_table(measures: Mapping[str, Sequence[float]], gaps: Sequence[float]) -> dict[str, float]:
    """Kendall's tau-b between each named measure and the generalization gaps of the same models.

    Args:
        measures: measure name -> one value per model, in the same order as ``gaps``.
        gaps: generalization gap (test error - train error) per model.

    Returns:
        measure name -> tau (NaN where the measure or the gaps are constant).
    """
    return {name: kendall_tau(values, gaps) for name, values in measures.items()}

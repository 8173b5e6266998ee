"""PAC-Bayes flatness (Jiang et al. 2020, "Fantastic generalization measures and where to find them",
appendix C.3 "sharpness-based measures": PAC-Bayesian flatness, and its magnitude-aware version).

``sigma'`` is the largest noise scale whose expected accuracy drop stays within ``target_drop`` (0.1):

.. math::

    \\sigma' = \\max \\{ \\sigma : \\mathrm{acc}(w) - \\mathbb{E}_u[\\mathrm{acc}(w + u)] \\le 0.1 \\}, \\qquad
    u_i \\sim N(0, \\sigma^2) \\quad \\text{or (magnitude-aware)} \\quad u_i \\sim N(0, \\sigma^2 w_i^2 + \\epsilon^2),

with ``epsilon = 1e-3``; the measure correlated with the generalization gap is ``1 / sigma'^2``. The
expectation is the mean over ``num_draws`` draws (10 in the reference implementation). The same draws
``xi`` are reused for every ``sigma`` (``u = std(sigma) * xi``, common random numbers), so the measured drop is
a deterministic function of ``sigma`` and the search is a proper bisection. The search bisects ``log sigma``
on ``sigma_range`` until the bracket is within ``rtol`` (relative); the result is the lower end, the largest
sigma *known* to satisfy the constraint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.hessian.operator import eval_mode
from sharpscope.sharpness._objective import MAX_GROUP_ELEMENTS, ChunkedObjective, seeded_draws, stack_data
from sharpscope.sharpness.result import PacBayesResult
from sharpscope.sharpness.worst_case import _check_count, _check_positive

__all__ = ["pac_bayes_flatness", "top1_accuracy"]


def top1_accuracy(outputs: Tensor, labels: Tensor) -> Tensor:
    """Fraction of samples whose largest output (last dim) is the label: a 0-d tensor in the outputs' dtype."""
    return (outputs.argmax(-1) == labels).to(outputs.dtype).mean()


def pac_bayes_flatness(
    model: nn.Module,
    batches: Any,
    *,
    target_drop: float = 0.1,
    magnitude_aware: bool = False,
    eps: float = 1e-3,
    num_draws: int = 10,
    sigma_range: tuple[float, float] = (1e-5, 10.0),
    rtol: float = 0.01,
    max_evaluations: int = 60,
    seed: int = 0,
    params: Sequence[str | Tensor] | None = None,
    accuracy_fn: Callable[[Any, Tensor], Tensor] = top1_accuracy,
    batch_size: int = 256,
    vectorize: bool | None = None,
    check_deterministic: bool = True,
    on_progress: Callable[[int], Any] | None = None,
) -> PacBayesResult:
    """Jiang et al.'s PAC-Bayes ``sigma'`` and ``1 / sigma'^2`` on the evaluation set (module docstring).

    Args:
        model: the network at ``w`` (evaluated in eval mode, not modified).
        batches: ``(x, y)`` tensors or an iterable of ``(x, y)`` batches.
        target_drop: the allowed mean accuracy drop (0.1, i.e. 10 percentage points, in Jiang et al.).
        magnitude_aware: noise std ``sqrt(sigma^2 w_i^2 + eps^2)`` instead of ``sigma``.
        eps: the additive std of the magnitude-aware noise (1e-3 in Jiang et al.).
        num_draws: noise draws averaged per sigma.
        sigma_range: ``(low, high)`` searched on a log scale. If even ``high`` keeps the drop within
            ``target_drop`` (or ``low`` already exceeds it) that end is returned with ``bracketed=False``.
        rtol: stop when ``high / low <= 1 + rtol``.
        max_evaluations: at most this many sigmas evaluated (each costs ``num_draws`` passes over the data).
        seed: seeds the noise draws.
        params: the perturbed parameters (default: all with ``requires_grad``).
        accuracy_fn: ``accuracy_fn(outputs, labels) -> 0-d`` mean accuracy (default top-1).
        batch_size: at most this many samples per forward pass (memory only).
        vectorize: ``vmap`` over draws (``True``), a loop (``False``), or try ``vmap`` first (``None``).
        check_deterministic: refuse a model whose output changes between two identical evaluations.
        on_progress: called with 1 after each sigma evaluated.

    Returns:
        A :class:`PacBayesResult`.
    """
    target_drop = _check_positive("target_drop", target_drop)
    num_draws = _check_count("num_draws", num_draws)
    max_evaluations = _check_count("max_evaluations", max_evaluations, minimum=2)
    rtol = _check_positive("rtol", rtol)
    eps = _check_positive("eps", eps) if magnitude_aware else float(eps)
    try:
        low, high = (float(v) for v in sigma_range)
    except (TypeError, ValueError):
        low, high = float("nan"), float("nan")
    if not (0 < low < high < math.inf):
        raise SharpscopeError(f"sigma_range must be (low, high) with 0 < low < high, got {sigma_range!r}")
    objective = ChunkedObjective(model, accuracy_fn, params=params, batch_size=batch_size, vectorize=vectorize)
    x, y = stack_data(batches, device=objective.device, dtype=objective.dtype)
    group = max(1, min(num_draws, MAX_GROUP_ELEMENTS // max(1, 2 * objective.num_params)))

    def mean_accuracy(sigma: float) -> float:
        total = torch.zeros((), dtype=torch.float64, device=objective.device)
        for first in range(0, num_draws, group):
            draws = range(first, min(first + group, num_draws))
            xi = seeded_draws(objective, draws, seed=seed)  # the same draws for every sigma
            delta = [t * (torch.sqrt(sigma**2 * w.pow(2) + eps**2) if magnitude_aware else sigma)
                     for t, w in zip(xi, objective.params)]
            total += objective.value(delta, x, y, shared=True).double().sum()
        if on_progress is not None:
            on_progress(1)
        return float(total) / num_draws

    with eval_mode(model):
        if check_deterministic:
            objective.check_deterministic(x[None, :batch_size], y[None, :batch_size])
        with torch.no_grad():
            clean = float(objective.value(objective.zeros(1), x, y, shared=True)[0])
        drops = {high: clean - mean_accuracy(high)}
        if drops[high] <= target_drop:
            return _result(high, drops[high], clean, target_drop, magnitude_aware, eps, num_draws, 1, False)
        drops[low] = clean - mean_accuracy(low)
        if drops[low] > target_drop:
            return _result(low, drops[low], clean, target_drop, magnitude_aware, eps, num_draws, 2, False)
        while high / low > 1 + rtol and len(drops) < max_evaluations:
            middle = math.sqrt(low * high)
            drops[middle] = clean - mean_accuracy(middle)
            if drops[middle] <= target_drop:
                low = middle
            else:
                high = middle
    return _result(low, drops[low], clean, target_drop, magnitude_aware, eps, num_draws, len(drops), True)


def _result(sigma: float, drop: float, clean: float, target_drop: float, magnitude_aware: bool, eps: float,
            num_draws: int, evaluations: int, bracketed: bool) -> PacBayesResult:
    return PacBayesResult(
        sigma=sigma, measure=1.0 / sigma**2, clean_accuracy=clean, accuracy_drop=drop, target_drop=target_drop,
        magnitude_aware=magnitude_aware, eps=eps, num_draws=num_draws, evaluations=evaluations, bracketed=bracketed,
    )

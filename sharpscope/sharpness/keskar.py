"""Keskar et al. 2017 epsilon-sharpness ("On large-batch training for deep learning", section 2.2.2, metric 2).

.. math::

    \\phi_{w}(\\epsilon) = 100 \\cdot \\frac{\\max_{z \\in C_\\epsilon} L(w + z) - L(w)}{1 + L(w)},
    \\qquad C_\\epsilon = \\{ z : |z_i| \\le \\epsilon (|w_i| + 1) \\},

in the full parameter space (``A = I``), with ``L`` the mean loss over the whole evaluation set (Keskar et al.
use the training set). The box is the adaptive l-inf set of :mod:`sharpscope.sharpness.worst_case` with
``c = |w| + 1`` (``eta = 1``), so the max is taken by the same projected Auto-PGD ascent (sign steps clamped
into the box) over a single chunk of all samples.

Keskar et al. solved the max with scipy's L-BFGS-B (box bounds, few iterations). We use projected ascent
instead: it runs on the model's device and dtype with no host round trips, scales to millions of parameters
(L-BFGS-B needs float64 NumPy copies of the weights and gradient every iteration), and shares the tested code
of the other worst-case measures. For a convex loss the max over a box sits at a vertex, which sign steps
reach directly; for non-convex losses both methods find a local max (the reported value is a lower bound).
Their epsilon values were 1e-3 and 5e-4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import math

from torch import Tensor, nn

from sharpscope.sharpness.result import SharpnessEstimate
from sharpscope.sharpness.worst_case import worst_case_sharpness

__all__ = ["keskar_sharpness"]


def keskar_sharpness(
    model: nn.Module,
    loss_fn: Any,
    batches: Any,
    *,
    eps: float = 1e-3,
    steps: int = 20,
    random_init: bool = False,
    seed: int = 0,
    params: Sequence[str | Tensor] | None = None,
    batch_size: int = 256,
    vectorize: bool | None = None,
    check_deterministic: bool = True,
    return_perturbation: bool = False,
    on_progress: Callable[[int], Any] | None = None,
) -> SharpnessEstimate:
    """Keskar et al.'s ``100 (max_{|z_i| <= eps (|w_i| + 1)} L(w + z) - L(w)) / (1 + L(w))`` (module docstring).

    Args:
        model, loss_fn, batches, params, batch_size, vectorize, check_deterministic, return_perturbation,
            on_progress: as in :func:`sharpscope.sharpness.worst_case_sharpness`.
        eps: the relative box size (1e-3 or 5e-4 in Keskar et al. 2017).
        steps: projected ascent steps (sign steps, step-size control of Auto-PGD).
        random_init: start from a random point of the box (needed at exact critical points).
        seed: seeds the random start.

    Returns:
        A :class:`SharpnessEstimate` with ``measure="keskar"``, ``rho = eps``, ``m`` = all samples, and
        ``value``, ``chunk_values`` and ``trace`` in Keskar's units (percent of ``1 + L``); ``stderr`` is NaN
        (one full-batch value). ``clean_loss`` is ``L(w)``.
    """
    raw = worst_case_sharpness(
        model, loss_fn, batches, rho=eps, m=None, p=math.inf, adaptive=True, eta=1.0, steps=steps,
        random_init=random_init, shuffle=False, seed=seed, params=params, batch_size=batch_size,
        vectorize=vectorize, check_deterministic=check_deterministic, return_perturbation=return_perturbation,
        on_progress=on_progress,
    )
    factor = 100.0 / (1.0 + raw.clean_loss)
    return dataclasses.replace(
        raw, measure="keskar", value=raw.value * factor, chunk_values=raw.chunk_values * factor,
        trace=raw.trace * factor,
    )

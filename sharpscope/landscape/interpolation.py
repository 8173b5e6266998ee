"""Cuts through checkpoints: the line through two models and the plane through three.

Linear interpolation (Goodfellow, Vinyals & Saxe 2015, "Qualitatively characterizing neural network optimization
problems"; Li et al. 2018 section 3): ``w(t) = w_a + t (w_b - w_a)``, so ``t = 0`` is model ``a`` exactly and
``t = 1`` is model ``b`` up to float rounding (``w_a + (w_b - w_a)``, about 1 ulp). BatchNorm running statistics
are interpolated too (``include_buffers=True``, the paper code's ``--dir_type states``): a model with BN evaluated
with the other model's statistics would not be either model. Beyond ``[0, 1]`` a running variance can extrapolate
to a negative value, which gives NaN losses there; they are reported as NaN, not hidden.

Plane through three models (the paper code's ``--model_file2/--model_file3``): origin ``w_a``, basis by
Gram-Schmidt on ``u = w_b - w_a``, ``v = w_c - w_a`` in the space of every moved tensor (parameters and, with
``include_buffers``, float buffers): ``d1 = u``, ``d2 = (v - (v.u / u.u) u) * ||u|| / ||v_perp||``, so both
directions have length ``||u||``, are orthogonal, and the three models sit at ``(0, 0)``, ``(1, 0)`` and
``(v.u / u.u, ||v_perp|| / ||u||)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.landscape.directions import Direction, difference_direction, model_tensors
from sharpscope.landscape.surface import LossFn, Surface, loss_surface


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    alphas: np.ndarray | Iterable[float],
    include_buffers: bool = True,
    **surface_kwargs,
) -> Surface:
    """Loss along ``w_a + t (w_b - w_a)`` for ``t`` in ``alphas`` (e.g. ``grid(-0.5, 1.5, 41)``), evaluated on
    ``model_a`` (whose weights are restored afterwards). ``surface_kwargs`` go to :func:`loss_surface`
    (``checkpoint_path``, ``progress``, ``label``...)."""
    direction = difference_direction(model_a, model_b, include_buffers=include_buffers)
    return loss_surface(model_a, loss_fn, batches, directions=(direction,), coords=np.asarray(list(alphas),
                        dtype=np.float64), **surface_kwargs)


@dataclass(frozen=True)
class PlaneBasis:
    """An orthogonal basis of the plane through three models, and where they lie in it."""

    d1: Direction  # w_b - w_a
    d2: Direction  # the part of w_c - w_a orthogonal to d1, rescaled to ||d1||
    coords: np.ndarray  # (3, 2): coordinates of models a, b, c in units of (d1, d2)


def plane_through(
    model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, *, include_buffers: bool = True
) -> PlaneBasis:
    """Gram-Schmidt basis of the plane through ``w_a``, ``w_b``, ``w_c`` (origin ``w_a``; module docstring).
    Raises if the three points are (numerically) on one line: the part of ``w_c - w_a`` orthogonal to
    ``w_b - w_a`` shorter than ``1e-5 ||w_c - w_a||``."""
    names = list(model_tensors(model_a, include_buffers=include_buffers))
    u = difference_direction(model_a, model_b, include_buffers=include_buffers, names=names)
    v = difference_direction(model_a, model_c, include_buffers=include_buffers, names=names)
    uu = u.dot(u)
    if uu == 0.0:
        raise SharpscopeError("models a and b are identical; a plane needs three distinct, non-collinear models")
    proj = v.dot(u) / uu
    perp = {n: v.tensors[n] - proj * u.tensors[n] for n in u.tensors}
    perp_norm = float(np.sqrt(sum(float(t.double().square().sum()) for t in perp.values())))
    u_norm = float(np.sqrt(uu))
    # float32 checkpoints carry ~1e-7 relative rounding: a perpendicular part below 1e-5 of ||v|| is noise
    if perp_norm <= 1e-5 * float(np.sqrt(v.dot(v))):
        raise SharpscopeError("the three models lie on one line; a plane needs three non-collinear models")
    scale = u_norm / perp_norm
    d1 = replace(u, kind="plane", info={"include_buffers": include_buffers, "role": "b - a"})
    d2 = Direction({n: t * scale for n, t in perp.items()}, kind="plane", norm="none", ignore_bias_bn=False,
                   info={"include_buffers": include_buffers, "role": "(c - a) orthogonalised"})
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [proj, perp_norm / u_norm]])
    return PlaneBasis(d1=d1, d2=d2, coords=coords)


def state_of(model: nn.Module, *, include_buffers: bool = True) -> dict[str, Tensor]:
    """A detached copy of the tensors a direction can move (trainable parameters [+ float buffers])."""
    with torch.no_grad():
        return {n: t.detach().clone() for n, t in model_tensors(model, include_buffers=include_buffers).items()}


@dataclass(frozen=True)
class Barrier:
    """The loss barrier along a linear path between two models."""

    barrier: float  # max_{0 <= t <= 1} L(t) - max(L(0), L(1)); >= 0 up to the grid (0 when monotone)
    t: float  # where the maximum over [0, 1] is reached
    max_loss: float  # L(t) there
    loss_start: float  # L(0)
    loss_end: float  # L(1)


def loss_barrier(ts: Iterable[float], loss: Iterable[float]) -> Barrier:
    """The loss barrier of an interpolation curve: ``max_{t in [0, 1]} L(t) - max(L(0), L(1))`` (Frankle et al.
    2020, "Linear mode connectivity and the lottery ticket hypothesis"; Draxler et al. 2018), over the grid points
    ``ts`` in ``[0, 1]`` of the curve ``loss``, ``L(0)`` and ``L(1)`` linearly interpolated where 0 or 1 is not a
    grid point. The endpoints count towards the maximum, so the barrier is >= 0. Points with a non-finite loss are
    skipped; raises if ``[0, 1]`` holds none."""
    ts = np.asarray(list(ts), dtype=np.float64)
    loss = np.asarray(list(loss), dtype=np.float64)
    if ts.shape != loss.shape or ts.ndim != 1:
        raise SharpscopeError(f"loss_barrier: expected 1-D ts and loss of one length, got {ts.shape}, {loss.shape}")
    finite = np.isfinite(loss)
    if not finite.any() or ts[finite].min() > 0.0 or ts[finite].max() < 1.0:
        raise SharpscopeError("loss_barrier: the curve must cover t = 0 and t = 1 with finite losses")
    tf, lf = ts[finite], loss[finite]
    ends = np.interp([0.0, 1.0], tf, lf)
    inside = (tf >= 0.0) & (tf <= 1.0)
    cand_t = np.concatenate([[0.0, 1.0], tf[inside]])
    cand_l = np.concatenate([ends, lf[inside]])
    k = int(np.argmax(cand_l))
    return Barrier(barrier=float(cand_l[k] - ends.max()), t=float(cand_t[k]), max_loss=float(cand_l[k]),
                   loss_start=float(ends[0]), loss_end=float(ends[1]))

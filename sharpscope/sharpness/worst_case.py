"""Worst-case (adversarial) sharpness and m-sharpness, by projected normalised gradient ascent in weight space.

.. math::

    S_{\\max}(w) = \\mathbb{E}_B \\Big[ \\max_{\\|\\delta / c\\|_p \\le \\rho} L_B(w + \\delta) - L_B(w) \\Big],
    \\qquad c = |w| + \\eta \\ \\text{(adaptive)} \\ \\text{or} \\ 1, \\quad p \\in \\{2, \\infty\\},

over disjoint chunks ``B`` of ``m`` samples of a fixed evaluation set (Foret et al. 2021, section 4.1,
"m-sharpness"; Andriushchenko et al. 2023, "A modern look at the relationship between sharpness and
generalization", section 3; Kwon et al. 2021 for the adaptive ``c``).

The inner max is solved per chunk in the coordinates ``u = delta / c`` (so the set is a plain l2 ball or
l-inf box of radius ``rho``) by the step-size control of Auto-PGD (Croce & Hein 2020, section 3.1), as
Andriushchenko et al. 2023 do:

* step ``k``: ``z = P(u_k + eta_k d_k)``, ``u_{k+1} = P(u_k + 0.75 (z - u_k) + 0.25 (u_k - u_{k-1}))``, where
  ``d_k`` is the unit steepest-ascent direction of ``L_B(w + c u)`` — exactly SAM's perturbation for ``rho = 1``
  (:func:`sharpscope.optim.perturbation`: ``c^2 g / ||c g||_2`` for p = 2, ``c sign(g)`` for p = inf, in
  ``delta`` units) — and ``P`` scales back onto the ball (p = 2) or clamps into the box (p = inf);
* the first step has no momentum and ``eta_0 = 2 rho``, so after projection ``u_1`` is SAM's perturbation:
  ``steps=1`` is SAM's one-step estimate of the max;
* at checkpoint steps the step size of a chunk is halved, and its iterate restarted from its best point, when
  fewer than 75% of the steps since the last checkpoint raised the loss or the best value did not improve.
  The checkpoints are APGD's for its default 20-step budget (after steps 4, 7, 9) and then every 2 steps;
  being fixed in absolute steps (not a fraction of ``steps``), a run of ``k`` steps is a prefix of a run of
  ``k + 1`` steps;
* the reported per-chunk value is the best loss seen over all iterates (``delta = 0`` included) minus
  ``L_B(w)``, so it is never negative and never decreases with more steps.

Projecting in ``u`` coordinates is the Euclidean projection for the reparametrised problem; Andriushchenko et
al. project ``delta`` onto the ellipsoid in the original metric (bisection on a Lagrange multiplier). Both keep
every iterate feasible; the maximiser sought is the same.

At an exact critical point (zero gradient, e.g. the minimum of a quadratic) ascent from ``delta = 0`` cannot
move; ``random_init=True`` starts from a random point on the sphere (p = 2) or in the box (p = inf), as
Andriushchenko et al.'s optional random initialisation does.

For p = 2 without ASAM from the zero start, on the structured path, Linear weights whose gradient history is much
smaller than their weights (small ``m``, few steps) keep their perturbations as coefficients over that history
(:mod:`sharpscope.sharpness.span`): the same ascent, rounded differently, without the ``(chunks, out, in)`` stacks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sharpscope import distributed
from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.hessian.operator import eval_mode
from sharpscope.batches import check_fixed_batches
from sharpscope.sharpness._objective import (
    ChunkedObjective,
    _is_one_batch,
    chunk_group_size,
    gather_blocks,
    leading_size,
    make_chunks,
    mean_and_stderr,
    seeded_draws,
    stack_data,
    take,
)
from sharpscope.sharpness import span
from sharpscope.sharpness.partial import PartialResults
from sharpscope.sharpness.result import SharpnessEstimate, SharpnessResult
from sharpscope.sharpness.span import SpanBasis, SpanRefused

__all__ = ["worst_case_sharpness", "m_sharpness"]

#: Auto-PGD constants (Croce & Hein 2020, section 3.1): momentum weight alpha and the fraction of improving
#: steps below which the step size is halved.
_MOMENTUM = 0.75
_IMPROVING_FRACTION = 0.75
#: Copies of the perturbation held by the ascent (iterate, previous, candidate, best, gradient, best gradient, and
#: the new gradient or a direction); sizes the chunk groups.
_ASCENT_COPIES = 7
_log = logging.getLogger(__name__)


def _is_checkpoint(done: int) -> bool:
    """Step-size checkpoints after ``done`` steps: APGD's for 20 steps (4, 7, 9), then every 2 steps."""
    return done in (4, 7) or (done >= 9 and (done - 9) % 2 == 0)


# -------------------------------------------------------------------------------------------- validation
def _check_p(p: Any) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        value = float("nan")
    if value not in (2.0, math.inf):
        raise SharpscopeError(f"p must be 2 or inf (the norm of the perturbation ball), got {p!r}")
    return value


def _check_positive(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (number > 0 and math.isfinite(number)):
        raise SharpscopeError(f"{name} must be a positive finite number, got {value!r}")
    return number


def _check_count(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SharpscopeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def objective_activations(objective: ChunkedObjective, xc: Any) -> int:
    """Elements of the leaf modules' outputs on one sample (:func:`sharpscope.sharpness.memory.activations_per_sample`),
    measured once per objective; 0 where the model cannot be called on one sample alone (a ``BatchLoss``)."""
    from sharpscope.batches import map_samples
    from sharpscope.sharpness.memory import activations_per_sample

    cached = getattr(objective, "_activations_per_sample", None)
    if cached is None:
        try:
            one = map_samples(lambda t: t[0, :1], xc)
            cached = activations_per_sample(objective.model, one)
        except Exception:  # noqa: BLE001 - only an estimate: a model it cannot call is sized by its parameters
            cached = 0
        objective._activations_per_sample = cached
    return cached


# --------------------------------------------------------------------------------------- geometry helpers
def _expand(values: Tensor, like: Tensor) -> Tensor:
    """``(G,)`` per-chunk numbers shaped to broadcast against ``like (G, ...)``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _copy_rows(target: Sequence[Tensor], source: Sequence[Tensor], mask: Tensor, *, runs: bool | None = None) -> None:
    """``target[g] = source[g]`` in place for the chunks ``g`` where ``mask (G,)`` holds (only those rows move).

    ``runs`` (default: on the CPU) copies the selected rows as runs of consecutive rows (``copy_`` on row slices:
    those rows' bytes are read and written once, nothing is allocated); ``index_select`` + ``index_copy_`` cost
    ~2-3x a copy plus a fresh temporary, and ``torch.where`` reads and writes every row (profiled at m = 1 on the
    digits ConvNet, ``benchmarks/bench_sharpness.py``). Otherwise (a GPU, where a launch costs more than moving
    a row) one masked ``torch.where`` per tensor.
    """
    if not bool(mask.any()):
        return
    if bool(mask.all()):
        for t, s in zip(target, source):
            t.copy_(s)
        return
    if not (mask.device.type == "cpu" if runs is None else runs):
        for t, s in zip(target, source):
            torch.where(_expand(mask, t), s, t, out=t)
        return
    rows = mask.nonzero().squeeze(1).tolist()
    begin = rows[0]
    for row, following in zip(rows, rows[1:] + [None]):
        if following != row + 1:  # a run [begin, row] ends here
            for t, s in zip(target, source):
                t[begin:row + 1].copy_(s[begin:row + 1])
            begin = following


def scale_of(params: Sequence[Tensor], *, adaptive: bool, eta: float) -> list[Tensor] | None:
    """The elementwise scale ``c = |w| + eta`` of the perturbation set, or None for ``c = 1``."""
    return [p.abs() + eta for p in params] if adaptive else None


def project(
    delta: Sequence[Tensor], scale: Sequence[Tensor] | None, rho: float, p: float, *, inplace: bool = False,
    basis: SpanBasis | None = None,
) -> list[Tensor]:
    """Project each chunk's ``delta`` (a list of ``(G, *shape)``) onto ``{||delta / c||_p <= rho}``.

    ``inplace`` overwrites ``delta`` (for fresh temporaries: no new allocation). ``basis``: the coefficient
    stacks of its slots are measured with its Gram matrices (:mod:`sharpscope.sharpness.span`; p = 2, ``c = 1``).

    p = 2: ``delta * min(1, rho / ||delta / c||_2)`` (the norm taken over all perturbed tensors of a chunk);
    p = inf: ``clamp(delta, -rho c, rho c)``. Both are Euclidean projections in ``u = delta / c``.
    """
    if p == math.inf:
        if scale is None:
            return [d.clamp_(-rho, rho) if inplace else d.clamp(-rho, rho) for d in delta]
        if inplace:
            return [d.clamp_(min=-rho * c, max=rho * c) for d, c in zip(delta, scale)]
        return [torch.maximum(torch.minimum(d, rho * c), -rho * c) for d, c in zip(delta, scale)]
    u = delta if scale is None else [d / c for d, c in zip(delta, scale)]
    norm = _chunk_norm(u, basis)
    factor = (rho / norm).clamp(max=1.0)  # norm 0 -> inf -> 1
    if inplace:
        return [d.mul_(_expand(factor, d)) for d in delta]
    return [d * _expand(factor, d) for d in delta]


def scaled_norm(delta: Sequence[Tensor], scale: Sequence[Tensor] | None, p: float) -> Tensor:
    """``(G,)`` norms ``||delta / c||_p`` of a stack of perturbations (for checks and tests)."""
    u = delta if scale is None else [d / c for d, c in zip(delta, scale)]
    if p == math.inf:
        return torch.stack([t.abs().flatten(1).amax(1) for t in u]).amax(0)
    return torch.sqrt(sum(t.pow(2).flatten(1).sum(1) for t in u))


def _chunk_norm(tensors: Sequence[Tensor], basis: SpanBasis | None = None) -> Tensor:
    """``(G,)`` l2 norms over all tensors ``(G, ...)`` of each chunk, without materialising their squares (with a
    ``basis``: its slots' coefficient stacks measured by its Gram matrices)."""
    if basis is not None:
        return span.squared_norms(basis, tensors).sqrt()
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors], dim=1), dim=1
    )


def _unit_directions(
    objective: ChunkedObjective, grads: list[Tensor], *, p: float, adaptive: bool, eta: float
) -> list[Tensor]:
    """SAM's perturbation with ``rho = 1`` (:func:`sharpscope.optim.perturbation`) for every chunk's gradient at once.

    With ``s = c g`` (``c = |w| + eta`` or 1): p = 2 gives ``c s / ||s||_2`` (where ``||s||_2`` overflows,
    evaluated as ``c u / ||u||_2`` on ``u = s / ||s||_inf``, as ``perturbation`` does); p = inf gives
    ``c sign(g)``. A zero gradient gives a zero direction. Batched over the ``G`` chunks: a handful of kernels
    per tensor, where applying ``perturbation`` chunk by chunk cost ~10 small kernels per chunk (it dominated the
    ascent at m = 1).
    """
    tensors, factor = _direction_parts(objective, grads, p=p, adaptive=adaptive, eta=eta)
    if factor is None:
        return tensors
    if tensors is grads:  # a fresh tensor: the gradients are kept by the ascent
        return [t * _expand(factor, t) for t in tensors]
    return [t.mul_(_expand(factor, t)) for t in tensors]


def _direction_parts(
    objective: ChunkedObjective, grads: list[Tensor], *, p: float, adaptive: bool, eta: float
) -> tuple[list[Tensor], Tensor | None]:
    """:func:`_unit_directions` as ``(tensors, factor)``, the direction being ``tensors * factor`` per chunk
    (``factor (G,)``, or None when ``tensors`` is the direction): for p = 2 without ``c`` the tensors are
    ``grads`` themselves (not copied), so the ascent's step ``u + eta d`` is one ``addcmul`` on the gradient."""
    scale = scale_of(objective.params, adaptive=adaptive, eta=eta)
    if p == math.inf:
        return [g.sign() if c is None else g.sign() * c for g, c in zip(grads, scale or [None] * len(grads))], None
    s = grads if scale is None else [g * c for g, c in zip(grads, scale)]
    norm = _chunk_norm(s, objective.span)
    if not bool(torch.isfinite(norm).all()):  # overflow (or NaN): rescale by the largest entry first
        if objective.span is not None:
            raise SpanRefused("a gradient norm overflowed")
        # abs().amax(), not vector_norm(inf): the latter is ~10x slower on CPU (profiled, torch 2.13)
        top = torch.stack([t.reshape(t.shape[0], -1).abs().amax(1) for t in s], dim=1).amax(1)
        top = torch.where(top > 0, top, torch.ones_like(top))  # zero gradient: u = 0, direction 0
        s = [t / _expand(top, t) for t in s]
        norm = _chunk_norm(s)
    factor = 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm))
    if scale is not None:  # s = c g is fresh: the direction c s / ||s|| as (c s) * factor
        s = [t.mul_(c) for t, c in zip(s, scale)]
    return s, factor


def random_start(
    objective: ChunkedObjective, chunks: range, *, scale: list[Tensor] | None, rho: float, p: float, seed: int
) -> list[Tensor]:
    """Random feasible starts for ``chunks``: uniform on the sphere ``||u||_2 = rho`` (p = 2) or in the box (p = inf).

    Each chunk's start comes from its own seeded stream (:func:`seeded_draws`), independent of the grouping.
    """
    if p == math.inf:
        u = [t * rho for t in seeded_draws(objective, chunks, seed=seed, kind="uniform")]
    else:
        u = seeded_draws(objective, chunks, seed=seed, kind="normal")
        norm = torch.sqrt(sum(t.pow(2).flatten(1).sum(1) for t in u))
        u = [t * _expand(rho / norm, t) for t in u]
    return u if scale is None else [t * c for t, c in zip(u, scale)]


# ----------------------------------------------------------------------------------------------- the ascent
class AscentWorkspace:
    """The five perturbation stacks :func:`ascend` works in (three iterates, the best point, its gradient), each a
    list of ``(capacity, *p.shape)`` tensors, allocated once and reused by every group of up to ``capacity``
    chunks (a smaller group uses the leading rows)."""

    def __init__(self, objective: ChunkedObjective, capacity: int) -> None:
        self.capacity = capacity
        self._stacks = [objective.zeros(capacity) for _ in range(5)]

    def stacks(self, group: int) -> list[list[Tensor]]:
        """``[current, previous, free, best_delta, best_grad]`` for ``group <= capacity`` chunks (contiguous views)."""
        if group > self.capacity:
            raise SharpscopeError(f"an ascent workspace for {self.capacity} chunks cannot hold {group}")
        return [[t[:group] for t in stack] for stack in self._stacks]


def ascend(
    objective: ChunkedObjective,
    x: Tensor,
    y: Tensor,
    *,
    rho: float,
    p: float,
    adaptive: bool,
    eta: float,
    steps: int,
    start: list[Tensor] | None = None,
    workspace: AscentWorkspace | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Projected Auto-PGD ascent of ``L_B(w + delta)`` for a group of ``G`` chunks at once.

    Args:
        objective: the chunked loss.
        x, y: the group's chunks, ``(G, m, ...)``.
        rho, p, adaptive, eta: the perturbation set ``{||delta / c||_p <= rho}``, ``c = |w| + eta`` or 1.
        steps: ascent steps (gradient evaluations); ``steps`` values and ``steps - 1`` gradients are computed
            after the clean one.
        start: starting perturbations ``(G, *shape)`` (projected first), or None for ``delta = 0``.
        workspace: the stacks the ascent works in (:class:`AscentWorkspace`, at least ``G`` chunks), reused
            across groups; None allocates one for this call.

    Returns:
        ``(trace, clean, best_delta)``: ``trace (G, steps + 1)`` the best ``L_B(w + delta) - L_B(w)`` after
        each step (never negative, non-decreasing), ``clean (G,)`` the values ``L_B(w)``, and the best
        perturbations found (held in ``workspace``: valid until it is used again).
    """
    group = leading_size((x, y), 0)
    scale = scale_of(objective.params, adaptive=adaptive, eta=eta)
    # Three iterate stacks, reused in turn (previous, current, and the one the candidate is written into), and
    # all of them reused across groups: no stack is allocated per step or per group (on the CPU a fresh stack
    # costs its page faults, more than the arithmetic on it). The best point and its gradient are copied
    # lazily: a chunk's best is either its current iterate (best_is_current) or held in best_delta / best_grad,
    # whose rows are written only when the ascent leaves that iterate without improving on it.
    if workspace is None:
        workspace = AscentWorkspace(objective, group)
    current, previous, free, best_delta, best_grad = workspace.stacks(group)
    for t in current:
        t.zero_()
    if start is None:
        value, grad = objective.value_and_grad(current, x, y)
        clean = value
    else:
        clean = objective.value(current, x, y)
        for t, s in zip(current, project(start, scale, rho, p)):
            t.copy_(s)
        value, grad = objective.value_and_grad(current, x, y)
    basis = objective.span
    step_size = torch.full((group,), 2.0 * rho, dtype=objective.dtype, device=objective.device)
    best_value = value
    best_is_current = torch.ones(group, dtype=torch.bool, device=objective.device)
    trace = [best_value]
    improving = torch.zeros(group, dtype=objective.dtype, device=objective.device)
    best_at_check = best_value
    reduced_last = torch.zeros(group, dtype=torch.bool, device=objective.device)
    last_check = 0
    for k in range(steps):
        direction, factor = _direction_parts(objective, grad, p=p, adaptive=adaptive, eta=eta)
        coefficient = step_size if factor is None else step_size * factor
        candidate = project([torch.addcmul(d, _expand(coefficient, d), s, out=z)
                             for d, s, z in zip(current, direction, free)], scale, rho, p, inplace=True, basis=basis)
        del direction
        if k > 0:
            # u + a (z - u) + (1 - a)(u - u_prev) = a z + (2 - 2a) u - (1 - a) u_prev, in place on z
            candidate = project(
                [z.mul_(_MOMENTUM).add_(d, alpha=2 - 2 * _MOMENTUM).sub_(prev, alpha=1 - _MOMENTUM)
                 for d, z, prev in zip(current, candidate, previous)],
                scale, rho, p, inplace=True, basis=basis,
            )
        final = k + 1 == steps
        if final:
            new_value, new_grad = objective.value(candidate, x, y), None
        else:
            new_value, new_grad = objective.value_and_grad(candidate, x, y)
        improving = improving + (new_value > value).to(improving.dtype)
        better = new_value > best_value
        best_value = torch.where(better, new_value, best_value)
        left = best_is_current & ~better  # the best stays behind at the current iterate: keep its rows
        _copy_rows(best_delta, current, left)
        if any(_is_checkpoint(j) for j in range(k + 1, steps)):  # a restart may still need the best gradient
            _copy_rows(best_grad, grad, left)
        best_is_current = better
        previous, current, free = current, candidate, previous
        value, grad = new_value, new_grad
        trace.append(best_value)
        if not final and _is_checkpoint(k + 1):
            interval = k + 1 - last_check
            reduce = (improving <= _IMPROVING_FRACTION * interval) | (~reduced_last & (best_value <= best_at_check))
            step_size = torch.where(reduce, step_size / 2, step_size)
            # restart from the best point without momentum: where the best is the current iterate only the
            # previous one moves
            held = reduce & ~best_is_current
            _copy_rows(current, best_delta, held)
            _copy_rows(grad, best_grad, held)
            _copy_rows(previous, current, reduce)
            value = torch.where(reduce, best_value, value)
            reduced_last, best_at_check, last_check = reduce, best_value, k + 1
            improving = torch.zeros_like(improving)
    _copy_rows(best_delta, current, best_is_current)
    gains = (torch.stack(trace, dim=1) - clean[:, None]).clamp(min=0.0)
    return gains, clean, best_delta


def _worst_case_on_chunks(
    objective: ChunkedObjective,
    xc: Tensor,
    yc: Tensor,
    *,
    rho: float,
    p: float,
    adaptive: bool,
    eta: float,
    steps: int,
    random_init: bool,
    seed: int,
    keep_perturbation: bool,
    on_progress: Callable[[int], Any] | None,
    shard: tuple[int, int] | None = None,
    partial: PartialResults | None = None,
    factored: bool = True,
) -> tuple[Tensor, Tensor, list[Tensor] | None]:
    """Run :func:`ascend` over all chunks in groups; returns ``trace (C, steps + 1)``, ``clean (C,)``, deltas.

    ``factored``: where it applies (p = 2, no ASAM, zero start, the structured path), the Linear weights worth it
    keep their perturbations as coefficients over the chunk's gradient history (:mod:`sharpscope.sharpness.span`;
    the same ascent, rounded differently); False keeps every perturbation dense.

    With ``shard=(rank, world_size)`` this rank ascends its contiguous block of chunks and the ranks exchange
    the traces (each chunk's ascent depends on that chunk alone, its random start included).

    With ``partial`` (a :class:`~sharpscope.sharpness.partial.PartialResults`, one process only) every finished
    group's traces and clean losses are recorded under ``w|m|rho|first-last``, and groups found there are not
    ascended again. The group size comes from :func:`chunk_group_size`, shrunk to the memory available
    (:func:`sharpscope.sharpness.memory.fit_group`, which refuses before allocating when one chunk does not fit).
    """
    from sharpscope.sharpness.memory import fit_group

    num_chunks, m = leading_size((xc, yc), 0), leading_size((xc, yc), 1)
    if shard is not None and keep_perturbation:
        raise SharpscopeError("return_perturbation=True cannot be combined with shard (the perturbations stay "
                              "on the rank that found them); run in one process")
    if partial is not None and (shard is not None or keep_perturbation):
        raise SharpscopeError("partial results are kept in one process without return_perturbation only")

    def size_groups(stacked: int) -> int:
        group = chunk_group_size(m, stacked, batch_size=objective.batch_size, copies=_ASCENT_COPIES)
        return fit_group(group, m=m, num_params=stacked, copies=_ASCENT_COPIES,
                         itemsize=torch.finfo(objective.dtype).bits // 8, batch_size=objective.batch_size,
                         activations=objective_activations(objective, xc), device=objective.device,
                         what=f"{'adaptive ' if adaptive else ''}worst-case sharpness")

    dense_group = size_groups(objective.num_params)  # refuses here when one chunk does not fit
    basis = _span_basis(objective, xc, yc, m=m, p=p, adaptive=adaptive, random_init=random_init, steps=steps,
                        factored=factored) if num_chunks else None
    # per chunk, what the ascent's stacks hold: the dense weights, or for factored ones their history's share
    group = dense_group if basis is None else size_groups(basis.stacked_size(objective.params, _ASCENT_COPIES))
    scale = scale_of(objective.params, adaptive=adaptive, eta=eta)
    mine = distributed.block(num_chunks, shard)
    traces = [torch.zeros(0, steps + 1, dtype=objective.dtype, device=objective.device)]
    cleans = [torch.zeros(0, dtype=objective.dtype, device=objective.device)]
    deltas = []
    workspace = None
    span_workspace = None
    first = mine.start
    while first < mine.stop:
        last = min(first + group, mine.stop)
        key = f"w|m={m}|rho={rho!r}|{first}-{last}"
        saved = partial.get(key) if partial is not None else None
        if saved is not None:
            saved = torch.from_numpy(saved).to(device=objective.device, dtype=objective.dtype)
            traces.append(saved[:, :-1])
            cleans.append(saved[:, -1])
            if on_progress is not None:
                on_progress(last - first)
            first = last
            continue
        x, y = take((xc, yc), slice(first, last))
        chunks = range(first, last)
        start = random_start(objective, chunks, scale=scale, rho=rho, p=p, seed=seed) if random_init else None
        if basis is not None:
            try:
                objective.span = basis
                basis.start(last - first)
                if span_workspace is None:
                    span_workspace = AscentWorkspace(objective, min(group, len(mine)))
                trace, clean, best = ascend(objective, x, y, rho=rho, p=p, adaptive=adaptive, eta=eta,
                                            steps=steps, start=start, workspace=span_workspace)
                if keep_perturbation:  # the coefficients as the (G, out, in) stacks they stand for
                    best = [basis.dense(i, t) if i in basis.slots else t for i, t in enumerate(best)]
            except SpanRefused as exc:  # from this group on, dense (in the dense path's groups)
                _log.debug("factored ascent refused (%s); dense from chunk %d", exc, first)
                basis = None
                group = min(group, dense_group)
                continue
            finally:
                objective.span = None
        else:
            if workspace is None:
                workspace = AscentWorkspace(objective, min(group, len(mine)))
            trace, clean, best = ascend(objective, x, y, rho=rho, p=p, adaptive=adaptive, eta=eta, steps=steps,
                                        start=start, workspace=workspace)
        if partial is not None:
            partial.put(key, torch.cat([trace, clean[:, None]], dim=1).detach().cpu().numpy(), chunks=last - first)
        traces.append(trace)
        cleans.append(clean)
        if keep_perturbation:
            deltas.append([t.clone() for t in best])  # best lives in the workspace, which the next group reuses
        if on_progress is not None:
            on_progress((last - first) * (shard[1] if shard else 1))  # the others advance alike: count the whole job
        first = last
    perturbation = [torch.cat(parts) for parts in zip(*deltas)] if keep_perturbation else None
    trace, clean = gather_blocks((torch.cat(traces), torch.cat(cleans)), shard)
    return trace, clean, perturbation


def _span_basis(objective: ChunkedObjective, xc: Any, yc: Any, *, m: int, p: float, adaptive: bool,
                random_init: bool, steps: int, factored: bool) -> SpanBasis | None:
    """The :class:`~sharpscope.sharpness.span.SpanBasis` of the Linear weights the ascent keeps factored, or None
    (every perturbation dense): only for p = 2 without ASAM from the zero start, on the structured path
    (:meth:`~sharpscope.sharpness._objective.ChunkedObjective.span_slots`)."""
    if not factored or p != 2.0 or adaptive or random_init or steps < 1:
        return None
    slots = objective.span_slots(xc, yc, rows=m, entries=steps)
    if not slots:
        return None
    return SpanBasis(slots, capacity=steps, rows=m, dtype=objective.dtype, device=objective.device)


def _setup(
    model: nn.Module, loss_fn: Any, batches: Any, *, params: Any, batch_size: int, vectorize: bool | None,
    check_deterministic: bool = True,
) -> tuple[ChunkedObjective, Any, Any]:
    """The objective and all samples as one batch ``(inputs, targets)`` (:func:`stack_data`); with
    ``check_deterministic`` data that change between passes (a shuffling ``DataLoader``) are refused first
    (:func:`sharpscope.batches.check_fixed_batches`, the message every analysis gives)."""
    objective = ChunkedObjective(model, loss_fn, params=params, batch_size=batch_size, vectorize=vectorize)
    if check_deterministic and not _is_one_batch(batches, loss_fn):
        check_fixed_batches(batches, opt_out="check_deterministic=False")
    x, y = stack_data(batches, device=objective.device, dtype=objective.dtype, loss_fn=loss_fn)
    return objective, x, y


def _estimate(
    measure: str, trace: Tensor, clean: Tensor, *, m: int, rho: float, p: float, adaptive: bool, eta: float,
    steps: int, perturbation: list[Tensor] | None = None,
) -> SharpnessEstimate:
    values = trace[:, -1]
    value, stderr = mean_and_stderr(values)
    return SharpnessEstimate(
        measure=measure, value=value, stderr=stderr, m=m, rho=rho, p=p, adaptive=adaptive, eta=eta, steps=steps,
        num_chunks=int(values.shape[0]), clean_loss=float(clean.detach().double().mean()),
        chunk_values=values.detach().to("cpu", torch.float64).numpy(),
        trace=trace.detach().to("cpu", torch.float64).mean(0).numpy(), perturbation=perturbation,
    )


# --------------------------------------------------------------------------------------------- public API
def worst_case_sharpness(
    model: nn.Module,
    loss_fn: Any,
    batches: Any,
    *,
    rho: float,
    m: int | None = None,
    p: float = 2.0,
    adaptive: bool = False,
    eta: float = 0.01,
    steps: int = 20,
    random_init: bool = False,
    max_chunks: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    params: Sequence[str | Tensor] | None = None,
    batch_size: int = 256,
    vectorize: bool | None = None,
    check_deterministic: bool = True,
    return_perturbation: bool = False,
    on_progress: Callable[[int], Any] | None = None,
    shard: tuple[int, int] | None = None,
) -> SharpnessEstimate:
    """Worst-case sharpness ``E_B[max_{||delta/c||_p <= rho} L_B(w + delta) - L_B(w)]`` (module docstring).

    Args:
        model: the network at ``w``; evaluated in eval mode (each submodule's mode is restored afterwards)
            and never modified.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d`` mean loss over a chunk (e.g. ``nn.CrossEntropyLoss()``), or
            a :class:`sharpscope.batches.BatchLoss` ``(fn)`` with ``fn(model, batch) -> 0-d``.
        batches: one batch ``(inputs, targets)`` whose inputs or targets is a tensor (e.g. ``(x, y)`` tensors), or an
            iterable of batches (``sharpscope.data.EvalBatches``, a list, a ``DataLoader`` with ``shuffle=False``);
            inputs a tensor, a tuple of tensors (``model(*inputs)``) or a dict (:mod:`sharpscope.batches`); all
            samples are used as one fixed evaluation set, cut into chunks along dim 0 of every tensor.
        rho: radius of the perturbation set (in units of ``c``).
        m: samples per chunk ``B``; ``None`` = the whole set (full-batch sharpness). ``m`` larger than the set
            is an error; the last ``N mod m`` samples are left out.
        p: 2 (l2 ball) or ``math.inf`` (box).
        adaptive: scale the set elementwise by ``c = |w| + eta`` (ASAM, Kwon et al. 2021).
        eta: the additive term of ``c`` (0.01 as in Kwon et al.).
        steps: ascent steps; 1 gives SAM's one-step estimate, 20 is Andriushchenko et al. 2023's default.
        random_init: start each chunk's ascent from a random feasible point instead of ``delta = 0`` (needed at
            exact critical points, where the gradient is zero).
        max_chunks: use only the first this many chunks (after shuffling), to bound the cost.
        shuffle: permute the samples (seeded) before cutting chunks; ``False`` keeps the data's order.
        seed: seeds the permutation and the random starts.
        params: which parameters are perturbed: ``None`` for all with ``requires_grad``, or names / tensors.
        batch_size: at most this many samples per forward pass (memory only).
        vectorize: ``vmap`` over chunks (``True``), a loop (``False``), or try ``vmap`` first (``None``).
        check_deterministic: refuse data that change between passes (a shuffling ``DataLoader``) and a model whose
            loss changes between two identical evaluations.
        return_perturbation: also return the best perturbation of every chunk (memory: one model per chunk).
        on_progress: called with the number of chunks finished after each group (e.g. ``tqdm.update``).
        shard: ``(rank, world_size)`` inside a ``torch.distributed`` job: every rank calls with the same
            arguments, ascends its contiguous block of chunks, and all ranks return the result one process gets
            (each chunk's ascent depends on that chunk only).

    Returns:
        A :class:`SharpnessEstimate` (``measure="worst"``) with the mean over chunks, its standard error,
        per-chunk values and the mean best-so-far ``trace`` over steps.
    """
    rho = _check_positive("rho", rho)
    p = _check_p(p)
    eta = _check_positive("eta", eta) if adaptive else float(eta)
    steps = _check_count("steps", steps)
    distributed.check_shard(shard)
    objective, x, y = _setup(model, loss_fn, batches, params=params, batch_size=batch_size, vectorize=vectorize,
                             check_deterministic=check_deterministic)
    xc, yc = make_chunks(x, y, m=m, shuffle=shuffle, seed=seed, max_chunks=max_chunks)
    with eval_mode(model):
        if check_deterministic:
            objective.check_deterministic(xc, yc)
        trace, clean, delta = _worst_case_on_chunks(
            objective, xc, yc, rho=rho, p=p, adaptive=adaptive, eta=eta, steps=steps, random_init=random_init,
            seed=seed, keep_perturbation=return_perturbation, on_progress=on_progress, shard=shard,
        )
    return _estimate("worst", trace, clean, m=leading_size((xc, yc), 1), rho=rho, p=p, adaptive=adaptive, eta=eta,
                     steps=steps, perturbation=delta)


def m_sharpness(
    model: nn.Module,
    loss_fn: Any,
    batches: Any,
    *,
    m_values: Sequence[int] = (1, 8, 32, 128),
    rho_values: Sequence[float] = (0.01, 0.05, 0.1),
    measure: str = "worst",
    p: float = 2.0,
    adaptive: bool = False,
    eta: float = 0.01,
    steps: int = 20,
    num_draws: int = 20,
    random_init: bool = False,
    max_chunks: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    params: Sequence[str | Tensor] | None = None,
    batch_size: int = 256,
    vectorize: bool | None = None,
    check_deterministic: bool = True,
    on_progress: Callable[[int], Any] | None = None,
    shard: tuple[int, int] | None = None,
    partial: PartialResults | None = None,
) -> SharpnessResult:
    """Sharpness for every ``(m, rho)`` of a grid: Foret et al. 2021's m-sharpness (section 4.1, Fig. 3).

    Each cell is :func:`worst_case_sharpness` (``measure="worst"``) or
    :func:`sharpscope.sharpness.average_case_sharpness` (``measure="average"``, ``num_draws`` noise draws per
    chunk) with chunks of ``m`` samples cut from the same shuffled evaluation set; see those functions for the
    arguments (``shard`` splits every cell's chunks over the ranks of a ``torch.distributed`` job). The default
    grids are the SAM paper's ``m`` (1 to 128) and its common ``rho`` values.
    Larger ``rho`` for ``p = inf`` or adaptive sets should be much smaller (Andriushchenko et al. 2023 use
    ``rho`` ~ 1e-3 for adaptive l-inf).

    ``partial`` (a :class:`~sharpscope.sharpness.partial.PartialResults`; not with ``shard``) records every
    finished block of chunks of every cell and skips the blocks it already holds: a run interrupted mid-grid
    and called again with the same store resumes there, with bit-identical results on the same device.

    Returns:
        A :class:`SharpnessResult` with ``(len(m_values), len(rho_values))`` arrays of values and stderrs.
    """
    from sharpscope.sharpness.average_case import _average_case_on_chunks

    if measure not in ("worst", "average"):
        raise unknown_name_error("m-sharpness measure", str(measure), ["worst", "average"])
    m_list = [_check_count("m", m) for m in m_values]
    rho_list = [_check_positive("rho", rho) for rho in rho_values]
    if not m_list or not rho_list:
        raise SharpscopeError("m_values and rho_values must each hold at least one value")
    p = _check_p(p)
    eta = _check_positive("eta", eta) if adaptive else float(eta)
    steps = _check_count("steps", steps)
    num_draws = _check_count("num_draws", num_draws)
    distributed.check_shard(shard)
    objective, x, y = _setup(model, loss_fn, batches, params=params, batch_size=batch_size, vectorize=vectorize,
                             check_deterministic=check_deterministic)
    chunks = [make_chunks(x, y, m=m, shuffle=shuffle, seed=seed, max_chunks=max_chunks) for m in m_list]
    estimates = []
    with eval_mode(model):
        if check_deterministic:
            objective.check_deterministic(*chunks[0])
        for m, (xc, yc) in zip(m_list, chunks):
            for rho in rho_list:
                if measure == "worst":
                    trace, clean, _ = _worst_case_on_chunks(
                        objective, xc, yc, rho=rho, p=p, adaptive=adaptive, eta=eta, steps=steps,
                        random_init=random_init, seed=seed, keep_perturbation=False, on_progress=on_progress, shard=shard,
                        partial=partial,
                    )
                    estimates.append(_estimate("worst", trace, clean, m=m, rho=rho, p=p, adaptive=adaptive, eta=eta,
                                               steps=steps))
                else:
                    estimates.append(_average_case_on_chunks(
                        objective, xc, yc, rho=rho, p=p, adaptive=adaptive, eta=eta, num_draws=num_draws,
                        seed=seed, on_progress=on_progress, shard=shard, partial=partial,
                    ))
    shape = (len(m_list), len(rho_list))
    return SharpnessResult(
        measure=measure, m_values=tuple(m_list), rho_values=tuple(rho_list),
        values=np.array([e.value for e in estimates]).reshape(shape),
        stderr=np.array([e.stderr for e in estimates]).reshape(shape),
        clean_loss=np.array([e.clean_loss for e in estimates]).reshape(shape),
        num_chunks=np.array([leading_size(c, 0) for c in chunks]), p=p, adaptive=adaptive, eta=eta,
        steps=steps if measure == "worst" else num_draws, num_samples=leading_size((x, y), 0),
        estimates=tuple(estimates),
    )

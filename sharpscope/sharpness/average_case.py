"""Average-case sharpness: the mean loss increase under random weight perturbations.

.. math::

    S_{\\mathrm{avg}}(w) = \\mathbb{E}_B\\, \\mathbb{E}_{\\delta} \\big[ L_B(w + \\delta) - L_B(w) \\big],
    \\qquad \\delta = \\rho\\, c \\odot \\xi, \\quad c = |w| + \\eta \\ \\text{(adaptive)} \\ \\text{or} \\ 1,

with ``xi ~ N(0, I)`` (``p = 2``) or ``xi ~ U[-1, 1]^n`` (``p = inf``), over disjoint chunks ``B`` of ``m``
samples (Andriushchenko et al. 2023, section 3, "average-case sharpness"; their default is 20 draws per
chunk). For a quadratic loss ``L_B(w + delta) - L_B(w) = g^T delta + delta^T A delta / 2`` the expectation is
``rho^2 / 2 * sum_i c_i^2 A_ii`` (Gaussian) or a third of it (uniform): the closed form the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sharpscope import distributed
from sharpscope.batches import map_samples
from sharpscope.hessian.operator import eval_mode
from sharpscope.sharpness._objective import (
    ChunkedObjective,
    chunk_group_size,
    gather_blocks,
    leading_size,
    make_chunks,
    seeded_draws,
    take,
)
from sharpscope.errors import SharpscopeError
from sharpscope.sharpness.partial import PartialResults
from sharpscope.sharpness.result import SharpnessEstimate
from sharpscope.sharpness.worst_case import (
    _check_count,
    _check_p,
    _check_positive,
    _setup,
    scale_of,
)

__all__ = ["average_case_sharpness"]


def _average_case_on_chunks(
    objective: ChunkedObjective,
    xc: Tensor,
    yc: Tensor,
    *,
    rho: float,
    p: float,
    adaptive: bool,
    eta: float,
    num_draws: int,
    seed: int,
    on_progress: Callable[[float], Any] | None,
    shard: tuple[int, int] | None = None,
    partial: PartialResults | None = None,
) -> SharpnessEstimate:
    """Average-case sharpness of every chunk; the ``C x num_draws`` (chunk, draw) pairs run in vmapped groups.

    With ``shard=(rank, world_size)`` this rank evaluates its contiguous block of chunks (every draw of a chunk
    comes from that chunk's own seeded stream) and the ranks exchange the per-draw increases.

    With ``partial`` every finished group's perturbed losses are recorded under ``a|m|rho|first-last`` (item
    indices) and groups found there are not evaluated again (the clean losses, one forward per group, are).
    The group is shrunk to the memory available (:func:`sharpscope.sharpness.memory.fit_group`).
    """
    from sharpscope.sharpness.memory import fit_group
    from sharpscope.sharpness.worst_case import objective_activations

    if partial is not None and shard is not None:
        raise SharpscopeError("partial results are kept in one process only (not with shard)")
    num_chunks, m = leading_size((xc, yc), 0), leading_size((xc, yc), 1)
    scale = scale_of(objective.params, adaptive=adaptive, eta=eta)
    group = chunk_group_size(m, objective.num_params, batch_size=objective.batch_size, copies=2)
    group = fit_group(group, m=m, num_params=objective.num_params, copies=2,
                      itemsize=torch.finfo(objective.dtype).bits // 8, batch_size=objective.batch_size,
                      activations=objective_activations(objective, xc), device=objective.device,
                      what=f"{'adaptive ' if adaptive else ''}average-case sharpness")
    mine = distributed.block(num_chunks, shard)
    clean = torch.cat([torch.zeros(0, dtype=objective.dtype, device=objective.device)] + [
        objective.value(objective.zeros(min(group, mine.stop - first)),
                        *take((xc, yc), slice(first, min(first + group, mine.stop))))
        for first in range(mine.start, mine.stop, group)
    ])
    perturbed = [torch.zeros(0, dtype=objective.dtype, device=objective.device)]
    for first in range(mine.start * num_draws, mine.stop * num_draws, group):
        items = range(first, min(first + group, mine.stop * num_draws))  # item = chunk * num_draws + draw
        index = torch.arange(items.start, items.stop) // num_draws
        key = f"a|m={m}|rho={rho!r}|{items.start}-{items.stop}"
        saved = partial.get(key) if partial is not None else None
        if saved is not None:
            perturbed.append(torch.from_numpy(saved).to(device=objective.device, dtype=objective.dtype))
        else:
            xi = seeded_draws(objective, items, seed=seed, kind="uniform" if p == math.inf else "normal")
            delta = [rho * t for t in xi] if scale is None else [rho * t * c for t, c in zip(xi, scale)]
            perturbed.append(objective.value(delta, *map_samples(lambda t: t[index.to(t.device)], (xc, yc))))
            del xi, delta
            if partial is not None:
                partial.put(key, perturbed[-1].detach().cpu().numpy(), chunks=len(items) / num_draws)
        if on_progress is not None:  # the other ranks advance alike: count the whole job
            on_progress(index.shape[0] / num_draws * (shard[1] if shard else 1))
    # a perturbation so large that the logits overflow gives a NaN loss (inf - inf inside log-softmax): the loss
    # has grown past the float range, so it counts as +inf rather than poisoning the mean as NaN
    perturbed_loss = torch.cat(perturbed).nan_to_num(nan=math.inf)
    increase = (perturbed_loss.reshape(len(mine), num_draws) - clean[:, None]).detach()
    increase, clean = gather_blocks((increase, clean), shard)
    increase = increase.to("cpu", torch.float64)
    chunk_values = increase.mean(1)
    if num_chunks > 1:
        stderr = float(chunk_values.std(correction=1)) / math.sqrt(num_chunks)
    elif num_draws > 1:  # one chunk: the spread comes from the draws alone
        stderr = float(increase[0].std(correction=1)) / math.sqrt(num_draws)
    else:
        stderr = float("nan")
    return SharpnessEstimate(
        measure="average", value=float(chunk_values.mean()), stderr=stderr, m=int(m), rho=rho, p=p,
        adaptive=adaptive, eta=eta, steps=num_draws, num_chunks=int(num_chunks),
        clean_loss=float(clean.detach().double().mean()), chunk_values=chunk_values.numpy(),
        trace=np.zeros(0),
    )


def average_case_sharpness(
    model: nn.Module,
    loss_fn: Any,
    batches: Any,
    *,
    rho: float,
    m: int | None = None,
    p: float = 2.0,
    adaptive: bool = False,
    eta: float = 0.01,
    num_draws: int = 20,
    max_chunks: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    params: Sequence[str | Tensor] | None = None,
    batch_size: int = 256,
    vectorize: bool | None = None,
    check_deterministic: bool = True,
    on_progress: Callable[[float], Any] | None = None,
    shard: tuple[int, int] | None = None,
) -> SharpnessEstimate:
    """Average-case sharpness ``E_B E_delta[L_B(w + delta) - L_B(w)]`` (module docstring).

    Args:
        model, loss_fn, batches, m, adaptive, eta, max_chunks, shuffle, params, batch_size, vectorize,
            check_deterministic: as in :func:`sharpscope.sharpness.worst_case_sharpness`.
        rho: noise scale: ``delta = rho * c * xi``.
        p: 2 for Gaussian ``xi``, ``math.inf`` for uniform ``xi`` on ``[-1, 1]`` (Andriushchenko et al.'s
            avg-l2 and avg-linf).
        num_draws: noise draws per chunk (20 in Andriushchenko et al. 2023).
        seed: seeds the sample permutation and the noise.
        on_progress: called with the number of chunks finished (fractional: draws are grouped across chunks).
        shard: ``(rank, world_size)`` inside a ``torch.distributed`` job: chunks split over the ranks, the same
            result on every rank as in one process.

    Returns:
        A :class:`SharpnessEstimate` (``measure="average"``, ``steps = num_draws``). ``stderr`` is the standard
        error over chunks of the per-chunk means (it includes the noise of the draws); with a single chunk it
        is the standard error over the draws.
    """
    rho = _check_positive("rho", rho)
    p = _check_p(p)
    eta = _check_positive("eta", eta) if adaptive else float(eta)
    num_draws = _check_count("num_draws", num_draws)
    distributed.check_shard(shard)
    objective, x, y = _setup(model, loss_fn, batches, params=params, batch_size=batch_size, vectorize=vectorize,
                             check_deterministic=check_deterministic)
    xc, yc = make_chunks(x, y, m=m, shuffle=shuffle, seed=seed, max_chunks=max_chunks)
    with eval_mode(model):
        if check_deterministic:
            objective.check_deterministic(xc, yc)
        return _average_case_on_chunks(
            objective, xc, yc, rho=rho, p=p, adaptive=adaptive, eta=eta, num_draws=num_draws,
            seed=seed, on_progress=on_progress, shard=shard,
        )

"""Stochastic trace estimators of a symmetric operator: Hutchinson and Hutch++, seeded, with standard errors.

* Hutchinson (1989): ``tr(H) ~ (1/m) sum_i z_i^T H z_i`` with i.i.d. probes ``E[z z^T] = I``; Rademacher probes
  have the smallest variance, ``2 (||H||_F^2 - sum_i H_ii^2)`` per probe.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: optimal stochastic trace estimation", SOSA,
  Algorithm 1): with ``s = m // 3`` sketch probes ``S``, ``Q = orth(H S)`` captures the top of the spectrum; then
  ``tr(H) ~ tr(Q^T H Q) + (1/g) sum_i g_i^T (I - QQ^T) H (I - QQ^T) g_i`` with the remaining ``g = m - 2s``
  probes. The first term is exact; the error is Hutchinson's on the deflated matrix, ``O(1/m)`` instead of
  ``O(1/sqrt(m))`` for fast-decaying spectra, and zero for ranks ``<= s``.

Probes are processed ``block_size`` at a time as one batched product (several vectors per data pass).
Standard errors are the sample standard deviation of the per-probe estimates over ``sqrt(#probes)``; for
Hutch++ only the stochastic (deflated) part contributes.

Under ``torch.distributed`` (``shard=(rank, world_size)``) every rank draws *all* probes from the one seeded
generator, exactly as a single process does, multiplies only its columns ``rank, rank + world_size, ...`` and
the products or per-probe values are all-gathered back into probe order, so every rank returns the
single-process estimate up to rounding (batched products of other column blocks round differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError
from sharpscope.distributed import check_shard
from sharpscope.hessian._operators import Float64Operator, make_generator, random_vectors

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace"]


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate."""

    value: float  # the estimate of tr(H)
    stderr: float  # standard error of ``value`` (0 when the estimate is exact, e.g. Hutch++ on low rank)
    num_matvecs: int  # Hessian-vector products spent
    method: str  # "hutchinson" | "hutch++"
    samples: Tensor  # (num probes,) float64 per-probe estimates of the stochastic part (Hutch++: deflated part)

    @property
    def interval(self) -> tuple[float, float]:
        """An approximate 95% confidence interval ``value -+ 1.96 stderr`` (normal approximation)."""
        return (self.value - 1.96 * self.stderr, self.value + 1.96 * self.stderr)


def _quadratic_forms(A: Float64Operator, Z: Tensor, block_size: int, shard: tuple[int, int] | None = None) -> Tensor:
    """``z_i^T H z_i`` for each column of ``Z``, ``block_size`` columns per batched product.

    With ``shard=(rank, world_size)`` this rank computes columns ``rank::world_size`` and all ranks exchange the
    values: every rank returns all of them, in column order.
    """
    if shard is not None:
        from sharpscope import distributed

        columns = list(range(Z.shape[1]))[shard[0] :: shard[1]]
        local = _quadratic_forms(A, Z[:, columns], block_size) if columns else torch.zeros(0, dtype=torch.float64)
        values = torch.zeros(Z.shape[1], dtype=torch.float64)
        for part_columns, part in distributed.all_gather((columns, local)):
            values[part_columns] = part
        return values
    values = []
    for start in range(0, Z.shape[1], block_size):
        block = Z[:, start : start + block_size]
        values.append((block * A.matmat(block)).sum(dim=0))
    return torch.cat(values).cpu()


def _total_matvecs(A: Float64Operator, shard: tuple[int, int] | None) -> int:
    """Products spent here, or by all ranks together when sharded."""
    if shard is None:
        return A.num_matvecs
    from sharpscope import distributed

    return int(sum(distributed.all_gather(A.num_matvecs)))


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.nan
    return float(samples.std(unbiased=True) / math.sqrt(samples.numel()))


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise SharpscopeError(f"block_size must be >= 1 (probes per batched product), got {block_size}")


def hutchinson_trace(
    op: Any,
    *,
    num_matvecs: int,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 16,
    shard: tuple[int, int] | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(H)`` from ``num_matvecs`` probes.

    Args:
        op: a symmetric operator (HessianOperator, dense tensor, or anything with ``shape`` and ``@``).
        num_matvecs: probes (one product each); at least 2, for the standard error.
        seed: seeds the probes (drawn on the CPU: the same probes on every device).
        distribution: ``"rademacher"`` (entries +-1, minimum variance) or ``"gaussian"``.
        block_size: probes per batched product (memory: ``n * block_size`` numbers).
        shard: ``(rank, world_size)`` inside a ``torch.distributed`` job: this rank multiplies its share of the
            probes and the per-probe values are all-gathered (see the module docstring); ``None``: all here.

    Returns:
        :class:`TraceEstimate` with ``value = mean(z_i^T H z_i)`` and ``stderr = std / sqrt(num_matvecs)``.

    Raises:
        SharpscopeError: for ``num_matvecs < 2``, an unknown ``distribution``, ``block_size < 1`` or a ``shard``
            that does not match the process group.
    """
    if num_matvecs < 2:
        raise SharpscopeError(f"num_matvecs must be >= 2 so the standard error is defined, got {num_matvecs}")
    _check_block_size(block_size)
    check_shard(shard)
    A = Float64Operator(op)
    Z = random_vectors(A.n, num_matvecs, generator=make_generator(seed), distribution=distribution, device=A.device)
    samples = _quadratic_forms(A, Z, block_size, shard)
    return TraceEstimate(
        value=float(samples.mean()), stderr=_stderr(samples), num_matvecs=_total_matvecs(A, shard),
        method="hutchinson",
        samples=samples,
    )


def hutchpp_trace(
    op: Any,
    *,
    num_matvecs: int,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = 16,
    shard: tuple[int, int] | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(H)`` (Meyer et al. 2021, Algorithm 1) from ``num_matvecs`` products.

    Args:
        op: a symmetric operator.
        num_matvecs: total products ``m >= 4``: ``s = m // 3`` for the sketch ``H S``, ``s`` for ``H Q``, and
            ``m - 2s >= 2`` Hutchinson probes on the deflated operator.
        seed, distribution, block_size, shard: as for :func:`hutchinson_trace`; sharded, the sketch ``H S`` is
            computed column-wise over the ranks and all-gathered, and rank 0's ``Q`` is broadcast to all.

    Returns:
        :class:`TraceEstimate`; ``stderr`` covers the stochastic deflated part (the ``Q`` part is exact). For an
        operator of rank ``<= s`` the estimate is exact up to rounding.

    Raises:
        SharpscopeError: for ``num_matvecs < 4``, an unknown ``distribution``, ``block_size < 1`` or a ``shard``
            that does not match the process group.
    """
    if num_matvecs < 4:
        raise SharpscopeError(
            f"hutchpp_trace needs num_matvecs >= 4 (a third for the sketch, a third for the projection, >= 2 probes), "
            f"got {num_matvecs}"
        )
    _check_block_size(block_size)
    check_shard(shard)
    A = Float64Operator(op)
    s = min(num_matvecs // 3, A.n)
    g = num_matvecs - 2 * s
    generator = make_generator(seed)
    S = random_vectors(A.n, s, generator=generator, distribution=distribution, device=A.device)
    G = random_vectors(A.n, g, generator=generator, distribution=distribution, device=A.device)
    if shard is None:
        HS = torch.cat([A.matmat(S[:, i : i + block_size]) for i in range(0, s, block_size)], dim=1)
        Q, _ = torch.linalg.qr(HS)
        HQ = torch.cat([A.matmat(Q[:, i : i + block_size]) for i in range(0, s, block_size)], dim=1)
        exact_part = float((Q * HQ).sum())
    else:
        from sharpscope import distributed

        columns = list(range(s))[shard[0] :: shard[1]]
        local = (torch.cat([A.matmat(S[:, columns[i : i + block_size]]) for i in range(0, len(columns), block_size)],
                           dim=1).cpu() if columns else None)
        parts = distributed.gather_to_main((columns, local))
        Q = None
        if parts is not None:  # rank 0 assembles H S in column order and orthogonalises it, once
            HS = torch.zeros(A.n, s, dtype=torch.float64)
            for part_columns, part in parts:
                if part is not None:
                    HS[:, part_columns] = part
            Q, _ = torch.linalg.qr(HS)
        Q = distributed.broadcast_from_main(Q).to(A.device)
        exact_part = float(_quadratic_forms(A, Q, block_size, shard).sum())
    G = G - Q @ (Q.T @ G)
    samples = _quadratic_forms(A, G, block_size, shard)
    return TraceEstimate(
        value=exact_part + float(samples.mean()), stderr=_stderr(samples), num_matvecs=_total_matvecs(A, shard),
        method="hutch++", samples=samples,
    )

"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan & Xiao 2019 ("An investigation into neural net optimization via Hessian eigenvalue density",
ICML, Section 3; Lin, Saad & Yang 2016 for the method): for a random unit vector ``v`` (normalised Rademacher),
``m`` Lanczos steps give a tridiagonal ``T = Y diag(theta) Y^T`` and the Gauss quadrature

.. math::

    v^T f(H) v \\approx \\sum_{i=1}^m \\tau_i f(\\theta_i), \\qquad \\tau_i = (e_1^T y_i)^2, \\quad
    \\sum_i \\tau_i = 1,

whose expectation over ``v`` is ``(1/n) tr f(H)``: the nodes ``theta`` and weights ``tau`` are a discrete
measure approximating the eigenvalue distribution of ``H``. Averaging ``num_runs`` independent runs and
replacing each node by a Gaussian of width ``sigma`` gives a smooth density that integrates to 1. The runs are
independent, so all of them advance together with one batched product per step (``num_runs`` vectors per data
pass). Defaults follow Ghorbani et al.: ~90 Lanczos steps ("80-90 are certainly enough for most models"),
full reorthogonalisation, several runs, Gaussian smoothing; the grid bounds are the extreme Ritz values of the
runs themselves (no extra products) widened by ``margin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError
from sharpscope.hessian._operators import Float64Operator, make_generator, random_vectors

__all__ = ["SpectralDensity", "spectral_density", "smoothed_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """An eigenvalue density estimate from :func:`spectral_density` (all tensors float64 on CPU)."""

    grid: Tensor  # (num_points,) eigenvalue axis, from the extreme Ritz values widened by the margin
    density: Tensor  # (num_points,) smoothed density on ``grid``; trapezoid integral = 1
    nodes: Tensor  # (num_runs, num_iters) Ritz values (Gauss nodes) of each run; unused slots repeat a node
    weights: Tensor  # (num_runs, num_iters) Gauss weights; each row sums to 1; unused slots (breakdown) are 0
    sigma: float  # absolute width of the Gaussian kernel (same units as eigenvalues)
    num_matvecs: int  # Hessian-vector products spent (num_runs * Lanczos steps)
    num_params: int  # n, the operator's size

    @property
    def trace_estimate(self) -> float:
        """The SLQ trace estimate ``n * mean_runs sum_i tau_i theta_i`` (free with the density)."""
        return float(self.num_params * (self.weights * self.nodes).sum(dim=1).mean())

    @property
    def lambda_min(self) -> float:
        """Smallest Ritz value over the runs (converges fast to the smallest eigenvalue)."""
        return float(self.nodes[self.weights > 0].min()) if (self.weights > 0).any() else float(self.nodes.min())

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value over the runs (converges fast to the largest eigenvalue)."""
        return float(self.nodes[self.weights > 0].max()) if (self.weights > 0).any() else float(self.nodes.max())

    def cdf(self, points: Tensor) -> Tensor:
        """The cumulative distribution of the quadrature measure (before smoothing) at ``points``."""
        points = torch.as_tensor(points, dtype=torch.float64)
        nodes, weights = self.nodes.reshape(-1), self.weights.reshape(-1) / self.nodes.shape[0]
        return ((nodes[None, :] <= points.reshape(-1, 1)) * weights[None, :]).sum(dim=1).reshape(points.shape)


def smoothed_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``sum_i w_i N(grid; nodes_i, sigma^2)`` on a uniform ``grid``, normalised to trapezoid integral 1.

    ``weights`` should sum to 1; the renormalisation only removes the (tiny) Gaussian tails cut by the grid. Each
    Gaussian is evaluated on the grid points within 9 sigma of its node (the rest is below ``e^-40`` of the peak),
    so the cost is ``O(num_nodes * sigma / spacing)`` rather than ``O(num_nodes * num_points)``.
    """
    nodes, weights, grid = nodes.reshape(-1), weights.reshape(-1), grid.reshape(-1)
    keep = weights > 0
    nodes, weights = nodes[keep], weights[keep]
    size = grid.numel()
    spacing = float(grid[1] - grid[0])
    half_width = math.ceil(9 * sigma / spacing)
    density = torch.zeros_like(grid)
    if 2 * half_width + 1 >= size:  # wide kernels: every node touches every grid point
        for start in range(0, nodes.numel(), 256):  # bounds memory at 256 * num_points
            z = (grid[:, None] - nodes[None, start : start + 256]) / sigma
            density += (torch.exp(-0.5 * z * z) * weights[None, start : start + 256]).sum(dim=1)
    else:
        offsets = torch.arange(-half_width, half_width + 1)
        centers = torch.round((nodes - grid[0]) / spacing).long()
        for start in range(0, nodes.numel(), 1024):
            index = centers[start : start + 1024, None] + offsets[None, :]
            inside = (index >= 0) & (index < size)
            index = index.clamp(0, size - 1)
            z = (grid[index] - nodes[start : start + 1024, None]) / sigma
            values = torch.exp(-0.5 * z * z) * weights[start : start + 1024, None] * inside
            density.index_add_(0, index.reshape(-1), values.reshape(-1))
    density /= sigma * math.sqrt(2 * math.pi)
    mass = torch.trapezoid(density, grid)
    if mass > 0:
        density /= mass
    return density


def spectral_density(
    op: Any,
    *,
    num_iters: int = 90,
    num_runs: int = 5,
    sigma: float = 1e-3,
    num_points: int = 10000,
    margin: float = 0.05,
    bounds: tuple[float, float] | None = None,
    seed: int = 0,
    reorthogonalize: bool = True,
    shard: tuple[int, int] | None = None,
) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        op: a symmetric operator (HessianOperator, dense tensor, or anything with ``shape`` and ``@``).
        num_iters: Lanczos steps per run (capped at ``n``) [default 90, Ghorbani et al. 2019, Section 3].
        num_runs: independent Rademacher start vectors, advanced together in batched products [default 5].
        sigma: Gaussian kernel width *relative to the spectral range* ``lambda_max - lambda_min`` of the nodes
            [default 1e-3; Ghorbani et al. use sigma^2 = 1e-5 * max(1, range), i.e. 3e-3 of a range of 1 and
            1e-4 of a range of 1000].
        num_points: grid points [default 10000, as Ghorbani et al.]; keep the spacing below ``sigma``.
        margin: the grid spans the extreme Ritz values widened by ``margin * range`` on each side.
        bounds: explicit ``(low, high)`` grid bounds instead of the Ritz extremes (e.g. to share one grid across
            checkpoints); ``margin`` is not applied to them.
        seed: seeds the start vectors (drawn on the CPU).
        reorthogonalize: full reorthogonalisation against the stored basis (``num_iters * n * num_runs`` float64
            numbers of memory). ``False`` runs the plain three-term recurrence in ``O(n)`` memory: cheaper for
            huge models, at the price of spurious copies of converged Ritz values (their weights stay correct
            in aggregate; Papyan 2020 uses no reorthogonalisation).
        shard: ``(rank, world_size)`` inside a ``torch.distributed`` job of that size: every rank draws all
            ``num_runs`` start vectors from ``seed`` (so they are those of one process), runs its share
            ``rank, rank + world_size, ...`` of them, and the nodes and weights are all-gathered back into run
            order on every rank; the result equals the single-process one up to rounding. ``None``: all runs here.

    Returns:
        :class:`SpectralDensity` (grid, density, raw nodes and weights, the absolute ``sigma``).

    Raises:
        SharpscopeError: for non-positive ``num_iters``, ``num_runs`` or ``sigma``, ``num_points < 2``, a
            negative ``margin`` or ``bounds`` with ``low >= high``, or a ``shard`` that does not match the
            process group.
    """
    if num_iters < 1 or num_runs < 1:
        raise SharpscopeError(f"num_iters and num_runs must be >= 1, got num_iters={num_iters}, num_runs={num_runs}")
    if not sigma > 0:
        raise SharpscopeError(f"sigma must be > 0 (a fraction of the spectral range such as 1e-3), got {sigma}")
    if num_points < 2:
        raise SharpscopeError(f"num_points must be >= 2, got {num_points}")
    if margin < 0:
        raise SharpscopeError(f"margin must be >= 0, got {margin}")
    if bounds is not None and not bounds[0] < bounds[1]:
        raise SharpscopeError(f"bounds must be (low, high) with low < high, got {bounds}")
    from sharpscope.distributed import check_shard

    check_shard(shard)
    A = Float64Operator(op)
    n, device = A.n, A.device
    steps = min(num_iters, n)
    v = random_vectors(n, num_runs, generator=make_generator(seed), distribution="rademacher", device=device)
    v /= math.sqrt(n)
    if shard is None:
        nodes, weights = _slq_runs(A, v, steps, reorthogonalize)
        num_matvecs = A.num_matvecs
    else:
        from sharpscope import distributed

        runs = list(range(num_runs))[shard[0] :: shard[1]]
        local = _slq_runs(A, v[:, runs], steps, reorthogonalize) if runs else None
        nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
        weights = torch.zeros(num_runs, steps, dtype=torch.float64)
        num_matvecs = 0
        for part_runs, part, part_matvecs in distributed.all_gather((runs, local, A.num_matvecs)):
            if part is not None:
                nodes[part_runs], weights[part_runs] = part
            num_matvecs += part_matvecs
    if bounds is None:
        low, high = float(nodes.min()), float(nodes.max())
        width = high - low if high > low else max(abs(high), 1.0)
        low, high = low - margin * width, high + margin * width
    else:
        low, high = float(bounds[0]), float(bounds[1])
        width = float(nodes.max() - nodes.min()) or max(abs(high - low), 1.0)
    grid = torch.linspace(low, high, num_points, dtype=torch.float64)
    sigma_abs = sigma * width
    density = smoothed_density(nodes, weights / num_runs, grid, sigma_abs)
    return SpectralDensity(
        grid=grid, density=density, nodes=nodes, weights=weights, sigma=sigma_abs, num_matvecs=num_matvecs,
        num_params=n,
    )


def _slq_runs(A: Float64Operator, v: Tensor, steps: int, reorthogonalize: bool) -> tuple[Tensor, Tensor]:
    """Batched Lanczos from the unit columns of ``v`` ``(n, runs)``: Gauss nodes and weights, each ``(runs, steps)``."""
    n, device = A.n, A.device
    num_runs = v.shape[1]
    alphas = torch.zeros(steps, num_runs, dtype=torch.float64)
    betas = torch.zeros(steps, num_runs, dtype=torch.float64)
    lengths = torch.full((num_runs,), steps, dtype=torch.long)
    active = torch.ones(num_runs, dtype=torch.bool)
    # (runs, steps, n): each run's basis is one contiguous matrix, so reorthogonalisation is two batched matmuls
    basis = torch.empty(num_runs, steps, n, dtype=torch.float64, device=device) if reorthogonalize else None
    if reorthogonalize:
        basis[:, 0] = v.T
    previous, beta_prev = torch.zeros_like(v), torch.zeros(num_runs, dtype=torch.float64, device=device)
    scale = 0.0
    for j in range(steps):
        if bool(active.all()):
            w = A.matmat(v)
        else:  # runs that broke down need no more products
            w = torch.zeros_like(v)
            w[:, active.to(device)] = A.matmat(v[:, active.to(device)])
        alpha = (w * v).sum(dim=0)
        w = w - alpha * v - beta_prev * previous
        if reorthogonalize:
            stacked = basis[:, : j + 1]  # (runs, j + 1, n)
            # Full reorthogonalisation of each run against its own basis; a second pass only when the first removed
            # a large part of w (the "twice is enough" criterion of Daniel, Gragg, Kaufman & Stewart 1976).
            for _ in range(2):
                norm_before = w.norm(dim=0)
                coefficients = torch.bmm(stacked, w.T.unsqueeze(2))  # (runs, j + 1, 1)
                w = w - torch.bmm(stacked.transpose(1, 2), coefficients).squeeze(2).T
                alpha = alpha + coefficients[:, -1, 0]
                if not bool((w.norm(dim=0) < 0.7071 * norm_before).any()):
                    break
        beta = w.norm(dim=0)
        alphas[j], betas[j] = alpha.cpu(), beta.cpu()
        scale = max(scale, float(alphas[: j + 1].abs().max()), float(betas[: j + 1].max()))
        if j == steps - 1:
            break
        stopped = active & (betas[j] <= 64 * torch.finfo(torch.float64).eps * max(scale, 1e-300))
        if stopped.any():  # invariant subspace: the quadrature of that run is exact with j + 1 nodes
            lengths[stopped] = j + 1
            active &= ~stopped
        if not active.any():
            break
        safe_beta = torch.where(active.to(device), beta, torch.ones_like(beta))
        previous, v = v, torch.where(active.to(device), w / safe_beta, torch.zeros_like(w))
        beta_prev = torch.where(active.to(device), beta, torch.zeros_like(beta))
        if reorthogonalize:
            basis[:, j + 1] = v.T

    nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, steps, dtype=torch.float64)
    for r in range(num_runs):
        length = int(lengths[r])
        T = torch.diag(alphas[:length, r])
        if length > 1:
            off = betas[: length - 1, r]
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, Y = torch.linalg.eigh(T)
        nodes[r, :length], weights[r, :length] = theta, Y[0, :] ** 2
        nodes[r, length:] = theta[0]
    return nodes, weights

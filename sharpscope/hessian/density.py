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

Stopping (``tol``, the default; ``num_iters`` alone gives the classical fixed number of steps). The low moments
of a run's quadrature measure cannot serve: an ``m``-node Gauss rule integrates every polynomial of degree
``<= 2m - 1`` exactly, so moment ``p`` is final (to rounding) from step ``(p + 1) / 2`` on and "the first few
moments stopped changing" would stop after 3 steps. What keeps changing is the distribution at finer scales, and
the Chebyshev-Markov-Stieltjes inequalities (Szego 1939, Sec. 3.41; Golub & Meurant 2010, "Matrices, Moments and
Quadrature with Applications", Thm. 6.1) bound it with no extra product: the distribution function ``F_v`` of the
run's spectral measure ``mu_v = sum_i (q_i^T v)^2 delta_{lambda_i}`` satisfies
``sum_{i<j} tau_i <= F_v(theta_j - 0) <= F_v(theta_j) <= sum_{i<=j} tau_i`` at the ascending nodes, so between two
nodes it lies within ``max(tau_j, tau_{j+1})`` of the quadrature's step function ``F_m``, and

.. math::

    W_1(\\mu_v, \\mu_m) = \\int |F_v - F_m| \\, d\\lambda
    \\le \\sum_{j=1}^{m-1} (\\theta_{j+1} - \\theta_j) \\max(\\tau_j, \\tau_{j+1})

(the tails beyond the extreme Ritz values, which converge first, are not counted). Each run stops at the first
step ``m >= MIN_STEPS`` where this Wasserstein-1 bound is ``<= tol * (theta_m - theta_1)``, i.e. its quadrature
measure is within ``tol`` of the spectral range of the measure it approximates in the earth-mover distance; runs
that stop drop out of the batched product. The probe noise (``mu_v`` against the spectral distribution of ``H``)
is separate: it shrinks like ``1 / sqrt(n * num_runs)`` for the bulk; for the implied trace it is
:attr:`SpectralDensity.trace_stderr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError
from sharpscope.hessian._operators import Float64Operator, make_generator, random_vectors

__all__ = ["DEFAULT_TOL", "SpectralDensity", "spectral_density", "smoothed_density"]

#: Default stopping tolerance: Wasserstein-1 bound of each run's quadrature relative to its spectral range.
DEFAULT_TOL = 0.01
#: Default cap on Lanczos steps per run (Ghorbani et al. 2019, Section 3: "80-90 are certainly enough").
DEFAULT_MAX_ITERS = 90
#: Steps before the first stopping test.
MIN_STEPS = 8


@dataclass(frozen=True)
class SpectralDensity:
    """An eigenvalue density estimate from :func:`spectral_density` (all tensors float64 on CPU)."""

    grid: Tensor  # (num_points,) eigenvalue axis, from the extreme Ritz values widened by the margin
    density: Tensor  # (num_points,) smoothed density on ``grid``; trapezoid integral = 1
    nodes: Tensor  # (num_runs, num_iters) Ritz values (Gauss nodes) of each run; unused slots repeat a node
    weights: Tensor  # (num_runs, num_iters) Gauss weights; each row sums to 1; unused slots (breakdown) are 0
    sigma: float  # absolute width of the Gaussian kernel (same units as eigenvalues)
    num_matvecs: int  # Hessian-vector products spent (the sum of the runs' Lanczos steps)
    num_params: int  # n, the operator's size
    num_steps: Tensor | None = None  # (num_runs,) Lanczos steps each run took
    error_bounds: Tensor | None = None  # (num_runs,) W1 bound of each run's quadrature / its spectral range
    tol: float | None = None  # the stopping tolerance on error_bounds (None: fixed number of steps)

    def __repr__(self) -> str:
        """One line: support, implied trace +- stderr, runs, steps and products; not the grid."""
        if self.converged is None:
            rule = "fixed steps"
        else:
            rule = f"W1 bound <= {self.tol:g} {'met' if self.converged else 'NOT met'}"
        steps = "" if self.num_steps is None else f" ({int(self.num_steps.min())}-{int(self.num_steps.max())} steps)"
        stderr = self.trace_stderr
        return (f"SpectralDensity(n={self.num_params:,}, eigenvalues in [{self.lambda_min:.4g}, "
                f"{self.lambda_max:.4g}], SLQ trace {self.trace_estimate:.6g} +- "
                f"{stderr:.2g}, {self.nodes.shape[0]} runs{steps}, {rule}, sigma {self.sigma:.2g}, "
                f"{self.grid.numel()} grid points, {self.num_matvecs} HVPs)")

    @property
    def converged(self) -> bool | None:
        """Every run met ``tol`` (or ended in an exact invariant subspace); None for a fixed number of steps."""
        if self.tol is None or self.error_bounds is None:
            return None
        return bool((self.error_bounds <= self.tol).all())

    def moments(self, order: int) -> Tensor:
        """``(num_runs,)``: each run's quadrature moment ``sum_i tau_i theta_i^order``, an unbiased estimate of
        ``tr(H^order) / n`` (exact for ``order <= 2 * steps - 1``, up to the probe's randomness)."""
        return (self.weights * self.nodes**order).sum(dim=1)

    @property
    def run_traces(self) -> Tensor:
        """``(num_runs,)`` per-run trace estimates ``n * sum_i tau_i theta_i`` (Hutchinson with ``sqrt(n) v``)."""
        return self.num_params * self.moments(1)

    @property
    def trace_estimate(self) -> float:
        """The SLQ trace estimate ``n * mean_runs sum_i tau_i theta_i`` (free with the density)."""
        return float(self.run_traces.mean())

    @property
    def trace_stderr(self) -> float:
        """Standard error of :attr:`trace_estimate`, ``sqrt(2 n mean_runs(sum_i tau_i theta_i^2) / num_runs)``.

        Each run's trace ``n v^T H v = z^T H z`` (``z = sqrt(n) v`` Rademacher) has variance
        ``2 (||H||_F^2 - sum_i H_ii^2) <= 2 tr(H^2)`` and ``tr(H^2) = n E[v^T H^2 v]`` is each run's second
        quadrature moment, exact from 2 steps on: a plug-in for the variance from all the runs' nodes rather than
        the spread of a handful of per-run traces. That spread is useless at the usual 5 runs: per-run traces are
        sums of a few ``lambda_i chi^2_1`` terms (outliers dominate), so 5 of them underestimate their standard
        deviation 2-6 fold often (digits MLP: 3 of 3 seeds off by 2.2-6 "standard errors", benchmarks/
        bench_hessian_tour.py). The plug-in is conservative by ``sum_i H_ii^2`` (exact for Gaussian probes).
        """
        return math.sqrt(max(2 * self.num_params * float(self.moments(2).mean()), 0.0) / self.nodes.shape[0])

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
    num_iters: int | None = None,
    tol: float | None = None,
    max_iters: int = DEFAULT_MAX_ITERS,
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
        num_iters: a fixed number of Lanczos steps per run (capped at ``n``), the classical SLQ budget (Ghorbani
            et al. 2019, Section 3, use 90). Give this or ``tol``.
        tol: stop each run at the first step ``>= MIN_STEPS`` where the Chebyshev-Markov-Stieltjes bound on the
            Wasserstein-1 distance between its quadrature measure and its spectral measure is ``<= tol`` times its
            spectral range (see the module docstring) [default :data:`DEFAULT_TOL` when ``num_iters`` is not
            given], or at ``max_iters`` steps.
        max_iters: the cap on steps per run with ``tol`` [default 90].
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
        :class:`SpectralDensity` (grid, density, raw nodes and weights, the absolute ``sigma``, the steps and
        error bound of each run, the implied trace with its standard error).

    Raises:
        SharpscopeError: for non-positive ``num_iters``, ``max_iters``, ``num_runs``, ``tol`` or ``sigma``, both
            ``num_iters`` and ``tol``, ``num_points < 2``, a negative ``margin`` or ``bounds`` with
            ``low >= high``, or a ``shard`` that does not match the process group.
    """
    if num_iters is not None and tol is not None:
        raise SharpscopeError(
            f"give num_iters (a fixed number of Lanczos steps) or tol (a stopping tolerance), not both; got "
            f"num_iters={num_iters}, tol={tol}; with tol, max_iters caps the steps"
        )
    if num_iters is None:
        tol = DEFAULT_TOL if tol is None else tol
        if not (isinstance(tol, (int, float)) and 0 < tol < math.inf):
            raise SharpscopeError(f"tol must be > 0 (a fraction of the spectral range such as 0.01), got {tol}")
        tol = float(tol)
    iterations = num_iters if num_iters is not None else max_iters
    if iterations < 1 or num_runs < 1:
        name = "num_iters" if num_iters is not None else "max_iters"
        raise SharpscopeError(f"{name} and num_runs must be >= 1, got {name}={iterations}, num_runs={num_runs}")
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
    steps = min(iterations, n)
    v = random_vectors(n, num_runs, generator=make_generator(seed), distribution="rademacher", device=device)
    v /= math.sqrt(n)
    if shard is None:
        nodes, weights, num_steps, error_bounds = _slq_runs(A, v, steps, reorthogonalize, tol)
        num_matvecs = A.num_matvecs
    else:
        from sharpscope import distributed

        runs = list(range(num_runs))[shard[0] :: shard[1]]
        local = _slq_runs(A, v[:, runs], steps, reorthogonalize, tol) if runs else None
        nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
        weights = torch.zeros(num_runs, steps, dtype=torch.float64)
        num_steps = torch.zeros(num_runs, dtype=torch.long)
        error_bounds = torch.zeros(num_runs, dtype=torch.float64)
        num_matvecs = 0
        for part_runs, part, part_matvecs in distributed.all_gather((runs, local, A.num_matvecs)):
            if part is not None:
                part_nodes, part_weights, num_steps[part_runs], error_bounds[part_runs] = part
                width = part_nodes.shape[1]
                nodes[part_runs, :width], weights[part_runs, :width] = part_nodes, part_weights
                nodes[part_runs, width:] = part_nodes[:, :1]
            num_matvecs += part_matvecs
        used = int(num_steps.max())
        nodes, weights = nodes[:, :used].contiguous(), weights[:, :used].contiguous()
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
        num_params=n, num_steps=num_steps, error_bounds=error_bounds, tol=tol,
    )


def wasserstein_bound(nodes: Tensor, weights: Tensor) -> Tensor:
    """The Chebyshev-Markov-Stieltjes bound ``sum_j (theta_{j+1} - theta_j) max(tau_j, tau_{j+1})`` on the W1
    distance between a Gauss quadrature (ascending ``nodes``, ``weights``, shape ``(..., m)``) and the measure it
    integrates, divided by the nodes' range ``theta_m - theta_1`` (module docstring). ``(...,)``; 1 for one node."""
    gaps = nodes[..., 1:] - nodes[..., :-1]
    bound = (gaps * torch.maximum(weights[..., 1:], weights[..., :-1])).sum(dim=-1)
    width = nodes[..., -1] - nodes[..., 0]
    return torch.where(width > 0, bound / torch.where(width > 0, width, torch.ones_like(width)),
                       torch.ones_like(width))


def _gauss_rule(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes (ascending) and weights of the Jacobi matrices with diagonals ``alphas`` ``(runs, m)`` and
    off-diagonals ``betas`` ``(runs, m - 1)``: one batched ``eigh``."""
    T = torch.diag_embed(alphas)
    if alphas.shape[1] > 1:
        T = T + torch.diag_embed(betas, 1) + torch.diag_embed(betas, -1)
    theta, Y = torch.linalg.eigh(T)
    return theta, Y[:, 0, :] ** 2


def _slq_runs(A: Float64Operator, v: Tensor, steps: int, reorthogonalize: bool,
              tol: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched Lanczos from the unit columns of ``v`` ``(n, runs)``.

    Returns Gauss nodes and weights, each ``(runs, used)`` with ``used`` the most steps any run took, the steps of
    each run ``(runs,)`` and each run's relative W1 bound ``(runs,)`` (0 for a run that reached an invariant
    subspace: its quadrature is exact). With ``tol`` a run stops once its bound is ``<= tol`` (module docstring).
    """
    n, device = A.n, A.device
    num_runs = v.shape[1]
    alphas = torch.zeros(steps, num_runs, dtype=torch.float64)
    betas = torch.zeros(steps, num_runs, dtype=torch.float64)
    lengths = torch.full((num_runs,), steps, dtype=torch.long)
    active = torch.ones(num_runs, dtype=torch.bool)
    bounds = torch.ones(num_runs, dtype=torch.float64)
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
            bounds[stopped] = 0.0
            active &= ~stopped
        if tol is not None and j + 1 >= MIN_STEPS and active.any():
            runs_now = active.nonzero().flatten()
            theta, tau = _gauss_rule(alphas[: j + 1, runs_now].T, betas[:j, runs_now].T)
            bound = wasserstein_bound(theta, tau)
            bounds[runs_now] = bound
            settled = runs_now[bound <= tol]
            if settled.numel():
                lengths[settled] = j + 1
                active[settled] = False
        if not active.any():
            break
        safe_beta = torch.where(active.to(device), beta, torch.ones_like(beta))
        previous, v = v, torch.where(active.to(device), w / safe_beta, torch.zeros_like(w))
        beta_prev = torch.where(active.to(device), beta, torch.zeros_like(beta))
        if reorthogonalize:
            basis[:, j + 1] = v.T

    used = int(lengths.max())
    nodes = torch.zeros(num_runs, used, dtype=torch.float64)
    weights = torch.zeros(num_runs, used, dtype=torch.float64)
    for r in range(num_runs):
        length = int(lengths[r])
        theta, tau = _gauss_rule(alphas[:length, r][None], betas[: length - 1, r][None])
        nodes[r, :length], weights[r, :length] = theta[0], tau[0]
        nodes[r, length:] = theta[0, 0]
        if bounds[r] > 0 and (tol is None or length < MIN_STEPS or length == steps):
            bounds[r] = wasserstein_bound(theta[0], tau[0])  # runs that ran out of steps: their final bound
    return nodes, weights, lengths, bounds

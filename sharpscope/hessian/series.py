"""Model-level Hessian analyses: per-layer spectra, one checkpoint, and a checkpoint series with warm start.

These compose the operator (:class:`~sharpscope.hessian.operator.HessianOperator`) with the functions of an
operator (:func:`~sharpscope.hessian.lanczos.lanczos_eigs`, the trace estimators, the spectral density). Along a
training trajectory consecutive Hessians are close, so the previous checkpoint's top eigenvectors are a good
start block for the next Lanczos run (``warm_start``); ``spectrum_series`` chains this automatically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.hessian.density import DEFAULT_MAX_ITERS, SpectralDensity, spectral_density
from sharpscope.hessian.lanczos import EigenResult, lanczos_eigs
from sharpscope.hessian.operator import HessianOperator, _materialize
from sharpscope.hessian.trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = ["CheckpointSpectrum", "analyze_checkpoint", "parameter_groups", "per_layer_eigs", "spectrum_series"]

TRACE_METHODS = ("hutch++", "hutchinson")
GROUPINGS = ("module", "tensor")


def parameter_groups(model: nn.Module, by: str = "module") -> dict[str, list[str]]:
    """Group the trainable parameter names of ``model`` for per-layer spectra.

    Args:
        model: the network.
        by: ``"module"``: one group per module that directly owns trainable parameters (a Linear's weight and
            bias together, a BatchNorm's affine pair together), named by the module's path (``"features.0"``);
            ``"tensor"``: one group per parameter tensor, named by the parameter's name.

    Returns:
        ``{group name: [parameter names]}`` in ``named_parameters`` order.

    Raises:
        SharpscopeError: for an unknown ``by``.
    """
    if by not in GROUPINGS:
        raise unknown_name_error("grouping", by, GROUPINGS)
    groups: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = name if by == "tensor" else (name.rpartition(".")[0] or "<root>")
        groups.setdefault(key, []).append(name)
    return groups


def per_layer_eigs(
    model: nn.Module,
    loss_fn: Any,
    batches: Iterable[Any],
    *,
    k: int = 1,
    groups: str | Mapping[str, Sequence[str]] = "module",
    eval_mode: bool = True,
    check_deterministic: bool = True,
    on_progress: Callable[[str], None] | None = None,
    **lanczos_kwargs: Any,
) -> dict[str, EigenResult]:
    """Top eigenpairs of each diagonal block ``H[S, S]`` of the Hessian, one block per parameter group.

    Args:
        model, loss_fn, batches, eval_mode, check_deterministic: as for :class:`HessianOperator` (the
            determinism probe runs once, for the first group).
        k: eigenpairs per group (capped at the group's size).
        groups: ``"module"`` / ``"tensor"`` (see :func:`parameter_groups`) or an explicit
            ``{group name: [parameter names]}``.
        on_progress: called with each group's name before it is computed (e.g. to advance a progress bar).
        **lanczos_kwargs: passed to :func:`lanczos_eigs` (``which``, ``tol``, ``max_matvecs``, ``seed``, ...).

    Returns:
        ``{group name: EigenResult}``.
    """
    batches = _materialize(batches)
    mapping = parameter_groups(model, groups) if isinstance(groups, str) else {k_: list(v) for k_, v in groups.items()}
    results: dict[str, EigenResult] = {}
    for index, (name, names) in enumerate(mapping.items()):
        if on_progress is not None:
            on_progress(name)
        operator = HessianOperator(
            model, loss_fn, batches, params=names, eval_mode=eval_mode,
            check_deterministic=check_deterministic and index == 0,
        )
        which = lanczos_kwargs.get("which", "top")
        limit = operator.num_params // (2 if which == "both" else 1)
        results[name] = lanczos_eigs(operator, max(1, min(k, limit)), **lanczos_kwargs)
    return results


@dataclass(frozen=True)
class CheckpointSpectrum:
    """Everything :func:`analyze_checkpoint` measured on one model."""

    top: EigenResult  # top-k eigenpairs of the full Hessian (eigenvalues descending)
    bottom: EigenResult | None  # bottom-k eigenpairs (negative curvature), if requested
    trace: TraceEstimate | None  # trace estimate, if requested
    density: SpectralDensity | None  # SLQ spectral density, if requested
    per_layer: dict[str, EigenResult] | None  # top eigenpairs of each layer's diagonal block, if requested
    loss: float  # the sample-weighted mean loss on the batches
    num_params: int  # n, the number of parameters the Hessian is taken over
    num_samples: int  # samples in the batches
    num_matvecs: int  # Hessian-vector products spent on everything above (per-layer blocks included)
    seconds: float  # wall time
    config: dict[str, Any] = field(default_factory=dict)  # the settings used (for provenance and resuming)

    def __repr__(self) -> str:
        """A few lines: the sizes and cost, then one line per result computed (each its own short repr)."""
        lines = [f"CheckpointSpectrum(n={self.num_params:,} parameters, {self.num_samples} samples, loss "
                 f"{self.loss:.5g}, {self.num_matvecs} HVPs in {self.seconds:.1f} s"]
        lines.append(f"  top={self.top!r}")
        for name in ("bottom", "trace", "density"):
            if getattr(self, name) is not None:
                lines.append(f"  {name}={getattr(self, name)!r}")
        if self.per_layer is not None:
            blocks = ", ".join(f"{layer}: {float(r.eigenvalues[0]):.4g}" for layer, r in self.per_layer.items())
            lines.append(f"  per_layer lambda_1={{{blocks}}}")
        return "\n".join(lines) + ")"


def analyze_checkpoint(
    model: nn.Module,
    loss_fn: Any,
    batches: Iterable[Any],
    *,
    top_k: int = 5,
    bottom_k: int = 0,
    tol: float = 1e-6,
    criterion: str = "residual",
    max_matvecs: int | None = None,
    trace: bool = False,
    trace_matvecs: int | None = None,
    trace_rtol: float | None = None,
    trace_method: str = "hutch++",
    density: bool = False,
    density_iters: int | None = None,
    density_tol: float | None = None,
    density_max_iters: int = DEFAULT_MAX_ITERS,
    density_runs: int = 5,
    density_sigma: float = 1e-3,
    density_points: int = 10000,
    per_layer: bool = False,
    per_layer_k: int = 1,
    warm_start: EigenResult | Tensor | None = None,
    params: Sequence[str | nn.Parameter | Tensor] | None = None,
    eval_mode: bool = True,
    check_deterministic: bool = True,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> CheckpointSpectrum:
    """Top eigenvalues (and optionally bottom eigenvalues, trace, density, per-layer spectra) of one model.

    Args:
        model, loss_fn, batches, params, eval_mode, check_deterministic: as for :class:`HessianOperator`.
        top_k, bottom_k: eigenpairs from the top (always) and the bottom (if ``bottom_k > 0``; a second Lanczos
            run, since the two ends converge at different speeds).
        tol, criterion, max_matvecs: Lanczos stopping rule, convergence test and budget (see :func:`lanczos_eigs`).
        trace, trace_matvecs, trace_rtol, trace_method: estimate ``tr(H)`` with ``"hutch++"`` (default) or
            ``"hutchinson"``: ``trace_matvecs`` products (a fixed budget, the published algorithms), or else until
            the relative standard error ``trace_rtol`` [default :data:`~sharpscope.hessian.trace.DEFAULT_RTOL`].
            The adaptive Hutch++ deflates with its sketch *and* the ``top`` eigenvectors just computed (free
            directions that carry most of the Frobenius mass: see :mod:`sharpscope.hessian.trace`).
        density, density_iters, density_tol, density_max_iters, density_runs, density_sigma, density_points: SLQ
            density (see :func:`spectral_density`; sigma is relative to the spectral range): ``density_iters``
            fixed steps per run, or else each run stops at the quadrature error bound ``density_tol`` [default
            :data:`~sharpscope.hessian.density.DEFAULT_TOL`] within ``density_max_iters`` steps.
        per_layer, per_layer_k: top ``per_layer_k`` eigenvalues of each module's diagonal Hessian block.
        warm_start: the previous checkpoint's :class:`EigenResult` (or an ``(n, b)`` block): its top eigenvectors
            start this Lanczos run. Ignored (cold start) when the parameter count differs.
        seed: seeds every random vector (different streams for the different estimators).
        on_progress: called with a short stage name ("top", "trace", ...) before each stage.

    Returns:
        :class:`CheckpointSpectrum`.

    Raises:
        SharpscopeError: for an unknown ``trace_method`` or ``top_k < 1``; the operator's errors (non-deterministic
            setup, empty batches, ...).
    """
    if trace_method not in TRACE_METHODS:
        raise unknown_name_error("trace method", trace_method, TRACE_METHODS)
    if top_k < 1:
        raise SharpscopeError(f"top_k must be >= 1, got {top_k}")
    config = {
        "top_k": top_k, "bottom_k": bottom_k, "tol": tol, "criterion": criterion, "max_matvecs": max_matvecs,
        "trace": trace,
        "trace_matvecs": trace_matvecs, "trace_rtol": trace_rtol, "trace_method": trace_method, "density": density,
        "density_iters": density_iters, "density_tol": density_tol, "density_max_iters": density_max_iters,
        "density_runs": density_runs, "density_sigma": density_sigma,
        "density_points": density_points, "per_layer": per_layer, "per_layer_k": per_layer_k,
        "eval_mode": eval_mode, "seed": seed,
    }
    step = on_progress or (lambda stage: None)
    start_time = time.perf_counter()
    batches = _materialize(batches)
    operator = HessianOperator(
        model, loss_fn, batches, params=params, eval_mode=eval_mode, check_deterministic=check_deterministic
    )
    v0 = warm_start.eigenvectors if isinstance(warm_start, EigenResult) else warm_start
    if v0 is not None and (v0.dim() not in (1, 2) or v0.shape[0] != operator.num_params):
        v0 = None  # a different architecture / parameter subset: cold start
    step("top")
    top = lanczos_eigs(operator, min(top_k, operator.num_params), which="top", tol=tol, criterion=criterion,
                       max_matvecs=max_matvecs, v0=v0, seed=seed)
    bottom = None
    if bottom_k > 0:
        step("bottom")
        bottom = lanczos_eigs(operator, min(bottom_k, operator.num_params), which="bottom", tol=tol,
                              criterion=criterion, max_matvecs=max_matvecs, seed=seed + 1)
    trace_estimate = None
    if trace:
        step("trace")
        trace_estimate = estimate_trace(operator, config, top=top)
    spectrum = None
    if density:
        step("density")
        spectrum = estimate_density(operator, config)
    layers = None
    layer_matvecs = 0
    if per_layer:
        step("per-layer")
        operator.clear_cache()  # the layer blocks build graphs of their own: never hold two caches at once
        layers = per_layer_eigs(model, loss_fn, batches, k=per_layer_k, eval_mode=eval_mode,
                                check_deterministic=False, tol=tol, criterion=criterion, max_matvecs=max_matvecs,
                                seed=seed + 4)
        layer_matvecs = sum(result.num_matvecs for result in layers.values())
    loss = float(operator.loss())
    return CheckpointSpectrum(
        top=top, bottom=bottom, trace=trace_estimate, density=spectrum, per_layer=layers, loss=loss,
        num_params=operator.num_params, num_samples=operator.num_samples,
        num_matvecs=operator.num_matvecs + layer_matvecs, seconds=time.perf_counter() - start_time, config=config,
    )


def estimate_trace(operator: Any, config: Mapping[str, Any], *, top: EigenResult | None = None,
                   shard: tuple[int, int] | None = None) -> TraceEstimate:
    """The trace stage of :func:`analyze_checkpoint` from its ``config`` (so a sharded rerun matches it)."""
    seed = config["seed"] + 2
    if config.get("trace_matvecs") is not None:  # a fixed budget: the published algorithms
        estimator = hutchpp_trace if config["trace_method"] == "hutch++" else hutchinson_trace
        return estimator(operator, num_matvecs=config["trace_matvecs"], seed=seed, shard=shard)
    rtol = config.get("trace_rtol")
    if config["trace_method"] == "hutch++":
        return hutchpp_trace(operator, rtol=rtol, deflate=top, seed=seed, shard=shard)
    return hutchinson_trace(operator, rtol=rtol, seed=seed, shard=shard)


def estimate_density(operator: Any, config: Mapping[str, Any], *,
                     shard: tuple[int, int] | None = None) -> SpectralDensity:
    """The density stage of :func:`analyze_checkpoint` from its ``config``."""
    budget = {"tol": config.get("density_tol"), "max_iters": config.get("density_max_iters", DEFAULT_MAX_ITERS)}
    if config.get("density_iters") is not None:  # a fixed number of steps (with a tol too: the library refuses)
        budget = {"num_iters": config["density_iters"], **({"tol": budget["tol"]} if budget["tol"] is not None else {})}
    return spectral_density(operator, num_runs=config["density_runs"], sigma=config["density_sigma"],
                            num_points=config["density_points"], seed=config["seed"] + 3, shard=shard, **budget)


def spectrum_series(
    models: Iterable[nn.Module],
    loss_fn: Any,
    batches: Iterable[Any],
    *,
    warm_start: bool = True,
    **kwargs: Any,
) -> list[CheckpointSpectrum]:
    """:func:`analyze_checkpoint` on each model of a training trajectory, in order.

    Args:
        models: the checkpoints' models in trajectory order (an iterable, so they can be loaded lazily).
        loss_fn, batches: shared by all models.
        warm_start: start each Lanczos run from the previous model's top eigenvectors.
        **kwargs: passed to :func:`analyze_checkpoint`.

    Returns:
        One :class:`CheckpointSpectrum` per model.
    """
    batches = _materialize(batches)
    results: list[CheckpointSpectrum] = []
    previous: EigenResult | None = None
    for model in models:
        result = analyze_checkpoint(model, loss_fn, batches, warm_start=previous if warm_start else None, **kwargs)
        results.append(result)
        previous = result.top
    return results

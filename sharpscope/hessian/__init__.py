"""Hessian analysis (DESIGN.md section 5): the Hessian as an operator, and functions of any symmetric operator.

Operators::

    HessianOperator(model, loss_fn, batches, *, params=None, eval_mode=True, check_deterministic=True)

Functions of an operator (a HessianOperator, a dense symmetric tensor, or anything with ``shape`` and ``@``)::

    lanczos_eigs(op, k, *, which="top", tol=1e-6, ...)           -> EigenResult
    hutchinson_trace(op, *, rtol=0.02 | num_matvecs, deflate, seed)  -> TraceEstimate
    hutchpp_trace(op, *, rtol=0.02 | num_matvecs, deflate, seed)     -> TraceEstimate
    spectral_density(op, *, tol=0.01 | num_iters, num_runs=5, ...)    -> SpectralDensity

Model-level helpers: ``per_layer_eigs`` (a block of the Hessian per module), ``analyze_checkpoint`` and
``spectrum_series`` (checkpoint series with warm start). ``run(checkpoints, *, top_k=5, ..., out=...)`` is
``sharpscope hessian-spectrum`` as a function: checkpoint files in, spectrum.json/.npz and figures out. The dense truth lives in ``sharpscope.hessian.reference``.
"""

from sharpscope.hessian.density import SpectralDensity, spectral_density
from sharpscope.hessian.lanczos import EigenResult, lanczos_eigs
from sharpscope.hessian.operator import HessianOperator, eval_mode, select_parameters
from sharpscope.hessian.series import (
    CheckpointSpectrum,
    analyze_checkpoint,
    parameter_groups,
    per_layer_eigs,
    spectrum_series,
)
from sharpscope.hessian.runner import SpectrumRun, run
from sharpscope.hessian.trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    # operators
    "HessianOperator",
    "eval_mode",
    "select_parameters",
    # eigenvalues
    "EigenResult",
    "lanczos_eigs",
    # trace
    "TraceEstimate",
    "hutchinson_trace",
    "hutchpp_trace",
    # spectral density
    "SpectralDensity",
    "spectral_density",
    # models and checkpoint series
    "CheckpointSpectrum",
    "analyze_checkpoint",
    "parameter_groups",
    "per_layer_eigs",
    "spectrum_series",
    # checkpoint files to results on disk (the hessian-spectrum command)
    "SpectrumRun",
    "run",
]

"""Optimizers: SAM / ASAM as a ``torch.optim.Optimizer``, the perturbation it uses, and one training step.

- :class:`SAM`: Sharpness-Aware Minimization (Foret et al. 2021) around any base optimizer; ASAM, general p,
  rho schedule, SAM every k steps; exact restore and exact resume.
- :func:`perturbation`: the ascent step ``eps`` (also used by the sharpness measures).
- :func:`frozen_bn_stats`: keep BatchNorm running statistics unchanged during a pass.
- :func:`training_step`: one step for any optimizer (SAM's two passes, m-sharpness, AMP, clipping).
- :func:`create_optimizer`: sgd / sam / asam over sgd / adam / adamw, by name.
"""

from sharpscope.optim.bn import frozen_bn_stats, running_stat_buffers
from sharpscope.optim.factory import BASE_OPTIMIZERS, OPTIMIZER_NAMES, create_optimizer
from sharpscope.optim.perturbation import perturbation
from sharpscope.optim.sam import RHO_SCHEDULES, SAM
from sharpscope.optim.step import StepResult, training_step

__all__ = [
    # optimizers
    "SAM",
    "create_optimizer",
    "OPTIMIZER_NAMES",
    "BASE_OPTIMIZERS",
    "RHO_SCHEDULES",
    # building blocks
    "perturbation",
    "frozen_bn_stats",
    "running_stat_buffers",
    # training
    "training_step",
    "StepResult",
]

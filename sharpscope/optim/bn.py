"""Keep normalization running statistics out of SAM's perturbed pass.

A SAM step runs the model twice in training mode: at ``w`` (the clean pass) and at ``w + eps``. Only the clean
pass should move BatchNorm's running statistics, as in the paper's code (google-research/sam keeps the clean
pass's model state). The usual PyTorch recipe sets ``momentum = 0`` for the second pass (davda54/sam
``bypass_bn.py``); that still increments ``num_batches_tracked`` and turns into NaN when the perturbed pass produces
non-finite activations (``0 * inf``). Here the buffers are snapshotted and copied back instead, which is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

__all__ = ["frozen_bn_stats", "running_stat_buffers"]


def running_stat_buffers(model: nn.Module) -> list[Tensor]:
    """The running-statistics buffers of every normalization layer that tracks them.

    That is ``running_mean``, ``running_var`` and ``num_batches_tracked`` of each ``_NormBase`` module
    (BatchNorm1d/2d/3d, SyncBatchNorm, their lazy versions once initialized, InstanceNorm with
    ``track_running_stats=True``), in ``model.modules()`` order.
    """
    buffers: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buf is not None and not is_lazy(buf):
                    buffers.append(buf)
    return buffers


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Run the body in training mode without changing any running statistics (exactly).

    On entry the running-statistics buffers (:func:`running_stat_buffers`) are copied; on exit, normal or by an
    exception, they are copied back in place (same storage, so optimizers, hooks and compiled graphs that hold
    them stay valid). The forward pass itself is unchanged: in training mode BatchNorm normalizes with the
    batch's statistics either way. Cost: one copy of the buffers (a few KB for a ResNet-20) each way.

    Example::

        loss_fn(model(x), y).backward()            # clean pass: running stats updated once
        optimizer.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_fn(model(x), y).backward()        # perturbed pass: running stats untouched
        optimizer.second_step()
    """
    buffers = running_stat_buffers(model)
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)

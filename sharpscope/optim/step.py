"""One training step for any optimizer, SAM included: passes, BatchNorm, m-sharpness, AMP and clipping.

For a plain optimizer: forward, backward, (unscale, clip,) step. For :class:`~sharpscope.optim.SAM` on a SAM step
(Foret et al. 2021, Algorithm 1, with the m-sharpness of their section 4.1):

* the batch is split into micro-batches of ``m = micro_batch_size`` samples (one micro-batch when ``m`` is
  ``None`` or >= the batch size: plain SAM);
* for each micro-batch ``s_j``: the clean pass at ``w`` (BatchNorm running statistics updated, as in plain
  training) gives ``g_j``; ``w <- w + eps(g_j)``; the perturbed pass runs under
  :func:`~sharpscope.optim.frozen_bn_stats` and adds ``(n_j / n) grad L_{s_j}(w + eps_j)`` to ``p.grad``; ``w`` is
  restored exactly;
* the base optimizer steps once with ``sum_j (n_j / n) grad L_{s_j}(w + eps_j)`` (the sample-weighted mean SAM
  gradient), after clipping it to ``max_grad_norm``.

The reported loss is the clean loss of the whole batch, ``sum_j n_j L_{s_j}(w) / n`` (with micro-batches each
clean pass normalizes BatchNorm with its own micro-batch statistics, as each device does in the paper's
data-parallel m-sharpness). The running statistics are updated by each micro-batch's clean pass, as with gradient
accumulation. Micro-batches run one after the other: the measured cost with 4 micro-batches is in
``benchmarks/bench_sam_step.py``.

Mixed precision: ``autocast_dtype`` (bf16 needs no scaler); with a ``torch.amp.GradScaler`` (fp16) the clean
gradients are unscaled before ``eps`` is computed (``eps`` uses the true gradient), a non-finite clean gradient
makes the whole step be skipped, the SAM gradient goes through ``scaler.unscale_`` / clipping / ``scaler.step`` and
``scaler.update()`` is called exactly once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from numbers import Real

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpscope.errors import SharpscopeError
from sharpscope.optim.bn import frozen_bn_stats
from sharpscope.optim.sam import SAM

__all__ = ["StepResult", "training_step"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepResult:
    """What one training step reports (tensors on the batch's device; no host sync was made)."""

    loss: Tensor  # 0-d, detached: mean clean loss over the batch at the weights before the step
    correct: Tensor  # 0-d int64: samples whose arg-max logit (clean pass) equals the label


def training_step(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    images: Tensor,
    labels: Tensor,
    *,
    micro_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    sync_perturbation: bool = False,
) -> StepResult:
    """Zero the gradients, run the forward/backward pass(es) and take one optimizer step.

    Args:
        model: the network, in training mode (``model.train()`` is the caller's business).
        optimizer: any ``torch.optim.Optimizer``; a :class:`SAM` gets the two-pass SAM step (or a plain step on
            the steps its ``sam_every`` skips).
        loss_fn: ``loss_fn(logits, labels) -> 0-d mean loss``.
        images: the batch, ``(n, ...)``, on the model's device.
        labels: ``(n,)`` class indices (``correct`` compares them with ``logits.argmax(1)``).
        micro_batch_size: m-sharpness ``m`` (SAM only): one perturbation per micro-batch of ``m`` samples (the last
            one may be smaller); ``None`` or ``m >= n`` is plain SAM. Steps that ``sam_every`` skips are one plain
            pass over the whole batch.
        autocast_dtype: run forward passes under ``torch.autocast(device.type, dtype)`` (e.g. ``torch.bfloat16``).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 (ignored when disabled).
        max_grad_norm: clip the global l2 norm of the gradient the optimizer steps with (for SAM: the SAM
            gradient; clipping the clean gradient would not change ``eps``, which is scale-invariant).
        sync_perturbation: under ``torch.distributed`` (a DistributedDataParallel ``model``), average the clean
            gradient over the ranks before perturbing, so every rank perturbs with the global-batch gradient
            (m = world size x per-rank batch, or x ``micro_batch_size``); one extra all-reduce per step. Default:
            each rank perturbs with its own gradient (m = per-rank batch, Foret et al. 2021 section 4.1).

    Returns:
        :class:`StepResult` with the clean loss and correct count (tensors; no ``.item()`` inside).

    Raises:
        SharpscopeError: on a bad ``micro_batch_size`` or ``max_grad_norm``, ``micro_batch_size`` with a non-SAM
            optimizer, or images and labels of different lengths.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise SharpscopeError(
            f"images and labels must hold the same number of samples, got {n} images and {labels.shape[0]} labels"
        )
    is_sam = isinstance(optimizer, SAM)
    if micro_batch_size is not None:
        if not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1:
            raise SharpscopeError(
                f"micro_batch_size must be a positive integer (the m of m-sharpness), got {micro_batch_size!r}"
            )
        if not is_sam:
            raise SharpscopeError(
                f"micro_batch_size (m-sharpness) needs a SAM optimizer, got {type(optimizer).__name__}; "
                "drop micro_batch_size or use create_optimizer(name='sam')"
            )
    if max_grad_norm is not None and (
        not isinstance(max_grad_norm, Real) or isinstance(max_grad_norm, bool) or not max_grad_norm > 0
    ):
        raise SharpscopeError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
    scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
    autocast = (
        partial(torch.autocast, device_type=images.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext
    )
    scale = scaler.scale if scaler is not None else _identity

    optimizer.zero_grad(set_to_none=True)
    if not (is_sam and optimizer.sam_step_due):
        with autocast():
            logits = model(images)
            loss = loss_fn(logits, labels)
        scale(loss).backward()
        _finish_step(optimizer, scaler, max_grad_norm)
        return StepResult(loss=loss.detach(), correct=_correct(logits, labels))

    params = [w for group in optimizer.param_groups for w in group["params"]]
    trainable = [i for i, w in enumerate(params) if w.requires_grad]
    m = n if micro_batch_size is None else min(micro_batch_size, n)
    chunks = list(zip(images.split(m), labels.split(m)))
    found_inf = None
    total_loss: Tensor | None = None
    total_correct: Tensor | None = None
    try:
        for j, (x, y) in enumerate(chunks):
            # Clean pass at w: BatchNorm running statistics update here and only here. Under DDP it skips the
            # all-reduce, so each rank perturbs with its own gradient (m = per-rank batch, Foret et al. 2021 s.4.1).
            with _no_sync(model):
                with autocast():
                    logits = model(x)
                    loss = loss_fn(logits, y)
                clean = torch.autograd.grad(scale(loss), [params[i] for i in trainable], allow_unused=True)
            if scaler is not None:
                found_inf = _unscale_clean_grads(scaler, clean, found_inf)
            if sync_perturbation:
                clean = _average_over_ranks(model, clean)
            grads: list[Tensor | None] = [None] * len(params)
            for i, g in zip(trainable, clean):
                grads[i] = g
            optimizer.perturb(grads)
            # Perturbed pass at w + eps_j: accumulates (n_j / n) * g_SAM_j into p.grad.
            # DDP: only the last perturbed backward all-reduces (the accumulated SAM gradient), once per step.
            last = j == len(chunks) - 1
            with frozen_bn_stats(model), (contextlib.nullcontext() if last else _no_sync(model)):
                with autocast():
                    perturbed_loss = loss_fn(model(x), y)
                if len(chunks) > 1:
                    perturbed_loss = perturbed_loss * (x.shape[0] / n)
                scale(perturbed_loss).backward()
            if j < len(chunks) - 1:
                optimizer.restore()  # the last micro-batch's weights are restored by the optimizer step
            loss = loss.detach()
            correct = _correct(logits, y)
            if len(chunks) == 1:
                total_loss, total_correct = loss, correct
            else:
                # sum in at least fp32 (half precision would lose digits); float64 stays float64
                weighted = loss.to(torch.promote_types(loss.dtype, torch.float32)) * (x.shape[0] / n)
                total_loss = weighted if total_loss is None else total_loss + weighted
                total_correct = correct if total_correct is None else total_correct + correct
        if found_inf is not None:
            _poison_grads(params, found_inf)
        _finish_step(optimizer, scaler, max_grad_norm)
    except BaseException:
        optimizer.restore()  # never leave the model at w + eps (e.g. after an out-of-memory error)
        raise
    assert total_loss is not None and total_correct is not None
    return StepResult(loss=total_loss, correct=total_correct)


def _average_over_ranks(model: nn.Module, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """``grads`` averaged over the DDP process group (one flat all-reduce); unchanged outside DDP."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, nn.parallel.DistributedDataParallel):
        return grads
    present = [g for g in grads if g is not None]
    flat = torch.cat([g.reshape(-1) for g in present])
    torch.distributed.all_reduce(flat, group=inner.process_group)
    flat /= torch.distributed.get_world_size(inner.process_group)
    averaged = iter(flat.split([g.numel() for g in present]))
    return tuple(None if g is None else next(averaged).view_as(g) for g in grads)


def _no_sync(model: nn.Module):
    """``model.no_sync()`` for DistributedDataParallel (also under torch.compile), else a no-op context."""
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


def _identity(t: Tensor) -> Tensor:
    return t


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.detach().argmax(dim=1) == labels).sum()


def _finish_step(optimizer: Optimizer, scaler: torch.amp.GradScaler | None, max_grad_norm: float | None) -> None:
    """Unscale (AMP), clip and step; for SAM this restores ``w`` (or, if the scaler skips the step, undoes it)."""
    params = [w for group in optimizer.param_groups for w in group["params"] if w.grad is not None]
    if scaler is None:
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    steps_before = optimizer._sam_steps if isinstance(optimizer, SAM) else 0
    scaler.step(optimizer)  # skips optimizer.step() when a gradient is inf/NaN
    if isinstance(optimizer, SAM) and optimizer._sam_steps == steps_before:
        optimizer.skip_step()  # skipped: put w back and keep the sam_every count in step with the iterations
    scaler.update()


def _unscale_clean_grads(
    scaler: torch.amp.GradScaler, grads: tuple[Tensor | None, ...], found_inf: Tensor | None
) -> Tensor:
    """Divide the clean-pass gradients by the loss scale in place; return the (accumulated) inf/NaN flag.

    ``scaler.unscale_`` can run only once per step and is kept for the SAM gradient, so this does what it does
    (the same fused kernel and the same fp64 reciprocal of the scale) on gradients that never reach ``p.grad``.
    """
    scale_tensor = scaler._scale  # set by scaler.scale() in the clean pass
    assert scale_tensor is not None
    inv_scale = scale_tensor.double().reciprocal().float()
    if found_inf is None:
        found_inf = torch.zeros((), dtype=torch.float32, device=scale_tensor.device)
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        if g is not None:
            by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_device.items():
        flag = found_inf if device == found_inf.device else torch.zeros_like(found_inf, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv_scale.to(device))
        if flag is not found_inf:
            found_inf = found_inf + flag.to(found_inf.device)
    return found_inf


def _poison_grads(params: list[Tensor], found_inf: Tensor) -> None:
    """Make ``scaler.step`` skip the step when the *clean* gradient overflowed.

    A non-finite clean gradient gives a meaningless ``eps``; the perturbed gradient usually overflows too, but not
    necessarily. Adding ``where(found_inf, inf, 0)`` to one entry of one SAM gradient makes the scaler see it, with
    no host sync and no change otherwise (``x + 0 == x``).
    """
    for w in params:
        if w.grad is not None:
            first = w.grad[(slice(0, 1),) * w.grad.dim()]  # a one-element view whatever the strides
            first.add_(torch.where(found_inf.to(first.device) > 0, torch.inf, 0.0).to(first.dtype))
            return

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
accumulation, in the micro-batches' order.

Three implementations compute this: the loop (``vectorize=False``; the reference: one micro-batch after the other,
``w`` moved in place) and, by default where :func:`batched_refusal` allows it, one batched pass over all
micro-batches of exactly ``m`` samples, either through the network's own layers
(:mod:`sharpscope.optim.micro_batches`: per-micro-batch weight gradients from the layers' backward, grouped
convolutions for the per-micro-batch weights; models whose trainable tensors all sit in Linear, convolution,
BatchNorm, LayerNorm or GroupNorm layers, checked once against the micro-batches run alone, without autocast) or,
for any other model, ``torch.func.vmap`` of ``grad`` of ``functional_call`` for the clean gradients and stacked
weights ``w + eps_j`` for the perturbed pass (:func:`_batched_passes`). A smaller last micro-batch goes through the
loop. All agree up to rounding (tests/optim/test_sam_batched_micro_batches.py, float64, 1e-10). DDP, torch.compile,
hooks, active dropout and CPU half-precision autocast with normalization layers take the loop, and so, by default
on the CPU, do micro-batches of more than :data:`LOOP_FROM_ELEMENTS` input elements, where the loop is the faster
(:func:`loop_is_faster`). Measured cost: ``benchmarks/bench_sam_step.py`` (its docstring has the table).

Mixed precision: ``autocast_dtype`` (bf16 needs no scaler); with a ``torch.amp.GradScaler`` (fp16) the clean
gradients are unscaled before ``eps`` is computed (``eps`` uses the true gradient), a non-finite clean gradient
makes the whole step be skipped, the SAM gradient goes through ``scaler.unscale_`` / clipping / ``scaler.step`` and
``scaler.update()`` is called exactly once per step.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from numbers import Real

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules import module as module_mod
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from sharpscope.errors import SharpscopeError
from sharpscope.max_pool import fast_max_pools
from sharpscope.optim import low_rank, micro_batches
from sharpscope.optim.bn import frozen_bn_stats
from sharpscope.optim.low_rank import LowRank
from sharpscope.optim.perturbation import stacked_joint_perturbation
from sharpscope.optim.sam import SAM

__all__ = ["StepResult", "batched_refusal", "loop_is_faster", "training_step"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: On the CPU, micro-batches holding more input elements than this (``m x`` one sample's) run as the loop by
#: default. Measured (whole m-SAM steps, batched / loop, interleaved, 1 thread, 2026-12-06): 0.35-0.68 at up to
#: 6,272 elements (digits ConvNet m = 4, 8; Fashion-MNIST ConvNet m = 4, 8; ResNet-20 on 32x32, m = 2), 0.89-1.26 at
#: 12k (ResNet-20 m = 4, Fashion-MNIST m = 16), 0.95-1.25 from 24k (m = 8 ... 64): past a few thousand elements a
#: micro-batch's own passes use the CPU well, and the batched passes' grouped kernels and copies cost more than the
#: loop's Python. Other devices take the batched passes whatever the size (one kernel per layer instead of G).
LOOP_FROM_ELEMENTS = 8192


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
    vectorize: bool | None = None,
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
        vectorize: how two or more micro-batches run. ``None`` (default): as one batched pass where
            :func:`batched_refusal` allows it and the micro-batches are small enough for it to be the faster
            (:func:`loop_is_faster`; the same numbers as the loop up to rounding), falling back to the loop, with a
            warning, if the batched pass fails at run time; ``False``: the loop, one micro-batch after the other
            (the reference); ``True``: batched or a SharpscopeError saying why not.

    Returns:
        :class:`StepResult` with the clean loss and correct count (tensors; no ``.item()`` inside).

    Raises:
        SharpscopeError: on a bad ``micro_batch_size``, ``max_grad_norm`` or ``vectorize``, ``micro_batch_size``
            with a non-SAM optimizer, images and labels of different lengths, or ``vectorize=True`` where the
            batched pass cannot apply.
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
    if vectorize is not None and not isinstance(vectorize, bool):
        raise SharpscopeError(f"vectorize must be None, True or False, got {vectorize!r}")
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

    # max pools on the CPU run sharpscope.max_pool's kernel: torch's values and gradients, a fraction of its time
    pools = fast_max_pools(model) if images.device.type == "cpu" else contextlib.nullcontext()
    with pools:
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
        loop = partial(_loop_passes, model, optimizer, loss_fn, params=params, trainable=trainable, n=n,
                       autocast=autocast, scale=scale, scaler=scaler, sync_perturbation=sync_perturbation)
        full = n // m if m < n else 0  # micro-batches of exactly m samples
        if vectorize is None and loop_is_faster(images, m):
            full = 0  # the loop is the faster at this size
        refusal = survey = None
        if vectorize is not False and full >= 2:
            survey = _survey(model, optimizer, micro_batches=full, autocast_dtype=autocast_dtype,
                             device_type=images.device.type)
            refusal = survey.refusal
            if refusal is not None and vectorize:
                raise SharpscopeError(
                    f"vectorize=True, but the micro-batches cannot run as one batched pass: {refusal}; "
                    "use vectorize=None (batched where possible) or vectorize=False (one micro-batch at a time)"
                )
        totals: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)
        batched_error: BaseException | None = None
        looped = 0  # the loop runs the samples from here on
        if vectorize is not False and full >= 2 and refusal is None:
            try:
                totals = _batched_passes(model, optimizer, loss_fn, images[: full * m], labels[: full * m], m=m, n=n,
                                         survey=survey, autocast=autocast, scaler=scaler,
                                         structured=autocast_dtype is None)
            except (RuntimeError, NotImplementedError) as exc:
                if vectorize:
                    raise
                # e.g. an operation vmap cannot batch: nothing was committed (BatchNorm statistics are written last,
                # the weights were never moved); drop any partial gradient and run the loop instead
                optimizer.zero_grad(set_to_none=True)
                batched_error = exc
            else:
                looped = full * m  # the smaller last micro-batch, if any, goes through the loop
        chunks = list(zip(images[looped:].split(m), labels[looped:].split(m))) if looped < n else []
        try:
            if chunks:
                totals = loop(chunks, totals=totals, single=len(chunks) == 1 and totals[0] is None)
            else:
                optimizer.hold()  # the batched pass never moved w: step() takes the base step
            total_loss, total_correct, found_inf = totals
            if found_inf is not None:
                _poison_grads(params, found_inf)
            _finish_step(optimizer, scaler, max_grad_norm)
        except BaseException:
            optimizer.restore()  # never leave the model at w + eps (e.g. after an out-of-memory error)
            raise
        if batched_error is not None:
            # the loop ran this model fine, so the batched pass is what failed: remember it and say so once
            reason = f"torch.func.vmap cannot batch its forward ({str(batched_error).splitlines()[0][:200]})"
            _VMAP_REFUSED[model] = reason
            warnings.warn(
                f"m-SAM: {reason}; running the micro-batches one after the other (slower). "
                "Pass vectorize=False to training_step to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        assert total_loss is not None and total_correct is not None
        return StepResult(loss=total_loss, correct=total_correct)


def loop_is_faster(images: Tensor, micro_batch_size: int) -> bool:
    """Whether ``training_step(vectorize=None)`` runs micro-batches of ``micro_batch_size`` samples of ``images``
    as the loop because it is the faster there: on the CPU, above :data:`LOOP_FROM_ELEMENTS` input elements per
    micro-batch."""
    return images.device.type == "cpu" and micro_batch_size * images[:1].numel() > LOOP_FROM_ELEMENTS


def _loop_passes(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: LossFn,
    chunks: list[tuple[Tensor, Tensor]],
    *,
    params: list[Tensor],
    trainable: list[int],
    n: int,
    autocast: Callable,
    scale: Callable[[Tensor], Tensor],
    scaler: torch.amp.GradScaler | None,
    sync_perturbation: bool,
    totals: tuple[Tensor | None, Tensor | None, Tensor | None],
    single: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The reference: the micro-batches one after the other, each clean pass, ``w + eps_j``, perturbed pass.

    Adds ``(n_j / n) grad L_{s_j}(w + eps_j)`` to ``p.grad`` per micro-batch and returns the running
    ``(loss, correct, found_inf)`` totals; the last micro-batch's weights are left at ``w + eps`` (the optimizer
    step restores them). ``single``: the whole batch is one micro-batch (plain SAM: no loss weighting).
    """
    total_loss, total_correct, found_inf = totals
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
            if not single:
                perturbed_loss = perturbed_loss * (x.shape[0] / n)
            scale(perturbed_loss).backward()
        if not last:
            optimizer.restore()  # the last micro-batch's weights are restored by the optimizer step
        loss = loss.detach()
        correct = _correct(logits, y)
        if single:
            total_loss, total_correct = loss, correct
        else:
            # sum in at least fp32 (half precision would lose digits); float64 stays float64
            weighted = loss.to(torch.promote_types(loss.dtype, torch.float32)) * (x.shape[0] / n)
            total_loss = weighted if total_loss is None else total_loss + weighted
            total_correct = correct if total_correct is None else total_correct + correct
    return total_loss, total_correct, found_inf


# ------------------------------------------------------------------------------------ batched micro-batches

#: Models the batched path failed on at run time (the loop ran them fine), with the reason: not retried.
_VMAP_REFUSED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

#: At most this many stacked weight entries (micro-batches x trainable parameters) per batched pass: the pass holds
#: a few such stacks (gradients, eps, w + eps and their autograd buffers), ~128 MB each in float32.
MAX_STACKED_ELEMENTS = 1 << 25

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
          *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))


def batched_refusal(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    micro_batches: int = 2,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
) -> str | None:
    """Why the ``micro_batches`` micro-batches of an m-SAM step cannot run as one batched pass (``None``: they can).

    The batched pass (:func:`_batched_passes`) runs ``torch.func.functional_call`` under ``torch.func.vmap``; it
    is used only where it computes what the loop computes:

    * not under ``DistributedDataParallel`` / ``DataParallel`` (their forward and gradient hooks are the
      reducer's) nor on a ``torch.compile``'d model (the compiled module is what should run);
    * no forward/backward hooks or parametrizations (they would see batched tensors, called once instead of once
      per micro-batch);
    * no active dropout (vmap would draw other masks than the loop: results would change with the path);
    * every normalization layer that updates running statistics is a plain BatchNorm1d/2d/3d (not SyncBatchNorm or
      InstanceNorm with running statistics);
    * on CPU under a bf16/fp16 autocast, no normalization layer (BatchNorm, LayerNorm, GroupNorm, ...): torch
      2.13's vmap rules for their backward refuse a half-precision input with fp32 weights there
      ("expected scalar type BFloat16 but found Float");
    * every optimizer parameter belongs to ``model``, and two micro-batches' copies of the weights stay under
      :data:`MAX_STACKED_ELEMENTS` (more micro-batches than fit run as several batched passes, in order);
    * the batched pass did not already fail on this model at run time (an operation vmap cannot batch).
    """
    return _survey(model, optimizer, micro_batches=micro_batches, autocast_dtype=autocast_dtype,
                   device_type=device_type).refusal


@dataclass(frozen=True)
class _Survey:
    """What one walk over the model finds for an m-SAM step (:func:`_survey`)."""

    refusal: str | None  # see batched_refusal
    names: dict[int, str]  # id(parameter) -> its name in model.named_parameters()
    norms: list[_NormBase]  # the normalization layers that update running statistics, in model.modules() order
    size: int = 0  # the optimizer's trainable weights (numbers); 0 when refused


def _survey(model: nn.Module, optimizer: Optimizer, *, micro_batches: int, autocast_dtype: torch.dtype | None,
            device_type: str) -> _Survey:
    """:func:`batched_refusal` with the parameters' names and the BatchNorm layers the batched passes need, in one
    walk over the modules (each step: the structure may change between steps)."""
    names: dict[int, str] = {}
    norms: list[_NormBase] = []
    refused = partial(_Survey, names=names, norms=norms)
    if model in _VMAP_REFUSED:
        return refused(_VMAP_REFUSED[model])
    if "_orig_mod" in model._modules:  # torch.compile's wrapper holds the model as this submodule
        return refused("the model is torch.compile'd")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return refused(f"the model is wrapped in {type(model).__name__}")
    if any(getattr(module_mod, name, None) for name in _GLOBAL_HOOKS):
        return refused("global module hooks are registered")
    half_on_cpu = device_type == "cpu" and autocast_dtype in (torch.float16, torch.bfloat16)
    for prefix, module in _named_modules(model):
        for local, w in module._parameters.items():
            if w is not None and id(w) not in names:  # a shared tensor keeps its first name, as named_parameters
                names[id(w)] = f"{prefix}.{local}" if prefix else local
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            norms.append(module)
        reason = _module_refusal(module, half_on_cpu, autocast_dtype)
        if reason is not None:
            return refused(f"module {prefix or type(module).__name__} {reason}")
    size = 0
    for group in optimizer.param_groups:
        for w in group["params"]:
            if id(w) not in names:
                return refused("the optimizer holds parameters the model does not own")
            if w.requires_grad:
                size += w.numel()
    if min(micro_batches, 2) * size > MAX_STACKED_ELEMENTS:  # larger G run in groups of >= 2 micro-batches
        return refused(f"2 copies of {size} weights exceed MAX_STACKED_ELEMENTS ({MAX_STACKED_ELEMENTS})")
    return _Survey(None, names, norms, size)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())`` (the same order; a module met twice keeps its first name), walked with a
    stack instead of nested generators: half the time, paid on every m-SAM step."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((prefix, module))
        children = module._modules
        if children:
            stack.extend(reversed([(f"{prefix}.{name}" if prefix else name, child)
                                   for name, child in children.items() if child is not None]))
    return out


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _module_refusal(module: nn.Module, half_on_cpu: bool, autocast_dtype: torch.dtype | None) -> str | None:
    """Why this one module keeps the micro-batches from one batched pass (see :func:`batched_refusal`), or None."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return "has forward/backward hooks"
    if isinstance(module._modules.get("parametrizations"), nn.ModuleDict):  # parametrize.is_parametrized
        return "is parametrized"
    if module.training and (
        (isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0)
        or (isinstance(module, nn.MultiheadAttention) and module.dropout > 0)
    ):
        return "applies dropout in training mode"
    if isinstance(module, _NormBase) and module.training and module.track_running_stats:
        if not isinstance(module, _BATCH_NORMS) or isinstance(module, nn.SyncBatchNorm):
            return f"({type(module).__name__}) updates running statistics"
        if is_lazy(module.running_mean):
            return "is an uninitialized lazy module"
    if half_on_cpu and isinstance(module, _NORMS):
        return f"({type(module).__name__}) runs under CPU {autocast_dtype} autocast"
    return None


@contextlib.contextmanager
def _batch_statistics_only(norms: list[_NormBase]) -> Iterator[None]:
    """Run BatchNorm layers in training mode without touching their running buffers (``track_running_stats``
    off: they normalize with the batch's statistics, as they do anyway in training mode, and write nothing)."""
    try:
        for module in norms:
            module.track_running_stats = False
        yield
    finally:
        for module in norms:
            module.track_running_stats = True


@contextlib.contextmanager
def _removing(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batched_passes(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: LossFn,
    images: Tensor,
    labels: Tensor,
    *,
    m: int,
    n: int,
    survey: _Survey,
    autocast: Callable,
    scaler: torch.amp.GradScaler | None,
    structured: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """What :func:`_loop_passes` does for ``G = len(images) / m`` micro-batches of ``m``, in two vmapped passes.

    1. Clean pass: ``vmap`` over micro-batches of ``grad`` of ``functional_call`` at the shared ``w`` gives the
       ``G`` clean gradients ``g_j`` (``(G, *w.shape)`` per tensor, the per-sample-gradient recipe). BatchNorm
       layers in training mode run with ``track_running_stats`` off (micro-batch statistics, no buffer writes)
       while a forward pre-hook captures each micro-batch's statistics ``s_j`` (mean and unbiased variance of the
       layer's input over all dimensions but the channel); the running buffers then get the loop's sequence
       ``r <- (1 - a_k) r + a_k s_k``, k = 1..G, in closed form (``a_k = momentum``, or
       ``1 / num_batches_tracked`` for ``momentum=None``), and ``num_batches_tracked += G``.
    2. ``eps_j`` for all rows at once (:func:`~sharpscope.optim.perturbation.stacked_joint_perturbation`, with
       the optimizer's groups, ``rho`` schedule, ``p``, ASAM).
    3. Perturbed pass: ``vmap`` of ``functional_call`` with the stacked weights ``w + eps_j`` (built from the live
       parameters, so autograd sums the rows into ``p.grad``); the backward of ``sum_j (m / n) L_j(w + eps_j)``
       adds ``sum_j (m / n) grad L_j(w + eps_j)`` to ``p.grad``. BatchNorm normalizes with micro-batch statistics
       and writes nothing.

    Only first derivatives are taken, so the torch 2.13 vmap bug in second derivatives does not apply (the tests
    compare with the loop on BatchNorm, LayerNorm, GroupNorm and attention models). The weights are never moved
    (``w + eps_j`` are separate tensors), so an error leaves nothing to restore; the running statistics are written
    last. Micro-batches run in groups of at most ``MAX_STACKED_ELEMENTS / (trainable weights)`` per vmapped call,
    in order. Returns ``(sum_j (m / n) L_j(w), correct count, found_inf or None)``.
    """
    num_micro = images.shape[0] // m
    names, norms = survey.names, survey.norms
    # the optimizer's trainable tensors, with their group settings (SAM.perturb's families, by p)
    entries = []
    for group in optimizer.param_groups:
        rho = optimizer.scheduled_rho(group)
        for w in group["params"]:
            if w.requires_grad:
                entries.append((names[id(w)], w, rho, group))
    scale_value = scaler.scale(torch.ones((), device=images.device)) if scaler is not None else None
    per_group = max(2, MAX_STACKED_ELEMENTS // max(1, survey.size))
    passes = _structured_passes(model, entries, loss_fn, images, labels, m=m) if structured else None
    if passes is not None:
        try:
            return _run_batched(passes, model, entries, norms, loss_fn, images, labels, m=m, n=n,
                                num_micro=num_micro, per_group=per_group, autocast=autocast, scaler=scaler,
                                scale_value=scale_value)
        except micro_batches.Unsupported as exc:  # seen only at run time (e.g. a layer called twice)
            micro_batches.refuse(model, str(exc))
            for _, w, _, _ in entries:
                w.grad = None  # drop what a finished group accumulated; nothing else was written
    return _run_batched(None, model, entries, norms, loss_fn, images, labels, m=m, n=n, num_micro=num_micro,
                        per_group=per_group, autocast=autocast, scaler=scaler, scale_value=scale_value)


def _structured_passes(model: nn.Module, entries: list, loss_fn: LossFn, images: Tensor, labels: Tensor, *,
                       m: int) -> micro_batches.StructuredPasses | None:
    """The model's :class:`~sharpscope.optim.micro_batches.StructuredPasses` once checked, else None (vmap path)."""
    plan = micro_batches.structured_plan(model, [name for name, *_ in entries])
    if isinstance(plan, str):
        return None
    if not plan.checked:
        try:
            plan.check([w for _, w, _, _ in entries], loss_fn, images, labels, m,
                       lambda grads: _stacked_eps(entries, grads))
        except micro_batches.Unsupported as exc:
            micro_batches.refuse(model, str(exc))
            return None
    return plan


class _VmapPasses:
    """The two passes of :func:`_run_batched` for any model: ``torch.func.vmap`` over the micro-batches.

    The same interface as :class:`~sharpscope.optim.micro_batches.StructuredPasses` (``clean`` / ``perturbed`` on
    the flat samples of ``G`` micro-batches, inside :meth:`active`). BatchNorm layers in training mode run with
    ``track_running_stats`` off (micro-batch statistics, no buffer writes) while a forward pre-hook captures each
    micro-batch's statistics (mean and unbiased variance of the layer's input over all dimensions but the channel).
    """

    def __init__(self, model: nn.Module, entries: list, norms: list[_NormBase], loss_fn: LossFn, autocast: Callable,
                 scale: Tensor | None) -> None:
        self.norms = norms
        self.autocast = autocast
        self.names = [name for name, *_ in entries]
        train_names = set(self.names)
        frozen = {name: w.detach() for name, w in model.named_parameters() if name not in train_names}
        buffers = dict(model.named_buffers())
        self._capturing = False
        self._captured: dict[int, list[tuple[Tensor, Tensor]]] = {}

        def clean_objective(weights, x, y):
            self._captured.clear()
            logits = functional_call(model, (weights, frozen, buffers), (x,))
            loss = loss_fn(logits, y)
            stats = [self._captured.get(id(module), []) for module in norms]
            return (loss if scale is None else loss * scale), (loss, logits, stats)

        def perturbed_objective(weights, x, y):
            return loss_fn(functional_call(model, (weights, frozen, buffers), (x,)), y)

        self._clean_grad = vmap(grad(clean_objective, has_aux=True), in_dims=(None, 0, 0))
        self._perturbed = vmap(perturbed_objective, in_dims=(0, 0, 0))

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if self._capturing:
            x = args[0].detach()
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # the kernel's accumulation type
            dims = [0, *range(2, x.dim())]
            self._captured.setdefault(id(module), []).append((x.mean(dims), x.var(dims, correction=1)))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        hooks = [module.register_forward_pre_hook(self._capture) for module in self.norms]
        with _batch_statistics_only(self.norms), _removing(hooks):
            yield

    def clean(self, live: list[Tensor], x: Tensor, y: Tensor, groups: int):
        weights = {name: w.detach() for name, w in zip(self.names, live)}
        self._capturing = True
        try:
            with self.autocast():
                grads, (losses, logits, stats) = self._clean_grad(
                    weights, x.unflatten(0, (groups, -1)), y.unflatten(0, (groups, -1)))
        finally:
            self._capturing = False
        if any(len(calls) != 1 for calls in stats):
            # the closed-form update assumes one update per micro-batch, as a layer called once does
            raise RuntimeError("a BatchNorm layer that tracks running statistics ran other than once per forward")
        return ([grads[name] for name in self.names], losses.sum(), logits.flatten(0, 1),
                [torch.stack(calls[0]) for calls in stats])

    def perturbed(self, live: list[Tensor], eps: list[Tensor], x: Tensor, y: Tensor, groups: int) -> Tensor:
        stacked = {name: w + e for name, w, e in zip(self.names, live, eps)}  # w live: autograd sums the rows
        with self.autocast():
            return self._perturbed(stacked, x.unflatten(0, (groups, -1)), y.unflatten(0, (groups, -1))).sum()


def _run_batched(
    passes: micro_batches.StructuredPasses | None,
    model: nn.Module,
    entries: list,
    norms: list[_NormBase],
    loss_fn: LossFn,
    images: Tensor,
    labels: Tensor,
    *,
    m: int,
    n: int,
    num_micro: int,
    per_group: int,
    autocast: Callable,
    scaler: torch.amp.GradScaler | None,
    scale_value: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The two batched passes over groups of micro-batches: ``passes`` (structured) or, for None, ``vmap``."""
    if passes is None:
        runner = _VmapPasses(model, entries, norms, loss_fn, autocast, scale_value)
        clean, perturbed, context = runner.clean, runner.perturbed, runner.active()
    else:
        if passes.tracked != norms:
            raise micro_batches.Unsupported("the BatchNorm layers changed since the plan was made")
        clean = partial(passes.clean, loss_fn=loss_fn, scale=scale_value, low_rank=_eps_is_scaled_gradient(entries))
        perturbed = partial(passes.perturbed, loss_fn=loss_fn)
        context = contextlib.nullcontext()
    live = [w for _, w, _, _ in entries]
    total_loss = total_correct = found_inf = None
    batch_stats: list[list[Tensor]] = []  # per group: per layer (2, G, C), the means and the variances
    with context:
        for start in range(0, num_micro, per_group):
            count = min(per_group, num_micro - start)
            x = images[start * m: (start + count) * m]
            y = labels[start * m: (start + count) * m]
            g_list, loss_sum, logits, stats = clean(live, x=x, y=y, groups=count)
            batch_stats.append(stats)
            if scaler is not None:
                found_inf = _unscale_clean_grads(scaler, g_list, found_inf)
            eps = _stacked_eps(entries, g_list)
            sam_loss = perturbed(live, eps, x=x, y=y, groups=count) * (m / n)
            (sam_loss if scale_value is None else sam_loss * scale_value).backward()
            weighted = loss_sum.detach().to(torch.promote_types(loss_sum.dtype, torch.float32)) * (m / n)
            correct = (logits.detach().argmax(dim=-1) == y).sum()
            total_loss = weighted if total_loss is None else total_loss + weighted
            total_correct = correct if total_correct is None else total_correct + correct
    # batch_stats[group][layer] -> per layer, all micro-batches in order (one group: no copy)
    _commit_running_stats(norms, [group[0] if len(batch_stats) == 1 else torch.cat(group, dim=1)
                                  for group in zip(*batch_stats)])
    assert total_loss is not None and total_correct is not None
    return total_loss, total_correct, found_inf


def _stacked_eps(entries: list, grads: list[Tensor | LowRank]) -> list[Tensor | LowRank]:
    """``eps_j`` for every row of the stacked clean gradients, one joint ball per ``p`` (as :meth:`SAM.perturb`).

    Factored gradients (:class:`~sharpscope.optim.low_rank.LowRank`) give factored ``eps_j`` for p = 2 without
    ASAM where the plain norm is safe (:func:`sharpscope.optim.low_rank.joint_perturbation`); otherwise they are
    expanded to their ``(G, out, in)`` stacks first."""
    if any(isinstance(g, LowRank) for g in grads):
        if _eps_is_scaled_gradient(entries):
            eps = low_rank.joint_perturbation(grads, [rho for _, _, rho, _ in entries])
            if eps is not None:
                return eps
        grads = [g.dense() if isinstance(g, LowRank) else g for g in grads]
    families: dict[float, list[int]] = {}
    for i, (_, _, _, group) in enumerate(entries):
        families.setdefault(group["p"], []).append(i)
    eps: list[Tensor] = [None] * len(entries)  # type: ignore[list-item]
    for p, idx in families.items():
        parts = stacked_joint_perturbation(
            [grads[i] for i in idx], [entries[i][1] for i in idx], rhos=[entries[i][2] for i in idx], p=p,
            adaptive=[entries[i][3]["adaptive"] for i in idx], etas=[entries[i][3]["eta"] for i in idx],
        )
        for i, e in zip(idx, parts):
            eps[i] = e
    return eps


def _eps_is_scaled_gradient(entries: list) -> bool:
    """Whether every ``eps_j`` is ``rho g_j / ||g_j||_2`` (p = 2, no ASAM): then factored Linear gradients stay
    factored through ``eps_j`` (:mod:`sharpscope.optim.low_rank`)."""
    return all(group["p"] == 2.0 and not group["adaptive"] for _, _, _, group in entries)


@torch.no_grad()
def _commit_running_stats(norms: list[_NormBase], stats: list[Tensor]) -> None:
    """Apply the loop's running-statistics updates ``r <- (1 - a_k) r + a_k s_k``, k = 1..G, to each layer.

    ``stats[i]`` holds layer ``i``'s micro-batch means and unbiased variances ``s_k``, ``(2, G, C)``, in order. In
    closed form ``r_G = prod_k (1 - a_k) r_0 + sum_k a_k prod_{l > k} (1 - a_l) s_k`` (equal to the loop up to
    rounding), with ``a_k = momentum`` or, for ``momentum=None`` (a cumulative average), ``1 / (num_batches_tracked
    + k)``: per layer one product and one sum for both, then two foreach kernels for every buffer.
    """
    buffers: list[Tensor] = []
    keeps: list[float] = []
    updates: list[Tensor] = []
    counters: list[Tensor] = []
    for module, both in zip(norms, stats):
        count = both.shape[1]
        tracked = module.num_batches_tracked
        if module.momentum is None:
            seen = int(tracked) if tracked is not None else 0  # a host sync, as in BatchNorm's own forward
            factors = tuple(1.0 / (seen + k + 1) for k in range(count))
        else:
            factors = (float(module.momentum),) * count
        keep, coefs = _update_coefficients(factors, both.dtype, both.device)
        for running, update in zip((module.running_mean, module.running_var), (both * coefs).sum(dim=1).unbind()):
            if running is not None:
                buffers.append(running)
                keeps.append(keep)
                updates.append(update if update.dtype == running.dtype else update.to(running.dtype))
        if tracked is not None:
            counters.append(tracked)
    if buffers:
        torch._foreach_mul_(buffers, keeps)
        torch._foreach_add_(buffers, updates)
    if counters:
        torch._foreach_add_(counters, stats[0].shape[1])


@functools.lru_cache(maxsize=64)
def _update_coefficients(factors: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> tuple[float, Tensor]:
    """``(prod_k (1 - a_k), (a_k prod_{l > k} (1 - a_l))_k)`` for the update factors ``a_k``, the weights as a
    ``(G, 1)`` tensor (computed in float64; cached, as the momentum is constant: the tensor is never written)."""
    keep = [1.0] * (len(factors) + 1)  # keep[k] = prod_{l >= k} (1 - a_l)
    for k in range(len(factors) - 1, -1, -1):
        keep[k] = keep[k + 1] * (1.0 - factors[k])
    weights = torch.tensor([factors[k] * keep[k + 1] for k in range(len(factors))], dtype=torch.float64)
    return keep[0], weights.to(device=device, dtype=dtype)[:, None]


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

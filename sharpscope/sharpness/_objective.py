"""The shared machinery of the sharpness measures: evaluation data cut into chunks of ``m`` samples, and the
objective ``L_B(w + delta)`` evaluated for a stack of chunks ``B`` and perturbations ``delta`` at once.

Chunks are vectorised with :func:`torch.func.vmap` over :func:`torch.func.functional_call`: ``G`` chunks with
``G`` perturbations run as one batched forward (and backward), which for ``m = 1..8`` is ~8x faster on CPU
than a Python loop over chunks (measured on a small ConvNet, 512 chunks of 4 samples). Models are evaluated in
eval mode (BatchNorm uses its running statistics), so the per-chunk results do not depend on how chunks are
grouped. A plain loop over chunks is kept as the fallback for models whose forward ``vmap`` cannot batch, and
as the serial reference the vectorised path is tested against.

Data follow :mod:`sharpscope.batches`: ``x`` (inputs) and ``y`` (targets) below are any nesting of tensors (a
tensor, a tuple of tensors for ``model(*inputs)``, a dict for ``model(**inputs)``); every tensor of dimension >= 1
holds the samples along dim 0 and is sliced and reshaped into chunks alike (:func:`take`, :func:`make_chunks`);
0-d tensors and non-tensors are constants. With a :class:`sharpscope.batches.BatchLoss` the objective is
``fn(model_{w + delta}, batch)`` evaluated through ``functional_call`` (``vmap`` over chunks, never the structured
path, which needs the model's outputs).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from sharpscope.batches import (
    NO_TARGETS,
    BatchLoss,
    check_sample_dims,
    concat_batches,
    join_batch,
    map_samples,
    model_arguments,
    num_samples,
    sample_tensors,
    split_batch,
    to_device,
    unfused_attention,
)
from sharpscope.errors import SharpscopeError
from sharpscope.hessian.operator import select_parameters
from sharpscope.max_pool import fast_max_pools
from sharpscope.sharpness.span import SpanBasis, SpanRefused, worth_it

__all__ = [
    "ChunkedObjective", "stack_data", "make_chunks", "chunk_group_size", "seeded_draws", "mean_and_stderr",
    "MAX_GROUP_ELEMENTS", "take", "leading_size",
]

#: At most this many perturbation entries (chunks in a group x perturbed parameters) per group: the ascent keeps
#: ~6 such stacks (iterate, previous iterate, best, gradient, best gradient, direction), i.e. ~400 MB in float32.
MAX_GROUP_ELEMENTS = 1 << 24

_log = logging.getLogger(__name__)

Data = Any  # one batch (inputs, targets), or an iterable of batches such as sharpscope.data.EvalBatches


def take(tree: Any, index: Any) -> Any:
    """``tree`` with every sample tensor indexed along dim 0 by ``index`` (an int, a slice or an index tensor)."""
    return map_samples(lambda t: t[index], tree)


def leading_size(tree: Any, dim: int = 0) -> int:
    """Size of dimension ``dim`` of the first sample tensor of ``tree`` (chunks: dim 0, samples per chunk: dim 1)."""
    tensors = sample_tensors(tree)
    if not tensors:
        raise SharpscopeError("the data hold no tensor with the samples along dim 0")
    return int(tensors[0].shape[dim])


def _is_one_batch(data: Any, loss_fn: Any) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches: a pair whose inputs or targets is a
    tensor (a list of batches holds pairs, not tensors), or a dict given with a ``BatchLoss``."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return isinstance(data[0], Tensor) or isinstance(data[1], Tensor)
    return isinstance(data, Mapping) and isinstance(loss_fn, BatchLoss)


def stack_data(data: Data, *, device: torch.device, dtype: torch.dtype, loss_fn: Any = None) -> tuple[Any, Any]:
    """All samples of ``data`` as one batch ``(inputs, targets)`` on ``device``, the samples along dim 0.

    ``data`` is one batch ``(inputs, targets)`` whose inputs or targets is a tensor (e.g. ``(x, y)`` tensors), or
    an iterable of batches (``sharpscope.data.EvalBatches``, a list, a ``DataLoader``), concatenated in order;
    batches follow :mod:`sharpscope.batches` (inputs a tensor, a tuple or a dict; with a ``BatchLoss`` any
    structure, returned as ``(batch, NO_TARGETS)``). Floating-point tensors of the inputs are cast to ``dtype``
    (the model's), targets keep theirs. With tensor data the result is the pair of tensors ``(x (N, ...), y (N, ...))``.
    """
    batches: Iterable[Any] = [data] if _is_one_batch(data, loss_fn) else data
    try:
        items = list(batches)
    except TypeError:
        raise SharpscopeError(
            f"data must be (x, y) tensors or an iterable of (inputs, targets) batches (e.g. sharpscope.data."
            f"EvalBatches), got {type(data).__name__}; wrap your data as (inputs, labels) or "
            "EvalBatches.from_tensors(x, y, ...)"
        ) from None
    if not items:
        raise SharpscopeError(
            "data holds no samples (no batches); pass (x, y) tensors or a non-empty EvalBatches"
        )
    pairs = []
    for item in items:
        inputs, targets = split_batch(item, loss_fn)
        n = num_samples(item)
        if targets is not NO_TARGETS and sample_tensors(inputs) and sample_tensors(targets):
            n_targets = num_samples(targets)
            if n_targets != n:
                raise SharpscopeError(f"data has {n} inputs but {n_targets} labels; they must match")
        check_sample_dims(item, n)
        pairs.append((to_device(inputs, device, dtype=dtype), to_device(targets, device)))
    inputs, targets = concat_batches(pairs)
    return inputs, targets


def make_chunks(
    x: Any, y: Any, *, m: int | None, shuffle: bool, seed: int, max_chunks: int | None
) -> tuple[Any, Any]:
    """Partition ``N`` samples into ``C = N // m`` disjoint chunks of ``m``: every sample tensor as ``(C, m, ...)``.

    With ``shuffle`` the samples are first permuted by a CPU generator seeded with ``seed`` (the chunks do not
    follow the dataset's order, which may be sorted by class); otherwise chunk ``j`` is samples
    ``j*m .. (j+1)*m - 1``. The last ``N mod m`` samples are left out. ``max_chunks`` keeps the first chunks
    only. ``m=None`` means one chunk of all ``N`` samples (full-batch). ``x`` and ``y`` are nestings of tensors
    (:mod:`sharpscope.batches`), each sample tensor cut alike.
    """
    n = num_samples((x, y))
    if m is None:
        m = n
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise SharpscopeError(f"m must be a positive integer number of samples per chunk, got {m!r}")
    if m > n:
        raise SharpscopeError(
            f"m={m} is larger than the evaluation set ({n} samples); use m <= {n} or evaluate on more samples"
        )
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
        raise SharpscopeError(f"max_chunks must be a positive integer or None, got {max_chunks!r}")
    num_chunks = n // m if max_chunks is None else min(n // m, max_chunks)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: num_chunks * m]
        x, y = map_samples(lambda t: t[order.to(t.device)], (x, y))
    else:
        x, y = take((x, y), slice(0, num_chunks * m))
    return map_samples(lambda t: t.reshape(num_chunks, m, *t.shape[1:]), (x, y))


def chunk_group_size(m: int, num_params: int, *, batch_size: int, copies: int = 1) -> int:
    """How many chunks (or perturbations) to evaluate in one vectorised call.

    At most ``batch_size`` samples per forward pass (``G * m <= batch_size`` when ``m <= batch_size``) and at
    most :data:`MAX_GROUP_ELEMENTS` perturbation entries per stack; at least one chunk.
    """
    by_samples = max(1, batch_size // m)
    by_memory = max(1, MAX_GROUP_ELEMENTS // max(1, num_params * copies))
    return max(1, min(by_samples, by_memory))


# ------------------------------------------------------------------------------ structured per-chunk corrections
class _Unsupported(Exception):
    """The structured path cannot evaluate this model or call; the caller falls back to vmap."""


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_LINEAR_TYPES = (nn.Linear,)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _base_forward(module: nn.Module) -> Any:
    """The library class whose (unchanged) forward ``module`` runs, or None (custom forwards are not trusted)."""
    for base in _LINEAR_TYPES + _CONV_TYPES + _NORM_TYPES:
        if isinstance(module, base) and type(module).forward is base.forward:
            return base
    return None


def _chunk_view(t: Tensor, groups: int, total: int) -> Tensor:
    """``t (N, ...)`` with the ``N = G * m`` samples along dim 0 as ``(G, m, ...)``; _Unsupported otherwise."""
    if t.dim() == 0 or t.shape[0] != total:
        raise _Unsupported(f"a layer saw an input of shape {tuple(t.shape)}, not the batch of {total} samples on dim 0")
    return t.reshape(groups, total // groups, *t.shape[1:])


def _per_channel(d: Tensor, like: Tensor) -> Tensor:
    """``d (G, C)`` shaped to broadcast against ``like (G, m, C, *spatial)``."""
    return d.reshape(d.shape[0], 1, d.shape[1], *([1] * (like.dim() - 3)))


class _ChunkLinear(torch.autograd.Function):
    """``x_c D_c^T`` for every chunk ``c``: ``x (G, n, in)``, ``D (G, out, in)`` -> ``(G, n, out)`` (``torch.bmm``).

    The same numbers as ``torch.bmm(x, D.transpose(1, 2))`` under autograd, with the backward written out so both
    gradients come back contiguous and from fast kernels: ``dL/dD_c = go_c^T x_c`` (an outer product by
    broadcasting for ``n = 1``) and ``dL/dx_c = go_c D_c``. Autograd's own backward of that ``bmm`` returned
    ``dL/dD`` transposed (every later per-chunk op of the ascent on that layout ran ~10x slower) and formed
    ``dL/dx`` from a transposed batched matrix-vector product; together they were the largest cost of the
    ascent at ``m = 1`` on the digits ConvNet (profiled, ``benchmarks/bench_sharpness.py``).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor) -> Tensor:
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_output, weight)
        if ctx.needs_input_grad[1]:
            go_t = grad_output.transpose(1, 2)
            grad_weight = go_t * x if x.shape[1] == 1 else torch.bmm(go_t, x)
        return grad_x, grad_weight


def _correction(module: nn.Module, base: type, inputs: Tensor, output: Tensor, deltas: dict[str, Tensor],
                groups: int) -> Tensor:
    """The perturbed layer's output ``f_{w + delta_c}(x)`` for every chunk ``c``, from its clean output ``f_w(x)``.

    Linear and convolutions are linear in their weights: ``(W + D_c) x + b + d_c = W x + b + (D_c x + d_c)``, the
    correction one batched matmul per chunk (convolutions: on the unfolded input, or a grouped convolution).
    The normalisations (eval-mode BatchNorm, LayerNorm, GroupNorm) are affine in their weight and bias:
    ``x_hat (gamma + D_c) + beta + d_c`` with ``x_hat`` the normalised input.
    """
    total = inputs.shape[0] if inputs.dim() else -1
    out = _chunk_view(output, groups, total)
    weight, bias = deltas.get("weight"), deltas.get("bias")
    if base is nn.Linear:
        x = _chunk_view(inputs, groups, total)
        flat = x.reshape(groups, -1, x.shape[-1])
        corr = torch.zeros((), dtype=out.dtype, device=out.device)
        if weight is not None:
            corr = _ChunkLinear.apply(flat, weight).reshape(out.shape)
        if bias is not None:
            corr = corr + bias.reshape(groups, *([1] * (out.dim() - 2)), bias.shape[-1])
        return (out + corr).reshape(output.shape)
    if base in _CONV_TYPES:
        x = _chunk_view(inputs, groups, total)
        if weight is not None:
            if module.padding_mode != "zeros":
                raise _Unsupported("convolution with padding_mode other than zeros")
            if base is nn.Conv2d and module.groups == 1 and not isinstance(module.padding, str):
                m = x.shape[1]
                cols = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
                cols = cols.reshape(groups, m, cols.shape[1], cols.shape[2])  # (G, m, C k k, L)
                corr = torch.einsum("gok,gmkl->gmol", weight.flatten(2), cols).reshape(out.shape)
            else:  # chunks as convolution groups: (m, G C, ...) with G * groups groups
                m = x.shape[1]
                stacked = x.transpose(0, 1).reshape(m, -1, *x.shape[3:])
                conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[base]
                corr = conv(stacked, weight.reshape(-1, *weight.shape[2:]), None, module.stride, module.padding,
                            module.dilation, groups * module.groups)
                corr = corr.reshape(m, groups, *out.shape[2:]).transpose(0, 1)
            out = out + corr
        if bias is not None:
            out = out + _per_channel(bias, out)
        return out.reshape(output.shape)
    # normalisations: the normalised input, then the per-chunk affine correction
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            raise _Unsupported("BatchNorm in training mode (batch statistics mix the chunks)")
        shape = (1, -1, *([1] * (inputs.dim() - 2)))
        normed = (inputs - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
        normed = _chunk_view(normed, groups, total)
        expand = lambda d: _per_channel(d, out)  # noqa: E731
    elif isinstance(module, nn.GroupNorm):
        normed = _chunk_view(F.group_norm(inputs, module.num_groups, None, None, module.eps), groups, total)
        expand = lambda d: _per_channel(d, out)  # noqa: E731
    else:  # LayerNorm over the trailing normalized_shape
        normed = _chunk_view(F.layer_norm(inputs, module.normalized_shape, None, None, module.eps), groups, total)
        expand = lambda d: d.reshape(groups, *([1] * (out.dim() - 1 - d.dim() + 1)), *d.shape[1:])  # noqa: E731
    if weight is not None:
        out = out + normed * expand(weight)
    if bias is not None:
        out = out + expand(bias)
    return out.reshape(output.shape)


def _merged(module: nn.Module, base: type, inputs: Tensor, deltas: dict[str, Tensor], groups: int) -> Tensor | None:
    """``f_{w + delta_c}(x)`` of a Linear or a zero-padded ``groups=1`` Conv2d computed directly with the per-chunk
    weights ``W + D_c`` (one batched matmul), or None where :func:`_correction` is the cheaper way (or the only one).

    ``(W + D_c) x`` costs one product per chunk where ``W x + D_c x`` costs two (and two more in the backward);
    forming ``W + D_c`` costs one addition per weight per chunk, so this pays where a chunk feeds the layer at
    least two rows (``m >= 2``, or any ``m`` for a convolution or a sequence input) and not at one row per chunk.
    One chunk per call runs the layer's own kernel (any Linear or convolution) with ``W + D``.
    """
    weight_delta = deltas.get("weight")
    if weight_delta is None or inputs.dim() < 2 or inputs.shape[0] % groups:
        return None  # _correction explains what it cannot evaluate
    total = inputs.shape[0]
    if groups == 1:  # one chunk (m >= the batch size): the layer's own kernel with W + D, as the loop runs it
        bias = _merged_bias(module.bias, deltas.get("bias"))
        bias = bias[0] if bias is not None and bias.dim() == 2 else bias
        if base is nn.Linear:
            return F.linear(inputs, module.weight + weight_delta[0], bias)
        return module._conv_forward(inputs, module.weight + weight_delta[0], bias)
    if base is nn.Linear:
        x = _chunk_view(inputs, groups, total)
        flat = x.reshape(groups, -1, x.shape[-1])
        if flat.shape[1] < 2:
            return None
        out = _ChunkLinear.apply(flat, module.weight + weight_delta)
        bias = _merged_bias(module.bias, deltas.get("bias"))
        if bias is not None:
            out = out + (bias if bias.dim() == 1 else bias[:, None, :])
        return out.reshape(*inputs.shape[:-1], out.shape[-1])
    unfoldable = module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if base is nn.Conv2d and unfoldable:
        x = _chunk_view(inputs, groups, total)
        cols = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
        cols = cols.reshape(groups, x.shape[1], cols.shape[1], cols.shape[2])  # (G, m, C k k, L)
        out = torch.einsum("gok,gmkl->gmol", (module.weight + weight_delta).flatten(2), cols)
        bias = _merged_bias(module.bias, deltas.get("bias"))
        if bias is not None:
            out = out + (bias[:, None] if bias.dim() == 1 else bias[:, None, :, None])
        size = [(inputs.shape[2 + i] + 2 * module.padding[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1)
                // module.stride[i] + 1 for i in range(2)]
        return out.reshape(total, out.shape[2], *size)
    return None


def _span_linear(module: nn.Module, inputs: Tensor, deltas: dict[str, Tensor], span: SpanBasis, slot: int,
                 groups: int) -> Tensor:
    """A Linear layer whose weight perturbation is held by ``span`` (coefficients ``deltas["weight"]``):
    ``x W^T + x D_c^T + b + d_c``, the middle term from the chunk's gradient history."""
    if inputs.dim() != 2 or inputs.shape[0] % groups:
        raise SpanRefused(f"a factored Linear layer saw an input of shape {tuple(inputs.shape)}")
    out = F.linear(inputs, module.weight)
    rows = out.reshape(groups, -1, out.shape[-1]) + span.apply(slot, inputs.reshape(groups, -1, inputs.shape[-1]),
                                                               deltas["weight"])
    bias = _merged_bias(module.bias, deltas.get("bias"))
    if bias is not None:
        rows = rows + (bias if bias.dim() == 1 else bias[:, None, :])
    return rows.reshape(out.shape)


def _merged_bias(bias: Tensor | None, delta: Tensor | None) -> Tensor | None:
    """The bias ``b (out,)``, ``d_c (G, out)`` or ``b + d_c``, or None."""
    if delta is None:
        return bias
    return delta if bias is None else bias + delta


_VECTORIZE = (None, True, False, "structured", "vmap")




def _in_dims(tree: Any, dim: int | None) -> Any:
    """``vmap`` in_dims for a data tree: ``dim`` for its sample tensors, None for constants."""
    return tree_map(lambda leaf: dim if isinstance(leaf, Tensor) and leaf.dim() > 0 else None, tree)


class _LossCall(nn.Module):
    """``forward(batch) = fn(model, batch)``: a :class:`BatchLoss` as a module, so ``functional_call`` swaps the
    model's parameters for the perturbed ones (state keys ``model.<name>``)."""

    def __init__(self, model: nn.Module, fn: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


def _as_tensor_objective(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise SharpscopeError(
            f"loss_fn must return a 0-d mean over the batch, got {shape}; use reduction='mean' "
            "(e.g. nn.CrossEntropyLoss())"
        )
    return value


class ChunkedObjective:
    """``f(delta, B) = objective(model_{w + delta}(x_B), y_B)`` for stacks of chunks, with gradients in ``delta``.

    Args:
        model: the network; its current parameters are the centre ``w`` (read once, detached). Call inside
            ``eval_mode(model)``: the mode is whatever the model is in when the objective is evaluated.
        objective: ``objective(outputs, labels) -> 0-d`` mean over the samples (a loss such as
            ``nn.CrossEntropyLoss()``, or an accuracy), or a :class:`sharpscope.batches.BatchLoss`.
        params: the perturbed parameters: ``None`` for all with ``requires_grad``, or names / parameter tensors
            (:func:`sharpscope.hessian.operator.select_parameters`). The others stay at their values.
        batch_size: at most this many samples per forward pass (memory only; results do not depend on it
            beyond float rounding): a chunk of ``m > batch_size`` samples is split into pieces whose values
            and gradients are combined sample-weighted.
        vectorize: how chunks are batched. ``None`` (auto) and ``True``: the structured path (below) where every
            perturbed parameter sits in a supported layer and a one-time check against the serial loop passes,
            else ``vmap``; ``None`` then falls back to the loop (with a warning) if ``vmap`` cannot batch the
            model. ``"structured"`` / ``"vmap"``: that path only (``"structured"`` raises if unsupported).
            ``False``: the Python loop over chunks (the serial reference).

    The structured path runs the clean network once on all ``G m`` samples and adds, in every layer holding
    perturbed parameters, each chunk's correction (:func:`_correction`): ``(W + D_c) x = W x + D_c x`` for
    Linear and convolutions (one batched matmul, no per-chunk weight copies), ``x_hat (gamma + D_c)`` for eval
    BatchNorm, LayerNorm and GroupNorm. The per-chunk values are summed and differentiated once: chunk ``c``'s
    loss depends on ``D_c`` only, so ``d(sum_c L_c)/dD_c = dL_c/dD_c``. Measured on the digits ConvNet at
    ``m = 1`` (1,024 chunks), it costs a few times one forward/backward of the 1,024 samples where ``vmap``
    over per-chunk weights (grouped convolutions, a weight copy per chunk) cost ~28x
    (``benchmarks/bench_sharpness.py``). Attention (``nn.MultiheadAttention``) and custom layers go through
    ``vmap``; torch's fused attention kernel has no ``vmap`` rule, so every path runs with it switched off
    (``torch.backends.mha.set_fastpath_enabled(False)``): the same math, unfused.

    Perturbations are lists with one tensor ``(G, *p.shape)`` per perturbed parameter ``p``; data are
    ``x (G, m, ...)``, ``y (G, m, ...)`` (one chunk per perturbation) or, with ``shared=True``,
    ``x (m, ...)``, ``y (m, ...)`` (the same samples for every perturbation); ``x`` and ``y`` may be nestings of
    such tensors (:mod:`sharpscope.batches`).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable[[Any, Tensor], Tensor],
        *,
        params: Sequence[str | Tensor] | None = None,
        batch_size: int = 256,
        vectorize: bool | str | None = None,
    ) -> None:
        if vectorize not in _VECTORIZE:
            raise SharpscopeError(
                f"vectorize must be None (auto), True, False, 'structured' or 'vmap', got {vectorize!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SharpscopeError(f"batch_size must be a positive integer (samples per forward), got {batch_size!r}")
        self.model = model
        self.objective = objective
        self._loss_call = _LossCall(model, objective) if isinstance(objective, BatchLoss) else None
        self.names, tensors = select_parameters(model, params)
        self.params = [p.detach() for p in tensors]
        chosen = set(self.names)
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self.fixed.update(dict(model.named_buffers()))
        self.num_params = sum(p.numel() for p in self.params)
        self.batch_size = batch_size
        self.vectorize = vectorize
        self._map_vectorized: bool | None = None
        #: None: not tried yet; False: unsupported (use vmap); else the hook plan of the structured path
        self._structured_plan: list[tuple[nn.Module, type, dict[str, int]]] | None | bool = None
        self._structured_checked = False
        #: set by the worst-case ascent for the length of one group: the Linear weights whose perturbations are
        #: coefficients over their gradient history (:mod:`sharpscope.sharpness.span`), or None (all dense)
        self.span: SpanBasis | None = None
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise SharpscopeError(
                f"the perturbed parameters mix dtypes {sorted(map(str, dtypes))} / devices "
                f"{sorted(map(str, devices))}; move the model to one dtype and device (model.to(...))"
            )
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    # ------------------------------------------------------------------------------------------------ basics
    def zeros(self, count: int) -> list[Tensor]:
        """A stack of ``count`` zero perturbations (coefficient stacks for the slots of :attr:`span`)."""
        span = self.span
        return [span.zeros(count) if span is not None and i in span.slots
                else torch.zeros((count, *p.shape), dtype=self.dtype, device=self.device)
                for i, p in enumerate(self.params)]

    def span_slots(self, x: Any, y: Any, *, rows: int, entries: int) -> dict[int, tuple[int, int]]:
        """The perturbed Linear weights worth factoring (:func:`sharpscope.sharpness.span.worth_it`) for
        ``entries`` gradients of chunks of ``rows`` samples, as ``{parameter index: (fan_in, fan_out)}``; empty
        unless the structured path runs this model. A structured path not tried yet runs once on (up to) two of
        the chunks ``x``, ``y``, so that its one-time check has passed before any coefficient stack exists."""
        if self.vectorize in (False, "vmap") or self._loss_call is not None:
            return {}
        if self._structured_plan is None:
            probe = take((x, y), slice(0, min(2, leading_size((x, y), 0))))
            self._try_structured(self.zeros(leading_size(probe, 0)), *probe, grad=False)
        plan = self._structured_plan
        if not isinstance(plan, list):
            return {}
        slots = {}
        for module, base, locals_ in plan:
            index = locals_.get("weight")
            if base is nn.Linear and index is not None and "forward" not in vars(module):
                fan_out, fan_in = self.params[index].shape
                if worth_it(entries, rows, fan_in, fan_out):
                    slots[index] = (fan_in, fan_out)
        return slots

    def _single(self, delta: Sequence[Tensor], x: Any, y: Any) -> Tensor:
        state = {name: p + d for name, p, d in zip(self.names, self.params, delta)}
        state.update(self.fixed)
        if self._loss_call is not None:
            state = {f"model.{name}": t for name, t in state.items()}
            return _as_tensor_objective(functional_call(self._loss_call, state, (join_batch(x, y),)))
        args, kwargs = model_arguments(self.model, x)
        return _as_tensor_objective(self.objective(functional_call(self.model, state, args, kwargs), y))

    def _pieces(self, x: Any, y: Any, *, shared: bool, group: int) -> list[tuple[Any, Any, float]]:
        dim = 0 if shared else 1
        m = leading_size((x, y), dim)
        size = max(1, self.batch_size // max(1, group))
        if m <= size:
            return [(x, y, 1.0)]
        pieces = []
        for start in range(0, m, size):
            stop = min(start + size, m)
            where = (slice(None),) * dim + (slice(start, stop),)
            xs, ys = map_samples(lambda t: t[where], (x, y))
            pieces.append((xs, ys, (stop - start) / m))
        return pieces

    # ------------------------------------------------------------------------------------------- evaluation
    def value(self, delta: Sequence[Tensor], x: Any, y: Any, *, shared: bool = False) -> Tensor:
        """``(G,)`` objective values at ``w + delta[g]`` on chunk ``g`` (or on the shared samples)."""
        return self._run(delta, x, y, shared=shared, grad=False)[0]

    def value_and_grad(
        self, delta: Sequence[Tensor], x: Any, y: Any, *, shared: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """``(G,)`` values and their gradients with respect to ``delta`` (a list of ``(G, *p.shape)``)."""
        return self._run(delta, x, y, shared=shared, grad=True)

    def _run(self, delta: Sequence[Tensor], x: Any, y: Any, *, shared: bool, grad: bool):
        # fused attention kernels have no vmap rule (they would run per sample): every path runs them unfused;
        # max pools outside vmap run sharpscope.max_pool's kernel (the same numbers, a fraction of torch's CPU time)
        with unfused_attention(), fast_max_pools(self.model):
            if self.vectorize is not False and self.vectorize != "vmap" and not shared:
                out = self._try_structured(delta, x, y, grad=grad)
                if out is not None:
                    return out
            if self.span is not None:
                raise SpanRefused("the structured path does not run here")
            if self.vectorize is None:
                try:
                    out = self._vmapped(delta, x, y, shared=shared, grad=grad)
                except SharpscopeError:
                    raise
                except (RuntimeError, NotImplementedError) as exc:
                    warnings.warn(
                        f"torch.func.vmap cannot batch this model's forward ({str(exc).splitlines()[0][:200]}); "
                        "evaluating chunks one at a time instead (slower). Pass vectorize=False to silence this.",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                    self.vectorize = False
                    return self._looped(delta, x, y, shared=shared, grad=grad)
                return out
            if self.vectorize is False:
                return self._looped(delta, x, y, shared=shared, grad=grad)
            return self._vmapped(delta, x, y, shared=shared, grad=grad)

    # ----------------------------------------------------------------------------------------- structured
    def _plan(self) -> list[tuple[nn.Module, type, dict[str, int]]]:
        """The layers holding perturbed parameters, with their supported base class; _Unsupported otherwise."""
        if self._loss_call is not None:
            raise _Unsupported("a BatchLoss computes the loss itself (the per-chunk outputs are not seen)")
        owners: dict[str, tuple[nn.Module, type, dict[str, int]]] = {}
        for index, name in enumerate(self.names):
            prefix, _, local = name.rpartition(".")
            module = self.model.get_submodule(prefix)
            base = _base_forward(module)
            if base is None or local not in ("weight", "bias"):
                raise _Unsupported(f"parameter {name} of a {type(module).__name__} layer")
            owners.setdefault(prefix, (module, base, {}))[2][local] = index
        return list(owners.values())

    def _try_structured(self, delta: Sequence[Tensor], x: Any, y: Any, *, grad: bool):
        """The structured path's result, or None where it does not apply (then vmap runs)."""
        if self._structured_plan is False:
            return None
        try:
            if self._structured_plan is None:
                self._structured_plan = self._plan()
            if not self._structured_checked:
                self._check_structured(x, y)
            return self._structured(delta, x, y, grad=grad)
        except _Unsupported as exc:
            if self.span is not None:  # coefficient stacks mean nothing to the other paths
                raise SpanRefused(str(exc)) from None
            if self.vectorize == "structured":
                raise SharpscopeError(f"the structured path cannot evaluate this model: {exc}; "
                                      "use vectorize=None") from None
            _log.debug("structured chunk path unavailable (%s); using vmap", exc)
            self._structured_plan = False
            return None

    def _check_structured(self, x: Any, y: Any) -> None:
        """One-time run-time check: the structured path equals the serial loop on two chunks at a random
        perturbation (~10% of each weight), values and gradients to ``sqrt(eps)`` relative. Catches what the
        plan cannot see: a perturbed tensor also used outside its layer's forward (tied weights), a layer fed
        something else than the batch on dim 0, layers mixing samples."""
        samples = leading_size((x, y), 0) * leading_size((x, y), 1)
        count = 2 if samples >= 2 else 1
        size = min(4, samples // count)
        xs, ys = map_samples(
            lambda t: t.reshape(samples, *t.shape[2:])[: count * size].reshape(count, size, *t.shape[2:]), (x, y))
        generator = torch.Generator(device=self.device).manual_seed(12345)
        delta = [0.1 * (p.abs() + p.abs().mean() + 1e-3)
                 * torch.randn((count, *p.shape), generator=generator, dtype=self.dtype, device=self.device)
                 for p in self.params]
        fast_value, fast_grad = self._structured(delta, xs, ys, grad=True)
        slow_value, slow_grad = self._looped(delta, xs, ys, shared=False, grad=True)
        tol = math.sqrt(torch.finfo(self.dtype).eps)
        value_ok = bool(((fast_value - slow_value).abs() <= tol * (1 + slow_value.abs())).all())
        diff = torch.sqrt(sum((a - b).pow(2).flatten(1).sum(1) for a, b in zip(fast_grad, slow_grad)))
        scale = torch.sqrt(sum(b.pow(2).flatten(1).sum(1) for b in slow_grad))
        grad_ok = bool((diff <= tol * (scale + 1e-30)).all())
        if not (value_ok and grad_ok):
            raise _Unsupported(
                f"check against the loop failed (values {fast_value.tolist()} vs {slow_value.tolist()}, "
                f"relative gradient difference {(diff / (scale + 1e-30)).tolist()})"
            )
        self._structured_checked = True

    def _structured(self, delta: Sequence[Tensor], x: Any, y: Any, *, grad: bool):
        group = delta[0].shape[0]
        values = torch.zeros(group, dtype=self.dtype, device=self.device)
        grads = None
        if grad and len(self._pieces(x, y, shared=False, group=group)) > 1:
            grads = [torch.zeros_like(d) for d in delta]
        state = dict(zip(self.names, self.params))
        state.update(self.fixed)
        plan = self._structured_plan
        fired = [0] * len(plan)
        current: list[Tensor] = []

        def make_hook(slot: int, base: type, locals_: dict[str, int]):
            def hook(module, args, output):
                if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                    raise _Unsupported(f"{type(module).__name__} called with non-tensor input or output")
                fired[slot] += 1
                return _correction(module, base, args[0], output,
                                   {local: current[i] for local, i in locals_.items()}, group)
            return hook

        span = self.span
        pieces = self._pieces(x, y, shared=False, group=group)
        if span is not None and len(pieces) > 1:  # before any forward is swapped
            raise SpanRefused(f"chunks of {leading_size((x, y), 1)} samples are evaluated in pieces")

        def make_forward(slot: int, module: nn.Module, base: type, locals_: dict[str, int]):
            def forward(*args, **kwargs):
                if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
                    raise _Unsupported(f"{type(module).__name__} called with other arguments than one tensor")
                fired[slot] += 1
                deltas = {local: current[i] for local, i in locals_.items()}
                if span is not None and locals_["weight"] in span.slots:
                    return _span_linear(module, args[0], deltas, span, locals_["weight"], group)
                out = _merged(module, base, args[0], deltas, group)
                if out is None:
                    out = _correction(module, base, args[0], base.forward(module, args[0]), deltas, group)
                return out
            return forward

        # Linear / Conv layers with a perturbed weight run W + D_c directly (their forward swapped for this call,
        # _merged); the others keep their forward and get the per-chunk correction from a hook (_correction)
        swapped: list[nn.Module] = []
        handles = []
        try:
            for slot, (module, base, locals_) in enumerate(plan):
                if "weight" in locals_ and base in _LINEAR_TYPES + _CONV_TYPES and "forward" not in vars(module):
                    module.forward = make_forward(slot, module, base, locals_)
                    swapped.append(module)
                else:
                    handles.append(module.register_forward_hook(make_hook(slot, base, locals_)))
        except BaseException:
            for module in swapped:
                del module.forward
            for handle in handles:
                handle.remove()
            raise
        try:
            for xs, ys, weight in pieces:
                m = leading_size((xs, ys), 1)
                flat = map_samples(lambda t: t.reshape(group * m, *t.shape[2:]), xs)
                args, kwargs = model_arguments(self.model, flat)
                with torch.enable_grad() if grad else torch.no_grad():
                    current[:] = [d.detach().requires_grad_(grad) for d in delta]
                    fired[:] = [0] * len(plan)
                    outputs = functional_call(self.model, state, args, kwargs)
                    if not all(fired):
                        raise _Unsupported("a layer holding perturbed parameters was not called through its forward")
                    v = self._chunk_objective(outputs, ys, group, m)
                    if grad:
                        parts = [None if part is None else part.contiguous()  # the ascent's layout: see _correction
                                 for part in torch.autograd.grad(v.sum(), current, allow_unused=True)]
                        if len(pieces) == 1:  # the common case: no zero-fill and accumulation passes
                            grads = [torch.zeros_like(d) if part is None else part for d, part in zip(delta, parts)]
                            if span is not None:  # the new history entry is the gradient, in span coordinates
                                one_hot = span.finish_gradient()
                                for i in span.slots:
                                    grads[i] = one_hot.clone()
                        else:
                            for total, part in zip(grads, parts):
                                if part is not None:
                                    total.add_(part, alpha=weight)
                values.add_(v.detach().to(self.dtype), alpha=weight)
        finally:
            for handle in handles:
                handle.remove()
            for module in swapped:
                del module.forward
            current.clear()
        return values, grads

    def _chunk_objective(self, outputs: Any, y: Any, group: int, m: int) -> Tensor:
        """``(G,)`` objective of each chunk from the outputs of all ``G m`` samples (batch on dim 0)."""
        if not isinstance(outputs, Tensor):
            raise _Unsupported(f"the model returns {type(outputs).__name__}, not a tensor")
        per_chunk = _chunk_view(outputs, group, group * m)
        try:
            return vmap(lambda o, t: _as_tensor_objective(self.objective(o, t)), in_dims=(0, _in_dims(y, 0)))(
                per_chunk, y)
        except SharpscopeError:
            raise
        except (RuntimeError, NotImplementedError):
            return torch.stack([_as_tensor_objective(self.objective(per_chunk[g], take(y, g))) for g in range(group)])

    def _vmapped(self, delta: Sequence[Tensor], x: Any, y: Any, *, shared: bool, grad: bool):
        group = delta[0].shape[0]
        data_dim = None if shared else 0
        values = torch.zeros(group, dtype=self.dtype, device=self.device)
        grads = [torch.zeros_like(d) for d in delta] if grad else None
        delta = list(delta)
        for xs, ys, weight in self._pieces(x, y, shared=shared, group=group):
            in_dims = (0, _in_dims(xs, data_dim), _in_dims(ys, data_dim))
            if grad:
                g, v = vmap(grad_and_value(self._single), in_dims=in_dims)(delta, xs, ys)
                for total, part in zip(grads, g):
                    total.add_(part, alpha=weight)
            else:
                with torch.no_grad():
                    v = vmap(self._single, in_dims=in_dims)(delta, xs, ys)
            values.add_(v.detach().to(self.dtype), alpha=weight)
        return values, grads

    def _looped(self, delta: Sequence[Tensor], x: Any, y: Any, *, shared: bool, grad: bool):
        """The serial reference: one chunk at a time with plain autograd."""
        group = delta[0].shape[0]
        values = torch.zeros(group, dtype=self.dtype, device=self.device)
        grads = [torch.zeros_like(d) for d in delta] if grad else None
        for g in range(group):
            xg, yg = (x, y) if shared else take((x, y), g)
            for xs, ys, weight in self._pieces(xg, yg, shared=True, group=1):
                if grad:
                    leaf = [d[g].detach().requires_grad_(True) for d in delta]
                    with torch.enable_grad():
                        v = self._single(leaf, xs, ys)
                        parts = torch.autograd.grad(v, leaf, allow_unused=True)
                    for total, part in zip(grads, parts):
                        if part is not None:
                            total[g].add_(part, alpha=weight)
                else:
                    with torch.no_grad():
                        v = self._single([d[g] for d in delta], xs, ys)
                values[g] += v.detach().to(self.dtype) * weight
        return values, grads

    def per_chunk(self, fn: Callable[[list[Tensor]], list[Tensor]], stack: Sequence[Tensor]) -> list[Tensor]:
        """Apply ``fn`` (parameter-shaped tensors in, parameter-shaped tensors out) to every chunk of a stack.

        Vectorised with ``vmap`` when ``fn`` allows it (tried once), otherwise a loop over the ``G`` chunks:
        ``fn`` is cheap next to a forward/backward pass (SAM's perturbation uses ``torch._foreach_*`` kernels,
        which have no ``vmap`` batching rule), so the loop costs little and needs no warning.
        """
        if self.vectorize is not False and self._map_vectorized is not False:
            try:
                out = list(vmap(fn)(list(stack)))
            except (RuntimeError, NotImplementedError) as exc:
                _log.debug("vmap cannot batch %s (%s); looping over chunks", fn, str(exc).splitlines()[0])
                self._map_vectorized = False
            else:
                self._map_vectorized: bool | None = None
                return out
        results = [fn([t[g] for t in stack]) for g in range(stack[0].shape[0])]
        return [torch.stack(parts) for parts in zip(*results)]

    # ------------------------------------------------------------------------------------------ determinism
    def check_deterministic(self, x: Any, y: Any) -> None:
        """Refuse a model whose objective is not a fixed function of the weights (STYLE.md 5).

        Evaluates the first chunk twice at ``delta = 0``; dropout or other randomness in the forward changes
        the value by far more than the ``256 eps`` relative room left for non-deterministic GPU reductions.
        """
        delta = self.zeros(1)
        x0, y0 = take((x, y), 0)
        with torch.no_grad():
            first = self._single([d[0] for d in delta], x0, y0).detach()
            second = self._single([d[0] for d in delta], x0, y0).detach()
        tolerance = 256 * torch.finfo(self.dtype).eps * max(float(first.abs()), 1e-30)
        if not float((first - second).abs()) <= tolerance:
            raise SharpscopeError(
                f"the loss is not deterministic: two evaluations of the same chunk gave {float(first):.10g} and "
                f"{float(second):.10g}. Likely cause: randomness inside the model's forward (dropout that ignores "
                "eval mode, noise layers). Sharpness needs a fixed function of the weights; pass "
                "check_deterministic=False if this is intended."
            )


def seeded_draws(
    objective: ChunkedObjective, indices: Sequence[int], *, seed: int, kind: str = "normal"
) -> list[Tensor]:
    """Random perturbation-shaped draws ``xi (len(indices), *p.shape)``, one independent stream per index.

    Draw ``i`` is generated from its own seed (derived from ``(seed, i)``), so it does not depend on how the
    draws are grouped into vectorised calls (``batch_size``, model size) or on the device's generator state.
    ``kind``: ``"normal"`` (standard Gaussian) or ``"uniform"`` (on ``[-1, 1]``).
    """
    generator = torch.Generator(device=objective.device)
    flat = torch.empty((len(indices), objective.num_params), dtype=objective.dtype, device=objective.device)
    for row, index in enumerate(indices):
        generator.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (1 << 63))
        if kind == "normal":
            flat[row].normal_(generator=generator)
        else:
            flat[row].uniform_(-1.0, 1.0, generator=generator)
    sizes = [p.numel() for p in objective.params]
    return [part.reshape(len(indices), *p.shape) for part, p in zip(flat.split(sizes, dim=1), objective.params)]


def gather_blocks(parts: tuple[Tensor, ...], shard: tuple[int, int] | None) -> tuple[Tensor, ...]:
    """Per-chunk tensors of this rank's block of chunks (:func:`sharpscope.distributed.block`), concatenated over
    the ranks of ``shard`` in rank order, on every rank: what one process computing every chunk would hold."""
    if shard is None:
        return parts
    from sharpscope import distributed

    device = parts[0].device
    gathered = distributed.all_gather(tuple(t.detach().cpu() for t in parts))
    return tuple(torch.cat([ranks[i] for ranks in gathered]).to(device) for i in range(len(parts)))


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean of ``values (C,)`` and its standard error ``std(ddof=1) / sqrt(C)`` (NaN for ``C = 1``)."""
    values = values.detach().to("cpu", torch.float64)
    count = values.numel()
    mean = float(values.mean())
    stderr = float(values.std(correction=1)) / math.sqrt(count) if count > 1 else float("nan")
    return mean, stderr

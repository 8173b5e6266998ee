"""m-SAM's micro-batches through the network's own layers: per-micro-batch gradients and weights in one pass.

The m-SAM step (:func:`sharpscope.optim.training_step` with ``micro_batch_size = m``) needs, for ``G`` micro-batches
``s_j`` of ``m`` samples, the clean gradients ``g_j = grad L_{s_j}(w)`` and the sum of the perturbed gradients
``sum_j (m / n) grad L_{s_j}(w + eps_j)``. Only the layers holding trainable weights see a difference between the
micro-batches, so this module runs the whole batch of ``G m`` samples through the model once per pass and changes
just those layers (and BatchNorm, whose batch statistics are per micro-batch):

* **clean pass** (``w`` shared): Linear and convolutions run their ordinary kernel; their backward returns the
  input gradient as usual and, instead of the summed weight gradient, each micro-batch's weight gradient
  (``go_j^T x_j`` as one batched matmul for Linear; one grouped ``convolution_backward`` over the micro-batches
  laid side by side as channel groups, ``(m, G C, ...)``, for convolutions). BatchNorm in training mode
  normalises each micro-batch with its own statistics and returns them for the running buffers; LayerNorm and
  GroupNorm are per sample already. The affine weights of the normalisations get per-micro-batch gradients
  through a zero ``(G, C)`` offset.
* **perturbed pass** (``w + eps_j`` per micro-batch, from the live parameters, so the backward adds
  ``sum_j c_j grad L_j(w + eps_j)`` to ``p.grad``): Linear as one batched matmul with the constants ``W + E_j``,
  convolutions as one grouped convolution of the ``(m, G C, ...)`` layout with the weights ``W + E_j`` (the weight
  gradient of either is the ordinary one of all rows, one plain kernel), normalisations with per-micro-batch affine
  weights.

**Factored Linear gradients.** Where a micro-batch has few rows, a Linear layer's clean gradients stay as their
factors ``O_j^T X_j`` (the layer's output gradients and inputs), ``eps_j`` too for p = 2 without ASAM, and the
perturbed layer runs as its own matmul plus ``(x_j X_j^T) O_j`` (:mod:`sharpscope.optim.low_rank`): the
``(G, out, in)`` stacks are never formed.

**Row forms.** A convolution whose input needs no gradient (the layers on the network's input), and a small one
whose input does, runs instead as a Linear layer on its windows (im2col), ``(N L, K C)`` rows, with the two Linear
kernels above; its output is a channels-last view of the rows, ``(G, m L, C)``, and the BatchNorm after it normalises
that layout as it does ``(N, C)`` inputs: torch's own kernel on the micro-batches' channels side by side,
``(m L, G C)`` (:func:`_batch_norm_rows`). Pooling and activations then run torch's channels-last kernels. This
replaced the grouped convolution where oneDNN is slowest (one input channel, per-micro-batch weight gradients, tiny
layers) and the side-by-side copies around the BatchNorm after it (measurements: :func:`_conv_rows`).

**On a tape.** Where the model's forward is a chain of module calls (``torch.fx``), each pass runs as one autograd
node: the layers' functions above are called directly, in order and back in reverse, with the activations between
them (:mod:`sharpscope.optim.tape`), instead of ~75 nodes and views on autograd's graph (the same numbers, bit for bit).

Every other layer (activations, pooling, reshapes, frozen layers) runs as it is, once, on all ``G m`` samples: it must
not mix samples. :func:`structured_plan` accepts a model only if every trainable tensor sits in a supported layer
whose forward is the library's (Linear, Conv1d/2d/3d with zero padding, BatchNorm1d/2d/3d, LayerNorm, GroupNorm),
and :meth:`StructuredPasses.check` compares, once per model, both passes on two micro-batches against the
micro-batches run one at a time (values and gradients to ``sqrt(eps)``; the row forms on a float64 copy of the
model, the grouped forms, where the row forms fail, in the model's dtype): a layer that mixes samples, a tied weight
used outside its layer or an input not batched on dim 0 make the check fail, and the step uses the ``vmap`` path.
Only first derivatives are taken, by the library's own kernels, so torch 2.13's ``vmap`` bug does not apply.

Measured (``benchmarks/bench_sam_step.py``, CPU, one thread, idle, registry ConvNet on 8x8 digits): see that file's
docstring for the step time against SGD, SAM, ``vmap`` and the loop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from sharpscope.optim import tape as tapes
from sharpscope.optim.bn import frozen_bn_stats
from sharpscope.optim.low_rank import (
    LowRank,
    PerturbedLinear,
    Scaled,
    shifted,
    weight_gradient,
    worth_it,
)

__all__ = ["StructuredPasses", "structured_plan"]

_log = logging.getLogger(__name__)

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PER_SAMPLE_NORM = (nn.LayerNorm, nn.GroupNorm)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Unsupported(Exception):
    """The structured passes cannot run this model or call (the step then uses the vmap path)."""


def _library_base(module: nn.Module) -> type | None:
    """The supported library class whose forward ``module`` runs unchanged, else None."""
    for base in _LINEAR + _CONV + _BATCH_NORM + _PER_SAMPLE_NORM:
        if isinstance(module, base) and type(module).forward is base.forward:
            return base
    return None


def _conv_padding(module: nn.Module) -> tuple[int, ...]:
    """The convolution's padding as integers (``'same'`` with an even total padding, ``'valid'``), else Unsupported."""
    dims = len(module.kernel_size)
    if module.padding_mode != "zeros":
        raise Unsupported(f"a convolution with padding_mode={module.padding_mode!r}")
    if module.padding == "valid":
        return (0,) * dims
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise Unsupported("a convolution with padding='same' and an even kernel (asymmetric padding)")
        return tuple(t // 2 for t in total)
    return tuple(module.padding)


@dataclass
class _Layer:
    """A layer the passes run themselves: its trainable tensors' slots in the entry list, by local name."""

    module: nn.Module
    base: type
    slots: dict[str, int]  # "weight" / "bias" -> index into the trainable entries
    padding: tuple[int, ...] = ()  # convolutions: integer padding
    stats_slot: int | None = None  # BatchNorm that updates running statistics: index into the captured statistics


@dataclass
class _Call:
    """What the swapped forwards read during one pass."""

    mode: str  # "clean" or "perturbed"
    groups: int
    total: int
    weights: list[Tensor]  # the shared w (clean: detached; perturbed: the live parameters)
    offsets: list[Tensor]  # (G, *w.shape): clean, zeros whose gradients are the per-micro-batch ones; perturbed, eps_j
    rows: bool = True  # convolutions and BatchNorm in their row forms where they apply (else the grouped forms)
    low_rank: frozenset[int] = frozenset()  # clean: Linear weight slots whose gradients may stay factored
    factors: dict[int, LowRank] = field(default_factory=dict)  # clean: the factored gradients, by slot
    stats: list[Tensor | None] = field(default_factory=list)  # clean: per tracked BatchNorm (2, G, C): _captured_stats
    fired: list[int] = field(default_factory=list)
    # the row-form convolutions' windows of inputs that need no gradient (the network's input): built by the clean
    # pass, read again by the perturbed pass of the same step if the input is the same tensor, unchanged
    windows: dict[nn.Module, tuple[Tensor, int, Tensor]] = field(default_factory=dict)
    tape: tapes.Tape | None = None  # the pass runs on a tape (:mod:`sharpscope.optim.tape`), not autograd's graph


def _apply(call: _Call, function: type[torch.autograd.Function], *args: Any) -> Tensor:
    """``function.apply(*args)``, or its forward recorded on the pass's tape."""
    return function.apply(*args) if call.tape is None else call.tape.apply(function, args)


def _needs_grad(call: _Call, x: Tensor) -> bool:
    """Whether the pass differentiates with respect to ``x`` (on a tape: whether a recorded step made it)."""
    return x.requires_grad if call.tape is None else call.tape.carries(x)


# ------------------------------------------------------------------------------------------------- layouts
def _side_by_side(t: Tensor, groups: int) -> Tensor:
    """``(G m, C, *sp)`` -> ``(m, G C, *sp)``: micro-batch ``j``'s channels at ``[j C, (j + 1) C)``."""
    m = t.shape[0] // groups
    return t.reshape(groups, m, *t.shape[1:]).transpose(0, 1).reshape(m, groups * t.shape[1], *t.shape[2:])


def _stacked_back(t: Tensor, groups: int, *, channels_last: bool = False) -> Tensor:
    """The inverse of :func:`_side_by_side`: ``(m, G C, *sp)`` -> ``(G m, C, *sp)``, in channels-last memory if
    asked (and ``sp`` is not empty): the layout the row-form BatchNorm reads in place."""
    m = t.shape[0]
    c = t.shape[1] // groups
    if channels_last and t.dim() > 2:
        last = t.reshape(m, groups, c, *t.shape[2:]).movedim(2, -1).transpose(0, 1)  # (G, m, *sp, C)
        return last.reshape(groups * m, *t.shape[2:], c).movedim(-1, 1)
    return t.reshape(m, groups, c, *t.shape[2:]).transpose(0, 1).reshape(groups * m, c, *t.shape[2:])


# --------------------------------------------------------------------------------- clean-pass kernels
class _SharedLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose backward gives the per-micro-batch weight gradients to ``offset_w``/``offset_b``.

    Forward: the layer's own kernel with the shared ``W`` (the offsets are zeros and not read). Backward:
    ``dL/dx = go W``; ``dL/dD_j = go_j^T x_j`` for micro-batch ``j``'s rows (all rows of a sequence input too), one
    ``torch.bmm``; ``dL/dd_j = sum of go_j``. No gradient for ``W``/``b`` (the clean pass wants the rows only).
    With a ``sink``, the weight gradients are handed to it as their factors instead
    (:class:`~sharpscope.optim.low_rank.LowRank` of the input and output-gradient rows) and ``offset_w`` gets none.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, offset_w, offset_b, groups, sink=None):
        # the (ctx, ...) form: no per-call argument binding (setup_context's costs ~0.2 ms, measured)
        ctx.groups = groups
        ctx.sink = sink
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, go):
        x, weight = ctx.saved_tensors
        groups = ctx.groups
        grad_x = go.matmul(weight) if ctx.needs_input_grad[0] else None
        gov = go.reshape(groups, -1, go.shape[-1])
        grad_w = grad_b = None
        if ctx.sink is not None:
            # detached: x carries the clean pass's graph, which eps and the perturbed pass must not extend
            ctx.sink(LowRank(x.detach().reshape(groups, -1, x.shape[-1]), gov))
        elif ctx.needs_input_grad[3]:
            grad_w = weight_gradient(x.reshape(groups, -1, x.shape[-1]), gov)
        if ctx.needs_input_grad[4]:
            grad_b = gov.sum(dim=1)
        return grad_x, None, None, grad_w, grad_b, None, None


class _SharedConv(torch.autograd.Function):
    """A convolution with the shared ``W`` whose backward gives per-micro-batch weight (and bias) gradients.

    Backward: ``dL/dx`` from ``convolution_backward`` as autograd would; the ``G`` weight gradients from one grouped
    ``convolution_backward`` of the ``(m, G C, ...)`` layout (input and output gradient side by side, ``G *
    groups`` groups), reshaped to ``(G, *W.shape)``; the bias gradients are the per-micro-batch sums of ``go``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, offset_w, offset_b, meta):
        ctx.meta = meta
        ctx.save_for_backward(x, weight)
        stride, padding, dilation, conv_groups, _ = meta
        return _CONV_FN[weight.dim() - 2](x, weight, bias, stride, padding, dilation, conv_groups)

    @staticmethod
    def backward(ctx, go):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, conv_groups, groups = ctx.meta
        dims = weight.dim() - 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                go, x, weight, None, stride, padding, dilation, False, [0] * dims, conv_groups,
                [True, False, False])[0]
        if ctx.needs_input_grad[3]:
            shape_only = weight.new_empty(groups * weight.shape[0], *weight.shape[1:])  # read for its shape only
            grad_w = torch.ops.aten.convolution_backward(
                _side_by_side(go, groups), _side_by_side(x, groups), shape_only, None, stride, padding, dilation,
                False, [0] * dims, conv_groups * groups, [False, True, False])[1]
            grad_w = grad_w.reshape(groups, *weight.shape)
        if ctx.needs_input_grad[4]:
            grad_b = go.reshape(groups, go.shape[0] // groups, go.shape[1], -1).sum(dim=(1, 3))
        return grad_x, None, None, grad_w, grad_b, None


class _PerturbedConv(torch.autograd.Function):
    """``G`` equal micro-batches through their own convolution weights ``W + E_j`` (constants ``(G, *W.shape)``).

    Forward: one grouped convolution of the ``(m, G C, ...)`` layout (the micro-batches side by side), stacked back
    to ``(G m, C_out, ...)``, in channels-last memory if ``meta`` asks (the row-form BatchNorm after it reads that
    in place). Backward: ``dL/dx`` from the grouped ``convolution_backward``; the live ``weight`` and ``bias``
    receive ``sum_j`` of the micro-batches' gradients, which is the ordinary weight gradient of the whole batch:
    one plain ``convolution_backward`` of ``x`` and ``go``. (Autograd through the grouped convolution would take
    the grouped kernel's per-micro-batch weight gradients and sum them: 2.3-2.5 against 1.3 ms for input and weight
    gradients of the digits ConvNet's second convolution at batch 128, 16 micro-batches, one thread.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weights, biases, meta):
        stride, padding, dilation, conv_groups, groups, channels_last = meta
        ctx.meta = meta
        side = _side_by_side(x, groups)
        flat = weights.reshape(-1, *weights.shape[2:])
        out = _CONV_FN[weight.dim() - 2](side, flat, None if biases is None else biases.reshape(-1), stride, padding,
                                         dilation, conv_groups * groups)
        ctx.save_for_backward(x, side, weight, flat)
        return _stacked_back(out, groups, channels_last=channels_last)

    @staticmethod
    def backward(ctx, go):
        x, side, weight, flat = ctx.saved_tensors
        stride, padding, dilation, conv_groups, groups, _ = ctx.meta
        dims = weight.dim() - 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_side = torch.ops.aten.convolution_backward(
                _side_by_side(go, groups), side, flat, None, stride, padding, dilation, False, [0] * dims,
                conv_groups * groups, [True, False, False])[0]
            grad_x = _stacked_back(grad_side, groups)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                go, x, weight, None, stride, padding, dilation, False, [0] * dims, conv_groups,
                [False, True, False])[1]
        if ctx.needs_input_grad[2]:
            grad_b = go.sum(dim=[0, *range(2, go.dim())])
        return grad_x, grad_w, grad_b, None, None, None


# ------------------------------------------------------------------------------------------ the row forms
#: The row form of a convolution holds its windows, ``(N L, K C)`` elements, for the backward; above this many
#: (64 MB in float32) the layer takes the grouped form instead.
ROWS_MAX_ELEMENTS = 1 << 24
#: A convolution whose input needs a gradient takes the row form only up to this many window elements (``N L K C``):
#: there the step is dispatch-bound and the row form's matmuls beat the grouped kernels; above it the windows'
#: copies and their gradient's scatter (col2im) cost more than oneDNN's grouped convolutions save. Whole m-SAM
#: steps, row form / grouped form, interleaved, one thread (digits ConvNet's second convolution: 4,608 elements per
#: sample): 0.95 at batch 16 (m = 4), 0.97-0.99 at 32, 1.07 at 64, 1.14 at 128; Fashion-MNIST ConvNet at 128 1.25,
#: ResNet-20 at 64 2.07.
ROWS_WITH_INPUT_GRADIENT_MAX_ELEMENTS = 1 << 17


def _windows(x: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int], out_sp: Sequence[int]) -> Tensor:
    """A convolution's input windows as rows (im2col): ``x (N, C, *sp)`` -> ``(N L, K C)``, no gradient.

    Row ``n L + l`` holds the ``K = prod(kernel)`` taps of sample ``n`` at output position ``l`` (row-major), each
    tap's ``C`` channels together (the column order of ``W.movedim(1, -1).reshape(C_out, K C)``), zeros where a tap
    falls in the padding: one strided copy of ``x``, channels last and padded.
    """
    n, c, *sp = x.shape
    if any(padding):  # F.pad's order: the last dimension first (the channels: none)
        padded = F.pad(x.movedim(1, -1), [0, 0, *[q for p in reversed(padding) for q in (p, p)]])
    else:
        padded = x.movedim(1, -1).contiguous()
    if c == 1 and n * math.prod(out_sp) * math.prod(kernel) > 1 << 15:
        # the K shifted views stacked: 2-4x faster than the strided copy's one-element runs (3.6x at 128 x 28 x 28,
        # 1.9x at 128 x 8 x 8); on fewer elements their K slices cost more (54 against 34 us at 16 x 8 x 8)
        taps = [padded[(slice(None), *[slice(o * d, o * d + st * (s - 1) + 1, st)
                                       for o, d, st, s in zip(offset, dilation, stride, out_sp)])]
                for offset in itertools.product(*[range(k) for k in kernel])]
        return torch.stack(taps, dim=-2).reshape(n * math.prod(out_sp), math.prod(kernel))
    st = padded.stride()
    dims = len(sp)
    windows = padded.as_strided(
        (n, *out_sp, *kernel, c),
        (st[0], *[st[1 + i] * stride[i] for i in range(dims)], *[st[1 + i] * dilation[i] for i in range(dims)], 1))
    return windows.reshape(n * math.prod(out_sp), math.prod(kernel) * c)


def _col2im(grad: Tensor, x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int], out_sp: Sequence[int]) -> Tensor:
    """The adjoint of :func:`_windows` (col2im): ``grad (N L, K C)`` added back at the padded input position each tap
    read, one ``index_add_`` (:func:`_col2im_index`); returns ``(N, C, *sp)``, a channels-last view of the padded
    buffer's interior. (Nine strided ``add_`` of the taps took 75 against 32 us at 16 x 32 x 4 x 4, 3 x 3 taps;
    ``F.fold`` 150 us, one thread.)"""
    n, c, *sp = x_shape
    padded_sp = tuple(s + 2 * p for s, p in zip(sp, padding))
    index = _col2im_index(n, padded_sp, tuple(kernel), tuple(stride), tuple(dilation), tuple(out_sp), grad.device)
    padded = grad.new_zeros(n * math.prod(padded_sp), c).index_add_(0, index, grad.reshape(-1, c))
    inner = padded.reshape(n, *padded_sp, c)[(slice(None), *[slice(p, p + s) for s, p in zip(sp, padding)])]
    return inner.movedim(-1, 1)


def _weight_rows(weight: Tensor, kernel_dims: int) -> Tensor:
    """A convolution weight ``(..., C_out, C_in, *kernel)`` (or a ``(G, ...)`` stack of them) in the windows' column
    order, ``(..., C_out, K C)`` (tap-major, each tap's channels together); the inverse of :func:`_rows_weight`."""
    channels = weight.dim() - kernel_dims - 1
    return weight.movedim(channels, -1).reshape(*weight.shape[:channels], -1)


def _rows_weight(rows: Tensor, weight_shape: Sequence[int]) -> Tensor:
    """A weight (or a ``(G, ...)`` stack of them) in the windows' column order, ``(..., C_out, K C)``, back in the
    convolution's layout ``(..., C_out, C_in, *kernel)`` (a permuted view)."""
    c_out, c_in, *kernel = weight_shape
    return rows.reshape(*rows.shape[:-2], c_out, *kernel, c_in).movedim(-1, rows.dim() - 1)


class _SharedConvRows(torch.autograd.Function):
    """Clean pass of a row-form convolution: ``windows (N L, K C)`` times the shared weight's rows, ``(N L, C_out)``.

    Backward: ``dL/dx`` from torch's ``convolution_backward`` (oneDNN: 120 against 100 + 30-90 us for the windows'
    matmul and col2im at 16 x 32 x 4 x 4, 3 x 3 taps, 64 outputs); the per-micro-batch weight gradients
    ``go_j^T windows_j`` as one batched matmul, in the convolution's layout; the bias gradients, the per-micro-batch
    sums of ``go``. No gradient for the shared ``weight``/``bias`` themselves (the offsets receive them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, offset_w, offset_b, windows, meta):
        ctx.meta = meta
        rows = _weight_rows(weight, weight.dim() - 2)
        ctx.save_for_backward(x, rows, windows)
        ctx.weight_shape = weight.shape
        return _as_map(F.linear(windows, rows, bias), x.shape[0], meta[4])

    @staticmethod
    def backward(ctx, go):
        x, rows, windows = ctx.saved_tensors
        _, stride, padding, dilation, out_sp, groups = ctx.meta
        grad_x = grad_w = grad_b = None
        gov = _map_rows(go).reshape(groups, -1, go.shape[1])
        if ctx.needs_input_grad[0]:
            # the weight as its rows' channels-last view (the layout of go and x): oneDNN reorders less
            weight = _rows_weight(rows, ctx.weight_shape)
            grad_x = torch.ops.aten.convolution_backward(
                go, x, weight, None, stride, padding, dilation, False, [0] * len(out_sp), 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[3]:
            per_micro_batch = weight_gradient(windows.reshape(groups, -1, windows.shape[-1]), gov)
            grad_w = _rows_weight(per_micro_batch, ctx.weight_shape)
        if ctx.needs_input_grad[4]:
            grad_b = gov.sum(dim=1)
        return grad_x, None, None, grad_w, grad_b, None, None


class _PerturbedConvRows(torch.autograd.Function):
    """Perturbed pass of a row-form convolution: micro-batch ``j``'s windows times the rows of ``W + E_j``
    (``weights (G, C_out, K C)``, constants; ``biases (G, C_out)`` or None), ``(N L, C_out)``, one batched matmul.

    Backward: ``dL/dx`` by the batched matmul with ``W + E_j`` and col2im (:func:`_col2im`); the live ``weight``
    and ``bias`` receive ``sum_j`` of the micro-batches' gradients, the ordinary ``go^T windows`` over all rows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weights, biases, windows, meta):
        ctx.meta = meta
        ctx.shapes = (x.shape, weight.shape)
        ctx.save_for_backward(weights, windows)
        return _as_map(_through_own_weights(windows, weights, biases), x.shape[0], meta[4])

    @staticmethod
    def backward(ctx, go):
        weights, windows = ctx.saved_tensors
        kernel, stride, padding, dilation, out_sp, groups = ctx.meta
        x_shape, weight_shape = ctx.shapes
        go = _map_rows(go)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.bmm(go.reshape(groups, -1, go.shape[-1]), weights)
            grad_x = _col2im(grad_rows, x_shape, kernel, stride, padding, dilation, out_sp)
        if ctx.needs_input_grad[1]:
            grad_w = _rows_weight(weight_gradient(windows[None], go[None])[0], weight_shape)
        if ctx.needs_input_grad[2]:
            grad_b = go.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None, None


def _as_map(rows: Tensor, n: int, out_sp: Sequence[int]) -> Tensor:
    """A row-form convolution's output rows ``(N L, C_out)`` as the layer's output ``(N, C_out, *sp)``: a
    channels-last view."""
    return rows.reshape(n, *out_sp, rows.shape[-1]).movedim(-1, 1)


def _map_rows(t: Tensor) -> Tensor:
    """The inverse of :func:`_as_map`: ``(N, C, *sp)`` -> ``(N L, C)`` rows (a view of a channels-last tensor)."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


@functools.lru_cache(maxsize=32)
def _col2im_index(n: int, padded_sp: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                  dilation: tuple[int, ...], out_sp: tuple[int, ...], device: torch.device) -> Tensor:
    """For the windows' rows in :func:`_windows`'s order (sample, output position, tap), the flat index of the input
    position each tap read in the padded ``(n, *padded_sp)`` grid (cached per shape: the same every step)."""
    dims = len(kernel)
    flat_strides = [math.prod(padded_sp[i + 1:]) for i in range(dims)]
    index = torch.zeros((), dtype=torch.int64)
    for i in range(dims):  # broadcast over (*out_sp, *kernel)
        at = torch.arange(out_sp[i]) * stride[i]
        tap = torch.arange(kernel[i]) * dilation[i]
        shape_at = [1] * (2 * dims)
        shape_at[i] = out_sp[i]
        shape_tap = [1] * (2 * dims)
        shape_tap[dims + i] = kernel[i]
        index = index + (at.reshape(shape_at) + tap.reshape(shape_tap)) * flat_strides[i]
    samples = torch.arange(n) * math.prod(padded_sp)
    return (samples[:, None] + index.reshape(1, -1)).reshape(-1).to(device)


def _through_own_weights(x: Tensor, weights: Tensor, biases: Tensor | None) -> Tensor:
    """Rows ``x (G R, ..., in)`` of ``G`` equal micro-batches times their own ``weights (G, out, in)`` (plus
    ``biases (G, out)``), one batched matmul: ``(G R, ..., out)``."""
    groups = weights.shape[0]
    rows = x.reshape(groups, -1, x.shape[-1])
    out = (torch.bmm(rows, weights.transpose(1, 2)) if biases is None
           else torch.baddbmm(biases[:, None, :], rows, weights.transpose(1, 2)))
    return out.reshape(*x.shape[:-1], weights.shape[1])


class _PerturbedLinear(torch.autograd.Function):
    """Rows of ``G`` equal micro-batches through their own weights: ``x_j (W + E_j)^T + (b + e_j)``.

    ``weights (G, out, in)`` and ``biases (G, out)`` are the constants ``W + E_j``, ``b + e_j``; the live ``weight``
    and ``bias`` receive ``sum_j`` of the micro-batches' gradients, which is the ordinary ``go^T x`` over all rows
    (one matmul, no per-micro-batch copy). Forward and ``dL/dx``: one batched matmul each.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weights, biases, groups):
        ctx.groups = groups
        ctx.save_for_backward(x, weights)
        return _through_own_weights(x, weights, biases)

    @staticmethod
    def backward(ctx, go):
        x, weights = ctx.saved_tensors
        rows = go.reshape(-1, go.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(go.reshape(ctx.groups, -1, go.shape[-1]), weights).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(x.reshape(1, -1, x.shape[-1]), rows[None])[0]
        if ctx.needs_input_grad[2]:
            grad_b = rows.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None


class _BatchNormAcross(torch.autograd.Function):
    """Training-mode BatchNorm of ``G`` micro-batches of a channels-last ``(N, C, *sp)`` or an ``(N, C)`` input ``x``
    (``groups`` = ``G``): micro-batch ``j``'s rows of ``(G, R, C)`` normalised over its own ``R`` rows with its own
    affine weight ``w + dw_j`` and bias ``b + db_j``: torch's kernels (``native_batch_norm`` and its
    backward) on the rows transposed to ``(R, G C)``, one copy each way. ``weight``/``bias`` ``(C,)`` are the
    shared tensors (or None), ``offsets`` ``(G, C)`` their per-micro-batch offsets (or None: the shared tensor for
    every micro-batch); the shared tensors receive ``sum_j`` of the micro-batches' gradients, the offsets each
    their own (the clean pass's zero offsets: the per-micro-batch gradients). ``mean``/``var`` (``(G C,)`` or None)
    are scratch running buffers that momentum 1 fills with the micro-batch means and unbiased variances. One
    autograd node instead of the ~10 views and copies around ``F.batch_norm`` and the affine sums' own nodes."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_offsets, bias_offsets, mean, var, eps, groups):
        last = _channels_last(x)
        c = x.shape[1]
        count = x.numel() // (groups * c)
        across = last.reshape(groups, count, c).transpose(0, 1).reshape(count, groups * c)
        flat_w, flat_b = (None if t is None else (shifted(t, offsets) if offsets is not None
                                                  else t.expand(groups, c)).reshape(-1)
                          for t, offsets in ((weight, weight_offsets), (bias, bias_offsets)))
        out, save_mean, save_invstd = torch.native_batch_norm(across, flat_w, flat_b, mean, var, True, 1.0, eps)
        ctx.eps = eps
        ctx.save_for_backward(across, flat_w, save_mean, save_invstd)
        return _from_rows(out.reshape(count, groups, c).transpose(0, 1).contiguous(), last.shape)

    @staticmethod
    def backward(ctx, dy):
        across, flat_w, save_mean, save_invstd = ctx.saved_tensors
        count, wide = across.shape
        c = dy.shape[1]
        groups = wide // c
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1] or needs[3], needs[2] or needs[4]]
        last = _channels_last(dy)
        grad_in, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            last.reshape(groups, count, c).transpose(0, 1).reshape(count, wide), across, flat_w, None, None,
            save_mean, save_invstd, True, ctx.eps, mask)
        grad_x = None if grad_in is None else _from_rows(
            grad_in.reshape(count, groups, c).transpose(0, 1).contiguous(), last.shape)
        grad_w = None if grad_w is None else grad_w.reshape(groups, c)
        grad_b = None if grad_b is None else grad_b.reshape(groups, c)
        return (grad_x, grad_w.sum(0) if needs[1] else None, grad_b.sum(0) if needs[2] else None,
                grad_w if needs[3] else None, grad_b if needs[4] else None, None, None, None, None)


def _channels_last(x: Tensor) -> Tensor:
    """``(N, C, *sp)`` -> ``(N, *sp, C)`` (a view; ``(N, C)`` as it is)."""
    return x if x.dim() == 2 else x.movedim(1, -1)


def _from_rows(rows: Tensor, last_shape: Sequence[int]) -> Tensor:
    """Rows ``(G, R, C)`` of a ``(N, *sp, C)`` layout back as ``(N, C, *sp)`` (a channels-last view)."""
    out = rows.reshape(last_shape)
    return out if out.dim() == 2 else out.movedim(-1, 1)


# ------------------------------------------------------------------------------------------- the layers
def _tensors(layer: _Layer, call: _Call, local: str) -> tuple[Tensor | None, Tensor | None]:
    """(shared or stacked tensor, clean-pass offset) for the layer's ``local`` tensor; frozen ones come as is."""
    slot = layer.slots.get(local)
    if slot is None:
        t = getattr(layer.module, local, None)
        return (None if t is None else t.detach()), None
    return call.weights[slot], call.offsets[slot]


def _run_linear(layer: _Layer, call: _Call, x: Tensor) -> Tensor:
    """Linear. Clean: the layer's kernel, per-micro-batch weight gradients (:class:`_SharedLinear`), kept as their
    factors where the step allows it and few rows make them small (:mod:`sharpscope.optim.low_rank`). Perturbed:
    ``x_j (W + E_j)^T + b + e_j`` as one batched matmul (:class:`_PerturbedLinear`), or with factored ``E_j``
    :class:`~sharpscope.optim.low_rank.PerturbedLinear`; ``W`` gets the summed gradient of all rows."""
    weight, w_off = _tensors(layer, call, "weight")
    bias, b_off = _tensors(layer, call, "bias")
    G = call.groups
    if w_off is None and b_off is None:
        return F.linear(x, weight, bias)
    if call.mode == "clean":
        slot = layer.slots.get("weight")
        if slot in call.low_rank and worth_it(x.numel() // (x.shape[-1] * G), x.shape[-1], weight.shape[0]):
            sink = lambda factors: call.factors.__setitem__(slot, factors)
            # w_off, though its gradient goes to the sink: it keeps the node in the graph
            return _apply(call, _SharedLinear, x, weight, bias, w_off, b_off, G, sink)
        return _apply(call, _SharedLinear, x, weight, bias, w_off, b_off, G)
    if isinstance(w_off, LowRank):
        with torch.no_grad():
            biases = None if b_off is None else shifted(bias, b_off)
        return _apply(call, PerturbedLinear, x, weight, bias, biases, w_off.inputs, w_off.grads)
    weights, biases = _perturbed_constants(weight, bias, w_off, b_off, G)
    return _apply(call, _PerturbedLinear, x, weight, bias, weights, biases, G)


@torch.no_grad()
def _perturbed_constants(weight: Tensor, bias: Tensor | None, w_off: Tensor | Scaled | None,
                         b_off: Tensor | Scaled | None, groups: int, weights_out: Tensor | None = None
                         ) -> tuple[Tensor, Tensor | None]:
    """The constants ``W + E_j`` ``(G, *W.shape)`` (into ``weights_out`` if given) and ``b + e_j`` ``(G, out)`` of a
    perturbed layer (a frozen tensor, without ``eps``: itself for every micro-batch, expanded)."""
    weights = shifted(weight, w_off, out=weights_out) if w_off is not None else weight.expand(groups, *weight.shape)
    biases = None if bias is None else shifted(bias, b_off) if b_off is not None else bias.expand(groups, *bias.shape)
    return weights, biases


def _run_conv(layer: _Layer, call: _Call, x: Tensor) -> Tensor:
    """Convolution: the row form (:func:`_conv_rows`) where it applies, else the grouped form. Grouped form, clean:
    the layer's kernel, per-micro-batch weight gradients (:class:`_SharedConv`); perturbed: one grouped
    convolution of the ``(m, G C, ...)`` layout with the weights ``W + E_j`` side by side, stacked back
    channels-last under the row forms (the BatchNorm after it then reads it in place), whose backward gives the live
    ``W`` the ordinary weight gradient of the whole batch (:class:`_PerturbedConv`)."""
    module = layer.module
    weight, w_off = _tensors(layer, call, "weight")
    bias, b_off = _tensors(layer, call, "bias")
    G = call.groups
    conv = _CONV_FN[weight.dim() - 2]
    if w_off is None and b_off is None:
        return conv(x, weight, bias, module.stride, layer.padding, module.dilation, module.groups)
    rows = _conv_rows(layer, call, x, weight, bias, w_off, b_off)
    if rows is not None:
        return rows
    if call.mode == "clean":
        meta = (module.stride, layer.padding, module.dilation, module.groups, G)
        return _apply(call, _SharedConv, x, weight, bias, w_off, b_off, meta)
    weights, biases = _perturbed_constants(weight, bias, w_off, b_off, G)
    meta = (module.stride, layer.padding, module.dilation, module.groups, G, call.rows)
    return _apply(call, _PerturbedConv, x, weight, bias, weights, biases, meta)


def _conv_rows(layer: _Layer, call: _Call, x: Tensor, weight: Tensor, bias: Tensor | None, w_off: Tensor | None,
               b_off: Tensor | None) -> Tensor | None:
    """The convolution as a Linear layer on its input's windows (:func:`_windows`), or None where this form does not
    apply: for convolutions without groups whose windows fit in :data:`ROWS_MAX_ELEMENTS` where the input needs no
    gradient (the layers on the network's input), in :data:`ROWS_WITH_INPUT_GRADIENT_MAX_ELEMENTS` where it does
    (:class:`_SharedConvRows` and :class:`_PerturbedConvRows` then give ``dL/dx`` too).

    Clean: :class:`_SharedConvRows` (the per-micro-batch weight gradients as one batched matmul of the windows and
    the output gradient); perturbed: :class:`_PerturbedConvRows`. The output is ``(N, C_out, *sp)`` in channels-last
    memory (a view of the rows), so the BatchNorm after it reads it in place (:func:`_batch_norm_rows`), and
    pooling and activations run torch's channels-last kernels. The windows of an input that needs no gradient are
    built once per step (the clean pass keeps them for the perturbed pass, :attr:`_Call.windows`).

    Measured (``benchmarks/bench_sam_step.py``, interleaved A/B of the whole m-SAM step, one thread): with the
    first convolution in this form the step took 0.96x (digits ConvNet, batch 16), 0.90x (digits, 128), 0.78x
    (Fashion-MNIST ConvNet, 128, m = 32) and 0.97x (ResNet-20 on 32x32, 64, m = 16) of the grouped forms' time.
    Where the input needs a gradient the windows' matmul pays for the taps in the padding and a scatter of the
    windows' gradient, which oneDNN's kernels avoid: only small layers gain (see
    :data:`ROWS_WITH_INPUT_GRADIENT_MAX_ELEMENTS`).
    """
    module = layer.module
    if not call.rows or module.groups != 1:
        return None
    kernel = tuple(weight.shape[2:])
    out_sp = [(s + 2 * p - d * (k - 1) - 1) // st + 1
              for s, k, st, p, d in zip(x.shape[2:], kernel, module.stride, layer.padding, module.dilation)]
    elements = x.shape[0] * math.prod(out_sp) * math.prod(kernel) * x.shape[1]
    needs_grad = _needs_grad(call, x)
    if elements > (ROWS_WITH_INPUT_GRADIENT_MAX_ELEMENTS if needs_grad else ROWS_MAX_ELEMENTS):
        return None
    G, c_out = call.groups, weight.shape[0]
    cached = call.windows.get(module)
    if cached is not None and cached[0] is x and cached[1] == x._version:
        windows = cached[2]
    else:
        windows = _windows(x.detach(), kernel, module.stride, layer.padding, module.dilation, out_sp)
        if not needs_grad:  # the network's input: the same in the perturbed pass
            call.windows[module] = (x, x._version, windows)
    meta = (kernel, module.stride, layer.padding, module.dilation, out_sp, G)
    if call.mode == "clean":
        out = _apply(call, _SharedConvRows, x, weight, bias, w_off, b_off, windows, meta)
    else:
        if w_off is None:  # frozen weight: its rows, the same for every micro-batch
            weights, biases = _perturbed_constants(_weight_rows(weight.detach(), len(kernel)), bias, None, b_off, G)
        else:  # W + E_j summed in the windows' column order (the stacks' own) and written there: W is not copied
            taps_last = lambda t: t.movedim(-len(kernel) - 1, -1)  # (..., C_out, *kernel, C_in), a view
            stack = torch.empty(G, c_out, *kernel, weight.shape[1], dtype=weight.dtype, device=weight.device)
            _, biases = _perturbed_constants(
                taps_last(weight.detach()), bias,
                w_off.rearranged(taps_last) if isinstance(w_off, Scaled) else taps_last(w_off), b_off, G,
                weights_out=stack)
            weights = stack.view(G, c_out, -1)
        out = _apply(call, _PerturbedConvRows, x, weight, bias, weights, biases, windows, meta)
    return out


def _affine(layer: _Layer, call: _Call) -> tuple[Tensor | None, Tensor | None]:
    """The normalisation's affine weight and bias as ``(G, ...)`` stacks, one row per micro-batch (or None):
    ``w + offset`` (clean: a zero offset that carries the per-micro-batch gradient; perturbed: ``eps_j``)."""
    out = []
    for local in ("weight", "bias"):
        t, offset = _tensors(layer, call, local)
        if t is None:
            out.append(None)
        elif offset is not None:
            out.append(shifted(t, offset))
        else:
            out.append(t.expand(call.groups, *t.shape))  # frozen
    return out[0], out[1]


def _run_batch_norm(layer: _Layer, call: _Call, x: Tensor) -> Tensor:
    """BatchNorm with each micro-batch's own statistics (training mode) or the running ones (eval mode).

    Channels-last and ``(N, C)`` inputs take the row form (:func:`_batch_norm_rows`). Otherwise (the side-by-side
    form) ``F.batch_norm`` runs on the ``(m, G C, ...)`` layout with the affine weights of every micro-batch side by
    side. A layer that updates running statistics gets them captured instead: ``F.batch_norm`` with scratch
    buffers and momentum 1 writes exactly the micro-batch mean and unbiased variance it normalised with.
    """
    module = layer.module
    G = call.groups
    batch_stats = module.training or module.running_mean is None
    rows = _batch_norm_rows(layer, call, x, batch_stats)
    if rows is not None:
        return rows
    weight, bias = _affine(layer, call)
    weight = None if weight is None else weight.reshape(-1)
    bias = None if bias is None else bias.reshape(-1)
    if x.dim() == 2:  # BatchNorm1d on (N, C): the layout needs a trailing dimension
        x_side = _side_by_side(x[:, :, None], G)
    else:
        x_side = _side_by_side(x, G)
    if batch_stats:
        running_mean, running_var = _captured_stats(layer, call, x)
        out = F.batch_norm(x_side, running_mean, running_var, weight, bias, True, 1.0, module.eps)
    else:
        out = F.batch_norm(x_side, module.running_mean.repeat(G), module.running_var.repeat(G), weight, bias,
                           False, 0.0, module.eps)
    out = _stacked_back(out, G)
    return out[:, :, 0] if x.dim() == 2 else out


def _captured_stats(layer: _Layer, call: _Call, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The scratch running buffers ``(G C,)`` that capture a BatchNorm's micro-batch means and unbiased variances
    (momentum 1 overwrites them: ``1 s + 0 r``, exact), already recorded as ``call.stats``, ``(2, G, C)``; (None,
    None) for a layer that tracks no statistics and in the perturbed pass (the running statistics come from the
    clean pass only). One zero-filled allocation for both."""
    if layer.stats_slot is None or call.mode != "clean":
        return None, None
    scratch = torch.zeros(2, call.groups * x.shape[1], dtype=x.dtype, device=x.device)
    call.stats[layer.stats_slot] = scratch.view(2, call.groups, -1)
    return scratch.unbind()


def _batch_norm_rows(layer: _Layer, call: _Call, x: Tensor, batch_stats: bool) -> Tensor | None:
    """BatchNorm on the rows ``(G, R, C)`` of a channels-last input (a row-form convolution's output) or of an
    ``(N, C)`` input; None where the input is laid out otherwise (the side-by-side form then runs).

    Training mode: torch's kernel on the rows transposed to ``(R, G C)``, micro-batch ``j``'s channels at
    ``[j C, (j + 1) C)`` with their own affine weights, and back (two copies); the micro-batch statistics are
    captured as in the side-by-side form (scratch buffers, momentum 1). Measured against the closed form on the
    ``(G, R, C)`` layout (mean over the middle dimension, ~10 elementwise kernels, forward and backward), one
    thread: 147 against 186 us at (4, 256, 32), 718 against 1,729 us at (16, 512, 32). Eval mode: the running
    statistics' affine map, in place."""
    if not call.rows:
        return None
    G, c = call.groups, x.shape[1]
    last = _channels_last(x)
    if not last.is_contiguous():
        return None
    module = layer.module
    if batch_stats:
        if x.numel() == G * c:
            return None  # one value per channel: torch's own error, from the side-by-side form
        mean, var = _captured_stats(layer, call, x)
        (weight, weight_offsets), (bias, bias_offsets) = _tensors(layer, call, "weight"), _tensors(layer, call, "bias")
        return _apply(call, _BatchNormAcross, x, weight, bias, weight_offsets, bias_offsets, mean, var, module.eps, G)
    weight, bias = _affine(layer, call)
    scale = torch.rsqrt(module.running_var + module.eps).expand(G, c)
    if weight is not None:
        scale = scale * weight
    shift = -module.running_mean * scale
    if bias is not None:
        shift = shift + bias
    return _from_rows(torch.addcmul(shift[:, None], last.reshape(G, -1, c), scale[:, None]), last.shape)


def _run_per_sample_norm(layer: _Layer, call: _Call, x: Tensor) -> Tensor:
    """LayerNorm / GroupNorm: normalise as the layer does (per sample), then each micro-batch's affine map."""
    module = layer.module
    G = call.groups
    weight, bias = _affine(layer, call)
    if isinstance(module, nn.LayerNorm):
        normed = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        view = normed.reshape(G, -1, *module.normalized_shape)  # (G, rows, *normalized_shape)
        expand = lambda t: t[:, None]
    else:
        normed = F.group_norm(x, module.num_groups, None, None, module.eps)
        view = normed.reshape(G, x.shape[0] // G, *x.shape[1:])  # (G, m, C, *sp)
        expand = lambda t: t.reshape(G, 1, t.shape[1], *([1] * (x.dim() - 2)))
    if weight is not None:
        view = view * expand(weight)
    if bias is not None:
        view = view + expand(bias)
    return view.reshape(x.shape)


# --------------------------------------------------------------------------------------- the passes
class StructuredPasses:
    """The clean and perturbed m-SAM passes of one model through its own layers (see the module docstring).

    Build with :func:`structured_plan`. ``names`` are the trainable tensors' names in the order of the step's
    entries; ``tracked`` the BatchNorm layers whose running statistics the clean pass captures (in the order of
    ``model.modules()``, the order :func:`sharpscope.optim.step._commit_running_stats` gets them).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], layers: list[_Layer], tracked: list[nn.Module],
                 chain: list[Any] | None = None):
        # weakly: the plan is the value of a WeakKeyDictionary keyed by the model (_PLANS), which a strong reference
        # from the value would keep alive forever
        self._model = weakref.ref(model)
        self.names = list(names)
        self.layers = layers
        self.tracked = tracked
        self.checked = False
        self.rows = True  # the row forms of convolutions and BatchNorm; off if they fail the check (see check)
        # a chain model's passes on a tape (sharpscope.optim.tape): per module, its layer's index or its tape step
        self.chain = chain
        self.tape = chain is not None  # off if the tape fails the check or a pass (then autograd's graph)
        self._windows: dict[nn.Module, tuple[Tensor, int, Tensor]] = {}  # the last clean pass's (_Call.windows)
        self._offsets: dict[tuple, list[Tensor]] = {}  # see _zero_offsets
        # the layers' forwards in the passes (swapped in by _swapped, or called by _run_chain)
        self._forwards = [self._layer_forward(slot, layer) for slot, layer in enumerate(layers)]
        self._call: _Call | None = None  # the pass in progress
        self._one_call: tuple[Tensor, int, bool] | None = None  # the last clean pass's labels and one_call_loss
        # the Linear weights, whose clean gradients may stay factored (sharpscope.optim.low_rank)
        self.low_rank_slots = frozenset(layer.slots["weight"] for layer in layers
                                        if layer.base in _LINEAR and "weight" in layer.slots)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise Unsupported("the model of this plan no longer exists")
        return model

    @contextlib.contextmanager
    def _swapped(self, call: _Call) -> Iterator[None]:
        swapped = []
        self._call = call
        try:
            for layer, forward in zip(self.layers, self._forwards):
                attributes = vars(layer.module)  # set there directly: nn.Module.__setattr__ costs ~5 us a call
                if "forward" in attributes:
                    raise Unsupported(f"a {type(layer.module).__name__} has its forward replaced on the instance")
                attributes["forward"] = forward
                swapped.append(attributes)
            yield
        finally:
            self._call = None
            for attributes in swapped:
                del attributes["forward"]

    def _layer_forward(self, slot: int, layer: _Layer) -> Callable[..., Tensor]:
        """The forward the passes give ``layer`` (built once): it runs the layer for the pass in progress."""
        run = (_run_linear if layer.base in _LINEAR else _run_conv if layer.base in _CONV
               else _run_batch_norm if layer.base in _BATCH_NORM else _run_per_sample_norm)
        name = type(layer.module).__name__

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            call = self._call
            if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
                raise Unsupported(f"{name} called with other arguments than one tensor")
            x = args[0]
            if x.dim() < 2 or x.shape[0] != call.total:
                raise Unsupported(f"a {name} saw an input of shape {tuple(x.shape)}, not the batch of {call.total} "
                                  "samples on dim 0")
            call.fired[slot] += 1
            return run(layer, call, x)
        return forward

    def _forward(self, call: _Call, x: Tensor) -> Tensor:
        if self.tape:
            try:
                out = self._forward_on_tape(call, x)
            except tapes.NotOnTape as exc:
                _log.debug("m-SAM passes on autograd's graph from now on: %s", exc)
                self.tape = False
            else:
                return self._checked_output(call, out)
        self._start(call)
        with self._swapped(call):
            out = self.model(x)
        return self._checked_output(call, out)

    def _start(self, call: _Call) -> None:
        """A pass's counts of the layers' calls and its captured statistics, empty."""
        call.fired = [0] * len(self.layers)
        call.stats = [None] * len(self.tracked)

    def _checked_output(self, call: _Call, out: Any) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != call.total:
            raise Unsupported("the model does not return one tensor with the batch on dim 0")
        if any(count != 1 for count in call.fired):
            raise Unsupported("a layer holding trainable weights (or a BatchNorm) ran other than once per forward")
        return out

    def _forward_on_tape(self, call: _Call, x: Tensor) -> Tensor:
        """The pass as one :class:`~sharpscope.optim.tape.OnTape` node over the tensors it differentiates: the
        clean pass's zero offsets, the perturbed pass's live weights."""
        leaves = call.offsets if call.mode == "clean" else [w for w in call.weights if w.requires_grad]
        return tapes.OnTape.apply(functools.partial(self._run_chain, call), x, *leaves)

    def _run_chain(self, call: _Call, tape: tapes.Tape, x: Tensor) -> Tensor:
        self._start(call)
        call.tape = tape
        self._call = call
        try:
            for module, step in self.chain:  # type: ignore[union-attr]
                if isinstance(step, int):
                    out = self._forwards[step](x)
                    if tape.carries(x) and not tape.made(out, x):
                        raise tapes.NotOnTape(f"a {type(module).__name__} ran outside the tape")
                else:
                    out = step(tape, module, x)
                x = out
        finally:
            call.tape = None
            self._call = None
        return x

    def clean(self, weights: Sequence[Tensor], loss_fn: Callable, x: Tensor, y: Tensor, groups: int, *,
              scale: Tensor | None = None, low_rank: bool = False,
              ) -> tuple[list[Tensor | LowRank], Tensor, Tensor, list[Tensor]]:
        """Per-micro-batch clean gradients at the shared ``weights``.

        ``x (G m, ...)``, ``y (G m, ...)``. Returns ``(grads, losses, logits, stats)``: ``grads[i]`` is
        ``(G, *weights[i].shape)`` (of ``scale * L_j`` when a loss scale is given), ``losses`` the unscaled
        ``sum_j L_j`` (:func:`summed_losses`), ``logits`` the outputs for all samples (detached), ``stats`` per
        tracked BatchNorm the micro-batch means and unbiased variances, ``(2, G, C)``. With ``low_rank`` (and no
        ``scale``), the gradients of Linear weights come as their factors
        (:class:`~sharpscope.optim.low_rank.LowRank`) where few rows make them small.
        """
        shared = [w.detach() for w in weights]
        offsets = self._zero_offsets(shared, groups)
        call = _Call("clean", groups, x.shape[0], shared, offsets, self.rows,
                     low_rank=self.low_rank_slots if low_rank and scale is None else frozenset())
        with torch.enable_grad():
            logits = self._forward(call, x)
            self._one_call = (y, y._version, one_call_loss(loss_fn, y))  # the perturbed pass has the same labels
            losses = summed_losses(loss_fn, logits, y, groups, one_call=self._one_call[2])
            total = losses if scale is None else losses * scale
            grads = torch.autograd.grad(total, offsets, allow_unused=True)
        grads = [call.factors.get(i, g) for i, g in enumerate(grads)]  # a factored layer's offset got none
        grads = [torch.zeros(o.shape, dtype=o.dtype, device=o.device) if g is None else g
                 for o, g in zip(offsets, grads)]
        if any(s is None for s in call.stats):
            raise Unsupported("a BatchNorm that tracks running statistics did not run in the clean pass")
        self._windows = call.windows  # for the perturbed pass that follows
        return grads, losses.detach(), logits.detach(), call.stats  # type: ignore[return-value]

    def _zero_offsets(self, shared: list[Tensor], groups: int) -> list[Tensor]:
        """The clean pass's offsets: zeros ``(G, *w.shape)`` (stride 0: nothing to fill) whose gradients are the
        per-micro-batch ones. Leaves that are never written (``autograd.grad`` does not accumulate into ``.grad``),
        so they are kept for the next step of the same shapes."""
        key = (groups, *[(w.shape, w.dtype, w.device) for w in shared])
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = [torch.zeros((), dtype=w.dtype, device=w.device).expand(groups, *w.shape).requires_grad_()
                       for w in shared]
            self._offsets = {key: offsets}  # the last shapes only
        return offsets

    def perturbed(self, weights: Sequence[Tensor], eps: Sequence[Tensor | LowRank], loss_fn: Callable, x: Tensor,
                  y: Tensor, groups: int) -> Tensor:
        """``sum_j L_j(w + eps_j)`` (:func:`summed_losses`), ``eps[i]`` ``(G, *w_i.shape)`` (constants; a Linear
        weight's may be factored), with a graph to the live ``weights`` (the backward of ``c sum_j L_j`` adds
        ``c sum_j grad L_j(w + eps_j)`` to ``p.grad``)."""
        offsets = [e.detach() if isinstance(e, Tensor) and e.requires_grad else e for e in eps]
        call = _Call("perturbed", groups, x.shape[0], list(weights), offsets, self.rows,  # type: ignore[arg-type]
                     windows=self._windows)
        self._windows = {}  # read once
        logits = self._forward(call, x)
        known = self._one_call
        self._one_call = None  # read once
        one_call = known[2] if known is not None and known[0] is y and known[1] == y._version else None
        return summed_losses(loss_fn, logits, y, groups, one_call=one_call)

    def check(self, weights: Sequence[Tensor], loss_fn: Callable, x: Tensor, y: Tensor, m: int,
              make_eps: Callable[[list[Tensor]], list[Tensor]]) -> None:
        """Once per model: both passes on (up to) two micro-batches of ``x`` against each run alone.

        The reference evaluates each micro-batch by itself (``functional_call`` with ``w`` or ``w + eps_j``; its
        BatchNorm layers normalise with that micro-batch's statistics and write nothing): values and gradients must
        agree to ``sqrt(eps)`` of the dtype, relative. The row forms are tried first, on a tape where the model is
        a chain (:mod:`sharpscope.optim.tape`), then on autograd's graph; where they fail (an error or a
        difference: e.g. the model's own code calls ``.view`` on a row-form convolution's channels-last output),
        the grouped forms are checked instead, on autograd's graph, and only their failure raises Unsupported
        (nothing is written either way).
        """
        self.rows = True
        for tape in ([True, False] if self.chain is not None else [False]):
            try:
                self.tape = self._check_in_float64(loss_fn, x, y, m, make_eps, tape=tape)
                break
            except Exception as exc:  # noqa: BLE001 - any failure of the row forms (or of the copy) means: not here
                _log.debug("m-SAM row forms unavailable (tape %s: %s)", tape, exc)
        else:
            self.rows = self.tape = False
            self._check(weights, loss_fn, x, y, m, make_eps)
        self.checked = True

    def _check_in_float64(self, loss_fn: Callable, x: Tensor, y: Tensor, m: int,
                          make_eps: Callable[[list[Tensor]], list[Tensor]], *, tape: bool = False) -> bool:
        """The check of the row forms, on a float64 copy of the model.

        Their windows and matmuls round differently from the layers' own kernels, and a float32 network can
        amplify that: on ResNet-20 at initialisation the float32 loop itself is 4e-3 (relative) away from the
        float64 value of some BatchNorm weights' perturbed gradients, as are the row forms, while the grouped
        forms, which run the same kernels as the loop, agree with it to 2e-6. In float64 the rounding is ~1e-16,
        so any difference in structure (a mixed sample, a tied weight) still shows at ``sqrt(eps)``.
        """
        twin = copy.deepcopy(self.model).double()
        plan = _build(twin, self.names)
        plan.rows = True
        plan.tape = tape and plan.chain is not None
        params = dict(twin.named_parameters())
        as64 = lambda t: t.double() if t.is_floating_point() else t
        loss64 = copy.deepcopy(loss_fn).double() if isinstance(loss_fn, nn.Module) else loss_fn  # e.g. class weights
        plan._check([params[name] for name in self.names], loss64, as64(x), as64(y), m, make_eps)
        return plan.tape  # off where a pass found a module the tape cannot run

    def _check(self, weights: Sequence[Tensor], loss_fn: Callable, x: Tensor, y: Tensor, m: int,
               make_eps: Callable[[list[Tensor]], list[Tensor]]) -> None:
        groups = min(2, x.shape[0] // m)
        x, y = x[: groups * m], y[: groups * m]
        grads, loss, _, _ = self.clean(weights, loss_fn, x, y, groups, low_rank=True)
        eps = make_eps(grads)
        perturbed_loss = self.perturbed(weights, eps, loss_fn, x, y, groups)
        grads = [g.dense() if isinstance(g, LowRank) else g for g in grads]
        eps = [e.dense() if isinstance(e, (LowRank, Scaled)) else e for e in eps]
        sam_grads = torch.autograd.grad(perturbed_loss, list(weights), allow_unused=True)
        tol = math.sqrt(torch.finfo(weights[0].dtype).eps)
        names = self.names
        ref_sam = [torch.zeros_like(w) for w in weights]
        ref_loss, ref_perturbed_loss = [], []
        with frozen_bn_stats(self.model):  # the reference writes no running statistics either
            for j in range(groups):
                xj, yj = x[j * m: (j + 1) * m], y[j * m: (j + 1) * m]
                for state, values, grad in (
                    ({n: w for n, w in zip(names, weights)}, ref_loss, [g[j] for g in grads]),
                    ({n: w + e[j] for n, w, e in zip(names, weights, eps)}, ref_perturbed_loss, None),
                ):
                    with torch.enable_grad():
                        ref_value = loss_fn(functional_call(self.model, state, (xj,)), yj)
                        ref_grad = torch.autograd.grad(ref_value, list(weights), allow_unused=True)
                    values.append(ref_value.detach())
                    if grad is not None:
                        joint = _joint_norm(ref_grad)
                        for name, a, b in zip(names, grad, ref_grad):
                            _agree(a, b, tol, f"clean gradient of {name}", joint)
                    else:
                        for total, b in zip(ref_sam, ref_grad):
                            if b is not None:
                                total.add_(b)
        _agree(loss, sum(ref_loss), tol, "loss")
        _agree(perturbed_loss, sum(ref_perturbed_loss), tol, "perturbed loss")
        joint = _joint_norm(ref_sam)
        for name, a, b in zip(names, sam_grads, ref_sam):
            _agree(torch.zeros_like(b) if a is None else a, b, tol, f"perturbed gradient of {name}", joint)


def _joint_norm(tensors: Sequence[Tensor | None]) -> float:
    return math.sqrt(sum(float(t.detach().norm()) ** 2 for t in tensors if t is not None))


def _agree(a: Tensor, b: Tensor | None, tol: float, what: str, joint: float = 0.0) -> None:
    """``a`` equals ``b`` to ``tol`` relative to ``b``'s norm, or to the ``joint`` norm of all the gradients compared
    with it where that is larger: a gradient that is zero but for rounding (a bias before a BatchNorm: 2e-15 in
    float64 on a gradient of norm 1e-14) carries the rounding of the terms it sums, not of its own size, and a
    difference below ``tol`` of the whole gradient is none the step could show. A layer that mixes samples or a tied
    weight changes its gradients by their own size."""
    b = torch.zeros_like(a) if b is None else b
    diff = float((a.detach() - b.detach()).norm())
    scale = float(b.detach().norm())
    if not diff <= tol * (max(scale, joint) + tol):
        raise Unsupported(f"the check against the micro-batches run alone failed: {what} differs by {diff:.3g} "
                          f"(norm {scale:.3g})")


def summed_losses(loss_fn: Callable, logits: Tensor, y: Tensor, groups: int, *, one_call: bool | None = None
                  ) -> Tensor:
    """``sum_j L_j`` over the ``G`` equal micro-batches of ``logits (G m, ...)`` (:func:`chunk_losses`), a scalar.

    Where :func:`one_call_loss` holds (``one_call``: its answer if already known for these labels), one
    ``reduction='sum'`` cross-entropy over all samples divided by ``m`` (every micro-batch averages over its ``m``
    samples): two kernels and one backward node instead of ~10."""
    if one_call is None:
        one_call = one_call_loss(loss_fn, y)
    if one_call:
        return F.cross_entropy(logits, y, reduction="sum", label_smoothing=loss_fn.label_smoothing) / (
            logits.shape[0] // groups)
    return chunk_losses(loss_fn, logits, y, groups).sum()


def one_call_loss(loss_fn: Callable, y: Tensor) -> bool:
    """Whether :func:`summed_losses` takes one call for ``y``: ``nn.CrossEntropyLoss`` (mean reduction, no class
    weights) on CPU class indices none of which it ignores (a host check, free on the CPU)."""
    return (_plain_cross_entropy(loss_fn, y) and y.device.type == "cpu"
            and not bool((y == loss_fn.ignore_index).any()))


def _plain_cross_entropy(loss_fn: Callable, y: Tensor) -> bool:
    """Whether ``loss_fn`` is an ``nn.CrossEntropyLoss`` with mean reduction and no class weights, on class
    indices ``y (N,)``."""
    return (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean"
            and y.dtype in (torch.int64, torch.int32) and y.dim() == 1)


def chunk_losses(loss_fn: Callable, logits: Tensor, y: Tensor, groups: int) -> Tensor:
    """``(G,)`` losses ``loss_fn(logits_j, y_j)`` of the ``G`` equal micro-batches of ``logits (G m, ...)``.

    ``nn.CrossEntropyLoss`` (mean reduction, no class weights) takes one ``reduction='none'`` call, averaged per
    micro-batch over the targets it does not ignore (its own mean); any other loss runs under ``vmap`` over the
    micro-batches, or one micro-batch at a time where ``vmap`` cannot batch it.
    """
    m = logits.shape[0] // groups
    if _plain_cross_entropy(loss_fn, y):
        per_sample = F.cross_entropy(logits, y, reduction="none", ignore_index=loss_fn.ignore_index,
                                     label_smoothing=loss_fn.label_smoothing)
        kept = (y != loss_fn.ignore_index).reshape(groups, m).sum(dim=1).to(per_sample.dtype)
        return per_sample.reshape(groups, m).sum(dim=1) / kept
    views = logits.reshape(groups, m, *logits.shape[1:]), y.reshape(groups, m, *y.shape[1:])
    try:
        return vmap(loss_fn)(*views)
    except (RuntimeError, NotImplementedError):
        return torch.stack([loss_fn(views[0][j], views[1][j]) for j in range(groups)])


#: Models the structured passes cannot run (the reason) or have passed the check for (None).
_PLANS: weakref.WeakKeyDictionary[nn.Module, StructuredPasses | str] = weakref.WeakKeyDictionary()


def structured_plan(model: nn.Module, names: Sequence[str]) -> StructuredPasses | str:
    """The :class:`StructuredPasses` for ``model`` with trainable tensors ``names``, or why it cannot run them.

    Cached per model (the check result too); a different set of trainable tensors builds a new plan.
    """
    cached = _PLANS.get(model)
    if isinstance(cached, StructuredPasses) and cached.names == list(names):
        return cached
    if isinstance(cached, str):
        return cached
    try:
        plan = _build(model, names)
    except Unsupported as exc:
        _PLANS[model] = str(exc)
        return str(exc)
    _PLANS[model] = plan
    return plan


def refuse(model: nn.Module, reason: str) -> None:
    """Remember that the structured passes failed on ``model`` (the step uses the vmap path from now on)."""
    _PLANS[model] = reason


def _build(model: nn.Module, names: Sequence[str]) -> StructuredPasses:
    index = {name: i for i, name in enumerate(names)}
    layers: list[_Layer] = []
    tracked: list[nn.Module] = []
    claimed: set[str] = set()
    for prefix, module in model.named_modules():
        own = {local: index[f"{prefix}.{local}" if prefix else local]
               for local, _ in module.named_parameters(recurse=False)
               if (f"{prefix}.{local}" if prefix else local) in index}
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        updates_stats = is_bn and module.training and module.track_running_stats
        batch_stats = is_bn and (module.training or module.running_mean is None)
        if not own and not batch_stats:
            continue
        base = _library_base(module)
        if base is None or any(local not in ("weight", "bias") for local in own):
            where = prefix or type(module).__name__
            raise Unsupported(f"module {where} ({type(module).__name__}) holds trainable tensors or batch "
                              "statistics outside the supported layers")
        layer = _Layer(module, base, own)
        if base in _CONV:
            layer.padding = _conv_padding(module)
        if updates_stats:
            layer.stats_slot = len(tracked)
            tracked.append(module)
        layers.append(layer)
        claimed.update(f"{prefix}.{local}" if prefix else local for local in own)
    missing = [name for name in names if name not in claimed]
    if missing:
        raise Unsupported(f"trainable tensors outside the model's layers: {missing[:3]}")
    return StructuredPasses(model, names, layers, tracked, _tape_chain(model, layers))


def _tape_chain(model: nn.Module, layers: list[_Layer]) -> list[tuple[nn.Module, Any]] | None:
    """Per module of ``model``'s chain (:func:`~sharpscope.optim.tape.chain_of_modules`), its layer's index (a
    Linear, convolution or BatchNorm) or its tape step (:data:`~sharpscope.optim.tape.OPS`, else
    :func:`~sharpscope.optim.tape.on_autograd`); None where the model is no chain or holds a LayerNorm or GroupNorm
    layer (its passes use autograd's operations)."""
    modules = tapes.chain_of_modules(model)
    if modules is None:
        return None
    index = {id(layer.module): i for i, layer in enumerate(layers)}
    chain: list[tuple[nn.Module, Any]] = []
    for _, module in modules:
        i = index.get(id(module))
        if i is None:
            chain.append((module, tapes.OPS.get(type(module), tapes.on_autograd)))
        elif layers[i].base in _PER_SAMPLE_NORM:
            return None
        else:
            chain.append((module, i))
    return chain

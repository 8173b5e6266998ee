"""Max pooling on the CPU at the speed of a few elementwise kernels, with torch's exact values and gradients.

This torch build's CPU ``max_pool2d`` on contiguous (NCHW) tensors is an order of magnitude slower than the work
needs (1 thread, this machine's CPU): 1.45 ms for a 128 x 32 x 8 x 8 batch, 16 ms for 128 x 32 x 28 x 28, where
the same pooling of a channels-last tensor takes 0.1 and 1.6 ms. On the digits ConvNet at batch 128 the two pools
were about a quarter of an SGD step. For the common non-overlapping window (``kernel_size == stride``, no padding or
dilation) :func:`max_pool2d` computes the same function as ``k * k`` strided views and ``torch.maximum`` (0.18 and
2.2 ms):

* **values**: ``torch.maximum`` of the views, so the same maxima, NaN included (both propagate it);
* **gradient**: torch's own ``max_pool2d_with_indices_backward`` with the indices of torch's channels-last kernel,
  which picks what its contiguous kernel picks (the first maximum in the window's row-major order, the last NaN;
  tested), so the gradient is torch's, bit for bit, and so is every higher derivative (the double backward is
  torch's formula of that op). The indices are computed only when a backward runs (a forward under ``no_grad``
  costs the maxima alone).

:func:`fast_max_pools` swaps this in for the ``nn.MaxPool2d`` layers of a model while a block runs (training steps,
loss-surface points, sharpness chunks); any call it does not cover (a GPU tensor, channels-last, overlapping windows, padding,
``return_indices``, a ``torch.func`` transform, ``torch.compile`` tracing) goes to torch's own function.
``tests/test_max_pool.py`` compares values, gradients and double backward with torch's, ties and NaN included, and
the training steps, loss-surface points and sharpness chunks with the same computations on torch's pooling; the
README's Speed section gives the measurements.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["BACKWARD_MIN_ELEMENTS_PER_THREAD", "fast_max_pools", "max_pool2d", "pays", "torch_max_pools",
           "window"]


def window(x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
           return_indices: bool = False) -> int | None:
    """The window size ``k`` when :func:`max_pool2d` computes ``F.max_pool2d(x, ...)`` with these arguments, else None.

    Covered: a contiguous 3-d or 4-d floating-point CPU tensor of at least ``k x k`` pixels, ``kernel_size == stride``
    (square), no padding, no dilation, ``ceil_mode`` only where it changes nothing (sizes divisible by ``k``), no
    indices returned, outside ``torch.func`` transforms and ``torch.compile`` tracing.
    """
    # the tensor first: a channels-last input (the m-SAM passes' row forms) is the common refusal
    if not isinstance(x, Tensor) or not x.is_contiguous() or x.device.type != "cpu" or x.dim() not in (3, 4) \
            or not x.is_floating_point():
        return None
    k = _square(kernel_size)
    if k is None or k < 2 or return_indices or _square(padding) != 0 or _square(dilation) != 1:
        return None
    if stride is not None and not (isinstance(stride, (list, tuple)) and len(stride) == 0) and _square(stride) != k:
        return None
    if x.numel() == 0 or x.shape[-1] < k or x.shape[-2] < k:
        return None
    if ceil_mode and (x.shape[-1] % k or x.shape[-2] % k):
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or torch.compiler.is_compiling():
        return None
    return k


def _square(value) -> int | None:
    """``value`` as one int if it is an int or a pair of equal ints, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0] if value[0] == value[1] else None
    return None


def _views(x: Tensor, k: int) -> list[Tensor]:
    """The ``k * k`` strided views of ``x`` holding window position ``(i, j)`` of every window, row-major."""
    rows, cols = x.shape[-2] // k * k, x.shape[-1] // k * k
    return [x[..., i:rows:k, j:cols:k] for i in range(k) for j in range(k)]


class _StridedMaxPool2d(torch.autograd.Function):
    """``F.max_pool2d(x, k)`` as ``k * k`` strided views (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:
        views = _views(x, k)
        out = views[0]
        for view in views[1:]:
            out = torch.maximum(out, view)
        out = out.contiguous()
        ctx.k = k
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        k = ctx.k
        with torch.no_grad():
            indices = _indices(x, k)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [k, k], [k, k], [0, 0], [1, 1], False,
                                                                 indices)
        return grad_x, None


def _indices(x: Tensor, k: int) -> Tensor:
    """The flat in-plane indices (``row * W + col``) torch's kernel picks in each window (the first maximum in
    row-major order; the last NaN), from torch's channels-last kernel: 0.3 ms with the copy where the contiguous
    kernel takes 1.4 ms (128 x 32 x 8 x 8)."""
    batched = x if x.dim() == 4 else x[None]
    indices = torch.ops.aten.max_pool2d_with_indices(batched.contiguous(memory_format=torch.channels_last), [k, k],
                                                      [k, k], [0, 0], [1, 1], False)[1]
    return indices if x.dim() == 4 else indices[0]


def max_pool2d(x: Tensor, k: int) -> Tensor:
    """``F.max_pool2d(x, k)`` (stride ``k``), the same values and derivatives, for ``x`` that :func:`window` covers."""
    return _StridedMaxPool2d.apply(x, k)


#: With a backward to run, :func:`max_pool2d` is used from this many input elements per CPU thread. Its backward
#: (the indices from a channels-last copy) costs about what torch's whole contiguous kernel costs on small inputs,
#: which torch spreads over the threads plane by plane: forward + backward at 2 threads, 16 x 32 x 8 x 8 took 0.16 ms
#: against torch's 0.11, 128 x 64 x 4 x 4 0.45 against 0.39, 128 x 32 x 8 x 8 0.78 against 0.86, 128 x 32 x 28 x 28
#: 6.4 against 8.0 (1 thread: 0.21/0.22, 0.51/0.82, 1.0/1.7, 12/18). A forward alone is 2-10x faster at every size.
BACKWARD_MIN_ELEMENTS_PER_THREAD = 1 << 17


def pays(x: Tensor, *, backward: bool | None = None) -> bool:
    """Whether :func:`max_pool2d` is faster than torch's kernel for ``x`` here (see
    :data:`BACKWARD_MIN_ELEMENTS_PER_THREAD`): always for a forward alone, from a size per thread with a backward
    (``backward``: whether one will run; by default, whether autograd records ``x``)."""
    if backward is None:
        backward = x.requires_grad and torch.is_grad_enabled()
    if not backward:
        return True
    return x.numel() >= BACKWARD_MIN_ELEMENTS_PER_THREAD * torch.get_num_threads()


def _pool_forward(module: nn.MaxPool2d, x: Tensor) -> Tensor:
    """``nn.MaxPool2d.forward`` with :func:`max_pool2d` where it applies and pays (bound to the layer while swapped)."""
    k = window(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
               module.return_indices)
    if k is None or not pays(x):
        return nn.MaxPool2d.forward(module, x)
    return _StridedMaxPool2d.apply(x, k)


#: Per model, its plain ``nn.MaxPool2d`` layers (found once; a model holds few and rarely gains new ones).
_POOLS: weakref.WeakKeyDictionary[nn.Module, list[nn.MaxPool2d]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def fast_max_pools(model: nn.Module) -> Iterator[None]:
    """While the block runs, ``model``'s ``nn.MaxPool2d`` layers pool with :func:`max_pool2d` wherever it applies
    (:func:`window`) and is the faster kernel (:func:`pays`).

    Only layers of exactly that class with their forward untouched, and only windows that could be non-overlapping
    (``stride`` equal to ``kernel_size``); each call still falls back to torch for anything :func:`window` does not
    cover. A ``torch.compile``'d model is left alone (the compiled graph is what runs). Nothing is changed after
    the block: the swap is an instance attribute, removed on exit.
    """
    pools = _POOLS.get(model)
    if pools is None:
        pools = [] if hasattr(model, "_orig_mod") else [
            module for module in model.modules()
            if type(module) is nn.MaxPool2d and module.stride in (module.kernel_size, None)]
        _POOLS[model] = pools
    with _bound_forwards(pools, _pool_forward):
        yield


def torch_max_pools(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """The reference: while the block runs, ``model``'s ``nn.MaxPool2d`` layers run torch's own pooling even inside
    the library's loops (:func:`fast_max_pools` leaves a layer with its own forward alone). For A/B comparisons."""
    return _bound_forwards([m for m in model.modules() if isinstance(m, nn.MaxPool2d)], nn.MaxPool2d.forward)


@contextlib.contextmanager
def _bound_forwards(modules: list[nn.Module], function) -> Iterator[None]:
    """``function`` bound to each module as its instance ``forward`` (a bound method: ``copy.deepcopy`` rebinds it
    to the copy), except where the instance already has one; removed on exit."""
    swapped = []
    try:
        for module in modules:
            if "forward" not in vars(module):
                module.forward = types.MethodType(function, module)
                swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward

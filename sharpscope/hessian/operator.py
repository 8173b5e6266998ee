"""The loss Hessian of a model over fixed evaluation batches, as a matrix-free symmetric operator.

.. math::

    H = \\nabla^2_\\theta L(\\theta), \\qquad L(\\theta) = \\frac{1}{N} \\sum_b n_b \\, L_b(\\theta),

where ``L_b`` is ``loss_fn(model(inputs_b), targets_b)`` or ``BatchLoss(fn)(model, batch_b)`` (a mean over the
``n_b`` samples of batch ``b``; batches follow :mod:`sharpscope.batches`) and ``N = sum_b n_b``. ``H @ v`` is computed by double backward (Pearlmutter 1994): per batch one forward and one
``autograd.grad(create_graph=True)`` build the gradient graph ``g_b``, then one more ``autograd.grad(g_b, params, v)``
per vector gives ``H_b v``. Two things make repeated products cheap (``benchmarks/bench_hessian.py``):

* **Graph cache.** Lanczos, trace and density estimators multiply dozens to hundreds of vectors with the same
  weights, so the graphs ``g_b`` are built at the first product and kept (PyHessian does this for one batch); every
  later product is only the second backward. The cache is checked against a snapshot of the model's parameters,
  buffers and module modes before each product and rebuilt when anything changed. It holds the activations of every
  cached batch; ``cache_graph`` / ``max_cache_bytes`` bound it (see :class:`HessianOperator`).
* **Eval-mode BatchNorm as an affine map, folded into its convolution.** In eval mode BatchNorm is
  ``x * scale + shift`` per channel; while the graphs are built, ``F.batch_norm`` calls with running statistics are
  computed in that form (the same function, the formula ATen's CPU kernel uses), whose double backward is a few
  multiplications instead of the generic batch-norm double backward. When ``x`` comes straight from a
  convolution, the map goes into that convolution's weight and bias instead (``conv(x, W scale, b scale + shift)``),
  so no per-channel multiplication touches an activation in the forward, backward or double backward. ReLU's
  backward becomes ``grad * mask`` with a constant mask (torch's own formula differentiates with respect to the
  saved output too and materialises zeros for it). Values agree with the native layers to rounding
  (:class:`_GraphForms`).
* **Batched products.** ``H @ V`` with ``V`` of shape ``(n, k)`` runs the second backward once per block of columns
  instead of once per column: ``torch.func.vmap`` over ``autograd.grad(g_b, params, v)`` on the same (cached)
  graph. torch.func's second derivatives under ``vmap`` are known to be wrong for some models on torch 2.13, so the
  first batched product at given weights is checked against a plain product (of a random combination of the
  columns), and any disagreement (or an op without a batching rule) switches the operator to the column loop for
  good, with a warning. See :class:`HessianOperator` (``batched``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from sharpscope.batches import (
    BatchLoss,
    batch_loss,
    check_fixed_batches,
    num_samples,
    split_batch,
    unfused_attention,
)
from sharpscope.errors import SharpscopeError

__all__ = ["HessianOperator", "eval_mode", "select_parameters"]

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

# Auto mode (batched=None) on CPU: columns per vmapped pass = this budget // one batch's graph bytes. The vmapped
# second backward holds about (columns x graph bytes) of intermediates; once that outgrows the last-level cache the
# pass is memory bound and slower per vector than the column loop. Measured (1 thread, 32 MiB L3, the ConvNet of
# benchmarks/bench_hessian.py on NCHW-strided inputs, CPU time): block of 16 costs 1.0x a gradient per vector
# vmapped vs 1.6x looped at 1.7 MiB of graph per batch (25 samples), even at 6 MiB (100 samples), 2.6x vs 1.3x at
# 29 MiB (500 samples).
_CPU_BLOCK_BYTES = 32 << 20


def _check_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance (to the largest entry) for the batched-vs-plain check of a product.

    Both paths evaluate the same derivative formulas on the same saved tensors; only the blocking and summation
    order of the batched kernels differ, so they agree to a few hundred ulps of the result's scale (measured
    <= 1e-15 in float64, <= 1e-6 in float32), while the known vmap bugs are off by O(1). 1e-10 (float64) and 1e-4
    (float32) sit far from both; other dtypes use sqrt(eps).
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return float(torch.finfo(dtype).eps) ** 0.5


@contextlib.contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own ``training`` flag.

    Restoring per submodule (not ``model.train(was_training)``) keeps mixed setups intact, e.g. a model in
    train mode whose BatchNorm layers the user froze in eval mode. With ``enabled=False`` nothing changes.
    """
    if not enabled:
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def select_parameters(
    model: nn.Module, params: Sequence[str | nn.Parameter | Tensor] | None = None
) -> tuple[list[str], list[Tensor]]:
    """Resolve a parameter subset to ``(names, tensors)`` in the model's ``named_parameters`` order.

    Args:
        model: the network.
        params: ``None`` for every parameter with ``requires_grad``; otherwise a list of parameter names
            (``"0.weight"``) and/or parameter tensors of ``model``.

    Raises:
        SharpscopeError: for unknown names, tensors that are not parameters of ``model``, parameters that do not
            require grad, or an empty selection.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise SharpscopeError("the model has no parameters with requires_grad=True; nothing to differentiate")
        return [n for n, _ in chosen], [p for _, p in chosen]
    if isinstance(params, (str, Tensor)):
        params = [params]
    by_name = dict(named)
    by_id = {id(p): name for name, p in named}
    wanted: set[str] = set()
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                from sharpscope.errors import unknown_name_error

                raise unknown_name_error("parameter", item, by_name)
            wanted.add(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise SharpscopeError(
                    f"a tensor of shape {tuple(item.shape)} in params= is not a parameter of the model; pass "
                    "parameters from model.parameters() or their names from model.named_parameters()"
                )
            wanted.add(by_id[id(item)])
        else:
            raise SharpscopeError(f"params= items must be names or parameters, got {type(item).__name__}")
    if not wanted:
        raise SharpscopeError("params= is empty; pass at least one parameter (or None for all)")
    chosen = [(name, p) for name, p in named if name in wanted]
    frozen = [name for name, p in chosen if not p.requires_grad]
    if frozen:
        raise SharpscopeError(
            f"parameter(s) {', '.join(frozen)} have requires_grad=False; the Hessian with respect to them is "
            "undefined here. Set requires_grad=True or leave them out of params="
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


def _materialize(batches: Iterable[Any]) -> Iterable[Any]:
    """One-shot iterators (generators) are turned into a list so every product sees the same data."""
    if iter(batches) is batches:  # an iterator, not a re-iterable container
        return list(batches)
    return batches


def _tensors(batch: Any) -> list[Tensor]:
    return [t for t in tree_leaves(batch) if isinstance(t, Tensor)]


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)
_CONVOLUTION_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")  # no Python signature


class _MaskedReLU(torch.autograd.Function):
    """``relu(x)`` whose backward is ``grad * 1[x > 0]`` with the mask a constant of the graph.

    The values are ``torch.relu``'s (in place too, for ``inplace=True``). The difference is in the double backward:
    torch's ``threshold_backward`` formula also differentiates with respect to the saved output and materialises
    an activation-sized zero tensor for it, which the second backward then carries and adds through the graph; a
    product with a constant mask has nothing to differentiate but ``grad``.
    """

    @staticmethod
    def forward(ctx, x, inplace):
        mask = (x > 0).to(x.dtype)
        ctx.save_for_backward(mask)
        if inplace:
            ctx.mark_dirty(x)
            return x.relu_()
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


_RELUS = {F.relu: None, torch.relu: False, torch.relu_: True, Tensor.relu: False, Tensor.relu_: True}
# Below this many elements the masked form's Python backward (called in every product) costs more than the zeros it
# saves: on the 2,410-parameter digits MLP (500 x 32 activations) it was 5% slower per product, on the digits and
# Fashion-MNIST ConvNets (500 x 32 x 8 x 8 and up) 6-7% faster (benchmarks/bench_hessian.py, 1 thread).
_MASKED_RELU_MIN_ELEMENTS = 1 << 15


class _GraphForms(TorchFunctionMode):
    """While the operator builds a gradient graph: the same functions, in forms with a cheaper double backward.

    * **ReLU** (``F.relu``, ``torch.relu(_)``, ``Tensor.relu(_)``) on at least ``_MASKED_RELU_MIN_ELEMENTS``
      elements as :class:`_MaskedReLU`: the same values, a backward ``grad * mask``; 6-7% of a Hessian-vector
      product of the digits and Fashion-MNIST ConvNets.
    * **Eval-mode BatchNorm** (``batchnorm``): ``F.batch_norm`` with running statistics and ``training=False`` as
      the affine map ``x * scale + shift``, ``scale = weight / sqrt(running_var + eps)``,
      ``shift = bias - running_mean * scale`` (the terms ATen's CPU kernel forms,
      ``batch_norm_cpu_collect_linear_and_constant_terms``): two multiplications and a sum in the double backward
      instead of the generic batch-norm double backward. Train-mode calls (batch statistics) and mixed dtypes go
      to the native function unchanged.
    * **BatchNorm folded into its convolution** (``fold``): when ``x`` is the output of the last
      ``F.conv1d/2d/3d`` call seen by the mode (the tensor itself, as in ``bn(conv(x))``), the result is that
      convolution with weight ``W * scale`` (per output channel) and bias ``b * scale + shift``: the same function
      of the same parameters, so its derivatives of every order are exact, but the per-channel map acts on the
      small weight instead of the activation in the forward, the backward and the double backward (a product of
      the digits ConvNet: 16 % less time on 2 threads, 25 % on 1). The convolution's own output stays as
      computed, so any other use of it (a residual branch) is untouched; its forward is the only work repeated,
      once per graph.

    Products agree with the native layers to rounding (``benchmarks/bench_hessian.py`` times each form against
    the last; ``tests/hessian/test_hessian_graph_forms.py`` checks them against the native double backward).
    """

    def __init__(self, *, batchnorm: bool = True, fold: bool = True, relu: bool = True) -> None:
        super().__init__()
        self.batchnorm, self.fold, self.relu = batchnorm, fold and batchnorm, relu
        self._last_convolution: tuple[Any, Any, dict[str, Any]] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.relu and func in _RELUS:
            inplace = _RELUS[func]
            if inplace is None:  # F.relu(input, inplace=False)
                inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
            x = args[0] if args else kwargs.get("input")
            if (isinstance(x, Tensor) and x.is_floating_point() and x.numel() >= _MASKED_RELU_MIN_ELEMENTS
                    and not kwargs.keys() - {"input", "inplace"}):
                return _MaskedReLU.apply(x, inplace)
            return func(*args, **kwargs)
        if func in _CONVOLUTIONS and self.fold:
            output = func(*args, **kwargs)
            self._last_convolution = (output, func, {**dict(zip(_CONVOLUTION_ARGUMENTS, args)), **kwargs})
            return output
        if func is F.batch_norm and self.batchnorm:
            bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x, mean, var, weight, bias = a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"]
            if (not a["training"] and isinstance(x, Tensor) and x.dim() >= 2 and mean is not None and var is not None
                    and all(t is None or t.dtype == x.dtype for t in (mean, var, weight, bias))):
                scale = (var + a["eps"]).sqrt().reciprocal()
                if weight is not None:
                    scale = scale * weight
                shift = -mean * scale
                if bias is not None:
                    shift = shift + bias
                folded = self._folded_convolution(x, scale, shift)
                if folded is not None:
                    return folded
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return x * scale.view(shape) + shift.view(shape)
        return func(*args, **kwargs)

    def _folded_convolution(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor | None:
        """``conv(input, W * scale, b * scale + shift)`` when ``x`` is the last convolution's output, else None."""
        if self._last_convolution is None or self._last_convolution[0] is not x:
            return None
        _, func, conv = self._last_convolution
        weight, bias = conv.get("weight"), conv.get("bias")
        if (not isinstance(weight, Tensor) or weight.dtype != x.dtype or weight.shape[0] != x.shape[1]
                or (bias is not None and (not isinstance(bias, Tensor) or bias.dtype != x.dtype))):
            return None
        # a new argument dict: a second BatchNorm of the same output must fold into the original weights
        return func(**{**conv, "weight": weight * scale.view((-1,) + (1,) * (weight.dim() - 1)),
                       "bias": shift if bias is None else bias * scale + shift})


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORM_TYPES) for m in model.modules())


def _graph_bytes(roots: Sequence[Tensor], exclude: set[int]) -> int:
    """Bytes the autograd graph behind ``roots`` keeps alive: the roots plus every distinct storage saved by a
    node, except the storages in ``exclude`` (parameters, buffers and inputs, which exist without the graph).

    Walks ``grad_fn.next_functions`` and reads the nodes' ``_saved_*`` attributes (one pass, ~1 ms for a small
    CNN). Storages are counted once however many views of them are saved. An estimate: allocator padding and
    tensors hidden inside custom autograd Functions' contexts are not seen.
    """
    seen_storages = set(exclude)
    total = 0

    def count(t: Any) -> None:
        nonlocal total
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(t, (tuple, list)):
            for item in t:
                count(item)

    for root in roots:
        count(root)
    seen_nodes = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    count(getattr(node, name))
                except RuntimeError:  # already freed, or not unpackable outside backward
                    pass
        stack.extend(fn for fn, _ in node.next_functions if fn is not None and fn not in seen_nodes)
    return total


def _available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` now: CUDA's free memory plus what its caching allocator holds
    unused; on CPU ``MemAvailable`` of ``/proc/meminfo`` (Linux), else free physical pages; 1 GiB if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            pass
    return 1 << 30


class HessianOperator:
    """Matrix-free Hessian of the sample-weighted mean loss of ``model`` over fixed ``batches``.

    Args:
        model: the network; its parameters are read live, so later in-place changes show up in products.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d`` mean loss over the batch (e.g. ``nn.CrossEntropyLoss()``),
            or :class:`sharpscope.batches.BatchLoss` ``(fn)`` with ``fn(model, batch) -> 0-d`` for anything else.
        batches: any re-iterable of batches (``sharpscope.data.EvalBatches``, a list, a ``DataLoader`` with
            ``shuffle=False``); the same samples in the same order on every pass. A batch is ``(inputs, targets)``
            with inputs a tensor, a tuple of tensors (``model(*inputs)``) or a dict (``model(**inputs)`` /
            ``model(inputs)``), see :mod:`sharpscope.batches`; batches are weighted by their sample count (dim 0 of
            their first tensor). A one-shot generator is materialised into a list.
        params: the parameters the Hessian is taken with respect to: ``None`` (all that require grad) or a list
            of names / parameter tensors. A subset gives the diagonal block ``H[S, S]`` (per-layer spectra).
        eval_mode: run every product with the model in eval mode (BatchNorm uses running statistics, dropout
            off), restoring each submodule's mode afterwards. ``False`` uses the model as it is.
        check_deterministic: at construction, refuse a setup whose loss is not reproducible (dropout in train
            mode, train-mode BatchNorm, augmentation, a shuffling loader); costs two forward passes.
        cache_graph: keep each batch's gradient graph ``g_b`` between products, so a product after the first costs
            only the second backward pass (measured in ``benchmarks/bench_hessian.py``: 1.1 gradients instead of
            1.8 on its MLP, 2.4 instead of 4.6 on its ConvNet). ``None`` (default): cache batches in order while the
            estimated graph memory stays within ``max_cache_bytes``; the remaining batches are recomputed per
            product. ``True``: cache every batch whatever the memory. ``False``: never cache (least memory: one
            batch's graph at a time). The products are the same either way (bit for bit on CPU).
        max_cache_bytes: the memory the default ``cache_graph=None`` may hold in cached graphs; ``None`` is a
            quarter of the memory available on the parameters' device when the cache is filled. Ignored when
            ``cache_graph`` is ``True`` or ``False``.
        batched: how ``H @ V`` treats the ``k`` columns of an ``(n, k)`` block (``k = 1`` always takes the plain
            double backward). ``None`` (default, auto): per batch, ``torch.func.vmap`` of the second backward over
            sub-blocks of ``s`` columns, ``s = budget // (that batch's graph bytes)`` capped to ``k``, the budget
            being 32 MiB on CPU (about a last-level cache: past it the vmapped pass is memory bound and slower per
            vector than the loop, see ``_CPU_BLOCK_BYTES``) and a quarter of the free memory elsewhere; ``s = 1`` is
            the column loop. ``True``: all ``k`` columns in one vmapped pass per batch whatever the size.
            ``False``: one double backward per column (the reference path; least memory). Batched and looped
            products agree to rounding, not bit for bit.

    Batched products are verified. At its first batched pass at given weights (per cache build, or per change of
    the model's state without a cache) each batch also computes one plain double-backward product, of ``B c`` for
    the first sub-block ``B`` and fixed random weights ``c``, and compares it with the batched ``(H_b B) c``: by
    linearity they are equal, and a wrong entry in any column shows (max difference relative to the largest entry
    at most 1e-10 in float64, 1e-4 in float32: see ``_check_rtol``). A disagreement, or a batched call that raises
    (an op without a batching rule, e.g. a convolution whose 1-channel input has channels-last strides on torch
    2.13), warns once with the reason, switches this operator to the column loop for good (``batched_disabled``
    says why) and computes the affected batches with the loop: no product takes anything from a batched pass that
    failed its check or raised. The check costs one extra product per batch, once per weights; it is counted in
    ``num_check_matvecs``, not in ``num_matvecs`` (the count estimators budget and report).

    The cache is bound to the model's state: before each product the parameters and buffers of the whole model
    are compared with a snapshot taken when the cache was filled (by value, so in-place changes through ``.data``
    count), as are the modules' train/eval flags and the input tensors' version counters; any difference drops the
    cache and rebuilds it at the current weights, so a product never uses stale graphs. :meth:`clear_cache` frees
    it early (it is also freed with the operator). Changing a batch's tensors in place behind autograd's back
    (through ``.data``) is not detected.

    Vectors are flat: ``(n,)`` or ``(n, k)`` with ``n = num_params``, laid out as the concatenation of the
    selected parameters (``names`` order) flattened in row-major order. Inputs are cast to the operator's dtype
    and device; the result has the operator's dtype.

    Attributes:
        num_matvecs: Hessian-vector products computed so far (a product with ``(n, k)`` counts ``k``).
        num_check_matvecs: extra column products spent verifying batched products (not in ``num_matvecs``,
            whose count is what estimators budget and report).
        batched_disabled: ``None``, or why this operator switched from batched products to the column loop.

    Raises:
        SharpscopeError: see :func:`select_parameters`; also for empty or malformed batches, mixed dtypes or
            devices, a negative ``max_cache_bytes``, and a non-deterministic setup (``check_deterministic``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        batches: Iterable[Any],
        *,
        params: Sequence[str | nn.Parameter | Tensor] | None = None,
        eval_mode: bool = True,
        check_deterministic: bool = True,
        cache_graph: bool | None = None,
        max_cache_bytes: int | None = None,
        batched: bool | None = None,
    ) -> None:
        if cache_graph not in (None, True, False):
            raise SharpscopeError(f"cache_graph must be None, True or False, got {cache_graph!r}")
        if batched not in (None, True, False) or isinstance(batched, int) and not isinstance(batched, bool):
            raise SharpscopeError(f"batched must be None (auto), True or False, got {batched!r}")
        valid_bytes = (isinstance(max_cache_bytes, int) and not isinstance(max_cache_bytes, bool)
                       and max_cache_bytes >= 0)
        if max_cache_bytes is not None and not valid_bytes:
            raise SharpscopeError(
                f"max_cache_bytes must be a number of bytes >= 0 or None (a quarter of the free memory), "
                f"got {max_cache_bytes!r}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _materialize(batches)
        self.eval_mode = eval_mode
        self.names, self.params = select_parameters(model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise SharpscopeError(
                f"the selected parameters mix dtypes {sorted(map(str, dtypes))} / devices "
                f"{sorted(map(str, devices))}; move the model to one dtype and device (model.to(...))"
            )
        self._dtype = self.params[0].dtype
        self._device = self.params[0].device
        self._numels = [p.numel() for p in self.params]
        self._shapes = [p.shape for p in self.params]
        self.num_params = sum(self._numels)
        self.num_matvecs = 0
        if not isinstance(loss_fn, BatchLoss):
            for b in self.batches:
                split_batch(b)  # a malformed batch fails here with the contract, not inside the model
        sizes = [num_samples(b) for b in self.batches]
        if not sizes:
            raise SharpscopeError("batches is empty; the Hessian needs at least one (x, y) batch")
        self._batch_sizes = sizes
        self.num_samples = sum(sizes)
        self.cache_graph = cache_graph
        self.max_cache_bytes = max_cache_bytes
        # the forms of _GraphForms (private switches: benchmarks/bench_hessian.py times each against the last)
        self._affine_batchnorm = _has_batchnorm(model)
        self._fold_batchnorm = True
        self._masked_relu = True
        self._graphs: list[tuple[Tensor, ...]] = []  # cached g_b of the first len(_graphs) batches
        self._graph_bytes = 0  # their estimated memory
        self._cache_closed = False  # True once a batch did not fit: later batches are recomputed per product
        self._cache_budget: int | None = None
        self._fixed: set[int] | None = None  # storages not owned by the graphs (see _fixed_storages)
        self._snapshot: dict[str, Any] | None = None  # the model state the cached graphs were built at
        self.batched = batched
        self.batched_disabled: str | None = None
        self.num_check_matvecs = 0
        self._verified_snapshot: dict[str, Any] | None = None  # the state the verification record is for
        self._verified_batches: set[int] = set()  # batches whose batched products were verified at that state
        self._batch_graph_bytes: dict[int, int] = {}  # estimated graph bytes per batch index (for sub-block sizes)
        if check_deterministic:
            self._check_deterministic()

    # ----------------------------------------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple[int, int]:
        """``(num_params, num_params)``."""
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (products are computed in it)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self._device

    @property
    def cached_batches(self) -> int:
        """How many batches' gradient graphs are cached now (0 before the first product or after a change)."""
        return len(self._graphs)

    @property
    def cache_bytes(self) -> int:
        """Estimated bytes held by the cached graphs (activations and saved intermediates; 0 when none)."""
        return self._graph_bytes

    def clear_cache(self) -> None:
        """Free the cached gradient graphs; the next product rebuilds them."""
        self._graphs = []
        self._graph_bytes = 0
        self._cache_closed = False
        self._cache_budget = None
        self._fixed = None
        self._snapshot = None
        self._verified_snapshot = None  # re-verify batched products at the new weights

    def __repr__(self) -> str:
        return (
            f"HessianOperator(num_params={self.num_params}, num_samples={self.num_samples}, "
            f"batches={len(self._batch_sizes)}, dtype={self.dtype}, device={self.device}, "
            f"cached_batches={self.cached_batches})"
        )

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat ``(n,)`` vector (``names`` order)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat ``(n,)`` vector into parameter-shaped views."""
        return [chunk.view(shape) for chunk, shape in zip(vector.split(self._numels), self._shapes)]

    # --------------------------------------------------------------------------------------------- products
    def _batch_loss(self, batch: Any) -> Tensor:
        loss = batch_loss(self.model, self.loss_fn, batch)[1]
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise SharpscopeError(
                f"loss_fn must return a 0-d mean loss, got {shape}; use reduction='mean' (e.g. nn.CrossEntropyLoss())"
            )
        return loss

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matmat(other)

    def matmat(self, V: Tensor) -> Tensor:
        """``H @ V`` for ``V`` of shape ``(n,)`` or ``(n, k)``; returns the same shape in the operator's dtype.

        Per batch: the gradient graph ``g_b`` (cached, or one forward and one ``autograd.grad`` with
        ``create_graph=True``), then ``H_b V`` by the second backward ``autograd.grad(g_b, params, v_j)``: one call
        per column, or one vmapped call per sub-block of columns (``batched``, verified as described in the class
        docstring); the batch results are combined as ``sum_b n_b H_b V / N``.
        """
        if not isinstance(V, Tensor):
            V = torch.as_tensor(V)
        vector = V.dim() == 1
        if V.dim() not in (1, 2) or V.shape[0] != self.num_params:
            raise SharpscopeError(
                f"expected a vector of shape ({self.num_params},) or a matrix ({self.num_params}, k), "
                f"got {tuple(V.shape)}"
            )
        V = V.to(device=self.device, dtype=self.dtype)
        if vector:
            V = V[:, None]
        k = V.shape[1]
        out = torch.zeros(self.num_params, k, dtype=self.dtype, device=self.device)
        if k == 0:
            return out[:, 0] if vector else out
        # each column contiguous: a strided column, split into parameter-shaped views, reaches the double backward's
        # convolutions as strided weights and made every product of a block ~1.4x slower than a single one
        columns = V.t().contiguous()
        with eval_mode(self.model, self.eval_mode), torch.enable_grad():
            if self._graphs and not self._snapshot_matches():
                self.clear_cache()  # the weights (or buffers, modes, inputs) changed: the graphs are stale
            if self.cache_graph is not False and not self._graphs and not self._cache_closed:
                self._snapshot = self._take_snapshot()
            if k > 1 and self.batched is not False and self.batched_disabled is None and not self._verified():
                # a new state: batched products of every batch are verified again at their first use
                self._verified_snapshot = self._snapshot if self._snapshot is not None else self._take_snapshot()
                self._verified_batches = set()
            for index, (batch, n_b) in enumerate(zip(self.batches, self._batch_sizes)):
                if index < len(self._graphs):
                    grads, keep = self._graphs[index], True
                else:
                    grads = self._gradient_graph(batch)
                    keep = self._admit(grads, index)
                weight = n_b / self.num_samples
                block = self._block_size(index, grads, k)
                start = 0
                if block > 1 and self.batched_disabled is None:
                    start = self._batched_products(grads, V, block, out, weight,
                                                   verify=index not in self._verified_batches)
                    if start == k:
                        self._verified_batches.add(index)
                for j in range(start, k):
                    out[:, j].add_(self._plain_product(grads, columns[j], retain=keep or j < k - 1), alpha=weight)
                del grads
        self.num_matvecs += k
        return out[:, 0] if vector else out

    def _verified(self) -> bool:
        """Whether batched products were verified at the model's current state."""
        verified = self._verified_snapshot
        if verified is None:
            return False
        return verified is self._snapshot or self._snapshot_matches(verified)

    def _block_size(self, index: int, grads: tuple[Tensor, ...], k: int) -> int:
        """Columns per vmapped pass for batch ``index`` (1: the column loop); see ``batched`` in the class docstring."""
        if k == 1 or self.batched is False or self.batched_disabled is not None:
            return 1
        if self.batched is True:
            return k
        if index not in self._batch_graph_bytes:
            if self._fixed is None:
                self._fixed = self._fixed_storages()
            self._batch_graph_bytes[index] = _graph_bytes(grads, self._fixed)
        budget = _CPU_BLOCK_BYTES if self.device.type == "cpu" else _available_memory(self.device) // 4
        return max(1, min(k, budget // max(self._batch_graph_bytes[index], 1)))

    def _plain_product(self, grads: tuple[Tensor, ...], v: Tensor, *, retain: bool) -> Tensor:
        """``H_b v`` as a flat ``(n,)`` vector by one double backward on the graph ``grads`` of batch ``b``."""
        hv = torch.autograd.grad(grads, self.params, grad_outputs=self.unflatten(v), retain_graph=retain,
                                 allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1) for h, p in zip(hv, self.params)])

    def _batched_block(self, grads: tuple[Tensor, ...], block: Tensor) -> Tensor:
        """``H_b @ block`` for ``block`` of shape ``(n, s)``: one ``torch.func.vmap`` of the second backward over the
        ``s`` columns on the graph ``grads`` of batch ``b`` (kept for further calls). Returns ``(n, s)``.

        The only place batched products are formed: a subclass may override it (the tests do, to check that a
        wrong batched result is caught by the verification in :meth:`matmat`).
        """
        s = block.shape[1]
        tangents = [chunk.t().reshape(s, *shape) for chunk, shape in zip(block.split(self._numels), self._shapes)]

        def second_backward(*v: Tensor) -> tuple[Tensor, ...]:
            hv = torch.autograd.grad(grads, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
            return tuple(h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params))

        hv = torch.func.vmap(second_backward)(*tangents)
        return torch.cat([h.reshape(s, -1) for h in hv], dim=1).t()

    def _batched_products(self, grads: tuple[Tensor, ...], V: Tensor, block: int, out: Tensor, weight: float, *,
                          verify: bool) -> int:
        """Add ``weight * H_b V`` to ``out`` by vmapped passes of ``block`` columns; return the first column not done.

        With ``verify``, the first sub-block ``B`` is checked before anything is added: its batched products combined
        with fixed random weights ``c`` against the plain product of ``B c``. On a failure the operator switches to
        the column loop (:meth:`_disable_batched`) and the columns from the failed sub-block on are left to the
        caller's loop.
        """
        k = V.shape[1]
        for start in range(0, k, block):
            stop = min(start + block, k)
            try:
                result = self._batched_block(grads, V[:, start:stop])
            except Exception as exc:  # noqa: BLE001 - any failure of the batched pass means: use the exact loop
                message = str(exc).splitlines()[0] if str(exc) else ""
                self._disable_batched(f"the batched (vmapped) second backward raised {type(exc).__name__}: {message}")
                return start
            if verify and start == 0:
                # H_b is linear, so (H_b B) c = H_b (B c) for any c: one plain product checks every column of the
                # sub-block at once (a fixed Gaussian c, so runs are reproducible and no column is spared)
                mix = torch.randn(stop, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                mix = mix.to(device=self.device, dtype=self.dtype)
                exact = self._plain_product(grads, V[:, :stop] @ mix, retain=True)
                self.num_check_matvecs += 1
                batched = result @ mix
                scale = exact.abs().max()
                difference = (batched - exact).abs().max()
                rtol = _check_rtol(self.dtype)
                if not bool(torch.isfinite(batched).all()) or bool(difference > rtol * scale) or (
                        bool(scale == 0) and bool(difference > 0)):
                    self._disable_batched(
                        f"the batched (vmapped) product disagrees with the plain double backward: for a random "
                        f"combination of columns {start}..{stop - 1} the max difference is {float(difference):.3g} "
                        f"against a max entry of {float(scale):.3g} (relative "
                        f"{float(difference / scale) if scale > 0 else float('inf'):.3g} > {rtol:g})"
                    )
                    return start
            out[:, start:stop].add_(result, alpha=weight)
        return k

    def _disable_batched(self, reason: str) -> None:
        """Switch this operator to the column loop for good, warning once with the reason."""
        if self.batched_disabled is None:
            self.batched_disabled = reason
            warnings.warn(
                f"HessianOperator: {reason}. Using the exact column-by-column double backward for this operator "
                "from now on (pass batched=False to skip the batched attempt).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _gradient_graph(self, batch: Any) -> tuple[Tensor, ...]:
        """``g_b = grad L_b`` with its graph (``create_graph=True``), built in the :class:`_GraphForms`, attention
        unfused (:class:`sharpscope.batches.unfused_attention`: torch's fused attention kernels have no double
        backward)."""
        mode = _GraphForms(batchnorm=self._affine_batchnorm, fold=self._fold_batchnorm, relu=self._masked_relu)
        with mode, unfused_attention():
            loss = self._batch_loss(batch)
            return torch.autograd.grad(loss, self.params, create_graph=True)

    # ------------------------------------------------------------------------------------------- graph cache
    def _admit(self, grads: tuple[Tensor, ...], index: int) -> bool:
        """Append the next batch's graph (batch ``index``) to the cache if the policy allows; return whether it
        was kept."""
        if self.cache_graph is False or self._cache_closed:
            return False
        if self.cache_graph is None:
            if self._cache_budget is None:
                available = _available_memory(self.device)
                self._cache_budget = available // 4 if self.max_cache_bytes is None else self.max_cache_bytes
        if self._fixed is None:
            self._fixed = self._fixed_storages()
        size = _graph_bytes(grads, self._fixed)
        self._batch_graph_bytes[index] = size
        if self.cache_graph is None and self._graph_bytes + size > self._cache_budget:
            self._cache_closed = True  # keep the prefix that fits; recompute the rest on every product
            if not self._graphs:
                self._snapshot = None
            return False
        self._graphs.append(grads)
        self._graph_bytes += size
        return True

    def _fixed_storages(self) -> set[int]:
        """Storages that exist without any graph: the model's parameters and buffers and the batches' tensors."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [t for batch in self.batches for t in _tensors(batch)]
        return {t.untyped_storage().data_ptr() for t in tensors}

    def _take_snapshot(self) -> dict[str, Any]:
        """The state the graphs about to be built depend on (taken before building, under ``eval_mode``)."""
        state = [*self.model.parameters(), *self.model.buffers()]
        return {
            "tensors": [t.detach().clone() for t in state],
            # autograd refuses a graph whose saved tensors were written in place, even with the same values
            "versions": [t._version for t in state],
            "training": [m.training for m in self.model.modules()],
            "inputs": self._input_versions(),
        }

    def _input_versions(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t._version) for batch in self.batches for t in _tensors(batch)]

    def _snapshot_matches(self, snapshot: dict[str, Any] | None = None) -> bool:
        """Whether the model still has the parameters, buffers, modes and inputs of ``snapshot`` (default: the
        state the cached graphs were built at)."""
        snapshot = self._snapshot if snapshot is None else snapshot
        if snapshot is None:
            return False
        current = [*self.model.parameters(), *self.model.buffers()]
        if ([t._version for t in current] != snapshot["versions"]
                or [m.training for m in self.model.modules()] != snapshot["training"]
                or self._input_versions() != snapshot["inputs"]):
            return False
        pairs = list(zip(current, snapshot["tensors"]))
        if any(t.shape != saved.shape or t.dtype != saved.dtype or t.device != saved.device for t, saved in pairs):
            return False
        if self.device.type == "cpu":
            return all(torch.equal(t, saved) for t, saved in pairs)
        # one host synchronisation for all tensors instead of one per torch.equal
        differs = [(t.detach() != saved).any().to(self.device) for t, saved in pairs]
        return not bool(torch.stack(differs).any()) if differs else True

    # ---------------------------------------------------------------------------------------------- helpers
    def loss(self) -> Tensor:
        """The sample-weighted mean loss ``L(theta)`` over the batches (0-d, detached)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with eval_mode(self.model, self.eval_mode), torch.no_grad():
            for batch, n_b in zip(self.batches, self._batch_sizes):
                total += self._batch_loss(batch).to(self.dtype) * (n_b / self.num_samples)
        return total

    def gradient(self) -> Tensor:
        """The flat gradient ``grad L(theta)`` of shape ``(n,)`` (detached; ``.grad`` fields are untouched)."""
        out = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with eval_mode(self.model, self.eval_mode), torch.enable_grad():
            for batch, n_b in zip(self.batches, self._batch_sizes):
                grads = torch.autograd.grad(self._batch_loss(batch), self.params, allow_unused=True)
                flat = torch.cat([
                    (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, self.params)
                ])
                out.add_(flat, alpha=n_b / self.num_samples)
        return out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (float64 NumPy in and out; one copy per product)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def matmat(X):
            X = np.asarray(X)
            result = self.matmat(torch.as_tensor(np.ascontiguousarray(X)))
            return result.detach().to("cpu", torch.float64).numpy()

        return LinearOperator(
            self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=np.float64
        )

    # ------------------------------------------------------------------------------------------ determinism
    def _check_deterministic(self) -> None:
        """Refuse setups whose loss is not a fixed function of the parameters (STYLE.md 5).

        Checks (two forward passes, no backward): :func:`sharpscope.batches.check_fixed_batches` (a shuffling
        ``DataLoader`` is refused; the first batch must be equal on two passes over ``batches``, which catches
        other shuffling and augmentation), and the loss on it evaluates identically
        twice, up to ``256 * eps`` relative (catches dropout and other randomness in the forward). BatchNorm
        layers that would run in train mode are refused up front: their output depends on the batch and every
        forward overwrites the running statistics.
        """
        opt_out = "If this is intended, pass check_deterministic=False."
        with eval_mode(self.model, self.eval_mode):
            train_bn = [name or type(self.model).__name__ for name, m in self.model.named_modules()
                        if isinstance(m, _BATCHNORM_TYPES) and m.training]
            train_dropout = [name or type(self.model).__name__ for name, m in self.model.named_modules()
                             if isinstance(m, _DROPOUT_TYPES) and m.training and m.p > 0]
        if train_bn:
            raise SharpscopeError(
                f"the Hessian would be taken with BatchNorm layer(s) {', '.join(train_bn[:3])} in train mode "
                "(eval_mode=False on a model in train mode): the loss then depends on batch composition and every "
                f"product overwrites the running statistics. Use eval_mode=True or call model.eval(). {opt_out}"
            )
        check_fixed_batches(self.batches, opt_out="check_deterministic=False")
        first = next(iter(self.batches))
        with eval_mode(self.model, self.eval_mode), torch.no_grad():
            first_loss = self._batch_loss(first).detach()
            second_loss = self._batch_loss(first).detach()
        difference = (first_loss - second_loss).abs()
        # Two evaluations of the same graph on the same input agree to the last bit on CPU; 256 eps leaves room
        # for non-deterministic GPU reductions, while dropout moves the loss by many orders of magnitude more.
        tolerance = 256 * torch.finfo(first_loss.dtype).eps * max(first_loss.abs().item(), 1e-30)
        if not difference.item() <= tolerance:
            hint = f" (dropout modules in train mode: {', '.join(train_dropout[:3])})" if train_dropout else ""
            raise SharpscopeError(
                f"the loss is not deterministic: two evaluations on the same batch gave {first_loss.item():.10g} "
                f"and {second_loss.item():.10g}{hint}. Likely causes: dropout or train-mode BatchNorm with "
                f"eval_mode=False, or randomness inside the model's forward. Use eval_mode=True. {opt_out}"
            )


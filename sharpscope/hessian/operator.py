"""The loss Hessian of a model over fixed evaluation batches, as a matrix-free symmetric operator.

.. math::

    H = \\nabla^2_\\theta L(\\theta), \\qquad L(\\theta) = \\frac{1}{N} \\sum_b n_b \\, L_b(\\theta),

where ``L_b`` is ``loss_fn(model(x_b), y_b)`` (a mean over the ``n_b`` samples of batch ``b``) and
``N = sum_b n_b``. ``H @ v`` is computed by double backward (Pearlmutter 1994): one forward and one
``autograd.grad(create_graph=True)`` per batch, then one more ``autograd.grad`` per vector. For a matrix
``H @ V`` the gradient graph of a batch is built once and reused for every column, so ``k`` vectors cost one
forward/backward plus ``k`` cheap second backward passes per batch (measured in ``benchmarks/bench_hessian.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError

__all__ = ["HessianOperator", "eval_mode", "select_parameters"]

_BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


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


def _batch_size(y: Any, x: Any) -> int:
    for obj in (y, x):
        if isinstance(obj, Tensor) and obj.dim() > 0:
            return int(obj.shape[0])
    raise SharpscopeError(
        f"cannot tell the number of samples in a batch: expected (x, y) with x or y a tensor whose first "
        f"dimension is the batch, got {type(x).__name__} and {type(y).__name__}"
    )


def _unpack(batch: Any) -> tuple[Any, Any]:
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise SharpscopeError(
            f"each batch must be a pair (x, y), got {type(batch).__name__}; wrap your data as a list of "
            "(inputs, labels) tuples or use sharpscope.data.EvalBatches"
        ) from None
    return x, y


class HessianOperator:
    """Matrix-free Hessian of the sample-weighted mean loss of ``model`` over fixed ``batches``.

    Args:
        model: the network; its parameters are read live, so later in-place changes show up in products.
        loss_fn: ``loss_fn(model(x), y) -> 0-d`` mean loss over the batch (e.g. ``nn.CrossEntropyLoss()``).
        batches: any re-iterable of ``(x, y)`` pairs (``sharpscope.data.EvalBatches``, a list of tuples); the
            same samples in the same order on every pass. A one-shot generator is materialised into a list.
        params: the parameters the Hessian is taken with respect to: ``None`` (all that require grad) or a list
            of names / parameter tensors. A subset gives the diagonal block ``H[S, S]`` (per-layer spectra).
        eval_mode: run every product with the model in eval mode (BatchNorm uses running statistics, dropout
            off), restoring each submodule's mode afterwards. ``False`` uses the model as it is.
        check_deterministic: at construction, refuse a setup whose loss is not reproducible (dropout in train
            mode, train-mode BatchNorm, augmentation, a shuffling loader); costs two forward passes.

    Vectors are flat: ``(n,)`` or ``(n, k)`` with ``n = num_params``, laid out as the concatenation of the
    selected parameters (``names`` order) flattened in row-major order. Inputs are cast to the operator's dtype
    and device; the result has the operator's dtype.

    Attributes:
        num_matvecs: Hessian-vector products computed so far (a product with ``(n, k)`` counts ``k``).
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
    ) -> None:
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
        sizes = [_batch_size(*reversed(_unpack(b))) for b in self.batches]
        if not sizes:
            raise SharpscopeError("batches is empty; the Hessian needs at least one (x, y) batch")
        self._batch_sizes = sizes
        self.num_samples = sum(sizes)
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

    def __repr__(self) -> str:
        return (
            f"HessianOperator(num_params={self.num_params}, num_samples={self.num_samples}, "
            f"batches={len(self._batch_sizes)}, dtype={self.dtype}, device={self.device})"
        )

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat ``(n,)`` vector (``names`` order)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat ``(n,)`` vector into parameter-shaped views."""
        return [chunk.view(shape) for chunk, shape in zip(vector.split(self._numels), self._shapes)]

    # --------------------------------------------------------------------------------------------- products
    def _batch_loss(self, x: Any, y: Any) -> Tensor:
        loss = self.loss_fn(self.model(x), y)
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

        Per batch: one forward and one first-order ``autograd.grad`` with ``create_graph=True``, then for each
        column ``autograd.grad(g, params, v_j, retain_graph=True)``; the batch results are combined as
        ``sum_b n_b H_b V / N``.
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
        columns = [self.unflatten(V[:, j]) for j in range(k)]
        with eval_mode(self.model, self.eval_mode), torch.enable_grad():
            for batch, n_b in zip(self.batches, self._batch_sizes):
                x, y = _unpack(batch)
                loss = self._batch_loss(x, y)
                grads = torch.autograd.grad(loss, self.params, create_graph=True)
                weight = n_b / self.num_samples
                for j, v in enumerate(columns):
                    hv = torch.autograd.grad(
                        grads, self.params, grad_outputs=v, retain_graph=j < k - 1, allow_unused=True
                    )
                    flat = torch.cat([
                        (h if h is not None else torch.zeros_like(p)).reshape(-1)
                        for h, p in zip(hv, self.params)
                    ])
                    out[:, j].add_(flat, alpha=weight)
                del grads, loss
        self.num_matvecs += k
        return out[:, 0] if vector else out

    # ---------------------------------------------------------------------------------------------- helpers
    def loss(self) -> Tensor:
        """The sample-weighted mean loss ``L(theta)`` over the batches (0-d, detached)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with eval_mode(self.model, self.eval_mode), torch.no_grad():
            for batch, n_b in zip(self.batches, self._batch_sizes):
                total += self._batch_loss(*_unpack(batch)).to(self.dtype) * (n_b / self.num_samples)
        return total

    def gradient(self) -> Tensor:
        """The flat gradient ``grad L(theta)`` of shape ``(n,)`` (detached; ``.grad`` fields are untouched)."""
        out = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with eval_mode(self.model, self.eval_mode), torch.enable_grad():
            for batch, n_b in zip(self.batches, self._batch_sizes):
                grads = torch.autograd.grad(self._batch_loss(*_unpack(batch)), self.params, allow_unused=True)
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

        Checks (two forward passes, no backward): the first batch is the same tensor on two passes over
        ``batches`` (catches shuffling loaders and augmentation), and the loss on it evaluates identically
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
        first = _unpack(next(iter(self.batches)))
        second = _unpack(next(iter(self.batches)))
        if not all(_same(a, b) for a, b in zip(first, second)):
            raise SharpscopeError(
                "the batches are not deterministic: two passes gave a different first batch. Likely causes: a "
                "shuffling DataLoader, data augmentation, or a sampler. Use fixed evaluation batches "
                "(sharpscope.data.eval_batches / EvalBatches.from_tensors) or a list of (x, y) tensors. "
                + opt_out
            )
        with eval_mode(self.model, self.eval_mode), torch.no_grad():
            first_loss = self._batch_loss(*first).detach()
            second_loss = self._batch_loss(*first).detach()
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


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a is b or a == b

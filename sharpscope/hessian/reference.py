"""The slow truth: the dense Hessian of a small network and its exact eigenvalues (STYLE.md 2).

Every fast path in :mod:`sharpscope.hessian` is tested against these in float64 on tiny models. The dense
Hessian is built by an independent route, ``torch.func.jvp`` of ``torch.func.grad`` vmapped over the unit
vectors (forward-over-reverse, what ``torch.func.hessian`` does, in chunks) of a function of one
flat parameter vector through ``torch.func.functional_call``, so it shares no code with the double-backward
products of :class:`~sharpscope.hessian.operator.HessianOperator`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.hessian.operator import _batch_size, _materialize, _unpack, select_parameters
from sharpscope.hessian.operator import eval_mode as _eval_mode

__all__ = ["dense_hessian", "exact_eigenvalues"]


def dense_hessian(
    model: nn.Module,
    loss_fn: Any,
    batches: Iterable[Any],
    params: Sequence[str | nn.Parameter | Tensor] | None = None,
    *,
    eval_mode: bool = True,
    max_params: int = 5000,
    chunk_size: int | None = None,
) -> Tensor:
    """The dense Hessian ``(n, n)`` of the sample-weighted mean loss ``sum_b n_b L_b / sum_b n_b``.

    Args:
        model, loss_fn, batches, params: as for :class:`~sharpscope.hessian.operator.HessianOperator`
            (``params`` selects a diagonal block). Parameters outside ``params`` and buffers stay fixed.
        eval_mode: evaluate with the model in eval mode (restored afterwards), as the operator does by default.
        max_params: refuse larger selections: the matrix takes ``8 n^2`` bytes in float64 and ``n`` vmapped
            forward passes.
        chunk_size: columns per vmapped pass (``None``: all ``n`` at once); smaller bounds memory at
            ``chunk_size`` copies of the network's activations.

    Returns:
        The symmetric Hessian in the parameters' dtype (use a float64 model for ground truth), rows and columns
        in the operator's flat layout (``named_parameters`` order, each tensor flattened row-major).

    Raises:
        SharpscopeError: if the selection has more than ``max_params`` entries or ``batches`` is empty.
    """
    names, tensors = select_parameters(model, params)
    n = sum(t.numel() for t in tensors)
    if n > max_params:
        raise SharpscopeError(
            f"dense_hessian is for tiny models: {n} parameters selected, more than max_params={max_params} "
            f"(the matrix alone would take {8 * n * n / 2**30:.1f} GiB in float64); select a subset with params= "
            "or raise max_params"
        )
    batches = list(_materialize(batches))
    if not batches:
        raise SharpscopeError("batches is empty; the Hessian needs at least one (x, y) batch")
    sizes = [_batch_size(y, x) for x, y in map(_unpack, batches)]
    total = sum(sizes)
    shapes = [t.shape for t in tensors]
    numels = [t.numel() for t in tensors]
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in names}
    fixed.update(dict(model.named_buffers()))

    def loss_of(flat: Tensor) -> Tensor:
        chosen = {name: chunk.view(shape) for name, chunk, shape in zip(names, flat.split(numels), shapes)}
        value = flat.new_zeros(())
        for (x, y), n_b in zip(map(_unpack, batches), sizes):
            output = torch.func.functional_call(model, {**fixed, **chosen}, (x,))
            value = value + loss_fn(output, y) * (n_b / total)
        return value

    theta = torch.cat([t.detach().reshape(-1) for t in tensors])
    with _eval_mode(model, eval_mode), warnings.catch_warnings():
        # torch registers its forward-mode decompositions through torch.jit.script on first use, which warns.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        gradient = torch.func.jacrev(loss_of)  # (torch.func.grad trips a ZeroTensor error under jvp for MSELoss)

        def column(direction: Tensor) -> Tensor:  # H e_i = d/dt grad(theta + t e_i), forward over reverse
            return torch.func.jvp(gradient, (theta,), (direction,))[1]

        step = chunk_size or n
        rows = []
        for start in range(0, n, step):
            count = min(step, n - start)
            directions = theta.new_zeros(count, n)
            directions[torch.arange(count), start + torch.arange(count)] = 1
            rows.append(torch.func.vmap(column)(directions))
        hessian = torch.cat(rows)
    return hessian.detach()


def exact_eigenvalues(
    model: nn.Module,
    loss_fn: Any,
    batches: Iterable[Any],
    params: Sequence[str | nn.Parameter | Tensor] | None = None,
    *,
    eval_mode: bool = True,
    max_params: int = 5000,
    chunk_size: int | None = None,
) -> Tensor:
    """All eigenvalues of :func:`dense_hessian`, ascending, in float64 (``torch.linalg.eigvalsh``)."""
    hessian = dense_hessian(model, loss_fn, batches, params, eval_mode=eval_mode, max_params=max_params,
                            chunk_size=chunk_size)
    hessian = hessian.to(torch.float64)
    return torch.linalg.eigvalsh((hessian + hessian.T) / 2)

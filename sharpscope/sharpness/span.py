r"""Worst-case ascent with a Linear layer's per-chunk perturbations kept in the span of the chunk's gradients.

For p = 2 without ASAM, from the zero start, every point of the ascent (:func:`sharpscope.sharpness.worst_case.ascend`)
is a linear combination of the gradients it has evaluated: a step adds a multiple of the gradient, the projection
and the momentum combine iterates, a restart returns to an earlier one. A Linear weight's gradient for chunk
``c`` is ``g = O^T X``, with ``X (R, in)`` the layer's input rows of that chunk (``R = m`` samples) and ``O (R, out)``
their output gradients, so all the ascent needs of that layer is held by:

* the chunk's *history*: the factor rows ``X_i``, ``O_i`` of every gradient evaluated so far, and their Gram matrix
  ``K_ij = <O_i^T X_i, O_j^T X_j>_F = sum((X_i X_j^T) * (O_i O_j^T))``;
* for each point, its coefficients ``a (k,)`` over the history: the perturbation is ``D = sum_i a_i O_i^T X_i``,
  its squared norm ``a^T K a``, and a combination of points is the same combination of coefficients;
* the perturbed layer, ``x (W + D)^T = x W^T + (x X^T) diag(a) O`` (stacked over the history), and its input
  gradient ``go (W + D) = go W + (go O^T) diag(a) X``. Its backward records ``(x, go)`` as the next history entry.

At ``m = 1`` each entry is one row of each factor: the digits ConvNet's 256 -> 128 layer (62% of its weights) then
costs ``k (256 + 128)`` numbers per chunk instead of ``256 x 128``, and its share of the ascent's memory traffic
(~18 passes over the ``(chunks, weights)`` stacks per step) vanishes. :class:`SpanBasis` holds the histories of one
group of chunks; the ascent keeps a ``(G, capacity)`` coefficient stack where the dense path keeps ``(G, out, in)``.
The norm is a sum of products of both signs: its rounding is relative to ``sum |a_i a_j K_ij|`` rather than to
``a^T K a``; the tests compare the values with the dense ascent in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SpanBasis", "SpanRefused", "worth_it"]


class SpanRefused(Exception):
    """The factored ascent cannot go on (an input of another shape, an overflow): run the group densely."""


def worth_it(entries: int, rows: int, fan_in: int, fan_out: int) -> bool:
    """Whether ``entries`` history entries of ``rows`` rows hold well under the layer's ``fan_in x fan_out`` weights
    (the factors, their Gram products and the perturbed layer's extra matmuls then cost less than the dense stack's
    passes)."""
    return 2 * entries * rows * (fan_in + fan_out) <= fan_in * fan_out


class SpanBasis:
    """The gradient histories of the factored Linear weights for one group of ``G`` chunks (see the module docstring).

    ``slots`` maps the objective's parameter index of each factored weight to its ``(fan_in, fan_out)``; ``capacity``
    is the most gradients one ascent evaluates; ``rows`` the input rows per chunk (``m``).
    """

    def __init__(self, slots: dict[int, tuple[int, int]], *, capacity: int, rows: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.slots = dict(slots)
        self.capacity = capacity
        self.rows = rows
        self.dtype = dtype
        self.device = device
        self.group = 0  # chunks the buffers hold
        self._active = 0  # chunks of the current group (start)
        self.count = 0  # history entries recorded (the same for every slot: one per gradient evaluation)
        self._recorded: set[int] = set()
        self._inputs: dict[int, Tensor] = {}
        self._grads: dict[int, Tensor] = {}
        self._gram: dict[int, Tensor] = {}

    def stacked_size(self, params: Sequence[Tensor], copies: int) -> int:
        """Numbers per chunk that size the ascent's groups like ``sum(p.numel())`` does for dense stacks: the
        dense weights, plus the factored weights' histories, Gram matrices and coefficient stacks spread over the
        ``copies`` stacks the dense count is multiplied by."""
        dense = sum(p.numel() for i, p in enumerate(params) if i not in self.slots)
        cap = self.capacity
        history = sum(cap * self.rows * (fan_in + fan_out) + cap * cap for fan_in, fan_out in self.slots.values())
        return dense + -(-history // copies) + cap * len(self.slots)

    def start(self, group: int) -> None:
        """An empty history for a group of ``group`` chunks (buffers kept across groups of at most the same size)."""
        if group > self.group:
            self.group = group
            cap, r = self.capacity, self.rows
            for slot, (fan_in, fan_out) in self.slots.items():
                self._inputs[slot] = torch.zeros(group, cap * r, fan_in, dtype=self.dtype, device=self.device)
                self._grads[slot] = torch.zeros(group, cap * r, fan_out, dtype=self.dtype, device=self.device)
                self._gram[slot] = torch.zeros(group, cap, cap, dtype=self.dtype, device=self.device)
        self._active = group
        self.count = 0
        self._recorded = set()

    def zeros(self, count: int) -> Tensor:
        """A ``(count, capacity)`` coefficient stack (the zero perturbation)."""
        return torch.zeros(count, self.capacity, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------------------ history
    def _views(self, slot: int) -> tuple[Tensor, Tensor]:
        k, g, r = self.count, self._active, self.rows
        return self._inputs[slot][:g, :k * r], self._grads[slot][:g, :k * r]

    def record(self, slot: int, x: Tensor, go: Tensor) -> None:
        """Append chunk-wise factor rows ``x (G, R, in)``, ``go (G, R, out)`` of the gradient just evaluated."""
        if slot in self._recorded:
            raise SpanRefused("a factored layer ran twice in one pass")
        k, g, r = self.count, self._active, self.rows
        if k >= self.capacity or x.shape[0] != g or x.shape[1] != r:
            raise SpanRefused(f"history entry {k} of shape {tuple(x.shape)} does not fit ({g} chunks of {r} rows, "
                              f"capacity {self.capacity})")
        inputs, grads, gram = self._inputs[slot], self._grads[slot], self._gram[slot]
        inputs[:g, k * r:(k + 1) * r] = x
        grads[:g, k * r:(k + 1) * r] = go
        products = (torch.bmm(x, inputs[:g, :(k + 1) * r].transpose(1, 2))
                    * torch.bmm(go, grads[:g, :(k + 1) * r].transpose(1, 2)))  # (G, R, (k + 1) R)
        row = products.reshape(g, r, k + 1, r).sum(dim=(1, 3))  # (G, k + 1): <g_k, g_i>
        gram[:g, k, :k + 1] = row
        gram[:g, :k + 1, k] = row
        self._recorded.add(slot)

    def finish_gradient(self) -> Tensor:
        """After a gradient evaluation recorded every slot: the one-hot coefficients ``(G, capacity)`` of the new
        entry (the gradient itself, in the span's coordinates)."""
        if self._recorded != set(self.slots):
            raise SpanRefused("a factored layer did not run in the backward pass")
        self.count += 1
        self._recorded = set()
        one_hot = self.zeros(self._active)
        one_hot[:, self.count - 1] = 1.0
        return one_hot

    # ---------------------------------------------------------------------------------------------- geometry
    def squared_norms(self, slot: int, coefs: Tensor) -> Tensor:
        """``(G,)``: ``a^T K a`` for the coefficients ``coefs (G, capacity)`` (never negative)."""
        k = self.count
        if k == 0:
            return torch.zeros(coefs.shape[0], dtype=self.dtype, device=self.device)
        a = coefs[:, :k]
        gram = self._gram[slot][:coefs.shape[0], :k, :k]
        return torch.bmm(torch.bmm(a[:, None, :], gram), a[:, :, None]).reshape(-1).clamp(min=0.0)

    def _row_weights(self, coefs: Tensor) -> Tensor:
        """``(G, k R)``: each history entry's coefficient repeated over its ``R`` rows."""
        return coefs[:, :self.count].repeat_interleave(self.rows, dim=1)

    def dense(self, slot: int, coefs: Tensor) -> Tensor:
        """The perturbations ``sum_i a_i O_i^T X_i`` as a ``(G, out, in)`` stack."""
        inputs, grads = self._views(slot)
        g = coefs.shape[0]
        return torch.bmm((grads[:g] * self._row_weights(coefs)[:, :, None]).transpose(1, 2), inputs[:g])

    def apply(self, slot: int, x: Tensor, coefs: Tensor) -> Tensor:
        """``x_c D_c^T`` for ``x (G, n, in)``: the perturbed layer's correction, ``(G, n, out)``, recording the
        gradient's factors in the backward (when ``coefs`` requires grad)."""
        return _SpanCorrection.apply(x, coefs, self, slot)

    def correction(self, slot: int, x: Tensor, coefs: Tensor) -> Tensor:
        """``x_c D_c^T = (x_c X^T) diag(a) O`` for ``x (G, n, in)``: ``(G, n, out)``."""
        inputs, grads = self._views(slot)
        return self._through(x, inputs, grads, coefs)

    def correction_input_grad(self, slot: int, go: Tensor, coefs: Tensor) -> Tensor:
        """``go_c D_c = (go_c O^T) diag(a) X`` for ``go (G, n, out)``: ``(G, n, in)``."""
        inputs, grads = self._views(slot)
        return self._through(go, grads, inputs, coefs)

    def _through(self, t: Tensor, first: Tensor, second: Tensor, coefs: Tensor) -> Tensor:
        if self.count == 0:
            return t.new_zeros(t.shape[0], t.shape[1], second.shape[-1])
        return torch.bmm(torch.bmm(t, first.transpose(1, 2)) * self._row_weights(coefs)[:, None, :], second)


class _SpanCorrection(torch.autograd.Function):
    """``x_c D_c^T`` with ``D_c`` held by a :class:`SpanBasis`; the backward gives ``dL/dx`` and records
    ``(x, go)``, the factors of ``dL/dD_c = go_c^T x_c``, as the basis's next entry (no gradient for the
    coefficients: the ascent takes the new entry as the gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, coefs: Tensor, basis: SpanBasis, slot: int) -> Tensor:
        ctx.basis, ctx.slot = basis, slot
        ctx.save_for_backward(x, coefs)
        return basis.correction(slot, x, coefs)

    @staticmethod
    def backward(ctx, go: Tensor):
        x, coefs = ctx.saved_tensors
        basis: SpanBasis = ctx.basis
        go = go.contiguous()
        basis.record(ctx.slot, x.detach(), go)
        grad_x = basis.correction_input_grad(ctx.slot, go, coefs) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def squared_norms(basis: SpanBasis | None, tensors: Sequence[Tensor]) -> Tensor:
    """``(G,)`` squared l2 norms over all ``tensors`` of each chunk, the coefficient stacks of ``basis``'s slots
    measured with its Gram matrices (``basis`` None: all dense)."""
    total = None
    for i, t in enumerate(tensors):
        if basis is not None and i in basis.slots:
            part = basis.squared_norms(i, t)
        else:
            part = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square()
        total = part if total is None else total + part
    assert total is not None
    return total

r"""A Linear layer's per-micro-batch weight gradients kept as their factors, for the m-SAM step.

In the m-SAM clean pass the gradient of a Linear weight for micro-batch ``j`` is ``g_j = O_j^T X_j``: ``X_j``
``(R, in)`` are the layer's input rows of that micro-batch (``R = m`` samples, times the sequence length for a
sequence input) and ``O_j`` ``(R, out)`` the output gradients. Where ``R (in + out)`` is well below ``in out`` the
factors are much smaller than the ``(G, out, in)`` stack (the digits ConvNet's 256 -> 128 layer, m = 8: 3k against 33k
numbers per micro-batch), and what the step does with ``g_j`` needs only them:

* the squared norm (for the joint norm of ``eps_j``): ``||O_j^T X_j||_F^2 = <X_j X_j^T, O_j O_j^T>_F``, two
  ``(R, R)`` Gram matrices;
* the perturbation for p = 2 without ASAM, ``E_j = c_j g_j`` with ``c_j = rho / ||g_j||`` (the joint norm over
  all tensors), is the same factors with ``O_j`` scaled by ``c_j``;
* the perturbed layer, ``x_j (W + E_j)^T = x_j W^T + (x_j X_j^T) (c_j O_j)``, and its input gradient,
  ``go_j (W + E_j) = go_j W + (go_j (c_j O_j)^T) X_j``: the layer's own matmul plus ``(R, R)`` products. The live
  ``W`` receives ``sum_j go_j^T x_j``, the ordinary weight gradient of all rows.

So the stack ``g_j``, ``eps_j`` and ``W + E_j`` of such a layer is never formed. Other p, ASAM and loss scaling
(which reads every clean gradient) take the dense stack (:meth:`LowRank.dense`). The Gram form sums products of
both signs, so its rounding is relative to ``sum |(x_a . x_b)(o_a . o_b)|`` rather than to the norm itself; the
norm only sets the length of ``eps`` (not its direction), and the tests compare the step with the loop in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sharpscope.optim.perturbation import per_row, plain_norm_is_safe, row_norms

__all__ = ["LowRank", "Scaled", "joint_perturbation", "shifted", "worth_it"]


def weight_gradient(x: Tensor, go: Tensor) -> Tensor:
    """``go_j^T x_j`` per micro-batch: ``x (G, R, in)``, ``go (G, R, out)`` -> contiguous ``(G, out, in)``.

    The matmul runs in the orientation with the longer output rows: for few inputs (a convolution's windows of one
    channel: 9 columns) ``(x^T go)^T`` is ~4x faster, for more inputs than outputs ``go^T x`` is ~10x faster than
    that (one thread; the Linear 256 -> 128 of the digits ConvNet, 16 micro-batches of 8)."""
    if x.shape[-1] < go.shape[-1]:
        return torch.bmm(x.transpose(1, 2), go).transpose(1, 2).contiguous()
    return torch.bmm(go.transpose(1, 2), x)


#: Layers with fewer weights keep the dense stack: their factors' dozen extra small kernels (Gram matrices, factor
#: products in both passes) cost more than the stack's few thousand numbers. Whole m-SAM steps, interleaved, one
#: thread, digits ConvNet at batch 16 (m = 4): its last Linear (128 -> 10, 1,280 weights) dense took 0.95-0.98x
#: the factored step's time; its first (256 -> 128) dense took 1.03-1.04x.
LOW_RANK_MIN_WEIGHTS = 1 << 12


def worth_it(rows: int, fan_in: int, fan_out: int) -> bool:
    """Whether ``rows`` rows per micro-batch make the factors of a ``fan_in -> fan_out`` layer worth keeping: a
    layer of at least :data:`LOW_RANK_MIN_WEIGHTS` weights whose Gram matrices and factor products (``~rows^2 (in +
    out)`` per micro-batch) are under half the dense stack's ``rows in out`` multiply-adds."""
    weights = fan_in * fan_out
    return weights >= LOW_RANK_MIN_WEIGHTS and 2 * rows * (fan_in + fan_out) <= weights


@dataclass(frozen=True)
class LowRank:
    """``G`` matrices ``O_j^T X_j``, ``(G, out, in)``, held as their factors (see the module docstring)."""

    inputs: Tensor  # (G, R, in): X_j, the layer's input rows of micro-batch j
    grads: Tensor  # (G, R, out): O_j, the output gradients of those rows (times c_j in a perturbation)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.inputs.shape[0], self.grads.shape[-1], self.inputs.shape[-1]))

    def dense(self) -> Tensor:
        """The ``(G, out, in)`` stack."""
        return weight_gradient(self.inputs, self.grads)

    def squared_norms(self) -> Tensor:
        """``(G,)``: ``||O_j^T X_j||_F^2 = <X_j X_j^T, O_j O_j^T>_F``."""
        x_gram = torch.bmm(self.inputs, self.inputs.transpose(1, 2))
        o_gram = torch.bmm(self.grads, self.grads.transpose(1, 2))
        return (x_gram * o_gram).sum(dim=(1, 2))

    def scaled(self, coefs: Tensor) -> LowRank:
        """``c_j O_j^T X_j`` for ``coefs (G,)``."""
        return LowRank(self.inputs, self.grads * coefs[:, None, None])


@dataclass(frozen=True)
class Scaled:
    """``G`` dense perturbations ``c_j g_j``, ``(G, ...)``, kept as the stack ``g`` and the coefficients ``c (G,)``:
    what the perturbed pass does with them is ``w + c_j g_j`` (:func:`shifted`), one kernel instead of a product
    and a sum (and no stack written in between)."""

    tensor: Tensor  # (G, ...): g_j
    coefs: Tensor  # (G,): c_j

    def dense(self) -> Tensor:
        """The ``(G, ...)`` stack ``c_j g_j``."""
        return self.tensor * per_row(self.coefs, self.tensor)

    def rearranged(self, layout: Callable[[Tensor], Tensor]) -> Scaled:
        """The same perturbations with ``layout`` (a view, e.g. a convolution weight's row order) applied to ``g``."""
        return Scaled(layout(self.tensor), self.coefs)


def shifted(t: Tensor, offset: Tensor | Scaled, out: Tensor | None = None) -> Tensor:
    """``t + offset``: a shared tensor plus ``G`` per-micro-batch offsets, ``(G, *t.shape)`` (into ``out`` if
    given, which then also sets the result's memory layout)."""
    if isinstance(offset, Scaled):
        return torch.addcmul(t, offset.tensor, per_row(offset.coefs, offset.tensor), out=out)
    return torch.add(t, offset, out=out)


@torch.no_grad()
def joint_perturbation(grads: list[Tensor | LowRank], rhos: list[float | Tensor]
                       ) -> list[Scaled | LowRank] | None:
    """``eps_j = rho_i g_ij / ||g_j||_2`` (p = 2, no ASAM; one joint norm per micro-batch over all tensors) for
    stacked gradients ``(G, ...)``, factored ones staying factored and dense ones as :class:`Scaled` (the product is
    taken where the perturbed pass adds them to the weights); None where the plain norm is not safe.

    The plain norm is used as in :func:`~sharpscope.optim.perturbation.stacked_joint_perturbation`'s CPU path: only
    when every row's norm is finite and above ``sqrt(tiny) / eps`` of the dtype (a host check, free on the CPU);
    otherwise (and off the CPU) None, and the caller takes the dense stacks and the rescaled formula.
    """
    first = grads[0].grads if isinstance(grads[0], LowRank) else grads[0]
    if first.device.type != "cpu":
        return None
    norms = [g.squared_norms().sqrt() if isinstance(g, LowRank) else row_norms(g) for g in grads]
    norm = torch.linalg.vector_norm(torch.stack(norms), 2.0, dim=0)
    if not plain_norm_is_safe(norm):
        return None
    inverse = norm.reciprocal()
    coefs: dict[float | Tensor, Tensor] = {}  # per radius (usually one for all tensors)
    eps: list[Scaled | LowRank] = []
    for g, rho in zip(grads, rhos):
        c = coefs.get(rho)
        if c is None:
            c = coefs[rho] = inverse * rho
        eps.append(g.scaled(c) if isinstance(g, LowRank) else Scaled(g, c))
    return eps


class PerturbedLinear(torch.autograd.Function):
    """Rows of ``G`` equal micro-batches through ``W + E_j`` with ``E_j = O_j^T X_j`` factored (a :class:`LowRank`):
    ``x_j W^T + (x_j X_j^T) O_j + (b + e_j)``.

    ``biases (G, out)`` are the constants ``b + e_j`` (or None: then ``bias`` as is); the live ``weight`` and
    ``bias`` receive ``sum_j`` of the micro-batches' gradients, the ordinary ``go^T x`` and ``sum go`` over all
    rows. ``dL/dx_j = go_j W + (go_j O_j^T) X_j``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, biases, factor_inputs, factor_grads):
        groups = factor_inputs.shape[0]
        ctx.save_for_backward(x, weight, factor_inputs, factor_grads)
        out = F.linear(x, weight, bias if biases is None else None)
        rows = out.reshape(groups, -1, out.shape[-1])
        if biases is not None:
            rows = rows + biases[:, None, :]
        xv = x.reshape(groups, -1, x.shape[-1])
        rows = torch.baddbmm(rows, torch.bmm(xv, factor_inputs.transpose(1, 2)), factor_grads)
        return rows.reshape(out.shape)

    @staticmethod
    def backward(ctx, go):
        x, weight, factor_inputs, factor_grads = ctx.saved_tensors
        groups = factor_inputs.shape[0]
        go_rows = go.reshape(-1, go.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gov = go.reshape(groups, -1, go.shape[-1])
            grad_x = torch.baddbmm(gov.matmul(weight), torch.bmm(gov, factor_grads.transpose(1, 2)), factor_inputs)
            grad_x = grad_x.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(x.reshape(1, -1, x.shape[-1]), go_rows[None])[0]
        if ctx.needs_input_grad[2]:
            grad_b = go_rows.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None

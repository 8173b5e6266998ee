"""Autograd kernels shared by the per-chunk (m-sharpness) and per-micro-batch (m-SAM) paths."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ChunkLinear"]


class ChunkLinear(torch.autograd.Function):
    """``x_c D_c^T`` for every chunk ``c``: ``x (G, n, in)``, ``D (G, out, in)`` -> ``(G, n, out)`` (``torch.bmm``).

    The same numbers as ``torch.bmm(x, D.transpose(1, 2))`` under autograd, with the backward written out so both
    gradients come back contiguous and from fast kernels: ``dL/dD_c = go_c^T x_c`` (an outer product by
    broadcasting for ``n = 1``) and ``dL/dx_c = go_c D_c``. Autograd's own backward of that ``bmm`` returned
    ``dL/dD`` transposed (every later per-chunk op of the m-sharpness ascent on that layout ran ~10x slower) and
    formed ``dL/dx`` from a transposed batched matrix-vector product; together they were the largest cost of the
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

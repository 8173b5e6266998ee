"""Factored per-micro-batch Linear gradients (sharpscope.optim.low_rank) against their dense stacks, in float64.

Every quantity has a dense counterpart computed the plain way: the stack ``O_j^T X_j`` by explicit outer products,
its norm by summing squares, ``eps`` by :func:`stacked_joint_perturbation`, the perturbed layer by a batched
matmul with ``W + E_j``. Float64 sums of a few hundred terms agree to ~1e-15 relative; 1e-12 leaves room for the
Gram form's cancellation (products of both signs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharpscope.optim.low_rank import (
    LowRank,
    PerturbedLinear,
    Scaled,
    joint_perturbation,
    shifted,
    weight_gradient,
    worth_it,
)
from sharpscope.optim.perturbation import stacked_joint_perturbation

DT = torch.float64
RTOL, ATOL = 1e-12, 1e-14


def factors(groups=3, rows=4, fan_in=7, fan_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(groups, rows, fan_in, generator=g, dtype=DT),
                   torch.randn(groups, rows, fan_out, generator=g, dtype=DT))


def explicit(lr: LowRank) -> torch.Tensor:
    """sum over rows r of outer(o_r, x_r), per micro-batch."""
    return torch.stack([sum(torch.outer(o, x) for o, x in zip(lr.grads[j], lr.inputs[j]))
                        for j in range(lr.inputs.shape[0])])


@pytest.mark.parametrize(("fan_in", "fan_out"), [(7, 5), (3, 9)], ids=["in>out", "in<out"])
def test_dense_and_squared_norms_are_the_stacks(fan_in, fan_out):
    lr = factors(fan_in=fan_in, fan_out=fan_out)
    dense = explicit(lr)
    assert lr.shape == dense.shape
    torch.testing.assert_close(lr.dense(), dense, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(weight_gradient(lr.inputs, lr.grads), dense, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lr.squared_norms(), dense.square().sum(dim=(1, 2)), rtol=RTOL, atol=0)
    coefs = torch.tensor([0.5, -2.0, 3.0], dtype=DT)
    torch.testing.assert_close(lr.scaled(coefs).dense(), dense * coefs[:, None, None], rtol=RTOL, atol=ATOL)


def test_shifted_adds_scaled_offsets_as_their_product():
    g = torch.Generator().manual_seed(2)
    w, stack, coefs = (torch.randn(*shape, generator=g, dtype=DT) for shape in ((4, 3), (5, 4, 3), (5,)))
    want = w + stack * coefs[:, None, None]
    torch.testing.assert_close(shifted(w, Scaled(stack, coefs)), want, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(Scaled(stack, coefs).dense(), stack * coefs[:, None, None], rtol=0, atol=0)
    out = torch.empty(5, 3, 4, dtype=DT).transpose(1, 2)  # the result takes out's layout
    assert shifted(w, Scaled(stack, coefs), out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(shifted(w, stack), w + stack, rtol=0, atol=0)
    rows = Scaled(stack, coefs).rearranged(lambda t: t.transpose(1, 2))
    torch.testing.assert_close(rows.dense(), (stack * coefs[:, None, None]).transpose(1, 2), rtol=0, atol=0)


def test_joint_perturbation_is_stacked_joint_perturbation_of_the_dense_stacks():
    g = torch.Generator().manual_seed(1)
    lr = factors()
    bias = torch.randn(3, 5, generator=g, dtype=DT)
    conv = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=DT)
    rhos = [0.05, torch.tensor(0.1, dtype=DT), 0.2]  # a scheduled rho is a tensor
    eps = joint_perturbation([lr, bias, conv], rhos)
    assert eps is not None and isinstance(eps[0], LowRank) and all(isinstance(e, Scaled) for e in eps[1:])
    dense = [lr.dense(), bias, conv]
    params = [torch.zeros(t.shape[1:], dtype=DT) for t in dense]  # read only by ASAM
    want = stacked_joint_perturbation(dense, params, rhos=rhos, p=2.0, adaptive=[False] * 3, etas=[0.0] * 3)
    got = [e.dense() for e in eps]
    for a, ref in zip(got, want):
        torch.testing.assert_close(a, ref, rtol=RTOL, atol=ATOL)
    # each row's joint norm is rho (one ball per micro-batch over all tensors)
    flat = torch.cat([(e / r).reshape(3, -1) for e, r in zip(got, rhos)], dim=1)
    torch.testing.assert_close(flat.norm(dim=1), torch.ones(3, dtype=DT), rtol=RTOL, atol=0)


@pytest.mark.parametrize("bad", ["zero row", "overflow"])
def test_joint_perturbation_declines_where_the_plain_norm_is_not_safe(bad):
    lr = factors()
    other = torch.ones(3, 2, dtype=DT)
    if bad == "zero row":  # micro-batch 1 has a zero gradient
        mask = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
        lr, other = LowRank(lr.inputs, lr.grads * mask[:, None, None]), other * mask[:, None]
    else:
        lr = LowRank(lr.inputs, lr.grads * 1e160)  # the squared norm overflows float64
    assert joint_perturbation([lr, other], [0.1, 0.1]) is None


def test_worth_it_compares_the_factors_with_the_dense_stack():
    assert worth_it(8, 256, 128)  # the digits ConvNet's first Linear at m = 8
    assert not worth_it(8, 128, 10)  # its last Linear: the stack is smaller than the factors' work
    assert worth_it(4, 20, 256) and not worth_it(12, 20, 256)
    assert not worth_it(1, 40, 40)  # too few weights for the factors' extra kernels (LOW_RANK_MIN_WEIGHTS)
    assert worth_it(16, 64, 64)  # 2 * 16 * (64 + 64) == 64 * 64 == LOW_RANK_MIN_WEIGHTS: both bounds inclusive


@pytest.mark.parametrize("with_biases", [True, False], ids=["per-micro-batch-bias", "shared-bias"])
def test_perturbed_linear_is_the_layer_with_w_plus_e_j(with_biases):
    groups, rows, fan_in, fan_out = 3, 4, 7, 5
    g = torch.Generator().manual_seed(2)
    eps = factors(groups, rows, fan_in, fan_out, seed=3).scaled(torch.tensor([0.1, 0.2, 0.3], dtype=DT))
    x = torch.randn(groups * rows, fan_in, generator=g, dtype=DT, requires_grad=True)
    weight = torch.randn(fan_out, fan_in, generator=g, dtype=DT, requires_grad=True)
    bias = torch.randn(fan_out, generator=g, dtype=DT, requires_grad=True)
    biases = (bias.detach() + torch.randn(groups, fan_out, generator=g, dtype=DT)) if with_biases else None

    out = PerturbedLinear.apply(x, weight, bias, biases, eps.inputs, eps.grads)
    stack = weight.detach() + eps.dense()
    xs = x.detach().reshape(groups, rows, fan_in)
    want = torch.stack([F.linear(xs[j], stack[j], biases[j] if with_biases else bias.detach())
                        for j in range(groups)]).reshape(out.shape)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    # gradients: x through W + E_j; W and b the sum over micro-batches of theirs (E_j and b + e_j are constants,
    # so with per-micro-batch biases the forward does not read b: its gradient is the contract, checked below)
    inputs = (x, weight, bias)
    checked = inputs[:2] if with_biases else inputs
    rest = inputs[2:] if with_biases else ()
    torch.autograd.gradcheck(lambda *t: PerturbedLinear.apply(*t, *rest, biases, eps.inputs, eps.grads), checked)
    go = torch.randn(out.shape, generator=g, dtype=DT)
    got = torch.autograd.grad(out, inputs, go)
    gs = go.reshape(groups, rows, fan_out)
    want_x = torch.stack([gs[j] @ stack[j] for j in range(groups)]).reshape(x.shape)
    want_w = go.T @ x.detach()
    want_b = go.sum(dim=0)
    for a, b in zip(got, (want_x, want_w, want_b)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)

"""Interpolation between checkpoints and the plane through three."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.landscape import evaluate, grid, interpolate, loss_barrier, loss_surface, plane_through

from .conftest import image_batches, serial_loss, tiny_convnet


def _blend(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    """Serial reference: every float tensor of the state dict (BN statistics included) at a + t (b - a)."""
    out = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    out.load_state_dict({k: (v + t * (sb[k] - v)) if v.is_floating_point() else v for k, v in sa.items()})
    return out.eval()


def test_interpolation_endpoints_and_midpoint():
    a, b = tiny_convnet(seed=0), tiny_convnet(seed=1)
    assert not torch.equal(a[1].running_var, b[1].running_var)
    batches = image_batches()
    ce = nn.CrossEntropyLoss()
    alphas = grid(-0.5, 1.5, 9)  # -0.5, -0.25, 0, ..., 1.5
    curve = interpolate(a, b, ce, batches, alphas=alphas)
    la, lb = evaluate(a, ce, batches).loss, evaluate(b, ce, batches).loss
    assert curve.loss[2] == la  # t = 0 is model a bit for bit
    # t = 1 is w_a + (w_b - w_a): each weight within ~1 ulp of w_b, loss within ~1e-7 relative (float32)
    assert curve.loss[6] == pytest.approx(lb, rel=1e-6)
    mid, _ = serial_loss(_blend(a, b, 0.5), ce, batches)
    assert curve.loss[4] == pytest.approx(mid, rel=1e-6)  # BN statistics interpolated too
    params_only = interpolate(a, b, ce, batches, alphas=[1.0], include_buffers=False)
    # a's BN statistics with b's weights is neither model: far more than the 1e-7 rounding of t = 1 above
    assert abs(params_only.loss[0] - lb) > 1e-5


def test_plane_through_three_models():
    a, b, c = (tiny_convnet(seed=s) for s in (0, 1, 2))
    basis = plane_through(a, b, c)
    assert abs(basis.d1.cosine(basis.d2)) < 1e-6  # Gram-Schmidt: orthogonal (float32 tensors)
    assert basis.d2.norm_value() == pytest.approx(basis.d1.norm_value(), rel=1e-6)
    batches = image_batches()
    ce = nn.CrossEntropyLoss()
    xs, ys = basis.coords[:, 0], basis.coords[:, 1]
    surface = loss_surface(a, ce, batches, directions=(basis.d1, basis.d2), coords=(xs, ys))
    for k, model in enumerate((a, b, c)):
        # the diagonal point (xs[k], ys[k]) is model k; c is reached through float32 Gram-Schmidt: 1e-5
        assert surface.loss[k, k] == pytest.approx(evaluate(model, ce, batches).loss, rel=1e-5), k


def test_plane_errors():
    a, b = tiny_convnet(seed=0), tiny_convnet(seed=1)
    with pytest.raises(SharpscopeError, match="models a and b are identical"):
        plane_through(a, a, b)
    midpoint = _blend(a, b, 0.5)
    with pytest.raises(SharpscopeError, match="lie on one line"):
        plane_through(a, b, midpoint)
    assert np.isfinite(plane_through(a, b, tiny_convnet(seed=3)).coords).all()


def test_loss_barrier_is_the_max_on_the_path_minus_the_higher_endpoint():
    ts = np.array([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    loss = np.array([9.0, 0.2, 0.7, 1.1, 0.4, 0.3, 7.0])  # the rim outside [0, 1] does not count
    b = loss_barrier(ts, loss)
    assert (b.barrier, b.t, b.max_loss, b.loss_start, b.loss_end) == pytest.approx((1.1 - 0.3, 0.5, 1.1, 0.2, 0.3))
    monotone = loss_barrier(ts, np.array([5.0, 1.0, 0.8, 0.6, 0.5, 0.4, 0.1]))
    assert monotone.barrier == 0.0 and monotone.t == 0.0  # the max over [0, 1] is the higher endpoint
    # 0 and 1 off the grid: the endpoint losses are interpolated linearly between their neighbours
    off = loss_barrier([-0.1, 0.1, 0.5, 0.9, 1.1], [1.0, 2.0, 4.0, 2.0, 1.0])
    assert (off.loss_start, off.loss_end, off.barrier) == pytest.approx((1.5, 1.5, 2.5))
    nan = loss_barrier(ts, np.where(ts == 0.5, np.nan, loss))  # a non-finite point is skipped, not the max
    assert nan.barrier == pytest.approx(0.7 - 0.3) and nan.t == 0.25


def test_loss_barrier_errors():
    with pytest.raises(SharpscopeError, match="cover t = 0 and t = 1"):
        loss_barrier([0.2, 0.5, 1.0], [1.0, 2.0, 1.0])
    with pytest.raises(SharpscopeError, match="one length"):
        loss_barrier([0.0, 1.0], [1.0])

"""The fast paths behind small-m sharpness against their ground truths, in float64.

* ``_ChunkLinear`` (the per-chunk Linear correction with a hand-written backward) against ``torch.bmm`` under
  autograd and against finite differences (``torch.autograd.gradcheck``), for one row per chunk (the
  outer-product branch of ``m = 1``) and several rows;
* the structured path at ``m = 1`` and on sequence inputs against the serial loop (``vectorize=False``) on the
  layers the vmap-bug rule names: LayerNorm, GroupNorm, eval-mode BatchNorm, convolutions, attention (handed to
  vmap), values to ``rtol 1e-10`` and gradients to ``1e-9`` of their largest entry (the paths differ only in
  summation order: observed ~1e-15);
* the gradients come back contiguous (the ascent's per-chunk norms and updates ran ~10x slower on the transposed
  layout autograd gave);
* the ascent's unit direction where ``||g||_2`` overflows float32 (its rescaled fallback) against SAM's
  ``perturbation`` chunk by chunk.
"""

import math

import numpy as np
import pytest
import torch
from sharpness_cases import conv_norms_model
from torch import nn

from sharpscope.optim import perturbation
from sharpscope.sharpness import worst_case_sharpness
from sharpscope.sharpness._objective import ChunkedObjective, _ChunkLinear, _merged
from sharpscope.sharpness.worst_case import _unit_directions

CE = nn.CrossEntropyLoss()
DT = torch.float64


@pytest.mark.parametrize("rows", [1, 3])
def test_chunk_linear_matches_bmm_and_finite_differences(rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, rows, 5, generator=g, dtype=DT, requires_grad=True)
    weight = torch.randn(4, 3, 5, generator=g, dtype=DT, requires_grad=True)
    upstream = torch.randn(4, rows, 3, generator=g, dtype=DT)
    found = _ChunkLinear.apply(x, weight)
    expected = torch.bmm(x, weight.transpose(1, 2))
    np.testing.assert_allclose(found.detach(), expected.detach(), rtol=1e-14, atol=0)
    fast = torch.autograd.grad((found * upstream).sum(), (x, weight))
    slow = torch.autograd.grad((expected * upstream).sum(), (x, weight))
    for f, s, what in zip(fast, slow, ("dL/dx", "dL/dweight")):
        np.testing.assert_allclose(f, s, rtol=1e-13, atol=1e-14, err_msg=what)
        assert f.is_contiguous(), what
    assert torch.autograd.gradcheck(_ChunkLinear.apply, (x, weight))


LAYERS = {
    "linear": lambda: nn.Linear(5, 3),
    "linear-sequence": lambda: nn.Linear(5, 3),
    "conv2d": lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2),
    "conv2d-dilated-nobias": lambda: nn.Conv2d(2, 3, (3, 2), padding=(2, 1), dilation=2, bias=False),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_merged_weights_equal_the_layer_with_each_chunks_weights(name):
    # (W + D_c) x computed at once for G = 3 chunks of m = 2 samples, against the layer run chunk by chunk with
    # its weight (and bias) replaced by W + D_c (b + d_c): float64, summation order only (rtol 1e-12).
    torch.manual_seed(0)
    layer = LAYERS[name]().to(DT)
    shape = {"linear": (6, 5), "linear-sequence": (6, 4, 5)}.get(name, (6, 2, 7, 6))
    x = torch.randn(shape, dtype=DT)
    deltas = {n: 0.3 * torch.randn((3, *p.shape), dtype=DT) for n, p in layer.named_parameters()}
    base = nn.Linear if name.startswith("linear") else nn.Conv2d
    with torch.no_grad():
        found = _merged(layer, base, x, deltas, 3)
        expected = torch.cat([
            torch.func.functional_call(layer, {n: p + deltas[n][c] for n, p in layer.named_parameters()},
                                       (x[2 * c: 2 * c + 2],))
            for c in range(3)])
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # one chunk: the layer's own kernel with W + D_0
        found = _merged(layer, base, x, {n: d[:1] for n, d in deltas.items()}, 1)
        expected = torch.func.functional_call(layer, {n: p + deltas[n][0] for n, p in layer.named_parameters()}, (x,))
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-14)
    # where the per-chunk correction is the way (one row per chunk, grouped or "same"-padded convolutions): None
    assert _merged(layer, base, x[:3] if name == "linear" else x, deltas, 3 if name == "linear" else 5) is None
    assert _merged(nn.Conv2d(2, 4, 3, groups=2).to(DT), nn.Conv2d, x if x.dim() == 4 else torch.randn(6, 2, 5, 5,
                   dtype=DT), {"weight": torch.zeros(3, 4, 1, 3, 3, dtype=DT)}, 3) is None


class _SequenceNorm(nn.Module):
    """Linear on ``(N, L, 3)`` (several rows per sample), LayerNorm, pooled, Linear: the n > 1 branch."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.embed(x))).mean(1))


def _conv_norms():
    return conv_norms_model(), torch.randn(12, 2, 6, 6, dtype=DT), True  # the model first: it seeds the generator


def _sequence():
    torch.manual_seed(1)
    return _SequenceNorm().to(DT).eval(), torch.randn(12, 4, 3, dtype=DT), True


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


def _attention():
    torch.manual_seed(2)
    return _Attention().to(DT).eval(), torch.randn(12, 4, 3, dtype=DT), False


def _same_padding():
    # padding="same" (a string: no unfold) and a Conv1d: the grouped-convolution corrections
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.Tanh(), nn.Flatten(1, 2), nn.Conv1d(3 * 5, 4, 2),
                          nn.Flatten(), nn.Linear(12, 3)).to(DT).eval()
    return model, torch.randn(12, 2, 5, 4, dtype=DT), True


CASES = {"conv-bn-gn-ln": _conv_norms, "sequence-linear-ln": _sequence, "attention": _attention,
         "same-padding-conv1d": _same_padding}


def _labels(n):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("m", [1, 3, 12])
def test_small_m_values_and_gradients_match_the_serial_loop(name, m):
    model, x, structured = CASES[name]()
    y = _labels(x.shape[0])
    groups = x.shape[0] // m
    reference = ChunkedObjective(model, CE, vectorize=False)
    g = torch.Generator().manual_seed(7)
    delta = [0.3 * (p.abs() + 0.1) * torch.randn((groups, *p.shape), generator=g, dtype=DT) for p in reference.params]
    xc, yc = x.reshape(groups, m, *x.shape[1:]), y.reshape(groups, m)
    slow_value, slow_grad = reference.value_and_grad(delta, xc, yc)
    fast = ChunkedObjective(model, CE)
    fast_value, fast_grad = fast.value_and_grad(delta, xc, yc)
    assert (fast._structured_plan is not False) == structured, fast._structured_plan
    np.testing.assert_allclose(fast_value, slow_value, rtol=1e-10, atol=0)
    for found, expected, pname in zip(fast_grad, slow_grad, reference.names):
        scale = max(float(expected.abs().max()), 1e-300)
        diff = float((found - expected).abs().max())
        assert diff <= 1e-9 * scale, f"gradient of {pname}: max abs difference {diff:.3g} (scale {scale:.3g})"
        if structured:
            assert found.is_contiguous(), f"gradient of {pname} has strides {found.stride()}"


@pytest.mark.parametrize("name", ["conv-bn-gn-ln", "sequence-linear-ln"])
def test_m1_ascent_matches_the_serial_loop(name):
    # 10 Auto-PGD steps (checkpoints with restarts) at m = 1 over 12 chunks.
    model, x, _ = CASES[name]()
    data = (x, _labels(x.shape[0]))
    fast = worst_case_sharpness(model, CE, data, rho=0.3, m=1, steps=10)
    slow = worst_case_sharpness(model, CE, data, rho=0.3, m=1, steps=10, vectorize=False)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(fast.trace, slow.trace, rtol=1e-9, atol=1e-14)
    assert fast.value > 0


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_unit_direction_where_the_float32_norm_overflows(adaptive):
    # ||g||_2 of gradients ~1e30 overflows float32 (1e60 > 3.4e38): the rescaled fallback must give SAM's direction.
    model, _, _ = _conv_norms()
    model = model.float()
    objective = ChunkedObjective(model, CE)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn((3, *w.shape), generator=g) for w in objective.params]
    for t in grads:
        t[1] *= 1e30
        t[2] = 0
    found = _unit_directions(objective, [t.clone() for t in grads], p=2.0, adaptive=adaptive, eta=0.05)
    for chunk in range(3):
        expected = perturbation([t[chunk] for t in grads], objective.params, rho=1.0, p=2.0, adaptive=adaptive,
                                eta=0.05)
        for f, e in zip(found, expected):
            assert torch.isfinite(f[chunk]).all(), f"chunk {chunk}"
            np.testing.assert_allclose(f[chunk], e, rtol=1e-5, atol=1e-7, err_msg=f"chunk {chunk}")
    norm = math.sqrt(sum(float(f[1].double().pow(2).sum()) for f in found)) if not adaptive else None
    if norm is not None:
        assert abs(norm - 1.0) < 1e-5

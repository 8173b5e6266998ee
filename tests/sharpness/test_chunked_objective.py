"""The batched chunk paths of ChunkedObjective (structured per-layer corrections, vmap) against the serial loop.

Ground truth: ``vectorize=False``, one chunk at a time with plain autograd. Everything in float64, so the paths
may differ only by summation order: values to ``rtol 1e-10`` and gradients to ``1e-9`` relative to their
largest entry (observed differences are ~1e-15). Models cover the layers the structured path rewrites
(Linear, Conv1d/Conv2d incl. grouped, eval BatchNorm, LayerNorm, GroupNorm) and those it must hand to vmap
(nn.MultiheadAttention, tied weights, custom parameter use).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpness_cases import conv_norms_model, tiny_bn_convnet
from sharpscope.errors import SharpscopeError
from sharpscope.optim import perturbation
from sharpscope.sharpness import average_case_sharpness, worst_case_sharpness
from sharpscope.sharpness._objective import ChunkedObjective
from sharpscope.sharpness.worst_case import _unit_directions

CE = nn.CrossEntropyLoss()
DT = torch.float64


class _Attention(nn.Module):
    """Embedding by Linear, self-attention (batch_first: the layout torch's fused kernel takes), LayerNorm."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x (N, L, 3)
        h = self.embed(x)
        s = h if self.batch_first else h.transpose(0, 1)  # seq-first: (L, N, E)
        a, _ = self.attn(s, s, s, need_weights=False)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.head(self.norm(h + a).mean(1))


class _Tied(nn.Module):
    """A Linear whose weight is also used outside its forward: the structured path cannot see that use."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + 0.5 * x @ self.a.weight)


def _bn_ln_gn():
    return conv_norms_model(), torch.randn(24, 2, 6, 6, dtype=DT)  # the model first: it seeds the generator


def _conv1d():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(15, 3)).to(DT).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    return model, torch.randn(24, 2, 5, dtype=DT)


def _attention(batch_first=True):
    torch.manual_seed(2)
    return _Attention(batch_first).to(DT).eval(), torch.randn(24, 4, 3, dtype=DT)


def _tied():
    torch.manual_seed(3)
    return _Tied().to(DT), torch.randn(24, 4, dtype=DT)


CASES = {"bn-ln-gn-conv": (_bn_ln_gn, True), "conv1d-bn1d": (_conv1d, True), "attention": (_attention, False),
         "attention-seq-first": (lambda: _attention(False), False), "tied-weights": (_tied, False)}


def _labels(n, seed=5):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def _compare(found, expected, what):
    scale = max(float(expected.abs().max()), 1e-300)
    diff = float((found - expected).abs().max())
    assert diff <= 1e-9 * scale, f"{what}: max abs difference {diff:.3g} against the loop (scale {scale:.3g})"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_values_and_gradients_match_the_serial_loop(name, path):
    # One call at a random perturbation (~30% of the weights): every chunk's value and gradient.
    build, structured = CASES[name]
    model, x = build()
    y = _labels(x.shape[0])
    groups, m = 6, 4
    reference = ChunkedObjective(model, CE, vectorize=False)
    g = torch.Generator().manual_seed(7)
    delta = [0.3 * (p.abs() + 0.1) * torch.randn((groups, *p.shape), generator=g, dtype=DT) for p in reference.params]
    xc, yc = x.reshape(groups, m, *x.shape[1:]), y.reshape(groups, m)
    slow_value, slow_grad = reference.value_and_grad(delta, xc, yc)
    fast = ChunkedObjective(model, CE, vectorize=None if path == "auto" else "vmap")
    fast_value, fast_grad = fast.value_and_grad(delta, xc, yc)
    np.testing.assert_allclose(fast_value, slow_value, rtol=1e-10, atol=0)
    for found, expected, pname in zip(fast_grad, slow_grad, reference.names):
        _compare(found, expected, f"gradient of {pname}")
    np.testing.assert_allclose(fast.value(delta, xc, yc), slow_value, rtol=1e-10, atol=0)
    if path == "auto":  # the structured path ran where it applies, and handed the others to vmap
        assert (fast._structured_plan is not False) == structured, fast._structured_plan


@pytest.mark.parametrize("name", ["bn-ln-gn-conv", "attention"])
@pytest.mark.parametrize("p, adaptive", [(2.0, False), (2.0, True), (math.inf, False)], ids=["l2", "adaptive", "linf"])
def test_worst_case_ascent_matches_the_serial_loop(name, p, adaptive):
    # 6 Auto-PGD steps (one step-size checkpoint with restarts) over 6 chunks; rho large enough to move.
    model, x = CASES[name][0]()
    data = (x, _labels(x.shape[0]))
    kwargs = dict(rho=0.05 if p == math.inf else 0.3, m=4, p=p, adaptive=adaptive, steps=6)
    fast = worst_case_sharpness(model, CE, data, **kwargs)
    slow = worst_case_sharpness(model, CE, data, vectorize=False, **kwargs)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(fast.trace, slow.trace, rtol=1e-9, atol=1e-14)
    assert fast.value > 0


def test_m1_and_average_case_match_the_loop():
    model, x = _bn_ln_gn()
    data = (x, _labels(x.shape[0]))
    fast = worst_case_sharpness(model, CE, data, rho=0.3, m=1, steps=3)
    slow = worst_case_sharpness(model, CE, data, rho=0.3, m=1, steps=3, vectorize=False)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-9, atol=1e-14)
    kwargs = dict(rho=0.2, m=3, num_draws=4, seed=1)
    fast = average_case_sharpness(model, CE, data, **kwargs)
    slow = average_case_sharpness(model, CE, data, vectorize=False, **kwargs)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-9, atol=1e-14)


def test_fused_attention_kernel_is_switched_off_and_restored():
    # batch_first MHA in eval mode with no grad would take torch's fused kernel (no vmap rule: a per-sample
    # loop); every path runs with the fast path off, and the global setting is restored afterwards.
    model, x = _attention()
    y = _labels(x.shape[0])
    seen = []
    hook = model.attn.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mha.get_fastpath_enabled()))
    objective = ChunkedObjective(model, CE)
    with torch.no_grad():
        objective.value(objective.zeros(6), x.reshape(6, 4, 4, 3), y.reshape(6, 4))
    hook.remove()
    assert seen and not any(seen)
    assert torch.backends.mha.get_fastpath_enabled()


def test_perturbing_only_an_attention_projection_is_not_silently_dropped():
    # out_proj is an nn.Linear that MultiheadAttention never calls (it uses its weight directly): the structured
    # plan accepts it, the forward hook never fires, and the objective must hand over to vmap.
    model, x = _attention()
    y = _labels(x.shape[0])
    params = ["attn.out_proj.weight"]
    fast = worst_case_sharpness(model, CE, (x, y), rho=0.3, m=4, steps=3, params=params)
    slow = worst_case_sharpness(model, CE, (x, y), rho=0.3, m=4, steps=3, params=params, vectorize=False)
    np.testing.assert_allclose(fast.chunk_values, slow.chunk_values, rtol=1e-9, atol=1e-14)
    assert fast.value > 1e-6


def test_structured_only_refuses_what_it_cannot_batch_and_bad_values_are_explained():
    model, x = _tied()
    objective = ChunkedObjective(model, CE, vectorize="structured")
    with pytest.raises(SharpscopeError, match="structured path cannot evaluate this model"):
        objective.value(objective.zeros(6), x.reshape(6, 4, 4), _labels(24).reshape(6, 4))
    with pytest.raises(SharpscopeError, match="vectorize must be"):
        ChunkedObjective(model, CE, vectorize="fast")


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_batched_unit_directions_equal_sams_perturbation_per_chunk(p, adaptive):
    # The ascent's direction is SAM's perturbation (rho = 1) of each chunk's gradient; chunk 2 has a zero
    # gradient (zero direction, not NaN) and chunk 3 gradients of 1e30 (no overflow).
    model, _ = tiny_bn_convnet()
    objective = ChunkedObjective(model, CE)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn((4, *w.shape), generator=g, dtype=DT) for w in objective.params]
    for t in grads:
        t[2] = 0
        t[3] *= 1e30
    found = _unit_directions(objective, [t.clone() for t in grads], p=p, adaptive=adaptive, eta=0.05)
    for chunk in range(4):
        expected = perturbation([t[chunk] for t in grads], objective.params, rho=1.0, p=p, adaptive=adaptive,
                                eta=0.05)
        for f, e in zip(found, expected):
            np.testing.assert_allclose(f[chunk], e, rtol=1e-12, atol=1e-300, err_msg=f"chunk {chunk}")

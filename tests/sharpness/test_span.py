"""The factored worst-case ascent (:mod:`sharpscope.sharpness.span`) against the dense one and the serial loop.

Where it applies (p = 2, no ASAM, zero start, the structured path), a Linear weight's per-chunk perturbations are
coefficients over the chunk's gradient history. It is the same ascent rounded differently, so in float64 the traces,
the clean values and the kept perturbations (densified) must agree with ``factored=False`` and with the chunk loop
to ~1e-10 relative (the Gram norms sum products of both signs: a few hundred ulps, not more).
"""

import math

import pytest
import torch
from torch import nn

from sharpscope.hessian.operator import eval_mode
from sharpscope.sharpness import span
from sharpscope.sharpness._objective import ChunkedObjective, make_chunks, stack_data
from sharpscope.sharpness.span import SpanBasis
from sharpscope.sharpness.worst_case import _span_basis, _worst_case_on_chunks

CE = nn.CrossEntropyLoss()


def conv_head(n=24):
    """conv -> eval BatchNorm -> ReLU -> Linear(64, 32) (factored at m * steps <= 10) -> tanh -> Linear(32, 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 32),
                          nn.Tanh(), nn.Linear(32, 3)).double()
    model[1].running_mean.copy_(0.1 * torch.randn(4, dtype=torch.float64))
    model[1].running_var.copy_(0.5 + torch.rand(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def layer_norm_mlp(n=24):
    """Linear(16, 48) (factored at m * steps <= 6) -> LayerNorm -> GELU -> Linear(48, 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.LayerNorm(48), nn.GELU(), nn.Linear(48, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(n, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


class SequenceHead(nn.Module):
    """A Linear layer on ``(N, T, in)`` inputs: the factored form takes 2-D inputs only, so it must refuse."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(16, 48)
        self.out = nn.Linear(3 * 48, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x)).flatten(1))


def sequence_head(n=24):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return SequenceHead().double(), (torch.randn(n, 3, 16, generator=g, dtype=torch.float64),
                                     torch.randint(0, 3, (n,), generator=g))


def chunks(case, m, vectorize="structured", batch_size=256):
    model, data = case()
    objective = ChunkedObjective(model, CE, batch_size=batch_size, vectorize=vectorize)
    x, y = stack_data(data, device=objective.device, dtype=objective.dtype)
    xc, yc = make_chunks(x, y, m=m, shuffle=True, seed=0, max_chunks=None)
    return model, objective, xc, yc


def ascent(case, m, steps, *, factored, vectorize="structured", rho=0.5, batch_size=256):
    model, objective, xc, yc = chunks(case, m, vectorize, batch_size)
    with eval_mode(model):
        return _worst_case_on_chunks(objective, xc, yc, rho=rho, p=2.0, adaptive=False, eta=0.01, steps=steps,
                                     random_init=False, seed=0, keep_perturbation=True, on_progress=None,
                                     factored=factored)


def assert_close(found, expected, rtol=1e-10):
    scale = float(expected.abs().max()) or 1.0
    worst = float((found - expected).abs().max())
    assert worst <= rtol * scale, f"max difference {worst:.3g} on values up to {scale:.3g}"


@pytest.fixture
def records(monkeypatch):
    """How many gradient factors the factored path recorded (0: it did not run)."""
    calls = []
    real = SpanBasis.record

    def record(self, *args):
        calls.append(None)
        return real(self, *args)

    monkeypatch.setattr(SpanBasis, "record", record)
    return calls


@pytest.mark.parametrize("case, m, steps", [(conv_head, 1, 9), (conv_head, 2, 5), (layer_norm_mlp, 1, 6)],
                         ids=["conv-head-m1-restarts", "conv-head-m2", "layernorm-mlp-m1"])
def test_factored_ascent_equals_the_dense_one(case, m, steps, records):
    dense_trace, dense_clean, dense_best = ascent(case, m, steps, factored=False)
    assert not records
    trace, clean, best = ascent(case, m, steps, factored=True)
    assert records, "the factored path did not run"
    assert_close(clean, dense_clean)
    assert_close(trace, dense_trace)
    assert float(trace[:, -1].max()) > 1e-3  # the ascent did climb: the comparison is not between zeros
    for found, expected in zip(best, dense_best):
        assert found.shape == expected.shape
        assert_close(found, expected)


def test_factored_ascent_equals_the_chunk_loop(records):
    loop_trace, loop_clean, loop_best = ascent(conv_head, 1, 9, factored=True, vectorize=False)
    assert not records  # the loop is the dense reference
    trace, clean, best = ascent(conv_head, 1, 9, factored=True)
    assert records
    assert_close(clean, loop_clean, 1e-9)
    assert_close(trace, loop_trace, 1e-9)
    for found, expected in zip(best, loop_best):
        assert_close(found, expected, 1e-9)


def test_a_refused_factored_layer_runs_dense_with_the_dense_results(records):
    # the factored form sees a (N, T, in) input on the first gradient and refuses: every group then runs dense
    dense = ascent(sequence_head, 1, 5, factored=False)
    found = ascent(sequence_head, 1, 5, factored=True)
    assert not records
    for a, b in zip(found[:2], dense[:2]):
        assert_close(a, b, 1e-12)


def test_chunks_evaluated_in_pieces_run_dense(records):
    # batch_size 1: each chunk of 2 samples runs in two pieces, which the factored form refuses before any layer
    # is swapped; the dense ascent then runs, as with factored=False
    dense = ascent(conv_head, 2, 5, factored=False, batch_size=1)
    found = ascent(conv_head, 2, 5, factored=True, batch_size=1)
    assert not records
    for a, b in zip(found[:2], dense[:2]):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("change", ["p-inf", "adaptive", "random-init", "loop", "vmap", "too-many-steps", "off"])
def test_factored_only_where_it_applies(change):
    vectorize = {"loop": False, "vmap": "vmap"}.get(change, "structured")
    model, objective, xc, yc = chunks(conv_head, 1, vectorize)
    kwargs = {"m": 1, "p": 2.0, "adaptive": False, "random_init": False, "steps": 9, "factored": True}
    with eval_mode(model):
        assert _span_basis(objective, xc, yc, **kwargs) is not None or vectorize != "structured"
        kwargs.update({"p-inf": {"p": math.inf}, "adaptive": {"adaptive": True}, "random-init": {"random_init": True},
                       "too-many-steps": {"steps": 11}, "off": {"factored": False}}.get(change, {}))
        assert _span_basis(objective, xc, yc, **kwargs) is None


def test_span_basis_geometry_matches_the_dense_perturbations():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    groups, rows, fan_in, fan_out, entries = 3, 2, 7, 5, 4
    basis = SpanBasis({0: (fan_in, fan_out)}, capacity=entries, rows=rows, dtype=torch.float64,
                      device=torch.device("cpu"))
    basis.start(groups)
    factors = []
    for _ in range(entries):
        x, go = randn(groups, rows, fan_in), randn(groups, rows, fan_out)
        basis.record(0, x, go)
        one_hot = basis.finish_gradient()
        assert torch.equal(basis.dense(0, one_hot), go.transpose(1, 2) @ x)
        factors.append((x, go))
    coefs = randn(groups, entries)
    dense = sum(c[:, None, None] * (go.transpose(1, 2) @ x) for c, (x, go) in zip(coefs.unbind(1), factors))
    assert_close(basis.dense(0, coefs), dense, 1e-13)
    assert_close(span.squared_norms(basis, [coefs]), dense.square().sum(dim=(1, 2)), 1e-13)
    inputs, grads = randn(groups, 6, fan_in), randn(groups, 6, fan_out)
    assert_close(basis.correction(0, inputs, coefs), inputs @ dense.transpose(1, 2), 1e-13)
    assert_close(basis.correction_input_grad(0, grads, coefs), grads @ dense, 1e-13)
    with pytest.raises(span.SpanRefused):  # the history is full
        basis.record(0, randn(groups, rows, fan_in), randn(groups, rows, fan_out))

"""Per-layer spectra, one-checkpoint analysis and checkpoint series, against the dense Hessian."""

import copy

import pytest
import torch
from hessian_cases import CASES, build

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import analyze_checkpoint, parameter_groups, per_layer_eigs, spectrum_series
from sharpscope.hessian.reference import dense_hessian

# Eigenvalues are compared to the dense truth relative to the spectral norm (see test_hessian_lanczos.py).
RTOL = 1e-6


def test_parameter_groups():
    model = build(CASES[2]).model
    assert parameter_groups(model) == {
        "0": ["0.weight", "0.bias"], "1": ["1.weight", "1.bias"], "3": ["3.weight", "3.bias"],
        "4": ["4.weight", "4.bias"], "8": ["8.weight", "8.bias"],
    }
    assert list(parameter_groups(model, "tensor"))[:2] == ["0.weight", "0.bias"]
    with pytest.raises(SharpscopeError, match=r"unknown grouping 'layer'.*choices: module, tensor"):
        parameter_groups(model, "layer")


def test_per_layer_eigs_match_dense_diagonal_blocks():
    problem = build(CASES[1])
    results = per_layer_eigs(problem.model, problem.loss_fn, problem.batches, k=2, tol=1e-9)
    dense = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    offset = 0
    for name, names in parameter_groups(problem.model).items():
        size = sum(dict(problem.model.named_parameters())[p].numel() for p in names)
        block = dense[offset : offset + size, offset : offset + size]
        offset += size
        expected = torch.linalg.eigvalsh(block).flip(0)[:2]
        scale = float(block.abs().max()) or 1.0
        assert torch.allclose(results[name].eigenvalues, expected, rtol=0, atol=RTOL * scale), (name, results[name])
    custom = per_layer_eigs(problem.model, problem.loss_fn, problem.batches, k=1,
                            groups={"last": ["4.weight", "4.bias"]})
    assert list(custom) == ["last"]


def test_analyze_checkpoint_everything():
    problem = build(CASES[0])
    dense = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    exact = torch.linalg.eigvalsh(dense)
    stages = []
    result = analyze_checkpoint(problem.model, problem.loss_fn, problem.batches, top_k=3, bottom_k=2, tol=1e-9,
                                trace=True, trace_matvecs=30, density=True, density_iters=30, density_runs=2,
                                density_points=500, per_layer=True, on_progress=stages.append)
    scale = float(exact.abs().max())
    assert torch.allclose(result.top.eigenvalues, exact.flip(0)[:3], rtol=0, atol=RTOL * scale)
    assert torch.allclose(result.bottom.eigenvalues, exact[:2], rtol=0, atol=RTOL * scale)
    assert abs(result.trace.value - float(exact.sum())) < 4 * result.trace.stderr
    assert result.density.num_matvecs <= 60 and result.density.grid.numel() == 500
    assert set(result.per_layer) == {"0", "2"}
    assert stages == ["top", "bottom", "trace", "density", "per-layer"]
    per_layer_matvecs = sum(r.num_matvecs for r in result.per_layer.values())
    assert result.num_matvecs == (result.top.num_matvecs + result.bottom.num_matvecs + 30
                                  + result.density.num_matvecs + per_layer_matvecs)
    full = torch.cat([x for x, _ in problem.batches]), torch.cat([y for _, y in problem.batches])
    assert result.loss == pytest.approx(float(problem.loss_fn(problem.model(full[0]), full[1]).detach()), rel=1e-12)
    assert result.num_params == 92 and result.num_samples == 32 and result.config["top_k"] == 3
    assert result.trace is not None and result.seconds > 0


def test_spectrum_series_warm_start_reuses_eigenvectors():
    """Three 'checkpoints' a small step apart: warm starts spend fewer products for the same eigenvalues."""
    problem = build(CASES[2])
    models = [problem.model]
    for step in range(2):
        model = copy.deepcopy(models[-1])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype))
        models.append(model)
    kwargs = {"top_k": 3, "tol": 1e-8}
    warm = spectrum_series(models, problem.loss_fn, problem.batches, **kwargs)
    cold = spectrum_series(models, problem.loss_fn, problem.batches, warm_start=False, **kwargs)
    for w, c, model in zip(warm, cold, models):
        exact = torch.linalg.eigvalsh(dense_hessian(model, problem.loss_fn, problem.batches))
        assert torch.allclose(w.top.eigenvalues, exact.flip(0)[:3], rtol=0, atol=RTOL * float(exact.abs().max()))
        assert torch.allclose(w.top.eigenvalues, c.top.eigenvalues, rtol=1e-9)
    assert warm[0].top.num_matvecs == cold[0].top.num_matvecs  # the first checkpoint has nothing to start from
    assert sum(w.top.num_matvecs for w in warm[1:]) < sum(c.top.num_matvecs for c in cold[1:])


def test_warm_start_of_another_architecture_falls_back_to_cold():
    first, second = build(CASES[0]), build(CASES[1])
    previous = analyze_checkpoint(first.model, first.loss_fn, first.batches, top_k=1).top
    result = analyze_checkpoint(second.model, second.loss_fn, second.batches, top_k=1, warm_start=previous)
    cold = analyze_checkpoint(second.model, second.loss_fn, second.batches, top_k=1)
    assert torch.equal(result.top.eigenvalues, cold.top.eigenvalues)


def test_analyze_checkpoint_errors():
    problem = build(CASES[0])
    with pytest.raises(SharpscopeError, match=r"unknown trace method 'xtrace'"):
        analyze_checkpoint(problem.model, problem.loss_fn, problem.batches, trace=True, trace_method="xtrace")
    with pytest.raises(SharpscopeError, match=r"top_k must be >= 1, got 0"):
        analyze_checkpoint(problem.model, problem.loss_fn, problem.batches, top_k=0)


def test_analyze_checkpoint_default_budgets_follow_precision():
    """No budgets given: the trace stops at its rtol (Hutch++ sketch + the top-3 eigenvectors as deflation) and lands
    within 4 stderr of the dense trace; the density's runs stop on the quadrature bound and its implied trace comes
    with a standard error that covers the dense trace. (This 92-parameter case has a flat spectrum, trace 2.9 against
    ||H||_F 1.8: the default 0.02 needs more than the 500-product ceiling, reported as converged=False.)"""
    problem = build(CASES[0])
    exact = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_fn, problem.batches))
    result = analyze_checkpoint(problem.model, problem.loss_fn, problem.batches, top_k=3, trace=True, density=True,
                                density_points=300, trace_rtol=0.05)
    trace = result.trace
    assert trace.rtol == 0.05 and trace.converged and trace.deflation_rank == 8 + 3
    assert abs(trace.value - float(exact.sum())) < 4 * trace.stderr
    density = result.density
    assert density.tol == 0.01 and density.converged and density.num_matvecs < 5 * 90
    assert abs(density.trace_estimate - float(exact.sum())) < 4 * density.trace_stderr
    assert result.num_matvecs == result.top.num_matvecs + trace.num_matvecs + density.num_matvecs
    assert result.config["density_tol"] is None  # the library default

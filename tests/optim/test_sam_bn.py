"""frozen_bn_stats: running statistics (and num_batches_tracked) are exactly unchanged; the forward is not."""

from __future__ import annotations

import pytest
import torch
from optim_cases import DT, batch, tiny_mlp
from torch import nn

from sharpscope.optim import frozen_bn_stats, running_stat_buffers


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True, affine=True),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).to(DT)


def test_buffers_found_in_batchnorm_and_tracking_instancenorm():
    model = _conv_net()
    names = {id(b) for b in running_stat_buffers(model)}
    expected = [model[1].running_mean, model[1].running_var, model[1].num_batches_tracked,
                model[4].running_mean, model[4].running_var, model[4].num_batches_tracked]
    assert names == {id(b) for b in expected}
    assert running_stat_buffers(nn.Linear(2, 2)) == []


def test_stats_unchanged_exactly_and_in_place():
    model = _conv_net()
    x = torch.randn(6, 2, 8, 8, dtype=DT)
    model(x)  # a clean pass: stats move away from their initial values
    before = [b.clone() for b in running_stat_buffers(model)]
    pointers = [b.data_ptr() for b in running_stat_buffers(model)]
    with frozen_bn_stats(model):
        for _ in range(3):
            model(torch.randn(6, 2, 8, 8, dtype=DT) * 5 + 1)
        assert not torch.equal(model[1].running_mean, before[0])  # they did move inside
    for b, a in zip(running_stat_buffers(model), before):
        assert torch.equal(b, a)
    assert model[1].num_batches_tracked.item() == 1  # not 4 (the momentum = 0 recipe would give 4)
    assert [b.data_ptr() for b in running_stat_buffers(model)] == pointers


def test_forward_output_is_the_ordinary_training_forward():
    model = tiny_mlp(bn=True)
    x, _ = batch()
    expected = model(x)
    with frozen_bn_stats(model):
        got = model(x)
    assert torch.equal(got, expected)  # training mode: batch statistics either way


def test_restored_after_an_exception():
    model = tiny_mlp(bn=True)
    before = [b.clone() for b in running_stat_buffers(model)]
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_bn_stats(model):
            model(batch()[0])
            raise RuntimeError("boom")
    for b, a in zip(running_stat_buffers(model), before):
        assert torch.equal(b, a)


def test_non_finite_perturbed_pass_does_not_poison_stats():
    # momentum = 0 gives 1 * r + 0 * inf = NaN here; snapshot/restore gives r back
    model = tiny_mlp(bn=True)
    before = [b.clone() for b in running_stat_buffers(model)]
    with frozen_bn_stats(model):
        model(torch.full((4, 5), torch.inf, dtype=DT))
    for b, a in zip(running_stat_buffers(model), before):
        assert torch.equal(b, a)


def test_uninitialized_lazy_batchnorm_is_skipped():
    model = nn.Sequential(nn.LazyBatchNorm1d())
    assert running_stat_buffers(model) == [model[0].num_batches_tracked]
    with frozen_bn_stats(model):
        model(torch.randn(4, 3))
    assert model[0].num_batches_tracked.item() == 0


def test_step_closure_with_model_keeps_running_stats_from_the_clean_pass():
    """SAM(..., model=model).step(closure): the closure's perturbed call leaves BatchNorm statistics alone, so
    they equal one clean forward's; without ``model=`` the optimizer cannot see the buffers (documented)."""
    from sharpscope.optim import SAM

    x, y = batch()
    results = {}
    for with_model in (True, False):
        model = tiny_mlp(bn=True)
        clean_only = tiny_mlp(bn=True)
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1,
                        model=model if with_model else None)

        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            clean_only(x)  # train mode: one update of the running statistics at the original weights
        results[with_model] = [torch.equal(a, b) for a, b in
                               zip(running_stat_buffers(model), running_stat_buffers(clean_only))]
        assert model[1].num_batches_tracked.item() == (1 if with_model else 2)
    assert all(results[True]), results[True]
    assert not all(results[False])  # the perturbed pass moved running_mean/var: what model= prevents


def test_sam_refuses_a_model_that_is_not_a_module():
    from sharpscope.errors import SharpscopeError
    from sharpscope.optim import SAM

    with pytest.raises(SharpscopeError, match="model must be the torch.nn.Module"):
        SAM(tiny_mlp().parameters(), torch.optim.SGD, lr=0.1, model="mlp")

"""sharpscope.max_pool against torch's own max_pool2d: values, gradients and double backward, bit for bit.

Exact equality (``torch.equal``), not a tolerance: the maxima are the same elements of the input, and the gradient
comes from torch's own backward kernel with the indices torch would have picked, so any difference is a bug (a tie
or a NaN routed to another element of the window).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope import max_pool
from sharpscope.max_pool import (
    fast_max_pools,
    max_pool2d,
    pays,
    torch_max_pools,
    window,
)
from sharpscope.models import create_model
from sharpscope.optim import create_optimizer, training_step


def _inputs(shape, dtype, seed=0):
    """Random input plus three hard variants: ties (a block of zeros), ReLU'd (many all-zero windows), NaNs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    ties = x.clone()
    ties[..., :3, :3] = 0.0
    ties[..., -1, :] = 1.5  # equal maxima along a row
    nans = x.clone()
    nans.view(-1)[::7] = float("nan")
    nans.view(-1)[::5] = float("nan")  # windows with one NaN and with several
    return {"random": x, "ties": ties, "relu": x.relu(), "nan": nans, "-inf": x.masked_fill(x < 0, float("-inf"))}


def _assert_same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    same = (a == b) | (a.isnan() & b.isnan())
    if not bool(same.all()):
        where = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {a.numel()} elements differ, first at {where}: "
                             f"{[float(a[tuple(i)]) for i in where]} vs {[float(b[tuple(i)]) for i in where]}")


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 7, 9), (3, 6, 6), (1, 1, 3, 3), (8, 16, 28, 28)])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_values_gradients_and_double_backward_are_torchs(shape, k, dtype):
    for name, x in _inputs(shape, dtype).items():
        assert window(x, k, k) == k
        ours_in, torch_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = max_pool2d(ours_in, k), F.max_pool2d(torch_in, k)
        _assert_same(ours, theirs, f"{name} values")
        assert ours.is_contiguous()
        g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        g_ours, g_theirs = g.clone().requires_grad_(), g.clone().requires_grad_()
        (grad_ours,) = torch.autograd.grad(ours, ours_in, g_ours, create_graph=True)
        (grad_theirs,) = torch.autograd.grad(theirs, torch_in, g_theirs, create_graph=True)
        _assert_same(grad_ours, grad_theirs, f"{name} gradient")
        # double backward: the gradient's derivative along v (with respect to the incoming gradient)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        (gg_ours,) = torch.autograd.grad(grad_ours, g_ours, v)
        (gg_theirs,) = torch.autograd.grad(grad_theirs, g_theirs, v)
        _assert_same(gg_ours, gg_theirs, f"{name} double backward")


def test_a_no_grad_forward_computes_values_only():
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = max_pool2d(x, 2)
    assert out.grad_fn is None
    _assert_same(out, F.max_pool2d(x, 2), "values")


@pytest.mark.parametrize("case, arguments", [
    ("padding", {"kernel_size": 2, "stride": 2, "padding": 1}),
    ("dilation", {"kernel_size": 2, "stride": 2, "dilation": 2}),
    ("overlapping windows", {"kernel_size": 3, "stride": 2}),
    ("a rectangular window", {"kernel_size": (2, 3), "stride": (2, 3)}),
    ("indices returned", {"kernel_size": 2, "stride": 2, "return_indices": True}),
    ("ceil_mode with a partial window", {"kernel_size": 2, "stride": 2, "ceil_mode": True}),
    ("a 1x1 window", {"kernel_size": 1}),
])
def test_window_declines_what_it_does_not_compute(case, arguments):
    x = torch.randn(2, 3, 7, 7)
    assert window(x, **arguments) is None, case


def test_window_covers_stride_defaults_and_ceil_mode_that_changes_nothing():
    x = torch.randn(2, 3, 8, 8)
    assert window(x, 2) == 2 and window(x, 2, None) == 2 and window(x, 2, []) == 2 and window(x, (2, 2), [2, 2]) == 2
    assert window(x, 2, 2, ceil_mode=True) == 2


@pytest.mark.parametrize("case, x", [
    ("channels-last (torch's fast kernel already)", torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)),
    ("a non-contiguous view", torch.randn(2, 3, 8, 16)[..., ::2]),
    ("integers", torch.randint(0, 9, (2, 3, 8, 8))),
    ("a 5-d tensor", torch.randn(2, 3, 2, 8, 8)),
    ("smaller than the window", torch.randn(2, 3, 1, 8)),
    ("no samples", torch.randn(0, 3, 8, 8)),
])
def test_window_declines_inputs_it_does_not_cover(case, x):
    assert window(x, 2, 2) is None, case


@pytest.fixture
def always_ours(monkeypatch):
    """Use max_pool2d at every size, so the small test models exercise it with a backward too."""
    monkeypatch.setattr(max_pool, "BACKWARD_MIN_ELEMENTS_PER_THREAD", 0)


def test_pays_for_a_forward_alone_always_and_with_a_backward_from_a_size_per_thread():
    small = torch.randn(2, 3, 8, 8)
    large = torch.randn(max_pool.BACKWARD_MIN_ELEMENTS_PER_THREAD * torch.get_num_threads())
    assert pays(small) and pays(small.requires_grad_()) is False
    assert pays(large.requires_grad_())
    with torch.no_grad():
        assert pays(small)


def _pooling_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_fast_max_pools_swaps_only_non_overlapping_pools_and_restores_them(always_ours):
    torch.manual_seed(0)
    net = _pooling_net()
    x = torch.randn(5, 1, 8, 8)
    reference = net(x)
    with fast_max_pools(net):
        assert "forward" in vars(net[2]) and "forward" not in vars(net[5])  # stride 1: overlapping, torch's
        _assert_same(net(x), reference, "outputs")
    assert all("forward" not in vars(module) for module in net.modules())
    with pytest.raises(RuntimeError, match="boom"), fast_max_pools(net):
        raise RuntimeError("boom")
    assert "forward" not in vars(net[2])


def test_a_copy_made_inside_the_block_pools_with_its_own_layer(always_ours):
    net = _pooling_net()
    x = torch.randn(2, 1, 8, 8)
    with fast_max_pools(net):
        twin = copy.deepcopy(net)
    assert twin[2].forward.__self__ is twin[2]  # rebound to the copy, not the original's layer
    twin[2].kernel_size = twin[2].stride = 4  # the copy's own settings are the ones used
    _assert_same(twin[2](x), F.max_pool2d(x, 4), "the copy's pool")


def test_torch_max_pools_pins_every_pool_to_torch_and_restores_them(always_ours):
    net = _pooling_net()
    with torch_max_pools(net), fast_max_pools(net):
        assert all(m.forward.__func__ is nn.MaxPool2d.forward for m in net.modules() if isinstance(m, nn.MaxPool2d))
    assert all("forward" not in vars(module) for module in net.modules())


def test_fast_max_pools_leaves_a_forward_replaced_on_the_instance_alone():
    net = _pooling_net()
    own = nn.Identity().forward
    net[2].forward = own
    with fast_max_pools(net):
        assert net[2].forward is own
    assert net[2].forward is own


def test_under_vmap_the_swapped_pool_falls_back_to_torch(always_ours):
    """torch.func transforms see torch's function (an autograd.Function without a vmap rule would fail)."""
    torch.manual_seed(0)
    net = _pooling_net()
    params = dict(net.named_parameters())
    x = torch.randn(3, 2, 1, 8, 8)

    def loss(p, xb):
        return torch.func.functional_call(net, p, (xb,)).square().sum()

    reference = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    with fast_max_pools(net):
        ours = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for name in params:
        _assert_same(ours[name], reference[name], name)


@pytest.mark.parametrize("name, micro_batch_size", [("sgd", None), ("sam", None), ("sam", 4)])
def test_training_steps_are_bit_identical_to_torchs_pooling(name, micro_batch_size, always_ours):
    """training_step pools with max_pool2d on the CPU; the same steps with torch's pooling give the same weights."""
    torch.manual_seed(0)
    model = create_model("convnet", in_channels=1, num_classes=10, image_size=8).train()
    reference = copy.deepcopy(model)
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05}
    opt = create_optimizer(model.parameters(), name=name, base="sgd", **hp)
    ref_opt = create_optimizer(reference.parameters(), name=name, base="sgd", **hp)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        training_step(model, opt, loss_fn, x, y, micro_batch_size=micro_batch_size)
        with torch_max_pools(reference):  # the reference: the same step on torch's pooling
            training_step(reference, ref_opt, loss_fn, x, y, micro_batch_size=micro_batch_size)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        _assert_same(a, b, n)
    for (n, a), b in zip(model.named_buffers(), reference.buffers()):
        _assert_same(a, b, n)


def _digits_convnet_and_data(n=96):
    torch.manual_seed(0)
    model = create_model("convnet", in_channels=1, num_classes=10, image_size=8).eval()
    g = torch.Generator().manual_seed(3)
    return model, torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_loss_surface_points_equal_torchs_pooling():
    from sharpscope.landscape import evaluate

    model, x, y = _digits_convnet_and_data()
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    fast = evaluate(model, nn.CrossEntropyLoss(), batches)
    with torch_max_pools(model):
        reference = evaluate(model, nn.CrossEntropyLoss(), batches)
    assert fast == reference


@pytest.mark.parametrize("vectorize", ["structured", False])
def test_sharpness_chunks_equal_torchs_pooling(vectorize, always_ours):
    """Per-chunk values and gradients of the structured path and of the loop, against the same with torch's pools."""
    from sharpscope.sharpness._objective import ChunkedObjective

    model, x, y = _digits_convnet_and_data(n=32)
    objective = ChunkedObjective(model, nn.CrossEntropyLoss(), vectorize=vectorize)
    groups, m = 4, 8
    g = torch.Generator().manual_seed(4)
    delta = [1e-2 * torch.randn(groups, *p.shape, generator=g) for p in objective.params]
    xs, ys = x.reshape(groups, m, 1, 8, 8), y.reshape(groups, m)
    values, grads = objective.value_and_grad(delta, xs, ys)
    with torch_max_pools(model):
        ref_values, ref_grads = objective.value_and_grad(delta, xs, ys)
    _assert_same(values, ref_values, "values")
    for name, a, b in zip(objective.names, grads, ref_grads):
        _assert_same(a, b, name)

"""The forms the operator builds its gradient graphs in (``_GraphForms``): ReLU with a constant-mask backward,
eval-mode BatchNorm folded into the convolution before it.

The truth is the plain double backward through the native layers (``native_hvp``: no operator code). Both sides
are float64 and the same function of the same parameters computed in a different order (``conv(x, W s) + t``
against ``conv(x, W) s + t``), so they agree to ~1e3 eps relative to the largest entry: 1e-12. Every case also
checks whether the form was used, so a model that silently stopped folding (or folded where it must not) fails.
"""

import pytest
import torch
from hessian_cases import allclose_report, graph_node_names, native_hvp
from torch import nn
from torch.nn import functional as F

from sharpscope.hessian import HessianOperator, operator
from sharpscope.hessian.operator import _GraphForms


class Residual(nn.Module):
    """``bn(y) + y`` for ``y = conv(x)``: the convolution's output has a second use beside the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class TwoNorms(nn.Module):
    """Two BatchNorm layers of one convolution's output: each folds into the original weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn1(y) * self.bn2(y)


class Functional(nn.Module):
    """``F.conv2d`` called with keyword arguments, then a BatchNorm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, weight=self.weight, stride=2, padding=1))


def _head(channels: int, dims: int) -> list[nn.Module]:
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    return [nn.Tanh(), pool(1), nn.Flatten(), nn.Linear(channels, 3)]


# (name, model factory, input shape, whether every BatchNorm folds)
CASES = [
    ("conv1d", lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding="same", bias=False), nn.BatchNorm1d(4), *_head(4, 1)),
     (2, 7), True),
    ("conv2d-groups-stride-dilation-bias", lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm2d(4), *_head(4, 2)), (2, 7, 7),
     True),
    ("conv2d-reflect", lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                             nn.BatchNorm2d(3), *_head(3, 2)), (2, 6, 6), True),
    ("conv2d-bn-no-affine", lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False),
                                                  *_head(3, 2)), (2, 6, 6), True),
    ("conv3d", lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), *_head(2, 3)), (1, 4, 4, 4), True),
    ("residual", lambda: nn.Sequential(Residual(), *_head(2, 2)), (2, 5, 5), True),
    ("two-norms-of-one-conv", lambda: nn.Sequential(TwoNorms(), *_head(3, 2)), (2, 5, 5), True),
    ("functional-kwargs", lambda: nn.Sequential(Functional(), *_head(4, 2)), (2, 6, 6), True),
    # BatchNorm after something else than a convolution: the affine form, no fold
    ("relu-between", lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3), *_head(3, 2)),
     (2, 6, 6), False),
    ("linear-bn", lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Tanh(),
                                        nn.Linear(4, 3)), (2, 2, 2), False),
]


def _trained_statistics(model: nn.Module, shape, generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters (a few train-mode passes)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape, dtype=torch.float64, generator=generator) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, dtype=torch.float64, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, dtype=torch.float64, generator=generator) * 0.2)
    model.eval()


def _assert_products_are_native(H, model, loss_fn, batches, generator):
    """``H @ V`` for a random 3-column ``V`` equals the native double backward (1e-12, see the module docstring);
    returns ``V``."""
    V = torch.randn(H.num_params, 3, dtype=torch.float64, generator=generator)
    actual = H @ V
    expected = torch.stack([native_hvp(model, loss_fn, batches, V[:, j]) for j in range(3)], dim=1)
    atol = 1e-12 * expected.abs().max().item()
    assert torch.allclose(actual, expected, rtol=1e-12, atol=atol), allclose_report(actual, expected, rtol=1e-12,
                                                                                     atol=atol)
    return V


@pytest.mark.parametrize("name, factory, shape, folds", CASES, ids=[c[0] for c in CASES])
def test_folded_products_equal_native_double_backward(name, factory, shape, folds, monkeypatch):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = factory().double()
    _trained_statistics(model, shape, generator)
    batches = [(torch.randn(5, *shape, dtype=torch.float64, generator=generator),
                torch.randint(0, 3, (5,), generator=generator)) for _ in range(2)]
    loss_fn = nn.CrossEntropyLoss()

    folded = []
    original = _GraphForms._folded_convolution

    def counting(self, x, scale, shift):
        result = original(self, x, scale, shift)
        folded.append(result is not None)
        return result

    monkeypatch.setattr(_GraphForms, "_folded_convolution", counting)
    H = HessianOperator(model, loss_fn, batches)
    _assert_products_are_native(H, model, loss_fn, batches, generator)
    assert folded and all(f == folds for f in folded), f"{name}: folds {folded}, expected all {folds}"
    assert H.batched_disabled is None


def test_train_mode_batchnorm_after_a_convolution_is_not_folded():
    """Batch statistics (``eval_mode=False`` on a train-mode model) keep the native kernel: nothing to fold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), *_head(2, 2)).double().train()
    x, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), [(x, y)], eval_mode=False, check_deterministic=False)
    v = torch.randn(H.num_params, dtype=torch.float64)
    assert torch.equal(H @ v, native_hvp(model, nn.CrossEntropyLoss(), [(x, y)], v))


class FunctionalReLUs(nn.Module):
    """Every way of calling ReLU the forms catch: the module (in place and not), ``F.relu``, ``torch.relu``,
    ``torch.relu_`` on a fresh tensor, ``Tensor.relu`` and ``Tensor.relu_``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act, self.act_inplace = nn.ReLU(), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.a(x)) + self.act_inplace(self.a(x) * 0.5)
        h = F.relu(self.b(h)) + torch.relu(self.b(h) - 0.1) + self.b(h).relu()
        h = torch.relu_(self.b(h) * 0.7) + self.b(h).relu_()
        return self.c(h)


@pytest.mark.parametrize("model_name", ["functional-relus", "conv-bn-relu-pool"])
def test_masked_relu_products_equal_native_double_backward(model_name, monkeypatch):
    monkeypatch.setattr(operator, "_MASKED_RELU_MIN_ELEMENTS", 0)  # these activations are small
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    if model_name == "functional-relus":
        model, shape = FunctionalReLUs().double(), (4,)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                              nn.MaxPool2d(2), *_head(3, 2)[1:]).double()
        shape = (2, 6, 6)
        _trained_statistics(model, shape, generator)
    model.eval()
    batches = [(torch.randn(7, *shape, dtype=torch.float64, generator=generator),
                torch.randint(0, 3, (7,), generator=generator)) for _ in range(2)]
    loss_fn = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss_fn, batches)
    V = _assert_products_are_native(H, model, loss_fn, batches, generator)
    assert H.batched_disabled is None  # the 3 columns went through the vmapped second backward, and agreed
    names = graph_node_names(H._graphs[0])
    # the native ReLU's gradient graph holds its threshold_backward; the masked form a product with a constant
    assert "ThresholdBackwardBackward0" not in names and "MulBackward0" in names, sorted(names)
    plain = HessianOperator(model, loss_fn, batches)
    plain._masked_relu = False
    plain @ V[:, 0]
    assert "ThresholdBackwardBackward0" in graph_node_names(plain._graphs[0])


def test_masked_relu_only_from_the_size_where_it_pays():
    """Below ``_MASKED_RELU_MIN_ELEMENTS`` the native ReLU stays (its backward is cheaper there)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), [(x, y)])
    H @ torch.randn(H.num_params, dtype=torch.float64)
    assert "ThresholdBackwardBackward0" in graph_node_names(H._graphs[0])


def test_masked_relu_keeps_relu_values_at_the_edges(monkeypatch):
    """-inf, -0.0, 0, NaN and +inf give exactly ``torch.relu``'s values (``x * mask`` would turn -inf into NaN);
    the in-place form changes its input as ``relu_`` does."""
    monkeypatch.setattr(operator, "_MASKED_RELU_MIN_ELEMENTS", 0)
    x = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 2.0, float("inf"), float("nan")], dtype=torch.float64)
    with _GraphForms():
        out = F.relu(x.clone())
        fresh = x.clone()
        same = torch.relu_(fresh)
    expected = torch.relu(x)
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)
    assert same is fresh and torch.equal(fresh.nan_to_num(7.0), expected.nan_to_num(7.0))

"""Architecture facts against the papers and closed forms, and the registry's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.models import CifarResNet, WideResNet, create_model, list_models, register_model
from sharpscope.models.resnet import BasicBlock, ZeroPadShortcut
from sharpscope.models.wrn import WideBlock


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models():
    assert list_models() == ["convnet", "mlp", "resnet20", "resnet20-noshort", "resnet32", "resnet32-noshort",
                             "resnet56", "resnet56-noshort", "wrn16-8", "wrn28-10"]
    assert list_models("resnet*-noshort") == ["resnet20-noshort", "resnet32-noshort", "resnet56-noshort"]
    assert list_models("wrn*") == ["wrn16-8", "wrn28-10"]


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85),
                                            ("resnet56-noshort", 0.85), ("wrn16-8", 11.0), ("wrn28-10", 36.5)])
def test_parameter_counts_match_the_papers(name, millions):
    """He et al. 2016 Table 6 (0.27M/0.46M/0.85M, option A); Zagoruyko & Komodakis 2016 (11.0M, 36.5M)."""
    count = num_params(create_model(name, in_channels=3, num_classes=10, image_size=32))
    digits = 2 if millions < 1 else 1
    assert round(count / 1e6, digits) == millions, f"{name}: {count} parameters"


def test_noshort_has_the_same_parameters_and_differs_only_by_the_skips():
    torch.manual_seed(0)
    resnet = create_model("resnet20", in_channels=3, num_classes=10, image_size=32).eval()
    noshort = create_model("resnet20-noshort", in_channels=3, num_classes=10, image_size=32).eval()
    noshort.load_state_dict(resnet.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(resnet(x), noshort(x))


def test_option_a_shortcut_against_serial_reference():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    expected = torch.zeros(2, 32, 4, 4)
    for i in range(4):
        for j in range(4):
            expected[:, 8:24, i, j] = x[:, :, 2 * i, 2 * j]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert list(ZeroPadShortcut(16, 32, 2).parameters()) == []


@pytest.mark.parametrize("shortcut", [True, False])
def test_basic_block_closed_form(shortcut):
    """With conv2 zeroed and BN at its initial eval-mode identity, a block computes relu(x) (or relu(0) = 0)."""
    block = BasicBlock(4, 4, 1, shortcut=shortcut).eval()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        expected = torch.relu(x) if shortcut else torch.zeros_like(x)
        # BN eval with running stats (0, 1) divides by sqrt(1 + eps): exact 0 stays 0
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_wide_block_closed_form():
    """Zero conv2: identity blocks return x; widening blocks return the 1x1 conv of relu(bn1(x))."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    same = WideBlock(4, 4, 1).double().eval()
    nn.init.zeros_(same.conv2.weight)
    wide = WideBlock(4, 8, 2).double().eval()
    nn.init.zeros_(wide.conv2.weight)
    with torch.no_grad():
        torch.testing.assert_close(same(x), x, rtol=0, atol=0)
        pre = torch.relu(x / (1 + wide.bn1.eps) ** 0.5)  # BN at init in eval mode: x / sqrt(1 + eps)
        expected = torch.nn.functional.conv2d(pre, wide.shortcut.weight, stride=2)
        torch.testing.assert_close(wide(x), expected, rtol=1e-12, atol=1e-12)  # float64 rounding only


def test_depth_follows_the_formula():
    blocks = lambda m, kind: sum(isinstance(b, kind) for b in m.modules())  # noqa: E731
    assert blocks(create_model("resnet56", in_channels=3, num_classes=10, image_size=32), BasicBlock) == 27  # 3 x 9
    assert blocks(WideResNet(22, 1, 3, 10), WideBlock) == 9  # (22 - 4) / 6 = 3 per group
    assert blocks(CifarResNet(8, 1, 10), BasicBlock) == 3


def test_model_options():
    mlp = create_model("mlp", in_channels=1, num_classes=4, image_size=8, hidden=(32, 16))
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [32, 16, 4]
    logistic = create_model("mlp", in_channels=1, num_classes=4, image_size=8, hidden=())
    assert num_params(logistic) == 64 * 4 + 4
    assert num_params(create_model("mlp", in_channels=1, num_classes=4, image_size=8, hidden=None)) == \
        64 * 128 + 128 + 128 * 4 + 4  # None options are dropped: the default (128,) applies
    narrow = create_model("convnet", in_channels=3, num_classes=10, image_size=32, width=8, hidden=16)
    assert narrow.features[0].out_channels == 8 and narrow.classifier[1].out_features == 16
    for size in (8, 9, 28, 32, 64):  # adaptive pooling: any size from 8 up
        net = create_model("convnet", in_channels=1, num_classes=3, image_size=size)
        assert net(torch.randn(2, 1, size, size)).shape == (2, 3)
    wide = create_model("resnet20", in_channels=3, num_classes=10, image_size=32, width=32)
    assert wide.fc.in_features == 128


@pytest.mark.parametrize("size", [8, 12, 28, 32])
def test_convnet_skips_a_pool_to_the_size_it_has(size):
    """The adaptive pool returns maps that already have its output size as they are: outputs equal those of
    ``nn.AdaptiveAvgPool2d`` exactly (an average over one element), and the state dict is unchanged."""
    torch.manual_seed(0)
    net = create_model("convnet", in_channels=1, num_classes=10, image_size=size).eval()
    pooled = min(4, size // 4)
    plain = nn.Sequential(*list(net.features)[:-1], nn.AdaptiveAvgPool2d(pooled))
    x = torch.randn(3, 1, size, size)
    maps = plain[:-1](x)
    assert (tuple(maps.shape[-2:]) == (pooled,) * 2) == (size < 20)  # 8, 12: skipped; 28, 32: pooled
    assert isinstance(net.features[-1], nn.Identity) == (size < 20)
    assert torch.equal(net(x), net.classifier(plain(x)))
    assert all("features.8" not in key for key in net.state_dict())


def test_create_model_errors():
    shape = dict(in_channels=3, num_classes=10, image_size=32)
    with pytest.raises(SharpscopeError, match=r"unknown model 'resnet21'; did you mean .*'resnet20'"):
        create_model("resnet21", **shape)
    with pytest.raises(SharpscopeError, match=r"model 'mlp' does not take width \(it takes: hidden\)"):
        create_model("mlp", width=3, **shape)
    with pytest.raises(SharpscopeError, match=r"model 'wrn16-8' does not take depth \(it takes: dropout\)"):
        create_model("wrn16-8", depth=10, **shape)
    with pytest.raises(SharpscopeError, match=r"model 'resnet20' needs images of at least 8x8 pixels, found 4x4"):
        create_model("resnet20", in_channels=1, num_classes=10, image_size=4)
    with pytest.raises(SharpscopeError, match=r"in_channels, num_classes and image_size must be >= 1, found 0, 10, 32"):
        create_model("mlp", in_channels=0, num_classes=10, image_size=32)
    with pytest.raises(SharpscopeError, match=r"mlp: hidden layer sizes must be positive integers, found \(0,\)"):
        create_model("mlp", hidden=0, **shape)
    with pytest.raises(SharpscopeError, match=r"convnet: width and hidden must be >= 1, found width=0"):
        create_model("convnet", width=0, **shape)
    with pytest.raises(SharpscopeError, match=r"depth must be 6n \+ 2 .* found depth=21"):
        CifarResNet(21, 3, 10)
    with pytest.raises(SharpscopeError, match=r"depth must be 6n \+ 4 .* found depth=15"):
        WideResNet(15, 2, 3, 10)
    with pytest.raises(SharpscopeError, match=r"0 <= dropout < 1; found .*dropout=1.0"):
        create_model("wrn16-8", dropout=1.0, **shape)
    with pytest.raises(SharpscopeError, match=r"model 'mlp' cannot be built with \{'hidden': 1.5\} .*key=value"):
        create_model("mlp", hidden=1.5, **shape)


def test_register_model_errors():
    with pytest.raises(SharpscopeError, match=r"model 'mlp' is already registered"):
        register_model("mlp")(lambda *, in_channels, num_classes, image_size: nn.Identity())
    with pytest.raises(SharpscopeError, match=r"must take in_channels, num_classes, image_size .* lacks image_size"):
        register_model("broken")(lambda *, in_channels, num_classes: nn.Identity())
    assert "broken" not in list_models()

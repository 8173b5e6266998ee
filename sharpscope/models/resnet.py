"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", section 4.2) and their ``-noshort`` variants.

``resnet{20,32,56}``: a 3x3 conv with 16 channels, three stages of n = (depth - 2) / 6 basic blocks with 16, 32
and 64 channels (the 2nd and 3rd start with stride 2), global average pooling and a linear classifier: 6n + 2
layers, 0.27M / 0.46M / 0.85M parameters for CIFAR-10 as in the paper's Table 6.

Shortcuts are the paper's **option A** for CIFAR: identity, and where a stage halves the resolution and doubles
the channels, stride-2 subsampling with zero-padded extra channels. Option A adds no parameters, so a
``-noshort`` net (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", section 5, residual
connections removed) has exactly the same parameters, under the same names, as its ResNet.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.models.registry import register_model


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` with ``out_channels - in_channels`` zero channels added
    (half before, half after, as in the reference implementations)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (option-A) shortcut when ``shortcut``, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if shortcut:
            same = stride == 1 and in_channels == out_channels
            self.shortcut = nn.Identity() if same else ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; ``shortcut=False`` removes every skip connection (Li et al. 2018).

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        width: channels of the first stage (16 in the paper; the stages have width, 2 width, 4 width).
        shortcut: keep the residual connections.
    """

    def __init__(self, depth: int, in_channels: int, num_classes: int, *, width: int = 16,
                 shortcut: bool = True) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 or width < 1:
            raise SharpscopeError(f"CIFAR ResNet: depth must be 6n + 2 with n >= 1 (20, 32, 56, ...) and width >= 1, "
                                  f"found depth={depth}, width={width}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, channels = [], width
        for i, out_channels in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride, shortcut=shortcut))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def _register(depth: int, shortcut: bool) -> None:
    name = f"resnet{depth}" + ("" if shortcut else "-noshort")

    @register_model(name, min_image_size=8)  # two stride-2 stages: 8x8 inputs end at 2x2 maps
    def factory(*, in_channels: int, num_classes: int, image_size: int, width: int = 16) -> CifarResNet:
        return CifarResNet(depth, in_channels, num_classes, width=width, shortcut=shortcut)

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = (f"ResNet-{depth} (He et al. 2016, option-A shortcuts)" if shortcut else
                       f"ResNet-{depth} without skip connections (Li et al. 2018)")


for _depth in (20, 32, 56):
    for _shortcut in (True, False):
        _register(_depth, _shortcut)

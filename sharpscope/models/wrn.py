"""Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks"): ``wrn16-8`` and ``wrn28-10``.

WRN-d-k: a 3x3 conv with 16 channels, three groups of n = (d - 4) / 6 pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) with 16k, 32k and 64k channels (strides 1, 2, 2), then BN-ReLU,
global average pooling and a linear classifier. Where a block changes the width or stride its shortcut is a 1x1
conv applied to the pre-activated input (as in the authors' code). WRN-16-8 has 11.0M parameters and WRN-28-10
36.5M for CIFAR-10 (paper, Table 2 / 4); Foret et al. 2021 (SAM) use both. ``dropout`` defaults to 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.models.registry import register_model


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen (see the module docstring)."""

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or widen < 1 or not 0.0 <= dropout < 1.0:
            raise SharpscopeError(f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), widen >= 1 and "
                                  f"0 <= dropout < 1; found depth={depth}, widen={widen}, dropout={dropout}")
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups, channels = [], 16
        for i, out_channels in enumerate((16 * widen, 32 * widen, 64 * widen)):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(WideBlock(channels, out_channels, stride, dropout=dropout))
                channels = out_channels
            groups.append(nn.Sequential(*layers))
        self.groups = nn.Sequential(*groups)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.groups(self.stem(x))))


@register_model("wrn16-8", min_image_size=8)
def wrn16_8(*, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0) -> WideResNet:
    """WRN-16-8 (11.0M parameters on CIFAR-10)."""
    return WideResNet(16, 8, in_channels, num_classes, dropout=dropout)


@register_model("wrn28-10", min_image_size=8)
def wrn28_10(*, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (36.5M parameters on CIFAR-10)."""
    return WideResNet(28, 10, in_channels, num_classes, dropout=dropout)

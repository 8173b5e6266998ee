"""``convnet``: the small CNN of the SAM seed experiments on Fashion-MNIST / CIFAR-10 (DESIGN.md section 9).

conv3x3(width)-BN-ReLU-maxpool2, conv3x3(2 width)-BN-ReLU-maxpool2, adaptive average pool to s x s with
s = min(4, image_size // 4), then Linear(hidden)-ReLU-Linear(num_classes). The adaptive pool keeps the classifier
the same size from 16x16 up (28x28: 7x7 maps -> 4x4; 32x32: 8x8 -> 4x4) and leaves the 2x2 maps of 8x8 digits
as they are, so any image of 8 pixels or more works. Where the maps already have the pooled size (images under 20
pixels) the pool is an ``nn.Identity`` (an average over one element is that element, exactly): on this CPU build
torch's NCHW adaptive average pool takes 1.8 ms for a 500 x 64 x 2 x 2 batch, 5% of a Hessian-vector product of the
digits ConvNet. It holds no parameters, so the state dict is the same either way.
"""

from __future__ import annotations

from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.models.registry import register_model


class ConvNet(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a two-layer classifier (see the module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, width: int = 32,
                 hidden: int = 128) -> None:
        super().__init__()
        if width < 1 or hidden < 1:
            raise SharpscopeError(f"convnet: width and hidden must be >= 1, found width={width}, hidden={hidden}")
        pooled = max(1, min(4, image_size // 4))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Identity() if image_size // 4 == pooled else nn.AdaptiveAvgPool2d(pooled),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * pooled * pooled, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("convnet", min_image_size=8)
def convnet(*, in_channels: int, num_classes: int, image_size: int, width: int = 32, hidden: int = 128) -> ConvNet:
    """ConvNet with ``width`` / ``2 width`` conv channels and ``hidden`` classifier units."""
    return ConvNet(in_channels, num_classes, image_size, width=width, hidden=hidden)

"""``mlp``: a fully connected network on flattened images (Flatten, [Linear, ReLU] per hidden layer, Linear)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.models.registry import register_model


class MLP(nn.Sequential):
    """Flatten (B, C, H, W) to (B, C*H*W), then ``hidden`` ReLU layers and a linear classifier (torch's default
    ``nn.Linear`` initialisation)."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (128,)) -> None:
        hidden = tuple(hidden)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise SharpscopeError(f"mlp: hidden layer sizes must be positive integers, found {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


@register_model("mlp")
def mlp(*, in_channels: int, num_classes: int, image_size: int, hidden: int | Sequence[int] = (128,)) -> MLP:
    """MLP with hidden widths ``hidden`` (an int is one hidden layer; ``()`` is multinomial logistic regression)."""
    hidden = (hidden,) if isinstance(hidden, int) else hidden
    return MLP(in_channels * image_size * image_size, num_classes, hidden=hidden)

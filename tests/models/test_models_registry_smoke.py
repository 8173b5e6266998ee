"""Every registered model on every input shape the datasets produce: forward shape, finite output, backward.

Inputs are random tensors shaped like digits/synthetic (1x8x8), (fashion-)MNIST (1x28x28) and CIFAR/SVHN (3x32x32).
The batch is 2 (BatchNorm in train mode needs more than one value per channel; wrn28-10 is 36.5M parameters
and a batch of 2 keeps its 32x32 case near a second on one thread).
"""

from __future__ import annotations

import pytest
import torch

from sharpscope.models import create_model, list_models

INPUTS = {"1x8x8": (1, 8, 10), "1x28x28": (1, 28, 10), "3x32x32": (3, 32, 100)}  # channels, size, classes


@pytest.mark.parametrize("shape", list(INPUTS))
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, shape):
    channels, size, classes = INPUTS[shape]
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=classes, image_size=size)
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient reached {missing[:5]}"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # eval mode is deterministic


# The WRNs initialise through the same code path as the ResNets, and at 10-36M parameters are left out here.
@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("wrn")])
def test_seeded_initialisation_is_reproducible(name):
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        states.append(create_model(name, in_channels=1, num_classes=10, image_size=8).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

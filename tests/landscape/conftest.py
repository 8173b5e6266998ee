"""Small models and data for the landscape tests (test cases are data: STYLE.md 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def tiny_convnet(seed: int = 0, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Conv-BN-ReLU -> Conv -> Linear, BN statistics filled by a few train-mode forwards."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).to(dtype)
    model.train()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)  # trained-looking BN affine parameters (not the 1/0 init)
        model[1].bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8, dtype=dtype))
    return model.eval()


def tiny_mlp(seed: int = 0, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype).eval()


MODELS = {"convnet": tiny_convnet, "mlp": tiny_mlp}


def image_batches(seed: int = 0, *, n: int = 40, batch_size: int = 16, dtype=torch.float32):
    """Uneven batches (16, 16, 8) so that sample weighting matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i: i + batch_size], y[i: i + batch_size]) for i in range(0, n, batch_size)]


def serial_loss(model: nn.Module, loss_fn, batches) -> tuple[float, float]:
    """The plain reference evaluation: sample-weighted loss, accuracy, no tricks."""
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            total += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
    return total / count, correct / count


def serial_point(model: nn.Module, directions, coords, loss_fn, batches) -> tuple[float, float]:
    """Li et al.-style serial reference: deepcopy, perturbed state dict loaded, evaluated."""
    other = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    for d, c in zip(directions, coords):
        for name, t in d.tensors.items():
            state[name] = state[name] + c * t.to(state[name].device)
    other.load_state_dict(state)
    other.eval()
    return serial_loss(other, loss_fn, batches)


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param

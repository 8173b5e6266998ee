"""Test cases as data (STYLE.md 4): tiny float64 models with a loss and fixed batches, crossed with devices.

Each case is small enough for the dense Hessian (``sharpscope.hessian.reference``) to be the ground truth.
The batches are deliberately unequal in size so every test also exercises the sample-weighted average.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn


@dataclass(frozen=True)
class Case:
    name: str  # readable test id
    make_model: Callable[[], nn.Module]  # builds the float32 model (seeded by the fixture)
    input_shape: tuple[int, ...]  # per-sample input shape
    num_classes: int
    batch_sizes: tuple[int, ...]  # unequal on purpose
    seed: int


def _mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def _mlp_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def _cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


CASES = [
    Case("mlp-tanh", _mlp_tanh, (6,), 4, (20, 12), seed=0),
    Case("mlp-relu", _mlp_relu, (6,), 4, (16, 16, 7), seed=1),
    Case("cnn-bn", _cnn_bn, (2, 5, 5), 3, (10, 6), seed=2),
]


@dataclass
class Problem:
    """A built case: float64 model (eval mode, nontrivial BN statistics), loss and batches on a device."""

    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    device: str


def build(case: Case, device: str = "cpu") -> Problem:
    generator = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    model = case.make_model().to(torch.float64)
    batches = []
    for size in case.batch_sizes:
        x = torch.randn(size, *case.input_shape, generator=generator, dtype=torch.float64)
        y = torch.randint(0, case.num_classes, (size,), generator=generator)
        batches.append((x.to(device), y.to(device)))
    with torch.no_grad():  # move BN running statistics away from (0, 1) so eval mode differs from identity
        model.train()
        for x, _ in batches:
            model(x.cpu() * 1.5 + 0.3)
    model.eval()
    return Problem(model.to(device), nn.CrossEntropyLoss(), batches, device)


def available_devices() -> list[str]:
    """CPU always; CUDA when present (STYLE.md 4)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


CASE_PARAMS = [pytest.param((case, device), id=f"{case.name}-dev={device}")
               for case in CASES for device in available_devices()]


def allclose_report(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float) -> str:
    """A readable failure message: worst entries, their values and ratio (STYLE.md 3)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    error = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = (error > bound).nonzero().flatten()[:5]
    worst = int(error.argmax())
    lines = [f"{(error > bound).sum()} of {error.numel()} entries differ (rtol={rtol}, atol={atol})"]
    lines += [f"  [{int(i)}] actual={actual.flatten()[i]:.12g} expected={expected.flatten()[i]:.12g}"
              for i in bad]
    lines.append(f"  worst [{worst}] abs err {error.flatten()[worst]:.3g}, "
                 f"ratio {actual.flatten()[worst] / expected.flatten()[worst]:.6g}")
    return "\n".join(lines)


def native_hvp(model, loss_fn, batches, v):
    """``H v`` by double backward with the native kernels, written out (no operator code involved): the model as it
    is (put it in eval mode first for eval-mode BatchNorm), batches weighted by their sample counts."""
    params = list(model.parameters())
    total = sum(len(y) for _, y in batches)
    out = torch.zeros_like(v)
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        chunks = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]
        hv = torch.autograd.grad(grads, params, chunks)
        out.add_(torch.cat([h.reshape(-1) for h in hv]), alpha=len(y) / total)  # the operator's summation order
    return out


def graph_node_names(roots):
    """The class names of every autograd node reachable from ``roots`` (e.g. a gradient graph's tensors)."""
    names, stack, seen = set(), [r.grad_fn for r in roots], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names

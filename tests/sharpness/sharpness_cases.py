"""Small models with known sharpness, and the ground truths the sharpness tests compare against."""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.optimize import brentq
from torch import nn


class Quadratic(nn.Module):
    """Per-sample loss ``l_i(w) = (w - x_i)^T A (w - x_i) / 2``; ``forward`` returns the ``(B,)`` losses.

    The mean over a chunk ``B`` is ``L_B(w + d) - L_B(w) = g_B^T d + d^T A d / 2`` with ``g_B = A (w - mean x_B)``:
    the worst case over a ball is a trust-region problem with a closed-form solution.
    """

    def __init__(self, A: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.w - x
        return 0.5 * ((r @ self.A) * r).sum(-1)


def mean_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss_fn of :class:`Quadratic`: the mean of its per-sample losses (labels unused)."""
    return outputs.mean()


def quadratic_case(*, d: int = 6, n: int = 64, seed: int = 0, at_minimum: bool = False, spread: float = 0.1,
                   eigenvalues: tuple[float, ...] | None = None):
    """``(model, (x, y), A)``: a float64 :class:`Quadratic` with a random rotation of ``eigenvalues``.

    ``at_minimum``: every ``x_i = w`` (zero loss, zero gradient on every chunk); otherwise the per-sample
    minima are spread around ``w`` by ``spread``.
    """
    g = torch.Generator().manual_seed(seed)
    lam = torch.tensor(eigenvalues or [10.0, 5.0, 3.0, 2.0, 1.0, 0.5][:d], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(lam) @ Q.T
    w = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    x = w.expand(n, d).clone() if at_minimum else w + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    return Quadratic(A, w), (x, torch.zeros(n, dtype=torch.long)), A


def trust_region_max(g: np.ndarray, A: np.ndarray, rho: float) -> float:
    """``max_{||d||_2 <= rho} g^T d + d^T A d / 2`` for symmetric ``A`` with a positive top eigenvalue.

    The maximiser lies on the sphere: ``d = (mu I - A)^{-1} g`` with ``mu > lambda_max`` the root of the secular
    equation ``sum_i gt_i^2 / (mu - lambda_i)^2 = rho^2`` (``gt = Q^T g``), bracketed by
    ``lambda_max + |gt_max| / rho`` (left side >= rho^2) and ``lambda_max + ||g|| / rho`` (<= rho^2). Assumes
    ``gt_max != 0`` (no "hard case"), true for random ``g``.
    """
    lam, Q = np.linalg.eigh(A)
    gt = Q.T @ g
    secular = lambda mu: np.sum(gt**2 / (mu - lam) ** 2) - rho**2  # noqa: E731
    low, high = lam[-1] + abs(gt[-1]) / rho, lam[-1] + np.linalg.norm(g) / rho
    mu = low if secular(low) <= 0 else brentq(secular, low, high, xtol=1e-300, rtol=4 * np.finfo(float).eps)
    d = Q @ (gt / (mu - lam))
    return float(g @ d + 0.5 * d @ A @ d)


def tiny_mlp(*, seed: int = 0, n: int = 48, in_features: int = 5, classes: int = 3, dtype=torch.float64):
    """``(model, (x, y))``: a 2-layer tanh MLP with cross-entropy data, float64 by default."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, 8), nn.Tanh(), nn.Linear(8, classes)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, in_features, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, (x, y)


def tiny_bn_convnet(*, seed: int = 0, n: int = 24, dtype=torch.float64):
    """``(model, (x, y))``: conv -> BatchNorm (random running statistics) -> ReLU -> linear, on 1x6x6 images."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(dtype)
    bn = model[1]
    bn.running_mean.copy_(0.1 * torch.randn(4, dtype=dtype))
    bn.running_var.copy_(0.5 + torch.rand(4, dtype=dtype))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, (x, y)


def loss_at(model: nn.Module, loss_fn, x, y, delta: list[torch.Tensor] | None = None) -> float:
    """The serial reference: ``loss_fn(model_{w + delta}(x), y)`` on a deep copy, in eval mode, as a float."""
    shifted = copy.deepcopy(model).eval()
    if delta is not None:
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), delta):
                p.add_(d)
    with torch.no_grad():
        return float(loss_fn(shifted(x), y))


def gradient_at(model: nn.Module, loss_fn, x, y) -> list[torch.Tensor]:
    """Plain autograd gradient of ``loss_fn(model(x), y)`` at the model's weights (eval mode, on a copy)."""
    copy_ = copy.deepcopy(model).eval()
    loss = loss_fn(copy_(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(copy_.parameters()))]


def digits_checkpoint(path, *, hidden: int | None = None, steps: int = 40, seed: int = 0):
    """A digits MLP checkpoint written with ``save_checkpoint`` after ``steps`` full-batch SGD steps on the first
    512 normalised training samples (a trained-ish minimum in well under a second; ``train`` takes seconds)."""
    from sharpscope.data import eval_batches, load_dataset
    from sharpscope.models import create_model
    from sharpscope.train.checkpoint import save_checkpoint

    shape = {"in_channels": 1, "num_classes": 10, "image_size": 8, **({"hidden": hidden} if hidden else {})}
    torch.manual_seed(seed)
    model = create_model("mlp", **shape)
    x, y = next(iter(eval_batches(load_dataset("digits"), split="train", num_samples=512, batch_size=512)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return save_checkpoint(path, model=model, model_name="mlp", model_kwargs=shape, dataset="digits",
                           config={"dataset": "digits", "model": "mlp"}, epoch=1, step=steps)


def conv_norms_model() -> nn.Sequential:
    """A float64 ConvNet in eval mode with every normalisation the per-chunk paths handle: Conv -> BatchNorm (running
    statistics drawn away from 0/1) -> ReLU -> grouped strided Conv -> GroupNorm -> Linear -> LayerNorm (non-trivial
    affine parameters) -> Linear(6, 3), on ``(2, 6, 6)`` inputs. Draws from the global generator, seeded 0."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3),
    ).to(torch.float64).eval()
    model[1].running_mean.normal_(0, 0.3)
    model[1].running_var.uniform_(0.5, 2.0)
    for norm in (model[4], model[8]):
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(0, 0.2)
    return model

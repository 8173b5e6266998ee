"""Small float64 problems with known answers for the optimizer tests (shared by tests/optim/*)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

DT = torch.float64


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w - b^T w with w = concat(w1 (4,), w2 (3,)): gradient A w - b in closed form.

    Two tensors so the "one joint norm over all parameters" rule is exercised (they can sit in two groups).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        m = rng.standard_normal((7, 7))
        self.A = m @ m.T + 7 * np.eye(7)  # symmetric positive definite
        self.b = rng.standard_normal(7)
        w0 = rng.standard_normal(7)
        self.w1 = nn.Parameter(torch.tensor(w0[:4], dtype=DT))
        self.w2 = nn.Parameter(torch.tensor(w0[4:], dtype=DT))

    def w(self) -> np.ndarray:
        return np.concatenate([self.w1.detach().numpy(), self.w2.detach().numpy()])

    def grad_at(self, w: np.ndarray) -> np.ndarray:
        return self.A @ w - self.b

    def loss(self) -> Tensor:
        w = torch.cat([self.w1, self.w2])
        A = torch.tensor(self.A, dtype=DT)
        return 0.5 * w @ A @ w - torch.tensor(self.b, dtype=DT) @ w

    def closure(self) -> Tensor:
        loss = self.loss()
        loss.backward()
        return loss


def eps_formula(g: np.ndarray, *, rho: float, p: float, T: np.ndarray | None = None) -> np.ndarray:
    """DESIGN.md s.4 by hand: eps = rho sign(s)|s|^(q-1) / (||s||_q^q)^(1/p), s = T g, times T (ASAM)."""
    t = np.ones_like(g) if T is None else T
    s = t * g
    if p == np.inf:
        d = np.sign(s)
    else:
        q = p / (p - 1)
        d = np.sign(s) * np.abs(s) ** (q - 1) / (np.sum(np.abs(s) ** q)) ** (1 / p)
    return rho * t * d


def tiny_mlp(seed: int = 0, *, bn: bool = False, width: int = 7) -> nn.Sequential:
    """Linear(5, width) [-> BatchNorm1d] -> Tanh -> Linear(width, 3), float64, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.Tanh(), nn.Linear(width, 3)]
    return nn.Sequential(*layers).to(DT)


def batch(seed: int = 0, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def mlp_ref_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    """The tiny MLP (no BN) written out by hand: tanh(x W1^T + b1) W2^T + b2."""
    w1, b1, w2, b2 = weights
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy written out by hand (log-sum-exp minus the label's logit)."""
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None])[:, 0]).mean()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Bit-exact comparison; names the first entry that differs and by how much."""
    assert a.keys() == b.keys()
    for k in a:
        if not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max().item()
            raise AssertionError(f"{k} differs: max |diff| = {diff:.3e}")

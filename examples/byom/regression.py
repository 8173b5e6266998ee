"""Regression with MSE on scikit-learn's bundled diabetes data (442 patients, 10 features; no download).

    sharpscope train --model examples.byom.regression:make_model --dataset examples.byom.regression:diabetes \\
        --loss torch.nn:MSELoss --optimizer sam --rho 0.05 --lr 0.05 --epochs 20 --out runs/diabetes
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sharpscope.train import BatchData


def diabetes_tensors() -> tuple[Tensor, Tensor]:
    """Features (442, 10) as scikit-learn scales them, target (442, 1) standardised (disease progression)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) * 20  # sklearn scales each column to unit l2 norm: ~unit variance now
    y = torch.tensor(y, dtype=torch.float32)[:, None]
    return x, (y - y.mean()) / y.std()


def diabetes(train_samples: int = 352, batch_size: int = 32) -> BatchData:
    """The dataset factory: the first ``train_samples`` patients to train on, the rest (90) to test."""
    x, y = diabetes_tensors()
    split = [(x[:train_samples], y[:train_samples]), (x[train_samples:], y[train_samples:])]
    train, test = ([(a[i:i + batch_size], b[i:i + batch_size]) for i in range(0, len(a), batch_size)]
                   for a, b in split)
    return BatchData(train=train, test=test)


def make_model(hidden: int = 16) -> nn.Module:
    """The model factory: 10 -> hidden -> 1 with tanh (193 parameters by default)."""
    return nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 1))

"""A model called with keyword arguments, ``model(**inputs)`` (the Hugging Face convention), on scikit-learn's
bundled 8x8 digits: the inputs are ``{"pixels": (n, 64), "row_ink": (n, 8)}``, the targets class labels, the loss
the default cross-entropy.

    sharpscope train --model examples.byom.dict_input:make_model --dataset examples.byom.dict_input:digits_dict \\
        --optimizer sam --lr 0.05 --epochs 10 --out runs/dict
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sharpscope.train import BatchData


def digits_dict(train_samples: int = 256, test_samples: int = 128, batch_size: int = 64) -> BatchData:
    """The dataset factory: ``({"pixels", "row_ink"}, labels)`` batches of digits scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    pixels = torch.tensor(images, dtype=torch.float32) / 16
    labels = torch.tensor(labels, dtype=torch.int64)
    row_ink = pixels.view(-1, 8, 8).mean(dim=2)

    def batches(start: int, stop: int) -> list:
        return [({"pixels": pixels[i:min(i + batch_size, stop)], "row_ink": row_ink[i:min(i + batch_size, stop)]},
                 labels[i:min(i + batch_size, stop)]) for i in range(start, stop, batch_size)]

    return BatchData(train=batches(0, train_samples), test=batches(train_samples, train_samples + test_samples))


class TwoViewClassifier(nn.Module):
    """``forward(pixels, row_ink) -> logits (n, 10)``: each view embedded, summed, classified."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.pixels = nn.Linear(64, hidden)
        self.row_ink = nn.Linear(8, hidden)
        self.classify = nn.Sequential(nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, pixels: Tensor, row_ink: Tensor) -> Tensor:
        return self.classify(self.pixels(pixels) + self.row_ink(row_ink))


def make_model(hidden: int = 16) -> TwoViewClassifier:
    """The model factory (1,386 parameters by default)."""
    return TwoViewClassifier(hidden)

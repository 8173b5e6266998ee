"""The measured generalization gap: exact error counts on hand-made predictions, eval mode, bad input."""

import pytest
import torch
from torch import nn

from sharpscope.data import EvalBatches
from sharpscope.errors import SharpscopeError
from sharpscope.sharpness import generalization_gap


class Lookup(nn.Module):
    """Predicts class ``x[:, 0]`` (one-hot logits over 3 classes), through a Dropout that only eval mode turns off,
    so a model left in train mode would give random errors."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        return self.drop(nn.functional.one_hot(x[:, 0].long(), 3).to(self.scale.dtype) * self.scale)


def _batches(predicted, labels, batch_size):
    x = torch.tensor(predicted, dtype=torch.float32)[:, None]
    return EvalBatches.from_tensors(x, torch.tensor(labels), batch_size=batch_size)


def test_errors_are_exact_fractions_and_gap_is_test_minus_train():
    model = Lookup().train()
    train = _batches([0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 0, 1, 0, 0], batch_size=3)  # 1 of 7 wrong
    test = [(torch.tensor([[2.0], [2.0]]), torch.tensor([1, 2])), (torch.tensor([[0.0]]), torch.tensor([1]))]  # 2/3
    seen = []
    gap = generalization_gap(model, nn.CrossEntropyLoss(), train, test, on_progress=seen.append)
    assert (gap.train_error, gap.test_error) == (1 / 7, 2 / 3)
    assert gap.generalization_gap == 2 / 3 - 1 / 7
    assert (gap.num_train_samples, gap.num_test_samples) == (7, 3)
    assert seen == [3, 3, 1, 2, 1]  # samples per batch, train then test
    assert model.training  # the mode is restored
    # sample-weighted mean loss: logits one-hot (scale 1), so a right sample costs -log(e/(e+2)), a wrong one
    # -log(1/(e+2)); loss_fn returns the batch mean, the gap weighs batch b by its size
    right, wrong = (-torch.log_softmax(torch.tensor([1.0, 0, 0]), 0))[[0, 1]].tolist()
    assert gap.train_loss == pytest.approx((6 * right + wrong) / 7, rel=1e-6)
    assert gap.test_loss == pytest.approx((right + 2 * wrong) / 3, rel=1e-6)
    assert gap.to_dict()["generalization_gap"] == gap.generalization_gap


def test_without_loss_fn_and_with_a_float64_model():
    model = Lookup().double()
    gap = generalization_gap(model, None, _batches([1, 1], [1, 0], 2), _batches([0], [0], 1))  # inputs cast
    assert (gap.train_error, gap.test_error, gap.train_loss, gap.test_loss) == (0.5, 0.0, None, None)
    assert gap.generalization_gap == -0.5


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ([], "the train data holds no samples"),
        ([torch.zeros(3)], "train data: expected batches of \\(inputs, targets\\) pairs, got a tensor of shape \\(3,\\)"),
    ],
)
def test_bad_data_is_explained(train, message):
    with pytest.raises(SharpscopeError, match=message):
        generalization_gap(Lookup(), None, train, _batches([0], [0], 1))

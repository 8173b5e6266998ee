"""The generalization gap of a trained model, measured: test error minus train error of the model as it is.

What the sharpness measures are ranked against (:mod:`sharpscope.sharpness.correlation`; Jiang et al. 2020,
section 2.2: the gap of the *final* network). The running accuracy a trainer logs during an epoch is no substitute:
it averages over moving weights and augmented samples, so it underestimates the train accuracy of the final
model and the gap it gives comes out biased (negative, even, on small datasets). Here both errors are
evaluated at the same weights, in eval mode, without gradients, on fixed batches (no augmentation):

.. math::

    \\mathrm{gap} = \\mathrm{err}_\\mathrm{test}(w) - \\mathrm{err}_\\mathrm{train}(w), \\qquad
    \\mathrm{err}_S(w) = \\frac{1}{|S|} \\sum_{(x, y) \\in S} [\\arg\\max_k f_w(x)_k \\neq y].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sharpscope.batches import BatchLoss, call_model, num_samples, split_batch, to_device
from sharpscope.errors import SharpscopeError

__all__ = ["GeneralizationGap", "generalization_gap"]


@dataclass(frozen=True)
class GeneralizationGap:
    """Train and test error (and loss) of one model at fixed weights."""

    train_error: float  # fraction of train samples misclassified (top-1), in [0, 1]
    test_error: float  # fraction of test samples misclassified (top-1), in [0, 1]
    train_loss: float | None  # sample-weighted mean loss_fn over the train samples (None without loss_fn)
    test_loss: float | None  # the same over the test samples
    num_train_samples: int  # train samples evaluated
    num_test_samples: int  # test samples evaluated

    @property
    def generalization_gap(self) -> float:
        """Test error minus train error, in [-1, 1] (positive: the model does worse on unseen data)."""
        return self.test_error - self.train_error

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``generalization_gap`` as a JSON-ready dict."""
        return {**self.__dict__, "generalization_gap": self.generalization_gap}


def _error_and_loss(model: nn.Module, loss_fn: Any, data: Iterable[Any], which: str,
                    on_progress: Callable[[int], Any] | None) -> tuple[float, float | None, int]:
    """``(error, mean loss or None, samples)`` of ``model`` over the ``(inputs, targets)`` batches of ``data``;
    counts stay on the device until the end (one host sync per split)."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    wrong = loss_sum = None
    count = 0
    for batch in data:
        try:
            inputs, y = split_batch(batch)
        except SharpscopeError as exc:
            raise SharpscopeError(f"{which} data: {exc} (the error rate needs the labels as targets)") from None
        if not isinstance(y, Tensor):
            raise SharpscopeError(f"{which} data: the targets of a batch must be a tensor of class labels to count "
                                  f"errors, got {type(y).__name__}")
        n = num_samples(batch)
        inputs, y = to_device(inputs, device, dtype=dtype), y.to(device)
        outputs = call_model(model, inputs)
        if not isinstance(outputs, Tensor):
            raise SharpscopeError(f"generalization_gap needs a classifier returning logits (batch, classes); the "
                                  f"model returned {type(outputs).__name__}")
        batch_wrong = (outputs.argmax(-1) != y).sum()
        wrong = batch_wrong if wrong is None else wrong + batch_wrong
        if loss_fn is not None:
            # loss_fn returns the batch mean; a BatchLoss sees the batch as given, on the model's device
            mean = loss_fn(model, to_device(batch, device)) if isinstance(loss_fn, BatchLoss) else loss_fn(outputs, y)
            loss_sum = mean.detach().double() * n if loss_sum is None else loss_sum + mean.detach().double() * n
        count += n
        if on_progress is not None:
            on_progress(n)
    if not count:
        raise SharpscopeError(f"the {which} data holds no samples; pass at least one (x, y) batch")
    return int(wrong) / count, None if loss_sum is None else float(loss_sum) / count, count


def generalization_gap(
    model: nn.Module,
    loss_fn: Any | None,
    train_batches: Iterable[tuple[Tensor, Tensor]],
    test_batches: Iterable[tuple[Tensor, Tensor]],
    *,
    on_progress: Callable[[int], Any] | None = None,
) -> GeneralizationGap:
    """Top-1 train and test error of ``model`` at its current weights, and their difference (module docstring).

    Args:
        model: a classifier returning logits ``(batch, classes)``; evaluated in eval mode under
            ``torch.no_grad`` (its mode is restored afterwards, its weights are not touched).
        loss_fn: ``loss_fn(outputs, labels) -> batch mean`` (e.g. ``nn.CrossEntropyLoss()``) or a
            :class:`sharpscope.batches.BatchLoss` (one more forward per batch) to also report the mean losses, or
            None to skip them.
        train_batches: ``(inputs, labels)`` batches of the train samples, without augmentation (e.g.
            ``sharpscope.data.eval_batches(dataset, split="train")``; any iterable, so batches may be built lazily);
            inputs a tensor, a tuple of tensors or a dict (:mod:`sharpscope.batches`), labels a tensor of class
            indices. Floating-point inputs are cast to the model's dtype and moved to its device. The order of
            the samples does not change the errors, so a shuffling ``DataLoader`` is accepted here.
        test_batches: the same for the test samples.
        on_progress: called with the number of samples of each batch done (train, then test).

    Returns:
        A :class:`GeneralizationGap`; errors are exact fractions of the samples given, the losses sample-weighted
        means accumulated in float64.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            train_error, train_loss, num_train = _error_and_loss(model, loss_fn, train_batches, "train", on_progress)
            test_error, test_loss, num_test = _error_and_loss(model, loss_fn, test_batches, "test", on_progress)
    finally:
        model.train(was_training)
    return GeneralizationGap(train_error=train_error, test_error=test_error, train_loss=train_loss,
                             test_loss=test_loss, num_train_samples=num_train, num_test_samples=num_test)

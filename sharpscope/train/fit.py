"""``fit(model, train_batches, test_batches, config, out)``: the trainer for any ``nn.Module`` and batches of any
structure, and the step adapter that lets the one SGD/SAM step (:func:`sharpscope.optim.training_step`) run them.

``sharpscope train`` and :func:`sharpscope.train.train` build a registry model and a device loader and then run the
same loop (``sharpscope.train.trainer._run``) as :func:`fit`: one optimizer factory, one SAM step, one checkpoint
format, one resume logic. :func:`fit` writes the run folder ``train`` writes (config.json, metrics.jsonl,
ckpt-epochNNN.pt, last.pt while running, final.pt).

Batches follow the batch contract of :mod:`sharpscope.batches`: ``(inputs, targets)`` with inputs a tensor, a
tuple or a dict, or anything at all with a :class:`~sharpscope.batches.BatchLoss`. ``(images, integer labels)``
batches with a plain loss go straight to ``training_step`` (train accuracy is counted); every other batch goes
through :class:`_OnBatch`, which hands ``training_step`` the sample positions ``arange(n)`` as its "images" and
computes the loss of the selected samples itself, so m-sharpness micro-batches cut every tensor of the batch along
dim 0 exactly as they cut images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError

__all__ = ["BatchData", "fit"]

#: What a checkpoint records for the model (loss) of a :func:`fit` run given no spec that rebuilds it: factories that
#: say so, so loading such a checkpoint without ``--model`` fails with that message.
UNRECORDED_MODEL = "sharpscope.train.fit:unrecorded_model"
UNRECORDED_LOSS = "sharpscope.train.fit:unrecorded_loss"


def unrecorded_model() -> nn.Module:
    """The model factory recorded by :func:`fit` without ``model_spec``: refuses, saying what to pass."""
    raise SharpscopeError("this run was trained with sharpscope.train.fit() without model_spec, so its checkpoints "
                          "do not say how to build the model; pass --model package.module:factory[:k=v] (or "
                          "model_spec= to load_checkpoint)")


def unrecorded_loss() -> Any:
    """The loss factory recorded by :func:`fit` for a loss given as a Python object: refuses, saying what to do."""
    raise SharpscopeError("this run was trained with sharpscope.train.fit() with a loss given as a Python object, "
                          "so its checkpoints do not say which loss; pass the loss (or give fit() loss_fn as a "
                          "package.module:factory spec)")


@dataclass(frozen=True)
class BatchData:
    """Data that is not an image classification set, for ``--dataset package.module:factory`` and :func:`fit`.

    A dataset factory returns this instead of an :class:`~sharpscope.data.ImageDataset` when its samples are token
    ids, tables, dicts of tensors...; the trainer uses the batches as they are (``--batch-size``,
    ``--train-samples`` and augmentation do not apply: the factory decides them).
    """

    train: Sequence[Any]  # training batches: a list or a DataLoader (anything sized and re-iterable); a
    #                       ``set_epoch(epoch)`` method, if it has one, is called before each epoch
    test: Sequence[Any]  # fixed evaluation batches: the test loss (and accuracy, for classification) of each epoch

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            batches = getattr(self, name)
            if not hasattr(batches, "__len__") or not hasattr(batches, "__iter__"):
                raise SharpscopeError(f"BatchData.{name} must be a list (or DataLoader) of batches, got "
                                      f"{type(batches).__name__}")
            if len(batches) == 0:
                raise SharpscopeError(f"BatchData.{name} holds no batches")


def _chunk_loss(outputs: Tensor, index: Tensor) -> Tensor:
    """The loss :class:`_OnBatch` computed, read back from its outputs (``training_step``'s ``loss_fn``)."""
    return outputs[0, 0]


class _OnBatch(nn.Module):
    """``training_step``'s view of a batch of any structure: ``forward(index)`` is the loss of samples ``index``.

    ``forward`` returns the 0-d loss broadcast to ``(k, 1)`` (``training_step`` expects one output row per sample);
    :func:`_chunk_loss` reads it back. Its parameters are the wrapped model's (the optimizer holds the same
    tensors), so SAM perturbs and restores them as for any model.
    """

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.batch: Any = None
        self.size = 0

    def forward(self, index: Tensor) -> Tensor:
        from sharpscope.batches import batch_loss, map_samples

        if self.batch is None:
            raise SharpscopeError("internal: _OnBatch called outside a training step")
        chunk = self.batch if index.shape[0] == self.size else map_samples(
            lambda t: t.index_select(0, index.to(t.device)), self.batch)
        _, loss = batch_loss(self.model, self.loss_fn, chunk)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise SharpscopeError(f"the loss must be a 0-d tensor (the batch mean), got "
                                  f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        return loss.reshape(1, 1).expand(index.shape[0], 1)


class StepRunner:
    """Runs one SGD/SAM step (:func:`sharpscope.optim.training_step`) on a batch of any structure.

    ``module`` is what the caller wraps (DDP, ``torch.compile``) and passes back to :meth:`step`: the model itself
    for ``(tensor, integer labels)`` batches with a plain loss (``counts_correct``: train accuracy is counted), else
    an :class:`_OnBatch` around it.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, *, batches: Any, device: torch.device | None) -> None:
        from sharpscope.batches import BatchLoss

        self.loss_fn = loss_fn
        self.device = device
        self.param_device = next(model.parameters()).device
        direct = not isinstance(loss_fn, BatchLoss) and (hasattr(batches, "epoch_plan")  # a DeviceLoader
                                                         or _is_labelled_pair(next(iter(batches), None)))
        self.counts_correct = direct
        self.module: nn.Module = model if direct else _OnBatch(model, loss_fn)

    def step(self, train_model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, **step_options: Any):
        """``(StepResult, n)``: one step on ``batch`` (moved to the device if asked), its sample count ``n``."""
        from sharpscope.batches import check_sample_dims, num_samples, to_device
        from sharpscope.optim import training_step

        if self.device is not None:
            batch = to_device(batch, self.device)
        if self.counts_correct:
            images, labels = batch
            return training_step(train_model, optimizer, self.loss_fn, images, labels, **step_options), len(labels)
        n = num_samples(batch)
        check_sample_dims(batch, n)
        self.module.batch, self.module.size = batch, n
        index = torch.arange(n, device=self.param_device)
        try:
            result = training_step(train_model, optimizer, _chunk_loss, index, index, **step_options)
        finally:
            self.module.batch = None
        return result, n


def _is_labelled_pair(batch: Any) -> bool:
    """``(tensor inputs, 1-D integer labels)``: the batches ``training_step`` takes as they are."""
    return (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)
            and isinstance(batch[1], Tensor) and batch[1].dim() == 1 and not batch[1].is_floating_point()
            and batch[1].dtype != torch.bool)


def fit(
    model: nn.Module,
    train_batches: Sequence[Any],
    test_batches: Sequence[Any],
    config: Any,
    out: str | Path,
    *,
    loss_fn: Any = None,
    model_spec: str | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resume_every: Any = "epoch",
):
    """Train ``model`` on ``train_batches`` with SGD, SAM or ASAM as ``config`` says, writing the run into ``out``.

    The same loop as ``sharpscope train`` (:func:`sharpscope.train.train`): ``config`` (a
    :class:`~sharpscope.train.TrainConfig`) gives the optimizer (``optimizer``, ``base_optimizer``, ``lr``,
    ``momentum``, ``weight_decay``, ``rho``, ``p``, ``eta``, ``m``, ``sam_every``, ``rho_schedule``), the schedule
    (``epochs``, ``warmup_epochs``: cosine with warm-up, per step), ``max_grad_norm``, ``precision``, ``compile``,
    ``save_every`` and ``seed`` (``torch.manual_seed(seed)`` is called first; the model is already initialised).
    Its ``dataset``, ``model``, ``batch_size``, ``train_samples``, ``augment``, ``data_dir`` do not apply: the
    recorded config holds ``model_spec``, ``dataset`` and the first batch's size instead. The run folder is as
    :func:`~sharpscope.train.train` writes it; a call with an unfinished run in ``out`` and the same config resumes it
    (at the last epoch end; mid-epoch too with ``resume_every`` when ``train_batches`` is a list or tuple).

    Args:
        model: any ``nn.Module``, on the device to train on (batches are moved there).
        train_batches: training batches (list, ``DataLoader``; sized and re-iterable), in the batch contract of
            :mod:`sharpscope.batches`. Shuffle them yourself (a ``DataLoader`` with ``shuffle=True``) if wanted.
        test_batches: fixed evaluation batches: the test loss (and accuracy for ``(n, C)`` outputs with integer
            labels) after each epoch.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d`` mean, a :class:`~sharpscope.batches.BatchLoss`, or a spec
            ``"package.module:factory[:k=v]"`` (:func:`sharpscope.specs.load_loss`; recorded, so analyses rebuild
            it). ``None``: ``config.loss`` if set, else cross-entropy with ``config.label_smoothing``.
        model_spec: ``package.module:factory[:k=v]`` (or a registry ``NAME:k=v``) that rebuilds ``model``:
            recorded in every checkpoint so ``sharpscope hessian-spectrum RUN/final.pt`` needs no ``--model``.
            Checked: the spec must build a model with the same parameter names and shapes. ``None``: the
            checkpoints name :func:`unrecorded_model`, which tells analyses to take ``--model``.
        dataset: the ``--dataset`` spec analyses reload the data with (registry name or factory); ``None``: none.
        overwrite, progress, log, resume_every: as for :func:`~sharpscope.train.train` (``resume_every`` defaults
            to epoch ends).

    Returns:
        :class:`~sharpscope.train.TrainResult`. Each metrics record has ``train_acc``/``test_acc`` None where the
        task has no accuracy.

    Raises:
        SharpscopeError: empty or unsized batches, a ``model_spec`` that does not rebuild ``model``, a bad loss
            spec, a refused ``out``, or a diverged run (:class:`~sharpscope.train.trainer.TrainingDiverged`).
    """
    from sharpscope import distributed
    from sharpscope.batches import num_samples
    from sharpscope.specs import load_loss, parse_spec
    from sharpscope.train import trainer
    from sharpscope.train.config import ResumeEvery, TrainConfig

    if not isinstance(model, nn.Module):
        raise SharpscopeError(f"fit() trains an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise SharpscopeError(f"config must be a sharpscope.train.TrainConfig, got {type(config).__name__}")
    data = BatchData(train=train_batches, test=test_batches)  # validates both
    loss_spec = config.loss
    if isinstance(loss_fn, str):
        loss_spec, loss_fn = loss_fn, load_loss(loss_fn)
    elif loss_fn is None and config.loss is not None:
        loss_fn = load_loss(config.loss)
    elif loss_fn is not None and config.loss is None:
        loss_spec = UNRECORDED_LOSS
    if loss_fn is not None and not callable(loss_fn):
        raise SharpscopeError(f"loss_fn must be callable (or a package.module:factory spec), got "
                              f"{type(loss_fn).__name__}")
    if model_spec is not None:
        model_name, model_kwargs = parse_spec(model_spec)
        _check_rebuilds(model, model_name, model_kwargs)
    else:
        model_name, model_kwargs = UNRECORDED_MODEL, {}
    first_size = num_samples(next(iter(data.train)))
    recorded = dataclasses.replace(config, model=model_name, model_kwargs=model_kwargs, dataset=dataset,
                                   loss=loss_spec, batch_size=first_size, train_samples=None, augment=False,
                                   data_dir=None, channels_last=False)
    schedule = ResumeEvery.parse(resume_every) if isinstance(resume_every, str) else resume_every
    device = next(model.parameters()).device
    out = Path(out)
    grad_scaler, resume_payload = trainer._prepare_run(recorded, out, device, overwrite=overwrite)
    torch.manual_seed(config.seed)
    meta = {"model_name": model_name, "model_kwargs": model_kwargs, "dataset": dataset,
            "config": recorded.to_dict()}
    return trainer._run(model, data.train, data.test, recorded, out, loss_fn=loss_fn, meta=meta, device=device,
                        dist_info=distributed.info(), grad_scaler=grad_scaler, resume_payload=resume_payload,
                        schedule=schedule, progress=progress, log=log, to_device=True)


def _check_rebuilds(model: nn.Module, name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a ``model_spec`` whose model has other parameter/buffer names or shapes than ``model``."""
    from sharpscope.train.checkpoint import _build_model

    with torch.random.fork_rng(devices=[]):  # building the spec's model must not move the training RNG
        rebuilt = _build_model(name, kwargs)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != found:
        differing = sorted(set(want) ^ set(found)) or [k for k in want if want[k] != found[k]]
        raise SharpscopeError(f"model_spec {name!r} with {kwargs} builds a different model than the one given "
                              f"(differs in {differing[:3]}); pass the spec that rebuilds it, or None")

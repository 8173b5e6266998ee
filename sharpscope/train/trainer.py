"""The SGD / SAM trainer: cosine schedule with warm-up, on-device data, checkpoints along the trajectory.

``train(config, out_dir=...)`` writes into ``out_dir``::

    config.json            the resolved TrainConfig plus the environment it ran in
    metrics.jsonl          one JSON object per epoch: epoch, train_loss, train_acc, test_loss, test_acc, lr, seconds
    ckpt-epoch000.pt ...   the trajectory: the initialisation and every ``save_every`` epochs (model weights)
    last.pt                the resume point (model, optimizer, scheduler, RNG, loader position, the partial epoch's
                           running sums), rewritten atomically at each epoch's end and every ``resume_every``
                           (default 3 minutes) in between; removed when final.pt is written
    final.pt               the trained model (with optimizer state), written last

With ``precision="fp16"`` the ``torch.amp.GradScaler`` state (loss scale, growth tracker) is saved in ``last.pt``
and ``final.pt`` (``grad_scaler_state``) and restored on resume.

On the CPU the same config and seed give bit-identical metrics and weights; a killed run started again with
the same command resumes from ``last.pt``, in the middle of an epoch if that is where it was written (the loader's
plan is a function of (seed, epoch), so skipping the batches already taken puts it back in place), and ends
exactly where an uninterrupted run would: the same weights and metrics.jsonl apart from ``seconds``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope import __version__
from sharpscope.errors import SharpscopeError
from sharpscope.io import append_jsonl, prepare_out_dir, write_json
from sharpscope.specs import is_factory_spec
from sharpscope.train.checkpoint import _build_model, read_checkpoint_file, save_checkpoint
from sharpscope.train.config import DEFAULT_RESUME_EVERY, ResumeEvery, TrainConfig
from sharpscope.train.fit import BatchData


class TrainingDiverged(SharpscopeError):
    """The training loss became NaN or infinite."""


_NO_STEP = torch.iinfo(torch.int64).max  # "no non-finite loss yet" in the on-device first-bad-step record


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left on disk."""

    out_dir: Path  # the run folder
    final_checkpoint: Path  # out_dir / "final.pt"
    checkpoints: list[Path]  # the trajectory, in epoch order (final.pt last)
    metrics: list[dict[str, Any]]  # one record per epoch, as in metrics.jsonl
    resumed_from_epoch: int | None  # the last whole epoch before the resume point (None for a fresh run)
    resumed_from_step: int | None = None  # the step a resumed run continued after (None for a fresh run)

    def __repr__(self) -> str:
        """One line: where, how many epochs and checkpoints, the final metrics; never the metric records."""
        last = self.metrics[-1] if self.metrics else {}
        shown = ", ".join(f"{key} {last[key]:.4g}" for key in ("train_loss", "test_loss", "test_acc")
                          if isinstance(last.get(key), float))
        resumed = "" if self.resumed_from_step is None else f", resumed after step {self.resumed_from_step}"
        return (f"TrainResult({str(self.out_dir)!r}: {len(self.metrics)} epochs, {len(self.checkpoints)} checkpoints"
                f"{', ' + shown if shown else ''}{resumed})")


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at step s: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def checkpoint_name(epoch: int) -> str:
    return f"ckpt-epoch{epoch:03d}.pt"


def _environment(device: torch.device) -> dict[str, Any]:
    return {
        "sharpscope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "num_threads": torch.get_num_threads(),
    }


def evaluate(model: nn.Module, batches, *, loss_fn: Any = None,
             autocast_dtype: torch.dtype | None = None) -> tuple[float, float | None]:
    """Mean loss and accuracy of ``model`` over ``batches`` (eval mode, no grad), sample-weighted:
    ``sum_b n_b L_b / sum_b n_b``.

    ``loss_fn=None``: cross-entropy over ``(images, labels)`` batches, with accuracy. Otherwise any loss of the
    batch contract (:mod:`sharpscope.batches`: ``loss_fn(outputs, targets)`` or a :class:`~sharpscope.batches.BatchLoss`);
    the accuracy (arg-max over dim 1 against the targets) is reported only where the outputs are ``(n, C)`` and
    the targets ``n`` integer labels, else it is None.
    """
    from sharpscope.batches import batch_loss, num_samples, split_batch

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.long)
    count, classified = 0, True
    device = next(model.parameters()).device
    loss_sum, correct = loss_sum.to(device), correct.to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                                enabled=autocast_dtype is not None):
        for batch in batches:
            if loss_fn is None:
                x, y = batch
                logits = model(x)
                loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
                correct += (logits.argmax(dim=1) == y).sum()
                count += len(y)
                continue
            n = num_samples(batch)
            outputs, loss = batch_loss(model, loss_fn, batch)
            loss_sum += loss.double() * n
            count += n
            targets = split_batch(batch, loss_fn)[1]
            if classified and _is_classification(outputs, targets, n):
                correct += (outputs.argmax(dim=1) == targets).sum()
            else:
                classified = False
    model.train(was_training)
    return float(loss_sum) / count, (float(correct) / count if classified else None)


def _is_classification(outputs: Any, targets: Any, n: int) -> bool:
    """Whether ``outputs`` are ``(n, C)`` scores and ``targets`` ``n`` integer class labels."""
    return (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[0] == n
            and isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point()
            and targets.dtype != torch.bool)


def train(
    config: TrainConfig,
    *,
    out_dir: str | Path,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resume_every: str | ResumeEvery = DEFAULT_RESUME_EVERY,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` with SGD, SAM or ASAM and write the run into ``out_dir``.

    Resumes automatically when ``out_dir`` holds an unfinished run with the same config; refuses to touch a
    finished or different run unless ``overwrite``.

    ``config.model`` is a registry name (built with the dataset's ``in_channels``, ``num_classes``,
    ``image_size`` plus ``config.model_kwargs``) or ``package.module:factory`` (called with
    ``config.model_kwargs`` only); ``config.dataset`` a registry name or ``package.module:factory`` returning an
    :class:`~sharpscope.data.ImageDataset` or a :class:`~sharpscope.train.BatchData` (batches of any structure,
    used as they are); ``config.loss`` ``None`` (cross-entropy) or ``package.module:factory`` returning the loss
    (:func:`sharpscope.specs.load_loss`). All are recorded in every checkpoint, so analyses rebuild the model, the
    data and the loss from the checkpoint alone. The loop is the one :func:`sharpscope.train.fit` runs.

    ``resume_every`` (:class:`ResumeEvery` or its text, e.g. ``"3min"``, ``"200steps"``, ``"epoch"``) sets how
    often ``last.pt`` is rewritten in the middle of an epoch, on top of every epoch's end; a run killed at any
    moment loses at most that much work and resumes bit-identically (same weights and metrics as an uninterrupted
    run for the same seed, device and thread count). Under torchrun resume points are written at epoch ends only.

    Raises:
        TrainingDiverged: a loss became NaN/inf. Each step records on the device the first step (counted over the
            run, from 1) whose loss was not finite; it is read every 20 steps, before each resume point and at the
            end of each epoch (no host sync per step), and the message names that step, its lr (and rho) and the
            newest checkpoint written before it, which is left in place.
        SharpscopeError: a refused ``out_dir``, or ``precision="fp16"`` where torch has no fp16 autocast.
    """
    from sharpscope.data import DeviceLoader, eval_batches
    from sharpscope.models import create_model
    from sharpscope.specs import load_loss

    from sharpscope import distributed

    schedule = ResumeEvery.parse(resume_every) if isinstance(resume_every, str) else resume_every
    dist_info, device = distributed.setup(torch.device(device) if device is not None else None)
    out = Path(out_dir)
    grad_scaler, resume_payload = _prepare_run(config, out, device, overwrite=overwrite)
    loss_fn = load_loss(config.loss) if config.loss is not None else None  # import errors before the data

    data = _load_training_data(config)
    torch.manual_seed(config.seed)
    if is_factory_spec(config.model):  # the user's own architecture: only their arguments
        model_kwargs = dict(config.model_kwargs)
        model = _build_model(config.model, model_kwargs).to(device)
    elif isinstance(data, BatchData):  # a registry model on the user's batches: its arguments must be given
        model_kwargs = dict(config.model_kwargs)
        model = _build_model(config.model, model_kwargs).to(device)
    else:
        model_kwargs = {"in_channels": data.in_channels, "num_classes": data.num_classes,
                        "image_size": data.image_size, **config.model_kwargs}
        model = create_model(config.model, **model_kwargs).to(device)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    channels_last = config.channels_last if config.channels_last is not None else (device.type == "cuda" and has_conv)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if isinstance(data, BatchData):
        train_batches, test_batches = data.train, data.test
    else:
        train_batches = DeviceLoader(
            data.train_images, data.train_labels, batch_size=config.batch_size, mean=data.mean,
            std=data.std, shuffle=True, augment=data.augment if config.augment else "none",
            device=device, seed=config.seed, channels_last=channels_last,
            num_replicas=dist_info.world_size, rank=dist_info.rank,  # --batch-size is per rank under torchrun
        )
        # 256 keeps a small CNN's activations in the CPU's caches (2.4x faster than 1000 on Fashion-MNIST's test set)
        test_batches = eval_batches(data, split="test", batch_size=1000 if device.type == "cuda" else 256,
                                    device=device)
    meta = {"model_name": config.model, "model_kwargs": model_kwargs, "dataset": config.dataset,
            "config": config.to_dict()}
    return _run(model, train_batches, test_batches, config, out, loss_fn=loss_fn, meta=meta, device=device,
                dist_info=dist_info, grad_scaler=grad_scaler, resume_payload=resume_payload, schedule=schedule,
                progress=progress, log=log, to_device=isinstance(data, BatchData))


def _prepare_run(config: TrainConfig, out: Path, device: torch.device, *, overwrite: bool):
    """``(grad_scaler, resume_payload)``: the checks made before any data is read or file written (fp16 support,
    the run folder: fresh, resumable or refused)."""
    from sharpscope import distributed

    grad_scaler = _fp16_grad_scaler(device) if config.precision == "fp16" else None  # refused before any write
    resume_payload = _check_out_dir(out, config, overwrite=overwrite)
    distributed.barrier()
    return grad_scaler, resume_payload


def _load_training_data(config: TrainConfig):
    """The :class:`~sharpscope.data.ImageDataset` (cut to ``train_samples``) or :class:`BatchData` of
    ``config.dataset``."""
    from sharpscope.data import ImageDataset, load_dataset
    from sharpscope.specs import call_factory, parse_spec

    if not is_factory_spec(config.dataset):
        return _train_subset(load_dataset(config.dataset, data_dir=config.data_dir), config.train_samples)
    name, kwargs = parse_spec(config.dataset, what="dataset")
    data = call_factory(name, kwargs, what="dataset")
    if isinstance(data, ImageDataset):
        return _train_subset(data, config.train_samples)
    if isinstance(data, BatchData):
        if config.train_samples is not None:
            raise SharpscopeError(f"dataset factory {name!r} returned BatchData, whose batches are used as they are; "
                                  "drop --train-samples (cut the data in the factory instead)")
        return data
    raise SharpscopeError(
        f"dataset factory {name!r} returned {type(data).__name__}, not a sharpscope.data.ImageDataset or a "
        "sharpscope.train.BatchData; return ImageDataset(...) for images, BatchData(train=..., test=...) for "
        "batches of any other structure"
    )


def _run(model: nn.Module, train_batches: Any, test_batches: Any, config: TrainConfig, out: Path, *, loss_fn: Any,
         meta: dict[str, Any], device: torch.device, dist_info: Any, grad_scaler: Any,
         resume_payload: dict[str, Any] | None, schedule: ResumeEvery, progress: bool,
         log: Callable[[str], None] | None, to_device: bool) -> TrainResult:
    """The training loop shared by :func:`train` and :func:`sharpscope.train.fit`: optimizer, schedule, SGD/SAM
    steps (:func:`sharpscope.optim.training_step`), evaluation, metrics, checkpoints, resume.

    ``loss_fn=None`` is cross-entropy with ``config.label_smoothing`` over ``(images, labels)`` batches (test loss:
    plain cross-entropy); otherwise any loss of the batch contract, used for training and testing. ``to_device``:
    move each batch to ``device`` (the user's batches; a DeviceLoader's already are). Freed CPU memory stays in the
    process (:func:`sharpscope.cpu_memory.retain_freed_memory`): the steps reuse it instead of faulting in fresh pages.
    """
    from sharpscope.optim import create_optimizer
    from sharpscope.train.fit import StepRunner

    from sharpscope import distributed
    from sharpscope.cpu_memory import retain_freed_memory

    retain_freed_memory()

    is_main = dist_info.is_main
    log = (log or (lambda message: print(message, file=sys.stderr, flush=True))) if is_main else (lambda _: None)
    progress = progress and is_main
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(
        config.precision, torch.bfloat16 if device.type == "cuda" else None)
    try:
        steps_per_epoch = len(train_batches)
    except TypeError:
        raise SharpscopeError(f"the training batches ({type(train_batches).__name__}) have no len(): pass a list, a "
                              "DataLoader or another re-iterable sized collection of batches") from None
    if steps_per_epoch == 0:
        raise SharpscopeError("the training data holds no batches")

    optimizer = create_optimizer(
        model.parameters(), name=config.optimizer, base=config.base_optimizer, lr=config.lr,
        momentum=config.momentum, weight_decay=config.weight_decay, rho=config.rho, p=config.p, eta=config.eta,
        sam_every=config.sam_every, rho_schedule=config.rho_schedule,
    )
    total_steps = steps_per_epoch * config.epochs
    lr_factor = cosine_with_warmup(total_steps, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    train_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing) if loss_fn is None else loss_fn
    runner = StepRunner(model, train_loss_fn, batches=train_batches, device=device if to_device else None)
    train_model = runner.module
    # the test loss: plain cross-entropy by default (the fast path for (images, labels) batches: loss_fn None)
    test_loss_fn = nn.CrossEntropyLoss() if loss_fn is None and not runner.counts_correct else loss_fn
    if dist_info.enabled:
        # Each rank's clean pass runs under no_sync (training_step), so each rank perturbs with its own gradient:
        # m = per-rank batch, the SAM paper's data-parallel setting. The SAM gradient is averaged by DDP.
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    if to_device:
        from sharpscope.batches import to_device as move

        test_batches = [move(batch, device) for batch in test_batches]

    state = {"optimizer": optimizer, "scheduler": scheduler, "grad_scaler": grad_scaler}
    start_epoch, step, resumed_from, resumed_step, position, last_record = 1, 0, None, None, None, {}
    if resume_payload is not None:
        model.load_state_dict(resume_payload["model_state"])
        optimizer.load_state_dict(resume_payload["optimizer_state"])
        scheduler.load_state_dict(resume_payload["scheduler_state"])
        if grad_scaler is not None and resume_payload.get("grad_scaler_state") is not None:
            grad_scaler.load_state_dict(resume_payload["grad_scaler_state"])
        _set_rng_state(resume_payload["rng_state"], device)
        resumed_from = int(resume_payload["epoch"])
        start_epoch, step = resumed_from + 1, int(resume_payload["step"])
        resumed_step = step
        last_record = dict(resume_payload.get("metrics") or {})
        position = resume_payload.get("position")
        _truncate_metrics(out / "metrics.jsonl", resumed_from)
        if position is not None:
            _check_position(position, out, steps_per_epoch, dist_info.world_size, resumed_from, step)
            log(f"resuming {out} at step {step} (epoch {position['epoch']}, batch {position['batch']} of "
                f"{steps_per_epoch})")
        else:
            log(f"resuming {out} after epoch {resumed_from}")
    elif is_main:
        for stale in ("metrics.jsonl", "final.pt", "last.pt", *[p.name for p in out.glob("ckpt-epoch*.pt")]):
            (out / stale).unlink(missing_ok=True)
        write_json(out / "config.json", {**config.to_dict(), "environment": {
            **_environment(device), "world_size": dist_info.world_size, "resume_every": str(schedule)}})
        if config.save_every:
            save_checkpoint(out / checkpoint_name(0), model=model, epoch=0, step=0, **meta)

    from tqdm.auto import tqdm

    # mid-epoch resume points hold one process's partial sums and loader position: single-process runs only
    # ... and a loader whose order is fixed by (seed, epoch) or a plain sequence: skipping the batches already taken
    # must put it where the killed run was (a shuffling DataLoader would not; its runs resume at epoch ends)
    replayable = isinstance(train_batches, (list, tuple)) or hasattr(train_batches, "epoch_plan")
    mid_epoch_saves = is_main and not dist_info.enabled and replayable and (schedule.seconds or schedule.steps)
    last_saved = time.monotonic()
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        if hasattr(train_batches, "set_epoch"):  # a DeviceLoader / sampler: this epoch's shuffle
            train_batches.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen, start_batch, seconds_before = 0, 0, 0.0
        if position is not None:  # resuming inside this epoch: its partial sums, then the batches not yet taken
            loss_sum = position["loss_sum"].to(device=device, dtype=torch.float64)
            correct = position["correct"].to(device=device, dtype=torch.long)
            seen, start_batch = int(position["seen"]), int(position["batch"])
            seconds_before = float(position["seconds"])
            position = None
        # the first step whose loss was not finite, recorded on the device (no host sync per step)
        step_on_device = torch.full((), step, dtype=torch.int64, device=device)
        first_bad_step = torch.full((), _NO_STEP, dtype=torch.int64, device=device)
        # the loader's plan depends on (seed, epoch) only: skipping the batches already taken puts it where the
        # killed run was (each skipped batch costs one gather, no training step)
        batches = train_batches if start_batch == 0 else itertools.islice(train_batches, start_batch, None)
        bar = tqdm(batches, total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch}/{config.epochs}",
                   leave=False, disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for batch_index, batch in enumerate(bar, start=start_batch):
            result, size = runner.step(train_model, optimizer, batch, micro_batch_size=config.m,
                                       autocast_dtype=autocast_dtype, grad_scaler=grad_scaler,
                                       max_grad_norm=config.max_grad_norm,
                                       sync_perturbation=config.sync_perturbation)
            scheduler.step()
            step += 1
            step_on_device += 1
            first_bad_step = torch.where(torch.isfinite(result.loss), first_bad_step,
                                         torch.minimum(first_bad_step, step_on_device))
            loss_sum += result.loss.double() * size
            correct += result.correct
            seen += size
            last_batch = batch_index == steps_per_epoch - 1
            if batch_index % 20 == 19 or last_batch:  # one host sync per 20 steps
                bad_step = _first_bad_step_everywhere(first_bad_step, dist_info.enabled)
                if bad_step is not None:
                    _diverged(out, config, bad_step, steps_per_epoch, lr_factor)
                if progress:
                    accuracy = {"acc": f"{float(correct) / seen:.3f}"} if runner.counts_correct else {}
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", **accuracy, refresh=False)
            if mid_epoch_saves and not last_batch and schedule.due(step, time.monotonic() - last_saved):
                bad_step = _first_bad_step_everywhere(first_bad_step, False)
                if bad_step is not None:  # never save past a non-finite loss
                    _diverged(out, config, bad_step, steps_per_epoch, lr_factor)
                here = {"epoch": epoch, "batch": batch_index + 1, "steps_per_epoch": steps_per_epoch,
                        "world_size": 1, "loss_sum": loss_sum, "correct": correct, "seen": seen,
                        "seconds": seconds_before + time.perf_counter() - started}
                if _weights_finite(model):  # else the next step's loss is NaN and the run stops there
                    save_checkpoint(out / "last.pt", model=model, epoch=epoch - 1, step=step, metrics=last_record,
                                    position=here, **state, **meta)
                last_saved = time.monotonic()
        bar.close()
        if dist_info.enabled:
            totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                            device=device)])
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
        train_loss = float(loss_sum) / seen
        train_acc = float(correct) / seen if runner.counts_correct else None
        test_loss, test_acc = evaluate(model, test_batches, loss_fn=test_loss_fn, autocast_dtype=autocast_dtype)
        record = {
            "epoch": epoch, "step": step, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds_before + time.perf_counter() - started,
        }
        last_record = record
        if not is_main:
            continue
        append_jsonl(out / "metrics.jsonl", record)
        if config.save_every and epoch % config.save_every == 0 and epoch != config.epochs:
            save_checkpoint(out / checkpoint_name(epoch), model=model, epoch=epoch, step=step, metrics=record, **meta)
        log(f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f}{_accuracy_text(train_acc)}  "
            f"test loss {test_loss:.4f}{_accuracy_text(test_acc)}  ({record['seconds']:.1f}s)")
        if epoch == config.epochs:
            save_checkpoint(out / "final.pt", model=model, epoch=epoch, step=step, metrics=record, **state, **meta)
            (out / "last.pt").unlink(missing_ok=True)
        else:
            save_checkpoint(out / "last.pt", model=model, epoch=epoch, step=step, metrics=record, **state, **meta)
        last_saved = time.monotonic()

    distributed.barrier()
    return TrainResult(
        out_dir=out,
        final_checkpoint=out / "final.pt",
        checkpoints=sorted(out.glob("ckpt-epoch*.pt")) + [out / "final.pt"],
        metrics=_read_metrics(out / "metrics.jsonl"),
        resumed_from_epoch=resumed_from,
        resumed_from_step=resumed_step,
    )


def _accuracy_text(accuracy: float | None) -> str:
    return "" if accuracy is None else f" acc {accuracy:.2%}"


def _set_rng_state(rng_state: dict[str, Any], device: torch.device) -> None:
    """Restore the global RNGs a resume point saved (CPU; the CUDA device's too when it was saved there)."""
    torch.set_rng_state(rng_state["torch"])
    if device.type == "cuda" and rng_state.get("cuda") is not None:
        torch.cuda.set_rng_state(rng_state["cuda"], device)


def _weights_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync; called only at resume points)."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _check_position(position: dict[str, Any], out: Path, steps_per_epoch: int, world_size: int, resumed_from: int,
                    step: int) -> None:
    """Refuse a mid-epoch resume point this run cannot continue from bit for bit."""
    if int(position.get("world_size", 1)) != world_size:
        raise SharpscopeError(
            f"{out}/last.pt was written mid-epoch by a run of {position.get('world_size', 1)} process(es), this one "
            f"has {world_size}; resume it with the same launch (with or without torchrun) as it was started"
        )
    expected = (resumed_from + 1, resumed_from * steps_per_epoch + int(position["batch"]))
    if (int(position.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch
            or (int(position["epoch"]), step) != expected or not 0 < int(position["batch"]) < steps_per_epoch):
        raise SharpscopeError(
            f"{out}/last.pt is a mid-epoch resume point (epoch {position['epoch']}, batch {position['batch']}, step "
            f"{step}) that does not fit this run's {steps_per_epoch} batches per epoch; pass --overwrite to start "
            "afresh"
        )


def _train_subset(dataset, train_samples: int | None):
    """``dataset`` with its training split cut to the first ``train_samples`` samples (None: unchanged).

    The stored split order is the fixed order (:func:`sharpscope.data.eval_batches` takes the same first samples),
    and the normalisation statistics stay those of the whole split, so a checkpoint analysed with the usual
    evaluation sets sees its inputs exactly as in training.
    """
    if train_samples is None:
        return dataset
    available = len(dataset.train_labels)
    if train_samples > available:
        raise SharpscopeError(f"train_samples={train_samples}, but the train split of {dataset.name!r} has "
                              f"{available} samples; choose 1..{available} or leave it unset for all")
    return dataclasses.replace(dataset, train_images=dataset.train_images[:train_samples],
                               train_labels=dataset.train_labels[:train_samples])


def _check_out_dir(out: Path, config: TrainConfig, *, overwrite: bool) -> dict[str, Any] | None:
    """Decide between a fresh run, a resume (returns the last.pt payload) and a refusal.

    ``prepare_out_dir`` also removes the temporary files a killed run left behind (on rank 0).
    """
    if overwrite:
        prepare_out_dir(out, outputs=[], overwrite=True)
        return None
    prepare_out_dir(out, outputs=["final.pt"], overwrite=False)
    config_path = out / "config.json"
    if not config_path.exists():
        leftovers = [p.name for p in out.iterdir() if p.suffix in (".pt", ".jsonl")]
        if leftovers:
            raise SharpscopeError(f"{out}/ holds {', '.join(sorted(leftovers))} but no config.json; "
                                  "pass --overwrite or choose another --out")
        return None
    import json

    try:
        saved = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SharpscopeError(f"{config_path} is not valid JSON; pass --overwrite to start afresh") from None
    saved.pop("environment", None)
    # a field added after the run was started holds its default there
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    differing = sorted(k for k, v in config.to_dict().items() if saved.get(k, defaults.get(k)) != v)
    if differing:
        raise SharpscopeError(
            f"{out}/ holds an unfinished run with a different config ({', '.join(differing)}); "
            "rerun with the same options to resume it, or pass --overwrite / choose another --out"
        )
    if not (out / "last.pt").exists():
        return None
    payload, _ = read_checkpoint_file(out / "last.pt")
    return payload


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metric lines past the resume point (an epoch finished after last.pt was written, then killed)."""
    import json

    from sharpscope.io import write_text

    records = [r for r in _read_metrics(path) if r["epoch"] <= last_epoch]
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fp16_grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler for fp16 autocast on ``device`` (torch's defaults: scale 2**16, halved on overflow, doubled
    after 2000 clean steps), or a one-line error where this torch build has no fp16 autocast there."""
    reason = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns and disables autocast for a dtype it lacks
            with torch.autocast(device.type, dtype=torch.float16):
                if not torch.is_autocast_enabled(device.type):
                    reason = f"autocast to float16 is disabled on {device.type}"
        if reason is None:
            return torch.amp.GradScaler(device.type)
    except RuntimeError as exc:  # torch refuses fp16 autocast or a scaler on this device type
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    raise SharpscopeError(
        f"--precision fp16 needs CUDA: torch {torch.__version__} has no fp16 autocast with a GradScaler on "
        f"{device.type} ({reason}); use --precision bf16 on the CPU"
    )


def _first_bad_step_everywhere(first_bad_step: torch.Tensor, distributed_run: bool) -> int | None:
    """The earliest step (1-based, counted over the run) with a non-finite loss on any rank, or None (one host
    sync; under torchrun one all-reduce, so all ranks agree before one of them stops)."""
    if distributed_run:
        first_bad_step = first_bad_step.clone()
        torch.distributed.all_reduce(first_bad_step, op=torch.distributed.ReduceOp.MIN)
    value = int(first_bad_step)
    return None if value == _NO_STEP else value


def _last_good_checkpoint(out: Path, bad_step: int, steps_per_epoch: int) -> tuple[Path, str] | None:
    """The newest checkpoint in ``out`` written before step ``bad_step`` (a trajectory file when it is as new as
    ``last.pt``), with a description of where it is ("epoch 1", "step 37, in epoch 2"); None if there is none."""
    found = []
    for path in out.glob("ckpt-epoch*.pt"):
        number = path.stem[len("ckpt-epoch"):]
        if number.isdigit() and int(number) * steps_per_epoch < bad_step:
            found.append((int(number) * steps_per_epoch, 1, path, int(number)))
    if (out / "last.pt").exists():  # an epoch end or a mid-epoch resume point: it says which
        try:
            payload, _ = read_checkpoint_file(out / "last.pt")
            last_step, last_epoch = int(payload["step"]), int(payload["epoch"])
        except (SharpscopeError, KeyError, TypeError, ValueError):
            last_step = None
        if last_step is not None and last_step < bad_step:
            found.append((last_step, 0, out / "last.pt", last_epoch))
    if not found:
        return None
    step, _, path, epoch = max(found)
    if step != epoch * steps_per_epoch:
        return path, f"step {step}, in epoch {epoch + 1}"
    return path, f"epoch {epoch}{'' if epoch else ', the initialisation'}"


def _diverged(out: Path, config: TrainConfig, bad_step: int, steps_per_epoch: int,
              lr_factor: Callable[[int], float]) -> None:
    """Raise :class:`TrainingDiverged` naming the step, the lr (and rho) it ran with and the last good checkpoint."""
    epoch = (bad_step - 1) // steps_per_epoch + 1
    factor = lr_factor(bad_step - 1)  # the scheduler's factor during step bad_step
    cause = f"lr {config.lr * factor:.3g}"
    if config.optimizer != "sgd":
        cause += f", rho {config.rho * (factor if config.rho_schedule == 'lr' else 1.0):.3g}"
    good = _last_good_checkpoint(out, bad_step, steps_per_epoch)
    if good is None:
        kept = "no checkpoint was written before it" + ("" if config.save_every else " (--save-every 0)")
    else:
        path, where = good
        kept = f"the last good checkpoint is {path} ({where})"
    raise TrainingDiverged(
        f"training diverged: the loss became NaN/inf at step {bad_step} (epoch {epoch}; {cause}); "
        f"lower --lr{' or --rho' if config.optimizer != 'sgd' else ''} or add --max-grad-norm; {kept}"
    )

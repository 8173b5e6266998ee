"""The trainer's configuration: one frozen dataclass, saved next to every run as ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sharpscope.errors import SharpscopeError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Defaults follow the SAM paper's Fashion-MNIST setting
    (Foret et al. 2021, appendix C.1 as reproduced in DESIGN.md section 9) scaled to the digits default."""

    dataset: str = "digits"  # registry name (sharpscope.data.list_datasets())
    model: str = "convnet"  # registry name (sharpscope.models.list_models())
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra factory arguments (width, hidden, ...)
    optimizer: str = "sgd"  # sgd | sam | asam
    base_optimizer: str = "sgd"  # the optimizer SAM wraps: sgd | adam | adamw
    lr: float = 0.1  # peak learning rate (after warm-up)
    momentum: float = 0.9  # SGD momentum (ignored by adam/adamw)
    weight_decay: float = 1e-4  # L2 / decoupled weight decay of the base optimizer
    rho: float = 0.05  # SAM radius (Foret et al. 2021: 0.05 for CIFAR/Fashion-MNIST); ASAM typically 0.5-2
    p: float = 2.0  # SAM norm p >= 1 (2 = the paper, inf = sign perturbation)
    eta: float = 0.01  # ASAM offset in T = |w| + eta (Kwon et al. 2021); plain SAM ignores it
    rho_schedule: str = "constant"  # constant | lr: rho_t = rho * lr_t / lr (GSAM, Zhuang et al. 2022)
    m: int | None = None  # m-sharpness micro-batch size (None = whole batch, plain SAM)
    sam_every: int = 1  # take the SAM step every k steps, a plain base step otherwise
    sync_perturbation: bool = False  # under torchrun: perturb with the all-reduced gradient (m = global batch)
    epochs: int = 10  # passes over the training split
    train_samples: int | None = None  # train on the first N samples of the training split (None: all of it)
    batch_size: int = 128  # training batch size
    warmup_epochs: float = 0.0  # linear warm-up length, then cosine decay to 0 (per step)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    loss: str | None = None  # package.module:factory[:k=v] returning the loss (loss_fn(outputs, targets) or a
    #                          sharpscope.batches.BatchLoss); None: cross-entropy with label_smoothing
    augment: bool = True  # the dataset's standard augmentation (pad-crop/flip) when it has one
    max_grad_norm: float | None = None  # clip the (SAM) gradient to this global norm
    seed: int = 0  # seeds initialisation, shuffling and augmentation
    save_every: int = 1  # write ckpt-epochNNN.pt every k epochs (0: only final.pt)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a GradScaler)
    channels_last: bool | None = None  # None = on for CUDA conv nets
    compile: bool = False  # torch.compile the model
    data_dir: str | None = None  # where the dataset files are (None: search the default places)

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.rho > 0, f"rho must be > 0, got {self.rho}; use --optimizer sgd for no perturbation"),
            (self.p >= 1, f"p must be >= 1 (2 or inf are usual), got {self.p}"),
            (self.eta >= 0, f"eta must be >= 0, got {self.eta}"),
            (self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.train_samples is None or (not isinstance(self.train_samples, bool)
                                            and isinstance(self.train_samples, int) and self.train_samples >= 1),
             f"train_samples must be an integer >= 1 (or None for the whole split), got {self.train_samples!r}"),
            (self.m is None or 1 <= self.m <= self.batch_size,
             f"m (micro-batch size) must be between 1 and the batch size {self.batch_size}, got {self.m}"),
            (self.sam_every >= 1, f"sam_every must be >= 1, got {self.sam_every}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be >= 0, got {self.warmup_epochs}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max grad norm must be > 0, got {self.max_grad_norm}"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}"),
            (self.optimizer in ("sgd", "sam", "asam"),
             f"optimizer must be sgd, sam or asam, got {self.optimizer!r}"),
            (self.rho_schedule in ("constant", "lr"),
             f"rho schedule must be constant or lr, got {self.rho_schedule!r}"),
            (self.optimizer != "sgd" or self.rho_schedule == "constant",
             f"rho schedule {self.rho_schedule!r} needs optimizer sam or asam, got sgd; use the constant schedule"),
        ]
        for ok, message in checks:
            if not ok:
                raise SharpscopeError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from ``to_dict()`` output, ignoring keys a newer/older version added."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def optimizer_label(optimizer: str, base_optimizer: str) -> str:
    """What trained the run: ``adamw`` for ``--optimizer sgd --base-optimizer adamw``, ``sam(adamw)`` for SAM
    around AdamW, ``sam`` for SAM around SGD."""
    if optimizer == "sgd":
        return base_optimizer
    return optimizer if base_optimizer == "sgd" else f"{optimizer}({base_optimizer})"


@dataclass(frozen=True)
class ResumeEvery:
    """How often the trainer rewrites its resume point ``last.pt`` in the middle of an epoch (on top of every
    epoch's end). Not part of :class:`TrainConfig`: it changes what a kill costs, never the trained weights, so a
    run may be resumed with another value. Parsed from ``"3min"``, ``"90s"``, ``"1.5h"``, ``"500steps"`` or
    ``"epoch"`` (epoch ends only)."""

    seconds: float | None = 180.0  # wall-clock time between resume points (None: not by time)
    steps: int | None = None  # optimizer steps between resume points, counted over the run (None: not by steps)

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise SharpscopeError(f"resume_every: the interval must be > 0 seconds, got {self.seconds}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise SharpscopeError(f"resume_every: the step count must be an integer >= 1, got {self.steps!r}")

    @classmethod
    def parse(cls, text: str) -> ResumeEvery:
        """``"3min"`` / ``"90s"`` / ``"1.5h"`` (wall clock), ``"500steps"`` (optimizer steps), ``"epoch"``."""
        value = text.strip().lower().replace(" ", "")
        if value in ("epoch", "epochs"):
            return cls(seconds=None, steps=None)
        for suffix, kind, scale in (("steps", "steps", 1), ("step", "steps", 1), ("min", "seconds", 60.0),
                                    ("h", "seconds", 3600.0), ("s", "seconds", 1.0)):
            if value.endswith(suffix):
                number = value[: -len(suffix)]
                try:
                    amount = int(number) if kind == "steps" else float(number) * scale
                except ValueError:
                    break
                if amount != amount or amount in (float("inf"),) or amount <= 0:
                    break
                return cls(seconds=None, steps=amount) if kind == "steps" else cls(seconds=amount, steps=None)
        raise SharpscopeError(f"resume interval {text!r}: expected a time like 3min, 90s or 1.5h, a step count like "
                              "500steps, or 'epoch' (resume points at epoch ends only)")

    def due(self, step: int, seconds_since_last: float) -> bool:
        """Whether a resume point is due after optimizer step ``step`` (1-based, over the run)."""
        return bool((self.steps and step % self.steps == 0)
                    or (self.seconds is not None and seconds_since_last >= self.seconds))

    def __str__(self) -> str:
        if self.steps:
            return f"{self.steps}steps"
        if self.seconds is not None:
            return f"{self.seconds / 60:g}min" if self.seconds % 60 == 0 else f"{self.seconds:g}s"
        return "epoch"


#: The trainer's default: a resume point every 3 minutes. Writing one costs a copy of the weights and optimizer
#: state to the host and one file write (a few ms for a ResNet-20), so at most about a 1/1000 of the run's time.
DEFAULT_RESUME_EVERY = ResumeEvery()

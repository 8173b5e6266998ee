"""Sharpness-Aware Minimization as a drop-in ``torch.optim.Optimizer``.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021, Alg. 1):

1. ``g = grad L_B(w)`` (the clean pass);
2. ``eps = perturbation(g)`` (:mod:`sharpscope.optim.perturbation`; ASAM with ``adaptive=True``) and ``w <- w + eps``;
3. ``g_SAM = grad L_B(w + eps)`` (the perturbed pass);
4. restore ``w`` **exactly** (a copy of the old weights, not ``w - eps``) and let the base optimizer (SGD with
   momentum, Adam, AdamW, ...) step with ``g_SAM``.

The surface follows davda54/sam (the API users know) with its known problems fixed: ``param_groups`` *and* ``state``
are the base optimizer's, so LR schedulers, ``add_param_group`` and ``state_dict`` (momentum buffers, Adam moments,
step counts) all work and a resumed run continues bit-identically; weights are restored in place, never by
re-binding ``.data``; ``step(closure)`` returns the clean loss; arguments are validated with errors, not asserts.

Per param group: ``rho``, ``p``, ``adaptive``, ``eta`` and ``rho_schedule``. Groups with the same ``p`` share one joint
norm (the paper's single ball over all weights); groups with different ``p`` get separate balls.
Weight decay belongs to the base optimizer, so the ascent gradient carries no L2 term (as in davda54/sam; the JAX
code of the paper puts L2 into the loss instead).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.optim.bn import frozen_bn_stats
from sharpscope.optim.perturbation import (
    check_adaptive,
    check_eta,
    check_p,
    check_rho,
    joint_perturbation,
)

__all__ = ["RHO_SCHEDULES", "SAM"]

RHO_SCHEDULES = ("constant", "lr")
_SAM_GROUP_KEYS = ("rho", "p", "adaptive", "eta", "rho_schedule")
_PICKLED_ATTRS = ("base_optimizer", "sam_every", "model", "_sam_steps", "_perturbed", "_backups", "_backup_of",
                  "_held")


class SAM(Optimizer):
    """SAM / ASAM around any base optimizer; ``param_groups`` and ``state`` are shared with it.

    Args:
        params: parameters or param-group dicts, as for any optimizer; a group may override ``rho``, ``p``,
            ``adaptive``, ``eta``, ``rho_schedule`` and any base-optimizer setting.
        base_optimizer: the optimizer *class* that takes the step, e.g. ``torch.optim.SGD``.
        rho: radius of the perturbation ball, > 0. Default 0.05 (Foret et al. 2021's CIFAR default).
        p: norm of the ball, 1 <= p <= inf. Default 2 (the paper's choice; eps = rho g / ||g||_2).
        adaptive: ASAM (Kwon et al. 2021): the ball ``||eps / (|w| + eta)||_p <= rho``. ASAM needs a larger rho
            (about 0.5-2).
        eta: ASAM's offset in ``T = |w| + eta``. Default 0.01 (Kwon et al. 2021).
        rho_schedule: ``"constant"``, or ``"lr"``: ``rho_t = rho * lr_t / lr_0`` per group, with ``lr_0`` the group's
            learning rate when it was added (GSAM, Zhuang et al. ICLR 2022: rho_t proportional to lr_t).
        sam_every: take a SAM step every ``k`` steps (steps 0, k, 2k, ...); the steps in between are plain base
            steps with one forward/backward (in :meth:`step` and :func:`~sharpscope.optim.training_step`).
        model: the module these parameters belong to. With it, :meth:`step` runs the closure's perturbed pass
            under :func:`~sharpscope.optim.frozen_bn_stats`, so BatchNorm running statistics (and
            ``num_batches_tracked``) come from the clean pass only, as in the paper's code. Without it the
            optimizer cannot see the model's buffers and the closure's second call moves them too.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ``betas``, ...).

    Raises:
        SharpscopeError: on a bad ``rho``, ``p``, ``eta``, ``adaptive``, ``rho_schedule``, ``sam_every`` or
            ``base_optimizer``.

    Three ways to use it:

    * ``sharpscope.optim.training_step(model, optimizer, loss_fn, x, y)``: both passes, BatchNorm statistics from
      the clean pass only, m-sharpness, AMP and clipping handled.
    * ``optimizer.step(closure)``: ``closure`` zeroes nothing and returns ``loss_fn(model(x), y)`` after calling
      ``backward()`` on it. It runs once at ``w`` and once at ``w + eps``; construct with ``model=model`` to keep
      BatchNorm statistics clean (``SAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)``).
    * by hand: backward at ``w``; ``first_step(zero_grad=True)``; backward at ``w + eps``; ``second_step()``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        *,
        rho: float = 0.05,
        p: float = 2.0,
        adaptive: bool = False,
        eta: float = 0.01,
        rho_schedule: str = "constant",
        sam_every: int = 1,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise SharpscopeError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {base_optimizer!r}; "
                "pass the class and its settings as keywords: SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)"
            )
        if issubclass(base_optimizer, SAM):
            raise SharpscopeError("base_optimizer must not be SAM itself; pass the optimizer that takes the step")
        if not isinstance(sam_every, int) or isinstance(sam_every, bool) or sam_every < 1:
            raise SharpscopeError(f"sam_every must be an integer >= 1, got {sam_every!r}; 1 takes SAM every step")
        defaults = dict(
            rho=rho, p=p, adaptive=adaptive, eta=eta, rho_schedule=rho_schedule, **base_kwargs
        )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise SharpscopeError(f"model must be the torch.nn.Module the parameters belong to, got {model!r}")
        self.sam_every = sam_every
        self.model = model  # whose normalization statistics the perturbed closure pass must not move
        self._sam_steps = 0  # steps taken (SAM or plain), drives sam_every; saved in state_dict
        self._perturbed: list[Tensor] = []  # parameters currently at w + eps
        self._backups: list[Tensor] = []  # their exact old values, same order
        self._backup_of: dict[Tensor, Tensor] = {}  # persistent backup buffer per parameter (reused every step)
        self._held = False  # a SAM step whose perturbed passes ran on separate tensors (see hold)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            _set_lr0(group)

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM *and* the base optimizer (the two share ``param_groups``), validating SAM keys."""
        for key in _SAM_GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        param_group["rho"] = check_rho(param_group["rho"], allow_zero=False)
        param_group["p"] = check_p(param_group["p"])
        param_group["adaptive"] = check_adaptive(param_group["adaptive"])
        param_group["eta"] = check_eta(param_group["eta"])
        if param_group["rho_schedule"] not in RHO_SCHEDULES:
            raise unknown_name_error("rho schedule", str(param_group["rho_schedule"]), RHO_SCHEDULES)
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__: the base optimizer is built from these groups afterwards
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)
            _set_lr0(param_group)

    # ------------------------------------------------------------------ status

    @property
    def is_perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` (the weights are at ``w + eps``), and after
        :meth:`hold`."""
        return bool(self._perturbed) or self._held

    @property
    def sam_step_due(self) -> bool:
        """Whether the next step is a SAM step under ``sam_every`` (steps 0, k, 2k, ... are)."""
        return self._sam_steps % self.sam_every == 0

    @staticmethod
    def scheduled_rho(group: dict[str, Any]) -> float | Tensor:
        """The radius used for ``group`` now: ``rho``, or with ``rho_schedule="lr"`` ``max(rho * lr / lr_0, 0)``."""
        if group["rho_schedule"] == "constant":
            return group["rho"]
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return (lr * (group["rho"] / group["lr0"])).clamp(min=0.0)
        return max(group["rho"] * lr / group["lr0"], 0.0)

    # ------------------------------------------------------------------ the two half steps

    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to ``w + eps`` using the gradients in ``p.grad``; store the exact old weights.

        Parameters without a gradient are not moved and do not enter the norm.

        Raises:
            SharpscopeError: if the weights are already perturbed (``first_step`` twice without ``second_step``).
        """
        self.perturb(None)
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly (copy), then take the base optimizer's step with the current gradients.

        Raises:
            SharpscopeError: if :meth:`first_step` was not called first.
        """
        if not self.is_perturbed:
            raise SharpscopeError(
                "second_step() needs a preceding first_step(): the weights are not perturbed; call "
                "first_step() after the clean backward pass"
            )
        self.restore()
        self.base_optimizer.step()
        self._sam_steps += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SAM step; returns the clean loss (the closure's value at ``w``).

        With a closure (which computes the loss, calls ``backward()`` and returns the loss): gradients are zeroed,
        ``closure()`` runs at ``w``, :meth:`first_step`, ``closure()`` runs at ``w + eps``, :meth:`second_step`. On the
        steps that ``sam_every`` skips, the closure runs once and the base optimizer steps.

        Without a closure: the second half of a step whose first half the caller did (:meth:`second_step` after
        :meth:`first_step`; this is how ``GradScaler.step`` drives SAM), or a plain base step on a step that
        ``sam_every`` skips.

        Raises:
            SharpscopeError: without a closure on a SAM step whose :meth:`first_step` was not called; with a
                closure while the weights are already perturbed.
        """
        if closure is None:
            if self.is_perturbed:
                self.second_step()
            elif not self.sam_step_due:
                self.base_optimizer.step()
                self._sam_steps += 1
            else:
                raise SharpscopeError(
                    "SAM.step() without a closure only finishes a step begun with first_step(); pass a closure "
                    "that computes the loss and calls backward(), use first_step()/second_step(), or "
                    "sharpscope.optim.training_step"
                )
            return None
        if self.is_perturbed:
            raise SharpscopeError("SAM.step(closure) called while perturbed; call second_step() to finish first")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if not self.sam_step_due:
            self.base_optimizer.step()
            self._sam_steps += 1
            return loss
        self.first_step(zero_grad=True)
        clean_stats = frozen_bn_stats(self.model) if self.model is not None else contextlib.nullcontext()
        with torch.enable_grad(), clean_stats:
            closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------ building blocks (used by training_step)

    @torch.no_grad()
    def perturb(self, grads: Sequence[Tensor | None] | None = None) -> None:
        """Move every parameter with a gradient to ``w + eps``, keeping an exact copy of ``w``.

        Args:
            grads: one gradient (or ``None``) per parameter, in ``param_groups`` order; ``None`` reads ``p.grad``.
                ``training_step`` passes explicit gradients so ``p.grad`` can accumulate SAM gradients meanwhile.

        Raises:
            SharpscopeError: if already perturbed, or if ``grads`` does not have one entry per parameter.
        """
        if self.is_perturbed:
            raise SharpscopeError(
                "first_step() was called twice without second_step(): the weights are already at w + eps; "
                "call second_step() (or restore()) first"
            )
        n_params = sum(len(g["params"]) for g in self.param_groups)
        if grads is not None and len(grads) != n_params:
            raise SharpscopeError(
                f"perturb() needs one gradient (or None) per parameter: got {len(grads)} for {n_params}"
            )
        families: dict[float, tuple[list, list, list, list, list]] = {}
        i = 0
        for group in self.param_groups:
            rho = self.scheduled_rho(group)
            for param in group["params"]:
                grad = param.grad if grads is None else grads[i]
                i += 1
                if grad is None:
                    continue
                fam = families.setdefault(group["p"], ([], [], [], [], []))
                fam[0].append(param)
                fam[1].append(grad)
                fam[2].append(rho)
                fam[3].append(group["adaptive"])
                fam[4].append(group["eta"])
        for p, (params, gs, rhos, adaptive, etas) in families.items():
            eps = joint_perturbation(gs, params, rhos=rhos, p=p, adaptive=adaptive, etas=etas)
            backups = [self._backup_buffer(w) for w in params]
            torch._foreach_copy_(backups, params)
            torch._foreach_add_(params, eps)  # climb to the local maximum w + eps
            self._perturbed.extend(params)
            self._backups.extend(backups)

    def hold(self) -> None:
        """Count the weights as perturbed without moving them, so that ``step()`` finishes a SAM step: it takes
        the base optimizer's step (there is nothing to restore) and counts a SAM step.

        For callers that ran the perturbed passes on separate tensors ``w + eps_j`` and accumulated the SAM
        gradient in ``p.grad`` (``training_step``'s batched m-SAM micro-batches), also through ``GradScaler.step``.

        Raises:
            SharpscopeError: if already perturbed.
        """
        if self.is_perturbed:
            raise SharpscopeError("hold() called while perturbed; call second_step() (or restore()) first")
        self._held = True

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the stored weights back (bit-exact ``w``); a no-op when not perturbed. No optimizer step."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._backups)
        self._perturbed = []
        self._backups = []
        self._held = False

    def skip_step(self) -> None:
        """Count a step that was not taken (e.g. ``GradScaler`` found inf/NaN), restoring ``w`` if perturbed."""
        self.restore()
        self._sam_steps += 1

    def _backup_buffer(self, param: Tensor) -> Tensor:
        buf = self._backup_of.get(param)
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype or buf.device != param.device:
            buf = torch.empty_like(param, memory_format=torch.preserve_format)
            self._backup_of[param] = buf
        return buf

    # ------------------------------------------------------------------ checkpoints

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's keeps only defaults/state/param_groups; copy.deepcopy and pickle need the base optimizer too.
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in _PICKLED_ATTRS})
        return state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (groups with SAM's keys, momentum/moments/steps) plus ``"sam"``.

        ``"sam"`` holds the step counter that drives ``sam_every``. Loadable with ``torch.load(weights_only=True)``.
        The stored old weights are not saved: checkpoint between steps, not between the two half steps.
        """
        state = super().state_dict()
        state["sam"] = {"steps": self._sam_steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` into SAM and the base optimizer and re-link the shared groups and state.

        Raises:
            SharpscopeError: while perturbed (the old weights would be lost).
        """
        if self.is_perturbed:
            raise SharpscopeError("load_state_dict() while perturbed; call second_step() or restore() first")
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", None) or {}
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:  # a plain optimizer's state dict has no SAM keys: keep ours
            for key in _SAM_GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
            _set_lr0(group)
        self._sam_steps = int(sam_state.get("steps", 0))


def _set_lr0(group: dict[str, Any]) -> None:
    """Record the group's reference learning rate for ``rho_schedule="lr"`` (once, as a float)."""
    if "lr0" not in group:
        lr = group.get("lr")
        group["lr0"] = float(lr) if lr is not None else math.nan
    if group["rho_schedule"] == "lr" and not (group["lr0"] > 0):
        raise SharpscopeError(
            f"rho_schedule='lr' scales rho by lr / lr_0 and needs lr_0 > 0, got lr={group.get('lr')!r}; "
            "construct the optimizer with the peak learning rate (schedulers may lower it afterwards)"
        )

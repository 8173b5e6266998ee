"""Build the optimizers sharpscope trains with from names (what the CLI and the trainer pass)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.optim.sam import SAM

__all__ = ["BASE_OPTIMIZERS", "OPTIMIZER_NAMES", "create_optimizer"]

OPTIMIZER_NAMES = ("sgd", "sam", "asam")  # "sgd": the base optimizer alone; "sam"/"asam": wrapped in SAM
BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
_SAM_ONLY = {"sam_every": 1, "rho_schedule": "constant"}  # SAM-only options and their no-op values


def create_optimizer(
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    *,
    name: str = "sgd",
    base: str = "sgd",
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    rho: float = 0.05,
    p: float = 2.0,
    eta: float = 0.01,
    nesterov: bool = False,
    **extra: Any,
) -> Optimizer:
    """The optimizer ``name`` stepping with ``base``.

    Args:
        params: parameters or param-group dicts.
        name: ``"sgd"`` (the base optimizer alone, no SAM), ``"sam"`` (Foret et al. 2021) or ``"asam"``
            (SAM with ``adaptive=True``, Kwon et al. 2021).
        base: the optimizer that takes the step: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: heavy-ball momentum, for ``base="sgd"`` only (Adam's are its ``betas``, passed in ``extra``).
            Default 0.9 (the SAM paper's and DESIGN.md's setting).
        weight_decay: passed to the base optimizer (L2 for sgd/adam, decoupled for adamw); the SAM ascent step
            does not see it.
        rho, p, eta: SAM's radius, norm and ASAM offset (ignored for ``name="sgd"``).
        nesterov: Nesterov momentum (``base="sgd"`` only).
        **extra: ``sam_every`` and ``rho_schedule`` go to :class:`SAM` (with ``name="sgd"`` only their no-op values
            1 and "constant" are accepted, so a trainer can always pass them); anything else goes to the base
            optimizer (``betas``, ``eps``, ``dampening``, ``foreach``, ...).

    Raises:
        SharpscopeError: unknown ``name`` or ``base``; ``nesterov`` without ``base="sgd"``; SAM-only options with
            ``name="sgd"``; and every error of :class:`SAM`.
    """
    if name not in OPTIMIZER_NAMES:
        raise unknown_name_error("optimizer", name, OPTIMIZER_NAMES)
    if base not in BASE_OPTIMIZERS:
        raise unknown_name_error("base optimizer", base, BASE_OPTIMIZERS)
    base_kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if base == "sgd":
        base_kwargs.update(momentum=momentum, nesterov=nesterov)
    elif nesterov:
        raise SharpscopeError(f"nesterov=True applies to base='sgd' only, got base={base!r}; drop nesterov")
    sam_kwargs = {key: extra.pop(key) for key in _SAM_ONLY if key in extra}
    base_kwargs.update(extra)
    if name == "sgd":
        active = {key: value for key, value in sam_kwargs.items() if value != _SAM_ONLY[key]}
        if active:
            raise SharpscopeError(
                f"{', '.join(f'{k}={v!r}' for k, v in active.items())} only applies to name='sam' or 'asam', "
                "got name='sgd'; drop it or use SAM"
            )
        return BASE_OPTIMIZERS[base](params, **base_kwargs)
    return SAM(
        params,
        BASE_OPTIMIZERS[base],
        rho=rho,
        p=p,
        adaptive=name == "asam",
        eta=eta,
        **sam_kwargs,
        **base_kwargs,
    )

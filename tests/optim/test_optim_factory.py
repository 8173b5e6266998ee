"""create_optimizer: names to optimizers, settings routed to the right place, errors."""

from __future__ import annotations

import pytest
import torch
from optim_cases import tiny_mlp

from sharpscope.errors import SharpscopeError
from sharpscope.optim import SAM, create_optimizer


def test_sgd_is_the_base_optimizer_alone_with_momentum_and_decay():
    opt = create_optimizer(tiny_mlp().parameters(), name="sgd", lr=0.1, weight_decay=1e-4, nesterov=True,
                           sam_every=1, rho_schedule="constant")  # no-op SAM settings are accepted
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 1e-4, True)


@pytest.mark.parametrize(("name", "adaptive"), [("sam", False), ("asam", True)])
@pytest.mark.parametrize(("base", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW)])
def test_sam_variants_wrap_the_base(name, adaptive, base, cls):
    opt = create_optimizer(tiny_mlp().parameters(), name=name, base=base, lr=0.01, weight_decay=0.05, rho=0.3,
                           p=3.0, eta=0.02, sam_every=2, rho_schedule="lr")
    assert isinstance(opt, SAM) and type(opt.base_optimizer) is cls
    group = opt.param_groups[0]
    assert (group["rho"], group["p"], group["adaptive"], group["eta"]) == (0.3, 3.0, adaptive, 0.02)
    assert group["weight_decay"] == 0.05 and group["rho_schedule"] == "lr" and opt.sam_every == 2
    assert ("momentum" in group) == (base == "sgd")  # momentum only for sgd; Adam keeps its betas


def test_extra_settings_reach_the_base_optimizer():
    opt = create_optimizer(tiny_mlp().parameters(), name="sam", base="adam", lr=0.01, betas=(0.8, 0.9))
    assert opt.base_optimizer.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "sma"}, r"unknown optimizer 'sma'; did you mean 'sam'\?"),
        ({"base": "adamm"}, r"unknown base optimizer 'adamm'; did you mean 'adam'"),
        ({"base": "adam", "nesterov": True}, r"nesterov=True applies to base='sgd' only, got base='adam'"),
        ({"name": "sgd", "sam_every": 2}, r"sam_every=2 only applies to name='sam' or 'asam'"),
        ({"name": "sgd", "rho_schedule": "lr"}, r"rho_schedule='lr' only applies"),
        ({"name": "sam", "rho": 0}, r"rho must be > 0, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(SharpscopeError, match=match):
        create_optimizer(tiny_mlp().parameters(), **{"lr": 0.1, **kwargs})

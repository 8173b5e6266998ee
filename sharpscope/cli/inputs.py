"""The analysis commands' inputs: the loaders live in :mod:`sharpscope.inputs` (library code, re-exported here for
older imports); this module adds the ``--loss`` option the three analysis commands share."""

from __future__ import annotations

from collections.abc import Callable

import click

from sharpscope.inputs import (  # noqa: F401  re-exported
    _LAST_DATASET,
    AnalysisLoss,
    FixedBatches,
    analysis_inputs,
    check_finite_loss,
    expand_checkpoints,
    run_names,
)


def loss_option(f: Callable) -> Callable:
    """``--loss SPEC``: the loss to analyse with instead of the one each checkpoint recorded."""
    return click.option(
        "--loss", "loss", default=None, metavar="MODULE:FACTORY[:k=v,...]",
        help="Loss to analyse with, as package.module:factory[:k=v,...] (as for train --loss) [default: the loss "
             "each checkpoint recorded; cross-entropy when none, e.g. plain state_dicts]. Checkpoints that recorded "
             "different losses are refused unless --loss is given.")(f)

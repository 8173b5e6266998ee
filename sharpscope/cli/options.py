"""Options and parameter types shared by the commands (one definition each, so they read the same everywhere)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from sharpscope.inputs import (  # noqa: F401  the library's definitions, used by the commands through here
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_EVAL_SPLIT,
    DEFAULT_NUM_SAMPLES,
    default_out,
    resolve_device,
)

#: Largest magnitude accepted by the float list/grid options. The computations run in float32 (max ~3.4e38) and
#: scale these values (2 * rho, rho * |w|, ...): beyond this torch refuses to convert them, and no sensible radius,
#: step or grid coordinate comes anywhere near it.
FLOAT_LIMIT = 1e30


class FloatList(click.ParamType):
    """A comma-separated list of floats: ``0.01,0.05,0.1``."""

    name = "FLOAT,..."

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param, ctx) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            values = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"expected comma-separated numbers like 0.01,0.05, got {value!r}", param, ctx)
        if not values:
            self.fail(f"expected at least one number, got {value!r}", param, ctx)
        if any(v != v or v in (float("inf"), float("-inf")) for v in values):
            self.fail(f"expected finite numbers, got {value!r}", param, ctx)
        if any(abs(v) > FLOAT_LIMIT for v in values):
            self.fail(f"expected numbers of magnitude <= {FLOAT_LIMIT:g}, got {value!r}", param, ctx)
        if self.positive and any(v <= 0 for v in values):
            self.fail(f"expected numbers > 0, got {value!r}", param, ctx)
        return values


class IntList(click.ParamType):
    """A comma-separated list of positive integers: ``1,8,32,128``."""

    name = "INT,..."

    def convert(self, value: Any, param, ctx) -> list[int]:
        if isinstance(value, list):
            return value
        parts = [v.strip() for v in str(value).split(",") if v.strip()]
        if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
            self.fail(f"expected comma-separated positive integers like 1,8,32, got {value!r}", param, ctx)
        values = [int(p) for p in parts]
        if any(v <= 0 for v in values):
            self.fail(f"expected integers > 0, got {value!r}", param, ctx)
        return values


class GridRange(click.ParamType):
    """A grid ``START:STOP:NUM`` (like ``numpy.linspace``): ``-1:1:51`` is 51 points from -1 to 1."""

    name = "START:STOP:NUM"

    def convert(self, value: Any, param, ctx) -> tuple[float, float, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            self.fail(f"expected START:STOP:NUM like -1:1:51, got {value!r}", param, ctx)
        if not all(abs(v) < float("inf") for v in (start, stop)):
            self.fail(f"expected finite START and STOP, got {value!r}", param, ctx)
        if not all(abs(v) <= FLOAT_LIMIT for v in (start, stop)):
            self.fail(f"expected START and STOP of magnitude <= {FLOAT_LIMIT:g}, got {value!r}", param, ctx)
        if num < 2 or num > 10001:
            self.fail(f"expected NUM between 2 and 10001, got {num}", param, ctx)
        if not start < stop:
            self.fail(f"expected START < STOP, got {value!r}", param, ctx)
        return (start, stop, num)


class OutDir(click.Path):
    """``--out``: a folder path. An empty value (often an unset shell variable) is refused: it would mean the
    current folder and scatter results there."""

    def convert(self, value: Any, param, ctx) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("expected a folder to write into, got an empty value (an unset variable?)", param, ctx)
        return super().convert(value, param, ctx)


#: Largest sample count or batch size accepted: torch sizes are int64, and no evaluation set comes near 2**31.
MAX_COUNT = 2**31 - 1

#: Largest --seed: seeds are offset (seed + k) for independent streams and must stay below 2**64 for torch.
MAX_SEED = 2**32 - 1


def _compose(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


def eval_set_options(f: Callable) -> Callable:
    """``--dataset --split --num-samples --batch-size --data-dir``: the fixed evaluation set of an analysis."""
    return _compose(
        click.option("--dataset", default=None, metavar="NAME",
                     help="Dataset to evaluate on [default: the one the checkpoint was trained on]."),
        click.option("--split", type=click.Choice(["train", "test"]), default=DEFAULT_EVAL_SPLIT, show_default=True,
                     help="Which split the evaluation samples come from."),
        click.option("--num-samples", type=click.IntRange(min=1, max=MAX_COUNT), default=DEFAULT_NUM_SAMPLES,
                     show_default=True,
                     help="First N samples of the split (fixed order); N larger than the split means the whole split."),
        click.option("--batch-size", type=click.IntRange(min=1, max=MAX_COUNT), default=DEFAULT_EVAL_BATCH_SIZE,
                     show_default=True,
                     help="Evaluation batch size (memory only: results do not depend on it beyond float rounding)."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder holding the dataset files [default: $SHARPSCOPE_DATA, the user cache, system paths]."),
    )(f)


def model_spec_option(f: Callable) -> Callable:
    """``--model SPEC``: which model a plain ``state_dict`` file (saved by other code) holds."""
    return click.option("--model", "model_spec", default=None, metavar="SPEC",
                        help="For plain state_dict files saved by other code: a registered NAME[:key=value,...] "
                             "(e.g. resnet20) or package.module:factory[:key=value,...]; sharpscope checkpoints "
                             "need none.")(f)


def loss_option(f: Callable) -> Callable:
    """``--loss SPEC``: the loss to analyse with instead of the one each checkpoint recorded."""
    return click.option(
        "--loss", "loss", default=None, metavar="MODULE:FACTORY[:k=v,...]",
        help="Loss to analyse with, as package.module:factory[:k=v,...] (as for train --loss) [default: the loss "
             "each checkpoint recorded; cross-entropy when none, e.g. plain state_dicts]. Checkpoints that recorded "
             "different losses are refused unless --loss is given.")(f)


def device_option(f: Callable) -> Callable:
    """``--device``: cpu, cuda, cuda:1, ... [default: cuda when available]."""
    return click.option("--device", default=None, metavar="DEVICE",
                        help="Where to compute: cpu, cuda, cuda:1 [default: cuda when available, else cpu].")(f)


def out_options(f: Callable) -> Callable:
    """``--out DIR`` (default: :func:`default_out`, resolved by the command) and ``--overwrite``."""
    return _compose(
        click.option("--out", "out", default=None, type=OutDir(),
                     help="Folder to write results into [default: results/RUN-COMMAND]."),
        click.option("--overwrite", is_flag=True, help="Replace results already in --out."),
    )(f)


def figure_options(f: Callable) -> Callable:
    """``--format png,pdf,svg`` and ``--dpi``: how figures are written (:class:`sharpscope.plots.output.FigureOutput`).

    The command receives ``figure_output``, a ``FigureOutput``; a bad value is one usage line (exit 2).
    """
    from sharpscope.plots.output import DEFAULT_DPI

    def to_output(ctx, param, value):
        from sharpscope.errors import UsageError
        from sharpscope.plots.output import FigureOutput

        formats = ctx.params.pop("figure_formats", "png")
        try:
            return FigureOutput.parse(formats, value)
        except UsageError as err:
            raise click.BadParameter(str(err).split(": ", 1)[-1], ctx=ctx, param_hint="'--format'/'--dpi'") from None

    return _compose(
        click.option("--format", "figure_formats", default="png", show_default=True, metavar="FMT[,FMT...]",
                     is_eager=True,
                     help="Figure file formats, comma-separated: png, pdf, svg (one file per format and figure)."),
        click.option("--dpi", "figure_output", type=click.IntRange(30, 1200), default=DEFAULT_DPI,
                     show_default=True, callback=to_output,
                     help="Resolution of raster figures (dots per inch)."),
    )(f)


def seed_option(f: Callable) -> Callable:
    """``--seed``: every random choice (directions, probe vectors, shuffling) derives from it."""
    return click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED), default=0, show_default=True,
                        help="Random seed.")(f)


def show_progress(ctx: click.Context | None = None) -> bool:
    """Progress bars unless ``-q`` was given."""
    ctx = ctx or click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return not (root and root.obj and root.obj.get("quiet"))

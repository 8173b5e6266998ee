"""The ``sharpscope`` command group.

Subcommands live one per module in ``sharpscope.cli`` and are imported only when run, so ``sharpscope --help``
does not import torch. A :class:`~sharpscope.errors.SharpscopeError` (or an ``OSError``: disk full, permission
denied) raised by any command is printed as one ``Error: ...`` line with exit code 1; bad usage (click's own
checks, and a :class:`~sharpscope.errors.UsageError` such as an unknown dataset name) exits with 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from sharpscope import __version__
from sharpscope.errors import SharpscopeError, UsageError

#: command name -> (module, one-line help). Order is the order of a study.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sharpscope.cli.train", "Train a model with SGD, SAM or ASAM; write checkpoints along the way."),
    "landscape": ("sharpscope.cli.landscape", "Loss surfaces around checkpoints (1D/2D, interpolation, PCA)."),
    "hessian-spectrum": ("sharpscope.cli.hessian_spectrum", "Hessian top eigenvalues, trace and spectral density."),
    "sharpness": ("sharpscope.cli.sharpness", "m-sharpness and other sharpness measures of checkpoints."),
    "report": ("sharpscope.cli.report", "One HTML report comparing training runs (SGD vs SAM)."),
}


def _forget_empty_outputs() -> None:
    """A failed command leaves no empty --out folder behind (only folders it created itself and left empty)."""
    from sharpscope.io import remove_if_still_empty

    remove_if_still_empty()


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return None
        return module.command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = click.utils.make_str(args[0]) if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, list(COMMANDS), n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint} (commands: {', '.join(COMMANDS)})")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, short) for name, (_, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SharpscopeError as exc:
            _forget_empty_outputs()
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, UsageError) else 1)
        except OSError as exc:  # the environment, not a bug: a full disk, a path too long, a folder not readable
            _forget_empty_outputs()
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted; finished work is saved and the same command resumes it.", err=True)
            sys.exit(130)
        finally:
            inputs = sys.modules.get("sharpscope.inputs")  # not imported by --help: keep that instant
            if inputs is not None:
                inputs._LAST_DATASET.clear()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sharpscope")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less output: no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """See why a network generalizes: train with SGD or SAM, then measure how sharp the minimum is.

    \b
    A study, in order:
      sharpscope train --optimizer sgd --out runs/sgd
      sharpscope train --optimizer sam --rho 0.05 --out runs/sam
      sharpscope landscape runs/sam/final.pt --compare runs/sgd/final.pt --out results/landscape
      sharpscope hessian-spectrum runs/sgd/ckpt-*.pt runs/sam/ckpt-*.pt --out results/spectrum
      sharpscope sharpness runs/*/final.pt --m 1,8,32 --rho 0.01,0.05,0.1 --out results/sharpness
      sharpscope report runs/sgd runs/sam --out results/report
    """
    level = logging.WARNING - 10 * verbose + 10 * quiet
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet > 0

"""``python -m sharpscope`` runs the command-line interface."""

from sharpscope.cli.main import cli

if __name__ == "__main__":
    cli(prog_name="sharpscope")

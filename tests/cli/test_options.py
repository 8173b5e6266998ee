"""The shared CLI parameter types accept the documented formats and reject everything else with exit code 2."""

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpscope.cli.options import FloatList, GridRange, IntList


@click.command()
@click.option("--grid", type=GridRange())
@click.option("--m", type=IntList())
@click.option("--rho", type=FloatList(positive=True))
def probe(grid, m, rho):
    click.echo(repr((grid, m, rho)))


def run(*args):
    return CliRunner().invoke(probe, list(args))


def test_valid_values_parse():
    result = run("--grid", "-1:1:51", "--m", "1,8,32", "--rho", "0.01,0.05")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "((-1.0, 1.0, 51), [1, 8, 32], [0.01, 0.05])"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "1:-1:5"], "START < STOP"),
        (["--grid", "-1:1"], "START:STOP:NUM"),
        (["--grid", "-1:1:1"], "NUM between 2"),
        (["--grid", "a:b:c"], "START:STOP:NUM"),
        (["--grid", "-inf:1:5"], "finite"),
        (["--m", "0,8"], "> 0"),
        (["--m", "1.5"], "positive integers"),
        (["--rho", "-0.1"], "> 0"),
        (["--rho", "nan"], "finite"),
        (["--rho", "x"], "comma-separated numbers"),
    ],
)
def test_invalid_values_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_random_text_never_tracebacks(text):
    for option in ("--grid", "--m", "--rho"):
        result = run(option, text)
        assert result.exit_code in (0, 2), (option, text, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("typo, suggestion", [("landscpe", "'landscape'"), ("hessian", "'hessian-spectrum'"),
                                              ("sharpnes", "'sharpness'"), ("zzz", None)])
def test_command_typos_suggest_close_matches(typo, suggestion):
    from sharpscope.cli.main import cli

    result = CliRunner().invoke(cli, [typo])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: No such command '{typo}'.") and "commands: train, landscape" in line, line
    assert (f"Did you mean {suggestion}" in line) if suggestion else ("Did you mean" not in line), line


def test_default_out_names_the_runs_and_the_command(tmp_path):
    from sharpscope.cli.options import default_out

    for run in ("seed0/sgd", "seed1/sgd", "sam"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text("{}")
        (tmp_path / run / "final.pt").write_bytes(b"")
    (tmp_path / "foreign.pt").write_bytes(b"")
    assert default_out("landscape", [str(tmp_path / "sam" / "final.pt")]) == "results/sam-landscape"
    assert default_out("hessian-spectrum", [str(tmp_path / "seed0/sgd"), str(tmp_path / "seed1/sgd/final.pt")]) \
        == "results/seed0_sgd+seed1_sgd-hessian-spectrum"
    assert default_out("sharpness", [str(tmp_path / "foreign.pt"), str(tmp_path / "sam")]) \
        == "results/sam+foreign-sharpness"

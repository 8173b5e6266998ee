"""``examples/reproduce_readme.py`` on tiny settings (1 epoch on 256 samples, 2 seeds, 64 evaluation samples, a 3x3
grid): both Markdown tables come out with numbers in every column, in the README's layout, and a rerun trains and
computes nothing again."""

import re

import pytest
from example_scripts import EXAMPLES, load_example

TINY = ["--seeds", "0,1", "--jobs", "2", "--train-option=--epochs=1", "--train-option=--train-samples=256",
        "--report-option=--num-samples=64", "--report-option=--grid=-1:1:3", "--report-option=--m=8,32",
        "--report-option=--rho=0.05", "--report-option=--top-k=1", "--report-option=--density-iters=4",
        "--report-option=--sharpness-steps=1", "--report-option=--max-chunks=2"]
NUMBER = r"-?\d+(\.\d+)?(e-?\d+)?"


@pytest.fixture(scope="module")
def script():
    return load_example("reproduce_readme")


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.slow
def test_tiny_tables_then_rerun_reuses_everything(script, tmp_path, capsys):
    out = tmp_path / "readme"
    script.main([*TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    markdown = (out / "tables.md").read_text()
    assert markdown in printed
    rows = _rows(markdown)
    headers = [r for r in rows if r[0] == "run"]
    assert len(headers) == 2, markdown
    assert headers[0] == ["run", "test acc (%)", "gap (pp)", "λ_max", "trace (adaptive Hutch++)",
                          "worst-case m-sharpness, ρ 0.05, m 8"], headers[0]
    body = [r for r in rows if r[0] not in ("run", "---")]
    labels = [r[0] for r in body]
    assert labels == ["SGD", "SAM (ρ 0.05)", "difference", "SGD, 2 seeds", "SAM (ρ 0.05), 2 seeds",
                      "difference"], labels
    for row in body:
        assert len(row) == 6, row
        if row[0] == "difference":
            for text in row[1:]:  # every column judged: "resolved (2.3σ)", "not resolved (0.4σ)", "resolved (exact)"
                assert re.fullmatch(r"(not )?resolved \((\d+\.\d|exact)σ?\)|equal", text), (row, text)
        else:  # a number in every column with its error; λ_max of one run is exact (no error shown)
            for column, text in enumerate(row[1:], start=1):
                exact = column == 3 and "seeds" not in row[0]
                pattern = f"{NUMBER}" if exact else f"{NUMBER} ± {NUMBER}"
                assert re.fullmatch(pattern, text), (row[0], column, text)
    assert (out / "report-seed0" / "report.html").is_file() and (out / "report-seeds" / "report.html").is_file()

    script.main([*TINY, "--out", str(out)])  # everything on disk: nothing is trained, every analysis reused
    again = capsys.readouterr().out
    assert " train " not in again, again
    assert (out / "tables.md").read_text() == markdown
    for log in ("report-seed0.log", "report-seeds.log"):
        text = (out / log).read_text()
        assert "re-rendering it from the analyses" in text and "computing" not in text, text


def test_cell_rounds_to_the_error(script):
    assert script.cell(0.98611, 0.00617, scale=100) == "98.61 ± 0.62"
    assert script.cell(7.8123, 0.1101) == "7.81 ± 0.11"
    assert script.cell(0.023012, 0.00431) == "0.0230 ± 0.0043"
    assert script.cell(1.44123, 0.0) == "1.441"  # exact at these digits
    assert script.cell(float("nan"), 0.1) == "-"
    assert script.cell(123.4, 12.0) == "123 ± 12"


def test_list_names_the_other_scripts(script, capsys):
    script.main(["--list"])
    printed = capsys.readouterr().out
    for name in ("reproduce_fashion_mnist.py", "m_sharpness_sweep.py"):
        assert name in printed and (EXAMPLES / name).is_file()


def test_bad_seeds_is_one_usage_line(script, capsys):
    with pytest.raises(SystemExit) as info:
        script.main(["--seeds", "0,x"])
    assert info.value.code == 2
    assert "--seeds 0,x: expected comma-separated integers" in capsys.readouterr().err

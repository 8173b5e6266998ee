"""Figure output: formats and resolution (``--format``, ``--dpi``)."""

import click
import matplotlib
import pytest
from click.testing import CliRunner

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sharpscope.cli.options import figure_options  # noqa: E402
from sharpscope.errors import UsageError  # noqa: E402
from sharpscope.plots.output import FigureOutput  # noqa: E402


def test_save_writes_one_file_per_format_with_the_requested_resolution(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    paths = FigureOutput.parse("png,pdf,svg", 100).save(fig, tmp_path, "curve")
    assert [p.name for p in paths] == ["curve.png", "curve.pdf", "curve.svg"]
    assert paths[1].read_bytes().startswith(b"%PDF") and b"<svg" in paths[2].read_bytes()
    from PIL import Image

    assert Image.open(paths[0]).info["dpi"][0] == pytest.approx(100, abs=1)


@pytest.mark.parametrize("formats, dpi, message", [
    ("jpg", 200, "unknown figure format"), ("png,png", 200, "repeated"), ("", 200, "at least one"),
    ("png", 10, "expected 30..1200"),
])
def test_bad_values_are_one_usage_line(formats, dpi, message):
    with pytest.raises(UsageError, match=message):
        FigureOutput.parse(formats, dpi)


def test_cli_options_give_the_command_a_figure_output():
    @click.command()
    @figure_options
    def cmd(figure_output):
        click.echo(f"{figure_output.formats} {figure_output.dpi}")

    runner = CliRunner()
    assert runner.invoke(cmd, []).output.strip() == "('png',) 200"
    assert runner.invoke(cmd, ["--dpi", "300", "--format", "pdf,PNG"]).output.strip() == "('pdf', 'png') 300"
    bad = runner.invoke(cmd, ["--format", "jpg"])
    assert bad.exit_code == 2 and "unknown figure format" in bad.output

"""``sharpscope report`` end to end on two tiny digits runs: every section filled, analyses reused, bad input refused."""

import re

import pytest
from click.testing import CliRunner

from sharpscope.cli.main import cli

QUICK = ["--grid", "-1:1:3", "--m", "64", "--rho", "0.05", "--top-k", "1", "--num-samples", "128",
         "--density-iters", "5", "--sharpness-steps", "1", "--max-chunks", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for optimizer in ("sgd", "sam"):
        result = invoke("train", "--dataset", "digits", "--model", "mlp", "--optimizer", optimizer, "--epochs", "2",
                        "--batch-size", "64", "--out", str(root / optimizer))
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """``sharpscope report sgd sam`` (QUICK settings, analyses two at a time) into a fresh folder, and what it
    printed."""
    out = tmp_path_factory.mktemp("report") / "report"
    result = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--jobs", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


def files_in(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_report_fills_every_section_in_the_order_the_runs_were_given(report):
    out, output = report
    assert f"wrote {out}/report.html" in output
    page = (out / "report.html").read_text()
    for title in ("Summary", "Learning curves", "Loss landscapes", "Hessian spectrum", "Sharpness", "Configurations"):
        assert f">{title}</h2>" in page, title
    images = re.findall(r'src="data:image/png;base64,', page)
    assert len(images) >= 6, f"only {len(images)} figures embedded"
    rows = re.findall(r"<tr><td>(sgd|sam)</td>(.*?)</tr>", page)
    assert [r[0] for r in rows] == ["sgd", "sam"]
    assert all("<td>-</td>" not in r[1] for r in rows), rows  # λ_max, trace and sharpness all filled
    verdict = re.findall(r"<tr><td>difference between runs</td>(.*?)</tr>", page)
    assert verdict and re.search(r"(not resolved|resolved) \(\d", verdict[0]), verdict  # every difference judged
    assert "difference between runs" in output  # the printed table too
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions.index("surface3d sgd") < captions.index("surface3d sam"), captions
    for name in ("learning_curves.png", "top_eigenvalues.png", "density.png", "sharpness_vs_rho.png", "report.json"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_report_figures_list_the_runs_in_the_order_given(runs, report):
    from sharpscope.report import read_analyses, read_run, report_figures

    out, _ = report
    for order in (["sgd", "sam"], ["sam", "sgd"]):
        figures = report_figures([read_run(runs / name) for name in order], read_analyses(out))
        for name, figure in figures.items():  # every run's curves on one set of axes, named in one legend
            if name == "learning_curves.png":
                continue
            assert len([ax for ax in figure.axes if ax.lines]) == 1, (name, [ax.get_title() for ax in figure.axes])
            legends = [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend())]
            texts = [t.get_text() for legend in legends for t in legend.get_texts()]
            assert [t for t in texts if t in order] == order, (name, texts)
        curves = figures["learning_curves.png"]  # loss and accuracy panels, each with every run (train and test)
        assert [len(ax.lines) for ax in curves.axes] == [4, 4]
        assert [ax.get_legend() for ax in curves.axes] == [None, None]  # no legend over the curves: one below
        labels = [t.get_text() for t in curves.legends[0].get_texts()]
        assert labels == [*order, "train", "test"], labels


@pytest.mark.slow
def test_kendall_tau_is_shown_only_over_three_checkpoints_or_more(runs, report):
    from dataclasses import replace

    from sharpscope.report import read_analyses, read_run, report_figures, report_sections

    out, _ = report
    page = (out / "report.html").read_text()
    assert "Kendall's tau with the generalization gap is omitted: over 2 checkpoints it is ±1" in page
    assert "kendall tau" not in re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert not (out / "kendall_tau.png").exists()
    run_list = [read_run(runs / name) for name in ("sgd", "sam")]
    three = replace(read_analyses(out), kendall={"num_checkpoints": 3, "tau": {"worst m=64 rho=0.05": 1 / 3,
                                                                               "constant": None}})
    figures = report_figures(run_list, three)
    assert "kendall_tau.png" in figures
    sharpness = next(s for s in report_sections(run_list, three, {"kendall_tau.png": out / "k.png"})
                     if s.title == "Sharpness")
    assert "over the 3 final checkpoints" in sharpness.text and out / "k.png" in sharpness.figures


@pytest.mark.slow
def test_a_second_report_with_the_same_settings_reuses_every_analysis_and_rerenders(runs, report):
    out, _ = report
    images = (out / "report.html").read_text().count("data:image/png")
    analyses = {name: data for name, data in files_in(out).items() if "/" in name}  # the stage folders
    (out / "report.html").write_text("stale")
    (out / "learning_curves.png").unlink()
    again = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "re-rendering it from the analyses" in again.output
    assert again.output.count("reusing") == 5, again.output  # nothing recomputed
    assert {name: data for name, data in files_in(out).items() if "/" in name} == analyses  # not even rewritten
    assert (out / "report.html").read_text().count("data:image/png") == images
    assert (out / "learning_curves.png").is_file()


@pytest.mark.slow
def test_a_report_with_other_settings_is_refused_before_anything_is_written(runs, report):
    out, _ = report
    before = files_in(out)
    other_grid = [a if a != "-1:1:3" else "-2:2:3" for a in QUICK]
    refused = invoke("report", str(runs / "sgd"), str(runs / "sam"), *other_grid, "--out", str(out))
    assert refused.exit_code == 1, refused.output
    assert (f"{out}/ holds a report.html made with other settings (-1.0:1.0:3 -2.0:2.0:3 differ); pass --overwrite"
            in refused.output)
    reordered = invoke("report", str(runs / "sam"), str(runs / "sgd"), *QUICK, "--out", str(out))
    assert reordered.exit_code == 1 and "made with other settings (runs " in reordered.output, reordered.output
    assert files_in(out) == before
    (out / "report.json").rename(out / "report.json.bak")  # a report that recorded no settings is never replaced
    try:
        refused = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--out", str(out))
        assert refused.exit_code == 1 and "already holds report.html" in refused.output, refused.output
    finally:
        (out / "report.json.bak").rename(out / "report.json")
    html = (out / "report.html").read_bytes()
    (out / "report.html").unlink()  # no report: the analyses' own records still refuse other settings
    try:
        refused = invoke("report", str(runs / "sgd"), str(runs / "sam"), *other_grid, "--out", str(out))
        assert refused.exit_code == 1, refused.output
        assert (f"{out}/landscape/ holds an analysis computed with other settings (-1.0:1.0:3 -2.0:2.0:3 differ)"
                in refused.output)
        assert not (out / "report.html").exists()
    finally:
        (out / "report.html").write_bytes(html)
    assert files_in(out) == before


def test_report_refuses_what_is_not_a_finished_run(runs, tmp_path):
    not_run = tmp_path / "empty"
    not_run.mkdir()
    result = invoke("report", str(not_run), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "is not a training run folder" in result.output
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (unfinished / name).write_bytes((runs / "sgd" / name).read_bytes())
    result = invoke("report", str(unfinished), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "has no final.pt" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_analyses_side_by_side_equal_those_computed_one_after_the_other(runs, report, tmp_path):
    """--jobs 2 (processes on one thread each) and --jobs 1 (in this process) compute the same numbers: the same
    commands with the same seeds; only the float summation order may differ with the thread count (rtol 1e-6)."""
    import json
    import math

    parallel, _ = report
    serial = tmp_path / "serial"
    result = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--jobs", "1", "--out", str(serial))
    assert result.exit_code == 0, result.output
    assert not (serial / "logs").exists() and (parallel / "logs" / "spectrum.log").is_file()

    def numbers(out):
        spectrum = json.loads((out / "spectrum-final" / "spectrum.json").read_text())["checkpoints"]
        sharpness = json.loads((out / "sharpness" / "sharpness.json").read_text())["rows"]
        trajectory = json.loads((out / "spectrum" / "spectrum.json").read_text())["checkpoints"]
        return ([v for r in spectrum for v in (*r["top_eigenvalues"], r["trace"]["value"], r["trace"]["stderr"])]
                + [r["value"] for r in sharpness] + [v for r in trajectory for v in r["top_eigenvalues"]])

    a, b = numbers(parallel), numbers(serial)
    assert len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b)), (a, b)


@pytest.mark.slow
def test_report_writes_its_figures_in_every_format_asked_and_png_for_the_page(runs, report, tmp_path):
    out, _ = report
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)  # the analyses are reused (same settings): only the report's figures are redrawn
    result = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--format", "pdf", "--dpi", "100",
                    "--out", str(copy))
    assert result.exit_code == 0, result.output
    for stem in ("learning_curves", "top_eigenvalues", "density", "sharpness_vs_rho"):
        assert (copy / f"{stem}.pdf").read_bytes()[:4] == b"%PDF", stem
        assert (copy / f"{stem}.png").is_file(), stem  # embedded in the page
    from sharpscope.report import png_display_width

    # 100 dpi instead of 200: half the pixels, the same size on the page
    for stem in ("learning_curves", "density"):
        low, high = (png_display_width((folder / f"{stem}.png").read_bytes()) for folder in (copy, out))
        assert abs(low - high) <= 1, (stem, low, high)  # pixel counts round differently


@pytest.mark.slow
def test_the_report_from_python_reuses_the_cli_analyses_and_gives_its_table(runs, report):
    """``sharpscope.report.run`` is the command: on the CLI's folder with the same settings it computes nothing,
    re-renders the page and returns the table the CLI printed."""
    from sharpscope.report import ReportRun, run

    out, output = report
    result = run([runs / "sgd", runs / "sam"], out=out, grid=(-1, 1, 3), m=[64], rho=[0.05], top_k=1,
                 num_samples=128, density_iters=5, sharpness_steps=1, max_chunks=2, jobs=2, quiet=True,
                 echo=lambda line: None)
    assert isinstance(result, ReportRun) and result.report == out / "report.html"
    assert result.computed == () and set(result.reused) == {"landscape", "interpolation", "spectrum",
                                                            "spectrum-final", "sharpness"}
    for row in result.summary_rows:
        assert all(cell in output for cell in [row[0], *row[2:]]), (row, output)
    assert "report.html" in repr(result) and "reused landscape" in repr(result)

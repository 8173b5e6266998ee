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


@pytest.mark.slow
def test_report_fills_every_section_and_reuses_analyses(runs, tmp_path):
    out = tmp_path / "report"
    result = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/report.html" in result.output
    page = (out / "report.html").read_text()
    for title in ("Summary", "Learning curves", "Loss landscapes", "Hessian spectrum", "Sharpness", "Configurations"):
        assert f">{title}</h2>" in page, title
    images = re.findall(r'src="data:image/png;base64,', page)
    assert len(images) >= 6, f"only {len(images)} figures embedded"
    rows = re.findall(r"<tr><td>(sgd|sam)</td>(.*?)</tr>", page)
    assert [r[0] for r in rows] == ["sgd", "sam"]
    assert all("<td>-</td>" not in r[1] for r in rows), rows  # λ_max, trace and sharpness all filled
    refused = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--out", str(out))
    assert refused.exit_code == 1 and "already holds report.html" in refused.output
    (out / "report.html").unlink()
    again = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 5, again.output  # nothing recomputed
    assert (out / "report.html").read_text().count("data:image/png") == len(images)
    refused = invoke("report", str(runs / "sgd"), str(runs / "sam"), *QUICK, "--out", str(out))
    assert refused.exit_code == 1 and "already holds report.html" in refused.output
    (out / "report.html").unlink()
    other_grid = [a if a != "-1:1:3" else "-2:2:3" for a in QUICK]
    refused = invoke("report", str(runs / "sgd"), str(runs / "sam"), *other_grid, "--out", str(out))
    assert refused.exit_code == 1, refused.output
    assert f"{out}/landscape/ holds an analysis computed with other settings (-1.0:1.0:3 -2.0:2.0:3 differ)" in refused.output
    assert not (out / "report.html").exists()


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

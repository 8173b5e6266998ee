"""``sharpscope sharpness`` end to end on tiny digits checkpoints: outputs reopened, resume, bad input."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sharpscope.cli.main import cli

FAST = ["--m", "8,64", "--rho", "0.05,0.1", "--steps", "2", "--num-samples", "128", "--max-chunks", "4",
        "--measure", "worst,keskar", "--measure", "pacbayes", "--keskar-eps", "0.001", "--pacbayes-draws", "2",
        "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch digits MLP run: ckpt-epoch000.pt (the initialisation, no metrics), ckpt-epoch001.pt, final.pt."""
    out = tmp_path_factory.mktemp("runs") / "sgd"
    result = invoke("train", "--dataset", "digits", "--model", "mlp", "--epochs", 2, "--save-every", 1,
                    "--batch-size", 64, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def first_run(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharpness")
    result = invoke("sharpness", run_dir, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_writes_results_gaps_arrays_figures_and_kendall(first_run, run_dir):
    from sharpscope.train.checkpoint import load_checkpoint

    out, result = first_run
    for name in ("sharpness.json", "sharpness.npz", "sharpness_vs_rho.png", "kendall_tau.json", "kendall_tau.png"):
        assert f"wrote {out / name}" in result.output
        assert (out / name).stat().st_size > 0
    document = json.loads((out / "sharpness.json").read_text())
    paths = [run_dir / "ckpt-epoch000.pt", run_dir / "ckpt-epoch001.pt", run_dir / "final.pt"]
    assert [c["path"] for c in document["checkpoints"]] == [str(p) for p in paths]
    for record, path in zip(document["checkpoints"], paths):
        assert record["generalization_gap"] == load_checkpoint(path).generalization_gap
    assert document["checkpoints"][0]["generalization_gap"] is None  # the initialisation has no metrics
    # per checkpoint: worst 2 m x 2 rho + keskar 1 eps + pacbayes 1
    assert len(document["rows"]) == 3 * 6
    worst = [r for r in document["rows"] if r["measure"] == "worst"]
    assert all(r["value"] > 0 and r["steps"] == 2 and r["m"] in (8, 64) for r in worst)
    arrays = np.load(out / "sharpness.npz")
    assert arrays["worst_values"].shape == (3, 2, 2) and arrays["keskar_values"].shape == (3, 1)
    np.testing.assert_allclose(arrays["worst_values"][2].ravel(), [r["value"] for r in worst[-4:]])
    kendall = json.loads((out / "kendall_tau.json").read_text())
    assert kendall["num_checkpoints"] == 2  # the two with metrics
    assert set(kendall["tau"]) == {"worst m=8 rho=0.05", "worst m=8 rho=0.1", "worst m=64 rho=0.05",
                                   "worst m=64 rho=0.1", "keskar eps=0.001", "pacbayes 1/sigma^2"}
    assert "sgd/final.pt" in result.output and "rho=0.05" in result.output


def test_cli_values_are_the_library_values(first_run, run_dir):
    # The command is a thin shell: the same checkpoint, evaluation set and settings through the library agree.
    from sharpscope.cli.inputs import analysis_inputs
    from sharpscope.sharpness import m_sharpness

    out, _ = first_run
    checkpoint, data = analysis_inputs(run_dir / "final.pt", num_samples=128, batch_size=500)
    grid = m_sharpness(checkpoint.model, torch.nn.CrossEntropyLoss(), data, m_values=[8, 64],
                       rho_values=[0.05, 0.1], steps=2, max_chunks=4, batch_size=500)
    arrays = np.load(out / "sharpness.npz")
    np.testing.assert_allclose(arrays["worst_values"][2], grid.values, rtol=1e-6)


def test_rerun_resumes_and_recomputes_only_what_is_missing(first_run, run_dir, tmp_path):
    out, _ = first_run
    copy = tmp_path / "resume"
    copy.mkdir()
    document = json.loads((out / "sharpness.json").read_text())
    dropped = document["entries"].pop()  # as if interrupted before the last (checkpoint, measure)
    (copy / "sharpness.json").write_text(json.dumps(document))
    result = invoke("sharpness", run_dir, *FAST, "--out", copy)
    assert result.exit_code == 0, result.output
    assert "reused 8 result(s)" in result.output
    resumed = json.loads((copy / "sharpness.json").read_text())
    assert [e["seconds"] for e in resumed["entries"][:8]] == [e["seconds"] for e in document["entries"]]
    assert resumed["entries"][8]["result"] == dropped["result"]  # recomputed, deterministic
    assert (copy / "kendall_tau.png").exists()


def test_other_configuration_is_refused_unless_overwrite(first_run, run_dir, tmp_path):
    out, _ = first_run
    target = tmp_path / "cfg"
    target.mkdir()
    (target / "sharpness.json").write_text((out / "sharpness.json").read_text())
    args = [a if a != "2" else "3" for a in FAST]  # --steps 3 (and --pacbayes-draws 3)
    result = CliRunner().invoke(cli, ["-q", "sharpness", str(run_dir / "final.pt"), *args, "--out", str(target)])
    assert result.exit_code == 1
    assert "holds results of a different configuration" in result.output and "suite.steps (2 -> 3)" in result.output
    result = invoke("sharpness", run_dir / "final.pt", *args, "--out", target, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (target / "kendall_tau.json").exists()  # one checkpoint now: the old ranking is gone


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--measure", "wrost"], "unknown measure 'wrost'; did you mean 'worst'", 2),
        (["--m", "0"], "Invalid value for '--m'", 2),
        (["--rho", "-1"], "Invalid value for '--rho'", 2),
        (["--p", "3"], "Invalid value for '--p'", 2),
        (["--m", "1000"], "m=1000 is larger than the evaluation set (128 samples)", 1),
    ],
)
def test_bad_input_one_line_no_traceback(run_dir, tmp_path, args, message, code):
    result = CliRunner().invoke(cli, ["-q", "sharpness", str(run_dir / "final.pt"), "--num-samples", "128",
                                      "--steps", "1", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_help_shows_examples():
    result = invoke("sharpness", "--help")
    assert "sharpscope sharpness runs/*/final.pt --m 1,8,32,128 --rho 0.01,0.05,0.1" in result.output

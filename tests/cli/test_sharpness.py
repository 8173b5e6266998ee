"""``sharpscope sharpness`` end to end on tiny digits checkpoints: outputs reopened, resume, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import kendalltau

from sharpscope.cli.main import cli

#: the keys of a checkpoint record that the measured gap adds (sharpness.json "checkpoints")
MEASURED = ("train_error", "test_error", "train_loss", "test_loss", "num_train_samples", "num_test_samples",
            "metrics_generalization_gap")
FAST = ["--m", "8,64", "--rho", "0.05,0.1", "--steps", "2", "--num-samples", "128", "--max-chunks", "4",
        "--measure", "worst,keskar", "--measure", "pacbayes", "--keskar-eps", "0.001", "--pacbayes-draws", "2",
        "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch digits MLP run: ckpt-epoch000.pt (the initialisation, no metrics), ckpt-epoch001.pt, final.pt."""
    return _train(tmp_path_factory.mktemp("runs") / "sgd", "sgd")


@pytest.fixture(scope="module")
def sam_run_dir(run_dir):
    """The same with SAM (rho 0.05), next to it: runs/sam."""
    return _train(run_dir.parent / "sam", "sam")


def _train(out, optimizer):
    result = invoke("train", "--dataset", "digits", "--model", "mlp", "--optimizer", optimizer, "--epochs", 2,
                    "--save-every", 1, "--batch-size", 64, "--out", out)
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
        assert record["metrics_generalization_gap"] == load_checkpoint(path).generalization_gap  # kept, not used
        assert record["generalization_gap"] == record["test_error"] - record["train_error"]  # measured
    assert document["checkpoints"][0]["metrics_generalization_gap"] is None  # the initialisation has no metrics
    # per checkpoint: worst 2 m x 2 rho + keskar 1 eps + pacbayes 1
    assert len(document["rows"]) == 3 * 6
    worst = [r for r in document["rows"] if r["measure"] == "worst"]
    assert all(r["value"] > 0 and r["steps"] == 2 and r["m"] in (8, 64) for r in worst)
    arrays = np.load(out / "sharpness.npz")
    assert arrays["worst_values"].shape == (3, 2, 2) and arrays["keskar_values"].shape == (3, 1)
    np.testing.assert_allclose(arrays["worst_values"][2].ravel(), [r["value"] for r in worst[-4:]])
    kendall = json.loads((out / "kendall_tau.json").read_text())
    assert kendall["num_checkpoints"] == 3  # the initialisation too: its gap is measured, not read from metrics
    assert kendall["generalization_gap"] == [r["generalization_gap"] for r in document["checkpoints"]]
    assert set(kendall["tau"]) == {"worst m=8 rho=0.05", "worst m=8 rho=0.1", "worst m=64 rho=0.05",
                                   "worst m=64 rho=0.1", "keskar eps=0.001", "pacbayes 1/sigma^2"}
    assert "sgd/final.pt" in result.output and "rho=0.05" in result.output
    assert "Kendall tau with the generalization gap (3 checkpoints):" in result.output
    for label, tau in kendall["tau"].items():  # the table is printed
        assert f"{label}  " in result.output and format(tau, "+.3f") in result.output
    np.testing.assert_array_equal(arrays["generalization_gap"], kendall["generalization_gap"])
    np.testing.assert_array_equal(arrays["train_error"], [r["train_error"] for r in document["checkpoints"]])


def test_cli_values_are_the_library_values(first_run, run_dir):
    # The command is a thin shell: the same checkpoint, evaluation set and settings through the library agree.
    from sharpscope.inputs import analysis_inputs
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


def test_a_file_from_before_the_measured_gap_keeps_its_results_and_gets_the_gap(first_run, run_dir, tmp_path):
    # sharpness.json written before the gap was measured: no "gap" settings, the gap read from the metrics
    out, _ = first_run
    document = json.loads((out / "sharpness.json").read_text())
    old = json.loads(json.dumps(document))
    del old["config"]["gap"]
    for record in old["checkpoints"]:
        record["generalization_gap"] = record["metrics_generalization_gap"]
        for key in MEASURED:
            del record[key]
    copy = tmp_path / "old"
    copy.mkdir()
    (copy / "sharpness.json").write_text(json.dumps(old))
    result = invoke("sharpness", run_dir, *FAST, "--out", copy)
    assert result.exit_code == 0, result.output
    assert "reused 9 result(s)" in result.output  # every measure kept ...
    upgraded = json.loads((copy / "sharpness.json").read_text())
    assert upgraded["entries"] == document["entries"]  # ... as it was (same timings)
    # ... and the gaps measured and added, as a fresh run writes them
    assert upgraded["checkpoints"] == document["checkpoints"] and upgraded["config"] == document["config"]
    assert upgraded["rows"] == document["rows"]


def test_gap_samples_caps_both_splits_and_is_the_library_gap(run_dir, tmp_path):
    from sharpscope.inputs import analysis_inputs
    from sharpscope.data import eval_batches, load_dataset
    from sharpscope.sharpness import generalization_gap

    out = tmp_path / "capped"
    args = [run_dir / "final.pt", "--measure", "worst", "--m", "64", "--rho", "0.05", "--steps", "1",
            "--num-samples", "64", "--device", "cpu", "--out", out]
    result = invoke("sharpness", *args, "--gap-samples", 100)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sharpness.json").read_text())["checkpoints"][0]
    checkpoint, _ = analysis_inputs(run_dir / "final.pt", num_samples=64)
    digits = load_dataset("digits")
    gap = generalization_gap(checkpoint.model, torch.nn.CrossEntropyLoss(),
                             eval_batches(digits, split="train", num_samples=100),
                             eval_batches(digits, split="test", num_samples=100))
    assert (record["num_train_samples"], record["num_test_samples"]) == (100, 100)
    assert record["train_error"] == gap.train_error and record["test_error"] == gap.test_error  # exact counts
    assert record["train_loss"] == pytest.approx(gap.train_loss, rel=1e-6)
    refused = CliRunner().invoke(cli, ["-q", "sharpness", *map(str, args), "--gap-samples", "200"])
    assert refused.exit_code == 1 and "gap.num_samples (100 -> 200)" in refused.output, refused.output


#: average, adaptive and magnitude-aware PAC-Bayes in the l_inf geometry, as cheap as they get
LINF = ["--measure", "average,adaptive,pacbayes-mag", "--p", "inf", "--m", "8,64", "--rho", "0.001", "--average-rho", "0.002",
        "--adaptive-rho", "0.001", "--steps", "1", "--num-draws", "2", "--max-chunks", "2", "--num-samples", "64",
        "--pacbayes-draws", "2", "--device", "cpu"]


def test_sgd_and_sam_runs_end_to_end_with_scipy_kendall_tau(run_dir, sam_run_dir, tmp_path):
    from sharpscope.data import load_dataset

    out = tmp_path / "linf"
    result = invoke("sharpness", run_dir, sam_run_dir, *LINF, "--out", out)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "sharpness.json").read_text())
    records = document["checkpoints"]
    names = ["ckpt-epoch000.pt", "ckpt-epoch001.pt", "final.pt"]
    assert [r["label"] for r in records] == [f"{run}/{name}" for run in ("sgd", "sam") for name in names]
    digits = load_dataset("digits")
    for record in records:  # each gap measured on the whole train and test splits
        assert (record["num_train_samples"], record["num_test_samples"]) == (len(digits.train_labels),
                                                                               len(digits.test_labels))
        assert record["generalization_gap"] == record["test_error"] - record["train_error"]
        if record["metrics"]:
            # the trainer's test accuracy is the same evaluation of the same weights (up to one near-tie sample
            # whose argmax another batch size may flip); its train_acc, a running average, is not
            assert record["test_error"] == pytest.approx(1 - record["metrics"]["test_acc"],
                                                         abs=1 / record["num_test_samples"] + 1e-12)
    assert {e["measure"]: e["result"]["p"] for e in document["entries"] if e["result"]["kind"] == "grid"} == {
        "average": "inf", "adaptive": "inf"}
    assert all(e["result"]["magnitude_aware"] for e in document["entries"] if e["measure"] == "pacbayes-mag")
    # Kendall tau from the written rows and gaps alone, by scipy
    columns: dict[str, list[float]] = {}
    gaps: dict[str, float] = {}
    for row in document["rows"]:
        label = (f"{row['measure']} 1/sigma^2" if row["m"] is None
                 else f"{row['measure']} m={row['m']} rho={row['rho']:g}")
        columns.setdefault(label, []).append(row["value"])
        gaps[row["checkpoint"]] = row["generalization_gap"]
    assert list(gaps.values()) == [r["generalization_gap"] for r in records]
    kendall = json.loads((out / "kendall_tau.json").read_text())
    assert kendall["num_checkpoints"] == 6 and kendall["generalization_gap"] == list(gaps.values())
    assert set(kendall["tau"]) == set(columns) == {
        "average m=8 rho=0.002", "average m=64 rho=0.002", "adaptive m=8 rho=0.001", "adaptive m=64 rho=0.001",
        "pacbayes-mag 1/sigma^2"}
    for label, values in columns.items():
        assert len(values) == 6
        expected = kendalltau(values, list(gaps.values())).statistic
        np.testing.assert_allclose(kendall["tau"][label], expected, rtol=1e-12, err_msg=label)
        expected_p = kendalltau(values, list(gaps.values())).pvalue
        np.testing.assert_allclose(kendall["p_value"][label], expected_p, rtol=1e-12, err_msg=label)
        assert f"{label}  " in result.output and f"(p = {expected_p:.2g})" in result.output
    assert "Kendall tau with the generalization gap (6 checkpoints):" in result.output


def test_same_named_runs_get_distinct_labels_and_panels(run_dir, sam_run_dir, tmp_path, monkeypatch):
    import sharpscope.plots.sharpness as plots

    paths = []
    for seed, source in (("seedA", run_dir), ("seedB", sam_run_dir)):  # two different models, both in .../sgd/
        (tmp_path / seed / "sgd").mkdir(parents=True)
        paths.append(shutil.copy(source / "final.pt", tmp_path / seed / "sgd" / "final.pt"))
    panels = []
    plot = plots.sharpness_vs_rho

    def recording(results, **kwargs):  # the panels the command asks for, by label
        panels.append(list(results))
        return plot(results, **kwargs)

    monkeypatch.setattr(plots, "sharpness_vs_rho", recording)
    result = invoke("sharpness", *paths, "--measure", "worst", "--m", "64", "--rho", "0.05", "--steps", "1",
                    "--num-samples", "64", "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert panels == [["seedA/sgd/final.pt", "seedB/sgd/final.pt"]]  # one panel each, none overwritten
    document = json.loads((tmp_path / "out" / "sharpness.json").read_text())
    assert [r["label"] for r in document["checkpoints"]] == panels[0]
    assert [r["label"] for r in document["rows"]] == panels[0]


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
        (["--gap-samples", "0"], "Invalid value for '--gap-samples'", 2),
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


def test_figure_formats_dpi_and_save_every_options(run_dir, tmp_path):
    out = tmp_path / "fmt"
    result = invoke("sharpness", run_dir / "final.pt", "--measure", "worst", "--m", "64", "--rho", "0.05",
                    "--steps", "1", "--num-samples", "64", "--gap-samples", "64", "--device", "cpu",
                    "--format", "png,svg", "--dpi", "50", "--save-every", "0", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("sharpness_vs_rho.png", "sharpness_vs_rho.svg"):
        assert f"wrote {out / name}" in result.output and (out / name).stat().st_size > 0
    from PIL import Image

    with Image.open(out / "sharpness_vs_rho.png") as image:  # 50 dpi: a few hundred pixels wide
        assert image.size[0] < 400, image.size
    assert not (out / "sharpness.partial.npz").exists()
    refused = CliRunner().invoke(cli, ["-q", "sharpness", str(run_dir / "final.pt"), "--save-every", "-1",
                                       "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "Invalid value for '--save-every'" in refused.output

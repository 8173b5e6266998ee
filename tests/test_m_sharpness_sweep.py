"""``examples/m_sharpness_sweep.py --tiny`` end to end (in this process, one worker): figures and tables hold what
the runs measured, a rerun skips finished runs, a lost run is redone alone and identically; and the trainer's
``train_samples`` (the sweep's training subset)."""

import json
import math

import pytest
from click.testing import CliRunner
from example_scripts import load_example

from sharpscope.errors import SharpscopeError

TINY_RUNS = ["sgd-seed0", "sam-rho0.05-m4-seed0", "sam-rho0.05-m16-seed0", "sam-rho0.1-m4-seed0",
             "sam-rho0.1-m16-seed0"]


@pytest.fixture(scope="module")
def sweep():
    return load_example("m_sharpness_sweep")


def _progress_lines(text: str) -> dict[str, str]:
    """run name -> its progress line ``[k/n] name: status; ...``."""
    return {line.split("] ", 1)[1].split(":", 1)[0]: line for line in text.splitlines() if line.startswith("[")}


def test_tiny_sweep_end_to_end_then_rerun_skips_and_a_lost_run_is_redone(sweep, tmp_path, capsys):
    import matplotlib.image
    import numpy as np

    from sharpscope.sharpness import kendall_tau

    argv = ["--tiny", "--threads", "1", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    first = sweep.main(argv)
    lines = _progress_lines(capsys.readouterr().out)
    assert sorted(lines) == sorted(TINY_RUNS) and all("trained" in line for line in lines.values()), lines
    results = tmp_path / "results" / "digits-n256-e1"
    runs = tmp_path / "runs" / "digits-n256-e1"
    assert first["outputs"]["table.json"] == results / "table.json"

    for name in ("fig_left.png", "fig_right.png"):
        image = matplotlib.image.imread(results / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, (name, image.shape)
        assert float(np.std(image[..., :3])) > 0.05, f"{name} looks blank"

    table = json.loads((results / "table.json").read_text())
    records = {r["name"]: r for r in table["runs"]}
    assert sorted(records) == sorted(TINY_RUNS)
    for name, r in records.items():
        assert 0 <= r["train_error"] <= 1 and 0 <= r["test_error"] <= 1, (name, r)
        assert r["generalization_gap"] == r["test_error"] - r["train_error"]
        assert r["num_train_samples"] == 256 and r["num_test_samples"] == 360  # the trained subset, digits' test
        for m in (4, 16):
            cell = r["sharpness"][str(m)]
            assert math.isfinite(cell["value"]) and cell["value"] >= 0 and cell["num_chunks"] == 128 // m, (name, m)
        # the gap's test error is measured again at the final weights; the trainer evaluated the same weights on
        # the same test set in eval mode at its last epoch: the two must agree to the sample
        last = json.loads((runs / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert abs(r["test_error"] - (1 - last["test_acc"])) < 1e-9, (name, r["test_error"], last["test_acc"])
    assert records["sgd-seed0"]["optimizer"] == "sgd" and records["sam-rho0.1-m4-seed0"]["m"] == 4

    # tau: scipy's tau-b in the table == sharpscope's kendall_tau on the table's own numbers; p a probability
    gaps = [records[n]["generalization_gap"] for n in TINY_RUNS]
    taus = {t["m"]: t for t in table["kendall_tau"]}
    assert sorted(taus) == [4, 16]
    for m, t in taus.items():
        expected = kendall_tau([records[n]["sharpness"][str(m)]["value"] for n in TINY_RUNS], gaps)
        if math.isnan(expected):
            assert t["tau"] is None or math.isnan(t["tau"])  # JSON writes NaN as null
        else:
            assert abs(t["tau"] - expected) < 1e-12 and 0 <= t["p_value"] <= 1 and t["num_runs"] == 5, (m, t)
    # the left figure's numbers: rho = 0 is the SGD run on every line, the others the SAM run of that (rho, m)
    for m in ("4", "16"):
        assert table["test_error"][m]["0"]["mean"] == records["sgd-seed0"]["test_error"]
        assert table["test_error"][m]["0.1"]["mean"] == records[f"sam-rho0.1-m{m}-seed0"]["test_error"]
    markdown = (results / "table.md").read_text()
    assert all(name in markdown for name in TINY_RUNS) and "Kendall" in markdown

    # a rerun trains and measures nothing, and rewrites no run file
    stamps = {p: p.stat().st_mtime_ns for p in [*runs.glob("*/final.pt"), *(results / "runs").glob("*.json")]}
    assert len(stamps) == 10
    sweep.main(argv)
    lines = _progress_lines(capsys.readouterr().out)
    assert all(" skipped;" in line for line in lines.values()) and len(lines) == 5, lines
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a run lost (final.pt and its measurements gone) is trained again alone, and gives the same numbers (the CPU
    # trainer is deterministic); one whose measurements alone are gone is only measured
    lost, unmeasured = "sam-rho0.1-m16-seed0", "sam-rho0.05-m4-seed0"
    (runs / lost / "final.pt").unlink()
    (results / "runs" / f"{lost}.json").unlink()
    (results / "runs" / f"{unmeasured}.json").unlink()
    sweep.main(argv)
    lines = _progress_lines(capsys.readouterr().out)
    assert "trained in" in lines[lost] and "measured" in lines[lost], lines[lost]
    assert "trained earlier, measured" in lines[unmeasured], lines[unmeasured]
    assert sum(" skipped;" in line for line in lines.values()) == 3, lines
    again = {r["name"]: r for r in json.loads((results / "table.json").read_text())["runs"]}
    for name in (lost, unmeasured):
        for key in ("train_error", "test_error", "train_loss", "test_loss"):  # (final.pt also holds timings)
            assert again[name][key] == records[name][key], (name, key)
        assert again[name]["sharpness"] == records[name]["sharpness"], name


def test_bad_grid_is_a_one_line_error(sweep, tmp_path):
    with pytest.raises(SystemExit, match="--m needs values in 1..128"):
        sweep.main(["--tiny", "--m", "4,256", "--runs", str(tmp_path), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="--sharpness-samples must be >= the largest m 64"):
        sweep.main(["--tiny", "--m", "64", "--sharpness-samples", "32", "--runs", str(tmp_path)])


# ---------------------------------------------------------------------------------------- train_samples
def test_train_samples_trains_on_the_first_n_samples(tmp_path):
    from sharpscope.train import TrainConfig, train
    from sharpscope.train.checkpoint import load_checkpoint

    config = TrainConfig(dataset="synthetic", train_samples=40, batch_size=16, epochs=2, save_every=0)
    result = train(config, out_dir=tmp_path / "run", progress=False, log=lambda _: None)
    assert [r["step"] for r in result.metrics] == [3, 6]  # ceil(40 / 16) steps per epoch, not ceil(256 / 16)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_samples"] == 40
    assert load_checkpoint(result.final_checkpoint).config["train_samples"] == 40

    with pytest.raises(SharpscopeError, match="train_samples=1000, but the train split of 'synthetic' has 256"):
        train(TrainConfig(dataset="synthetic", train_samples=1000), out_dir=tmp_path / "big", progress=False)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(SharpscopeError, match="train_samples must be an integer >= 1"):
            TrainConfig(train_samples=bad)


def test_a_run_from_before_train_samples_resumes_with_its_default(tmp_path):
    """config.json written before the field existed: the same run (all samples) resumes, a subset is refused."""
    from sharpscope.train import TrainConfig
    from sharpscope.train.trainer import _check_out_dir

    old = tmp_path / "old"
    old.mkdir()
    saved = TrainConfig(dataset="synthetic").to_dict()
    del saved["train_samples"]
    (old / "config.json").write_text(json.dumps(saved))
    assert TrainConfig.from_dict(saved).train_samples is None
    assert _check_out_dir(old, TrainConfig(dataset="synthetic"), overwrite=False) is None  # no last.pt: starts
    with pytest.raises(SharpscopeError, match=r"different config \(train_samples\)"):
        _check_out_dir(old, TrainConfig(dataset="synthetic", train_samples=100), overwrite=False)


def test_cli_train_samples(tmp_path):
    from sharpscope.cli.main import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["-q", "train", "--dataset", "synthetic", "--train-samples", "40",
                                      "--batch-size", "16", "--epochs", "1", "--save-every", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["train_samples"] == 40
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    bad = CliRunner().invoke(cli, ["train", "--train-samples", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--train-samples" in bad.output

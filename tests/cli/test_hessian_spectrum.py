"""``sharpscope hessian-spectrum`` end to end on tiny digits runs trained by ``sharpscope train``."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sharpscope.cli.main import cli

# A small but complete configuration: every stage runs, on 200 samples (HVPs of a few milliseconds).
SPECTRUM = ["--top-k", "2", "--bottom-k", "1", "--trace", "--trace-matvecs", "12", "--density", "--density-iters",
            "12", "--density-runs", "2", "--per-layer", "--num-samples", "200", "--batch-size", "100",
            "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-epoch runs (SGD and SAM) of the mlp on digits, with checkpoints at epochs 0, 1 and final (2)."""
    root = tmp_path_factory.mktemp("runs")
    for optimizer in ("sgd", "sam"):
        result = invoke("train", "--dataset", "digits", "--model", "mlp", "--optimizer", optimizer, "--epochs", 2,
                        "--save-every", 1, "--batch-size", 128, "--device", "cpu", "--out", root / optimizer)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def spectrum(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("spectrum") / "out"
    result = invoke("hessian-spectrum", runs / "sgd", runs / "sam", *SPECTRUM, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_writes_results_by_run_in_the_given_order_then_epoch(spectrum):
    out, output = spectrum
    data = json.loads((out / "spectrum.json").read_text())
    records = data["checkpoints"]
    assert [(r["run"], r["epoch"]) for r in records] == [("sgd", 0), ("sgd", 1), ("sgd", 2),
                                                         ("sam", 0), ("sam", 1), ("sam", 2)]
    arrays = np.load(out / "spectrum.npz")
    for r in records:
        assert len(r["top_eigenvalues"]) == 2 and r["top_eigenvalues"][0] >= r["top_eigenvalues"][1] > 0
        assert all(r["top_converged"]) and all(r["bottom"]["converged"])
        assert max(r["top_residuals"]) <= 1e-6 * max(abs(v) for v in r["top_eigenvalues"])
        assert r["bottom"]["eigenvalues"][0] < r["top_eigenvalues"][1]
        assert r["trace"]["stderr"] > 0 and r["trace"]["num_matvecs"] == 12
        assert set(r["per_layer"]) == {"1", "3"}  # the mlp's two Linear layers
        assert r["num_matvecs"] > r["top_matvecs"] > 0 and r["num_params"] == 9610 and r["num_samples"] == 200
        np.testing.assert_array_equal(arrays[f"{r['key']}__top_eigenvalues"], r["top_eigenvalues"])
        grid, density = arrays[f"{r['key']}__density_grid"], arrays[f"{r['key']}__density"]
        assert abs(np.trapezoid(density, grid) - 1) < 1e-9
        assert (out / r["density"]["figure"]).stat().st_size > 0
    assert data["config"]["top_k"] == 2 and data["provenance"]["checkpoints"]
    for name in ("top_eigenvalues.png", "density.png", "spectrum.json", "spectrum.npz"):
        assert f"wrote {out / name}" in output
    assert "lambda_1" in output and "sgd" in output and "sam" in output


def test_runs_in_folders_of_the_same_name_stay_apart(runs, tmp_path):
    """seed0/sgd and seed1/sgd are two runs (two panels, no warm start across them), not one zig-zag "sgd"."""
    import shutil

    for seed in ("seed0", "seed1"):
        (tmp_path / seed / "sgd").mkdir(parents=True)
        shutil.copy(runs / "sgd" / "final.pt", tmp_path / seed / "sgd" / "final.pt")
    out = tmp_path / "out"
    result = invoke("hessian-spectrum", tmp_path / "seed1" / "sgd", tmp_path / "seed0" / "sgd", "--top-k", 1,
                    "--num-samples", 64, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    records = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    assert [r["run"] for r in records] == ["seed1/sgd", "seed0/sgd"]
    assert len({r["key"] for r in records}) == 2
    assert records[0]["top_eigenvalues"] == records[1]["top_eigenvalues"]  # same file, same cold start


def test_top_eigenvalues_agree_with_scipy_eigsh(spectrum, runs):
    """An independent solver (ARPACK) on the same operator and evaluation set."""
    from scipy.sparse.linalg import eigsh

    from sharpscope.inputs import analysis_inputs
    from sharpscope.hessian import HessianOperator

    out, _ = spectrum
    record = next(r for r in json.loads((out / "spectrum.json").read_text())["checkpoints"]
                  if r["run"] == "sgd" and r["epoch"] == 2)
    checkpoint, batches = analysis_inputs(runs / "sgd" / "final.pt", num_samples=200, batch_size=100)
    H = HessianOperator(checkpoint.model, torch.nn.CrossEntropyLoss(), batches)
    expected = np.sort(eigsh(H.to_scipy(), k=2, which="LA", tol=1e-10)[0])[::-1]
    # float32 products: both solvers see the same ~1e-7 relative product noise.
    np.testing.assert_allclose(record["top_eigenvalues"], expected, rtol=1e-5)


def test_eigenvalue_criterion_agrees_with_fewer_products(spectrum, runs, tmp_path):
    out, _ = spectrum
    by_residual = {(r["run"], r["epoch"]): r for r in json.loads((out / "spectrum.json").read_text())["checkpoints"]}
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", "--top-k", "2", "--criterion", "eigenvalue",
                    "--tol", "1e-5", "--num-samples", "200", "--batch-size", "100", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    (record,) = json.loads((tmp_path / "ev" / "spectrum.json").read_text())["checkpoints"]
    reference = by_residual["sgd", 2]  # residual criterion at 1e-6: exact to float32 noise
    # the eigenvalue criterion promises relative eigenvalue error <= tol = 1e-5
    np.testing.assert_allclose(record["top_eigenvalues"], reference["top_eigenvalues"], rtol=1e-5)
    assert record["top_matvecs"] < reference["top_matvecs"]


def test_rerun_reuses_results_and_resumes_after_interruption(spectrum, runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(spectrum[0], out)
    before = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    result = invoke("hessian-spectrum", runs / "sgd", runs / "sam", *SPECTRUM, "--out", out)
    assert result.exit_code == 0, result.output
    after = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    assert after == before  # identical, wall times included: nothing was recomputed
    # Simulate an interruption after four checkpoints: the last two are computed again, the rest kept.
    data = json.loads((out / "spectrum.json").read_text())
    data["checkpoints"] = data["checkpoints"][:4]
    (out / "spectrum.json").write_text(json.dumps(data))
    result = invoke("hessian-spectrum", runs / "sgd", runs / "sam", *SPECTRUM, "--out", out)
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    assert resumed[:4] == before[:4]
    assert [r["seconds"] for r in resumed[4:]] != [r["seconds"] for r in before[4:]]
    np.testing.assert_allclose([r["top_eigenvalues"] for r in resumed[4:]],
                               [r["top_eigenvalues"] for r in before[4:]], rtol=1e-5)  # cold vs warm start


def test_more_checkpoints_are_added_to_earlier_results(runs, tmp_path):
    out = tmp_path / "out"
    fast = ["--top-k", "1", "--num-samples", "100", "--device", "cpu", "--out", out]
    assert invoke("hessian-spectrum", runs / "sgd" / "final.pt", *fast).exit_code == 0
    result = invoke("hessian-spectrum", runs / "sam" / "final.pt", *fast)
    assert result.exit_code == 0, result.output
    records = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    assert [r["run"] for r in records] == ["sam", "sgd"]
    assert (out / "top_eigenvalues.png").exists() and not (out / "density.png").exists()


def test_other_settings_in_out_are_refused_unless_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    fast = ["--num-samples", "100", "--device", "cpu", "--out", out, runs / "sgd" / "final.pt"]
    assert invoke("hessian-spectrum", "--top-k", "1", *fast).exit_code == 0
    result = invoke("hessian-spectrum", "--top-k", "2", *fast)
    assert result.exit_code == 1
    assert "holds results computed with other settings (top_k differ); pass --overwrite" in result.output
    result = invoke("hessian-spectrum", "--top-k", "2", "--overwrite", *fast)
    assert result.exit_code == 0, result.output
    assert len(json.loads((out / "spectrum.json").read_text())["checkpoints"][0]["top_eigenvalues"]) == 2


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("hessian-spectrum", empty, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "holds no checkpoints" in result.output
    result = invoke("hessian-spectrum", tmp_path / "missing.pt", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "spectrum.json").write_text("{\"format\": \"something-else\"}")
    result = invoke("hessian-spectrum", empty, "--out", tmp_path / "out2")
    assert result.exit_code == 1 and "is not a hessian-spectrum result" in result.output
    (tmp_path / "out2" / "spectrum.json").write_text("{not json")
    result = invoke("hessian-spectrum", empty, "--out", tmp_path / "out2")
    assert result.exit_code == 1 and "exists but cannot be read" in result.output


def test_default_budgets_print_every_error_bar(runs, tmp_path):
    """--trace and --density with their precision targets (no budgets given): the summary shows the trace and the
    density's implied trace each as value +- stderr (HVPs), and the JSON says which target each met."""
    out = tmp_path / "out"
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", "--top-k", "2", "--trace", "--density",
                    "--num-samples", "200", "--batch-size", "100", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    trace, density = record["trace"], record["density"]
    assert trace["rtol"] == 0.02 and trace["converged"] and trace["stderr"] <= 0.02 * abs(trace["value"])
    assert trace["deflation_rank"] == 8 + 2  # the sketch and the two top eigenvectors
    assert density["tol"] == 0.01 and density["converged"] and max(density["error_bounds"]) <= 0.01
    assert density["num_matvecs"] == sum(density["num_steps"]) < 5 * 90
    assert record["num_matvecs"] == record["top_matvecs"] + trace["num_matvecs"] + density["num_matvecs"]
    header, line = result.output.splitlines()[:2]
    assert "trace +- stderr (HVPs)" in header and "SLQ trace +- stderr (HVPs)" in header
    assert f"{trace['value']:.5g} +- {trace['stderr']:.2g} ({trace['num_matvecs']})" in line
    assert (f"{density['slq_trace']:.5g} +- {density['slq_trace_stderr']:.2g} ({density['num_matvecs']})" in line)


def test_fixed_budgets_and_their_conflicts(runs, tmp_path):
    out = tmp_path / "out"
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", "--top-k", "1", "--trace", "--trace-matvecs", 12,
                    "--density", "--density-tol", 0, "--density-iters", 6, "--density-runs", 2, "--num-samples", 100,
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    assert record["trace"]["num_matvecs"] == 12 and record["trace"]["rtol"] is None
    assert record["density"]["num_steps"] == [6, 6] and record["density"]["tol"] is None
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", "--trace", "--trace-matvecs", 12, "--trace-rtol",
                    0.05, "--out", tmp_path / "other")
    assert result.exit_code == 2 and "give --trace-rtol (a precision target) or --trace-matvecs" in result.output


def test_identical_checkpoints_are_computed_once(runs, tmp_path, monkeypatch):
    """SGD and SAM of one seed start from the same weights (in files that differ by their config): the spectrum of
    those weights is computed once and reused."""
    import sharpscope.hessian as hessian

    first, second = (torch.load(runs / run / "ckpt-epoch000.pt", weights_only=True) for run in ("sgd", "sam"))
    assert all(torch.equal(first["model_state"][k], v) for k, v in second["model_state"].items())
    calls = []
    real = hessian.analyze_checkpoint
    monkeypatch.setattr(hessian, "analyze_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "twins"
    result = invoke("hessian-spectrum", runs / "sgd" / "ckpt-epoch000.pt", runs / "sam" / "ckpt-epoch000.pt",
                    runs / "sam" / "final.pt", "--top-k", 2, "--num-samples", 200, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(calls) == 2, f"3 checkpoints, 2 distinct weights: analyze_checkpoint ran {len(calls)} times"
    records = {(r["run"], r["epoch"]): r for r in json.loads((out / "spectrum.json").read_text())["checkpoints"]}
    assert records["sgd", 0]["top_eigenvalues"] == records["sam", 0]["top_eigenvalues"]
    assert records["sam", 0]["path"].endswith("sam/ckpt-epoch000.pt")


def test_figure_formats_and_final_only_chart(runs, tmp_path):
    """--format/--dpi pick the figure files; two final checkpoints give the per-run chart, not a training curve."""
    out = tmp_path / "out"
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", runs / "sam" / "final.pt", "--top-k", 1,
                    "--num-samples", 64, "--device", "cpu", "--format", "svg,png", "--dpi", 50, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "top_eigenvalues.svg").stat().st_size > 0 and (out / "top_eigenvalues.png").exists()
    assert "during training" not in (out / "top_eigenvalues.svg").read_text()
    assert "Top Hessian eigenvalues at epoch 2" in (out / "top_eigenvalues.svg").read_text()
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", "--format", "gif", "--out", tmp_path / "bad")
    assert result.exit_code == 2 and "unknown figure format" in result.output

"""sharpscope.hessian.run (the hessian-spectrum command as a function), its memory refusal, and the short reprs of
the Hessian API's result objects."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sharpscope.cli.main import cli
from sharpscope.errors import SharpscopeError
from sharpscope.hessian import (
    SpectrumRun,
    analyze_checkpoint,
    hutchpp_trace,
    lanczos_eigs,
    run,
    spectral_density,
)
from sharpscope.hessian.runner import check_memory, stage_bytes
from sharpscope.plots.output import FigureOutput

FAST = {"num_samples": 64, "batch_size": 64, "device": "cpu"}


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny 1-epoch mlp runs (SGD, SAM) on 256 digits; checkpoints at epoch 0 and final (1)."""
    root = tmp_path_factory.mktemp("runs")
    for optimizer in ("sgd", "sam"):
        result = invoke("train", "--dataset", "digits", "--model", "mlp", "--optimizer", optimizer, "--epochs", 1,
                        "--train-samples", 256, "--batch-size", 128, "--device", "cpu", "--out", root / optimizer)
        assert result.exit_code == 0, result.output
    return root


def test_run_from_python_writes_what_the_cli_writes(runs, tmp_path):
    figures = FigureOutput(formats=("png", "svg"), dpi=60)
    result = run([runs / "sgd", runs / "sam"], top_k=2, bottom_k=2, per_layer=True, out=tmp_path / "lib",
                 figure_output=figures, **FAST)
    assert isinstance(result, SpectrumRun) and result.runs == ["sgd", "sam"]
    data = json.loads((tmp_path / "lib" / "spectrum.json").read_text())
    assert list(result.records) == data["checkpoints"]
    assert [(r["run"], r["epoch"]) for r in result.records] == [("sgd", 0), ("sgd", 1), ("sam", 0), ("sam", 1)]
    names = {p.name for p in result.outputs}
    assert names == {"spectrum.json", "spectrum.npz"} | {f"{stem}.{fmt}" for fmt in ("png", "svg")
                                                         for stem in ("top_eigenvalues", "bottom_eigenvalues",
                                                                      "per_layer")}
    assert all(p.stat().st_size > 0 for p in result.outputs)
    from PIL import Image

    with Image.open(tmp_path / "lib" / "top_eigenvalues.png") as image:  # 7 x 4.5 in at 60 dpi, tight bbox
        assert image.size[0] < 7 * 60 + 10
    assert "SpectrumRun(4 checkpoints in 2 runs" in repr(result) and len(repr(result)) < 300

    cli_out = tmp_path / "cli"
    output = invoke("hessian-spectrum", runs / "sgd", runs / "sam", "--top-k", 2, "--bottom-k", 2, "--per-layer",
                    "--num-samples", 64, "--batch-size", 64, "--device", "cpu", "--out", cli_out)
    assert output.exit_code == 0, output.output
    by_cli = json.loads((cli_out / "spectrum.json").read_text())["checkpoints"]
    for a, b in zip(by_cli, result.records):  # same settings, same seeds, same process: identical numbers
        assert a["top_eigenvalues"] == b["top_eigenvalues"] and a["bottom"] == b["bottom"]
        assert a["per_layer"] == b["per_layer"]
    # the CLI prints the bottom-k and per-layer tables: every value, signed, at the last checkpoint of each run
    text = output.output
    assert "lambda_min,1" in text and "lambda_min,2" in text and "per-layer lambda_1" in text
    final = by_cli[1]
    assert f"{final['bottom']['eigenvalues'][1]:.5g}" in text
    for layer, block in final["per_layer"].items():
        assert any(line.split()[0] == layer and f"{block['eigenvalues'][0]:.5g}" in line
                   for line in text.splitlines() if line.strip())


def test_run_refuses_bad_settings(runs, tmp_path):
    with pytest.raises(SharpscopeError, match="give --trace-rtol .* or --trace-matvecs"):
        run([runs / "sgd"], trace=True, trace_rtol=0.1, trace_matvecs=12, out=tmp_path / "a", **FAST)
    with pytest.raises(SharpscopeError, match="top_k must be an integer >= 1, got 0"):
        run([runs / "sgd"], top_k=0, out=tmp_path / "b", **FAST)
    with pytest.raises(SharpscopeError, match="figure_output must be a FigureOutput"):
        run([runs / "sgd"], figure_output="png", out=tmp_path / "c", **FAST)


@pytest.mark.parametrize("options, stage, fix", [
    (["--density", "--density-runs", 10**7], "density", "lower --density-runs or --density-iters"),
    (["--trace", "--trace-matvecs", 10**10], "trace", "lower --trace-matvecs or use the adaptive --trace-rtol"),
])
def test_absurd_budgets_are_refused_in_one_line_before_any_work(runs, tmp_path, options, stage, fix):
    out = tmp_path / "out"
    result = invoke("hessian-spectrum", runs / "sgd" / "final.pt", *options, "--top-k", 1, "--num-samples", 64,
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: final.pt: the {stage} stage needs about "), lines[0]
    assert "GiB are free" in lines[0] and lines[0].endswith(fix), lines[0]
    assert not (out / "spectrum.json").exists()  # refused before the first result


def test_stage_estimates_cover_what_each_stage_allocates():
    """The refusal compares these with free memory: each must count at least the float64 vectors its algorithm
    stores (lanczos.py, trace.py, density.py), plus the top-k eigenvectors kept alive meanwhile."""
    n, top = 10_000, 5
    config = {"top_k": top, "bottom_k": 3, "trace": True, "trace_matvecs": 300, "density": True,
              "density_iters": 90, "density_runs": 5, "per_layer": True}
    stages = stage_bytes(n, config, layer_sizes=[6_000, 4_000])
    assert stages["top-k Lanczos"] >= 8 * n * (30 + 1 + top)  # basis (m + 1) and locked pairs
    assert stages["bottom-k Lanczos"] >= 8 * n * (top + 100 + 1 + 3)  # bottom basis defaults to 100 vectors
    assert stages["trace"] >= 8 * n * (top + 300)  # S, HS, Q (m/3 each) and the probes G
    assert stages["density"] >= 8 * n * (top + 5 * 90)  # each run's reorthogonalisation basis
    assert 8 * 6_000 * 31 <= stages["per-layer"] - 8 * n * top < stages["top-k Lanczos"]
    # adaptive trace: the sketch and deflation vectors and three probe blocks, whatever the budget
    adaptive = stage_bytes(n, {**config, "trace_matvecs": None})["trace"]
    assert 8 * n * (top + 8 + top + 16) <= adaptive < stages["trace"]
    # density steps are capped at n, like the algorithm's
    assert stage_bytes(50, {**config, "density_iters": 10**6})["density"] == 8 * 50 * (5 + 5 * (50 + 4))


def test_check_memory_names_the_stage_and_the_fix():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    config = {"top_k": 2, "bottom_k": 0, "trace": False, "density": True, "density_iters": 40,
              "density_runs": 5, "per_layer": True}
    stages = stage_bytes(283, config, layer_sizes=[220, 63])
    check_memory(model, config, device=torch.device("cpu"), free_bytes=max(stages.values()))  # fits exactly
    with pytest.raises(SharpscopeError, match=r"^m.pt: the density stage needs about 0\.0 GiB .* 283-parameter "
                                              r"Hessian .* lower --density-runs or --density-iters$"):
        check_memory(model, config, device=torch.device("cpu"), free_bytes=stages["density"] - 1, label="m.pt")


def _short(text: str, lines: int = 1) -> None:
    assert "tensor(" not in text and len(text.splitlines()) <= lines, text
    assert all(len(line) < 240 for line in text.splitlines()), text


def test_result_reprs_are_short_summaries_with_error_bars():
    A = torch.diag(torch.linspace(-1.0, 4.0, 400, dtype=torch.float64))
    eigs = lanczos_eigs(A, 3, tol=1e-8)
    text = repr(eigs)
    _short(text)
    assert text.startswith("EigenResult(top 3: [4 +- ") and "converged 3/3" in text
    assert f"{eigs.num_matvecs} HVPs" in text and "vectors (400, 3)" in text
    many = repr(lanczos_eigs(A, 8, tol=1e-8))
    _short(many)
    assert "(2 more)" in many  # six shown
    trace = hutchpp_trace(A, seed=0)
    text = repr(trace)
    _short(text)
    assert f"{trace.value:.6g} +- {trace.stderr:.2g} (stderr)" in text and "rtol 0.02 met" in text
    assert f"{trace.num_matvecs} HVPs" in text
    density = spectral_density(A, num_iters=20, num_runs=3, num_points=500)
    text = repr(density)
    _short(text)
    assert f"SLQ trace {density.trace_estimate:.6g} +- {density.trace_stderr:.2g}" in text
    assert "3 runs (20-20 steps), fixed steps" in text and f"{density.num_matvecs} HVPs" in text

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    batches = [(torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    spectrum = analyze_checkpoint(model, torch.nn.CrossEntropyLoss(), batches, top_k=2, bottom_k=1, trace=True,
                                  trace_matvecs=12, density=True, density_iters=8, density_runs=2, per_layer=True)
    text = repr(spectrum)
    _short(text, lines=6)
    assert text.splitlines()[0].startswith("CheckpointSpectrum(n=51 parameters, 16 samples")
    for part in ("top=EigenResult(top 2", "bottom=EigenResult(bottom 1", "trace=TraceEstimate(hutch++",
                 "density=SpectralDensity(", "per_layer lambda_1={0: "):
        assert part in text, (part, text)
    layers = repr(spectrum.per_layer)
    assert layers.count("EigenResult(") == 2 and "tensor(" not in layers
    np.testing.assert_equal(text.count("\n"), 5)

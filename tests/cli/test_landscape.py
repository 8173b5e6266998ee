"""``sharpscope landscape`` end to end on tiny digits runs: files opened with numpy/json alone, bad input, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.image import imread

from sharpscope.cli.main import cli
from sharpscope.errors import SharpscopeError

EVAL = ["--num-samples", "300", "--batch-size", "128"]


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-epoch MLP runs on digits (SGD and SAM), checkpoints every epoch: ckpt-epoch000/001.pt + final.pt."""
    root = tmp_path_factory.mktemp("runs")
    for optimizer in ("sgd", "sam"):
        result = invoke("train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--save-every", "1",
                        "--batch-size", "64", "--lr", "0.05", "--optimizer", optimizer, "--out", str(root / optimizer))
        assert result.exit_code == 0, result.output
    return root


def _centre_loss(ckpt) -> float:
    """The checkpoint's loss on the same evaluation set, computed independently of the landscape code."""
    from sharpscope.inputs import analysis_inputs

    checkpoint, batches = analysis_inputs(ckpt, num_samples=300, batch_size=128)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(torch.nn.functional.cross_entropy(checkpoint.model(x), y)) * len(y)
            count += len(y)
    return total / count


def _png_ok(path) -> None:
    image = imread(path)[..., :3]
    assert image.shape[0] > 100 and image.std() > 0.05, path


def test_compare_two_models_2d(runs, tmp_path):
    out = tmp_path / "cmp"
    result = invoke("landscape", str(runs / "sam" / "final.pt"), "--compare", str(runs / "sgd" / "final.pt"),
                    "--x", "-1:1:5", "--y", "-1:1:3", *EVAL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/comparison.png" in result.output and "sam: centre loss" in result.output
    for label in ("sam", "sgd"):
        data = np.load(out / f"surface-{label}.npz")
        assert data["loss"].shape == (3, 5) and data["done"].all()
        record = json.loads((out / f"surface-{label}.json").read_text())
        assert record["xs"] == pytest.approx([-1, -0.5, 0, 0.5, 1]) and len(record["loss"]) == 3
        assert record["config"]["num_samples"] == 300 and record["config"]["norm"] == "filter"
        assert record["provenance"]["checkpoints"][0]["sha256"]
        # the grid centre is the checkpoint: equal to an independent evaluation up to reduction order (float32)
        assert data["loss"][1, 2] == float(data["center_loss"])
        assert float(data["center_loss"]) == pytest.approx(_centre_loss(runs / label / "final.pt"), rel=1e-6)
        for kind in ("contour", "contourf", "heatmap", "surface3d"):
            _png_ok(out / f"{kind}-{label}.png")
    _png_ok(out / "comparison.png")
    assert not (out / "accuracy.png").exists()  # with --compare the accuracy is the comparison's second row
    assert f"wrote {out}/directions.pt" in result.output  # one raw draw for both models
    html = (out / "surface.html").read_text()
    assert "plotly" in html and len(html) > 1_000_000
    assert not list(out.glob(".*partial*"))  # resume files are removed once the results are written


def test_1d_curve_same_seed_same_draw(runs, tmp_path):
    out = tmp_path / "line"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--dim", "1", "--x", "-1:1:5", "--loss-scale", "log",
                    "--seed", "3", *EVAL, "--out", str(out))
    assert result.exit_code == 0, result.output
    data = np.load(out / "surface.npz")
    assert data["loss"].shape == (5,) and data["ys"].size == 0
    assert data["loss"][2] == float(data["center_loss"])
    _png_ok(out / "curve.png")
    meta = json.loads((out / "surface.json").read_text())["metadata"]
    assert meta["directions"][0]["seed"] == 3 and meta["directions"][0]["kind"] == "random"

    args = ["landscape", str(runs / "sgd" / "final.pt"), "--dim", "1", "--x", "-1:1:3", *EVAL, "--out", str(out)]
    repeat = CliRunner().invoke(cli, args)
    assert repeat.exit_code == 1 and "pass --overwrite" in repeat.output  # results are never silently replaced
    overwritten = CliRunner().invoke(cli, ["-q", *args, "--overwrite"])
    assert overwritten.exit_code == 0, overwritten.output
    assert np.load(out / "surface.npz")["loss"].shape == (3,)


def test_interpolation_endpoints(runs, tmp_path):
    out = tmp_path / "interp"
    sgd, sam = runs / "sgd" / "final.pt", runs / "sam" / "final.pt"
    result = invoke("landscape", str(sgd), "--compare", str(sam), "--directions", "interpolate",
                    "--x", "-0.5:1.5:9", *EVAL, "--out", str(out))
    assert result.exit_code == 0, result.output
    data = np.load(out / "surface.npz")
    xs = data["xs"]
    assert xs[2] == 0.0 and xs[6] == 1.0
    assert data["loss"][2] == pytest.approx(_centre_loss(sgd), rel=1e-6)  # float32, reduction order
    assert data["loss"][6] == pytest.approx(_centre_loss(sam), rel=1e-5)  # w_a + (w_b - w_a): ~1 ulp per weight
    _png_ok(out / "curve.png")
    # the barrier: max loss for 0 <= t <= 1 minus the higher endpoint, recomputed from the array written
    loss = data["loss"]
    expected = loss[2:7].max() - max(loss[2], loss[6])
    record = json.loads((out / "surface.json").read_text())
    assert record["barrier"]["value"] == pytest.approx(expected, abs=1e-12)
    assert f"loss barrier {expected:.4g}" in result.output


def test_plane_through_three_checkpoints(runs, tmp_path):
    out = tmp_path / "plane"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--compare", str(runs / "sam" / "final.pt"),
                    "--compare", str(runs / "sgd" / "ckpt-epoch001.pt"), "--directions", "interpolate",
                    "--x", "-0.5:1.5:5", *EVAL, "--out", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "surface.json").read_text())
    assert record["plane_points"]["coords"][1] == [1.0, 0.0]
    _png_ok(out / "contourf.png")


def test_pca_trajectory(runs, tmp_path):
    out = tmp_path / "pca"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--directions", "pca", "--x", "-1:1:5", *EVAL,
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    traj = np.load(out / "trajectory.npz")
    assert traj["path_coords"].shape == (3, 2) and list(traj["checkpoints"])[-1].endswith("final.pt")
    np.testing.assert_allclose(traj["path_coords"][-1], 0.0, atol=0)  # the final model is the origin
    assert traj["explained_variance_ratio"].sum() == pytest.approx(1.0)  # 3 checkpoints span exactly a plane
    _png_ok(out / "trajectory.png")
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy(runs / "sgd" / "final.pt", solo / "final.pt")
    bad = CliRunner().invoke(cli, ["landscape", str(solo / "final.pt"), "--directions", "pca", *EVAL,
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "needs at least 3 checkpoints" in bad.output


def test_hessian_directions(runs, tmp_path):
    pytest.importorskip("sharpscope.hessian")
    out = tmp_path / "hess"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--directions", "hessian", "--x", "-0.5:0.5:3",
                    "--num-samples", "100", "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "surface.json").read_text())["metadata"]["directions"]
    assert meta[0]["kind"] == "hessian" and meta[0]["info"]["eigenvalue"] >= meta[1]["info"]["eigenvalue"]
    assert meta[0]["norm_value"] == pytest.approx(1.0, rel=1e-5)  # unit eigenvectors


def test_saved_directions_cut_another_run_the_same_way(runs, tmp_path):
    from sharpscope.landscape import load_directions

    first = tmp_path / "first"
    result = invoke("landscape", str(runs / "sam" / "final.pt"), "--compare", str(runs / "sgd" / "final.pt"),
                    "--norm", "layer", "--seed", "4", "--x", "-1:1:5", "--y", "-0.5:0.5:3", *EVAL, "--out", str(first))
    assert result.exit_code == 0, result.output
    draw = load_directions(first / "directions.pt")  # the raw seeded draw, shared by both models
    assert [d.kind for d in draw] == ["draw", "draw"] and draw[0].seed == 4
    assert draw[0].info["normalize"] == {"norm": "layer", "ignore_bias_bn": True}
    assert draw[1].info["grid"] == [-0.5, 0.5, 3]
    assert json.loads((first / "surface-sgd.json").read_text())["directions_file"] == "directions.pt"

    # no --x/--y/--norm/--seed: the saved run's grid and normalisation, the draw normalised to sgd's weights
    second = tmp_path / "second"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--directions-from", str(first / "directions.pt"),
                    *EVAL, "--out", str(second))
    assert result.exit_code == 0, result.output
    before, after = np.load(first / "surface-sgd.npz"), np.load(second / "surface.npz")
    for key in ("xs", "ys", "loss", "accuracy"):
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    config = json.loads((second / "surface.json").read_text())["config"]
    assert config["norm"] == "layer" and config["seed"] == 4 and config["directions_from"].endswith("directions.pt")
    _png_ok(second / "accuracy.png")  # one model, 2-D: its accuracy figure
    assert [d.fingerprint() for d in load_directions(second / "directions.pt")] == [d.fingerprint() for d in draw]

    for args, message, code in [
        (["--dim", "1"], "holds 2 direction(s)", 1),
        (["--directions", "hessian"], "holds draw directions, which decide the cut", 2),
        (["--seed", "4"], "the directions come from", 2),
    ]:
        bad = CliRunner().invoke(cli, ["landscape", str(runs / "sgd" / "final.pt"), "--directions-from",
                                       str(first / "directions.pt"), *args, *EVAL, "--out", str(tmp_path / "x")])
        assert bad.exit_code == code and message in bad.output and "Traceback" not in bad.output, bad.output


def test_saved_interpolation_direction_is_used_as_saved(runs, tmp_path):
    sgd, sam = runs / "sgd" / "final.pt", runs / "sam" / "final.pt"
    first = tmp_path / "first"
    result = invoke("landscape", str(sgd), "--compare", str(sam), "--directions", "interpolate", "--x", "-0.5:1.5:5",
                    *EVAL, "--out", str(first))
    assert result.exit_code == 0, result.output
    again = invoke("landscape", str(sgd), "--directions-from", str(first / "directions.pt"), *EVAL,
                   "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "surface.npz")["loss"],
                                  np.load(first / "surface.npz")["loss"])
    bad = CliRunner().invoke(cli, ["landscape", str(sgd), "--directions-from", str(first / "directions.pt"),
                                   "--norm", "layer", *EVAL, "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "applies to a raw random draw only" in bad.output, bad.output


def test_pca_grid_covers_the_path_and_html_draws_it(runs, tmp_path):
    out = tmp_path / "pca"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--directions", "pca", *EVAL, "--out", str(out))
    assert result.exit_code == 0, result.output
    data, traj = np.load(out / "surface.npz"), np.load(out / "trajectory.npz")
    path = traj["path_coords"]
    assert data["loss"].shape == (21, 21)  # the modest default of a PCA plane
    for coords, values in ((data["xs"], path[:, 0]), (data["ys"], path[:, 1])):
        span = values.max() - values.min()
        assert 0.0 in coords  # the final model is a grid point
        assert coords[0] <= values.min() - 0.2 * span and coords[-1] >= values.max() + 0.2 * span
    # each checkpoint's own loss is recorded; the final one is the surface's centre
    assert traj["checkpoint_loss"].shape == (3,) and traj["checkpoint_loss"][-1] == float(data["center_loss"])
    html = (out / "surface.html").read_text()
    assert "projected path" in html and "its own loss" in html
    reach = float(np.abs(path[:, 0]).max())
    narrow = invoke("landscape", str(runs / "sgd" / "final.pt"), "--directions", "pca", "--x",
                    f"{-reach / 2}:{reach / 2}:3", *EVAL, "--out", str(tmp_path / "narrow"))
    assert narrow.exit_code == 0, narrow.output
    assert np.load(tmp_path / "narrow" / "surface.npz")["xs"][-1] == pytest.approx(reach / 2)  # kept as given
    assert "outside --x" in narrow.output and "omit --x to cover it" in narrow.output


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--directions", "interpolate"], "needs one --compare", 1),
        (["--directions", "pca", "--compare", "{sam}"], "drop --compare", 1),
        (["--directions", "interpolate", "--compare", "{sam}", "--dim", "2"], "is 1-D (a line)", 1),
        (["--directions", "pca", "--dim", "1"], "is a plane", 1),
        (["--dim", "1", "--y", "-1:1:3"], "--y is for 2-D surfaces", 1),
        (["--x", "1:-1:5"], "expected START < STOP", 2),
        (["--directions", "hesian"], "'hesian' is not one of", 2),
        (["--norm", "filtr"], "'filtr' is not one of", 2),
        (["--compare", "{missing}"], "does not exist", 1),
        (["--directions", "pca", "--norm", "layer"], "applies to random directions only, not --directions pca", 2),
        (["--directions", "interpolate", "--compare", "{sam}", "--include-bias-bn"], "random directions only", 2),
        (["--directions", "hessian", "--ignore-bias-bn"], "--ignore-bias-bn: applies to random", 2),
        (["--directions-from", "{missing}"], "does not exist", 1),
        (["--cmap", "viridsi"], "did you mean 'viridis'", 2),
        (["--vmin", "2", "--vmax", "1"], "expected vmin < vmax", 2),
        (["--loss-scale", "log", "--vmin", "0"], "must be > 0 with --loss-scale log", 2),
        (["--log-scale"], "Did you mean '--loss-scale'?", 2),
        (["--format", "jpg"], "unknown figure format", 2),
    ],
)
def test_bad_input_one_line_no_traceback(runs, tmp_path, args, message, code):
    args = [a.format(sam=runs / "sam" / "final.pt", missing=tmp_path / "nope.pt") for a in args]
    result = CliRunner().invoke(cli, ["landscape", str(runs / "sgd" / "final.pt"), *args, *EVAL,
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_surface(runs, tmp_path):
    ckpt = str(runs / "sgd" / "final.pt")
    args = ["landscape", ckpt, "--x", "-1:1:31", *EVAL]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sharpscope", "-q", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    partial = out / ".surface.partial.npz"
    deadline = time.time() + 60
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists(), "the run finished or failed before it could be killed"
    saved = int(np.load(partial)["done"].sum())
    assert 0 < saved < 31 * 31

    result = invoke(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"{31 * 31 - saved} points in" in result.output and f"{saved} resumed" in result.output
    fresh = invoke(*args, "--out", str(tmp_path / "fresh"))
    assert fresh.exit_code == 0
    np.testing.assert_array_equal(np.load(out / "surface.npz")["loss"], np.load(tmp_path / "fresh/surface.npz")["loss"])


@pytest.mark.slow
def test_torchrun_two_ranks_gives_the_single_process_surface(runs, tmp_path):
    ckpt = str(runs / "sgd" / "final.pt")
    args = ["landscape", ckpt, "--x", "-1:1:5", "--y", "-1:1:3", *EVAL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--module", "sharpscope", "-q", *args, "--out", str(tmp_path / "ranks")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "15 points in" in result.stdout and "over 2 ranks" in result.stdout
    assert result.stdout.count("centre loss") == 1  # rank 0 alone prints and writes
    single = invoke(*args, "--out", str(tmp_path / "single"))
    assert single.exit_code == 0
    # grid points are independent of the evaluation order and of the rank that computed them: identical
    np.testing.assert_array_equal(np.load(tmp_path / "ranks/surface.npz")["loss"],
                                  np.load(tmp_path / "single/surface.npz")["loss"])
    assert not list((tmp_path / "ranks").glob(".*partial*"))


def test_non_finite_points_are_reported(tmp_path):
    # convnet has BatchNorm: interpolated running variances turn negative far outside [0, 1] (NaN losses there)
    for seed in ("0", "1"):
        result = invoke("train", "--dataset", "digits", "--model", "convnet", "--epochs", "1", "--seed", seed,
                        "--out", str(tmp_path / seed))
        assert result.exit_code == 0, result.output
    result = invoke("landscape", str(tmp_path / "0" / "final.pt"), "--compare", str(tmp_path / "1" / "final.pt"),
                    "--directions", "interpolate", "--x", "-3:4:15", "--num-samples", "128",
                    "--out", str(tmp_path / "line"))
    assert result.exit_code == 0, result.output
    loss = np.load(tmp_path / "line" / "surface.npz")["loss"]
    bad = int((~np.isfinite(loss)).sum())
    assert 0 < bad < loss.size and np.isfinite(loss[[6, 8]]).all()  # t = 0 and t = 1 are the models themselves
    assert f"{bad} of 15 points have a non-finite loss (likely BatchNorm running variances" in result.output


def test_out_defaults_to_results_run_command(runs, tmp_path, monkeypatch):
    """The mission's own command, `sharpscope landscape ckpt.pt`, needs no --out: results/<run>-landscape."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["landscape", str(runs / "sgd" / "final.pt"), "--compare",
                                      str(runs / "sam" / "final.pt"), "--dim", "1", "--x", "-1:1:3", *EVAL])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "sgd+sam-landscape"
    assert (out / "surface-sgd.npz").is_file() or any(out.glob("*.npz")), sorted(p.name for p in out.iterdir())
    assert "results/sgd+sam-landscape" in result.output, result.output


def test_library_run_writes_what_the_cli_writes(runs, tmp_path):
    """sharpscope.landscape.run is the command: the same options give the same files and the same numbers."""
    from sharpscope.landscape import LandscapeResult, run

    sgd, sam = runs / "sgd" / "final.pt", runs / "sam" / "final.pt"
    cli_out = tmp_path / "cli"
    result = invoke("landscape", str(sam), "--compare", str(sgd), "--dim", "1", "--x", "-1:1:5", "--seed", "2",
                    *EVAL, "--out", str(cli_out))
    assert result.exit_code == 0, result.output
    lib = run(sam, [sgd], dim=1, x=(-1.0, 1.0, 5), seed=2, num_samples=300, batch_size=128, out=tmp_path / "lib")
    assert isinstance(lib, LandscapeResult) and lib.labels == ("sam", "sgd") and lib.ranks == 1
    names = sorted(p.name for p in cli_out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "lib").iterdir()) == sorted(p.name for p in lib.written)
    assert "curve.png" in names and "curve-sam.png" in names  # the overlay is the main 1-D figure
    for label, surface in zip(lib.labels, lib.surfaces):
        cli_loss = np.load(cli_out / f"surface-{label}.npz")["loss"]
        np.testing.assert_array_equal(np.load(tmp_path / "lib" / f"surface-{label}.npz")["loss"], cli_loss)
        np.testing.assert_array_equal(surface.loss, cli_loss)
    with pytest.raises(SharpscopeError, match="--directions pca draws one run"):
        run(sam, [sgd], directions="pca", out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_figure_options_formats_scale_and_colours(runs, tmp_path):
    out = tmp_path / "fig"
    result = invoke("landscape", str(runs / "sgd" / "final.pt"), "--x", "-1:1:5", "--y", "-1:1:3", *EVAL,
                    "--format", "png,pdf", "--dpi", "60", "--cmap", "magma", "--levels", "6", "--vmin", "0.5",
                    "--vmax", "3", "--loss-scale", "linear", "--out", str(out))
    assert result.exit_code == 0, result.output
    for stem in ("contour", "contourf", "heatmap", "surface3d", "accuracy"):
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        assert imread(out / f"{stem}.png").shape[0] < 400  # 60 dpi: about 5 in x 60
    config = json.loads((out / "surface.json").read_text())["config"]
    assert (config["loss_scale"], config["log_scale"], config["cmap"], config["levels"]) == ("linear", False,
                                                                                          "magma", 6)
    assert (config["vmin"], config["vmax"]) == (0.5, 3.0)


def _absurd_grid_compares(runs) -> list[str]:
    """--compare arguments enough for a 10001 x 10001 grid (the largest --x/--y allows) to exceed this machine's
    available memory by the estimate (one surface already does below ~138 GB available)."""
    from sharpscope.landscape.memory import GRID_BYTES_PER_POINT, HTML_BYTES_PER_POINT, available_host_memory

    free, _ = available_host_memory()
    per_surface = 10001**2 * (GRID_BYTES_PER_POINT + HTML_BYTES_PER_POINT)
    extra = max(0, int(free // per_surface))
    return sum((["--compare", str(runs / "sam" / "final.pt")] for _ in range(extra)), [])


def test_absurd_grid_is_refused_before_any_work(runs, tmp_path):
    out = tmp_path / "absurd"
    result = CliRunner().invoke(cli, ["landscape", str(runs / "sgd" / "final.pt"), *_absurd_grid_compares(runs),
                                      "--x", "-1:1:10001", "--y", "-1:1:10001", "--num-samples", "64",
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: this landscape needs about"), result.output
    assert "100,020,001 points" in lines[0] and "is available" in lines[0] and "Traceback" not in result.output
    assert not out.exists()  # nothing written
    # the library refuses a grid no click range check stops, before writing anything either
    from sharpscope.landscape import run

    with pytest.raises(SharpscopeError, match="needs about .* TB of memory"):
        run(runs / "sgd" / "final.pt", x=(-1.0, 1.0, 100_000), y=(-1.0, 1.0, 100_000), num_samples=64, out=out)
    assert not out.exists()

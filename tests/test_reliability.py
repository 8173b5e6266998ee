"""Reliability as a user meets it: every write atomic, kill -9 in the middle of an analysis then the same command
resumes, diverged checkpoints refused in one line, and --out never overwriting results without --overwrite.

The analyses run on one tiny digits run (mlp, 2 epochs, checkpoints at epochs 0, 1 and final) made once for the
module; kill tests use real ``python -m sharpscope`` subprocesses and SIGKILL, reruns run in-process.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sharpscope import io
from sharpscope.inputs import check_finite_loss
from sharpscope.cli.main import cli
from sharpscope.data import EvalBatches
from sharpscope.errors import SharpscopeError

PACKAGE = Path(__file__).resolve().parents[1] / "sharpscope"


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes; {} when the folder does not exist."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``sharpscope train --dataset digits --model mlp --epochs 2 --save-every 1 --batch-size 64``."""
    out = tmp_path_factory.mktemp("runs") / "sgd"
    result = invoke("train", "--dataset", "digits", "--model", "mlp", "--epochs", 2, "--save-every", 1,
                    "--batch-size", 64, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------------ atomic writes
#: calls that write a file; outside sharpscope/io.py each must go through sharpscope.io instead
WRITING_METHODS = {"savefig", "write_text", "write_bytes", "to_csv", "write_html", "write_image", "tofile"}
WRITING_FUNCTIONS = {("np", "save"), ("np", "savez"), ("np", "savez_compressed"), ("numpy", "save"),
                     ("torch", "save"), ("json", "dump"), ("pickle", "dump"), ("os", "replace"), ("os", "rename"),
                     ("shutil", "copy"), ("shutil", "copyfile"), ("shutil", "copy2"), ("shutil", "move")}


def _direct_writes(path: Path) -> list[str]:
    """``file:line call`` for every direct write in ``path``. ``open(tmp, "w...")`` is allowed only on a name
    bound by ``with atomic_path(...) as tmp`` (that temporary is renamed into place atomically)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    atomic_names = {item.optional_vars.id for node in ast.walk(tree) if isinstance(node, ast.With)
                    for item in node.items
                    if isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", None)
                    == "atomic_path" and isinstance(item.optional_vars, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        shown = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
        func, where = node.func, f"{shown}:{node.lineno}"
        if isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
            target = node.args[0] if node.args else None
            if writes and not (isinstance(target, ast.Name) and target.id in atomic_names):
                found.append((node.lineno, f"{where} open(..., {mode.value!r})"))
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if func.attr in WRITING_METHODS or (owner, func.attr) in WRITING_FUNCTIONS:
                found.append((node.lineno, f"{where} {owner or '...'}.{func.attr}(...)"))
    return [text for _, text in sorted(found)]


def test_every_file_is_written_through_sharpscope_io():
    sources = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "io.py" or p.parent != PACKAGE)
    assert len(sources) > 40  # the scan saw the package
    direct = [hit for p in sources for hit in _direct_writes(p)]
    assert direct == [], "write these through sharpscope.io (atomic): " + "; ".join(direct)


def test_the_scan_finds_direct_writes(tmp_path):
    """The guard above can fail: it flags each kind of direct write and accepts the atomic_path idiom."""
    module = tmp_path / "probe.py"
    module.write_text(
        "import numpy as np, torch, json\n"
        "from sharpscope.io import atomic_path\n"
        "def f(fig, p, obj):\n"
        "    open(p, 'w').write('x')\n"
        "    fig.savefig(p)\n"
        "    np.save(p, obj)\n"
        "    torch.save(obj, p)\n"
        "    p.write_text('x')\n"
        "    json.dump(obj, open(p, mode='a'))\n"
        "    with atomic_path(p) as tmp:\n"
        "        open(tmp, 'wb').write(b'ok')\n"
        "    open(p).read()\n"
    )
    hits = _direct_writes(module)
    assert [h.split(" ", 1)[1] for h in hits] == [
        "open(..., 'w')", "fig.savefig(...)", "np.save(...)", "torch.save(...)", "p.write_text(...)",
        "json.dump(...)", "open(..., 'a')"]


# ------------------------------------------------------------------------------------------------ kill -9, resume
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None  # written atomically: never half a file


def _kill_once_saved(args: list, out: Path, result_json: Path, saved, tmp_path: Path) -> dict:
    """Run ``python -m sharpscope ARGS --out OUT``, SIGKILL it as soon as ``saved(result_json)`` holds; return the
    JSON as the killed process left it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores: no oversubscription
    log = tmp_path / "killed.stderr"
    with open(log, "w") as stderr:  # a test's own log file, not sharpscope output
        proc = subprocess.Popen([sys.executable, "-m", "sharpscope", "-q", *map(str, args), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            document = _read_json(result_json)
            if document is not None and saved(document):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill ({proc.returncode}): {log.read_text()}"
    return _read_json(result_json)


SPECTRUM = ["--top-k", "2", "--num-samples", "128", "--device", "cpu"]
SHARPNESS = ["--m", "32", "--rho", "0.05", "--steps", "2", "--num-samples", "128", "--device", "cpu"]


@pytest.mark.slow
def test_hessian_spectrum_killed_mid_run_resumes_to_the_same_result(run_dir, tmp_path):
    args = ["hessian-spectrum", run_dir, *SPECTRUM]
    out = tmp_path / "killed"
    at_kill = _kill_once_saved(args, out, out / "spectrum.json", lambda d: len(d["checkpoints"]) >= 1, tmp_path)
    saved = at_kill["checkpoints"]
    assert 1 <= len(saved) < 3, "killed too late to test resume"

    rerun = invoke(*args, "--out", out)
    assert rerun.exit_code == 0, rerun.output
    straight = invoke(*args, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    resumed = json.loads((out / "spectrum.json").read_text())["checkpoints"]
    fresh = json.loads((tmp_path / "straight" / "spectrum.json").read_text())["checkpoints"]
    assert [(r["key"], r["sha256"], r["epoch"]) for r in resumed] == [(r["key"], r["sha256"], r["epoch"])
                                                                       for r in fresh]
    by_key = {r["key"]: r for r in resumed}
    for record in saved:  # work finished before the kill is kept as it was (same timing: not recomputed)
        assert by_key[record["key"]] == record
    for a, b in zip(resumed, fresh, strict=True):
        assert a["loss"] == b["loss"] and a["num_samples"] == b["num_samples"] == 128
        assert all(a["top_converged"]) and all(b["top_converged"])
        # the checkpoint after the kill point starts its Lanczos run from the eigenvectors saved with the previous
        # checkpoint, as the straight run does: the same products, bit for bit
        assert a["top_eigenvalues"] == b["top_eigenvalues"] and a["top_matvecs"] == b["top_matvecs"]
    assert len(list(out.glob(".warm-start.*.pt"))) == 1  # the run's last eigenvectors, kept for an extension
    arrays, fresh_arrays = np.load(out / "spectrum.npz"), np.load(tmp_path / "straight" / "spectrum.npz")
    assert sorted(arrays.files) == sorted(fresh_arrays.files)
    for record in resumed:
        np.testing.assert_array_equal(arrays[f"{record['key']}__top_eigenvalues"], record["top_eigenvalues"])
    assert (out / "top_eigenvalues.png").stat().st_size > 0
    assert [p.name for p in out.iterdir() if io.is_temporary(p.name)] == []


@pytest.mark.slow
def test_sharpness_killed_mid_run_resumes_to_the_same_result(run_dir, tmp_path):
    args = ["sharpness", run_dir, *SHARPNESS]
    out = tmp_path / "killed"
    at_kill = _kill_once_saved(args, out, out / "sharpness.json", lambda d: len(d["entries"]) >= 1, tmp_path)
    saved = at_kill["entries"]
    assert 1 <= len(saved) < 3, "killed too late to test resume"

    rerun = invoke(*args, "--out", out)
    assert rerun.exit_code == 0, rerun.output
    assert f"reused {len(saved)} result(s)" in rerun.output
    straight = invoke(*args, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    resumed = json.loads((out / "sharpness.json").read_text())
    fresh = json.loads((tmp_path / "straight" / "sharpness.json").read_text())
    for entry in saved:  # kept as it was before the kill (same timing: not recomputed)
        assert entry in resumed["entries"]
    # every (checkpoint, measure) is seeded on its own: the resumed run's values are bit-identical
    assert resumed["rows"] == fresh["rows"] and len(fresh["rows"]) == 3
    assert [e["result"] for e in resumed["entries"]] == [e["result"] for e in fresh["entries"]]
    assert resumed["checkpoints"] == fresh["checkpoints"]
    assert (json.loads((out / "kendall_tau.json").read_text())["tau"]
            == json.loads((tmp_path / "straight" / "kendall_tau.json").read_text())["tau"])
    np.testing.assert_array_equal(np.load(out / "sharpness.npz")["worst_values"],
                                  np.load(tmp_path / "straight" / "sharpness.npz")["worst_values"])
    assert [p.name for p in out.iterdir() if io.is_temporary(p.name)] == []


# ------------------------------------------------------------------------------------------------ divergence
ANALYSES = {
    "hessian-spectrum": ["--top-k", "1", "--num-samples", "64"],
    "landscape": ["--dim", "1", "--x", "-1:1:3", "--num-samples", "64"],
    "sharpness": ["--m", "32", "--rho", "0.05", "--steps", "1", "--num-samples", "64"],
}


@pytest.fixture(scope="module")
def diverged(run_dir, tmp_path_factory):
    """final.pt with one weight set to NaN (and one with +inf), as a run that blew up would leave it."""
    root = tmp_path_factory.mktemp("diverged")
    paths = {}
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        payload = torch.load(run_dir / "final.pt", weights_only=True)
        payload["model_state"]["1.weight"][3, 5] = value
        (root / name).mkdir()
        torch.save(payload, root / name / "final.pt")  # the test's own fixture file
        paths[name] = root / name / "final.pt"
    return paths


@pytest.mark.parametrize("command", list(ANALYSES))
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_diverged_checkpoint_is_refused_in_one_line(diverged, tmp_path, command, bad):
    out = tmp_path / "out"
    result = invoke(command, diverged[bad], *ANALYSES[command], "--out", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    # an inf weight gives inf - inf = nan in the logits: the loss is nan either way
    assert re.fullmatch(r"Error: .*final\.pt: the loss at the checkpoint is not finite \(nan\); the model diverged "
                        r"\(1 of 9610 weights are NaN/inf\).*--lr.*", lines[0]), lines[0]
    assert files_in(out) == {}


def test_a_diverged_compare_checkpoint_is_refused_too(run_dir, diverged, tmp_path):
    result = invoke("landscape", run_dir / "final.pt", "--compare", diverged["nan"], "--directions", "interpolate",
                    "--num-samples", "64", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "the loss at the checkpoint is not finite (nan)" in result.output
    assert str(diverged["nan"]) in result.output and not (tmp_path / "out").exists()


def _batches() -> EvalBatches:
    generator = torch.Generator().manual_seed(0)
    return EvalBatches.from_tensors(torch.randn(10, 4, generator=generator), torch.arange(10) % 3, batch_size=4)


def test_check_finite_loss_returns_the_sample_weighted_mean():
    torch.manual_seed(0)
    model, loss_fn, batches = torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss(), _batches()
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    with torch.no_grad():
        reference = float(torch.nn.functional.cross_entropy(model.double()(x.double()), y))  # one float64 pass
    model.float()
    # float32 batches (4, 4, 2 samples) summed in float64 against one float64 pass: float32 rounding only
    assert check_finite_loss(model, loss_fn, batches, "m.pt") == pytest.approx(reference, rel=1e-6)


def test_check_finite_loss_says_why_the_loss_is_not_finite():
    model, loss_fn = torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        model.weight.fill_(3e38)  # finite weights whose logits overflow float32
    with pytest.raises(SharpscopeError, match=r"m\.pt: the loss at the checkpoint is not finite \((nan|inf)\); "
                                              r"the model diverged \(its weights are finite, so its outputs overflow"):
        check_finite_loss(model, loss_fn, _batches(), "m.pt")
    with pytest.raises(SharpscopeError, match=r"the evaluation set is empty; pass --num-samples 1 or more"):
        check_finite_loss(model, loss_fn, [], "m.pt")  # any iterable of (x, y) batches; EvalBatches refuses []


# ------------------------------------------------------------------------------------------------ no overwrites
SECOND_RUN = {  # (first run's options, options changed for the second run into the same --out)
    "hessian-spectrum": (ANALYSES["hessian-spectrum"], ["--top-k", "2"]),
    "landscape": (ANALYSES["landscape"], ["--x", "-1:1:5"]),
    "sharpness": (ANALYSES["sharpness"], ["--rho", "0.1"]),
}


@pytest.mark.parametrize("command", list(SECOND_RUN))
def test_a_second_run_with_other_settings_never_overwrites(run_dir, tmp_path, command):
    first_options, changed = SECOND_RUN[command]
    out = tmp_path / "out"
    first = invoke(command, run_dir / "final.pt", *first_options, "--out", out)
    assert first.exit_code == 0, first.output
    before = files_in(out)
    assert len(before) >= 3
    second = invoke(command, run_dir / "final.pt", *first_options, *changed, "--out", out)  # last value wins
    assert second.exit_code == 1 and isinstance(second.exception, SystemExit), second.output
    assert "--overwrite" in second.output and len(second.output.strip().splitlines()) == 1
    assert files_in(out) == before


def test_train_into_a_finished_run_with_other_settings_never_overwrites(run_dir, tmp_path):
    out = tmp_path / "sgd"
    shutil.copytree(run_dir, out)
    before = files_in(out)
    second = invoke("train", "--dataset", "digits", "--model", "mlp", "--epochs", 3, "--save-every", 1,
                    "--batch-size", 64, "--out", out)
    assert second.exit_code == 1 and "--overwrite" in second.output, second.output
    assert files_in(out) == before


@pytest.mark.slow
def test_a_second_report_with_other_settings_never_overwrites(run_dir, tmp_path):
    tiny = ["--grid", "-1:1:3", "--m", "32", "--rho", "0.05", "--top-k", "1", "--num-samples", "64",
            "--sharpness-steps", "1", "--max-chunks", "1", "--density-iters", "8"]
    out = tmp_path / "report"
    first = invoke("report", run_dir, *tiny, "--out", out)
    assert first.exit_code == 0, first.output
    before = files_in(out)
    assert "report.html" in before and len(before) > 15
    second = invoke("report", run_dir, *tiny, "--grid", "-1:1:5", "--out", out)
    assert second.exit_code == 1 and "--overwrite" in second.output, second.output
    assert files_in(out) == before


# ------------------------------------------------------------------------------------------------ kill -9 mid-epoch
def _last_step(path: Path) -> int | None:
    """The step of the resume point ``path`` (None while there is none). Written atomically: never half a file."""
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except FileNotFoundError:
        return None


#: digits, batch 64: 23 steps an epoch; a resume point every 5 steps, so most of them fall inside an epoch
KILLED_TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sam", "--batch-size", "64", "--lr",
                "0.05", "--epochs", "5", "--save-every", "0", "--resume-every", "5steps", "--threads", "1",
                "--device", "cpu"]


@pytest.fixture(scope="module")
def straight_train(tmp_path_factory):
    """KILLED_TRAIN's run, uninterrupted (in-process, one thread like the killed process)."""
    from sharpscope.train import TrainConfig, train

    out = tmp_path_factory.mktemp("straight") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(dataset="digits", model="mlp", optimizer="sam", batch_size=64, lr=0.05, epochs=5,
                             save_every=0)
        train(config, out_dir=out, device="cpu", progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("draw", [0, 1])
def test_train_killed_at_a_random_moment_resumes_mid_epoch_bit_identically(straight_train, tmp_path, draw):
    """SIGKILL a real ``sharpscope train`` at a seeded random moment (after the k-th resume point, plus a random
    delay that can land inside a step or a save); the same command resumes from the newest resume point on disk,
    mid-epoch, and ends with the weights and metrics of an uninterrupted run."""
    rng = random.Random(f"train-kill-{draw}")
    k = rng.randrange(2, 9)  # kill after the k-th resume point (steps 10..40 of 115: epochs 1-2 of 5)
    delay = rng.uniform(0.0, 0.03)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = tmp_path / "killed.stderr"
    with open(log, "w") as stderr:  # a test's own log file, not sharpscope output
        proc = subprocess.Popen([sys.executable, "-m", "sharpscope", "-q", *KILLED_TRAIN, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline, seen_stat = time.monotonic() + 120, None
        while proc.poll() is None and time.monotonic() < deadline:
            stat = (out / "last.pt").stat() if (out / "last.pt").exists() else None
            key = stat and (stat.st_ino, stat.st_mtime_ns)
            if key and key != seen_stat:  # a new resume point: read its step only then
                seen_stat = key
                step = _last_step(out / "last.pt")
                if step is not None and step >= 5 * k:
                    break
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill ({proc.returncode}): {log.read_text()}"
    assert not (out / "final.pt").exists(), "killed too late to test resume"
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["step"] >= 5 * k and (saved["step"] % 5 == 0 or saved["step"] % 23 == 0), saved["step"]

    rerun = invoke(*KILLED_TRAIN, "--out", out)
    assert rerun.exit_code == 0, rerun.output
    # it goes on from the newest resume point: it lost at most the work since that was written (< 5 steps)
    if "position" in saved:
        where = saved["position"]
        assert f"resuming {out} at step {saved['step']} (epoch {where['epoch']}, batch {where['batch']} of 23)" \
            in rerun.output, rerun.output
    else:
        assert f"resuming {out} after epoch {saved['epoch']}" in rerun.output, rerun.output

    a, b = (torch.load(p / "final.pt", weights_only=True) for p in (straight_train, out))
    assert [k for k in a["model_state"] if not torch.equal(a["model_state"][k], b["model_state"][k])] == []
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(straight_train) == strip(out) and len(strip(out)) == 5
    assert [p.name for p in out.iterdir() if io.is_temporary(p.name)] == []

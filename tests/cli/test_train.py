"""``sharpscope train`` as a user runs it: real subprocesses, bad input, and a kill -9 in the middle."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from sharpscope import io
from sharpscope.cli.main import cli

FAST = ["train", "--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--lr", "0.05"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_is_instant_and_shows_examples():
    result = subprocess.run([sys.executable, "-m", "sharpscope", "train", "--help"], capture_output=True, text=True,
                            check=True)
    assert "sharpscope train --optimizer sam --rho 0.05 --out runs/sam" in result.stdout
    top = subprocess.run([sys.executable, "-c", "import sys, sharpscope.cli.main; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert top.stdout.strip() == "False"


def test_train_sgd_then_sam_prints_where_outputs_went(tmp_path):
    for optimizer in ("sgd", "sam"):
        out = tmp_path / optimizer
        result = invoke("-q", *FAST, "--epochs", "1", "--optimizer", optimizer, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert f"wrote {out}/final.pt" in result.output and "test accuracy" in result.output
        assert (out / "final.pt").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--dataset", "digts"], "unknown dataset 'digts'; did you mean 'digits'", 2),
        (["--model", "resnet2"], "unknown model 'resnet2'; did you mean", 2),
        (["--optimizer", "adam"], "'adam' is not one of 'sgd', 'sam', 'asam'", 2),
        (["--rho", "0"], "Invalid value for", 2),
        (["--rho", "-0.05"], "Invalid value for", 2),
        (["--lr", "nan"], "--lr", 2),
        (["--m", "1000"], "micro-batch size must be <= --batch-size", 2),
        (["--micro-batch-size", "1000"], "'--m' / '--micro-batch-size': the micro-batch size must be <=", 2),
        (["--eta", "-1"], "Invalid value for --eta: must be a number >= 0", 2),
        (["--eta", "nan"], "Invalid value for --eta", 2),
        (["--rho-schedule", "lr"], "--rho-schedule only affect SAM's perturbation, which --optimizer sgd", 2),
        (["--rho", "0.1"], "--rho only affect SAM's perturbation", 2),
        (["--m", "8", "--sam-every", "2"], "--m and --sam-every only affect SAM's perturbation", 2),
        (["--threads", "5000"], "CPU(s); use at most", 2),
        (["--rho-schedule", "cosine"], "'cosine' is not one of 'constant', 'lr'", 2),
        (["--precision", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'", 2),
        (["--epochs", "0"], "Invalid value for '--epochs'", 2),
        (["--model", "mlp:hidden"], "expected NAME[:key=value", 2),
        (["--device", "cuda:7"], "--device cuda:7", 2),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar", 1),
    ],
)
def test_bad_input_one_line_no_traceback(tmp_path, args, message, code):
    result = CliRunner().invoke(cli, [*FAST, "--epochs", "1", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "run" / "final.pt").exists()


def test_micro_batch_size_is_the_m_option_and_the_sam_options_reach_the_optimizer(tmp_path):
    """``--micro-batch-size`` (the spelling torchrun leaves alone) sets m; --eta and --rho-schedule reach SAM."""
    out = tmp_path / "run"
    result = invoke("-q", *FAST, "--epochs", "1", "--optimizer", "asam", "--rho", "0.5", "--eta", "0.2",
                    "--rho-schedule", "lr", "--micro-batch-size", "16", "--out", str(out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["m"], config["eta"], config["rho_schedule"]) == (16, 0.2, "lr")
    group = torch.load(out / "final.pt", weights_only=True)["optimizer_state"]["param_groups"][0]
    assert (group["adaptive"], group["eta"], group["rho_schedule"], group["rho"]) == (True, 0.2, "lr", 0.5)
    assert "--micro-batch-size" in invoke("train", "--help").output


def _train_cmd(out, epochs):
    return [sys.executable, "-m", "sharpscope", "-q", *FAST, "--optimizer", "sam", "--epochs", str(epochs),
            "--out", str(out)]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_resumes_bit_identically(tmp_path):
    """The same command after SIGKILL finishes with the weights of an uninterrupted run (CPU)."""
    epochs = 6
    subprocess.run(_train_cmd(tmp_path / "straight", epochs), check=True, capture_output=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(tmp_path / "killed", epochs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "ckpt-epoch002.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"exit status {proc.returncode}: the run ended before the kill"
    assert not (tmp_path / "killed" / "final.pt").exists(), "killed too late to test resume"
    rerun = subprocess.run(_train_cmd(tmp_path / "killed", epochs), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in p.read_text().splitlines()]
    assert strip(tmp_path / "straight" / "metrics.jsonl") == strip(tmp_path / "killed" / "metrics.jsonl")
    leftovers = [p.name for p in (tmp_path / "killed").iterdir() if io.is_temporary(p.name)]
    assert leftovers == []


def test_labels_name_the_optimizer_that_took_the_steps():
    from sharpscope.train.config import optimizer_label

    assert optimizer_label("sgd", "adamw") == "adamw" and optimizer_label("sgd", "sgd") == "sgd"
    assert optimizer_label("sam", "sgd") == "sam" and optimizer_label("asam", "adam") == "asam(adam)"


def test_threads_sets_and_records_the_thread_count(tmp_path):
    import json

    import torch

    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, [*FAST, "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "run" / "config.json").read_text())["environment"]["num_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_channels_last_is_an_option_recorded_and_runs_on_the_cpu(tmp_path):
    """``--channels-last`` reaches the config (the default stays None: CUDA conv nets only), trains the ConvNet on
    the CPU with channels-last kernels, and the same command twice gives the same weights."""
    args = ["train", "--dataset", "digits", "--model", "convnet", "--epochs", "1", "--train-samples", "256",
            "--optimizer", "sam", "--m", "16"]
    finals = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = invoke("-q", *args, "--channels-last", "--out", str(out))
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["channels_last"] is True
        finals.append(torch.load(out / "final.pt", weights_only=True)["model_state"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    default = tmp_path / "default"
    assert invoke("-q", *args, "--out", str(default)).exit_code == 0
    assert json.loads((default / "config.json").read_text())["channels_last"] is None
    kernel = "features.4.weight"  # the second convolution's (64, 32, 3, 3) kernel: the checkpoint keeps its strides
    assert finals[0][kernel].is_contiguous(memory_format=torch.channels_last)
    assert torch.load(default / "final.pt", weights_only=True)["model_state"][kernel].is_contiguous()


# ------------------------------------------------------------------------------------------------ your own code
FACTORIES = "tests_factory_module"


@pytest.fixture
def factories(monkeypatch):
    """tests/train/tests_factory_module.py importable, as a user's own module next to their script."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "train"))


def test_your_architecture_and_data_train_and_every_analysis_reloads_them(tmp_path, factories):
    """--model/--dataset package.module:factory[:k=v]: the checkpoints record both specs, so analyses need neither."""
    from sharpscope.train import load_checkpoint

    run = tmp_path / "run"
    model, data = f"{FACTORIES}:make_mlp:hidden=12,norm=layer", f"{FACTORIES}:small_digits:train=256,test=128"
    result = invoke("-q", "train", "--model", model, "--dataset", data, "--epochs", "2", "--batch-size", "64",
                    "--lr", "0.05", "--optimizer", "sam", "--out", str(run))
    assert result.exit_code == 0, result.output
    assert f"sam {FACTORIES}:make_mlp on {data}: test accuracy" in result.output
    checkpoint = load_checkpoint(run / "final.pt")  # no model spec, no dataset
    assert checkpoint.model_name == f"{FACTORIES}:make_mlp"
    assert checkpoint.model_kwargs == {"hidden": 12, "norm": "layer"}
    assert checkpoint.dataset == data and checkpoint.epoch == 2
    assert isinstance(checkpoint.model[2], torch.nn.LayerNorm) and checkpoint.model[1].out_features == 12
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["dataset"]) == (f"{FACTORIES}:make_mlp", data)

    spectrum = invoke("-q", "hessian-spectrum", str(run), "--top-k", "1", "--num-samples", "64",
                      "--out", str(tmp_path / "spectrum"))
    assert spectrum.exit_code == 0, spectrum.output
    records = json.loads((tmp_path / "spectrum" / "spectrum.json").read_text())["checkpoints"]
    assert len(records) == 3 and all(r["num_samples"] == 64 for r in records)
    landscape = invoke("-q", "landscape", str(run / "final.pt"), "--dim", "1", "--x=-1:1:3", "--num-samples", "64",
                       "--out", str(tmp_path / "landscape"))
    assert landscape.exit_code == 0, landscape.output
    assert any(p.suffix == ".npz" for p in (tmp_path / "landscape").iterdir())


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--model", "no_such_module_xyz:make"], "model factory 'no_such_module_xyz:make': cannot import", 2),
        (["--model", f"{FACTORIES}:missing"], f"{FACTORIES} has no callable 'missing'", 2),
        (["--model", f"{FACTORIES}:make_mlp:width=3"], "rejected its arguments {'width': 3}", 2),
        (["--model", f"{FACTORIES}:small_digits"], "returned ImageDataset, not an nn.Module", 1),
        (["--dataset", "no_such_module_xyz:data"], "dataset factory 'no_such_module_xyz:data': cannot import", 2),
        (["--dataset", f"{FACTORIES}:not_a_dataset"], "returned dict, not a sharpscope.data.ImageDataset", 1),
        (["--dataset", f"{FACTORIES}:small_digits:train"], "dataset spec", 2),
        (["--resume-every", "soon"], "Invalid value for '--resume-every': resume interval 'soon': expected", 2),
    ],
)
def test_bad_factories_and_intervals_one_line(tmp_path, factories, args, message, code):
    result = CliRunner().invoke(cli, [*FAST, "--epochs", "1", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "run" / "final.pt").exists()


def test_resume_every_is_recorded_and_does_not_block_a_resume(tmp_path):
    """The interval changes what a kill costs, not the run: a rerun with another value still resumes."""
    out = tmp_path / "run"
    result = invoke("-q", *FAST, "--epochs", "1", "--resume-every", "90s", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["environment"]["resume_every"] == "90s"
    (out / "final.pt").unlink()  # as if killed after the last epoch
    again = invoke("-q", *FAST, "--epochs", "1", "--resume-every", "10steps", "--out", str(out))
    assert again.exit_code == 0 and "different config" not in again.output, again.output

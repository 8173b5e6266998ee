"""Models saved by someone else's code: a plain ``state_dict`` reaches every analysis with ``--model``; names and
values the user gets wrong are bad usage (exit 2, one line, close matches suggested)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from sharpscope.cli.main import cli
from sharpscope.models import create_model

#: The cheapest settings of each analysis (the point is that the model loads and the command finishes).
ANALYSES = {
    "landscape": ["--dim", "1", "--x", "-1:1:3", "--num-samples", "32", "--device", "cpu"],
    "hessian-spectrum": ["--top-k", "1", "--max-matvecs", "6", "--num-samples", "32", "--device", "cpu"],
    "sharpness": ["--measure", "worst", "--m", "8", "--rho", "0.05", "--steps", "1", "--max-chunks", "1",
                  "--num-samples", "32", "--device", "cpu"],
}


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


@pytest.fixture(scope="module")
def foreign_mlp(tmp_path_factory):
    """``torch.save(model.state_dict())`` of a digits-shaped mlp, as other code writes it."""
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=8)
    path = tmp_path_factory.mktemp("foreign") / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("command", sorted(ANALYSES))
def test_every_analysis_loads_a_plain_state_dict_with_model(foreign_mlp, tmp_path, command):
    without = invoke(command, foreign_mlp, *ANALYSES[command], "--out", tmp_path / "a")
    assert without.exit_code == 1 and "--model" in without.output, without.output
    result = invoke(command, foreign_mlp, "--model", "mlp", "--dataset", "digits", *ANALYSES[command],
                    "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "b").iterdir())


def test_a_factory_next_to_the_user_loads_through_the_console_script(tmp_path):
    """``--model mynets:make_net`` run from the folder holding ``mynets.py``: the console script does not put
    the current folder on sys.path (``python -m`` does), so sharpscope looks there itself."""
    script = shutil.which("sharpscope")
    if script is None:
        pytest.skip("the sharpscope console script is not installed (pip install -e .)")
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn

        def make_net(width=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import mynets

        torch.save(mynets.make_net(width=12).state_dict(), tmp_path / "net.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynets", None)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([script, "-q", "hessian-spectrum", "net.pt", "--model", "mynets:make_net:width=12",
                           "--dataset", "digits", *ANALYSES["hessian-spectrum"], "--out", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "spectrum.json").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "digts"], "unknown dataset 'digts'; did you mean 'digits'?"),
    (["train", "--model", "resnet2"], "unknown model 'resnet2'; did you mean"),
    (["train", "--device", "gpu7"], "--device 'gpu7' is not a device"),
    (["train", "--model", "mlp:hiden=3"], "model 'mlp' does not take hiden"),
])
def test_unknown_names_are_bad_usage(tmp_path, args, message):
    result = invoke(*args, "--epochs", 1, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output, result.output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_analysis_with_an_unknown_model_spec_is_bad_usage(foreign_mlp, tmp_path):
    result = invoke("sharpness", foreign_mlp, "--model", "mpl", "--dataset", "digits", *ANALYSES["sharpness"],
                    "--out", tmp_path / "out")
    assert result.exit_code == 2 and "unknown model 'mpl'; did you mean 'mlp'?" in result.output, result.output


def test_malformed_model_kwargs_in_a_checkpoint_is_one_line(tmp_path):
    runs = tmp_path / "run"
    trained = invoke("train", "--model", "mlp", "--epochs", 1, "--device", "cpu", "--out", runs)
    assert trained.exit_code == 0, trained.output
    payload = torch.load(runs / "final.pt", weights_only=True)
    payload["model_kwargs"] = [1]
    torch.save(payload, tmp_path / "bad.pt")
    result = invoke("sharpness", tmp_path / "bad.pt", *ANALYSES["sharpness"], "--out", tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "malformed 'model_kwargs' entry" in result.output


def test_random_bytes_are_called_damaged_not_pickled_code(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 12)
    result = invoke("hessian-spectrum", path, *ANALYSES["hessian-spectrum"], "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "pickled Python objects" not in result.output and "corrupted or not a PyTorch file" in result.output, \
        result.output

"""Loading analysis inputs: a command over many checkpoints reads its dataset once, and never across commands."""

import pytest
from click.testing import CliRunner

import sharpscope.data
from sharpscope import inputs
from sharpscope.cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sgd"
    result = invoke("train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sgd", "--epochs", 2,
                    "--save-every", 1, "--batch-size", 128, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_a_trajectory_reads_the_dataset_once_per_command(run, tmp_path, monkeypatch):
    calls = []
    real = sharpscope.data.load_dataset

    def counting(name, **kwargs):
        calls.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(sharpscope.data, "load_dataset", counting)
    for attempt in range(2):
        result = invoke("hessian-spectrum", run, "--top-k", 1, "--num-samples", 100, "--device", "cpu",
                        "--out", tmp_path / f"spectrum{attempt}")
        assert result.exit_code == 0, result.output
        assert calls == ["digits"] * (attempt + 1), f"three checkpoints read the data {calls} times"
        assert inputs._LAST_DATASET == {}, "the cache outlived its command"

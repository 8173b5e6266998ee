"""What the analyses run on (sharpscope.inputs): BatchData evaluation sets re-batched in a fixed order, and the one
loss of a command (recorded, or --loss), refused in one line where checkpoints recorded different losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

from sharpscope.cli.main import cli
from sharpscope.errors import SharpscopeError
from sharpscope.inputs import AnalysisLoss, analysis_inputs, take_samples

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # examples/ is importable from the repository root, as in the README's commands
    sys.path.insert(0, str(ROOT))

REGRESSION = dict(model_spec="examples.byom.regression:make_model", dataset="examples.byom.regression:diabetes")


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 1-epoch SGD runs of the diabetes regression, one with MSE and one with L1 recorded; and a plain
    state_dict of the MSE run's final weights."""
    from examples.byom import regression
    from sharpscope.train import TrainConfig, fit

    root = tmp_path_factory.mktemp("runs")
    data = regression.diabetes()
    for name, loss in (("mse", "torch.nn:MSELoss"), ("l1", "torch.nn:L1Loss")):
        torch.manual_seed(0)
        fit(regression.make_model(), data.train, data.test, TrainConfig(optimizer="sgd", lr=0.05, epochs=1,
                                                                        save_every=0),
            root / name, loss_fn=loss, progress=False, log=lambda _: None, **REGRESSION)
    from sharpscope.train import load_checkpoint

    torch.save(load_checkpoint(root / "mse" / "final.pt").model.state_dict(), root / "weights.pt")
    return root


def _batches(sizes, *, constant="c"):
    """(dict inputs with a constant, targets) batches of the given sizes, numbered samples."""
    out, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        out.append(({"x": idx[:, None].float().expand(n, 3), "tag": constant}, idx))
        start += n
    return out


def test_take_samples_keeps_the_first_samples_in_order_rebatched():
    """7 of 3+3+2 samples as batches of 4: [0..3], [4..6]; every tensor cut along dim 0, the constant kept."""
    batches = take_samples(_batches([3, 3, 2]), 7, batch_size=4)
    assert [len(y) for _, y in batches] == [4, 3] and batches.num_samples == 7
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(7))
    assert torch.equal(torch.cat([x["x"][:, 0] for x, _ in batches]), torch.arange(7).float())
    assert all(x["tag"] == "c" for x, _ in batches)
    everything = take_samples(_batches([3, 3, 2]), None, batch_size=100)
    assert len(everything) == 1 and everything.num_samples == 8
    assert take_samples(_batches([3, 3, 2]), 10**6, batch_size=3).num_samples == 8  # more than there are: all


def test_take_samples_reads_a_shuffling_loader_in_its_stored_order():
    x = torch.arange(20).float()[:, None]
    loader = DataLoader(TensorDataset(x, torch.arange(20)), batch_size=6, shuffle=True)
    first = take_samples(loader, 10, batch_size=4)
    again = take_samples(loader, 10, batch_size=4)
    assert torch.equal(torch.cat([y for _, y in first]), torch.arange(10))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))


def test_take_samples_refuses_a_tensor_that_does_not_hold_the_samples():
    with pytest.raises(SharpscopeError, match="must hold the samples along dim 0"):
        take_samples([(torch.zeros(4, 2), torch.zeros(3))], 4, batch_size=2)


def test_analysis_inputs_reads_batch_data_from_the_recorded_factory(runs, monkeypatch):
    """The first 50 test samples of the diabetes factory's BatchData, in order, as batches of 20."""
    from examples.byom.regression import diabetes_tensors

    monkeypatch.chdir(ROOT)
    checkpoint, batches = analysis_inputs(runs / "mse" / "final.pt", split="test", num_samples=50, batch_size=20)
    x, y = diabetes_tensors()
    assert [len(b[1]) for b in batches] == [20, 20, 10]
    assert torch.equal(torch.cat([b[0] for b in batches]), x[352:402])
    assert torch.equal(torch.cat([b[1] for b in batches]), y[352:402])


def test_a_factory_returning_other_data_is_refused_naming_both_kinds(runs, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SharpscopeError, match="not a sharpscope.data.ImageDataset or a sharpscope.train.BatchData"):
        analysis_inputs(runs / "mse" / "final.pt", dataset="examples.byom.regression:diabetes_tensors")


def test_the_recorded_loss_is_used_and_different_ones_are_refused(runs):
    loss = AnalysisLoss()
    fn = loss.for_checkpoint(runs / "mse" / "final.pt", {"loss": "torch.nn:MSELoss"})
    assert isinstance(fn, torch.nn.MSELoss) and loss.spec == "torch.nn:MSELoss"
    with pytest.raises(SharpscopeError, match=r"trained with loss torch.nn:MSELoss but .* with torch.nn:L1Loss"):
        loss.check(runs / "l1" / "final.pt", {"loss": "torch.nn:L1Loss"})
    with pytest.raises(SharpscopeError, match="cross-entropy"):  # a classification run beside a regression run
        loss.check("cls.pt", {})
    assert isinstance(AnalysisLoss().for_checkpoint("cls.pt", {}), torch.nn.CrossEntropyLoss)
    overridden = AnalysisLoss("torch.nn:L1Loss")
    assert isinstance(overridden.for_checkpoint(runs / "mse" / "final.pt", {"loss": "torch.nn:MSELoss"}),
                      torch.nn.L1Loss)


@pytest.mark.parametrize("command", [
    ["hessian-spectrum", "--top-k", 1],
    ["sharpness", "--m", 8, "--rho", 0.05, "--steps", 1],
])
def test_commands_refuse_runs_with_different_losses_in_one_line(runs, tmp_path, monkeypatch, command):
    monkeypatch.chdir(ROOT)
    result = invoke(command[0], runs / "mse" / "final.pt", runs / "l1" / "final.pt", *command[1:],
                    "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "trained with loss torch.nn:MSELoss but" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written
    ok = invoke(command[0], runs / "mse" / "final.pt", runs / "l1" / "final.pt", *command[1:], "--loss",
                "torch.nn:MSELoss", "--num-samples", 64, "--device", "cpu", "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output


def test_landscape_refuses_comparing_runs_with_different_losses(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke("landscape", runs / "mse" / "final.pt", "--compare", runs / "l1" / "final.pt", "--dim", 1,
                    "--x", "-1:1:3", "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "trained with loss torch.nn:MSELoss but" in result.output, result.output


def test_loss_option_analyses_a_plain_state_dict_as_the_recorded_run(runs, tmp_path, monkeypatch):
    """The MSE run's weights as a plain state_dict, with --model --dataset --loss: the same top eigenvalue as the
    checkpoint with its recorded loss (the same computation: 1e-6 relative)."""
    monkeypatch.chdir(ROOT)
    common = ["--top-k", 1, "--num-samples", 128, "--device", "cpu"]
    recorded = invoke("hessian-spectrum", runs / "mse" / "final.pt", *common, "--out", tmp_path / "a")
    plain = invoke("hessian-spectrum", runs / "weights.pt", "--model", REGRESSION["model_spec"], "--dataset",
                   REGRESSION["dataset"], "--loss", "torch.nn:MSELoss", *common, "--out", tmp_path / "b")
    assert recorded.exit_code == 0 and plain.exit_code == 0, (recorded.output, plain.output)
    a, b = (json.loads((tmp_path / d / "spectrum.json").read_text())["checkpoints"][0] for d in ("a", "b"))
    assert b["top_eigenvalues"][0] == pytest.approx(a["top_eigenvalues"][0], rel=1e-6)
    bad = invoke("hessian-spectrum", runs / "weights.pt", "--loss", "mse", *common, "--out", tmp_path / "c")
    assert bad.exit_code == 2 and "expected package.module:factory" in bad.output, bad.output


def test_pac_bayes_is_refused_for_a_model_without_accuracy(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke("sharpness", runs / "mse" / "final.pt", "--measure", "pacbayes", "--device", "cpu",
                    "--out", tmp_path / "out")
    assert result.exit_code == 1 and "has no accuracy" in result.output, result.output
    assert len(result.output.splitlines()) == 1

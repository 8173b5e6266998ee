"""The trainer end to end on the bundled digits data: files, determinism, resume, divergence, refusals."""

import json
import math

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.train import TrainConfig, load_checkpoint, train
from sharpscope.train.trainer import TrainingDiverged, cosine_with_warmup

FAST = dict(dataset="digits", model="mlp", epochs=2, batch_size=64, lr=0.05)


def metrics_without_time(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_writes_the_documented_files(tmp_path):
    result = train(TrainConfig(**FAST, optimizer="sam"), out_dir=tmp_path, progress=False, log=lambda _: None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-epoch000.pt", "ckpt-epoch001.pt", "config.json", "final.pt", "metrics.jsonl"]
    records = metrics_without_time(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]) == {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr"}
    assert records[-1]["test_acc"] > 0.5  # 2 epochs of an MLP on digits: far above chance (0.1)
    ckpt = load_checkpoint(result.final_checkpoint)
    assert ckpt.config["optimizer"] == "sam" and ckpt.epoch == 2 and ckpt.raw["optimizer_state"] is not None
    assert json.loads((tmp_path / "config.json").read_text())["environment"]["torch"] == torch.__version__


def test_same_seed_gives_bit_identical_metrics_and_weights(tmp_path):
    runs = [train(TrainConfig(**FAST, optimizer="sam"), out_dir=tmp_path / str(i), progress=False,
                  log=lambda _: None) for i in range(2)]
    assert metrics_without_time(runs[0].out_dir) == metrics_without_time(runs[1].out_dir)
    a, b = (load_checkpoint(r.final_checkpoint).model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(TrainConfig(**FAST, optimizer="sam", seed=1), out_dir=tmp_path / "s1", progress=False,
                  log=lambda _: None)
    assert metrics_without_time(other.out_dir) != metrics_without_time(runs[0].out_dir)


def test_finished_or_different_runs_are_not_overwritten(tmp_path):
    train(TrainConfig(**FAST), out_dir=tmp_path, progress=False, log=lambda _: None)
    before = (tmp_path / "final.pt").read_bytes()
    with pytest.raises(SharpscopeError, match="already holds final.pt; pass --overwrite"):
        train(TrainConfig(**FAST), out_dir=tmp_path, progress=False, log=lambda _: None)
    assert (tmp_path / "final.pt").read_bytes() == before
    (tmp_path / "final.pt").unlink()
    with pytest.raises(SharpscopeError, match=r"different config \(lr\)"):
        train(TrainConfig(**{**FAST, "lr": 0.01}), out_dir=tmp_path, progress=False, log=lambda _: None)
    train(TrainConfig(**{**FAST, "lr": 0.01}), out_dir=tmp_path, overwrite=True, progress=False, log=lambda _: None)
    assert load_checkpoint(tmp_path / "final.pt").config["lr"] == 0.01


def test_a_run_started_before_a_config_field_existed_still_resumes(tmp_path):
    train(TrainConfig(**FAST), out_dir=tmp_path, progress=False, log=lambda _: None)
    (tmp_path / "final.pt").unlink()  # an unfinished run, as if killed after its last epoch's checkpoint
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["sync_perturbation"]  # written by a version without the field
    config_path.write_text(json.dumps(saved))
    train(TrainConfig(**FAST), out_dir=tmp_path, progress=False, log=lambda _: None)  # the field's default: resumes
    assert (tmp_path / "final.pt").exists()
    (tmp_path / "final.pt").unlink()
    config_path.write_text(json.dumps(saved))
    with pytest.raises(SharpscopeError, match=r"different config \(sync_perturbation\)"):
        train(TrainConfig(**FAST, sync_perturbation=True), out_dir=tmp_path, progress=False, log=lambda _: None)


def test_divergence_stops_with_a_message_naming_the_cause(tmp_path):
    config = TrainConfig(dataset="digits", model="mlp", epochs=2, batch_size=64, lr=1e6, momentum=0.9)
    with pytest.raises(TrainingDiverged, match=r"diverged.*epoch 1 by step \d+ \(lr .*lower --lr"):
        train(config, out_dir=tmp_path, progress=False, log=lambda _: None)
    assert not (tmp_path / "final.pt").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("rho", 0.0, "rho must be > 0"), ("rho", -1.0, "rho must be > 0"), ("lr", 0.0, "lr must be > 0"),
     ("m", 1000, "micro-batch size"), ("p", 0.5, "p must be >= 1"), ("epochs", 0, "epochs must be >= 1"),
     ("optimizer", "adam", "optimizer must be sgd, sam or asam"), ("precision", "fp8", "precision must be")],
)
def test_config_validation(field, value, message):
    with pytest.raises(SharpscopeError, match=message):
        TrainConfig(**{**FAST, field: value})


def test_cosine_with_warmup_shape():
    factor = cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))
    assert math.isclose(cosine_with_warmup(10, 0)(0), 1.0)

"""The trainer end to end on the bundled digits data: files, determinism, resume, divergence, refusals."""

import json
import math
import re

import pytest
import torch

import sharpscope.optim
import sharpscope.train.trainer
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


@pytest.mark.parametrize(("field", "other_value", "settings"),
                         [("sync_perturbation", True, {}), ("rho_schedule", "lr", {"optimizer": "sam"})])
def test_a_run_started_before_a_config_field_existed_still_resumes(tmp_path, field, other_value, settings):
    settings = {**FAST, "epochs": 1, **settings}
    train(TrainConfig(**settings), out_dir=tmp_path, progress=False, log=lambda _: None)
    (tmp_path / "final.pt").unlink()  # an unfinished run, as if killed after its last epoch's checkpoint
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    del saved[field]  # written by a version without the field
    config_path.write_text(json.dumps(saved))
    train(TrainConfig(**settings), out_dir=tmp_path, progress=False, log=lambda _: None)  # its default: resumes
    assert (tmp_path / "final.pt").exists()
    (tmp_path / "final.pt").unlink()
    config_path.write_text(json.dumps(saved))
    with pytest.raises(SharpscopeError, match=rf"different config \({field}\)"):
        train(TrainConfig(**settings, **{field: other_value}), out_dir=tmp_path, progress=False, log=lambda _: None)


def test_divergence_stops_with_a_message_naming_the_cause(tmp_path):
    config = TrainConfig(dataset="digits", model="mlp", epochs=2, batch_size=64, lr=1e6, momentum=0.9)
    with pytest.raises(TrainingDiverged, match=r"diverged.*at step \d+ \(epoch 1; lr .*lower --lr.*"
                                               r"last good checkpoint is .*ckpt-epoch000.pt \(epoch 0, the init"):
        train(config, out_dir=tmp_path, progress=False, log=lambda _: None)
    assert not (tmp_path / "final.pt").exists()
    with pytest.raises(TrainingDiverged, match=r"epoch 1; .*no checkpoint was written before it \(--save-every 0"):
        train(TrainConfig(**{**config.to_dict(), "save_every": 0}), out_dir=tmp_path / "unsaved", progress=False,
              log=lambda _: None)


def test_divergence_in_a_later_epoch_names_the_exact_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The NaN check syncs only every 20 steps, yet the message names the first step whose loss was not finite."""
    losses = []  # every step's loss, read here (a host sync per step is fine in a test)
    real_step = sharpscope.optim.training_step

    def recording_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        losses.append(float(result.loss))
        return result

    monkeypatch.setattr(sharpscope.optim, "training_step", recording_step)
    # lr 1e4 after a 2-epoch warm-up: epoch 1 stays finite, the loss explodes early in epoch 2 (23 steps an epoch)
    config = TrainConfig(dataset="digits", model="mlp", epochs=3, batch_size=64, lr=1e4, warmup_epochs=2)
    with pytest.raises(TrainingDiverged) as raised:
        train(config, out_dir=tmp_path, progress=False, log=lambda _: None)
    first_bad = next(i for i, loss in enumerate(losses, start=1) if not math.isfinite(loss))
    named = re.search(r"at step (\d+) \(epoch (\d+); lr ([^;)]+)\)", str(raised.value))
    assert named, str(raised.value)
    assert int(named[1]) == first_bad, f"message names step {named[1]}, the first non-finite loss was {first_bad}"
    assert int(named[2]) == 2 and first_bad > 23, f"expected a divergence in epoch 2, got step {first_bad}"
    assert len(losses) > first_bad, "detected at once: the test cannot tell the exact step from the check step"
    assert float(named[3]) == pytest.approx(1e4 * first_bad / 46, rel=1e-2)  # the warm-up lr at that step
    good = tmp_path / "ckpt-epoch001.pt"
    assert f"the last good checkpoint is {good} (epoch 1)" in str(raised.value)
    checkpoint = load_checkpoint(good)
    assert checkpoint.epoch == 1
    assert all(torch.isfinite(v).all() for v in checkpoint.model.state_dict().values())
    assert load_checkpoint(tmp_path / "last.pt").epoch == 1 and not (tmp_path / "final.pt").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("rho", 0.0, "rho must be > 0"), ("rho", -1.0, "rho must be > 0"), ("lr", 0.0, "lr must be > 0"),
     ("m", 1000, "micro-batch size"), ("p", 0.5, "p must be >= 1"), ("epochs", 0, "epochs must be >= 1"),
     ("optimizer", "adam", "optimizer must be sgd, sam or asam"), ("precision", "fp8", "precision must be"),
     ("eta", -0.1, "eta must be >= 0"), ("rho_schedule", "cosine", "rho schedule must be constant or lr"),
     ("rho_schedule", "lr", "rho schedule 'lr' needs optimizer sam or asam")],
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


def _crash_in_epoch(monkeypatch, epoch: int) -> None:
    """Make the trainer fail in ``epoch``'s evaluation, after its training steps: the run stops with last.pt from
    the epoch before, as if killed there."""
    real_evaluate, calls = sharpscope.train.trainer.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(None)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sharpscope.train.trainer, "evaluate", evaluate)


def test_fp16_resumes_bit_identically_with_its_grad_scaler_state(tmp_path, monkeypatch):
    config = TrainConfig(dataset="synthetic", model="mlp", optimizer="sam", epochs=3, batch_size=32, lr=0.05,
                         precision="fp16", rho_schedule="lr", warmup_epochs=1)
    straight = train(config, out_dir=tmp_path / "straight", progress=False, log=lambda _: None)
    with monkeypatch.context() as patch:
        _crash_in_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train(config, out_dir=tmp_path / "resumed", progress=False, log=lambda _: None)
    last = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    steps = last["step"]
    assert last["epoch"] == 1 and last["grad_scaler_state"]["_growth_tracker"] == steps
    resumed = train(config, out_dir=tmp_path / "resumed", progress=False, log=lambda _: None)
    assert resumed.resumed_from_epoch == 1
    a, b = (torch.load(r.final_checkpoint, weights_only=True) for r in (straight, resumed))
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    # the loss scale and growth tracker went on from last.pt (a fresh scaler would count from 0 again)
    assert a["grad_scaler_state"] == b["grad_scaler_state"]
    assert b["grad_scaler_state"]["_growth_tracker"] == 3 * steps
    assert metrics_without_time(straight.out_dir) == metrics_without_time(resumed.out_dir)


def test_fp16_where_torch_has_no_fp16_autocast_is_a_one_line_error(tmp_path, monkeypatch):
    def no_scaler(*args, **kwargs):
        raise RuntimeError("GradScaler is not supported on this device\nsecond line")

    monkeypatch.setattr(torch.amp, "GradScaler", no_scaler)
    with pytest.raises(SharpscopeError, match=r"^--precision fp16 needs CUDA: .*use --precision bf16 on the CPU$"):
        train(TrainConfig(**FAST, precision="fp16"), out_dir=tmp_path / "run", progress=False, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_train_result_prints_as_one_line(tmp_path):
    from sharpscope.train.trainer import TrainResult

    result = TrainResult(out_dir=tmp_path, final_checkpoint=tmp_path / "final.pt",
                         checkpoints=[tmp_path / "ckpt-epoch000.pt", tmp_path / "final.pt"],
                         metrics=[{"epoch": 1, "train_loss": 0.5, "test_loss": 0.25, "test_acc": 0.875}],
                         resumed_from_epoch=None)
    assert repr(result) == (f"TrainResult({str(tmp_path)!r}: 1 epochs, 2 checkpoints, train_loss 0.5, test_loss 0.25, "
                            "test_acc 0.875)")

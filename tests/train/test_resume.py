"""Resume at any moment (issue 18): ``last.pt`` is rewritten in the middle of epochs, and a run stopped at any
step resumes from it to the weights and metrics of an uninterrupted run, bit for bit (CPU, one thread).

Runs are stopped in-process here (an exception raised from the k-th training step, k drawn with a fixed seed);
tests/test_reliability.py SIGKILLs a real ``sharpscope train`` process.
"""

import json
import random
from pathlib import Path

import pytest
import torch

import sharpscope.optim
from sharpscope.errors import SharpscopeError
from sharpscope.train import TrainConfig, load_checkpoint, train
from sharpscope.train.config import ResumeEvery

QUIET = dict(progress=False, log=lambda _: None)
FACTORIES = "tests_factory_module"


@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def metrics_without_time(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


class Stop(Exception):
    """Raised from inside a training step: the run ends there, as if killed."""


def stop_at_step(monkeypatch, stop: int) -> None:
    """Make training step ``stop`` (1-based, counted from this call) raise :class:`Stop` before it runs."""
    real, calls = sharpscope.optim.training_step, []

    def step(*args, **kwargs):
        calls.append(None)
        if len(calls) == stop:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(sharpscope.optim, "training_step", step)


def assert_same_run(a: Path, b: Path) -> None:
    x, y = (torch.load(p / "final.pt", weights_only=True) for p in (a, b))
    differing = [k for k in x["model_state"] if not torch.equal(x["model_state"][k], y["model_state"][k])]
    assert differing == [], f"weights differ after the resume: {differing}"
    assert x["optimizer_state"]["state"].keys() == y["optimizer_state"]["state"].keys()
    for key, state in x["optimizer_state"]["state"].items():
        for name, value in state.items():
            other = y["optimizer_state"]["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (key, name)
    assert metrics_without_time(a) == metrics_without_time(b)


# (config, steps between resume points): dropout (global RNG), augmentation (the loader's plan), m-sharpness with
# sam_every, label smoothing, warm-up; 400 / 64 -> 7 steps an epoch, 3 epochs
CASES = {
    "sam-dropout-augment": (dict(model=f"{FACTORIES}:make_dropout_mlp", optimizer="sam", m=16, sam_every=2,
                                 label_smoothing=0.1, warmup_epochs=1), "3steps"),
    "sgd-momentum": (dict(model="mlp", optimizer="sgd"), "2steps"),
    "asam-adamw": (dict(model=f"{FACTORIES}:make_mlp", model_kwargs={"hidden": 12}, optimizer="asam", rho=0.5,
                        base_optimizer="adamw", lr=1e-2, rho_schedule="lr"), "4steps"),
}


def config_of(case: str) -> TrainConfig:
    settings, _ = CASES[case]
    base = dict(dataset=f"{FACTORIES}:small_digits:train=400,augment=crop-flip", epochs=3, batch_size=64, lr=0.05)
    return TrainConfig(**{**base, **settings})


@pytest.mark.parametrize("case", list(CASES))
def test_stopped_at_a_random_step_resumes_bit_identically(tmp_path, monkeypatch, case):
    config, every = config_of(case), CASES[case][1]
    straight = train(config, out_dir=tmp_path / "straight", **QUIET)
    total = straight.metrics[-1]["step"]
    assert total == 21
    rng = random.Random(f"resume-{case}")  # a fixed draw per case: reproducible, yet not a chosen boundary
    stops = sorted(rng.sample(range(2, total), 2))
    out = tmp_path / "stopped"
    every_steps = ResumeEvery.parse(every).steps
    done = 0
    for stop in stops:  # stopped twice, resumed twice
        with monkeypatch.context() as patch:
            stop_at_step(patch, stop - done)
            with pytest.raises(Stop):
                train(config, out_dir=out, resume_every=every, **QUIET)
        saved = (stop - 1) // every_steps * every_steps  # the newest multiple of `every` before the stop...
        saved = max(saved, (stop - 1) // 7 * 7, done)  # ... or the newest epoch end, or the point resumed from
        if saved == 0:
            assert not (out / "last.pt").exists()  # nothing to resume: the next call starts afresh
            continue
        last = torch.load(out / "last.pt", weights_only=True)
        assert last["step"] == saved, f"stopped before step {stop}: expected a resume point at {saved}"
        assert stop - 1 - last["step"] < every_steps  # lost at most the work since the last save
        if saved % 7:
            position = last["position"]
            assert (position["epoch"], position["batch"]) == (saved // 7 + 1, saved % 7)
            assert last["epoch"] == saved // 7 and position["seen"] == 64 * (saved % 7)
        else:
            assert "position" not in last
        done = saved
    resumed = train(config, out_dir=out, resume_every=every, **QUIET)
    assert resumed.resumed_from_step == (done or None)
    assert_same_run(straight.out_dir, out)
    assert not (out / "last.pt").exists()


def test_a_resume_point_after_every_step_by_time(tmp_path, monkeypatch):
    """A time interval shorter than a step writes a resume point after every step; resuming still matches."""
    config = config_of("sgd-momentum")
    straight = train(config, out_dir=tmp_path / "straight", **QUIET)
    with monkeypatch.context() as patch:
        stop_at_step(patch, 11)
        with pytest.raises(Stop):
            train(config, out_dir=tmp_path / "stopped", resume_every=ResumeEvery(seconds=1e-9), **QUIET)
    last = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert last["step"] == 10 and last["position"]["batch"] == 3 and last["epoch"] == 1
    train(config, out_dir=tmp_path / "stopped", resume_every="epoch", **QUIET)  # another interval: same run
    assert_same_run(straight.out_dir, tmp_path / "stopped")


def test_epoch_writes_resume_points_at_epoch_ends_only(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        stop_at_step(patch, 13)
        with pytest.raises(Stop):
            train(config_of("sgd-momentum"), out_dir=tmp_path, resume_every="epoch", **QUIET)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 7 and "position" not in last
    assert json.loads((tmp_path / "config.json").read_text())["environment"]["resume_every"] == "epoch"


def test_a_resume_point_that_does_not_fit_the_run_is_refused(tmp_path, monkeypatch):
    config = config_of("sgd-momentum")
    with monkeypatch.context() as patch:
        stop_at_step(patch, 5)
        with pytest.raises(Stop):
            train(config, out_dir=tmp_path, resume_every="2steps", **QUIET)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    payload["position"]["steps_per_epoch"] = 9  # written by a run with other batches per epoch
    torch.save(payload, tmp_path / "last.pt")  # the test's own damaged file
    with pytest.raises(SharpscopeError, match=r"last\.pt is a mid-epoch resume point \(epoch 1, batch 4, step 4\) "
                                              r"that does not fit this run's 7 batches per epoch; pass --overwrite"):
        train(config, out_dir=tmp_path, **QUIET)
    payload["position"].update(steps_per_epoch=7, world_size=2)
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(SharpscopeError, match=r"written mid-epoch by a run of 2 process\(es\), this one has 1"):
        train(config, out_dir=tmp_path, **QUIET)


def test_divergence_names_a_mid_epoch_resume_point_as_the_last_good_checkpoint(tmp_path):
    """lr 3e3 after a 2-epoch warm-up: the loss explodes in epoch 2; resume points every step before it."""
    config = TrainConfig(dataset="digits", model="mlp", epochs=3, batch_size=64, lr=3e3, warmup_epochs=2)
    from sharpscope.train.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged) as raised:
        train(config, out_dir=tmp_path, resume_every="1steps", **QUIET)
    bad = int(str(raised.value).split("at step ")[1].split(" ")[0])
    assert bad > 24, raised.value  # in epoch 2 (23 steps an epoch), past its first batch
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (step {bad - 1}, in epoch 2)" in str(raised.value)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.step == bad - 1 and all(torch.isfinite(v).all() for v in last.model.state_dict().values())


@pytest.mark.parametrize(("text", "seconds", "steps", "shown"),
                         [("3min", 180.0, None, "3min"), ("90s", 90.0, None, "90s"), ("1.5h", 5400.0, None, "90min"),
                          ("500steps", None, 500, "500steps"), ("1step", None, 1, "1steps"),
                          ("epoch", None, None, "epoch"), (" 2 MIN ", 120.0, None, "2min")])
def test_resume_every_parses_times_steps_and_epoch(text, seconds, steps, shown):
    every = ResumeEvery.parse(text)
    assert (every.seconds, every.steps, str(every)) == (seconds, steps, shown)
    assert ResumeEvery.parse(str(every)) == every


@pytest.mark.parametrize("text", ["3", "fast", "0min", "-5s", "1.5steps", "nanmin", "infs", ""])
def test_resume_every_refuses_what_it_cannot_read(text):
    with pytest.raises(SharpscopeError, match="expected a time like 3min, 90s or 1.5h, a step count like 500steps"):
        ResumeEvery.parse(text)


def test_resume_every_due():
    assert ResumeEvery(seconds=None, steps=5).due(10, 0.0) and not ResumeEvery(seconds=None, steps=5).due(11, 1e9)
    assert ResumeEvery(seconds=60.0).due(1, 60.0) and not ResumeEvery(seconds=60.0).due(1, 59.9)
    assert not ResumeEvery(seconds=None, steps=None).due(10, 1e9)
    with pytest.raises(SharpscopeError, match="step count must be an integer >= 1"):
        ResumeEvery(seconds=None, steps=0)

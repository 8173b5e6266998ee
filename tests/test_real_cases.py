"""Bring your own model, end to end: ``sharpscope.train.fit`` and four real cases (examples/byom) trained with SAM
through ``sharpscope train``, then analysed (Hessian against the dense truth, loss surface, sharpness).

Cases (examples/byom): a causal transformer LM on character tokens of textwrap.py (dict batch, BatchLoss), MSE
regression on sklearn's diabetes data (``--loss torch.nn:MSELoss``), a ``model(**inputs)`` classifier on digits,
and a Hugging Face GPT-2 from a tiny config (skipped without ``transformers``). All tiny: 1 epoch, < 1,500
parameters, so the dense float64 Hessian is the truth the Lanczos top eigenvalue is checked against.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sharpscope.cli.main import cli
from sharpscope.errors import SharpscopeError, UsageError
from sharpscope.specs import load_loss
from sharpscope.train import BatchData, TrainConfig, fit, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # examples/ is importable from the repository root, as in the README's commands
    sys.path.insert(0, str(ROOT))

# (name, model spec, dataset spec, loss spec or None, needs, parameters of the dense-Hessian check (name prefixes;
# None: all), lr: GPT-2's 0.02-std initialisation needs a larger step to move in 4 steps). The transformers are checked on the diagonal block of their first attention layer (LayerNorm, q/k/v,
# output projection): the dense truth costs one pass per column, and those are the layers whose second
# derivatives torch 2.13 gets wrong under vmap.
CASES = [
    ("lm", "examples.byom.language_model:make_model:width=4", "examples.byom.language_model:textwrap_chars",
     "examples.byom.language_model:next_token_loss", None, ("blocks.0.norm1", "blocks.0.qkv", "blocks.0.proj"), 0.05),
    ("diabetes", "examples.byom.regression:make_model", "examples.byom.regression:diabetes", "torch.nn:MSELoss", None,
     None, 0.05),
    ("dict", "examples.byom.dict_input:make_model:hidden=8", "examples.byom.dict_input:digits_dict", None, None, None, 0.05),
    ("hf-gpt2", "examples.byom.hf_gpt2:make_model:width=4", "examples.byom.hf_gpt2:textwrap_chars",
     "examples.byom.hf_gpt2:model_loss", "transformers", ("transformer.h.0.ln_1", "transformer.h.0.attn"), 0.5),
]


def invoke(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def trained(request, tmp_path_factory):
    """``sharpscope train`` with SAM for 1 epoch on the case; returns (case, run folder)."""
    name, model, dataset, loss, needs, _, lr = request.param
    if needs:
        pytest.importorskip(needs)
    out = tmp_path_factory.mktemp(name) / "run"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the current folder is importable for --model/--dataset/--loss, as for a user
    try:
        result = invoke("train", "--model", model, "--dataset", dataset, *(["--loss", loss] if loss else []),
                        "--optimizer", "sam", "--rho", 0.05, "--lr", lr, "--epochs", 1, "--device", "cpu",
                        "--out", out)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return request.param, out


def _data_and_loss(checkpoint):
    """The evaluation batches and loss of a run, rebuilt from what its checkpoint recorded."""
    from sharpscope.specs import call_factory, parse_spec

    data = call_factory(*parse_spec(checkpoint.dataset, what="dataset"), what="dataset")
    spec = checkpoint.config.get("loss")
    return data.test, (load_loss(spec) if spec else torch.nn.CrossEntropyLoss())


def test_train_writes_a_run_folder_that_records_model_data_and_loss(trained):
    (name, model, dataset, loss, *_), out = trained
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-epoch000.pt", "config.json", "final.pt", "metrics.jsonl"]
    config = json.loads((out / "config.json").read_text())
    from sharpscope.specs import parse_spec

    recorded = (config["model"], config["model_kwargs"], config["dataset"], config["loss"], config["optimizer"])
    assert recorded == (*parse_spec(model), dataset, loss, "sam")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and torch.isfinite(torch.tensor(metrics[0]["test_loss"]))
    # accuracy only where it means something: the classifier's
    assert (metrics[0]["test_acc"] is not None) == (name == "dict"), metrics[0]
    checkpoint = load_checkpoint(out / "final.pt")
    assert checkpoint.config["loss"] == loss and checkpoint.dataset == dataset


def test_training_lowered_the_loss(trained):
    """One SAM epoch must do something: the test loss at final.pt is below the initialisation's (ckpt 0)."""
    _, out = trained
    losses = []
    for path in (out / "ckpt-epoch000.pt", out / "final.pt"):
        checkpoint = load_checkpoint(path)
        batches, loss_fn = _data_and_loss(checkpoint)
        from sharpscope.train.trainer import evaluate

        losses.append(evaluate(checkpoint.model, batches, loss_fn=loss_fn)[0])
    assert losses[1] < losses[0], losses


def test_hessian_top_eigenvalue_matches_the_dense_truth(trained):
    """Lanczos on the matrix-free Hessian of the recorded loss vs eigvalsh of the dense float64 Hessian.

    float64 end to end: both sides differ by Lanczos' residual tolerance only (tol 1e-8 relative), so 1e-6
    relative leaves room for rounding while catching any wrong product (which would be off by O(1)).
    """
    from sharpscope.batches import to_device
    from sharpscope.hessian import HessianOperator, lanczos_eigs
    from sharpscope.hessian.reference import dense_hessian

    (*_, prefixes, _), out = trained
    checkpoint = load_checkpoint(out / "final.pt")
    batches, loss_fn = _data_and_loss(checkpoint)
    model = checkpoint.model.double()
    batches = [to_device(b, "cpu", dtype=torch.float64) for b in batches[:1]]
    params = None if prefixes is None else [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
    top = lanczos_eigs(HessianOperator(model, loss_fn, batches, params=params), k=2, which="top", tol=1e-8)
    exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches, params=params)).flip(0)[:2]
    assert bool(torch.as_tensor(top.converged).all()), top
    assert torch.allclose(top.eigenvalues.double(), exact, rtol=1e-6, atol=1e-9), (top.eigenvalues, exact)


def test_loss_surface_and_sharpness_run_on_the_case(trained):
    """A 1-D surface whose centre is the loss at the weights and which varies along the direction; worst-case
    sharpness (5-step ascent) positive and above the average-case one at the same rho."""
    from sharpscope.landscape import grid, loss_surface, random_directions
    from sharpscope.sharpness import average_case_sharpness, worst_case_sharpness
    from sharpscope.train.trainer import evaluate

    _, out = trained
    checkpoint = load_checkpoint(out / "final.pt")
    batches, loss_fn = _data_and_loss(checkpoint)
    model = checkpoint.model
    surface = loss_surface(model, loss_fn, batches, directions=random_directions(model, dim=1, seed=0),
                           coords=grid(-1, 1, 5))
    centre = float(surface.loss[2])
    assert centre == pytest.approx(evaluate(model, batches, loss_fn=loss_fn)[0], rel=1e-5)
    assert torch.isfinite(torch.as_tensor(surface.loss)).all() and surface.loss.max() > surface.loss.min()
    worst = worst_case_sharpness(model, loss_fn, batches, rho=0.05, m=8, steps=3)
    average = average_case_sharpness(model, loss_fn, batches, rho=0.05, m=8, seed=0)
    assert worst.value > 0 and worst.value > average.value, (worst.value, average.value)


def test_analysis_commands_run_on_the_case(trained, tmp_path):
    """The three analysis commands on the run, from its checkpoint alone (model, data and loss recorded): each
    measures the recorded loss (the loss at the weights it reports is the recorded loss's mean over the first 1024
    train samples, re-batched to 500), and the gap is an error rate for the classifier, a loss difference else."""
    from sharpscope.inputs import mean_loss, take_samples
    from sharpscope.specs import call_factory, parse_spec

    (name, *_, loss, _, _, _), out = trained
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for args in (["hessian-spectrum", out / "final.pt", "--top-k", 1],
                     ["landscape", out / "final.pt", "--dim", 1, "--x", "-1:1:5"],
                     ["sharpness", out / "final.pt", "--m", 8, "--rho", 0.05]):
            result = CliRunner().invoke(cli, ["-q", *map(str, args), "--device", "cpu", "--out",
                                              tmp_path / args[0]])
            if isinstance(result.exception, SharpscopeError):
                raise result.exception
            assert result.exit_code == 0, result.output
        checkpoint = load_checkpoint(out / "final.pt")
        data = call_factory(*parse_spec(checkpoint.dataset, what="dataset"), what="dataset")
    finally:
        os.chdir(cwd)
    loss_fn = load_loss(loss) if loss else torch.nn.CrossEntropyLoss()
    expected = mean_loss(checkpoint.model, loss_fn, take_samples(data.train, 1024, batch_size=500))[0]
    spectrum = json.loads((tmp_path / "hessian-spectrum" / "spectrum.json").read_text())
    surface = json.loads((tmp_path / "landscape" / "surface.json").read_text())
    sharpness = json.loads((tmp_path / "sharpness" / "sharpness.json").read_text())
    # float32 forward passes, batch sums in another order: 1e-5 relative
    assert spectrum["checkpoints"][0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert surface["center_loss"] == pytest.approx(expected, rel=1e-5)
    # the loss is named in the results only where it is not the default cross-entropy (classification runs' results
    # are unchanged)
    assert spectrum["config"].get("loss") == loss and surface["config"].get("loss") == loss
    assert sharpness["config"]["eval"].get("loss") == loss
    record = sharpness["checkpoints"][0]
    if name == "dict":  # the classifier: error rates, an accuracy surface
        assert 0 <= record["train_error"] <= 1 and "gap_units" not in record
        assert record["generalization_gap"] == pytest.approx(record["test_error"] - record["train_error"])
        assert any(a is not None for a in surface["accuracy"])
    else:
        assert record["train_error"] is None and record["gap_units"] == "loss"
        assert record["train_loss"] == pytest.approx(expected, rel=1e-5)
        assert record["generalization_gap"] == pytest.approx(record["test_loss"] - record["train_loss"])
        assert all(a is None for a in surface["accuracy"])


# ---------------------------------------------------------------------------------------------------- fit()


def _digits_mlp():
    from sharpscope.data import eval_batches, load_dataset
    from sharpscope.models import create_model

    data = load_dataset("digits")
    train = list(eval_batches(data, split="train", num_samples=256, batch_size=64))
    test = list(eval_batches(data, split="test", num_samples=128, batch_size=64))
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden=16)
    return model, train, test


def test_fit_writes_a_run_that_sharpscope_hessian_spectrum_analyses(tmp_path):
    """fit() on a registry MLP with the model spec recorded: the CLI analyses final.pt with no --model."""
    model, train, test = _digits_mlp()
    config = TrainConfig(optimizer="sam", lr=0.05, epochs=2, m=32)
    result = fit(model, train, test, config, tmp_path / "run", progress=False, log=lambda _: None,
                 model_spec="mlp:in_channels=1,num_classes=10,image_size=8,hidden=16", dataset="digits")
    assert [m["epoch"] for m in result.metrics] == [1, 2] and result.metrics[-1]["train_acc"] is not None
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "config.json", "metrics.jsonl", "ckpt-epoch000.pt", "ckpt-epoch001.pt", "final.pt"}
    spectrum = invoke("hessian-spectrum", tmp_path / "run" / "final.pt", "--top-k", 1, "--num-samples", 128,
                      "--device", "cpu", "--out", tmp_path / "spectrum")
    assert spectrum.exit_code == 0, spectrum.output
    saved = json.loads(next((tmp_path / "spectrum").glob("*.json")).read_text())
    assert "final" in json.dumps(saved)


def test_fit_resumes_an_interrupted_run_bit_identically(tmp_path, monkeypatch):
    """Interrupted in epoch 2's evaluation (after epoch 1's last.pt), the same call resumes and ends with the
    weights and metrics of an uninterrupted run (seconds apart): the trainer's resume, through fit()."""
    import sharpscope.train.trainer as trainer

    from examples.byom import regression

    def run(out):
        torch.manual_seed(0)
        data = regression.diabetes(train_samples=96, batch_size=32)
        return fit(regression.make_model(), data.train, data.test, TrainConfig(optimizer="sam", lr=0.05, epochs=3),
                   out, loss_fn="torch.nn:MSELoss", model_spec="examples.byom.regression:make_model",
                   progress=False, log=lambda _: None)

    straight = run(tmp_path / "straight")
    real, calls = trainer.evaluate, []

    def failing_evaluate(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", failing_evaluate)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "last.pt").exists() and not (tmp_path / "resumed" / "final.pt").exists()
    monkeypatch.setattr(trainer, "evaluate", real)
    resumed = run(tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 1
    drop = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert drop(resumed.metrics) == drop(straight.metrics)
    a, b = (load_checkpoint(r.final_checkpoint).model.state_dict() for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_refuses_a_model_spec_that_builds_another_model(tmp_path):
    model, train, test = _digits_mlp()
    with pytest.raises(SharpscopeError, match="builds a different model"):
        fit(model, train, test, TrainConfig(epochs=1), tmp_path, model_spec="mlp:in_channels=1,num_classes=10,"
            "image_size=8,hidden=32", progress=False)


def test_fit_refuses_empty_or_unsized_batches(tmp_path):
    model, train, test = _digits_mlp()
    with pytest.raises(SharpscopeError, match="BatchData.train holds no batches"):
        fit(model, [], test, TrainConfig(epochs=1), tmp_path, progress=False)
    with pytest.raises(SharpscopeError, match="BatchData.test must be a list"):
        fit(model, train, (b for b in test), TrainConfig(epochs=1), tmp_path, progress=False)


@pytest.mark.parametrize("spec, message", [
    ("mse", "expected package.module:factory"),
    ("nosuchmodule_x:loss", "cannot import"),
    ("torch.nn:NoSuchLoss", "has no callable"),
    ("math:pi", "has no callable"),
    ("torch.nn:MSELoss:reduction=1,bogus=2", "rejected its arguments"),
])
def test_load_loss_refuses_bad_specs_in_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        load_loss(spec)


def test_cli_train_refuses_a_bad_loss_and_train_samples_with_batch_data(tmp_path):
    bad = CliRunner().invoke(cli, ["train", "--loss", "mse", "--out", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "--loss" in bad.output
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cut = CliRunner().invoke(cli, ["-q", "train", "--model", "examples.byom.regression:make_model", "--dataset",
                                       "examples.byom.regression:diabetes", "--loss", "torch.nn:MSELoss",
                                       "--train-samples", "10", "--epochs", "1", "--out", str(tmp_path / "b")])
    finally:
        os.chdir(cwd)
    assert cut.exit_code != 0 and "drop --train-samples" in cut.output, cut.output


def test_batch_data_validates_its_fields():
    with pytest.raises(SharpscopeError, match="BatchData.train must be a list"):
        BatchData(train=42, test=[1])


def test_a_fit_run_without_specs_says_what_analyses_need(tmp_path):
    """No model_spec and a loss object: the checkpoint names factories that refuse with what to pass."""
    from sharpscope.train.checkpoint import load_checkpoint as load

    model, train, test = _digits_mlp()
    fit(model, train, test, TrainConfig(epochs=1, save_every=0), tmp_path, loss_fn=torch.nn.CrossEntropyLoss(),
        progress=False, log=lambda _: None)
    with pytest.raises(SharpscopeError, match="without model_spec.*pass --model"):
        load(tmp_path / "final.pt")
    checkpoint = load(tmp_path / "final.pt", model_spec="mlp:in_channels=1,num_classes=10,image_size=8,hidden=16")
    with pytest.raises(SharpscopeError, match="loss given as a Python object"):
        load_loss(checkpoint.config["loss"])


@pytest.mark.parametrize("m", [None, 16])
def test_any_batch_structure_trains_exactly_like_images_and_labels(tmp_path, m):
    """The step adapter (dict inputs, or a BatchLoss) against the direct (images, labels) step on the same samples:
    the same SAM / m-SAM training in float64, so the final weights agree to rounding (1e-10; the m-SAM micro-batches
    run batched under vmap on both paths, the adapter's through index_select)."""
    from sharpscope.batches import BatchLoss

    model, train, test = _digits_mlp()
    model = model.double()
    train = [(x.double(), y) for x, y in train]
    test = [(x.double(), y) for x, y in test]

    class KeywordModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images)

    ce = torch.nn.CrossEntropyLoss()
    variants = {
        "direct": (model, train, test, None),
        "dict": (KeywordModel(model), [({"images": x}, y) for x, y in train], [({"images": x}, y) for x, y in test],
                 None),
        "batch-loss": (model, train, test, BatchLoss(lambda net, batch: ce(net(batch[0]), batch[1]))),
    }
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    finals, metrics = {}, {}
    for name, (net, train_b, test_b, loss) in variants.items():
        model.load_state_dict(initial)
        result = fit(net, train_b, test_b, TrainConfig(optimizer="sam", lr=0.05, epochs=2, m=m, batch_size=64),
                     tmp_path / name, loss_fn=loss, progress=False, log=lambda _: None)
        finals[name] = {k: v.clone() for k, v in model.state_dict().items()}
        metrics[name] = result.metrics[-1]
    for name in ("dict", "batch-loss"):
        worst = max(float((finals[name][k] - finals["direct"][k]).abs().max()) for k in initial)
        assert worst < 1e-10, (name, worst)
        assert metrics[name]["train_loss"] == pytest.approx(metrics["direct"]["train_loss"], rel=1e-10)
        # the direct evaluation takes the cross-entropy of float32 logits (logits.float(), for bf16 autocast): 1e-6
        assert metrics[name]["test_loss"] == pytest.approx(metrics["direct"]["test_loss"], rel=1e-6)
    assert metrics["direct"]["train_acc"] is not None and metrics["dict"]["test_acc"] == metrics["direct"]["test_acc"]
    assert metrics["batch-loss"]["test_acc"] is None  # a BatchLoss does not show the outputs

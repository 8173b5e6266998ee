"""The checkpoint format: self-describing, safe to load, and every way of being wrong gets one clear line."""

import pickle
from pathlib import Path

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.models import create_model
from sharpscope.train.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint_file, save_checkpoint

SHAPE = {"in_channels": 1, "num_classes": 10, "image_size": 8}


@pytest.fixture
def mlp_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", **SHAPE)
    path = save_checkpoint(tmp_path / "final.pt", model=model, model_name="mlp", model_kwargs=SHAPE,
                           dataset="digits", config={"lr": 0.1}, epoch=3, step=30,
                           metrics={"train_acc": 0.9, "test_acc": 0.8})
    return path, model


def test_load_rebuilds_the_model_with_no_other_input(mlp_checkpoint):
    path, model = mlp_checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == "mlp" and ckpt.dataset == "digits" and ckpt.epoch == 3 and ckpt.step == 30
    assert not ckpt.model.training
    assert ckpt.generalization_gap == pytest.approx(0.1)
    for (name, a), (_, b) in zip(model.state_dict().items(), ckpt.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert len(ckpt.sha256) == 64


def test_foreign_state_dict_needs_and_accepts_a_model_spec(tmp_path):
    model = create_model("convnet", **SHAPE)
    path = tmp_path / "theirs.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(SharpscopeError, match="plain state_dict.*--model NAME"):
        load_checkpoint(path)
    with pytest.raises(SharpscopeError, match="needs in_channels, num_classes, image_size"):
        load_checkpoint(path, model_spec="convnet")
    ckpt = load_checkpoint(path, model_spec="convnet", dataset="digits")
    assert ckpt.model_name == "convnet" and ckpt.dataset == "digits"
    ckpt = load_checkpoint(path, model_spec="convnet:in_channels=1,num_classes=10,image_size=8")
    assert torch.equal(next(iter(ckpt.model.state_dict().values())), next(iter(model.state_dict().values())))


def test_factory_spec_builds_a_users_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    path = tmp_path / "linear.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(path, model_spec="tests_factory_module:make_linear", dataset="digits")
    assert isinstance(ckpt.model, torch.nn.Sequential)
    with pytest.raises(SharpscopeError, match="cannot import"):
        load_checkpoint(path, model_spec="no_such_package.nets:make")


def test_another_architecture_is_refused_in_one_line(mlp_checkpoint):
    path, _ = mlp_checkpoint
    with pytest.raises(SharpscopeError, match="does not fit model 'convnet'.*another architecture") as info:
        load_checkpoint(path, model_spec="convnet", dataset="digits")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cut", [0, 10, 200, -50])
def test_truncated_files_are_refused(mlp_checkpoint, tmp_path, cut):
    path, _ = mlp_checkpoint
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(SharpscopeError, match="empty|truncated or corrupted|corrupted") as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value)


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run code",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"model_state": Payload()}, f)
    with pytest.raises(SharpscopeError, match="refuses to load it because unpickling can run code"):
        load_checkpoint(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(SharpscopeError, match="corrupted|not a PyTorch|truncated|pickled"):
        load_checkpoint(raw)


def test_newer_format_version_and_missing_files(mlp_checkpoint, tmp_path):
    path, _ = mlp_checkpoint
    payload, _ = read_checkpoint_file(path)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(SharpscopeError, match="newer than this sharpscope"):
        load_checkpoint(newer)
    with pytest.raises(SharpscopeError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(SharpscopeError, match="is a folder"):
        load_checkpoint(tmp_path)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(SharpscopeError, match="neither a sharpscope checkpoint nor a state_dict"):
        load_checkpoint(not_state, model_spec="mlp", dataset="digits")


@pytest.mark.parametrize("content, kind", [(b'{"optimizer": "sgd"}\n', "a JSON file"), (b"epoch,loss\n1,0.5\n", "a text file"),
                                           (bytes(range(256)) * 4, "corrupted or not a PyTorch file")])
def test_non_checkpoints_are_named_without_torch_advice(tmp_path, content, kind):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(SharpscopeError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert kind in message and "\n" not in message, message
    assert "weights_only" not in message, f"torch's advice to load with weights_only=False leaked: {message}"


def test_a_foreign_state_dict_takes_its_input_shape_from_a_dataset_factory(tmp_path, monkeypatch):
    """``--model mlp --dataset package.module:factory``: the registry model's shape comes from the user's data."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    model = create_model("mlp", **SHAPE)
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    ckpt = load_checkpoint(tmp_path / "mlp.pt", model_spec="mlp", dataset="tests_factory_module:small_digits:train=50")
    assert ckpt.model_kwargs == SHAPE and ckpt.dataset == "tests_factory_module:small_digits:train=50"
    from sharpscope.data import dataset_info, load_dataset

    assert dataset_info("tests_factory_module:small_digits").num_classes == 10
    assert len(load_dataset("tests_factory_module:small_digits:train=50").train_labels) == 50

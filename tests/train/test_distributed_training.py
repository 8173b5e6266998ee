"""DDP training with 2 CPU ranks (gloo) equals the single-process reference with per-rank micro-batches
(or, with ``--sync-perturbation``, plain SAM on the global batch).

Under torchrun each rank perturbs with its own gradient (the clean pass skips DDP's all-reduce) and DDP averages
the SAM gradients: that is m-sharpness SAM with m = the per-rank batch (or ``--micro-batch-size`` within it), which
the reference below computes in one process from the very same per-rank batches. The MLP has no BatchNorm, whose
running statistics DDP takes from rank 0 only (broadcast_buffers), so weights must agree up to float32 reduction
order (atol 1e-6). A run interrupted under torchrun resumes to the same weights, bit for bit.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from sharpscope.data import DeviceLoader, load_dataset
from sharpscope.models import create_model
from sharpscope.optim import create_optimizer, training_step
from sharpscope.train.trainer import cosine_with_warmup

PER_RANK_BATCH = 32


def torchrun(args: list[str], *, ranks: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=RANKS ARGS`` (no ``--`` before the script's options, as a
    user types it); asserts exit 0 and returns the finished process (stdout and stderr as text)."""
    # --standalone: torchrun picks a free port itself (a port found free here could be taken before it binds)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def reference_weights(epochs: int, *, sync_perturbation: bool = False, micro_batch_size: int | None = None,
                      dataset: str = "digits") -> dict[str, torch.Tensor]:
    """Single-process SAM on both ranks' batches: one perturbation per rank's batch (m = per-rank batch), or per
    ``micro_batch_size`` samples of each rank's batch, or with ``sync_perturbation`` one for the concatenated batch
    (plain SAM on the global batch)."""
    data = load_dataset(dataset)
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=data.in_channels, num_classes=data.num_classes,
                         image_size=data.image_size)
    optimizer = create_optimizer(model.parameters(), name="sam", base="sgd", lr=0.05, momentum=0.9,
                                 weight_decay=1e-4, rho=0.05)
    loaders = [DeviceLoader(data.train_images, data.train_labels, batch_size=PER_RANK_BATCH, mean=data.mean,
                            std=data.std, shuffle=True, seed=0, num_replicas=2, rank=r) for r in range(2)]
    steps = len(loaders[0]) * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, 0))
    model.train()
    for epoch in range(1, epochs + 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        for (x0, y0), (x1, y1) in zip(*loaders, strict=True):
            assert len(x0) == len(x1)
            m = None if sync_perturbation else micro_batch_size or len(x0)
            # micro-batches of the concatenated batch are micro-batches of one rank's batch only if m divides it
            assert m is None or len(x0) % m == 0, f"choose a micro-batch size that divides {len(x0)}"
            training_step(model, optimizer, nn.CrossEntropyLoss(), torch.cat([x0, x1]), torch.cat([y0, y1]),
                          micro_batch_size=m)
            scheduler.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("sync_perturbation", [False, True])
def test_ddp_sam_equals_single_process_reference(tmp_path, sync_perturbation):
    epochs = 2
    torchrun(["-m", "sharpscope", "-q", "train", "--dataset", "digits", "--model", "mlp", "--optimizer", "sam",
              "--lr", "0.05", "--batch-size", PER_RANK_BATCH, "--epochs", epochs, "--device", "cpu",
              "--out", tmp_path / "ddp", *(["--sync-perturbation"] if sync_perturbation else [])])
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)["model_state"]
    reference = reference_weights(epochs, sync_perturbation=sync_perturbation)
    other = reference_weights(epochs, sync_perturbation=not sync_perturbation)
    for name, value in reference.items():
        diff = (ddp[name] - value).abs().max().item()
        assert diff < 1e-6, f"{name}: max |ddp - reference| = {diff:.3g}"
    # the two settings really differ: the test could tell them apart
    assert max((ddp[n] - other[n]).abs().max().item() for n in other) > 1e-4
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["environment"]["world_size"] == 2 and config["sync_perturbation"] == sync_perturbation
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == epochs


@pytest.mark.slow
def test_ddp_sam_with_micro_batches_in_each_rank_equals_the_single_process_reference(tmp_path):
    """m-sharpness inside each rank (--micro-batch-size 8 of a per-rank batch of 32): each rank's micro-batch gets
    its own perturbation, as in the one-process reference over the same micro-batches. Synthetic data: 128 samples
    per rank, so every per-rank batch splits into whole micro-batches. Rank 0 alone prints the result lines."""
    epochs, m = 3, 8
    result = torchrun(["-m", "sharpscope", "-q", "train", "--dataset", "synthetic", "--model", "mlp",
                       "--optimizer", "sam", "--lr", "0.05", "--batch-size", PER_RANK_BATCH,
                       "--micro-batch-size", m, "--epochs", epochs, "--device", "cpu", "--out", tmp_path / "ddp"])
    assert result.stdout.count("test accuracy") == 1 and result.stdout.count("wrote ") == 1, result.stdout
    ddp = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)["model_state"]
    reference = reference_weights(epochs, micro_batch_size=m, dataset="synthetic")
    for name, value in reference.items():
        diff = (ddp[name] - value).abs().max().item()
        assert diff < 1e-6, f"{name}: max |ddp - reference| = {diff:.3g}"
    other = reference_weights(epochs, dataset="synthetic")  # one perturbation per rank's batch: must differ
    assert max((ddp[n] - other[n]).abs().max().item() for n in other) > 1e-4
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["m"] == m


# Under torchrun: an uninterrupted run, then the same run failing in epoch 3's evaluation on both ranks (after
# last.pt of epoch 2 was written), then the same call again, which resumes from last.pt.
_INTERRUPTED_AND_RESUMED = textwrap.dedent("""
    import atexit
    import sys
    import torch
    import sharpscope.train.trainer as trainer
    from sharpscope.train import TrainConfig, train

    out = sys.argv[1]
    config = TrainConfig(dataset="synthetic", model="mlp", optimizer="sam", epochs=4, batch_size=32, lr=0.05,
                         m=16, warmup_epochs=1)
    quiet = dict(progress=False, log=lambda _: None)
    train(config, out_dir=out + "/straight", **quiet)
    real_evaluate, calls = trainer.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real_evaluate(*args, **kwargs)

    trainer.evaluate = evaluate
    try:
        train(config, out_dir=out + "/resumed", **quiet)
        raise SystemExit("the interrupted run finished")
    except RuntimeError:
        pass
    trainer.evaluate = real_evaluate
    assert train(config, out_dir=out + "/resumed", **quiet).resumed_from_epoch == 2
    atexit._run_exitfuncs()  # what the interpreter runs at exit: sharpscope's leaves the process group
    assert not torch.distributed.is_initialized()
""")


@pytest.mark.slow
def test_ddp_run_interrupted_then_resumed_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    script = tmp_path / "interrupted_and_resumed.py"
    script.write_text(_INTERRUPTED_AND_RESUMED)
    torchrun([script, tmp_path])
    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=True) for run in ("straight", "resumed"))
    for name, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][name]), f"{name} differs after the resume"
    assert a["optimizer_state"]["state"].keys() == b["optimizer_state"]["state"].keys()
    for key, state in a["optimizer_state"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer_state"]["state"][key]["momentum_buffer"])
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                         for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("straight") == strip("resumed") and len(strip("resumed")) == 4

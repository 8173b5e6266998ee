"""DDP training with 2 CPU ranks (gloo) equals the single-process reference with per-rank micro-batches
(or, with ``--sync-perturbation``, plain SAM on the global batch).

Under torchrun each rank perturbs with its own gradient (the clean pass skips DDP's all-reduce) and DDP averages
the SAM gradients: that is m-sharpness SAM with m = the per-rank batch, which the reference below computes in one
process from the very same per-rank batches. The MLP has no BatchNorm, whose running statistics DDP takes from
rank 0 only (broadcast_buffers), so weights must agree up to float32 reduction order (atol 1e-6).
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from sharpscope.data import DeviceLoader, load_dataset
from sharpscope.models import create_model
from sharpscope.optim import create_optimizer, training_step
from sharpscope.train.trainer import cosine_with_warmup

PER_RANK_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_weights(epochs: int, *, sync_perturbation: bool = False) -> dict[str, torch.Tensor]:
    """Single-process SAM on both ranks' batches: one perturbation per rank's batch (m = per-rank batch), or with
    ``sync_perturbation`` one for the concatenated batch (plain SAM on the global batch)."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=8)
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
            training_step(model, optimizer, nn.CrossEntropyLoss(), torch.cat([x0, x1]), torch.cat([y0, y1]),
                          micro_batch_size=None if sync_perturbation else len(x0))
            scheduler.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("sync_perturbation", [False, True])
def test_ddp_sam_equals_single_process_reference(tmp_path, sync_perturbation):
    epochs = 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", "-m", "sharpscope", "-q", "train", "--dataset", "digits",
           "--model", "mlp", "--optimizer", "sam", "--lr", "0.05", "--batch-size", str(PER_RANK_BATCH),
           "--epochs", str(epochs), "--device", "cpu", "--out", str(tmp_path / "ddp")]
    cmd += ["--sync-perturbation"] if sync_perturbation else []
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
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

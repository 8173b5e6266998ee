"""Loading what an analysis command works on: a checkpoint's model and a fixed evaluation set."""

from __future__ import annotations

from pathlib import Path

import torch

from sharpscope.errors import SharpscopeError

#: The dataset loaded last, by (name, data_dir): a command analysing many checkpoints of one run (22 along a
#: trajectory) reads and decodes its files once, not once per checkpoint. Emptied after each CLI command
#: (:meth:`sharpscope.cli.main.LazyGroup.invoke`), so a command always reads the files as they are when it starts.
_LAST_DATASET: dict[tuple[str, str | None], object] = {}


def analysis_inputs(
    ckpt_path: str | Path,
    *,
    dataset: str | None = None,
    split: str = "train",
    num_samples: int | None = 1000,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    data_dir: str | None = None,
    model_spec: str | None = None,
):
    """Load ``ckpt_path`` and the evaluation batches an analysis of it uses.

    Returns ``(checkpoint, eval_batches)``: the model on ``device`` in eval mode, and the first ``num_samples``
    samples of ``split`` of ``dataset`` (default: the dataset it was trained on) in a fixed order, normalised
    as in training, without augmentation.
    """
    from sharpscope.data import eval_batches, load_dataset
    from sharpscope.specs import is_factory_spec
    from sharpscope.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(ckpt_path, device=device, model_spec=model_spec, dataset=dataset)
    name = dataset or checkpoint.dataset
    if name is None:
        raise SharpscopeError(f"{ckpt_path}: the checkpoint does not say which data it was trained on; pass --dataset")
    key = (name, None if data_dir is None else str(data_dir))
    try:
        data = _LAST_DATASET[key] if key in _LAST_DATASET else load_dataset(name, data_dir=data_dir)
    except OSError as exc:  # e.g. a --data-dir this user may not read
        raise SharpscopeError(f"cannot read dataset {name!r} ({exc}); check --data-dir and its permissions") from None
    _LAST_DATASET.clear()
    if not is_factory_spec(name):  # user code may return other data on each call: call it each time
        _LAST_DATASET[key] = data
    expected = checkpoint.model_kwargs
    for key, found in (("in_channels", data.in_channels), ("num_classes", data.num_classes),
                       ("image_size", data.image_size)):
        if key in expected and expected[key] != found:
            raise SharpscopeError(
                f"{ckpt_path}: the model expects {key}={expected[key]} but dataset {name!r} has {found}; "
                "pass the --dataset it was trained on"
            )
    available = len(data.split(split)[1])
    # --num-samples larger than the split means "the whole split" (documented in the option's help)
    num_samples = available if num_samples is None else min(num_samples, available)
    batches = eval_batches(data, split=split, num_samples=num_samples, batch_size=batch_size, device=device)
    return checkpoint, batches


def check_finite_loss(model: torch.nn.Module, loss_fn, batches, path: str | Path) -> float:
    """Return the mean loss of ``model`` over ``batches``; raise SharpscopeError if it is NaN or infinite.

    A checkpoint of a diverged run (weights holding NaN/inf) has no loss landscape, spectrum or sharpness to
    measure: every analysis would plot NaN or fail deep inside with a misleading message (e.g. "the loss is
    not deterministic: nan vs nan"). Analysis commands call this right after :func:`analysis_inputs`.

    The mean is sample-weighted, ``sum_b n_b L_b / sum_b n_b`` (``loss_fn`` returns the batch mean), in the
    model's current mode, without gradients: one forward pass over the evaluation set and one host sync.
    """
    from sharpscope.batches import batch_loss, num_samples

    total = None
    count = 0
    with torch.no_grad():
        for batch in batches:  # the batch contract: tensor, tuple or dict inputs, or a BatchLoss
            n = num_samples(batch)
            weighted = batch_loss(model, loss_fn, batch)[1].detach().double() * n
            total = weighted if total is None else total + weighted
            count += n
    if not count:
        raise SharpscopeError(f"{path}: the evaluation set is empty; pass --num-samples 1 or more")
    loss = float(total) / count
    if loss == loss and abs(loss) != float("inf"):
        return loss
    states = [t for t in model.state_dict().values() if t.is_floating_point()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in states)
    numel = sum(t.numel() for t in states)
    cause = (f"{bad} of {numel} weights are NaN/inf" if bad
             else "its weights are finite, so its outputs overflow")
    raise SharpscopeError(
        f"{path}: the loss at the checkpoint is not finite ({loss}); the model diverged ({cause}), so there is "
        "nothing to measure. Analyse an earlier checkpoint of the run, or retrain with a lower --lr (or --rho)"
    )


def expand_checkpoints(paths: list[str]) -> list[Path]:
    """Run folders become their checkpoints (``ckpt-epoch*.pt`` then ``final.pt``); files stay as given."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("ckpt-epoch*.pt")) + ([path / "final.pt"] if (path / "final.pt").exists() else [])
            if not found:
                raise SharpscopeError(f"{path}/ holds no checkpoints (ckpt-epoch*.pt, final.pt); is it a run folder?")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


def run_names(folders: list[Path]) -> list[str]:
    """A display name per run folder: its own name, lengthened by parent folders until distinct folders get
    distinct names (``seed0/sgd`` and ``seed1/sgd`` rather than two ``sgd``). The same folder, however it was
    written, gets the same name.

    >>> run_names([Path("/r/seed0/sgd"), Path("/r/seed1/sgd"), Path("/r/seed0/sam")])
    ['seed0/sgd', 'seed1/sgd', 'sam']
    """
    resolved = [Path(f).resolve() for f in folders]
    distinct = list(dict.fromkeys(resolved))
    names: dict[Path, str] = {}
    for folder in distinct:
        depth = 1
        while True:
            name = "/".join(folder.parts[-depth:]) if len(folder.parts) > 1 else str(folder)
            clash = [other for other in distinct if other != folder
                     and "/".join(other.parts[-depth:]) == name]
            if not clash or depth >= len(folder.parts) - 1:
                names[folder] = name
                break
            depth += 1
    return [names[f] for f in resolved]

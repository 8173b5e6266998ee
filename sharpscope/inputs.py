"""What an analysis works on: a checkpoint's model, a fixed evaluation set, and the loss it was trained with.

The library runners (:func:`sharpscope.hessian.run`, :func:`sharpscope.landscape.run`,
:func:`sharpscope.sharpness.run`) and the CLI commands over them share these loaders (the CLI's
shared options use its defaults, :func:`resolve_device` and :func:`default_out`). The evaluation set comes from the dataset the checkpoint records (or ``--dataset``):

* an :class:`~sharpscope.data.ImageDataset` (a registry name, or a factory returning one): the first
  ``num_samples`` images of the split, normalised as in training, no augmentation
  (:func:`sharpscope.data.eval_batches`);
* a :class:`~sharpscope.train.BatchData` (a ``package.module:factory`` returning one: token ids, tables, dicts): the
  first ``num_samples`` samples of its ``train`` or ``test`` batches in their order, re-batched to ``batch_size``
  along dim 0 of every tensor (the batch contract of :mod:`sharpscope.batches`), on the device.

The loss is the one the run recorded (``config["loss"]``, a :func:`~sharpscope.specs.load_loss` spec; none recorded:
plain cross-entropy, no label smoothing) unless a ``loss`` spec overrides it (:class:`AnalysisLoss`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sharpscope.errors import SharpscopeError

__all__ = [
    "AnalysisLoss", "FixedBatches", "analysis_inputs", "check_finite_loss", "classifies", "expand_checkpoints",
    "load_analysis_data", "mean_loss", "recorded_loss", "run_names", "take_samples",
]

#: Defaults of the fixed evaluation set every analysis uses (documented in every command's --help).
DEFAULT_EVAL_SPLIT = "train"
DEFAULT_NUM_SAMPLES = 1024  # divisible by every power-of-two m up to 1024 (Andriushchenko et al. 2023 use 1024)
DEFAULT_EVAL_BATCH_SIZE = 500

#: The dataset loaded last, by (name, data_dir): a command analysing many checkpoints of one run (22 along a
#: trajectory) reads and decodes its files once, not once per checkpoint. Emptied after each CLI command
#: (:meth:`sharpscope.cli.main.LazyGroup.invoke`), so a command always reads the files as they are when it starts.
_LAST_DATASET: dict[tuple[str, str | None], object] = {}


class FixedBatches(Sequence):
    """Fixed evaluation batches of any structure (the batch contract): the same samples in the same order on every
    pass, with ``num_samples`` (their total) like :class:`~sharpscope.data.EvalBatches`."""

    def __init__(self, batches: Sequence[Any]) -> None:
        from sharpscope.batches import num_samples

        self._batches = tuple(batches)
        if not self._batches:
            raise SharpscopeError("the evaluation set is empty; pass --num-samples 1 or more")
        self.num_samples = sum(num_samples(b) for b in self._batches)  # samples over all batches

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index):
        return self._batches[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._batches)

    def __repr__(self) -> str:
        return f"FixedBatches({len(self._batches)} batches, {self.num_samples} samples)"


def load_analysis_data(name: str, *, data_dir: str | None = None):
    """The :class:`~sharpscope.data.ImageDataset` or :class:`~sharpscope.train.BatchData` that ``name`` (a registry
    name or a ``package.module:factory[:k=v]`` spec) gives.

    Raises:
        SharpscopeError: unreadable files, or a factory returning anything else.
    """
    from sharpscope.data import ImageDataset, load_dataset
    from sharpscope.specs import call_factory, is_factory_spec, parse_spec
    from sharpscope.train.fit import BatchData

    if not is_factory_spec(name):
        try:
            return load_dataset(name, data_dir=data_dir)
        except OSError as exc:  # e.g. a --data-dir this user may not read
            raise SharpscopeError(f"cannot read dataset {name!r} ({exc}); check --data-dir and its permissions") \
                from None
    factory, kwargs = parse_spec(name, what="dataset")
    data = call_factory(factory, kwargs, what="dataset")
    if not isinstance(data, (ImageDataset, BatchData)):
        raise SharpscopeError(
            f"dataset factory {factory!r} returned {type(data).__name__}, not a sharpscope.data.ImageDataset or a "
            "sharpscope.train.BatchData; return ImageDataset(...) for images, BatchData(train=..., test=...) for "
            "batches of any other structure"
        )
    return data


def _in_order(batches: Any) -> Any:
    """``batches`` in a fixed order: a ``DataLoader`` with ``shuffle=True`` (training batches often are) is read
    through an unshuffled twin over the same dataset, batch size and collate function."""
    from sharpscope.batches import _shuffling_loader

    if not _shuffling_loader(batches):
        return batches
    from torch.utils.data import DataLoader

    return DataLoader(batches.dataset, batch_size=batches.batch_size, shuffle=False, collate_fn=batches.collate_fn,
                      drop_last=False)


def take_samples(batches: Any, num_samples: int | None, *, batch_size: int, device: Any = "cpu") -> FixedBatches:
    """The first ``num_samples`` samples of ``batches`` (all when None or more), in order, re-batched into
    consecutive batches of ``batch_size`` samples (the last may be smaller) on ``device``.

    Every tensor of dimension >= 1 is cut along dim 0 (:mod:`sharpscope.batches`); constants pass through. Reading
    stops at the batch that completes ``num_samples``; a shuffling ``DataLoader`` is read unshuffled.

    Raises:
        SharpscopeError: no samples, batches of different structures, or a tensor whose dim 0 is not the samples.
    """
    from sharpscope.batches import (
        check_sample_dims,
        concat_batches,
        map_samples,
        to_device,
    )
    from sharpscope.batches import num_samples as count_samples

    if batch_size < 1:
        raise SharpscopeError(f"batch_size must be >= 1, got {batch_size}")
    taken, remaining = [], num_samples
    for batch in _in_order(batches):
        if remaining is not None and remaining <= 0:
            break
        n = count_samples(batch)
        check_sample_dims(batch, n, what="batch of the evaluation set")
        if remaining is not None and n > remaining:
            keep = remaining
            batch = map_samples(lambda t: t[:keep], batch)
            n = keep
        taken.append(batch)
        if remaining is not None:
            remaining -= n
    if not taken:
        raise SharpscopeError("the evaluation data holds no batches")
    joined = to_device(concat_batches(taken), device)
    total = count_samples(joined)
    return FixedBatches([map_samples(lambda t, s=start: t[s:s + batch_size], joined)
                         for start in range(0, total, batch_size)])


def analysis_inputs(
    ckpt_path: str | Path,
    *,
    dataset: str | None = None,
    split: str = "train",
    num_samples: int | None = 1000,
    batch_size: int = 500,
    device: Any = "cpu",
    data_dir: str | None = None,
    model_spec: str | None = None,
):
    """Load ``ckpt_path`` and the evaluation batches an analysis of it uses.

    Returns ``(checkpoint, eval_batches)``: the model on ``device`` in eval mode, and the first ``num_samples``
    samples (all when None or more) of ``split`` of ``dataset`` (default: the dataset it was trained on) in a fixed
    order, on ``device``: an :class:`~sharpscope.data.ImageDataset`'s images normalised as in training without
    augmentation (an :class:`~sharpscope.data.EvalBatches`), or a :class:`~sharpscope.train.BatchData`'s
    ``split`` batches re-batched to ``batch_size`` (a :class:`FixedBatches`, :func:`take_samples`).
    """
    from sharpscope.data import ImageDataset, eval_batches
    from sharpscope.specs import is_factory_spec
    from sharpscope.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(ckpt_path, device=device, model_spec=model_spec, dataset=dataset)
    name = dataset or checkpoint.dataset
    if name is None:
        raise SharpscopeError(f"{ckpt_path}: the checkpoint does not say which data it was trained on; pass --dataset")
    key = (name, None if data_dir is None else str(data_dir))
    data = _LAST_DATASET[key] if key in _LAST_DATASET else load_analysis_data(name, data_dir=data_dir)
    _LAST_DATASET.clear()
    if not is_factory_spec(name):  # user code may return other data on each call: call it each time
        _LAST_DATASET[key] = data
    if not isinstance(data, ImageDataset):  # BatchData: the factory's batches, as they are
        if split not in ("train", "test"):
            raise SharpscopeError(f"unknown split {split!r}; expected 'train' or 'test'")
        return checkpoint, take_samples(getattr(data, split), num_samples, batch_size=batch_size, device=device)
    expected = checkpoint.model_kwargs
    for field, found in (("in_channels", data.in_channels), ("num_classes", data.num_classes),
                         ("image_size", data.image_size)):
        if field in expected and expected[field] != found:
            raise SharpscopeError(
                f"{ckpt_path}: the model expects {field}={expected[field]} but dataset {name!r} has {found}; "
                "pass the --dataset it was trained on"
            )
    available = len(data.split(split)[1])
    # --num-samples larger than the split means "the whole split" (documented in the option's help)
    num_samples = available if num_samples is None else min(num_samples, available)
    batches = eval_batches(data, split=split, num_samples=num_samples, batch_size=batch_size, device=device)
    return checkpoint, batches


# ------------------------------------------------------------------------------------------------------ the loss


def recorded_loss(config: dict[str, Any] | None) -> str | None:
    """The loss spec a run's config recorded (``config["loss"]``), or None: cross-entropy."""
    spec = (config or {}).get("loss")
    return spec if isinstance(spec, str) and spec else None


class AnalysisLoss:
    """The one loss a command analyses all its checkpoints with.

    ``AnalysisLoss(override)``: ``override`` (a ``--loss`` spec, for plain state_dicts or to analyse another loss)
    applies to every checkpoint; without it each checkpoint's recorded loss (:func:`recorded_loss`) is used, and
    checkpoints that recorded different losses are refused (their numbers would not be comparable). No recorded
    loss means plain ``nn.CrossEntropyLoss()`` (training's label smoothing is left out, as always in analyses).

    ``for_checkpoint(path, config)`` returns the loss function; ``spec`` is the spec used (None: cross-entropy).
    """

    def __init__(self, override: str | None = None) -> None:
        from sharpscope.specs import load_loss

        self.override = override
        self.spec: str | None = override
        self._fn: Any = load_loss(override) if override is not None else None
        self._first: str | None = None  # the checkpoint whose recorded loss fixed ``spec``

    def check(self, path: str | Path, config: dict[str, Any] | None) -> str | None:
        """The spec ``path`` is analysed with; refuses a recorded loss other than the command's so far."""
        if self.override is not None:
            return self.override
        spec = recorded_loss(config)
        if self._first is None:
            self._first, self.spec = str(path), spec
        elif spec != self.spec:
            def name(s):
                return s or "cross-entropy (the default)"
            raise SharpscopeError(
                f"{self._first} was trained with loss {name(self.spec)} but {path} with {name(spec)}; analyse runs "
                "with different losses in separate commands (or pass --loss to use one loss for all)"
            )
        return spec

    def for_checkpoint(self, path: str | Path, config: dict[str, Any] | None) -> Any:
        """The loss function of checkpoint ``path`` (its training ``config``): see the class docstring."""
        self.check(path, config)
        if self._fn is None:
            import torch

            from sharpscope.specs import load_loss

            self._fn = load_loss(self.spec) if self.spec is not None else torch.nn.CrossEntropyLoss()
        return self._fn

    def check_files(self, paths: Sequence[str | Path]) -> None:
        """Check the recorded losses of checkpoint files before any work (reads each file's config)."""
        if self.override is not None:
            return
        from sharpscope.train.checkpoint import read_checkpoint_file

        for path in paths:
            payload, _ = read_checkpoint_file(path)
            config = payload.get("config") if isinstance(payload, dict) else None
            self.check(path, config if isinstance(config, dict) else None)


def classifies(model: Any, loss_fn: Any, batch: Any) -> bool:
    """Whether accuracy means something on ``batch``: a plain loss (not a
    :class:`~sharpscope.batches.BatchLoss`), an ``(inputs, targets)`` pair whose targets are ``n`` integer class
    labels, and ``(n, C)`` outputs (the trainer's rule for reporting accuracy). One forward pass, no gradients."""
    import torch

    from sharpscope.batches import BatchLoss, call_model, num_samples, split_batch

    if isinstance(loss_fn, BatchLoss) or not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        return False
    inputs, targets = split_batch(batch)
    if not (isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point()
            and not targets.is_complex() and targets.dtype != torch.bool):
        return False
    with torch.no_grad():
        outputs = call_model(model, inputs)
    n = num_samples(batch)
    return isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[0] == n


def mean_loss(model: Any, loss_fn: Any, batches: Any) -> tuple[float, int]:
    """``(sum_b n_b L_b / sum_b n_b, sum_b n_b)``: the sample-weighted mean of the batch-mean losses of ``model``
    over ``batches`` in its current mode, without gradients, accumulated in float64 (one host sync)."""
    import torch

    from sharpscope.batches import batch_loss, num_samples

    total = None
    count = 0
    with torch.no_grad():
        for batch in batches:  # the batch contract: tensor, tuple or dict inputs, or a BatchLoss
            n = num_samples(batch)
            weighted = batch_loss(model, loss_fn, batch)[1].detach().double() * n
            total = weighted if total is None else total + weighted
            count += n
    return (float(total) / count if count else float("nan")), count


def check_finite_loss(model: Any, loss_fn, batches, path: str | Path) -> float:
    """Return the mean loss of ``model`` over ``batches``; raise SharpscopeError if it is NaN or infinite.

    A checkpoint of a diverged run (weights holding NaN/inf) has no loss landscape, spectrum or sharpness to
    measure: every analysis would plot NaN or fail deep inside with a misleading message (e.g. "the loss is
    not deterministic: nan vs nan"). Analysis commands call this right after :func:`analysis_inputs`.

    The mean is sample-weighted, ``sum_b n_b L_b / sum_b n_b`` (``loss_fn`` returns the batch mean), in the
    model's current mode, without gradients: one forward pass over the evaluation set and one host sync.
    """
    import torch

    loss, count = mean_loss(model, loss_fn, batches)
    if not count:
        raise SharpscopeError(f"{path}: the evaluation set is empty; pass --num-samples 1 or more")
    if loss == loss and abs(loss) != float("inf"):
        return loss
    states = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in states)
    numel = sum(t.numel() for t in states)
    cause = (f"{bad} of {numel} weights are NaN/inf" if bad
             else "its weights are finite, so its outputs overflow")
    raise SharpscopeError(
        f"{path}: the loss at the checkpoint is not finite ({loss}); the model diverged ({cause}), so there is "
        "nothing to measure. Analyse an earlier checkpoint of the run, or retrain with a lower --lr (or --rho)"
    )


# ------------------------------------------------------------------------------------------------ checkpoints


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


def resolve_device(device: str | None) -> "torch.device":  # noqa: F821
    """Turn ``--device`` into a torch.device, with a clear error for unusable ones."""
    import torch

    from sharpscope.errors import UsageError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda")
    return dev


def default_out(command: str, inputs: list[str]) -> str:
    """``--out`` when none is given: ``results/<runs>-<command>``, the runs named as everywhere else
    (:func:`run_names`), joined by ``+``.

    An input is a run folder, or a checkpoint file: a file inside a run folder (one holding ``config.json``)
    counts as that run, any other file by its stem.

    >>> default_out("landscape", ["runs/sgd/final.pt", "runs/sam/final.pt"])  # doctest: +SKIP
    'results/sgd+sam-landscape'
    """
    from pathlib import Path


    folders, stems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_file() and (path.parent / "config.json").is_file():
            path = path.parent
        (folders if path.is_dir() else stems).append(path)
    names = run_names(folders) if folders else []
    names += [p.stem for p in stems]
    names = list(dict.fromkeys(n.replace("/", "_") for n in names))
    label = "+".join(names[:4]) + (f"+{len(names) - 4}more" if len(names) > 4 else "")
    return str(Path("results") / f"{label or 'out'}-{command}")

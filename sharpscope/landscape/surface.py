"""Loss along a line or over a plane in weight space: ``L(w0 + a d1 + b d2)`` on a grid of ``(a, b)``
(Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", section 4; DESIGN.md section 7).

Every grid point is computed from the centre weights directly, ``w = w0 + a d1 + b d2`` (never by accumulating
increments, which drifts: loss-landscapes 3.0.6 walks its grid with in-place ``add_``), so a point depends only on
its coordinates, never on the order the points are evaluated in, and a resumed or sharded run gives the same
surface as a single pass. The grid centre ``(0, 0)`` is the unperturbed model, bit for bit.

Evaluation: the model in eval mode (BatchNorm uses its running statistics, which random directions never move),
under ``torch.inference_mode``, over a fixed list of batches held on the model's device; the loss is the
sample-weighted mean ``sum_b n_b L_b / sum_b n_b`` of ``loss_fn(model(inputs_b), targets_b)`` (a batch-mean loss;
batches, their sample counts and :class:`sharpscope.batches.BatchLoss` as in :mod:`sharpscope.batches`), the
accuracy the fraction of argmax predictions equal to the integer labels (NaN when the outputs are not
``(batch, classes)`` logits with integer labels, or the loss is a ``BatchLoss``).

Speed (measured on CPU in ``benchmarks/bench_landscape.py``): the cost is one forward pass over the evaluation set
per point; what the fast path removes is everything else a serial loop adds per point (``deepcopy`` of the state
dict, ``load_state_dict``, autograd bookkeeping, re-batching or transforming data, a host sync per batch): the
moved tensors are updated in place with three ``torch._foreach`` calls (copy ``w0``, add ``a d1``, add ``b d2``;
tensors with a zero direction, such as ignored biases, are skipped), the batches are moved to the device once,
losses stay on the device until a chunk of points is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from sharpscope.batches import BatchLoss, batch_loss, check_fixed_batches, num_samples, split_batch, to_device
from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.io import write_npz
from sharpscope.landscape.directions import Direction, check_directions
from sharpscope.max_pool import fast_max_pools

LossFn = Callable[[Tensor, Tensor], Tensor]


def grid(start: float, stop: float, num: int) -> np.ndarray:
    """``num`` evenly spaced coordinates from ``start`` to ``stop`` inclusive (``numpy.linspace``, float64), with a
    coordinate within ``1e-12 * (stop - start)`` of 0 set to exactly 0 so the centre is the unperturbed model.
    ``grid(-1, 1, 51)`` is the paper code's default ``--x=-1:1:51``."""
    if not (math.isfinite(start) and math.isfinite(stop)) or not start < stop:
        raise SharpscopeError(f"grid: expected finite START < STOP, got {start}:{stop}")
    if int(num) < 2:
        raise SharpscopeError(f"grid: expected at least 2 points, got {num}")
    coords = np.linspace(float(start), float(stop), int(num), dtype=np.float64)
    coords[np.abs(coords) <= 1e-12 * (stop - start)] = 0.0
    return coords


def covering_grid(values: Any, *, num: int = 21, margin: float = 0.25) -> np.ndarray:
    """``num`` evenly spaced coordinates covering ``values`` and 0, with ``margin`` times their span added on each
    side, placed so that 0 is a grid point (the unperturbed model is evaluated): the coordinates are ``k * step``
    for ``k = -a .. num - 1 - a``, with the split ``a`` that gives the smallest ``step`` reaching both
    ``min(values, 0) - margin * span`` and ``max(values, 0) + margin * span`` (``span = max - min``; values all
    0 count as -0.5..0.5). Used for planes whose interesting points are known: the projected path of a PCA plane,
    the three checkpoints of a plane through them."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise SharpscopeError(f"covering_grid: expected finite values, got {values.tolist()[:5]}")
    if int(num) < 3:
        raise SharpscopeError(f"covering_grid: expected at least 3 points (0 and both sides of it), got {num}")
    if not margin >= 0:
        raise SharpscopeError(f"covering_grid: expected a margin >= 0, got {margin}")
    num = int(num)
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if not high > low:  # every value is 0
        low, high = -0.5, 0.5
    span = high - low
    low, high = low - margin * span, high + margin * span
    best: tuple[float, int] | None = None
    for below in range(num):  # grid points below 0
        above = num - 1 - below
        need_below = -low / below if below else (0.0 if low >= 0 else math.inf)
        need_above = high / above if above else (0.0 if high <= 0 else math.inf)
        step = max(need_below, need_above)
        if step > 0 and math.isfinite(step) and (best is None or step < best[0]):
            best = (step, below)
    step, below = best  # num >= 3 and low < 0 < high or a side is empty: some split has a finite step
    return grid(-below * step, (num - 1 - below) * step, num)


@dataclass(frozen=True)
class Surface:
    """A loss curve (1-D) or surface (2-D) on a grid; ``loss[j, i] = L(w0 + xs[i] d1 + ys[j] d2)``.

    Rows are ``ys``, columns ``xs`` (the ``meshgrid(xs, ys)`` layout ``matplotlib.contour(xs, ys, loss)`` expects),
    so non-square grids are never transposed. Points not computed yet (a partial, resumable surface) are NaN in
    ``loss``/``accuracy`` and False in ``done``.
    """

    xs: np.ndarray  # (nx,) float64 coordinates along the first direction
    ys: np.ndarray | None  # (ny,) float64 coordinates along the second direction; None for a 1-D curve
    loss: np.ndarray  # (ny, nx) for 2-D, (nx,) for 1-D: sample-weighted mean loss, NaN where not computed
    accuracy: np.ndarray  # same shape: fraction of correct argmax predictions in [0, 1]; NaN if not classification
    done: np.ndarray  # same shape, bool: which points have been computed
    center_loss: float  # loss of the unperturbed model (a = b = 0), evaluated before any perturbation
    center_accuracy: float  # its accuracy (NaN if not classification)
    num_samples: int  # evaluation samples per point
    metadata: dict[str, Any] = field(default_factory=dict)  # directions, fingerprint, timing, label (JSON-able)

    def __repr__(self) -> str:
        """One line: label, grid, the centre and the range of the loss, how much is computed; never the arrays."""
        grid = f"{self.xs.size} points in [{self.xs[0]:g}, {self.xs[-1]:g}]" if self.xs.size else "empty grid"
        if self.ys is not None:
            grid = f"{self.ys.size} x {grid} x [{self.ys[0]:g}, {self.ys[-1]:g}]" if self.ys.size else grid
        finite = self.loss[np.isfinite(self.loss)]
        span = f", loss {finite.min():.4g}..{finite.max():.4g}" if finite.size else ""
        acc = "" if self.center_accuracy != self.center_accuracy else f" (accuracy {self.center_accuracy:.2%})"
        done = "" if self.complete else f", {int(self.done.sum())}/{self.done.size} points computed"
        return (f"Surface({self.label!r}, {self.dim}-D, {grid}: centre loss {self.center_loss:.4g}{acc}{span}"
                f"{done}, {self.num_samples} samples)")

    @property
    def dim(self) -> int:
        """1 for a curve, 2 for a surface."""
        return 1 if self.ys is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        """``(nx,)`` or ``(ny, nx)``."""
        return tuple(self.loss.shape)

    @property
    def complete(self) -> bool:
        """Whether every grid point has been computed."""
        return bool(self.done.all())

    @property
    def label(self) -> str:
        """A display name (``metadata["label"]``, default "model")."""
        return str(self.metadata.get("label") or "model")

    def center_index(self) -> tuple[int, ...] | None:
        """Index of the grid point (0, 0) (or 0 in 1-D), if the grid contains it."""
        ix = np.flatnonzero(self.xs == 0.0)
        if ix.size == 0:
            return None
        if self.ys is None:
            return (int(ix[0]),)
        iy = np.flatnonzero(self.ys == 0.0)
        return (int(iy[0]), int(ix[0])) if iy.size else None

    def with_label(self, label: str) -> Surface:
        """A copy with ``metadata["label"] = label``."""
        return replace(self, metadata={**self.metadata, "label": label})

    def merge(self, other: Surface) -> Surface:
        """Combine two partial surfaces of the same grid and directions (e.g. shards computed by different
        processes): points done in either are taken from the one that computed them."""
        if self.metadata.get("fingerprint") != other.metadata.get("fingerprint"):
            raise SharpscopeError("cannot merge surfaces of different grids, directions, models or data "
                                  "(their fingerprints differ)")
        done = self.done | other.done
        loss = np.where(self.done, self.loss, other.loss)
        accuracy = np.where(self.done, self.accuracy, other.accuracy)
        return replace(self, loss=loss, accuracy=accuracy, done=done)

    def summary(self) -> dict[str, Any]:
        """Scalar facts for JSON sidecars and printed summaries."""
        finite = self.loss[self.done & np.isfinite(self.loss)]
        out: dict[str, Any] = {
            "dim": self.dim,
            "shape": list(self.shape),
            "points_done": int(self.done.sum()),
            "points_total": int(self.done.size),
            "center_loss": self.center_loss,
            "center_accuracy": self.center_accuracy,
            "loss_min": float(finite.min()) if finite.size else float("nan"),
            "loss_max": float(finite.max()) if finite.size else float("nan"),
            "num_samples": self.num_samples,
        }
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Everything as JSON-able values (coordinates, loss and accuracy as nested lists, NaN -> null)."""
        return {
            "xs": self.xs.tolist(),
            "ys": None if self.ys is None else self.ys.tolist(),
            "loss": self.loss.tolist(),
            "accuracy": self.accuracy.tolist(),
            "done": self.done.tolist(),
            **self.summary(),
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (atomic) that ``numpy.load`` reads alone: ``xs``, ``ys`` (empty for 1-D), ``loss``,
        ``accuracy``, ``done``, ``center_loss``, ``center_accuracy``, ``num_samples``, ``metadata`` (JSON)."""
        return write_npz(
            path,
            xs=self.xs,
            ys=np.zeros(0) if self.ys is None else self.ys,
            dim=np.array(self.dim),
            loss=self.loss,
            accuracy=self.accuracy,
            done=self.done,
            center_loss=np.array(self.center_loss),
            center_accuracy=np.array(self.center_accuracy),
            num_samples=np.array(self.num_samples),
            metadata=np.array(json.dumps(self.metadata, default=_json_default)),
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def load_surface(path: str | os.PathLike) -> Surface:
    """Read a surface written by :meth:`Surface.save` (also a resume file written by :func:`loss_surface`)."""
    path = Path(path)
    if not path.exists():
        raise SharpscopeError(f"surface file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise SharpscopeError(f"surface file {str(path)!r} cannot be read ({exc}); delete it and recompute") from None
    required = {"xs", "ys", "dim", "loss", "accuracy", "done", "center_loss", "center_accuracy", "num_samples"}
    missing = sorted(required - set(arrays))
    if missing:
        raise SharpscopeError(f"{str(path)!r} is not a sharpscope surface file (missing {', '.join(missing)})")
    dim = int(arrays["dim"])
    return Surface(
        xs=arrays["xs"].astype(np.float64),
        ys=None if dim == 1 else arrays["ys"].astype(np.float64),
        loss=arrays["loss"].astype(np.float64),
        accuracy=arrays["accuracy"].astype(np.float64),
        done=arrays["done"].astype(bool),
        center_loss=float(arrays["center_loss"]),
        center_accuracy=float(arrays["center_accuracy"]),
        num_samples=int(arrays["num_samples"]),
        metadata=json.loads(str(arrays["metadata"])) if "metadata" in arrays else {},
    )


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def materialize_batches(
    batches: Iterable[Any], *, device: torch.device, channels_last: bool = False, loss_fn: Any = None
) -> list[Any]:
    """The batches as a list on ``device`` (read once; ``EvalBatches``, a DataLoader or a list all work), every
    tensor moved (:func:`sharpscope.batches.to_device`). With ``channels_last`` 4-D tensor inputs are stored in that
    memory format. Batches must be ``(inputs, targets)`` pairs unless ``loss_fn`` is a ``BatchLoss``."""
    out = []
    for item in batches:
        inputs, _ = split_batch(item, loss_fn)
        num_samples(item)  # refuse a batch without samples here, with the contract
        item = to_device(tuple(item) if isinstance(item, list) and len(item) == 2 else item, device)
        if channels_last and isinstance(inputs, Tensor) and inputs.dim() == 4 and isinstance(item, (tuple, list)):
            item = (item[0].contiguous(memory_format=torch.channels_last), item[1])
        out.append(item)
    if not out:
        raise SharpscopeError("the evaluation batches are empty; give at least one (inputs, targets) batch")
    return out


#: Forward-pass precisions of the surface evaluation: exact float32, or bf16 autocast (GPU speed).
PRECISIONS = ("fp32", "bf16")


class _Evaluator:
    """Sample-weighted loss and accuracy over fixed batches, with as few launches per point as possible.

    Per point and batch only the forward pass, the loss and (classification) an argmax are launched
    (:meth:`point`); the weighting ``sum_b (n_b / N) L_b`` (float64) and the comparison with the labels are done
    once for a whole chunk of points (:meth:`reduce`), then copied to the host in one transfer. On a small MLP
    this halves the non-forward work per point (measured in benchmarks/bench_landscape.py).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: list[Any], *,
                 precision: str = "fp32", compile: bool = False) -> None:
        if precision not in PRECISIONS:
            raise unknown_name_error("precision", str(precision), PRECISIONS)
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        # torch.compile traces the forward once per input shape; the weights it reads are the model's own
        # parameters, which _WeightSetter changes in place, so every point runs the compiled graph
        self.forward = torch.compile(model) if compile else model
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        sizes = [num_samples(batch) for batch in batches]
        self.num_samples = sum(sizes)
        device = _model_device(model)
        acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.weights = torch.tensor([n / self.num_samples for n in sizes], dtype=acc_dtype, device=device)
        self.classification: bool | None = None  # decided on the first evaluation
        self.labels: Tensor | None = None
        self.calls = 0

    def _first(self, out: Any, loss: Any, y: Any) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise SharpscopeError(
                "loss_fn must return the batch-mean loss as a 0-d tensor (e.g. nn.CrossEntropyLoss()), got "
                f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))}"
            )
        self.classification = (
            isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] > 1 and isinstance(y, Tensor)
            and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()
        )
        if self.classification:
            self.labels = torch.cat([batch[1] for batch in self.batches])

    def point(self) -> tuple[list[Tensor], list[Tensor]]:
        """One pass over the batches at the current weights: per-batch losses and argmax predictions."""
        self.calls += 1
        losses, predictions = [], []
        # torch.compile'd: the compiled graph runs; else max pools run sharpscope.max_pool's kernel (same values)
        pools = contextlib.nullcontext() if self.forward is not self.model else fast_max_pools(self.model)
        with pools:
            for batch in self.batches:
                if self.autocast_dtype is None:
                    out, loss = batch_loss(self.forward, self.loss_fn, batch)
                else:
                    with torch.autocast(self.weights.device.type, dtype=self.autocast_dtype):
                        out, loss = batch_loss(self.forward, self.loss_fn, batch)
                        loss = loss.float() if isinstance(loss, Tensor) else loss
                if self.calls == 1:
                    self._first(out, loss, None if isinstance(self.loss_fn, BatchLoss) else batch[1])
                losses.append(loss.reshape(()))
                if self.classification:
                    predictions.append(out.argmax(dim=1))
        return losses, predictions

    def reduce(self, points: list[tuple[list[Tensor], list[Tensor]]]) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy (NaN if not classification) of each point, as float64 host arrays."""
        count = len(points)
        per_batch = torch.stack([loss for losses, _ in points for loss in losses]).reshape(count, -1)
        mean_loss = per_batch.to(self.weights.dtype) @ self.weights
        if self.classification:
            predicted = torch.cat([p for _, preds in points for p in preds]).reshape(count, self.num_samples)
            correct = (predicted == self.labels).sum(dim=1)
            accuracy = correct.cpu().numpy().astype(np.float64) / self.num_samples
        else:
            accuracy = np.full(count, np.nan)
        return mean_loss.detach().cpu().numpy().astype(np.float64), accuracy

    def __call__(self) -> tuple[float, float]:
        loss, accuracy = self.reduce([self.point()])
        return float(loss[0]), float(accuracy[0])


def _wants_channels_last(channels_last: bool | None, batches: list[Any], model: nn.Module) -> bool:
    """Default: on for 4-D inputs on a CUDA device to a model with 2-D convolutions (an MLP would only pay for
    copies in ``flatten``). Off on the CPU: there it did not reliably help (``benchmarks/bench_landscape.py`` and
    paired runs on 2 shared cores, 1-2 threads: 0.5-1.8x of the contiguous speed on the anchor CNN depending on the
    load, the contiguous layout ahead in the best times; the convnet on digits 0.9-1.06x)."""
    if channels_last is None:
        first = batches[0]
        inputs = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 else None
        images = isinstance(inputs, Tensor) and inputs.dim() == 4
        on_cuda = images and inputs.device.type == "cuda"
        return on_cuda and any(isinstance(m, nn.Conv2d) for m in model.modules())
    return bool(channels_last)


@contextlib.contextmanager
def _channels_last_weights(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily store the model's 4-D parameters (conv kernels) channels-last; the original tensors, never
    written to, are put back afterwards, so the model leaves exactly as it came."""
    if not enabled:
        yield
        return
    originals = []
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                originals.append((p, p.data))
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in originals:
                p.data = data


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of one model on fixed batches."""

    loss: float  # sample-weighted mean loss
    accuracy: float  # fraction correct, NaN if not classification
    num_samples: int  # samples evaluated


def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], *, channels_last: bool | None = None,
    precision: str = "fp32",
) -> Evaluation:
    """Loss and accuracy of ``model`` as it is, in eval mode, under ``torch.inference_mode`` (the model's
    train/eval mode is restored). The same computation as every grid point of :func:`loss_surface` (same
    ``channels_last`` and ``precision``), so it equals a surface's centre bit for bit."""
    device = _model_device(model)
    data = materialize_batches(batches, device=device, loss_fn=loss_fn)
    channels_last = _wants_channels_last(channels_last, data, model)
    data = materialize_batches(data, device=device, channels_last=channels_last, loss_fn=loss_fn)
    evaluator = _Evaluator(model, loss_fn, data, precision=precision)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _channels_last_weights(model, channels_last):
            loss, accuracy = evaluator()
    finally:
        model.train(was_training)
    return Evaluation(loss, accuracy, evaluator.num_samples)


# ----------------------------------------------------------------------------------------------------------------
# moving the weights


class _WeightSetter:
    """Sets the moved tensors to ``w0 + sum_i c_i d_i`` in place, from ``w0`` every time (exact, order-free)."""

    def __init__(self, targets: dict[str, Tensor], directions: Sequence[Direction]) -> None:
        nonzero = {
            name for d in directions for name, t in d.tensors.items() if bool(torch.count_nonzero(t))
        }
        self.names = [n for n in targets if n in nonzero]
        # detached aliases share storage with the model's tensors: in-place writes need no autograd bookkeeping
        self.live = [targets[n].detach() for n in self.names]
        self.w0 = [t.clone() for t in self.live]
        self.per_direction: list[tuple[list[Tensor], list[Tensor]]] = []
        for d in directions:
            pairs = [(i, n) for i, n in enumerate(self.names) if n in d.tensors]
            live = [self.live[i] for i, _ in pairs]
            # same dtype, device and memory format (channels-last kernels) as the tensor they move
            vecs = [torch.empty_like(self.live[i]).copy_(d.tensors[n].detach()) for i, n in pairs]
            self.per_direction.append((live, vecs))

    def set(self, coords: Sequence[float]) -> None:
        if not self.live:
            return
        torch._foreach_copy_(self.live, self.w0)
        for (live, vecs), c in zip(self.per_direction, coords):
            if c != 0.0 and live:  # a zero coordinate leaves w0 exactly (and never multiplies inf * 0)
                torch._foreach_add_(live, vecs, alpha=float(c))

    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.w0)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n, t in zip(self.names, self.w0):
            h.update(n.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


def _data_fingerprint(batches: list[Any]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        leaves, spec = tree_flatten(batch)
        if not (isinstance(batch, tuple) and len(batch) == 2 and len(leaves) == 2):  # (x, y) pairs: old fingerprint
            h.update(str(spec).encode())
        for t in leaves:
            if isinstance(t, Tensor):
                h.update(f"{tuple(t.shape)}{t.dtype};".encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(t).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# the surface


def _as_coords(coords: Any, ndirections: int) -> tuple[np.ndarray, np.ndarray | None]:
    def one(c: Any, what: str) -> np.ndarray:
        arr = np.array(c, dtype=np.float64)
        if arr.ndim != 1 or arr.size < 1:
            raise SharpscopeError(f"{what}: expected a 1-D array of coordinates, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise SharpscopeError(f"{what}: coordinates must be finite, got {arr.tolist()[:5]}...")
        return arr

    if ndirections == 1:
        if isinstance(coords, (tuple, list)) and len(coords) == 1 and np.ndim(coords[0]) == 1:
            coords = coords[0]
        if np.ndim(coords) != 1:
            raise SharpscopeError(
                f"one direction needs one coordinate array (xs), got an array of {np.ndim(coords)} dimensions"
            )
        return one(coords, "xs"), None
    if not isinstance(coords, (tuple, list)) or len(coords) != 2:
        raise SharpscopeError("two directions need two coordinate arrays: coords=(xs, ys)")
    return one(coords[0], "xs"), one(coords[1], "ys")


@dataclass(frozen=True)
class ChunkDone:
    """What an ``on_chunk`` callback receives after each chunk of points (the resume file is already written)."""

    surface: Surface  # the partial surface so far
    new_points: int  # points computed in this chunk
    points_done: int  # points done in total


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    directions: Sequence[Direction],
    coords: Any,
    checkpoint_path: str | os.PathLike | None = None,
    resume_from: Surface | None = None,
    on_chunk: Callable[[ChunkDone], None] | None = None,
    max_points: int | None = None,
    chunk_size: int | None = None,
    shard: tuple[int, int] | None = None,
    channels_last: bool | None = None,
    precision: str = "fp32",
    compile: bool = False,
    check_deterministic: bool = True,
    progress: bool = False,
    label: str | None = None,
) -> Surface:
    """Loss and accuracy of ``model`` at ``w0 + a d1 (+ b d2)`` for every grid point.

    Args:
        model: evaluated on its own device, in eval mode; its weights are changed in place during the call and
            restored exactly (bit for bit) at the end, as is its train/eval mode.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d batch-mean loss``, or a :class:`sharpscope.batches.BatchLoss`
            ``(fn)`` with ``fn(model, batch) -> 0-d`` (no accuracy is reported then).
        batches: the fixed evaluation set, an iterable of ``(inputs, targets)`` read once (``EvalBatches``, a list,
            a ``DataLoader`` with ``shuffle=False``); inputs a tensor, a tuple of tensors or a dict, as in
            :mod:`sharpscope.batches`.
        directions: ``(d1,)`` for a curve, ``(d1, d2)`` for a surface (:mod:`sharpscope.landscape.directions`).
        coords: ``xs`` (1-D array) for a curve, ``(xs, ys)`` for a surface; use :func:`grid`.
        checkpoint_path: an ``.npz`` resume file: if it exists (same grid, directions, weights and data, else an
            error), its points are reused and never recomputed; it is rewritten atomically after every chunk.
        resume_from: a partial :class:`Surface` of the same grid, directions, weights and data to continue.
        on_chunk: called after every chunk (after the resume file is written) with a :class:`ChunkDone`; an
            exception it raises stops the computation, and the saved points survive for a resume.
        max_points: compute at most this many new points, then return the partial surface.
        chunk_size: points per chunk (resume-file write / host sync); default one grid row (2-D) or 10 (1-D).
        shard: ``(rank, world_size)``: compute only the flat grid indices ``k`` (row-major) with
            ``k % world_size == rank``; combine the shards with :meth:`Surface.merge`.
        channels_last: store 4-D inputs and conv kernels channels-last during the call [default: on a CUDA device
            when the inputs are 4-D and the model has ``nn.Conv2d`` layers; off on the CPU, where it measured
            0.5-1.8x of the contiguous speed depending on the load, not a reliable gain]; values differ from the
            contiguous layout by float rounding only (~1e-7 relative).
        precision: ``"fp32"`` (exact, the default) or ``"bf16"``: forward passes under bf16 autocast (on GPUs
            with bf16 tensor cores several times faster; losses differ by ~1e-2 relative, so surfaces of the two
            precisions are not mixed: the precision is part of the resume fingerprint).
        compile: run the forward passes through ``torch.compile`` (worth it for large grids on a GPU; the first
            point pays the compilation).
        check_deterministic: refuse data that differ between passes (a shuffling ``DataLoader``, augmentation:
            :func:`sharpscope.batches.check_fixed_batches`, one more read of the first batch), and evaluate the
            centre twice and refuse a model/data pair whose two evaluations differ (relative 1e-5): dropout in a
            custom module, stochastic layers (STYLE.md 5).
        progress: show a tqdm progress bar on stderr.
        label: display name stored in ``metadata["label"]``.

    Returns:
        a :class:`Surface` (``complete`` unless ``max_points`` or ``shard`` left points out).
    """
    started = time.perf_counter()
    directions = tuple(directions)
    check_directions(model, directions)  # fail before any work
    xs, ys = _as_coords(coords, len(directions))
    shape = (xs.size,) if ys is None else (ys.size, xs.size)
    npoints = int(np.prod(shape))
    if max_points is not None and max_points < 0:
        raise SharpscopeError(f"max_points must be >= 0, got {max_points}")
    if chunk_size is not None and chunk_size < 1:
        raise SharpscopeError(f"chunk_size must be >= 1, got {chunk_size}")
    if shard is not None:
        rank, world = shard
        if not (world >= 1 and 0 <= rank < world):
            raise SharpscopeError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")

    device = _model_device(model)
    if check_deterministic:
        check_fixed_batches(batches, opt_out="check_deterministic=False")
    data = materialize_batches(batches, device=device, loss_fn=loss_fn)
    channels_last = _wants_channels_last(channels_last, data, model)
    data = materialize_batches(data, device=device, channels_last=channels_last, loss_fn=loss_fn)
    with _channels_last_weights(model, channels_last):
        # the moved tensors are looked up again: channels-last conv kernels are new tensors for the call
        targets = check_directions(model, directions)
        return _loss_surface(model, loss_fn, data, directions, targets, xs, ys, shape, npoints, started,
                             checkpoint_path=checkpoint_path, resume_from=resume_from, on_chunk=on_chunk,
                             max_points=max_points, chunk_size=chunk_size, shard=shard, channels_last=channels_last,
                             precision=precision, compile=compile, check_deterministic=check_deterministic,
                             progress=progress, label=label, device=device)


def _loss_surface(model, loss_fn, data, directions, targets, xs, ys, shape, npoints, started, *, checkpoint_path,
                  resume_from, on_chunk, max_points, chunk_size, shard, channels_last, precision, compile,
                  check_deterministic, progress, label, device) -> Surface:
    evaluator = _Evaluator(model, loss_fn, data, precision=precision, compile=compile)
    setter = _WeightSetter(targets, directions)

    fingerprint = hashlib.sha256(
        json.dumps({
            "xs": xs.tolist(), "ys": None if ys is None else ys.tolist(),
            "directions": [d.fingerprint() for d in directions],
            "weights": setter.fingerprint(), "data": _data_fingerprint(data), "channels_last": channels_last,
            **({"precision": precision} if precision != "fp32" else {}),  # fp32 files keep their old fingerprint
        }).encode()
    ).hexdigest()

    loss = np.full(shape, np.nan)
    accuracy = np.full(shape, np.nan)
    done = np.zeros(shape, dtype=bool)
    previous: Surface | None = resume_from
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        previous = load_surface(checkpoint_path)
    if previous is not None:
        if previous.metadata.get("fingerprint") != fingerprint:
            where = f"resume file {str(checkpoint_path)!r}" if checkpoint_path is not None else "resume_from"
            raise SharpscopeError(
                f"{where} holds a surface of a different grid, directions, model weights or evaluation data; "
                "delete it (or pass another path) to start afresh, or use the same inputs to resume"
            )
        loss, accuracy, done = previous.loss.copy(), previous.accuracy.copy(), previous.done.copy()

    was_training = model.training
    model.eval()
    metadata: dict[str, Any] = {
        "label": label,
        "fingerprint": fingerprint,
        "directions": [d.metadata() for d in directions],
        "moved_tensors": len(setter.names),
        "device": str(device),
        "channels_last": bool(channels_last),
    }
    if len(directions) == 2:
        metadata["cosine_d1_d2"] = directions[0].cosine(directions[1])
    try:
        with torch.inference_mode():
            center_loss, center_accuracy = evaluator()
            if check_deterministic:
                again = evaluator()[0]
                if not (again == center_loss or abs(again - center_loss) <= 1e-5 * max(1.0, abs(center_loss))):
                    raise SharpscopeError(
                        f"two evaluations of the same weights gave different losses ({center_loss!r} vs {again!r}): "
                        "the model or data is stochastic in eval mode (dropout in a custom module, noise layers, "
                        "augmentation); make evaluation deterministic or pass check_deterministic=False"
                    )
            if previous is not None and previous.center_loss != center_loss and abs(
                previous.center_loss - center_loss
            ) > 1e-5 * max(1.0, abs(center_loss)):
                raise SharpscopeError(
                    f"the resumed surface's centre loss {previous.center_loss!r} differs from this model's "
                    f"{center_loss!r}: a different loss function? delete the resume file to start afresh"
                )

            flat_done = done.reshape(-1)
            pending = [k for k in range(npoints) if not flat_done[k]]
            if shard is not None:
                pending = [k for k in pending if k % shard[1] == shard[0]]
            if max_points is not None:
                pending = pending[:max_points]
            size = chunk_size or (xs.size if ys is not None else 10)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(pending), file=sys.stderr, desc=label or "landscape", unit="pt",
                           dynamic_ncols=True)
            computed = 0
            try:
                for start in range(0, len(pending), size):
                    chunk = pending[start: start + size]
                    results = []
                    for k in chunk:
                        if ys is None:
                            setter.set((xs[k],))
                        else:
                            setter.set((xs[k % xs.size], ys[k // xs.size]))
                        results.append(evaluator.point())
                        if bar is not None:
                            bar.update(1)
                    setter.restore()
                    idx = np.asarray(chunk)
                    chunk_loss, chunk_accuracy = evaluator.reduce(results)  # one host sync per chunk
                    loss.reshape(-1)[idx] = chunk_loss
                    accuracy.reshape(-1)[idx] = chunk_accuracy
                    done.reshape(-1)[idx] = True
                    computed += len(chunk)
                    partial = _build(xs, ys, loss, accuracy, done, center_loss, center_accuracy, evaluator,
                                     metadata, started, computed)
                    if checkpoint_path is not None:
                        partial.save(checkpoint_path)
                    if on_chunk is not None:
                        on_chunk(ChunkDone(partial, len(chunk), int(done.sum())))
            finally:
                if bar is not None:
                    bar.close()
    finally:
        setter.restore()
        model.train(was_training)
    return _build(xs, ys, loss, accuracy, done, center_loss, center_accuracy, evaluator, metadata, started, computed)


def _build(xs, ys, loss, accuracy, done, center_loss, center_accuracy, evaluator, metadata, started, computed):
    elapsed = time.perf_counter() - started
    meta = {
        **metadata,
        "points_computed_this_run": computed,
        "evaluations_this_run": evaluator.calls,
        "seconds_this_run": elapsed,
    }
    return Surface(
        xs=xs, ys=ys, loss=loss.copy(), accuracy=accuracy.copy(), done=done.copy(), center_loss=center_loss,
        center_accuracy=center_accuracy, num_samples=evaluator.num_samples, metadata=meta,
    )

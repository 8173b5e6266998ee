"""Directions in weight space along which loss landscapes are cut (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets", NeurIPS, section 4).

A :class:`Direction` is one tensor per model tensor, keyed by name (``model.named_parameters()`` names, and
``model.named_buffers()`` names for directions that also move BatchNorm statistics, such as interpolation between
checkpoints). A grid point ``(a, b)`` of a surface is the model with every named tensor set to
``w0 + a * d1 + b * d2``; tensors a direction does not name are left as they are.

Random directions follow the paper's recipe (section 4, "filter normalization"), which is the default here,
unlike the CLI defaults of the paper's own code (reference/landscape.md section 1.1):

1. one standard Gaussian tensor per trainable parameter, drawn in ``model.named_parameters()`` order from a
   ``torch.Generator`` on the CPU seeded with ``seed`` (so the draw is the same on every device); for a plane
   the second direction is drawn after the first from the same generator, so ``d1`` of a 2-D surface equals the
   1-D direction of the same seed;
2. every tensor with ``dim() > 1`` is rescaled per filter, a slice along dim 0 (a conv output channel
   ``(in, kh, kw)``, a Linear output row): ``d_f <- d_f * ||w_f|| / (||d_f|| + 1e-10)`` (Frobenius norms), so
   coordinate 1 moves every filter by a vector as long as the filter itself (``norm="filter"``); or per tensor
   ``d <- d * ||w|| / (||d|| + 1e-10)`` (``norm="layer"``); or left raw (``norm="none"``);
3. tensors with ``dim() <= 1`` (biases, BatchNorm gamma/beta) get a zero direction (``ignore_bias_bn=True``, the
   paper's ``biasbn``). With ``ignore_bias_bn=False`` they get their own Gaussian draw, normalised *as a whole*
   for both ``filter`` and ``layer`` (``||d|| = ||w||``): a bias has one scalar per filter, and per-element
   normalisation would make ``|d_i| = |w_i|`` (a direction that is ``+-w`` itself, the loss-landscapes 3.0.6
   behaviour criticised in its issue #3). The paper's code instead sets ``d = w`` for them; we do not.

Comparable directions for two models: the Gaussian draw depends only on the seed and the parameter names and
shapes, so ``random_directions(model_a, seed=s)`` and ``random_directions(model_b, seed=s)`` use the same draw,
each normalised to its own model's weights (the filter-normalised directions themselves differ because the
weights differ, which is the point of filter normalisation: scale-invariant comparisons, paper section 4).
The draw itself can be saved (``save_directions(path, gaussian_draw(model, seed=s))``) and normalised against any
model of the same architecture later (``normalize_draw(other, load_directions(path))``), which is what ``sharpscope
landscape --directions-from`` does with the ``directions.pt`` of an earlier run. Alternatively save the directions
of one model (:meth:`Direction.save`) and load them for the other, which reuses the *normalised* tensors (only
meaningful when both models have similar filter norms).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError, unknown_name_error
from sharpscope.io import save_torch, to_json, write_npz

NORMS = ("filter", "layer", "none")
_EPS = 1e-10  # the paper code's guard against a zero direction norm (net_plotter.py l.112)
_META_KEY = "__direction_meta__"


@dataclass(frozen=True)
class Direction:
    """One direction in weight space: a tensor per named model tensor.

    Frozen: the mapping is never reassigned; treat the tensors as read-only (operations return new objects).
    """

    tensors: dict[str, Tensor]  # name (as in named_parameters / named_buffers) -> tensor of that tensor's shape
    kind: str = "custom"  # how it was made: random, draw (raw, unnormalised), interpolate, plane, pca, hessian, custom
    norm: str = "none"  # normalisation applied: filter, layer or none (random directions)
    seed: int | None = None  # generator seed of a random direction
    ignore_bias_bn: bool = True  # whether dim <= 1 tensors were given a zero direction (random directions)
    info: dict[str, Any] = field(default_factory=dict)  # extra JSON-able facts (eigenvalue, explained variance...)

    @property
    def names(self) -> list[str]:
        """Tensor names, in order."""
        return list(self.tensors)

    def numel(self) -> int:
        """Total number of entries."""
        return sum(t.numel() for t in self.tensors.values())

    def norm_value(self) -> float:
        """Euclidean norm over all tensors (float64 accumulation)."""
        return math.sqrt(sum(float(t.double().square().sum()) for t in self.tensors.values()))

    def dot(self, other: Direction) -> float:
        """Inner product with ``other`` over the names both hold (float64 accumulation)."""
        return sum(
            float((t.double() * other.tensors[n].double().to(t.device)).sum())
            for n, t in self.tensors.items()
            if n in other.tensors
        )

    def cosine(self, other: Direction) -> float:
        """Cosine of the angle to ``other`` (nan if either is zero)."""
        denom = self.norm_value() * other.norm_value()
        return self.dot(other) / denom if denom > 0 else float("nan")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Direction:
        """A copy with every tensor moved/cast (floating tensors only are cast)."""
        tensors = {
            n: t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
            for n, t in self.tensors.items()
        }
        return replace(self, tensors=tensors)

    def flatten(self, names: Sequence[str] | None = None) -> Tensor:
        """Concatenate the tensors (in ``names`` order, default: own order) into one 1-D tensor."""
        names = self.names if names is None else list(names)
        return torch.cat([self.tensors[n].reshape(-1) for n in names]) if names else torch.zeros(0)

    def fingerprint(self) -> str:
        """SHA-256 of the names, shapes and float32 contents: identifies the direction in resume files."""
        h = hashlib.sha256()
        for n, t in self.tensors.items():
            h.update(f"{n}:{tuple(t.shape)};".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def metadata(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {
            "kind": self.kind,
            "norm": self.norm,
            "seed": self.seed,
            "ignore_bias_bn": self.ignore_bias_bn,
            "num_tensors": len(self.tensors),
            "numel": self.numel(),
            "norm_value": self.norm_value(),
            "info": dict(self.info),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``.npz`` (numpy alone can read it; metadata as JSON under ``__direction_meta__``)
        or ``.pt`` (a dict loadable with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        meta = {k: v for k, v in self.metadata().items() if k not in ("num_tensors", "numel", "norm_value")}
        if path.suffix == ".npz":
            arrays = {n: t.detach().cpu().numpy() for n, t in self.tensors.items()}
            if _META_KEY in arrays:
                raise SharpscopeError(f"a tensor is named {_META_KEY!r}, which .npz direction files reserve")
            return write_npz(path, **arrays, **{_META_KEY: np.array(json.dumps(meta))})
        if path.suffix == ".pt":
            return save_torch({"meta": meta, "tensors": {n: t.detach().cpu() for n, t in self.tensors.items()}}, path)
        raise SharpscopeError(f"direction file {str(path)!r}: expected a .npz or .pt suffix, got {path.suffix!r}")


def load_direction(path: str | os.PathLike) -> Direction:
    """Read a direction written by :meth:`Direction.save` (``.npz`` or ``.pt``)."""
    path = Path(path)
    if not path.exists():
        raise SharpscopeError(f"direction file {str(path)!r} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if _META_KEY not in data.files:
                raise SharpscopeError(f"{str(path)!r} is not a sharpscope direction file (no {_META_KEY} entry)")
            meta = json.loads(str(data[_META_KEY]))
            tensors = {n: torch.from_numpy(data[n].copy()) for n in data.files if n != _META_KEY}
    elif path.suffix == ".pt":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "tensors" not in payload:
            raise SharpscopeError(f"{str(path)!r} is not a sharpscope direction file (no 'tensors' entry)")
        meta, tensors = payload.get("meta", {}), dict(payload["tensors"])
    else:
        raise SharpscopeError(f"direction file {str(path)!r}: expected a .npz or .pt suffix, got {path.suffix!r}")
    return _direction_from(meta, tensors)


_SET_FORMAT = "sharpscope.directions"  # the "format" entry of a file of several directions
_SET_META_KEY = "__directions_meta__"


def save_directions(
    path: str | os.PathLike, directions: Sequence[Direction], *, about: Mapping[str, Any] | None = None
) -> Path:
    """Write the directions of one cut (``(d1,)`` or ``(d1, d2)``) to one file, atomically: ``.pt`` (a dict
    loadable with ``torch.load(weights_only=True)``: ``format``, ``about``, ``directions``: a list of ``{"meta",
    "tensors"}``) or ``.npz`` (numpy alone: tensor ``name`` of direction ``i`` under ``"i/name"``, the metadata as
    JSON under ``__directions_meta__``; float32/float64 tensors only). ``about``: JSON-able facts about how the
    directions were made (provenance), stored, not read back by :func:`load_directions`."""
    path = Path(path)
    directions = tuple(directions)
    if not directions or not all(isinstance(d, Direction) for d in directions):
        raise SharpscopeError("save_directions: expected a non-empty sequence of Direction objects")
    # plain JSON types only (torch.__version__ is a str subclass that weights_only loading refuses)
    metas = json.loads(to_json([{k: v for k, v in d.metadata().items() if k not in ("num_tensors", "numel",
                                                                                    "norm_value")}
                                for d in directions]))
    header = {"format": _SET_FORMAT, "version": 1, "about": json.loads(to_json(dict(about or {})))}
    if path.suffix == ".pt":
        return save_torch({**header, "directions": [
            {"meta": meta, "tensors": {n: t.detach().cpu() for n, t in d.tensors.items()}}
            for meta, d in zip(metas, directions)]}, path)
    if path.suffix == ".npz":
        arrays = {f"{i}/{n}": t.detach().cpu().numpy() for i, d in enumerate(directions) for n, t in d.tensors.items()}
        return write_npz(path, **arrays, **{_SET_META_KEY: np.array(json.dumps({**header, "directions": metas}))})
    raise SharpscopeError(f"directions file {str(path)!r}: expected a .pt or .npz suffix, got {path.suffix!r}")


def load_directions(path: str | os.PathLike) -> tuple[Direction, ...]:
    """Read the directions written by :func:`save_directions` (or the single direction of a
    :meth:`Direction.save` file, as a 1-tuple), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise SharpscopeError(f"directions file {str(path)!r} does not exist")
    if path.suffix not in (".pt", ".npz"):
        raise SharpscopeError(f"directions file {str(path)!r}: expected a .pt or .npz suffix, got {path.suffix!r}")
    try:
        if path.suffix == ".pt":
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(payload, dict) and payload.get("format") == _SET_FORMAT:
                entries = [(e.get("meta", {}), dict(e["tensors"])) for e in payload["directions"]]
                return tuple(_direction_from(meta, tensors) for meta, tensors in entries)
        else:
            with np.load(path, allow_pickle=False) as data:
                if _SET_META_KEY in data.files:
                    metas = json.loads(str(data[_SET_META_KEY]))["directions"]
                    tensors: list[dict[str, Tensor]] = [{} for _ in metas]
                    for key in data.files:
                        if key != _SET_META_KEY:
                            index, name = key.split("/", 1)
                            tensors[int(index)][name] = torch.from_numpy(data[key].copy())
                    return tuple(_direction_from(meta, t) for meta, t in zip(metas, tensors))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise SharpscopeError(f"directions file {str(path)!r} cannot be read ({exc})") from None
    return (load_direction(path),)


def _direction_from(meta: Mapping[str, Any], tensors: dict[str, Tensor]) -> Direction:
    return Direction(
        tensors=tensors,
        kind=meta.get("kind", "custom"),
        norm=meta.get("norm", "none"),
        seed=meta.get("seed"),
        ignore_bias_bn=meta.get("ignore_bias_bn", True),
        info=dict(meta.get("info", {})),
    )


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` for the parameters with ``requires_grad``, in ``model.named_parameters()`` order
    (the order of ``[p for p in model.parameters() if p.requires_grad]``; shared parameters appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def float_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``{name: buffer}`` for floating-point buffers (BatchNorm running mean/var; not ``num_batches_tracked``)."""
    return {n: b for n, b in model.named_buffers() if b is not None and b.is_floating_point()}


def normalize_direction(direction: Tensor, weight: Tensor, norm: str) -> Tensor:
    """Rescale one direction tensor to its weight (a new tensor; Li et al. 2018, section 4).

    ``filter``: for ``dim() > 1``, every slice along dim 0 gets ``||d_f|| = ||w_f||`` (``d_f * ||w_f|| / (||d_f||
    + 1e-10)``); tensors with ``dim() <= 1`` are normalised as a whole. ``layer``: ``||d|| = ||w||`` for the whole
    tensor. ``none``: unchanged copy.
    """
    if norm not in NORMS:
        raise unknown_name_error("direction normalization", norm, NORMS)
    d = direction.detach().clone()
    if norm == "none":
        return d
    w = weight.detach().to(d.dtype)
    if norm == "filter" and d.dim() > 1:
        d_norms = d.reshape(d.shape[0], -1).norm(dim=1)
        w_norms = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = (w_norms / (d_norms + _EPS)).reshape((-1,) + (1,) * (d.dim() - 1))
        return d * scale
    return d * (w.norm() / (d.norm() + _EPS))


def gaussian_draw(model: nn.Module, *, dim: int = 2, seed: int = 0) -> tuple[Direction, ...]:
    """The raw standard Gaussian draw behind :func:`random_directions`, before any normalisation: ``dim`` (1 or 2)
    directions of ``kind="draw"`` with one float32 CPU tensor per trainable parameter (``model.named_parameters()``
    order), drawn from a CPU ``torch.Generator`` seeded with ``seed``; direction ``i`` is drawn after direction
    ``i - 1``.

    The draw depends only on the seed and the parameter names and shapes, not on the weights: save it
    (:func:`save_directions`) and :func:`normalize_draw` it against any model of the same architecture to cut
    that model along the comparable direction (the filter-normalised directions themselves differ per model).
    """
    if dim not in (1, 2):
        raise SharpscopeError(f"random directions: expected dim 1 or 2, got {dim}")
    params = trainable_parameters(model)
    if not params:
        raise SharpscopeError("the model has no trainable parameters (requires_grad=True); nothing to perturb")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return tuple(
        Direction({name: torch.randn(p.shape, generator=generator, dtype=torch.float32) for name, p in params.items()},
                  kind="draw", norm="none", seed=int(seed), ignore_bias_bn=False, info={"index": index})
        for index in range(dim)
    )


def normalize_draw(
    model: nn.Module, draw: Sequence[Direction], *, norm: str = "filter", ignore_bias_bn: bool = True
) -> tuple[Direction, ...]:
    """Random directions for ``model`` from a raw draw (:func:`gaussian_draw`, or one loaded from a file): every
    tensor moved to its parameter's device and dtype, then normalised (:func:`normalize_direction`); tensors with
    ``dim() <= 1`` become zero when ``ignore_bias_bn``. ``normalize_draw(model, gaussian_draw(model, dim=k,
    seed=s))`` is ``random_directions(model, dim=k, seed=s)`` exactly. The draw must name every trainable
    parameter of ``model`` with its shape (the same architecture)."""
    if norm not in NORMS:
        raise unknown_name_error("direction normalization", norm, NORMS)
    if len(draw) not in (1, 2):
        raise SharpscopeError(f"random directions: expected a draw of 1 or 2 directions, got {len(draw)}")
    params = trainable_parameters(model)
    directions: list[Direction] = []
    for index, raw in enumerate(draw):
        missing = [n for n in params if n not in raw.tensors]
        if missing:
            raise SharpscopeError(
                f"the direction draw has no tensor {missing[0]!r} ({len(missing)} of the model's {len(params)} "
                "parameters missing); it was drawn for another architecture: draw one for this model"
            )
        tensors: dict[str, Tensor] = {}
        for name, p in params.items():
            if tuple(raw.tensors[name].shape) != tuple(p.shape):
                raise SharpscopeError(
                    f"the direction draw's tensor {name!r} has shape {tuple(raw.tensors[name].shape)} but the "
                    f"model's has {tuple(p.shape)}; it was drawn for another architecture: draw one for this model"
                )
            d = raw.tensors[name].to(device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
            tensors[name] = torch.zeros_like(d) if p.dim() <= 1 and ignore_bias_bn else normalize_direction(d, p, norm)
        info: dict[str, Any] = {"index": index}
        direction = Direction(tensors, kind="random", norm=norm, seed=raw.seed, ignore_bias_bn=ignore_bias_bn)
        if directions:
            info["cosine_to_previous"] = direction.cosine(directions[-1])
        directions.append(replace(direction, info=info))
    return tuple(directions)


def random_directions(
    model: nn.Module,
    *,
    dim: int = 2,
    seed: int = 0,
    norm: str = "filter",
    ignore_bias_bn: bool = True,
) -> tuple[Direction, ...]:
    """``dim`` (1 or 2) filter-normalised Gaussian directions for ``model`` (Li et al. 2018, section 4).

    For every trainable parameter (``model.named_parameters()`` order) a standard normal tensor is drawn from a CPU
    ``torch.Generator`` seeded with ``seed`` — for *every* parameter, ignored ones included, so the draw for a
    weight does not depend on ``ignore_bias_bn`` — then normalised (:func:`normalize_direction`); tensors with
    ``dim() <= 1`` become zero when ``ignore_bias_bn``. Direction ``i`` of ``dim`` is drawn after direction
    ``i - 1``. Directions are returned on the parameters' devices and dtypes. They are not orthogonalised (the
    paper's code does not either; in high dimension two Gaussian directions are nearly orthogonal, the cosine is
    recorded in ``info["cosine_to_previous"]``). The same as ``normalize_draw(model, gaussian_draw(model, dim=dim,
    seed=seed), norm=norm, ignore_bias_bn=ignore_bias_bn)``.
    """
    if dim not in (1, 2):
        raise SharpscopeError(f"random directions: expected dim 1 or 2, got {dim}")
    if norm not in NORMS:
        raise unknown_name_error("direction normalization", norm, NORMS)
    return normalize_draw(model, gaussian_draw(model, dim=dim, seed=seed), norm=norm, ignore_bias_bn=ignore_bias_bn)


def random_direction(
    model: nn.Module, *, seed: int = 0, norm: str = "filter", ignore_bias_bn: bool = True
) -> Direction:
    """The first direction of :func:`random_directions` (a 1-D cut)."""
    return random_directions(model, dim=1, seed=seed, norm=norm, ignore_bias_bn=ignore_bias_bn)[0]


def model_tensors(model: nn.Module, *, include_buffers: bool) -> dict[str, Tensor]:
    """Trainable parameters, plus floating-point buffers when ``include_buffers`` (names are unique)."""
    tensors = dict(trainable_parameters(model))
    if include_buffers:
        tensors.update(float_buffers(model))
    return tensors


def difference_direction(
    start: nn.Module | Mapping[str, Tensor],
    end: nn.Module | Mapping[str, Tensor],
    *,
    include_buffers: bool = True,
    names: Iterable[str] | None = None,
) -> Direction:
    """``end - start`` per named tensor: the direction of linear interpolation ``w(t) = w_start + t (w_end -
    w_start)`` (Goodfellow et al. 2015; Li et al. 2018 section 3). With ``include_buffers`` floating-point
    buffers (BatchNorm running mean and variance) are interpolated too, as the paper's code does with
    ``--dir_type states``. Integer buffers (``num_batches_tracked``) are never touched.

    ``start``/``end`` are models or ``{name: tensor}`` state dicts; the names come from ``start`` (a model's
    trainable parameters [+ float buffers]) unless ``names`` is given.
    """
    start_t = model_tensors(start, include_buffers=include_buffers) if isinstance(start, nn.Module) else dict(start)
    if isinstance(end, nn.Module):
        end_t = dict(end.named_parameters())
        end_t.update(dict(end.named_buffers()))
    else:
        end_t = dict(end)
    names = list(start_t) if names is None else list(names)
    missing = [n for n in names if n not in end_t]
    if missing:
        raise SharpscopeError(
            f"the two models differ: the second has no tensor {missing[0]!r} ({len(missing)} missing); "
            "interpolate between checkpoints of the same architecture"
        )
    tensors: dict[str, Tensor] = {}
    for n in names:
        a, b = start_t[n].detach(), end_t[n].detach()
        if a.shape != b.shape:
            raise SharpscopeError(
                f"the two models differ: tensor {n!r} has shape {tuple(a.shape)} vs {tuple(b.shape)}; "
                "interpolate between checkpoints of the same architecture"
            )
        if not a.is_floating_point():
            continue
        tensors[n] = b.to(device=a.device, dtype=a.dtype) - a
    return Direction(tensors, kind="interpolate", norm="none", ignore_bias_bn=False,
                     info={"include_buffers": include_buffers})


def directions_from_vectors(
    model: nn.Module,
    vectors: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    *,
    kind: str = "custom",
    infos: Sequence[dict[str, Any]] | None = None,
) -> tuple[Direction, ...]:
    """Unflatten flat vectors into directions over the model's trainable parameters.

    ``vectors`` is an ``(n, k)`` matrix (columns are vectors, as Lanczos eigenvectors are returned), or a
    sequence of ``k`` vectors of length ``n``; ``n`` must equal the number of entries of
    ``[p for p in model.parameters() if p.requires_grad]``, which is also the order of the entries (each
    parameter flattened row-major). Used for Hessian eigenvector directions.
    """
    params = trainable_parameters(model)
    n = sum(p.numel() for p in params.values())
    if isinstance(vectors, (Tensor, np.ndarray)):
        matrix = torch.as_tensor(vectors)
        if matrix.dim() == 1:
            matrix = matrix[:, None]
        if matrix.dim() != 2 or matrix.shape[0] != n:
            raise SharpscopeError(
                f"expected vectors as an (n, k) matrix with n = {n} (the model's trainable parameters), "
                f"got shape {tuple(matrix.shape)}"
            )
        columns = [matrix[:, j] for j in range(matrix.shape[1])]
    else:
        columns = [torch.as_tensor(v).reshape(-1) for v in vectors]
        bad = [tuple(c.shape) for c in columns if c.numel() != n]
        if bad:
            raise SharpscopeError(
                f"expected vectors of length {n} (the model's trainable parameters), got shape {bad[0]}"
            )
    infos = list(infos) if infos is not None else [{} for _ in columns]
    directions = []
    for column, info in zip(columns, infos):
        tensors, offset = {}, 0
        for name, p in params.items():
            chunk = column[offset: offset + p.numel()]
            tensors[name] = chunk.reshape(p.shape).to(device=p.device, dtype=p.dtype).clone()
            offset += p.numel()
        directions.append(Direction(tensors, kind=kind, norm="none", ignore_bias_bn=False, info=dict(info)))
    return tuple(directions)


def hessian_directions(
    model: nn.Module, loss_fn: Any, batches: Any, *, k: int = 2, which: str = "top", **lanczos_kwargs: Any
) -> tuple[Direction, ...]:
    """The ``k`` extreme Hessian eigenvectors (unit norm) as directions, via ``sharpscope.hessian``
    (``HessianOperator(model, loss_fn, batches)`` and ``lanczos_eigs(op, k, which=...)``). A cut along the top
    eigenvector shows the sharpest curvature (PyHessian tutorial, section 2.1). ``info`` holds each eigenvalue."""
    try:
        from sharpscope.hessian import HessianOperator, lanczos_eigs
    except ImportError as exc:
        raise SharpscopeError(
            f"Hessian directions need sharpscope.hessian, which could not be imported ({exc}); "
            "use random, interpolate or pca directions"
        ) from None
    op = HessianOperator(model, loss_fn, batches)
    result = lanczos_eigs(op, k, which=which, **lanczos_kwargs)
    vectors = torch.as_tensor(result.eigenvectors)
    values = [float(v) for v in torch.as_tensor(result.eigenvalues).reshape(-1).tolist()]
    infos = [{"eigenvalue": v, "index": i, "which": which} for i, v in enumerate(values)]
    return directions_from_vectors(model, vectors[:, :k], kind="hessian", infos=infos[:k])


def check_directions(model: nn.Module, directions: Sequence[Direction]) -> dict[str, Tensor]:
    """Check that every name of every direction is a model tensor of the same shape; return ``{name: tensor}``
    of the model tensors the directions move (parameters and buffers)."""
    if len(directions) not in (1, 2):
        raise SharpscopeError(f"expected one direction (a 1-D curve) or two (a 2-D surface), got {len(directions)}")
    available = dict(model.named_parameters())
    available.update(dict(model.named_buffers()))
    targets: dict[str, Tensor] = {}
    for i, direction in enumerate(directions):
        if not isinstance(direction, Direction):
            raise SharpscopeError(f"direction {i}: expected a Direction, got {type(direction).__name__}")
        for name, d in direction.tensors.items():
            if name not in available:
                close = ", ".join(list(available)[:3])
                raise SharpscopeError(
                    f"direction {i} names tensor {name!r}, which the model does not have (model tensors: {close}, "
                    "...); make directions for this model (random_directions(model)) or load matching ones"
                )
            t = available[name]
            if tuple(d.shape) != tuple(t.shape):
                raise SharpscopeError(
                    f"direction {i}: tensor {name!r} has shape {tuple(d.shape)} but the model's has "
                    f"{tuple(t.shape)}; the directions were made for another architecture"
                )
            if not t.is_floating_point():
                raise SharpscopeError(f"direction {i}: tensor {name!r} is not floating point and cannot be moved")
            targets[name] = t
    return targets

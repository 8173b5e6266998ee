"""The shared machinery of the sharpness measures: evaluation data cut into chunks of ``m`` samples, and the
objective ``L_B(w + delta)`` evaluated for a stack of chunks ``B`` and perturbations ``delta`` at once.

Chunks are vectorised with :func:`torch.func.vmap` over :func:`torch.func.functional_call`: ``G`` chunks with
``G`` perturbations run as one batched forward (and backward), which for ``m = 1..8`` is ~8x faster on CPU
than a Python loop over chunks (measured on a small ConvNet, 512 chunks of 4 samples). Models are evaluated in
eval mode (BatchNorm uses its running statistics), so the per-chunk results do not depend on how chunks are
grouped. A plain loop over chunks is kept as the fallback for models whose forward ``vmap`` cannot batch, and
as the serial reference the vectorised path is tested against.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from sharpscope.errors import SharpscopeError
from sharpscope.hessian.operator import select_parameters

__all__ = [
    "ChunkedObjective", "stack_data", "make_chunks", "chunk_group_size", "seeded_draws", "mean_and_stderr",
    "MAX_GROUP_ELEMENTS",
]

#: At most this many perturbation entries (chunks in a group x perturbed parameters) per group: the ascent keeps
#: ~6 such stacks (iterate, previous iterate, best, gradient, best gradient, direction), i.e. ~400 MB in float32.
MAX_GROUP_ELEMENTS = 1 << 24

_log = logging.getLogger(__name__)

Data = Any  # (x, y) tensors, or an iterable of (x, y) batches such as sharpscope.data.EvalBatches


def stack_data(data: Data, *, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """All samples of ``data`` as two tensors ``(x (N, ...), y (N, ...))`` on ``device``.

    ``data`` is either a pair of tensors ``(x, y)`` with the samples along dim 0, or an iterable of such pairs
    (``sharpscope.data.EvalBatches``, a list of batches), concatenated in order. Floating-point inputs are cast
    to ``dtype`` (the model's), labels keep theirs.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        batches: Iterable[Any] = [tuple(data)]
    else:
        batches = data
    xs, ys = [], []
    try:
        for batch in batches:
            x, y = batch
            xs.append(x)
            ys.append(y)
    except (TypeError, ValueError):
        raise SharpscopeError(
            f"data must be (x, y) tensors or an iterable of (x, y) batches (e.g. sharpscope.data.EvalBatches), "
            f"got {type(data).__name__}; wrap your data as (inputs, labels) or EvalBatches.from_tensors(x, y, ...)"
        ) from None
    if not xs or not all(isinstance(t, Tensor) and t.dim() > 0 for t in xs + ys):
        raise SharpscopeError(
            "data holds no samples (or a batch is not a pair of tensors with the samples along dim 0); "
            "pass (x, y) tensors or a non-empty EvalBatches"
        )
    x = torch.cat([t.to(device) for t in xs])
    y = torch.cat([t.to(device) for t in ys])
    if x.shape[0] != y.shape[0]:
        raise SharpscopeError(f"data has {x.shape[0]} inputs but {y.shape[0]} labels; they must match")
    if x.is_floating_point():
        x = x.to(dtype)
    return x, y


def make_chunks(
    x: Tensor, y: Tensor, *, m: int | None, shuffle: bool, seed: int, max_chunks: int | None
) -> tuple[Tensor, Tensor]:
    """Partition ``N`` samples into ``C = N // m`` disjoint chunks of ``m``: ``(C, m, ...)`` views.

    With ``shuffle`` the samples are first permuted by a CPU generator seeded with ``seed`` (the chunks do not
    follow the dataset's order, which may be sorted by class); otherwise chunk ``j`` is samples
    ``j*m .. (j+1)*m - 1``. The last ``N mod m`` samples are left out. ``max_chunks`` keeps the first chunks
    only. ``m=None`` means one chunk of all ``N`` samples (full-batch).
    """
    n = x.shape[0]
    if m is None:
        m = n
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise SharpscopeError(f"m must be a positive integer number of samples per chunk, got {m!r}")
    if m > n:
        raise SharpscopeError(
            f"m={m} is larger than the evaluation set ({n} samples); use m <= {n} or evaluate on more samples"
        )
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
        raise SharpscopeError(f"max_chunks must be a positive integer or None, got {max_chunks!r}")
    num_chunks = n // m if max_chunks is None else min(n // m, max_chunks)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: num_chunks * m].to(x.device)
        x, y = x[order], y[order]
    else:
        x, y = x[: num_chunks * m], y[: num_chunks * m]
    return x.reshape(num_chunks, m, *x.shape[1:]), y.reshape(num_chunks, m, *y.shape[1:])


def chunk_group_size(m: int, num_params: int, *, batch_size: int, copies: int = 1) -> int:
    """How many chunks (or perturbations) to evaluate in one vectorised call.

    At most ``batch_size`` samples per forward pass (``G * m <= batch_size`` when ``m <= batch_size``) and at
    most :data:`MAX_GROUP_ELEMENTS` perturbation entries per stack; at least one chunk.
    """
    by_samples = max(1, batch_size // m)
    by_memory = max(1, MAX_GROUP_ELEMENTS // max(1, num_params * copies))
    return max(1, min(by_samples, by_memory))


def _as_tensor_objective(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise SharpscopeError(
            f"loss_fn must return a 0-d mean over the batch, got {shape}; use reduction='mean' "
            "(e.g. nn.CrossEntropyLoss())"
        )
    return value


class ChunkedObjective:
    """``f(delta, B) = objective(model_{w + delta}(x_B), y_B)`` for stacks of chunks, with gradients in ``delta``.

    Args:
        model: the network; its current parameters are the centre ``w`` (read once, detached). Call inside
            ``eval_mode(model)``: the mode is whatever the model is in when the objective is evaluated.
        objective: ``objective(outputs, labels) -> 0-d`` mean over the samples (a loss such as
            ``nn.CrossEntropyLoss()``, or an accuracy).
        params: the perturbed parameters: ``None`` for all with ``requires_grad``, or names / parameter tensors
            (:func:`sharpscope.hessian.operator.select_parameters`). The others stay at their values.
        batch_size: at most this many samples per forward pass (memory only; results do not depend on it
            beyond float rounding): a chunk of ``m > batch_size`` samples is split into pieces whose values
            and gradients are combined sample-weighted.
        vectorize: ``True`` uses ``vmap`` over chunks, ``False`` a Python loop over chunks, ``None`` tries
            ``vmap`` and falls back to the loop (with a warning) if the model cannot be vmapped.

    Perturbations are lists with one tensor ``(G, *p.shape)`` per perturbed parameter ``p``; data are
    ``x (G, m, ...)``, ``y (G, m, ...)`` (one chunk per perturbation) or, with ``shared=True``,
    ``x (m, ...)``, ``y (m, ...)`` (the same samples for every perturbation).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable[[Any, Tensor], Tensor],
        *,
        params: Sequence[str | Tensor] | None = None,
        batch_size: int = 256,
        vectorize: bool | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SharpscopeError(f"batch_size must be a positive integer (samples per forward), got {batch_size!r}")
        self.model = model
        self.objective = objective
        self.names, tensors = select_parameters(model, params)
        self.params = [p.detach() for p in tensors]
        chosen = set(self.names)
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self.fixed.update(dict(model.named_buffers()))
        self.num_params = sum(p.numel() for p in self.params)
        self.batch_size = batch_size
        self.vectorize = vectorize
        self._map_vectorized: bool | None = None
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise SharpscopeError(
                f"the perturbed parameters mix dtypes {sorted(map(str, dtypes))} / devices "
                f"{sorted(map(str, devices))}; move the model to one dtype and device (model.to(...))"
            )
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    # ------------------------------------------------------------------------------------------------ basics
    def zeros(self, count: int) -> list[Tensor]:
        """A stack of ``count`` zero perturbations."""
        return [torch.zeros((count, *p.shape), dtype=self.dtype, device=self.device) for p in self.params]

    def _single(self, delta: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        state = {name: p + d for name, p, d in zip(self.names, self.params, delta)}
        state.update(self.fixed)
        return _as_tensor_objective(self.objective(functional_call(self.model, state, (x,)), y))

    def _pieces(self, x: Tensor, y: Tensor, *, shared: bool, group: int) -> list[tuple[Tensor, Tensor, float]]:
        dim = 0 if shared else 1
        m = x.shape[dim]
        size = max(1, self.batch_size // max(1, group))
        if m <= size:
            return [(x, y, 1.0)]
        return [(xs, ys, xs.shape[dim] / m) for xs, ys in zip(x.split(size, dim), y.split(size, dim))]

    # ------------------------------------------------------------------------------------------- evaluation
    def value(self, delta: Sequence[Tensor], x: Tensor, y: Tensor, *, shared: bool = False) -> Tensor:
        """``(G,)`` objective values at ``w + delta[g]`` on chunk ``g`` (or on the shared samples)."""
        return self._run(delta, x, y, shared=shared, grad=False)[0]

    def value_and_grad(
        self, delta: Sequence[Tensor], x: Tensor, y: Tensor, *, shared: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """``(G,)`` values and their gradients with respect to ``delta`` (a list of ``(G, *p.shape)``)."""
        return self._run(delta, x, y, shared=shared, grad=True)

    def _run(self, delta: Sequence[Tensor], x: Tensor, y: Tensor, *, shared: bool, grad: bool):
        if self.vectorize is None:
            try:
                out = self._vmapped(delta, x, y, shared=shared, grad=grad)
            except SharpscopeError:
                raise
            except (RuntimeError, NotImplementedError) as exc:
                warnings.warn(
                    f"torch.func.vmap cannot batch this model's forward ({str(exc).splitlines()[0][:200]}); "
                    "evaluating chunks one at a time instead (slower). Pass vectorize=False to silence this.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.vectorize = False
                return self._looped(delta, x, y, shared=shared, grad=grad)
            self.vectorize = True
            return out
        if self.vectorize:
            return self._vmapped(delta, x, y, shared=shared, grad=grad)
        return self._looped(delta, x, y, shared=shared, grad=grad)

    def _vmapped(self, delta: Sequence[Tensor], x: Tensor, y: Tensor, *, shared: bool, grad: bool):
        group = delta[0].shape[0]
        data_dim = None if shared else 0
        values = torch.zeros(group, dtype=self.dtype, device=self.device)
        grads = [torch.zeros_like(d) for d in delta] if grad else None
        delta = list(delta)
        for xs, ys, weight in self._pieces(x, y, shared=shared, group=group):
            if grad:
                g, v = vmap(grad_and_value(self._single), in_dims=(0, data_dim, data_dim))(delta, xs, ys)
                for total, part in zip(grads, g):
                    total.add_(part, alpha=weight)
            else:
                with torch.no_grad():
                    v = vmap(self._single, in_dims=(0, data_dim, data_dim))(delta, xs, ys)
            values.add_(v.detach().to(self.dtype), alpha=weight)
        return values, grads

    def _looped(self, delta: Sequence[Tensor], x: Tensor, y: Tensor, *, shared: bool, grad: bool):
        """The serial reference: one chunk at a time with plain autograd."""
        group = delta[0].shape[0]
        values = torch.zeros(group, dtype=self.dtype, device=self.device)
        grads = [torch.zeros_like(d) for d in delta] if grad else None
        for g in range(group):
            xg, yg = (x, y) if shared else (x[g], y[g])
            for xs, ys, weight in self._pieces(xg, yg, shared=True, group=1):
                if grad:
                    leaf = [d[g].detach().requires_grad_(True) for d in delta]
                    with torch.enable_grad():
                        v = self._single(leaf, xs, ys)
                        parts = torch.autograd.grad(v, leaf, allow_unused=True)
                    for total, part in zip(grads, parts):
                        if part is not None:
                            total[g].add_(part, alpha=weight)
                else:
                    with torch.no_grad():
                        v = self._single([d[g] for d in delta], xs, ys)
                values[g] += v.detach().to(self.dtype) * weight
        return values, grads

    def per_chunk(self, fn: Callable[[list[Tensor]], list[Tensor]], stack: Sequence[Tensor]) -> list[Tensor]:
        """Apply ``fn`` (parameter-shaped tensors in, parameter-shaped tensors out) to every chunk of a stack.

        Vectorised with ``vmap`` when ``fn`` allows it (tried once), otherwise a loop over the ``G`` chunks:
        ``fn`` is cheap next to a forward/backward pass (SAM's perturbation uses ``torch._foreach_*`` kernels,
        which have no ``vmap`` batching rule), so the loop costs little and needs no warning.
        """
        if self.vectorize is not False and self._map_vectorized is not False:
            try:
                out = list(vmap(fn)(list(stack)))
            except (RuntimeError, NotImplementedError) as exc:
                _log.debug("vmap cannot batch %s (%s); looping over chunks", fn, str(exc).splitlines()[0])
                self._map_vectorized = False
            else:
                self._map_vectorized: bool | None = None
                return out
        results = [fn([t[g] for t in stack]) for g in range(stack[0].shape[0])]
        return [torch.stack(parts) for parts in zip(*results)]

    # ------------------------------------------------------------------------------------------ determinism
    def check_deterministic(self, x: Tensor, y: Tensor) -> None:
        """Refuse a model whose objective is not a fixed function of the weights (STYLE.md 5).

        Evaluates the first chunk twice at ``delta = 0``; dropout or other randomness in the forward changes
        the value by far more than the ``256 eps`` relative room left for non-deterministic GPU reductions.
        """
        delta = self.zeros(1)
        with torch.no_grad():
            first = self._single([d[0] for d in delta], x[0], y[0]).detach()
            second = self._single([d[0] for d in delta], x[0], y[0]).detach()
        tolerance = 256 * torch.finfo(self.dtype).eps * max(float(first.abs()), 1e-30)
        if not float((first - second).abs()) <= tolerance:
            raise SharpscopeError(
                f"the loss is not deterministic: two evaluations of the same chunk gave {float(first):.10g} and "
                f"{float(second):.10g}. Likely cause: randomness inside the model's forward (dropout that ignores "
                "eval mode, noise layers). Sharpness needs a fixed function of the weights; pass "
                "check_deterministic=False if this is intended."
            )


def seeded_draws(
    objective: ChunkedObjective, indices: Sequence[int], *, seed: int, kind: str = "normal"
) -> list[Tensor]:
    """Random perturbation-shaped draws ``xi (len(indices), *p.shape)``, one independent stream per index.

    Draw ``i`` is generated from its own seed (derived from ``(seed, i)``), so it does not depend on how the
    draws are grouped into vectorised calls (``batch_size``, model size) or on the device's generator state.
    ``kind``: ``"normal"`` (standard Gaussian) or ``"uniform"`` (on ``[-1, 1]``).
    """
    generator = torch.Generator(device=objective.device)
    flat = torch.empty((len(indices), objective.num_params), dtype=objective.dtype, device=objective.device)
    for row, index in enumerate(indices):
        generator.manual_seed((seed * 0x9E3779B97F4A7C15 + index) % (1 << 63))
        if kind == "normal":
            flat[row].normal_(generator=generator)
        else:
            flat[row].uniform_(-1.0, 1.0, generator=generator)
    sizes = [p.numel() for p in objective.params]
    return [part.reshape(len(indices), *p.shape) for part, p in zip(flat.split(sizes, dim=1), objective.params)]


def gather_blocks(parts: tuple[Tensor, ...], shard: tuple[int, int] | None) -> tuple[Tensor, ...]:
    """Per-chunk tensors of this rank's block of chunks (:func:`sharpscope.distributed.block`), concatenated over
    the ranks of ``shard`` in rank order, on every rank: what one process computing every chunk would hold."""
    if shard is None:
        return parts
    from sharpscope import distributed

    device = parts[0].device
    gathered = distributed.all_gather(tuple(t.detach().cpu() for t in parts))
    return tuple(torch.cat([ranks[i] for ranks in gathered]).to(device) for i in range(len(parts)))


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean of ``values (C,)`` and its standard error ``std(ddof=1) / sqrt(C)`` (NaN for ``C = 1``)."""
    values = values.detach().to("cpu", torch.float64)
    count = values.numel()
    mean = float(values.mean())
    stderr = float(values.std(correction=1)) / math.sqrt(count) if count > 1 else float("nan")
    return mean, stderr

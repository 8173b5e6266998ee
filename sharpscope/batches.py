"""The batch contract every analysis shares (Hessian, loss surfaces, sharpness, generalization gap).

A **batch** is a pair ``(inputs, targets)``; the model is called according to the type of ``inputs``:

* a tensor: ``model(inputs)``;
* a tuple or list of tensors: ``model(*inputs)``;
* a dict (any ``Mapping``): ``model(**inputs)`` when the keys bind to ``model.forward``'s parameters (checked with
  ``inspect.signature(model.forward).bind``), else ``model(inputs)`` when ``forward`` takes one positional argument
  (a model written as ``forward(self, batch)``); a dict that binds neither way is refused, naming both.

and the loss is ``loss_fn(model(...), targets)``, a 0-d batch mean (``nn.CrossEntropyLoss()``). ``targets`` may be
any structure the loss takes (a tensor, a tuple, a dict).

For anything else (attention masks, sequence losses, models that return dicts, Hugging Face style batches without a
``targets`` half) wrap the loss as :class:`BatchLoss`: ``BatchLoss(fn)`` with ``fn(model, batch) -> 0-d loss`` (the
``compute_loss(model, inputs)`` of Hugging Face's Trainer). The analyses then call ``fn(model, batch)`` with the batch
exactly as given (on the model's device); the batch may have any structure.

Structure rules (the same in every analysis, via :mod:`torch.utils._pytree`): every tensor of dimension >= 1 in a
batch holds the samples along dim 0; 0-d tensors and non-tensor leaves (``None``, numbers, strings) are constants
passed through unchanged. The number of samples of a batch (its weight in sample-weighted means) is the size of dim
0 of its first such tensor (``tree_leaves`` order: inputs before targets, dicts in insertion order). Moving to a
device, concatenating batches and cutting them into chunks of ``m`` samples (m-sharpness) map over those tensors.

Evaluation data must be fixed (STYLE.md 5): :func:`check_fixed_batches`, used by every analysis that reads batches
more than once or compares points, refuses a shuffling ``DataLoader`` and data whose first batch differs between two
passes, with one message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from sharpscope.errors import SharpscopeError

__all__ = [
    "BatchLoss", "batch_loss", "call_model", "check_fixed_batches", "model_arguments", "num_samples",
    "split_batch", "join_batch", "to_device", "unfused_attention",
]

_CONTRACT = (
    "a batch is (inputs, targets) with inputs a tensor (model(x)), a tuple/list of tensors (model(*inputs)) or a "
    "dict (model(**inputs) or model(inputs)); for any other structure wrap the loss as "
    "sharpscope.batches.BatchLoss(fn) with fn(model, batch) -> 0-d loss"
)


class BatchLoss:
    """A loss computed from the model and the whole batch: ``BatchLoss(fn)``, ``fn(model, batch) -> 0-d`` mean loss.

    The general hook of the batch contract (module docstring), like Hugging Face Trainer's ``compute_loss``: ``fn``
    calls the model itself, so masks, sequence losses and models returning dicts need no special support. Every
    analysis accepts it in place of ``loss_fn(outputs, targets)``. ``fn`` must be a pure function of the model's
    parameters and the batch (it is evaluated under ``torch.func.functional_call`` and ``vmap`` by the sharpness
    measures). Loss surfaces report no accuracy for it (the outputs are not seen); :func:`generalization_gap`
    still needs ``(inputs, targets)`` batches to count errors.

    >>> loss = BatchLoss(lambda model, batch: masked_ce(model(batch["ids"]), batch["labels"], batch["mask"]))
    """

    def __init__(self, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        if not callable(fn):
            raise SharpscopeError(f"BatchLoss expects a function fn(model, batch) -> loss, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.fn(model, batch)

    def __repr__(self) -> str:
        return f"BatchLoss({getattr(self.fn, '__name__', self.fn)!r})"


class _NoTargets:
    """Marks a :class:`BatchLoss` batch that is not a pair: the whole batch sits in the ``inputs`` half."""

    def __repr__(self) -> str:
        return "NO_TARGETS"


#: The ``targets`` half of a :class:`BatchLoss` batch that is not an ``(inputs, targets)`` pair.
NO_TARGETS = _NoTargets()


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a dict with keys {list(obj)[:5]}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def split_batch(batch: Any, loss_fn: Any = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch; a :class:`BatchLoss` batch that is no pair gives ``(batch, NO_TARGETS)``.

    Raises:
        SharpscopeError: a batch that is not a pair (without :class:`BatchLoss`).
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(loss_fn, BatchLoss):
        return batch, NO_TARGETS
    raise SharpscopeError(f"expected batches of (inputs, targets) pairs, got {_describe(batch)}: {_CONTRACT}")


def join_batch(inputs: Any, targets: Any) -> Any:
    """The inverse of :func:`split_batch`: the batch a :class:`BatchLoss` receives."""
    return inputs if targets is NO_TARGETS else (inputs, targets)


def _dict_call_style(model: Any, inputs: Mapping) -> str:
    """``"kwargs"`` (``model(**inputs)``) or ``"single"`` (``model(inputs)``), decided by binding the signature."""
    try:
        signature = inspect.signature(model.forward if isinstance(model, nn.Module) else model)
    except (TypeError, ValueError):  # no introspectable signature (a C function): keywords, the common case
        return "kwargs"
    try:
        signature.bind(**{str(k): v for k, v in inputs.items()})
        return "kwargs"
    except TypeError:
        pass
    try:
        signature.bind(inputs)
        return "single"
    except TypeError:
        raise SharpscopeError(
            f"the inputs dict with keys {list(inputs)} binds neither as model(**inputs) nor as model(inputs) to "
            f"{type(model).__name__}.forward{signature}; rename the keys after forward's parameters, or wrap the "
            "loss as sharpscope.batches.BatchLoss(fn) and call the model yourself"
        ) from None


def model_arguments(model: Any, inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with which ``model`` is called on ``inputs`` (module docstring)."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        if _dict_call_style(model, inputs) == "kwargs":
            return (), dict(inputs)
        return (inputs,), {}
    raise SharpscopeError(f"the inputs of a batch are {_describe(inputs)}: {_CONTRACT}")


def call_model(model: Any, inputs: Any) -> Any:
    """The model's outputs on ``inputs``: ``model(x)``, ``model(*inputs)``, ``model(**inputs)`` or ``model(inputs)``."""
    args, kwargs = model_arguments(model, inputs)
    return model(*args, **kwargs)


def batch_loss(model: Any, loss_fn: Any, batch: Any) -> tuple[Any, Any]:
    """``(outputs, loss)`` on one batch: ``loss_fn(model(inputs), targets)``, or ``(None, loss_fn(model, batch))``
    for a :class:`BatchLoss`. The loss is returned as computed (the callers check it is 0-d)."""
    if isinstance(loss_fn, BatchLoss):
        return None, loss_fn(model, batch)
    inputs, targets = split_batch(batch)
    outputs = call_model(model, inputs)
    return outputs, loss_fn(outputs, targets)


def _is_sample_tensor(leaf: Any) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() > 0


def sample_tensors(tree: Any) -> list[Tensor]:
    """The tensors of ``tree`` that hold samples along dim 0 (dimension >= 1), in ``tree_leaves`` order."""
    return [leaf for leaf in tree_leaves(tree) if _is_sample_tensor(leaf)]


def num_samples(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor of dimension >= 1 (inputs before targets).

    Raises:
        SharpscopeError: the batch holds no such tensor.
    """
    for leaf in tree_leaves(batch):
        if _is_sample_tensor(leaf):
            return int(leaf.shape[0])
    raise SharpscopeError(
        f"cannot tell the number of samples in a batch ({_describe(batch)}): it holds no tensor with the samples "
        f"along dim 0; {_CONTRACT}"
    )


def map_samples(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """``tree`` with ``fn`` applied to every tensor of dimension >= 1 (constants pass through)."""
    return tree_map(lambda leaf: fn(leaf) if _is_sample_tensor(leaf) else leaf, tree)


def to_device(tree: Any, device: torch.device | str, *, dtype: torch.dtype | None = None) -> Any:
    """Every tensor of ``tree`` on ``device`` (non-blocking); floating-point tensors cast to ``dtype`` if given."""
    def move(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor):
            return leaf
        if dtype is not None and leaf.is_floating_point():
            return leaf.to(device=device, dtype=dtype, non_blocking=True)
        return leaf.to(device, non_blocking=True)
    return tree_map(move, tree)


def check_sample_dims(tree: Any, count: int, what: str = "batch") -> None:
    """Refuse a tensor of dimension >= 1 whose dim 0 is not the ``count`` samples (needed to cut chunks)."""
    leaves, _ = tree_flatten(tree)
    for leaf in leaves:
        if _is_sample_tensor(leaf) and leaf.shape[0] != count:
            raise SharpscopeError(
                f"a {what} holds a tensor of shape {tuple(leaf.shape)} beside {count} samples: every tensor of "
                "dimension >= 1 must hold the samples along dim 0 (constants: 0-d tensors or non-tensors, or "
                "inside a BatchLoss closure)"
            )


def concat_batches(batches: Iterable[Any]) -> Any:
    """One batch holding the samples of all ``batches`` in order: their sample tensors concatenated along dim 0.

    Raises:
        SharpscopeError: batches of different structures, or constants that differ between batches.
    """
    flat, spec = [], None
    for batch in batches:
        leaves, this_spec = tree_flatten(batch)
        if spec is None:
            spec = this_spec
        elif this_spec != spec:
            raise SharpscopeError(f"the batches differ in structure: {spec} and {this_spec}; every batch must "
                                  "have the same nesting of tensors")
        flat.append(leaves)
    if not flat:
        raise SharpscopeError("data holds no samples: the batches are empty")
    joined = []
    for column in zip(*flat):
        first = column[0]
        if _is_sample_tensor(first):
            joined.append(torch.cat([t.to(first.device) for t in column]) if len(column) > 1 else first)
        else:
            same = all(_same_leaf(first, other) for other in column[1:])
            if not same:
                raise SharpscopeError(f"a constant of the batches (0-d tensor or non-tensor) differs between "
                                      f"batches: {first!r} vs another value; constants must be the same in every batch")
            joined.append(first)
    return tree_unflatten(joined, spec)


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(torch.equal(a.cpu(), b.cpu())))
    try:
        return bool(a is b or a == b)
    except Exception:  # noqa: BLE001 - an object whose == is not a bool (an array): compare by identity only
        return a is b


def same_batch(a: Any, b: Any) -> bool:
    """Whether two batches have the same structure and equal leaves (tensors by value, shape and dtype)."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(_same_leaf(x, y) for x, y in zip(leaves_a, leaves_b))


def _shuffling_loader(batches: Any) -> bool:
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(batches, DataLoader):
        return False
    samplers = [getattr(batches, "sampler", None), getattr(getattr(batches, "batch_sampler", None), "sampler", None)]
    return any(isinstance(s, RandomSampler) for s in samplers)


NOT_FIXED = (
    "the batches are not deterministic: {found}. Likely causes: a shuffling DataLoader, data augmentation, or a "
    "sampler. Use fixed evaluation batches (sharpscope.data.eval_batches / EvalBatches.from_tensors, a DataLoader "
    "with shuffle=False, or a list of (inputs, targets) tensors)."
)


def check_fixed_batches(batches: Any, *, opt_out: str) -> None:
    """Refuse evaluation data that is not the same on every pass (STYLE.md 5), with one message for every analysis.

    A ``DataLoader`` with a ``RandomSampler`` (``shuffle=True``) is refused outright; any other re-iterable is read
    twice up to its first batch, and the two must be equal (catches custom shuffling, augmentation). One-shot
    iterators (generators) are read once by the analyses, so they are fixed by construction and not checked.
    ``opt_out`` names the argument that turns the check off (appended to the message).
    """
    if _shuffling_loader(batches):
        found = "a DataLoader with shuffle=True (a RandomSampler) gives the samples in a new order on every pass"
    else:
        try:
            if iter(batches) is batches:
                return
            first, second = next(iter(batches), None), next(iter(batches), None)
        except TypeError:
            return  # not iterable: the caller's own validation explains it
        if same_batch(first, second):
            return
        found = "two passes gave a different first batch"
    raise SharpscopeError(NOT_FIXED.format(found=found) + f" If this is intended, pass {opt_out}.")


class unfused_attention:
    """Run attention through plain, twice-differentiable and ``vmap``-able ops for the block; restores the settings.

    Switches off ``nn.MultiheadAttention``'s fused fast path (``_native_multi_head_attention``: no ``vmap`` rule)
    and restricts ``F.scaled_dot_product_attention`` to its math backend: the fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``, what ``need_weights=False`` runs) has neither a ``vmap`` rule
    nor a double backward on torch 2.13, so Hessian-vector products through it raise. The math backend computes the
    same function with matmuls and a softmax.
    """

    def __enter__(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.kernel = sdpa_kernel([SDPBackend.MATH])
        self.kernel.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.kernel.__exit__(*exc)
        torch.backends.mha.set_fastpath_enabled(self.previous)

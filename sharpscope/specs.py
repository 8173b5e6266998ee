"""``NAME[:key=value,...]`` and ``package.module:factory[:key=value,...]`` specs: how a user names a registry
entry or their own code (a model, a dataset, a loss) on the command line, and how that code is imported.

A spec whose second ``:``-separated part is a Python identifier names a factory (``mynets:make_net:width=2``);
otherwise the first part is a registry name and the rest its arguments (``mlp:hidden=256``). Argument values
are read as int, float, true/false/none, else kept as strings.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from sharpscope.errors import UsageError


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` names user code (``package.module:factory[...]``) rather than a registry entry."""
    parts = spec.split(":")
    return len(parts) >= 2 and parts[1].isidentifier()


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"``/``"false"``/``"none"`` -> True/False/None, else the text."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_spec(spec: str, *, what: str = "model") -> tuple[str, dict[str, Any]]:
    """Split ``spec`` into (name, kwargs): ``mlp:hidden=256`` -> ("mlp", {"hidden": 256}),
    ``mynets:make_net:width=2`` -> ("mynets:make_net", {"width": 2}).

    Raises:
        UsageError: an argument without ``=``.
    """
    parts = spec.split(":")
    if is_factory_spec(spec):
        name, arg_text = ":".join(parts[:2]), ":".join(parts[2:])
    else:
        name, arg_text = parts[0], ":".join(parts[1:])
    kwargs: dict[str, Any] = {}
    for item in filter(None, arg_text.split(",")):
        if "=" not in item:
            raise UsageError(f"{what} spec {spec!r}: expected key=value arguments after ':', got {item!r} "
                             f"(e.g. mlp:hidden=256 or package.module:factory:width=2)")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = parse_value(value.strip())
    return name, kwargs


def _import_from_here(module_name: str) -> Any:
    """Import ``module_name`` as ``python -m`` would: also from the current folder. The ``sharpscope`` console
    script does not put the current folder on ``sys.path``, so ``--model mynets:make_net`` run next to
    ``mynets.py`` would otherwise fail where ``python -m sharpscope`` succeeds."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, here)
        return importlib.import_module(module_name)


def import_factory(name: str, *, what: str = "model") -> Callable[..., Any]:
    """The callable ``factory`` of ``name = "package.module:factory"`` (imported, also from the current folder).

    Raises:
        UsageError: the module cannot be imported, or has no callable of that name.
    """
    module_name, _, factory_name = name.partition(":")
    try:
        module = _import_from_here(module_name)
    except (ImportError, ValueError, TypeError) as exc:  # ValueError: empty name; TypeError: relative name
        raise UsageError(f"{what} factory {name!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{what} factory {name!r}: {module_name} has no callable {factory_name!r}")
    return factory


def call_factory(name: str, kwargs: dict[str, Any], *, what: str = "model") -> Any:
    """Import ``name`` and call it with ``kwargs``; a ``TypeError`` (wrong or missing arguments) becomes a one-line
    UsageError."""
    factory = import_factory(name, what=what)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"{what} factory {name!r} rejected its arguments {kwargs} ({exc}); fix the "
                         "key=value list after its name") from None


def load_loss(spec: str) -> Any:
    """The loss named by ``spec = "package.module:factory[:key=value,...]"``: ``factory(**kwargs)``.

    The factory returns ``loss_fn(outputs, targets) -> 0-d`` batch-mean loss or a
    :class:`sharpscope.batches.BatchLoss` (``fn(model, batch) -> 0-d``, for masks, dict outputs, sequence losses).
    A loss class is its own factory: ``torch.nn:MSELoss``, ``torch.nn:CrossEntropyLoss:label_smoothing=0.1``.
    Training records the spec (``TrainConfig.loss``) so analyses of the run can rebuild the same loss.

    Raises:
        UsageError: not a ``package.module:factory`` spec, an import error, bad arguments, or a result that is not
            callable.
    """
    if not isinstance(spec, str) or not is_factory_spec(spec):
        raise UsageError(f"loss spec {spec!r}: expected package.module:factory[:key=value,...], e.g. torch.nn:MSELoss "
                         "or mypkg.losses:masked_lm_loss")
    name, kwargs = parse_spec(spec, what="loss")
    loss = call_factory(name, kwargs, what="loss")
    if not callable(loss):
        raise UsageError(f"loss factory {name!r} returned {type(loss).__name__}, which is not callable; return "
                         "loss_fn(outputs, targets) -> loss or sharpscope.batches.BatchLoss(fn)")
    return loss

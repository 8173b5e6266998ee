"""The model registry: ``create_model(name, ...)``, ``list_models(pattern)``, ``register_model``.

Every factory takes the data's shape, ``in_channels``, ``num_classes`` and ``image_size``, as keyword arguments,
plus its own options (``width``, ``hidden``...), and returns an ``nn.Module`` mapping float (B, C, H, W) images to
(B, num_classes) logits. A checkpoint stores the name and these kwargs, so ``create_model(name, **kwargs)``
rebuilds it.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sharpscope.errors import SharpscopeError, UsageError, unknown_name_error

Factory = Callable[..., nn.Module]
SHAPE_ARGS = ("in_channels", "num_classes", "image_size")


@dataclass(frozen=True)
class ModelEntry:
    """One registered model."""

    name: str  # registry name, e.g. "resnet20-noshort"
    factory: Factory  # (*, in_channels, num_classes, image_size, **options) -> nn.Module
    min_image_size: int  # smallest input height = width it supports
    options: tuple[str, ...]  # the factory's own keyword options (beyond the shape arguments)


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, min_image_size: int = 1) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(*, in_channels, num_classes, image_size, **options)`` under ``name``.

    ``min_image_size``: the smallest image side the architecture handles (e.g. a net that halves the resolution
    three times needs 8); :func:`create_model` refuses smaller inputs with a clear error.
    """

    def decorate(factory: Factory) -> Factory:
        if name in _MODELS:
            raise SharpscopeError(f"model {name!r} is already registered (by {_MODELS[name].factory.__module__}); "
                                  "choose another name")
        params = inspect.signature(factory).parameters
        missing = [a for a in SHAPE_ARGS if a not in params]
        if missing:
            raise SharpscopeError(f"register_model({name!r}): the factory must take {', '.join(SHAPE_ARGS)} as "
                                  f"keyword arguments; it lacks {', '.join(missing)}")
        options = tuple(p for p in params if p not in SHAPE_ARGS)
        _MODELS[name] = ModelEntry(name, factory, min_image_size, options)
        return factory

    return decorate


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters them with shell wildcards (``"resnet*"``)."""
    return sorted(n for n in _MODELS if pattern is None or fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for inputs (B, in_channels, image_size, image_size).

    Keyword options whose value is None are dropped, so an unset CLI option never overrides a model's
    default (as timm's ``create_model`` does). The model's parameters are initialised from torch's global RNG:
    seed it (``torch.manual_seed``) for a reproducible initialisation.

    Raises:
        SharpscopeError: unknown name (with close matches), an option the model does not take, an image smaller
            than the model supports, non-positive shape arguments, or options of the wrong type.
    """
    try:
        entry = _MODELS[name]
    except KeyError:
        raise unknown_name_error("model", name, _MODELS) from None
    shape = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in shape.values()):
        raise SharpscopeError(f"model {name!r} cannot be built with {shape} (they must be integers); fix the "
                              "key=value arguments after its name")
    if min(in_channels, num_classes, image_size) < 1:
        raise SharpscopeError(f"model {name!r}: in_channels, num_classes and image_size must be >= 1, found "
                              f"{in_channels}, {num_classes}, {image_size}")
    if image_size < entry.min_image_size:
        raise SharpscopeError(f"model {name!r} needs images of at least {entry.min_image_size}x"
                              f"{entry.min_image_size} pixels, found {image_size}x{image_size}; use a model for "
                              f"small images (e.g. mlp) or upsample the data")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(kwargs) - set(entry.options))
    if unknown:
        takes = ", ".join(entry.options) or "no options"
        raise UsageError(f"model {name!r} does not take {', '.join(unknown)} (it takes: {takes})")
    try:
        return entry.factory(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    except SharpscopeError:
        raise
    except (TypeError, ValueError) as exc:  # a key=value of the wrong type, e.g. mlp:hidden=1.5
        raise UsageError(f"model {name!r} cannot be built with {kwargs} ({exc}); fix the key=value "
                              "arguments after its name") from None

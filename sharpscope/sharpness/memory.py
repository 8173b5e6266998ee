"""How many chunks a vectorised block of a sharpness measure may hold in the memory there is, decided before the
block's tensors are allocated.

A block of ``G`` chunks of ``m`` samples holds ``copies`` stacks of ``G`` perturbations (worst-case ascent: 7 —
iterate, previous, candidate, best, gradient, best gradient, direction; average-case: 2) and the activations of
the ``min(G m, batch_size)`` samples of one forward/backward pass:

    bytes(G) = G * num_params * copies * itemsize + samples(G) * activations_per_sample * itemsize * 3

(the factor 3: the forward's outputs kept for the backward, their gradients, and the vmapped copies of the
parameters' gradients' work space). ``activations_per_sample`` is the sum of the output sizes of every leaf module
on one sample, measured once by forward hooks. The memory available is ``torch.cuda.mem_get_info`` on a CUDA
device and ``MemAvailable`` of ``/proc/meminfo`` on the CPU, capped by ``$SHARPSCOPE_MEMORY_LIMIT`` (bytes, or
with a unit: ``512MB``, ``2GiB``) when set. :func:`fit_group` shrinks ``G`` until ``bytes(G)`` is at most
:data:`USABLE_FRACTION` of it, and refuses in one line when even one chunk does not fit.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from sharpscope.errors import SharpscopeError

__all__ = ["available_memory", "fit_group", "activations_per_sample", "format_bytes", "parse_bytes"]

#: Share of the available memory a block may take (the rest: the model, the data, the allocator's slack).
USABLE_FRACTION = 0.8

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """``"512MB"`` -> 512000000, ``"2GiB"`` -> 2147483648, ``"1000"`` -> 1000; SharpscopeError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise SharpscopeError(f"SHARPSCOPE_MEMORY_LIMIT={text!r}: expected a size like 512MB, 2GiB or 1000000 bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(count: float) -> str:
    """``1.5e9`` -> ``"1.4 GiB"``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def available_memory(device: torch.device | str) -> tuple[int | None, str]:
    """``(bytes available on device, where the number comes from)``; ``(None, ...)`` where it cannot be known."""
    device = torch.device(device)
    found: int | None = None
    source = "unknown"
    if device.type == "cuda":
        found, source = int(torch.cuda.mem_get_info(device)[0]), f"free memory of {device}"
    elif device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        found, source = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
                        break
        except OSError:
            pass
    limit = os.environ.get("SHARPSCOPE_MEMORY_LIMIT")
    if limit:
        capped = parse_bytes(limit)
        if found is None or capped < found:
            found, source = capped, "$SHARPSCOPE_MEMORY_LIMIT"
    return found, source


def activations_per_sample(model: nn.Module, sample_inputs: Any) -> int:
    """Sum of the output sizes (elements) of every leaf module of ``model`` on one sample ``sample_inputs``
    (a batch of one, as ``model`` is called), measured with forward hooks and no gradients."""
    from sharpscope.batches import call_model

    total = 0

    def count(module, args, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())] or [model]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            call_model(model, sample_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def block_bytes(group: int, *, m: int, num_params: int, copies: int, itemsize: int, batch_size: int,
                activations: int) -> int:
    """``bytes(G)`` of the module docstring."""
    samples = min(group * m, batch_size)
    return group * num_params * copies * itemsize + samples * activations * itemsize * 3


def fit_group(group: int, *, m: int, num_params: int, copies: int, itemsize: int, batch_size: int,
              activations: int, device: torch.device | str, what: str) -> int:
    """The largest block ``<= group`` chunks whose :func:`block_bytes` fits :data:`USABLE_FRACTION` of
    :func:`available_memory`; ``group`` unchanged where the memory cannot be known.

    Raises:
        SharpscopeError: one line naming the estimate, when even one chunk does not fit.
    """
    available, source = available_memory(device)
    if available is None:
        return group
    budget = USABLE_FRACTION * available
    sizes = dict(m=m, num_params=num_params, copies=copies, itemsize=itemsize, batch_size=batch_size,
                 activations=activations)
    if block_bytes(1, **sizes) > budget:
        need = block_bytes(1, **sizes)
        raise SharpscopeError(
            f"{what} needs ~{format_bytes(need)} for one chunk of m={m} ({num_params:,} parameters x {copies} "
            f"perturbation copies + activations of {min(m, batch_size)} samples) but {format_bytes(available)} "
            f"is available ({source}); use a smaller --m or --batch-size, fewer parameters, or a bigger machine"
        )
    while group > 1 and block_bytes(group, **sizes) > budget:
        group = max(1, int(group * budget / block_bytes(group, **sizes)))
    return group

"""How much memory a loss-landscape job needs, and a refusal before allocating one that would not fit.

The estimate (bytes) adds what a job allocates after its checkpoints are loaded:

- grid values, host: per surface ``points x (8 loss + 8 accuracy + 1 done)`` twice (the working arrays and the
  :class:`~sharpscope.landscape.Surface` returned), every surface held until written;
- figures, host: matplotlib's contour/3-D geometry of the largest surface and the interactive page, which
  serialises every surface at once (Python floats, JSON text); ``FIGURE_BYTES_PER_POINT`` and
  ``HTML_BYTES_PER_POINT`` are the marginal peak RSS per point between a 401 x 401 and an 801 x 801 grid
  (1,093 and 364 bytes, 2026-12-06; ``ru_maxrss`` of a fresh process drawing the four 2-D figures / the page),
  rounded;
- directions, evaluation device: ``parameters x directions x bytes per element x models``, times 3 (the draw,
  the normalised directions and the evaluator's contiguous copy), plus one copy of the weights per model (the
  unperturbed ``w0`` restored after every point);
- activations, evaluation device: the outputs of every leaf module for one sample, measured by one forward pass
  of one sample, times the batch size, times 2 (temporaries).

It is an estimate to catch grids and models that cannot fit (a 10001 x 10001 grid: 3.4 GB of values, ~100 GB
of figures), not an accountant's bill: it says "about". 1-D cuts draw no 2-D figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sharpscope.errors import SharpscopeError

GRID_BYTES_PER_POINT = 2 * (8 + 8 + 1)  # loss, accuracy (float64), done (bool); working arrays + result copy
FIGURE_BYTES_PER_POINT = 1000  # matplotlib contour, contourf, heatmap and 3-D of one surface (peak, measured)
HTML_BYTES_PER_POINT = 350  # plotly page of all surfaces: Python floats + JSON text (peak, measured)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a landscape job will allocate, by where they live."""

    host: int  # grid arrays and figures: always in host memory
    device: int  # directions, weight copies, activations: on the evaluation device (host memory on CPU)
    parts: dict  # name -> bytes, for the message
    points: int  # grid points per surface
    surfaces: int  # surfaces computed and held


def _format(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def activation_bytes_per_sample(model: nn.Module, sample: Any, *, loss_fn: Any = None) -> int:
    """Bytes of the outputs of every leaf module for one sample, by one forward pass under ``no_grad`` with
    forward hooks: ``model``'s inputs for a batch of one (a tensor, tuple or dict, :mod:`sharpscope.batches`), or
    with ``loss_fn`` a whole batch of one, evaluated by the loss (a :class:`~sharpscope.batches.BatchLoss` calls
    the model itself)."""
    from sharpscope.batches import batch_loss, call_model

    total = 0

    def hook(module, inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            if loss_fn is None:
                call_model(model, sample)
            else:
                batch_loss(model, loss_fn, sample)
    finally:
        for h in handles:
            h.remove()
    return total


def estimate_landscape_memory(model: nn.Module, batches, *, surfaces: int, points: int, dim: int,
                              models: int, loss_fn: Any = None) -> MemoryEstimate:
    """The memory of a landscape job of ``surfaces`` surfaces of ``points`` grid points each along ``dim``
    directions, over ``models`` models like ``model`` evaluated on ``batches`` (module docstring) with ``loss_fn``
    (needed for a :class:`~sharpscope.batches.BatchLoss`, whose batches only the loss knows how to feed)."""
    from sharpscope.batches import map_samples, num_samples

    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    weights += sum(t.numel() * t.element_size() for t in model.buffers())
    first = next(iter(batches))  # batches are cut in order: the first is the largest
    batch_size = num_samples(first)
    one = map_samples(lambda t: t[:1], first)  # the batch contract: every tensor holds the samples along dim 0
    was_training = model.training
    model.eval()
    try:
        if loss_fn is None:
            per_sample = activation_bytes_per_sample(model, one[0] if isinstance(one, (tuple, list)) else one)
        else:
            per_sample = activation_bytes_per_sample(model, one, loss_fn=loss_fn)
    finally:
        model.train(was_training)
    parts = {
        "grid values": surfaces * points * GRID_BYTES_PER_POINT,
        "figures": (points * FIGURE_BYTES_PER_POINT if dim == 2 else 0) + surfaces * points * HTML_BYTES_PER_POINT,
        "directions": 3 * weights * dim * models + weights * models,
        "activations": 2 * per_sample * batch_size,
    }
    host = parts["grid values"] + parts["figures"]
    device = parts["directions"] + parts["activations"]
    return MemoryEstimate(host=host, device=device, parts=parts, points=points, surfaces=surfaces)


def available_host_memory() -> tuple[int, str]:
    """``(bytes, where the number comes from)``: ``MemAvailable`` of ``/proc/meminfo`` (Linux: free memory plus
    what the kernel can reclaim), else ``os.sysconf`` available pages x page size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical memory"
    except (ValueError, OSError, AttributeError):
        return -1, "unknown"


def check_fits(estimate: MemoryEstimate, device: torch.device | str) -> None:
    """Raise :class:`~sharpscope.errors.SharpscopeError` (one line: the estimate, what is available, how to shrink
    the job) when ``estimate`` exceeds the available memory: host memory for the grid and figures (plus the
    device part on CPU), ``torch.cuda.mem_get_info`` free memory for the device part on CUDA."""
    device = torch.device(device)
    parts = ", ".join(f"{name} {_format(n)}" for name, n in estimate.parts.items())
    advice = ("use a coarser --x/--y grid, fewer --compare checkpoints or a smaller --batch-size")
    what = f"{estimate.surfaces} surface(s) of {estimate.points:,} points"
    on_cuda = device.type == "cuda"
    host_needed = estimate.host + (0 if on_cuda else estimate.device)
    host_free, source = available_host_memory()
    if host_free >= 0 and host_needed > host_free:
        raise SharpscopeError(f"this landscape needs about {_format(host_needed)} of memory ({what}: {parts}) but "
                              f"{_format(host_free)} is available ({source}); {advice}")
    if on_cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if estimate.device > free:
            raise SharpscopeError(f"this landscape needs about {_format(estimate.device)} of GPU memory on {device} "
                                  f"({parts}) but {_format(free)} is free; {advice}")

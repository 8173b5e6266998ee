"""The memory estimate of a landscape job, and the refusal of one that would not fit."""

from __future__ import annotations

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.landscape import grid, loss_surface, random_directions
from sharpscope.landscape.memory import (
    MemoryEstimate,
    activation_bytes_per_sample,
    available_host_memory,
    check_fits,
    estimate_landscape_memory,
)

from .conftest import image_batches, tiny_mlp


def test_activations_are_the_leaf_outputs_of_one_sample():
    model = tiny_mlp()
    # Flatten 3*8*8, Linear 16, Tanh 16, Linear 5 float32 outputs (counted by hand)
    assert activation_bytes_per_sample(model, torch.randn(1, 3, 8, 8)) == (192 + 16 + 16 + 5) * 4


def test_estimate_parts_match_the_arrays_and_tensors_they_count():
    model, batches = tiny_mlp(), image_batches()
    xs, ys = grid(-1, 1, 4), grid(-1, 1, 3)
    surface = loss_surface(model, torch.nn.CrossEntropyLoss(), batches, directions=random_directions(model, dim=2),
                           coords=(xs, ys))
    estimate = estimate_landscape_memory(model, batches, surfaces=1, points=12, dim=2, models=1)
    grid_bytes = surface.loss.nbytes + surface.accuracy.nbytes + surface.done.nbytes
    assert estimate.parts["grid values"] == 2 * grid_bytes  # the working arrays and the returned copy
    weights = 4 * (192 * 16 + 16 + 16 * 5 + 5)
    assert estimate.parts["directions"] == 3 * weights * 2 + weights  # draw, normalised, evaluator copy; w0
    assert estimate.parts["activations"] == 2 * 16 * (192 + 16 + 16 + 5) * 4  # first batch of 16, x2
    two = estimate_landscape_memory(model, batches, surfaces=2, points=12, dim=2, models=2)
    assert two.parts["grid values"] == 2 * estimate.parts["grid values"]
    assert two.host > estimate.host and two.device > estimate.device
    line = estimate_landscape_memory(model, batches, surfaces=1, points=12, dim=1, models=1)
    assert line.parts["figures"] < estimate.parts["figures"]  # a curve draws no 2-D figures


def test_refusal_is_one_line_with_the_estimate_and_what_is_available():
    free, source = available_host_memory()
    assert free > 0 and source == "MemAvailable"
    too_big = MemoryEstimate(host=4 * free, device=0, parts={"grid values": 4 * free}, points=10**8, surfaces=1)
    with pytest.raises(SharpscopeError) as err:
        check_fits(too_big, "cpu")
    message = str(err.value)
    assert "\n" not in message and "needs about" in message and "is available (MemAvailable)" in message
    assert "coarser --x/--y" in message
    check_fits(MemoryEstimate(host=1000, device=1000, parts={}, points=1, surfaces=1), "cpu")  # fits: no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refusal_on_cuda_counts_free_gpu_memory():
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(SharpscopeError, match="of GPU memory"):
        check_fits(MemoryEstimate(host=0, device=2 * free, parts={}, points=1, surfaces=1), "cuda")
    check_fits(MemoryEstimate(host=0, device=1000, parts={}, points=1, surfaces=1), "cuda")

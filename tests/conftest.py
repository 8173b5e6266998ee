"""Shared test setup: one torch thread (the CI machine has 2 cores), a headless matplotlib backend."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


def available_devices() -> list[str]:
    """CPU always; CUDA when present, so a GPU machine picks up CUDA cases without edits (STYLE.md 4)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=available_devices())
def device(request) -> str:
    return request.param

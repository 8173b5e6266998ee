"""Shared test setup: one torch thread (the CI machine has 2 cores), a headless matplotlib backend, and this folder on
``sys.path`` (the suite runs with ``--import-mode=importlib``) so test modules can ``import example_scripts``."""

import os
import sys
from pathlib import Path

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

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


@pytest.fixture(scope="session")
def sharpscope_process():
    """``run(args, cwd, ranks=None)``: ``python -m sharpscope -q ARGS`` in a real process, or under a ``ranks``-rank
    ``torchrun`` (gloo, ``--standalone``: torchrun picks a free port itself; ``--`` keeps torchrun from reading ``--m`` as its own option); asserts exit 0."""
    import subprocess
    import sys

    def run(args: list[str], cwd, ranks: int | None = None) -> None:
        launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone",
                                             f"--nproc_per_node={ranks}"]
        command = [sys.executable, *launcher, "-m", "sharpscope", *([] if ranks is None else ["--"]), "-q",
                   *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
        assert completed.returncode == 0, completed.stdout + completed.stderr

    return run

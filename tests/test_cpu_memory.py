"""sharpscope.cpu_memory: freed CPU memory stays in the process (glibc), so reallocating it faults in no pages."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from sharpscope.cpu_memory import retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds: Linux only")
def test_freed_tensors_are_reused_without_page_faults():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # once per process; later calls answer the same
    size = 16 << 20  # 16 MiB: above glibc's default mmap threshold (128 KiB) at the start of a process
    for _ in range(2):  # warm up: the heap grows to hold the block once
        torch.ones(size // 4).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(size // 4).sum()  # allocate, write every page, free
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # 10 fresh 16 MiB blocks would take 10 x 4,096 faults; the reused heap takes (about) none
    assert faults < 1000, f"{faults} minor page faults for 10 reallocations of 16 MiB"

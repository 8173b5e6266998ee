"""``torch.distributed`` plumbing: one process per device, launched by ``torchrun``.

sharpscope never schedules processes itself. Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) :func:`setup` joins the process group (NCCL on CUDA, gloo on
CPU) and every command splits its work by rank; without those variables everything runs in one process and the
helpers here are no-ops, so the same code serves both.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0 .. world_size-1
    world_size: int  # number of processes
    local_rank: int  # rank on this machine (picks the CUDA device)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; return this process's info and device.

    On CUDA each process takes ``cuda:LOCAL_RANK``; an explicit CPU device keeps gloo.
    """
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0), device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # leave the group before the interpreter shuts down: a process exiting with a live gloo group can abort in
        # the group's destructor ("terminate called without an active exception") after all its work is done
        atexit.register(teardown)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device


def info() -> DistInfo:
    """The current process's place (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo(0, 1, 0)


def shard(items: list[T], *, rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (balanced, deterministic)."""
    current = info()
    rank = current.rank if rank is None else rank
    world_size = current.world_size if world_size is None else world_size
    return items[rank::world_size]


def check_shard(shard: tuple[int, int] | None) -> None:
    """Raise unless ``shard`` is ``None`` or ``(rank, world_size)`` of the current ``torch.distributed`` job.

    Library functions that split work over ranks take ``shard=(rank, world_size)``: every rank calls them with
    the same arguments, computes its share and exchanges the results, so all ranks return what one process would.
    """
    if shard is None:
        return
    current = info()
    if (
        len(shard) != 2
        or not 0 <= shard[0] < shard[1]
        or (shard[1] > 1 and (current.rank, current.world_size) != (shard[0], shard[1]))
    ):
        from sharpscope.errors import SharpscopeError

        raise SharpscopeError(
            f"shard must be (rank, world_size) of the running torch.distributed job, got {shard} while this process "
            f"is rank {current.rank} of {current.world_size}; launch with torchrun or pass shard=None"
        )


def block(num_items: int, shard: tuple[int, int] | None) -> range:
    """This rank's contiguous share of ``range(num_items)`` (all of it when ``shard`` is None); shares differ in
    length by at most one and, concatenated in rank order, give ``range(num_items)``."""
    if shard is None:
        return range(num_items)
    rank, world_size = shard
    return range(rank * num_items // world_size, (rank + 1) * num_items // world_size)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collect one picklable object from every rank on rank 0 (others get None). Single process: ``[obj]``."""
    current = info()
    if not current.enabled:
        return [obj]
    gathered: list[Any] | None = [None] * current.world_size if current.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather(obj: Any) -> list[Any]:
    """Collect one picklable object from every rank on every rank."""
    current = info()
    if not current.enabled:
        return [obj]
    gathered: list[Any] = [None] * current.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def broadcast_from_main(obj: T) -> T:
    """Rank 0's value of ``obj`` on every rank."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Partial results of a chunked sharpness measure, saved while it runs so an interrupted run resumes mid-measure.

The grid measures (worst-case, average-case, adaptive) evaluate disjoint chunks of ``m`` samples in blocks
(the vectorised groups of :func:`~sharpscope.sharpness.worst_case._worst_case_on_chunks` and
:func:`~sharpscope.sharpness.average_case._average_case_on_chunks`); each block's numbers depend on that block's
chunks (and seeded draws) alone. A :class:`PartialResults` keeps every finished block under a key naming its
cell and chunk range and writes them all, atomically (:func:`sharpscope.io.write_npz`), to one ``.npz`` file at
most every ``save_every`` seconds. A rerun that opens the same file with the same ``identity`` (checkpoint hash,
measure, configuration) gets the finished blocks back instead of recomputing them: the same blocks with the same
boundaries, so the final numbers are bit-identical to an uninterrupted run (same device and thread count).
A kill loses at most the blocks finished since the last write.

The file opens with numpy alone: ``__identity__`` (a JSON string), ``__chunks__`` (chunks finished, all cells),
and one array per block (``worst-case``: ``(G, steps + 2)`` = the best-so-far trace then the clean loss per
chunk; ``average-case``: the ``(G,)`` perturbed losses of a block of (chunk, draw) items).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PartialResults"]


class PartialResults:
    """Finished blocks of one measure's chunks, read from and written to ``path``.

    Args:
        path: the ``.npz`` file (created on the first write; a file with another ``identity`` is ignored and
            replaced).
        identity: JSON-ready description of what is computed (checkpoint hash, measure, settings); blocks are
            reused only from a file with an equal identity.
        save_every: seconds between writes (0: after every block). The last blocks are written by :meth:`flush`.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any], *, save_every: float = 30.0) -> None:
        if not (isinstance(save_every, (int, float)) and save_every >= 0 and math.isfinite(save_every)):
            from sharpscope.errors import SharpscopeError

            raise SharpscopeError(f"save_every must be a number of seconds >= 0, got {save_every!r}")
        self.path = Path(path)
        self.identity = json.dumps(identity, sort_keys=True)
        self.save_every = float(save_every)
        self.blocks: dict[str, np.ndarray] = {}
        self.chunks: dict[str, float] = {}  # key -> chunks the block covers (average-case: fractions of chunks)
        self.reused = 0.0  # chunks taken from the file instead of computed
        self._dirty = False
        self._last_write = time.monotonic()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["__identity__"]) != self.identity:
                    return
                counts = json.loads(str(data["__counts__"]))
                self.blocks = {key: data[key] for key in counts}
                self.chunks = {key: float(n) for key, n in counts.items()}
        except (OSError, KeyError, ValueError):  # unreadable or foreign: start afresh (it is rewritten)
            self.blocks, self.chunks = {}, {}

    @property
    def num_chunks(self) -> float:
        """Chunks finished so far (blocks loaded and computed)."""
        return sum(self.chunks.values())

    def get(self, key: str) -> np.ndarray | None:
        """The saved array of block ``key``, or None when it has not been finished."""
        found = self.blocks.get(key)
        if found is not None:
            self.reused += self.chunks[key]
        return found

    def put(self, key: str, values: np.ndarray, *, chunks: float) -> None:
        """Record block ``key`` (covering ``chunks`` chunks); written now if ``save_every`` seconds have passed."""
        self.blocks[key] = np.array(values, copy=True)
        self.chunks[key] = float(chunks)
        self._dirty = True
        if time.monotonic() - self._last_write >= self.save_every:
            self.flush()

    def flush(self) -> None:
        """Write every block recorded so far (atomically), if any is new."""
        from sharpscope.io import write_npz

        if not self._dirty:
            return
        write_npz(self.path, __identity__=np.array(self.identity), __counts__=np.array(json.dumps(self.chunks)),
                  __chunks__=np.array(self.num_chunks), **self.blocks)
        self._dirty = False
        self._last_write = time.monotonic()

    def discard(self) -> None:
        """Delete the file (the measure is finished and saved elsewhere)."""
        self.path.unlink(missing_ok=True)
        self._dirty = False

"""The completion journal of a run, kept inside the output store.

One file per finished block holds the block's result counts and the spill pieces it hands to its
upper neighbours (weighted sums and weights a tile overlap thick). A block task writes its file
last, after every chunk of its region is written, and atomically (a temporary name, then a rename),
so a file's existence is the proof that the block is done. This one mechanism gives:

* resume: a new run skips the blocks with a file and feeds their pieces to the rest;
* worker loss and retries: a block that finds its own file returns the recorded result instead of
  forwarding its tiles again, and no block waits on another worker's memory for its pieces;
* bounded memory: pieces wait on disk, not in the cluster, however long the sweep takes.

The journal is removed once the output is complete.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

__all__ = ["BlockJournal", "JOURNAL_DIR"]

JOURNAL_DIR = ".tilesegment-journal"
_RESULT = "result"


def _name(index: Sequence[int]) -> str:
    return "block-" + "-".join(map(str, index)) + ".npz"


def _piece_name(offset: Sequence[int]) -> str:
    return "piece-" + "".join(map(str, offset))


@dataclass(frozen=True)
class BlockJournal:
    """The journal of the output at ``output`` (a local path)."""

    output: str

    @property
    def directory(self) -> str:
        return os.path.join(self.output, JOURNAL_DIR)

    def path(self, index: Sequence[int]) -> str:
        return os.path.join(self.directory, _name(index))

    def record(self, index: Sequence[int], counts: Sequence[int], pieces: Mapping[Sequence[int], np.ndarray]) -> None:
        """Mark ``index`` done with its result ``counts`` and outgoing ``pieces`` (by offset)."""
        arrays = {_piece_name(offset): piece for offset, piece in pieces.items()}
        arrays[_RESULT] = np.asarray(counts, dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        os.makedirs(self.directory, exist_ok=True)
        final = self.path(index)
        partial = f"{final}.{uuid.uuid4().hex}.partial"
        try:
            with open(partial, "wb") as f:
                f.write(buffer.getbuffer())
            os.replace(partial, final)  # a retry or speculative twin writes the same bytes: last one wins
        finally:
            if os.path.exists(partial):
                os.unlink(partial)

    def counts(self, index: Sequence[int]) -> tuple[int, ...] | None:
        """The recorded result counts of ``index``, or ``None`` if it is not done."""
        try:
            with np.load(self.path(index)) as data:
                return tuple(int(v) for v in data[_RESULT])
        except FileNotFoundError:
            return None

    def piece(self, index: Sequence[int], offset: Sequence[int]) -> np.ndarray:
        """The spill piece that done block ``index`` hands to its neighbour at ``offset``."""
        with np.load(self.path(index)) as data:
            return data[_piece_name(offset)]

    def done(self) -> Iterator[tuple[int, ...]]:
        """Indices of the finished blocks."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("block-") and name.endswith(".npz"):
                yield tuple(int(v) for v in name[len("block-") : -len(".npz")].split("-"))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

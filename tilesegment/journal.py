"""The completion journal of a run, kept inside the output store.

One file per finished block holds the block's result counts and the spill pieces it hands to its
upper neighbours (weighted sums of the summed channels, a tile overlap thick; see tilesegment.blending). A block task stages its file
while its chunks are written (on a local disk under a temporary name; for an object store as the
bytes of one PUT) and makes it visible last, after every chunk of its region is written, and
atomically (a rename, or one PUT of the whole object, which stores see whole or not at all), so a
file's existence is the proof that the block is done. This one mechanism gives:

* resume: a new run skips the blocks with a file and feeds their pieces to the rest;
* worker loss and retries: a block that finds its own file returns the recorded result instead of
  forwarding its tiles again, and no block waits on another worker's memory for its pieces;
* bounded memory: pieces wait on disk, not in the cluster, however long the sweep takes;
* bounded disk: once every block that takes a block's pieces is done, its record is rewritten with
  its counts alone (:meth:`BlockJournal.drop_pieces`), so pieces are kept for the wavefront only.

The journal is removed once the output is complete.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import struct
import uuid
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from .storage import filesystem, is_url, join

__all__ = ["BlockJournal", "StagedRecord", "JOURNAL_DIR"]

log = logging.getLogger(__name__)

JOURNAL_DIR = ".tilesegment-journal"
_RESULT = "result"
_READ_BLOCK = 256 * 2**10  # from an object store, read a journal file in ranges: only the member asked for
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local file header (APPNOTE 4.3.7)


def _name(index: Sequence[int]) -> str:
    return "block-" + "-".join(map(str, index)) + ".npz"


def _piece_name(offset: Sequence[int]) -> str:
    return "piece-" + "".join(map(str, offset))


T = TypeVar("T")


def _counts(data: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in data[_RESULT])


def _write_npz(f: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (an uncompressed .npz), with one copy of each array instead of two:
    a block's pieces are tens of MB, and the record is written while the block waits."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                if array.size:  # (an empty memoryview cannot be cast)
                    member.write(array.data.cast("B"))


def _read_stored_member(path: str, name: str) -> np.ndarray:
    """The array ``name`` of the local .npz at ``path``, read with one positioned read of its bytes.

    ``np.load`` goes through zipfile's reader, which copies a member in small reads and checks its
    CRC: 7 ms for a 17 MB piece against 1 ms this way, for every piece a block takes. The record was
    written whole under a temporary name and renamed, so it is complete; a short read is refused."""
    with open(path, "rb") as f:
        with zipfile.ZipFile(f) as archive:
            info = archive.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: {name} is compressed; journal records are written uncompressed")
        f.seek(info.header_offset)
        local = f.read(_LOCAL_HEADER.size)
        signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack(local)
        if signature != b"PK\x03\x04":
            raise ValueError(f"{path}: no zip member header at {info.header_offset}")
        f.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        count = math.prod(shape)
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"{path}: {name} holds {data.size} of its {count} values")
    return data.reshape(shape, order="F" if fortran_order else "C")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class StagedRecord:
    """A block's record, written but not yet visible: a file under a temporary name, or the bytes of one PUT."""

    final: str
    partial: str | None = None
    data: bytes | None = None

    def commit(self) -> None:
        """Make the record visible, whole (a rename, or one PUT); a retry or speculative twin writes the same bytes."""
        if self.data is not None:
            fs, key = filesystem(self.final)
            fs.pipe_file(key, self.data)
            return
        assert self.partial is not None
        try:
            os.replace(self.partial, self.final)
        finally:
            _unlink(self.partial)

    def discard(self) -> None:
        if self.partial is not None:
            _unlink(self.partial)


@dataclass(frozen=True)
class BlockJournal:
    """The journal of the output at ``output`` (a local path or a URL)."""

    output: str

    @property
    def directory(self) -> str:
        return join(self.output, JOURNAL_DIR)

    def path(self, index: Sequence[int]) -> str:
        return join(self.directory, _name(index))

    def record(self, index: Sequence[int], counts: Sequence[int], pieces: Mapping[Sequence[int], np.ndarray]) -> None:
        """Mark ``index`` done with its result ``counts`` and outgoing ``pieces`` (by offset)."""
        self.stage(index, counts, pieces).commit()

    def stage(self, index: Sequence[int], counts: Sequence[int], pieces: Mapping[Sequence[int], np.ndarray]) -> "StagedRecord":
        """Prepare the record of ``index`` without making it visible: a block stages its record while
        its chunks are written, and commits it once they all are."""
        arrays = {_piece_name(offset): piece for offset, piece in pieces.items()}
        arrays[_RESULT] = np.asarray(counts, dtype=np.int64)
        final = self.path(index)
        if is_url(final):  # one PUT at commit: the object appears whole; a retry or twin writes the same bytes
            buffer = io.BytesIO()
            _write_npz(buffer, arrays)
            return StagedRecord(final, data=buffer.getvalue())
        os.makedirs(self.directory, exist_ok=True)
        partial = f"{final}.{uuid.uuid4().hex}.partial"
        try:
            with open(partial, "wb") as f:
                _write_npz(f, arrays)
        except BaseException:
            _unlink(partial)
            raise
        return StagedRecord(final, partial=partial)

    def _read(self, index: Sequence[int], read: Callable[[Any], T]) -> T:
        """``read(npz)`` of the record of ``index``, opened once (from a store: only the ranges it reads)."""
        path = self.path(index)
        if not is_url(path):
            with np.load(path) as data:
                return read(data)
        fs, key = filesystem(path)
        fs.cat_file(key, start=0, end=1)  # one GET says "not there" (opening first asks for the size, then lists)
        with fs.open(key, "rb", block_size=_READ_BLOCK, cache_type="readahead") as f, np.load(f) as data:
            return read(data)

    def members(self, index: Sequence[int]) -> list[str]:
        """The names in the record of ``index``: its counts, and its pieces until they are dropped."""
        return self._read(index, lambda data: list(data.files))

    def counts(self, index: Sequence[int]) -> tuple[int, ...] | None:
        """The recorded result counts of ``index``, or ``None`` if it is not done."""
        try:
            return self._read(index, _counts)
        except FileNotFoundError:
            return None

    def piece(self, index: Sequence[int], offset: Sequence[int]) -> np.ndarray:
        """The spill piece that done block ``index`` hands to its neighbour at ``offset``."""
        path = self.path(index)
        if not is_url(path):
            return _read_stored_member(path, _piece_name(offset))
        return self._read(index, lambda data: data[_piece_name(offset)])

    def drop_pieces(self, index: Sequence[int]) -> None:
        """Keep only the counts of done block ``index``: its pieces are spent once every block that
        takes one is done. The journal then holds pieces for about one plane of blocks, not for the
        whole volume (a block's pieces are about 23 MB with the default model and block)."""
        try:
            names, counts = self._read(index, lambda data: (data.files, _counts(data)))
        except FileNotFoundError:
            return
        if names != [_RESULT]:  # else no pieces (any more)
            self.stage(index, counts, {}).commit()

    def done(self) -> Iterator[tuple[int, ...]]:
        """Indices of the finished blocks."""
        try:
            if is_url(self.directory):
                fs, key = filesystem(self.directory)
                names = [name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(key, detail=False)]
            else:
                names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("block-") and name.endswith(".npz"):
                yield tuple(int(v) for v in name[len("block-") : -len(".npz")].split("-"))

    def remove(self) -> None:
        if not is_url(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        fs, key = filesystem(self.directory)
        try:
            fs.rm(key, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # like rmtree(ignore_errors=True): a leftover journal is harmless once complete
            log.warning("could not remove the journal %s (%s); delete it by hand.", self.directory, exc)

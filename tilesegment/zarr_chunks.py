"""Chunks of a local Zarr array written and read directly, for arrays laid out as tileseg lays out its own.

zarr's write path takes every chunk through its one event-loop thread (a merge into a fresh chunk
buffer, an emptiness check, an encode and a store write, each a task handed between threads): about
2 ms per 64³ chunk on 2 cores beyond the encoding (0.3-0.6 ms) and the file (0.3 ms). For the
arrays tileseg lays out (unsharded, C order, little-endian, one Blosc compressor, fill value 0) on
a local disk, :class:`LocalChunks` writes the same bytes to the same keys as zarr's LocalStore
would (a temporary name, then renamed over the key; an all-zero chunk stored as no file), with the
encoding on a few threads: 27 chunks of 64³ uint8 labels took 15-17 ms against 41-47 ms through
``array[...] = data`` (benchmarks/RESULTS.md). The tests check the files byte for byte against
zarr's own for Zarr v2 and v3 and every dtype tileseg writes. Anything else (sharded arrays, object
stores, other codecs) is written by zarr (:func:`tilesegment.zarr_io.write_region`). Reads of
such arrays (the pyramid's reads of lower blocks' units, a ``tileseg convert`` output as input)
decode the chunk files the same way instead of through zarr's reader (:func:`tilesegment.zarr_io.read_region`).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec

from .geometry import Box

__all__ = ["LocalChunks", "local_chunks", "BLOSC_SHUFFLE"]

_ENCODERS = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="tileseg-chunks")
#: Blosc's shuffle numbers by name, as zarr v3 names them (numcodecs and zarr v2 take the numbers)
BLOSC_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
# numcodecs 0.16 takes Blosc's typesize from the codec's settings; zarr passes it only from then on
_BLOSC_TYPESIZE = tuple(int(part) for part in numcodecs.__version__.split(".")[:2] if part.isdigit()) >= (0, 16)


@dataclass(frozen=True)
class LocalChunks:
    """How to write and read the chunks of one local array: its folder, layout and compressor."""

    folder: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    codec: Any  # a numcodecs codec: bytes in, bytes out
    chunk_key: Callable[[tuple[int, ...]], str]

    def covers(self, box: Box, data: np.ndarray) -> bool:
        """Whether ``box`` is whole chunks (or clipped at the array's end) and ``data`` fills it."""
        spatial, shape = self.chunks[-3:], self.shape[-3:]
        return (data.shape == (*self.shape[:-3], *box.shape)
                and all(a % c == 0 and (b % c == 0 or b == n) and 0 <= a < b <= n
                        for a, b, c, n in zip(box.start, box.stop, spatial, shape)))

    def write(self, box: Box, data: np.ndarray) -> None:
        """Write ``data`` over the spatial ``box`` (see :meth:`covers`), every channel included, one
        chunk per task on the encoding threads."""
        lead = len(self.shape) - 3
        ranges = [range(n) for n in self.shape[:lead]]  # channel chunks are 1 deep
        ranges += [range(a, b, c) for a, b, c in zip(box.start, box.stop, self.chunks[lead:])]
        jobs = []
        for origin in itertools.product(*ranges):
            key = tuple(o // c for o, c in zip(origin, self.chunks))
            local = (*origin[:lead], *(o - s for o, s in zip(origin[lead:], box.start)))
            jobs.append(_ENCODERS.submit(self._write_chunk, key, data[tuple(slice(o, o + c) for o, c in zip(local, self.chunks))]))
        _finish(jobs)

    def holds(self, box: Box) -> bool:
        """Whether ``box`` lies inside the array (spatially), so that :meth:`read` can read it."""
        return all(0 <= a < b <= n for a, b, n in zip(box.start, box.stop, self.shape[-3:]))

    def read(self, box: Box) -> np.ndarray:
        """The spatial ``box`` (inside the array), every channel included: each chunk it touches
        decoded once, on the encoding threads where there are several."""
        lead = len(self.shape) - 3
        out = np.empty((*self.shape[:lead], *box.shape), self.dtype)
        spatial = self.chunks[lead:]
        ranges = [range(n) for n in self.shape[:lead]]
        ranges += [range(a // c, (b - 1) // c + 1) for a, b, c in zip(box.start, box.stop, spatial)]
        keys = list(itertools.product(*ranges))
        if len(keys) == 1:
            self._read_chunk(keys[0], box, out)
            return out
        _finish([_ENCODERS.submit(self._read_chunk, key, box, out) for key in keys])
        return out

    def _read_chunk(self, key: tuple[int, ...], box: Box, out: np.ndarray) -> None:
        lead = len(self.shape) - 3
        start = [k * c for k, c in zip(key[lead:], self.chunks[lead:])]
        lo = [max(s, a) for s, a in zip(start, box.start)]
        hi = [min(s + c, b) for s, c, b in zip(start, self.chunks[lead:], box.stop)]
        dst = (*key[:lead], *(slice(l - a, h - a) for l, h, a in zip(lo, hi, box.start)))
        try:
            with open(os.path.join(self.folder, self.chunk_key(key)), "rb") as f:
                stored = f.read()
        except FileNotFoundError:  # never written, or all zeros: the fill value
            out[dst] = 0
            return
        chunk = np.frombuffer(self.codec.decode(stored), self.dtype).reshape(self.chunks[lead:])
        out[dst] = chunk[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))]

    def _write_chunk(self, key: tuple[int, ...], part: np.ndarray) -> None:
        if part.shape == self.chunks and part.dtype == self.dtype:
            chunk = np.ascontiguousarray(part)
        else:  # the clipped end of the array: stored as a whole chunk, padded with the fill value
            chunk = np.zeros(self.chunks, self.dtype)
            chunk[tuple(slice(0, n) for n in part.shape)] = part
        path = os.path.join(self.folder, self.chunk_key(key))
        if not chunk.view(np.uint8).any():  # every byte the fill value's (0): zarr stores no chunk
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        encoded = self.codec.encode(chunk)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            with open(partial, "wb") as f:
                f.write(encoded)
            os.replace(partial, path)
        except BaseException:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
            raise


def _finish(jobs: list[Future[None]]) -> None:
    """Wait for every chunk's job (none still runs once this returns), then raise the first failure."""
    failures = [job.exception() for job in jobs]
    for failure in failures:
        if failure is not None:
            raise failure


def _codec(metadata: Any) -> Any | None:
    """The numcodecs codec that turns a chunk into its stored bytes, where tileseg knows the chain."""
    if metadata.zarr_format == 2:
        if metadata.filters or metadata.order != "C" or not isinstance(metadata.compressor, numcodecs.Blosc):
            return None
        return metadata.compressor
    codecs = metadata.codecs
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None  # sharded, transposed, or another compressor
    if codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return None
    blosc = codecs[1]
    config = {"id": "blosc", "cname": blosc.cname.value, "clevel": blosc.clevel, "shuffle": BLOSC_SHUFFLE[blosc.shuffle.value],
              "blocksize": blosc.blocksize}
    if _BLOSC_TYPESIZE:
        config["typesize"] = blosc.typesize
    return numcodecs.get_codec(config)


_CACHE: dict[str, tuple[tuple[int, int, int], LocalChunks | None]] = {}
_CACHE_LOCK = threading.Lock()


def local_chunks(folder: str, open_array: Callable[[], Any]) -> LocalChunks | None:
    """The direct writer of the local array in ``folder``, or None where zarr must write it.

    Kept per folder while its metadata file is the same file (same inode, size and mtime): an array
    made again at the same path (``--overwrite``) is looked at afresh. ``open_array`` opens it with zarr.
    """
    for name in ("zarr.json", ".zarray"):
        try:
            stat = os.stat(os.path.join(folder, name))
            break
        except FileNotFoundError:
            continue
    else:
        return None
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        cached = _CACHE.get(folder)
    if cached is not None and cached[0] == signature:
        return cached[1]
    array = open_array()
    metadata = array.metadata
    dtype = np.dtype(array.dtype)
    fill = np.asarray(array.fill_value if array.fill_value is not None else 0, dtype).reshape(1)
    codec = _codec(metadata)
    usable = (codec is not None and sys.byteorder == "little" and dtype.byteorder in "=<|" and len(array.shape) >= 3
              and not fill.view(np.uint8).any() and tuple(array.chunks[:-3]) == (1,) * (len(array.shape) - 3))
    found = LocalChunks(folder, tuple(array.shape), tuple(array.chunks), dtype, codec, metadata.encode_chunk_key) if usable else None
    with _CACHE_LOCK:
        _CACHE[folder] = (signature, found)
    return found

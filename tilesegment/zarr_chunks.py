"""Chunks of a local Zarr array written and read directly, for arrays laid out as tileseg lays out its own.

zarr's write path takes every chunk through its one event-loop thread (a merge into a fresh chunk
buffer, an emptiness check, an encode and a store write, each a task handed between threads): about
2 ms per 64³ chunk on 2 cores beyond the encoding (0.3-0.6 ms) and the file (0.3 ms). For the
arrays tileseg lays out (C order, little-endian, one Blosc compressor, fill value 0, unsharded or
Zarr v3 sharded with its index at the end) on a local disk, :class:`LocalChunks` writes the same
bytes to the same keys as zarr's LocalStore would (a temporary name, then renamed over the key; an
all-zero chunk stored as no file, or as no entry of its shard's index; a shard of nothing but such
chunks as no file), with the encoding on a few threads: 27 chunks of 64³ uint8 labels took 15-17
ms against 41-47 ms through ``array[...] = data`` (benchmarks/RESULTS.md). A shard is its chunks'
encoded bytes one after the other in zarr's (Morton) order, then its index: an (offset, length)
pair of little-endian uint64 per chunk (both 2⁶⁴ − 1 for an empty one) and the index's CRC-32C.
The tests check the files byte for byte against zarr's own for Zarr v2 and v3, sharded or not, and
every dtype tileseg writes. Anything else (object stores, other codecs, an index at the start) is
written by zarr (:func:`tilesegment.zarr_io.write_region`). Reads of such arrays (the pyramid's
reads of lower blocks' units, a ``tileseg convert`` output as input) decode the chunk files the
same way instead of through zarr's reader (:func:`tilesegment.zarr_io.read_region`), checking each
shard index's checksum.
"""

from __future__ import annotations

import contextlib
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
from google_crc32c import value as _crc32c  # the checksum zarr's crc32c codec computes
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

from .geometry import Box, ceil_div

try:  # zarr's order of a shard's chunks, so that a shard is zarr's bytes (any order is valid Zarr)
    from zarr.core.indexing import morton_order_iter
except ImportError:  # pragma: no cover - another zarr: its shards are written by zarr
    morton_order_iter = None

__all__ = ["LocalChunks", "local_chunks", "BLOSC_SHUFFLE"]

EMPTY = 2**64 - 1  # a shard index's offset and length of a chunk that is not stored
_ENCODERS = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="tileseg-chunks")
#: Blosc's shuffle numbers by name, as zarr v3 names them (numcodecs and zarr v2 take the numbers)
BLOSC_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
# numcodecs 0.16 takes Blosc's typesize from the codec's settings; zarr passes it only from then on
_BLOSC_TYPESIZE = tuple(int(part) for part in numcodecs.__version__.split(".")[:2] if part.isdigit()) >= (0, 16)


@dataclass(frozen=True)
class LocalChunks:
    """How to write and read the chunks of one local array: its folder, layout and compressor.

    ``chunks`` is the chunk (for a sharded array, the inner chunk) shape; ``shard``, where set, the
    shard shape, a whole number of chunks on every axis, and ``shard_order`` its chunks in the
    order their bytes follow each other in a shard file. Keys (``chunk_key``) name chunk files, or
    shard files in a sharded array."""

    folder: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    codec: Any  # a numcodecs codec: bytes in, bytes out
    chunk_key: Callable[[tuple[int, ...]], str]
    shard: tuple[int, ...] | None = None
    shard_order: tuple[tuple[int, ...], ...] = ()

    @property
    def unit(self) -> tuple[int, ...]:
        """The smallest part written alone: a shard, or a chunk."""
        return self.shard or self.chunks

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        """Chunks along each axis of a shard (all 1 for an unsharded array)."""
        return tuple(u // c for u, c in zip(self.unit, self.chunks))

    @property
    def lead(self) -> int:
        """Leading (channel) axes, chunked one deep."""
        return len(self.shape) - 3

    def covers(self, box: Box, data: np.ndarray) -> bool:
        """Whether ``box`` is whole write units (or clipped at the array's end) and ``data`` fills it."""
        spatial, shape = self.unit[-3:], self.shape[-3:]
        return (data.shape == (*self.shape[:-3], *box.shape)
                and all(a % c == 0 and (b % c == 0 or b == n) and 0 <= a < b <= n
                        for a, b, c, n in zip(box.start, box.stop, spatial, shape)))

    def write(self, box: Box, data: np.ndarray) -> None:
        """Write ``data`` over the spatial ``box`` (see :meth:`covers`), every channel included, one
        chunk per task on the encoding threads; a shard's file once all its chunks are encoded."""
        if self.shard is not None:
            self._write_shards(box, data)
            return
        jobs = []
        for key in self._keys(box, self.chunks):
            jobs.append(_ENCODERS.submit(self._write_chunk, key, self._part(key, self.chunks, box, data)))
        _finish(jobs)

    def holds(self, box: Box) -> bool:
        """Whether ``box`` lies inside the array (spatially), so that :meth:`read` can read it."""
        return all(0 <= a < b <= n for a, b, n in zip(box.start, box.stop, self.shape[-3:]))

    def read(self, box: Box) -> np.ndarray:
        """The spatial ``box`` (inside the array), every channel included: each chunk it touches
        decoded once, on the encoding threads where there are several."""
        out = np.empty((*self.shape[:self.lead], *box.shape), self.dtype)
        if self.shard is not None:
            self._read_shards(box, out)
            return out
        keys = self._keys(box, self.chunks)
        if len(keys) == 1:
            self._read_chunk(keys[0], box, out)
            return out
        _finish([_ENCODERS.submit(self._read_chunk, key, box, out) for key in keys])
        return out

    # -- the grid

    def _keys(self, box: Box, unit: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Grid coordinates of the units (chunks or shards) the spatial ``box`` touches, channels included."""
        ranges = [range(n) for n in self.shape[:self.lead]]  # channel chunks and shards are 1 deep
        ranges += [range(a // u, ceil_div(b, u)) for a, b, u in zip(box.start, box.stop, unit[self.lead:])]
        return list(itertools.product(*ranges))

    def _part(self, key: tuple[int, ...], unit: tuple[int, ...], box: Box, data: np.ndarray) -> np.ndarray:
        """The part of ``data`` (over ``box``) in the unit at ``key``, clipped to the array."""
        lead = self.lead
        where = [slice(k, k + 1) for k in key[:lead]]
        for k, u, a, b in zip(key[lead:], unit[lead:], box.start, box.stop):
            where.append(slice(max(0, k * u - a), max(0, min(b, (k + 1) * u) - a)))
        return data[tuple(where)]

    # -- chunks

    def _encoded(self, part: np.ndarray) -> bytes | None:
        """A chunk's stored bytes, or None for a chunk all of whose bytes are the fill value's (0)."""
        if part.shape == self.chunks and part.dtype == self.dtype:
            chunk = np.ascontiguousarray(part)
        else:  # the clipped end of the array: stored as a whole chunk, padded with the fill value
            chunk = np.zeros(self.chunks, self.dtype)
            chunk[tuple(slice(0, n) for n in part.shape)] = part
        if not chunk.view(np.uint8).any():  # zarr stores no chunk
            return None
        return bytes(self.codec.encode(chunk))

    def _write_chunk(self, key: tuple[int, ...], part: np.ndarray) -> None:
        _store(os.path.join(self.folder, self.chunk_key(key)), self._encoded(part))

    def _read_chunk(self, key: tuple[int, ...], box: Box, out: np.ndarray) -> None:
        try:
            with open(os.path.join(self.folder, self.chunk_key(key)), "rb") as f:
                stored = f.read()
        except FileNotFoundError:  # never written, or all zeros: the fill value
            stored = None
        self._place(key, box, out, stored)

    def _place(self, key: tuple[int, ...], box: Box, out: np.ndarray, stored: bytes | None) -> None:
        """Decode the chunk at grid coordinates ``key`` (None: the fill value) into its part of ``out``."""
        lead = self.lead
        start = [k * c for k, c in zip(key[lead:], self.chunks[lead:])]
        lo = [max(s, a) for s, a in zip(start, box.start)]
        hi = [min(s + c, b) for s, c, b in zip(start, self.chunks[lead:], box.stop)]
        dst = (*key[:lead], *(slice(l - a, h - a) for l, h, a in zip(lo, hi, box.start)))
        if stored is None:
            out[dst] = 0
            return
        chunk = np.frombuffer(self.codec.decode(stored), self.dtype).reshape(self.chunks[lead:])
        out[dst] = chunk[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))]

    # -- shards

    def _write_shards(self, box: Box, data: np.ndarray) -> None:
        assert self.shard is not None
        shards, per_shard = self._keys(box, self.shard), self.chunks_per_shard
        encoded: dict[tuple[int, ...], list[Future[bytes | None]]] = {}
        for shard in shards:
            jobs = encoded[shard] = []
            for inner in self.shard_order:
                key = tuple(s * n + i for s, i, n in zip(shard, inner, per_shard))
                jobs.append(_ENCODERS.submit(self._encoded, self._part(key, self.chunks, box, data)))
        _finish([job for jobs in encoded.values() for job in jobs])
        _finish([_ENCODERS.submit(self._write_shard, shard, [job.result() for job in encoded[shard]]) for shard in shards])

    def _write_shard(self, shard: tuple[int, ...], chunks: list[bytes | None]) -> None:
        """Store a shard of ``chunks`` (encoded, in :attr:`shard_order`) with its index, as zarr does."""
        index = np.full((*self.chunks_per_shard, 2), EMPTY, "<u8")
        offset, stored = 0, []
        for inner, chunk in zip(self.shard_order, chunks):
            if chunk:
                index[inner] = (offset, len(chunk))
                offset += len(chunk)
                stored.append(chunk)
        if stored:
            table = index.tobytes()
            stored += [table, int(_crc32c(table)).to_bytes(4, "little")]
        _store(os.path.join(self.folder, self.chunk_key(shard)), b"".join(stored) if stored else None)

    def _read_shards(self, box: Box, out: np.ndarray) -> None:
        assert self.shard is not None
        per_shard, spatial, lead = self.chunks_per_shard, self.shard[self.lead:], self.lead
        files, jobs = [], []
        try:
            for shard in self._keys(box, self.shard):
                path = os.path.join(self.folder, self.chunk_key(shard))
                inside = box.intersect(Box(tuple(s * u for s, u in zip(shard[lead:], spatial)),
                                           tuple((s + 1) * u for s, u in zip(shard[lead:], spatial))))
                keys = [key for key in self._keys(inside, self.chunks) if key[:lead] == shard[:lead]]
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # never written, or all zeros
                    for key in keys:
                        self._place(key, box, out, None)
                    continue
                files.append(fd)
                index = _shard_index(fd, path, per_shard)
                for key in keys:
                    offset, length = (int(v) for v in index[tuple(k % n for k, n in zip(key, per_shard))])
                    jobs.append(_ENCODERS.submit(self._read_stored, fd, path, offset, length, key, box, out))
        finally:  # every job done before the files close (and before a failure above goes on up)
            for job in jobs:
                job.exception()
            for fd in files:
                os.close(fd)
        _finish(jobs)

    def _read_stored(self, fd: int, path: str, offset: int, length: int, key: tuple[int, ...], box: Box, out: np.ndarray) -> None:
        stored = None
        if (offset, length) != (EMPTY, EMPTY):
            stored = os.pread(fd, length, offset)
            if len(stored) != length:
                raise OSError(f"{path}: the shard ends before its chunk at byte {offset} ({length} bytes): the file is truncated")
        self._place(key, box, out, stored)


def _shard_index(fd: int, path: str, per_shard: tuple[int, ...]) -> np.ndarray:
    """A shard file's index (its last bytes), its checksum checked."""
    size = os.fstat(fd).st_size
    length = 16 * int(np.prod(per_shard)) + 4
    tail = os.pread(fd, length, max(0, size - length))
    if len(tail) != length or int(_crc32c(tail[:-4])) != int.from_bytes(tail[-4:], "little"):
        raise OSError(f"{path}: the shard's index is damaged (checksum mismatch or a truncated file)")
    return np.frombuffer(tail[:-4], "<u8").reshape(*per_shard, 2)


def _store(path: str, encoded: bytes | None) -> None:
    """Write a chunk's or shard's bytes at ``path`` as zarr's LocalStore does; None: remove it."""
    if encoded is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(encoded)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def _finish(jobs: list[Future[None]]) -> None:
    """Wait for every chunk's job (none still runs once this returns), then raise the first failure."""
    failures = [job.exception() for job in jobs]
    for failure in failures:
        if failure is not None:
            raise failure


def _codec(metadata: Any) -> tuple[Any, Any] | None:
    """The numcodecs codec that turns a chunk into its stored bytes, and the sharding codec (or
    None), where tileseg knows the chain."""
    if metadata.zarr_format == 2:
        if metadata.filters or metadata.order != "C" or not isinstance(metadata.compressor, numcodecs.Blosc):
            return None
        return metadata.compressor, None
    codecs, sharding = metadata.codecs, None
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        sharding = codecs[0]
        index = sharding.index_codecs
        if (morton_order_iter is None or sharding.index_location.value != "end" or len(index) != 2
                or not isinstance(index[0], BytesCodec) or (index[0].endian is not None and index[0].endian.value != "little")
                or not isinstance(index[1], Crc32cCodec)):
            return None
        codecs = sharding.codecs
    codec = _blosc(codecs)
    return (codec, sharding) if codec is not None else None


def _blosc(codecs: Any) -> Any | None:
    """The numcodecs Blosc codec of a Zarr v3 chain of bytes (native order) + Blosc, else None."""
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None  # transposed, or another compressor
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
    codecs = _codec(metadata)
    lead = len(array.shape) - 3
    shard = tuple(array.shards) if getattr(array, "shards", None) else None
    usable = (codecs is not None and sys.byteorder == "little" and dtype.byteorder in "=<|" and lead >= 0
              and not fill.view(np.uint8).any() and tuple(array.chunks[:lead]) == (1,) * lead
              and (shard is None or (tuple(shard[:lead]) == (1,) * lead and all(s % c == 0 for s, c in zip(shard, array.chunks)))))
    found = None
    if usable:
        assert codecs is not None
        order = tuple(tuple(int(i) for i in inner) for inner in morton_order_iter(tuple(s // c for s, c in zip(shard, array.chunks)))) if shard else ()
        found = LocalChunks(folder, tuple(array.shape), tuple(array.chunks), dtype, codecs[0], metadata.encode_chunk_key, shard, order)
    with _CACHE_LOCK:
        _CACHE[folder] = (signature, found)
    return found

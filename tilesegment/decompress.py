"""Compressed MRC files (EMDB's ``.map.gz``, EMPIAR's ``.mrc.bz2``, ``.rec.xz``) for ``tileseg convert``.

tileseg reads an MRC file's regions in place (positioned reads, byte ranges), which a compressed
stream does not allow, and mrcfile decompresses a whole file into memory. So ``convert`` streams
the file once through the decompressor into a temporary uncompressed copy, in pieces of
``PIECE`` bytes (memory stays at one piece whatever the tomogram's size), and converts that copy.
The copy goes beside the output, where the tomogram's bytes are written anyway (the system's
temporary folder for an output in an object store); the free space is checked from the header
before anything is written, and the copy is removed when the conversion ends, also when it fails.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import math
import os
import shutil
import tempfile
import zlib
from typing import IO, Callable, Iterator

import numpy as np

from .errors import InputError, OutputError
from .mrc import DECOMPRESS_COMMAND, HEADER_BYTES, MrcInfo, compression_of, info_from_header
from .storage import describe_failure, filesystem, is_url, is_write_failure, remedy, write_failure

__all__ = ["file_compression", "compressed_header", "decompressed_copy", "temporary_folder"]

PIECE = 16 * 2**20
_OPENERS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "bzip2": lambda raw: bz2.BZ2File(raw, mode="rb"),
    "xz": lambda raw: lzma.LZMAFile(raw, mode="rb"),
}
# what a damaged stream raises, by decompressor (a truncated one raises EOFError)
_DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, OSError, ValueError)


def _open_raw(path: str) -> IO[bytes]:
    if not is_url(path):
        return open(path, "rb")
    fs, key = filesystem(path)
    return fs.open(key, "rb", block_size=PIECE)


def file_compression(path: str) -> str | None:
    """The compression of the file at ``path`` by its first bytes, or None; a file that cannot be opened is left to the MRC reader."""
    try:
        if is_url(path):  # a range of 8 bytes, not a stream's first block
            fs, key = filesystem(path)
            return compression_of(fs.cat_file(key, start=0, end=8))
        with open(path, "rb") as raw:
            return compression_of(raw.read(8))
    except Exception:  # missing, a folder, no credentials: inspect_mrc says which, in its own words
        return None


@contextlib.contextmanager
def _stream(path: str, compression: str) -> Iterator[IO[bytes]]:
    if compression not in _OPENERS:
        raise InputError(f"{path}: is {compression}-compressed, which tileseg cannot decompress.",
                         f"Decompress it first: {DECOMPRESS_COMMAND[compression]} {path}")
    with _open_raw(path) as raw, _OPENERS[compression](raw) as stream:
        yield stream


def _damaged(path: str, compression: str, exc: BaseException) -> InputError:
    if isinstance(exc, EOFError):
        what = f"is truncated: its {compression} stream ends before its end marker"
    else:
        what = f"is not a readable {compression} file ({describe_failure(exc)})"
    return InputError(f"{path}: {what}.", "Copy or download the file again completely.")


def _read_header(path: str, compression: str, stream: IO[bytes]) -> bytes:
    try:
        header = stream.read(HEADER_BYTES)
    except _DAMAGED as exc:
        raise _damaged(path, compression, exc) from None
    if len(header) < HEADER_BYTES:
        raise InputError(f"{path}: decompressed, it is {len(header)} bytes, too short to hold an MRC header (1024 bytes).",
                         "Check that the file is a complete, compressed MRC file.")
    return header


def compressed_header(path: str, compression: str) -> MrcInfo:
    """The MRC header inside a compressed file, checked as :func:`~tilesegment.mrc.inspect_mrc` checks
    one (all but the file's size, which only decompressing it all gives): bad input fails in a second,
    not after minutes of decompressing."""
    try:
        with _stream(path, compression) as stream:
            return info_from_header(path, _read_header(path, compression, stream), None)
    except InputError:
        raise
    except Exception as exc:  # the object store failing between two reads
        raise InputError(f"{path}: cannot be read: {describe_failure(exc)}.", remedy(path, exc)) from None


def temporary_folder(output: str) -> str:
    """Where the decompressed copy for ``output`` goes: beside a local output, else the system's temporary folder."""
    return tempfile.gettempdir() if is_url(output) else os.path.dirname(os.path.abspath(output.rstrip("/")))


def _expected_bytes(info: MrcInfo) -> int:
    return info.data_offset + math.prod(info.shape) * np.dtype(info.dtype).itemsize


@contextlib.contextmanager
def decompressed_copy(path: str, compression: str, folder: str, progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """An uncompressed copy of the compressed MRC file ``path`` in ``folder``, removed on leaving;
    ``progress`` is called with the voxels decompressed, piece by piece."""
    info = compressed_header(path, compression)
    needed = _expected_bytes(info)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"cannot decompress {path}: its uncompressed copy needs {needed / 2**30:.2f} GiB in {folder}, "
                          f"which has {free / 2**30:.2f} GiB free.",
                          "Free space there, or decompress it yourself where there is room "
                          f"({DECOMPRESS_COMMAND[compression].split()[0]} -c {path} > /big/disk/tomo.mrc) and convert that.")
    itemsize = np.dtype(info.dtype).itemsize
    fd, copy = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".decompressing.mrc", dir=folder)
    try:
        written = 0
        with os.fdopen(fd, "wb") as out, _stream(path, compression) as stream:
            while True:
                try:
                    piece = stream.read(PIECE)
                except _DAMAGED as exc:
                    raise _damaged(path, compression, exc) from None
                if not piece:
                    break
                try:
                    out.write(piece)
                except OSError as exc:
                    raise (write_failure(folder, exc, resumable=False) if is_write_failure(exc) else exc) from None
                if progress and written + len(piece) > info.data_offset:
                    progress((written + len(piece) - max(written, info.data_offset)) // itemsize)
                written += len(piece)
        if written < needed:
            raise InputError(f"{path}: is truncated: decompressed, it holds {written} bytes, but its header promises "
                             f"{'×'.join(map(str, info.shape))} voxels ({needed} bytes).", "Copy or download the file again completely.")
        yield copy
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(copy)

"""Reading MRC volumes: validate the header once, then read any region with positioned reads.

The header is parsed by ``mrcfile``; a region is read with plain positioned reads (``os.preadv``)
of a local file, or with byte-range requests (``cat_ranges``) of an object in a store such as S3
(``s3://bucket/tomo.mrc``), so memory stays at one region, never the file. Every problem is an
:class:`~tilesegment.errors.InputError` naming cause and remedy, the same for a file and an object.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from mrcfile.mrcinterpreter import MrcInterpreter
from mrcfile.utils import data_dtype_from_header

from .errors import InputError
from .geometry import Box, Shape
from .storage import describe_failure, filesystem, is_url, remedy

__all__ = ["MrcInfo", "SUPPORTED_MODES", "compression_of", "info_from_header", "inspect_mrc", "read_mrc_region", "unsigned_bytes"]

SUPPORTED_MODES = {0: "int8 or uint8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
HEADER_BYTES = 1024
IMOD_STAMP = 1146047817  # 'IMOD' at byte 152; imodFlags follows at 156, bit 0 set when mode-0 bytes are signed
# Object stores: a request costs about as much as reading this many more bytes, so row spans closer
# than this are fetched as one range; a range never exceeds RANGE_BYTES, and a batch of concurrent
# ranges never exceeds BATCH_BYTES (memory stays near one region).
MAX_GAP = 512 * 2**10
RANGE_BYTES = 16 * 2**20
BATCH_BYTES = 64 * 2**20
# A local file: where less than a page lies between one row's span and the next, every page of the
# plane's run of rows holds some of the box, so a disk reads the whole run either way; then a
# plane's rows are read as one run (one positioned read and one copy per plane instead of a system
# call and its Python per row: the blocks of a 256³ float32 volume read 3.8x faster). Wider gaps (a
# block of a 4096-wide float32 tomogram) keep one read per row, so a disk reads only the box's pages.
LOCAL_ROW_GAP = 4 * 2**10


@dataclass(frozen=True)
class MrcInfo:
    """What tileseg needs of an MRC file: where the data are and how to read them."""

    path: str
    shape: Shape  # (z, y, x)
    dtype: str  # numpy dtype string with byte order, e.g. '<f4'
    mode: int
    data_offset: int
    voxel_size: tuple[float, float, float] | None  # (z, y, x) in ångström, None when the header has none
    origin: tuple[float, float, float]  # (z, y, x) in ångström


def _fail(path: str, what: str, fix: str) -> InputError:
    return InputError(f"{path}: {what}", fix)


class _HeaderReader(MrcInterpreter):
    """mrcfile's own permissive header parsing (byte order, machine stamp), fed only the 1024 header bytes.

    ``mrcfile.open(header_only=True)`` still reads the extended header, allocating ``nsymbt`` bytes
    first: a corrupt header (nsymbt up to 2^31) cost gigabytes and seconds before the size check.
    Here a read never returns more than the stream holds; the extended header is checked below.
    """

    def _read_bytearray_from_stream(self, number_of_bytes):
        data = self._iostream.read(max(0, int(number_of_bytes)))
        return bytearray(data), len(data)

    def flush(self):  # read only: never write the header back
        pass


def _too_short(path: str, file_size: int) -> InputError:
    return _fail(path, f"is {file_size} bytes, too short to hold an MRC header (1024 bytes).", "Check that the file is a complete MRC file.")


def _a_folder(path: str) -> InputError:
    """A folder where an MRC file was expected: a Zarr store needs no converting, anything else is named."""
    from .storage import exists, join

    if any(exists(join(path, name)) for name in (".zarray", ".zgroup", "zarr.json")):
        return _fail(path, "is a Zarr store, not an MRC file.", "It needs no converting: segment it as it is with 'tileseg run' "
                     "(or resample it to a model's voxel size with 'tileseg convert --voxel-size').")
    return _fail(path, "is a folder, not an MRC file.", "Give an MRC file (.mrc, .rec, .map) inside it.")


def _read_header(path: str) -> tuple[int, bytes]:
    """``(size, first 1024 bytes or fewer)`` of a local file or a stored object, or the reason there are none."""
    if not is_url(path):
        if not os.path.exists(path):
            raise _fail(path, "no such file.", "Check the path (and that the file system is mounted).")
        if os.path.isdir(path):
            raise _a_folder(path)
        file_size = os.path.getsize(path)
        try:
            with open(path, "rb") as stream:
                return file_size, stream.read(HEADER_BYTES)
        except OSError as exc:  # permissions, I/O error
            raise _fail(path, f"is not a readable MRC file ({exc}).", "Give an MRC/CCP4 file, e.g. an IMOD or AreTomo tomogram.") from None
    try:
        fs, key = filesystem(path)
        info = fs.info(key)
        if info.get("type") == "directory":
            raise _a_folder(path)
        file_size = int(info["size"])
        return file_size, fs.cat_file(key, start=0, end=min(file_size, HEADER_BYTES))
    except InputError:
        raise
    except FileNotFoundError:
        raise _fail(path, "no such file.", remedy(path)) from None
    except Exception as exc:  # no credentials, endpoint unreachable, access denied, ...
        raise _fail(path, f"cannot be read: {describe_failure(exc)}.", remedy(path, exc)) from None


# The first bytes of the compressed files tomograms and maps are shipped as (EMDB's .map.gz, EMPIAR's .bz2)
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
DECOMPRESS_COMMAND = {"gzip": "gunzip -k", "bzip2": "bunzip2 -k", "xz": "unxz -k", "zstd": "zstd -d"}


def compression_of(raw: bytes) -> str | None:
    """The compression a file's first bytes announce ('gzip', 'bzip2', 'xz', 'zstd'), or None."""
    return next((name for magic, name in COMPRESSION_MAGIC.items() if raw.startswith(magic)), None)


def inspect_mrc(path: str | os.PathLike) -> MrcInfo:
    """Read and check an MRC header; raise :class:`InputError` on anything tileseg cannot read."""
    path = os.fspath(path)
    file_size, raw = _read_header(path)
    compression = compression_of(raw)
    if compression:
        raise _fail(path, f"is {compression}-compressed; tileseg reads an MRC file's regions in place, which compression does not allow.",
                    f"Convert it to Zarr with 'tileseg convert', which decompresses it on the way, or decompress it: "
                    f"{DECOMPRESS_COMMAND[compression]} {path}")
    if file_size < HEADER_BYTES:
        raise _too_short(path, file_size)
    return info_from_header(path, raw, file_size)


def info_from_header(path: str, raw: bytes, file_size: int | None) -> MrcInfo:
    """Check the 1024 header bytes ``raw`` of ``path``; also against the file's size, unless it is not known yet (``None``)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            reader = _HeaderReader(io.BytesIO(raw), permissive=True, header_only=True)
            header = reader.header.copy()
            voxel = reader.voxel_size
    except Exception as exc:  # something mrcfile cannot parse
        raise _fail(path, f"is not a readable MRC file ({exc}).", "Give an MRC/CCP4 file, e.g. an IMOD or AreTomo tomogram.") from None
    # Like mrcfile, accept 'MAP' followed by anything: some writers put 'MAP\0' instead of 'MAP '.
    if bytes(header.map.item())[:3] != b"MAP":
        raise _fail(path, "is not an MRC file (no 'MAP ' signature in its header).",
                    "Give an MRC/CCP4 file; other formats can be converted with IMOD's tif2mrc or similar.")
    mode = int(header.mode)
    if mode not in SUPPORTED_MODES:
        modes = ", ".join(f"{m} ({t})" for m, t in SUPPORTED_MODES.items())
        raise _fail(path, f"uses MRC mode {mode}, which tileseg cannot read.",
                    f"Convert it to one of the supported modes: {modes} (e.g. IMOD 'newstack -mode 2').")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise _fail(path, f"header gives impossible dimensions nx={nx} ny={ny} nz={nz}.", "The file is corrupt; re-export it.")
    if nz == 1:
        raise _fail(path, f"is a 2D image ({ny}×{nx}, nz=1), e.g. a micrograph, not a tomogram.",
                    "tileseg segments 3D volumes: reconstruct a tomogram first (IMOD, AreTomo, Warp).")
    if (int(header.mapc), int(header.mapr), int(header.maps)) not in {(1, 2, 3), (0, 0, 0)}:
        raise _fail(path, f"has axis order mapc/mapr/maps={int(header.mapc)}/{int(header.mapr)}/{int(header.maps)}.",
                    "Only the standard order 1/2/3 (x fastest) is supported; reorder it with IMOD 'clip rotx' or relion_image_handler.")
    dtype = np.dtype("u1") if mode == 0 and unsigned_bytes(raw, header) else data_dtype_from_header(header)
    ext_bytes = int(header.nsymbt)
    if ext_bytes < 0:
        raise _fail(path, f"header gives a negative extended-header size ({ext_bytes}).", "The file is corrupt; re-export it.")
    if file_size is not None and ext_bytes > file_size - HEADER_BYTES:
        raise _fail(path, f"is truncated or corrupt: its header gives a {ext_bytes}-byte extended header but the file has only "
                          f"{file_size - HEADER_BYTES} bytes after the 1024-byte header.", "Copy or export the file again completely.")
    offset = HEADER_BYTES + ext_bytes
    expected = offset + nx * ny * nz * dtype.itemsize
    if file_size is not None and file_size < expected:
        raise _fail(path, f"is truncated: its header promises {nz}×{ny}×{nx} voxels ({expected} bytes) but the file has {file_size} bytes.",
                    "Copy or export the file again completely.")
    vx, vy, vz = float(voxel.x), float(voxel.y), float(voxel.z)
    voxel_size = (vz, vy, vx) if min(vx, vy, vz) > 0 and np.isfinite([vx, vy, vz]).all() else None
    origin = tuple(float(header.origin[a]) for a in ("z", "y", "x"))
    return MrcInfo(path, (nz, ny, nx), dtype.str, mode, offset, voxel_size, origin)  # type: ignore[arg-type]


def unsigned_bytes(raw: bytes, header: np.recarray) -> bool:
    """Whether the bytes of a mode-0 file are unsigned, by IMOD's rule (``readBytesSigned`` in its
    libiimod). MRC2014 says signed, but IMOD wrote unsigned bytes until 4.2.23 and writes them still
    where asked (WRITE_MODE0_SIGNED=0), and its byte tomograms are everywhere: a file stamped by IMOD
    says which in its flags; any other is unsigned only where its header's minimum and maximum could
    not be signed bytes (0 to 255, say). Read as signed, an unsigned tomogram's bright half would wrap
    round to negative values, and the network would see noise."""
    order = header.mode.dtype.byteorder
    stamp, flags = (int(v) for v in np.frombuffer(raw[152:160], np.dtype("i4").newbyteorder("=" if order in "|=" else order)))
    if stamp == IMOD_STAMP:
        return not flags & 1
    low, high = float(header.dmin), float(header.dmax)
    if low >= 0 and high >= 128:
        return True
    return low < 0 and high >= 128 and -low <= high - 128


def _no_read_ahead(fd: int) -> None:
    """Ask the kernel to read only what each call asks for. A block reads each plane's rows as one
    run, so every call already holds all it needs from there; the kernel's read-ahead (8 MiB a miss
    on this project's VM, more on some cluster file systems) fetches the planes that follow, which
    this block does not read and which a small page cache drops before a neighbour does. A 1024³
    int8 MRC from a cold cache, in a memory cgroup leaving 64 or 256 MiB of page cache: 2.2-2.5×
    and 1.4× the file read from the disk instead of 5.6× and 2.1×; with an ample cache 1.00× either
    way (``benchmarks/cold_reads.py``). Boxes at least half the volume wide (``tileseg convert``'s
    slabs, which read on through the file) and rows read one by one keep the kernel's default."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def _read_into(fd: int, buffer: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise _ended_early(path)
        done += n


def _ended_early(path: str) -> InputError:
    return InputError(f"{path}: the file ended early while reading (it changed or was truncated after it was opened).",
                      "Check the file is complete and not being written to, then run again.")


def _coalesce(spans: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Byte ranges ``(start, end, first span, end span)`` covering ``spans`` (sorted ``(offset, length)``):
    neighbours closer than ``MAX_GAP`` share a range, up to ``RANGE_BYTES``."""
    ranges: list[tuple[int, int, int, int]] = []
    for k, (offset, length) in enumerate(spans):
        if ranges:
            start, end, first, _ = ranges[-1]
            if offset - end <= MAX_GAP and offset + length - start <= RANGE_BYTES:
                ranges[-1] = (start, max(end, offset + length), first, k + 1)
                continue
        ranges.append((offset, offset + length, k, k + 1))
    return ranges


def _read_spans(path: str, spans: list[tuple[int, int]], place) -> None:
    """Fetch ``spans`` of a stored object by range requests and hand each to ``place(k, bytes)``."""
    fs, key = filesystem(path)
    ranges = _coalesce(spans)
    i = 0
    while i < len(ranges):
        j, total = i, 0
        while j < len(ranges) and (j == i or total + ranges[j][1] - ranges[j][0] <= BATCH_BYTES):
            total += ranges[j][1] - ranges[j][0]
            j += 1
        batch = ranges[i:j]
        blobs = fs.cat_ranges([key] * len(batch), [r[0] for r in batch], [r[1] for r in batch], on_error="raise")
        for (start, end, first, stop), blob in zip(batch, blobs):
            if len(blob) < end - start:
                raise _ended_early(path)
            view = memoryview(blob)
            for k in range(first, stop):
                offset, length = spans[k]
                place(k, view[offset - start : offset - start + length])
        i = j


def read_mrc_region(info: MrcInfo, box: Box) -> np.ndarray:
    """Read ``box`` (inside the volume) in the file's own dtype, as native-endian numpy.

    Plain positioned reads rather than a memory map: a map's resident pages (and the kernel's
    fault-around) count towards a worker's memory and grow with the tomogram's width. Wide boxes
    (and, in a local file, boxes whose rows lie close together, see ``LOCAL_ROW_GAP``) read one run
    of whole rows per plane; narrow ones read each row's span, so nothing outside the box is read.
    From an object store the same spans are fetched as byte ranges, neighbours merged (see
    ``MAX_GAP``): one request per plane or slab rather than one per row.
    """
    dtype = np.dtype(info.dtype)
    _, ny, nx = info.shape
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    out = np.empty(box.shape, dtype)
    item = dtype.itemsize
    wide = 2 * (x1 - x0) >= nx
    if is_url(info.path):
        if out.size == 0:
            return out.astype(dtype.newbyteorder("="), copy=False)
        if wide:
            spans = [(info.data_offset + (z * ny + y0) * nx * item, (y1 - y0) * nx * item) for z in range(z0, z1)]

            def place(k: int, data: memoryview) -> None:
                out[k] = np.frombuffer(data, dtype).reshape(y1 - y0, nx)[:, x0:x1]
        else:
            spans = [(info.data_offset + ((z * ny + y) * nx + x0) * item, (x1 - x0) * item) for z in range(z0, z1) for y in range(y0, y1)]
            rows = out.reshape(-1, x1 - x0)

            def place(k: int, data: memoryview) -> None:
                rows[k] = np.frombuffer(data, dtype)
        _read_spans(info.path, spans, place)
        return out.astype(dtype.newbyteorder("="), copy=False)
    with open(info.path, "rb", buffering=0) as f:
        fd = f.fileno()
        if wide or (nx - (x1 - x0)) * item <= LOCAL_ROW_GAP:
            if not wide:  # a block's narrow box, not a slab that reads on through the file (convert)
                _no_read_ahead(fd)
            rows = np.empty((y1 - y0, nx), dtype)
            for i, z in enumerate(range(z0, z1)):
                _read_into(fd, rows, info.data_offset + (z * ny + y0) * nx * item, info.path)
                out[i] = rows[:, x0:x1]
        else:
            for i, z in enumerate(range(z0, z1)):
                for j, y in enumerate(range(y0, y1)):
                    _read_into(fd, out[i, j], info.data_offset + ((z * ny + y) * nx + x0) * item, info.path)
    return out.astype(dtype.newbyteorder("="), copy=False)

"""Reading MRC volumes: validate the header once, then read any region through a memory map.

The header is parsed by ``mrcfile``; data are read with a short-lived ``numpy.memmap`` per region so
that pages touched by one read are released before the next (peak memory stays at one region, not
the file). Every problem is an :class:`~tilesegment.errors.InputError` naming cause and remedy.
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

__all__ = ["MrcInfo", "SUPPORTED_MODES", "inspect_mrc", "read_mrc_region"]

SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
HEADER_BYTES = 1024


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


def inspect_mrc(path: str | os.PathLike) -> MrcInfo:
    """Read and check an MRC header; raise :class:`InputError` on anything tileseg cannot read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _fail(path, "no such file.", "Check the path (and that the file system is mounted).")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not an MRC file.", "Give an .mrc file, or a .zarr directory.")
    file_size = os.path.getsize(path)
    if file_size < HEADER_BYTES:
        raise _fail(path, f"is {file_size} bytes, too short to hold an MRC header (1024 bytes).",
                    "Check that the file is a complete MRC file.")
    try:
        with open(path, "rb") as stream:
            raw = stream.read(HEADER_BYTES)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            reader = _HeaderReader(io.BytesIO(raw), permissive=True, header_only=True)
            header = reader.header.copy()
            voxel = reader.voxel_size
    except Exception as exc:  # an unreadable file (permissions, I/O error) or something mrcfile cannot parse
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
    dtype = data_dtype_from_header(header)
    ext_bytes = int(header.nsymbt)
    if ext_bytes < 0:
        raise _fail(path, f"header gives a negative extended-header size ({ext_bytes}).", "The file is corrupt; re-export it.")
    if ext_bytes > file_size - HEADER_BYTES:
        raise _fail(path, f"is truncated or corrupt: its header gives a {ext_bytes}-byte extended header but the file has only "
                          f"{file_size - HEADER_BYTES} bytes after the 1024-byte header.", "Copy or export the file again completely.")
    offset = HEADER_BYTES + ext_bytes
    expected = offset + nx * ny * nz * dtype.itemsize
    if file_size < expected:
        raise _fail(path, f"is truncated: its header promises {nz}×{ny}×{nx} voxels ({expected} bytes) but the file has {file_size} bytes.",
                    "Copy or export the file again completely.")
    vx, vy, vz = float(voxel.x), float(voxel.y), float(voxel.z)
    voxel_size = (vz, vy, vx) if min(vx, vy, vz) > 0 and np.isfinite([vx, vy, vz]).all() else None
    origin = tuple(float(header.origin[a]) for a in ("z", "y", "x"))
    return MrcInfo(path, (nz, ny, nx), dtype.str, mode, offset, voxel_size, origin)  # type: ignore[arg-type]


def _read_into(fd: int, buffer: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise InputError(f"{path}: the file ended early while reading (it changed or was truncated after it was opened).",
                             "Check the file is complete and not being written to, then run again.")
        done += n


def read_mrc_region(info: MrcInfo, box: Box) -> np.ndarray:
    """Read ``box`` (inside the volume) in the file's own dtype, as native-endian numpy.

    Plain positioned reads rather than a memory map: a map's resident pages (and the kernel's
    fault-around) count towards a worker's memory and grow with the tomogram's width. Wide boxes
    read one run of whole rows per plane; narrow ones read each row's span, so nothing outside the
    box is read.
    """
    dtype = np.dtype(info.dtype)
    _, ny, nx = info.shape
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    out = np.empty(box.shape, dtype)
    item = dtype.itemsize
    with open(info.path, "rb", buffering=0) as f:
        fd = f.fileno()
        if 2 * (x1 - x0) >= nx:
            rows = np.empty((y1 - y0, nx), dtype)
            for i, z in enumerate(range(z0, z1)):
                _read_into(fd, rows, info.data_offset + (z * ny + y0) * nx * item, info.path)
                out[i] = rows[:, x0:x1]
        else:
            for i, z in enumerate(range(z0, z1)):
                for j, y in enumerate(range(y0, y1)):
                    _read_into(fd, out[i, j], info.data_offset + ((z * ny + y) * nx + x0) * item, info.path)
    return out.astype(dtype.newbyteorder("="), copy=False)

"""Reading MRC volumes: validate the header once, then read any region through a memory map.

The header is parsed by ``mrcfile``; data are read with a short-lived ``numpy.memmap`` per region so
that pages touched by one read are released before the next (peak memory stays at one region, not
the file). Every problem is an :class:`~tilesegment.errors.InputError` naming cause and remedy.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import mrcfile
import numpy as np
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
                voxel = mrc.voxel_size
    except Exception as exc:  # mrcfile raises ValueError/OSError with its own message
        raise _fail(path, f"is not a readable MRC file ({exc}).", "Give an MRC/CCP4 file, e.g. an IMOD or AreTomo tomogram.") from None
    if header.map.item() != b"MAP ":
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
    offset = HEADER_BYTES + ext_bytes
    expected = offset + nx * ny * nz * dtype.itemsize
    if file_size < expected:
        raise _fail(path, f"is truncated: its header promises {nz}×{ny}×{nx} voxels ({expected} bytes) but the file has {file_size} bytes.",
                    "Copy or export the file again completely.")
    vx, vy, vz = float(voxel.x), float(voxel.y), float(voxel.z)
    voxel_size = (vz, vy, vx) if min(vx, vy, vz) > 0 and np.isfinite([vx, vy, vz]).all() else None
    origin = tuple(float(header.origin[a]) for a in ("z", "y", "x"))
    return MrcInfo(path, (nz, ny, nx), dtype.str, mode, offset, voxel_size, origin)  # type: ignore[arg-type]


def read_mrc_region(info: MrcInfo, box: Box) -> np.ndarray:
    """Read ``box`` (inside the volume) in the file's own dtype, as native-endian numpy."""
    data = np.memmap(info.path, dtype=np.dtype(info.dtype), mode="r", offset=info.data_offset, shape=info.shape)
    try:
        region = np.array(data[box.slices()])
    finally:
        del data
    return region.astype(region.dtype.newbyteorder("="), copy=False)

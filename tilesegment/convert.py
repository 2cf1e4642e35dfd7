"""``convert``: stream an MRC tomogram into a chunked, compressed, multiscale OME-Zarr image.

Level 0 is copied region by region (a slab two write units deep, tiled in y and x so a region stays
around 64 MiB whatever the tomogram's width) with positioned reads; each region also writes its own
2× mean into level 1, so the level is built without reading level 0 back; each later level is built
from the stored level below. Peak memory is a few regions, independent of the volume's size. Values
and dtype are kept exactly; the voxel size and origin come from the header. A compressed MRC
(``.mrc.gz``, ``.bz2``, ``.xz``) is first decompressed into a temporary copy (:mod:`.decompress`).
With ``voxel_size``, level 0 is the tomogram resampled to that voxel size instead (:mod:`.resample`),
each region from its own input region and halo.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import __version__
from .errors import OptionError
from .geometry import Box, Shape, ceil_div
from .decompress import compressed_header, decompressed_copy, file_compression, temporary_folder
from .mrc import inspect_mrc
from .ome import multiscales, ome_attrs
from .resample import Resampling, resampling_for
from .pyramid import build_level_region, check_levels, level_regions, level_shapes, levels_in_blocks, write_block_levels
from .storage import basename, check_not_nested
from .volume import VolumeSource, check_is_a_tomogram, is_zarr_path, open_volume, read_native
from .zarr_io import create_array, create_group, intensity_compression, output_spec, update_attrs, write_region, write_unit

__all__ = ["convert", "ConvertReport", "copy_regions"]

REGION_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ConvertReport:
    output: str
    shape: Shape
    dtype: str
    voxel_size: tuple[float, float, float] | None
    levels: int
    seconds: float
    bytes_read: int
    resampled_from: tuple[float, float, float] | None = None  # the input's voxel size, where ``voxel_size`` is a resampling's


def copy_regions(shape: Shape, unit: Shape, itemsize: int) -> list[Box]:
    """Regions aligned to ``unit`` (a write unit, or a multiple): one unit deep in z, whole rows where
    they fit in ``REGION_BYTES``."""
    nz, ny, nx = shape
    row_bytes = unit[0] * itemsize  # bytes per (y, x) position of a slab
    cols = nx if unit[1] * nx * row_bytes <= REGION_BYTES else max(unit[2], REGION_BYTES // (unit[1] * row_bytes) // unit[2] * unit[2])
    rows = max(unit[1], REGION_BYTES // (cols * row_bytes) // unit[1] * unit[1])
    return list(Box.from_shape(shape).split((unit[0], min(rows, ny), min(cols, nx))))


def _run(func: Callable[..., Any], tasks: Iterable[Sequence[Any]], threads: int, on_done: Callable[[Any], None] | None) -> None:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for result in pool.map(lambda args: func(*args), tasks):
            if on_done:
                on_done(result)


def convert(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    ngff: str = "0.4",
    chunk: int | Sequence[int] = 64,
    shard: int | Sequence[int] | None = None,
    levels: int | None = None,
    voxel_size: float | None = None,
    overwrite: bool = False,
    threads: int = 2,
    progress: Callable[[int], None] | None = None,
) -> ConvertReport:
    """Convert an MRC file to OME-Zarr; ``progress`` is called with the voxels of each region done.

    Either may be a URL (``s3://bucket/tomo.zarr``): the MRC is then read by byte ranges and the
    chunks are written as objects, each in one PUT. ``voxel_size`` (Å) resamples the tomogram to it
    (for a model trained at that voxel size); without it, or at the tomogram's own, values are copied."""
    started = time.perf_counter()
    input_path, output = os.fspath(input_path), os.fspath(output)
    spec = output_spec(ngff, chunk, shard)
    if threads < 1:
        raise OptionError(f"threads={threads} is not a number of threads.", "Give 1 or more.")
    compression = file_compression(input_path)  # a .mrc.gz: its header now, its voxels decompressed once the output is made
    if voxel_size is not None and not compression and is_zarr_path(input_path):  # a Zarr image at another voxel size
        check_not_nested(input_path, output)
        info = open_volume(input_path)
        check_is_a_tomogram(info)
    else:
        info = VolumeSource.of_mrc(compressed_header(input_path, compression) if compression else inspect_mrc(input_path))
    resampling = resampling_for(info.shape, info.voxel_size, voxel_size, input_path)
    shape = resampling.out_shape if resampling else info.shape
    n_levels = check_levels(levels, shape)
    shapes = level_shapes(shape, n_levels)
    dtype = np.dtype(info.dtype).newbyteorder("=")
    unit = write_unit(spec)

    group = create_group(output, ngff, overwrite=overwrite)
    paths = [str(i) for i in range(n_levels)]
    for path, level_shape in zip(paths, shapes):
        create_array(group, path, level_shape, dtype, spec, compression=intensity_compression(dtype))
    voxel = resampling.target if resampling else info.voxel_size or (1.0, 1.0, 1.0)
    # NaN/inf would be written as bare NaN/Infinity, which is not JSON: strict readers reject the whole group
    recorded_origin = info.mrc.origin if info.mrc else info.origin
    origin = list(recorded_origin) if np.isfinite(recorded_origin).all() else None
    translation = list(info.translation)  # an OME-Zarr input's placement, carried on (an MRC's: 0)
    if resampling:  # the first voxel's centre moves; the volume's edges stay
        translation = [t + shift for t, shift in zip(translation, resampling.origin_shift)]
        origin = [o + shift for o, shift in zip(origin, resampling.origin_shift)] if origin else None
    meta = {"version": __version__, "status": "incomplete", "source": basename(input_path),
            "mrc_mode": info.mrc.mode if info.mrc else None, "origin_angstrom": origin, "voxel_size_recorded": info.voxel_size is not None}
    if resampling:
        meta["resampled"] = {"from_angstrom": list(resampling.voxel), "to_angstrom": list(resampling.target),
                             "from_shape": list(info.shape), "method": "gaussian anti-aliasing, then linear"}
    group.attrs.update({"tilesegment": meta})  # the OME metadata comes last: until then no reader takes it for an image

    # regions two write units deep and wide (where that still fits a region) write level 1 too (and more
    # levels where a region spans whole axes: levels_in_blocks)
    doubled, cost = tuple(2 * u for u in unit), _bytes_per_voxel(dtype, resampling)
    aligned = doubled if n_levels > 1 and int(np.prod(doubled)) * cost <= REGION_BYTES else unit
    regions = copy_regions(shape, aligned, cost)
    piece = regions[0].shape
    in_regions = levels_in_blocks(tuple(ceil_div(n, p) for n, p in zip(shape, piece)), piece, unit, n_levels)  # type: ignore[arg-type]
    level0, coarser = f"{output}/0", [f"{output}/{level}" for level in range(1, in_regions + 1)]

    def copy(source: VolumeSource, box: Box) -> int:
        if resampling:
            read_box = resampling.source_box(box)
            data = resampling.resample(read_native(source, read_box), read_box, box, dtype)
        else:
            data = read_native(source, box)
        write_region(level0, box, data)
        return box.size + write_block_levels(coarser, box, data, "mean", shape)

    with contextlib.ExitStack() as stack:
        source = info
        if compression:
            source = VolumeSource.of_mrc(inspect_mrc(stack.enter_context(decompressed_copy(input_path, compression, temporary_folder(output), progress))))
        _run(copy, ((source, box) for box in regions), threads, progress)
    for level in range(in_regions + 1, n_levels):
        tasks = [(f"{output}/{level - 1}", f"{output}/{level}", box, shapes[level - 1], "mean")
                 for box in level_regions(shapes[level], unit)]
        _run(build_level_region, tasks, threads, progress)
    update_attrs(output, {**ome_attrs(ngff, multiscales=[multiscales(basename(input_path), paths, voxel, [2**i for i in range(n_levels)], ngff,
                                                                              translation=translation)]),
                          "tilesegment": {**meta, "status": "complete"}})
    return ConvertReport(output, shape, dtype.name, resampling.target if resampling else info.voxel_size, n_levels,
                         time.perf_counter() - started, int(np.prod(info.shape)) * dtype.itemsize,
                         resampling.voxel if resampling else None)


def _bytes_per_voxel(dtype: np.dtype, resampling: Resampling | None) -> int:
    """What an output voxel costs a region in memory: its own bytes, or, resampled, the float32
    input voxels behind it and the interpolation's copies."""
    if resampling is None:
        return dtype.itemsize
    return max(dtype.itemsize, math.ceil(8 * math.prod(max(1.0, f) for f in resampling.factor)))

"""One input volume, whatever holds it (MRC or Zarr): describe it once, read any region as float32.

A :class:`VolumeSource` is a small picklable description; tasks carry it and read their own region,
so no array ever travels through the task graph.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import InputError
from .geometry import Box, Shape, ceil_div
from .mrc import MrcInfo, inspect_mrc, read_mrc_region
from .storage import describe_failure, exists, is_url, isdir, remedy
from .zarr_io import ZarrInput, describe_zarr_input, read_region

__all__ = ["VolumeSource", "open_volume", "check_is_a_tomogram", "read_volume", "read_native", "intensity_statistics", "is_zarr_path"]

STATS_SAMPLE_VOXELS = 4_000_000  # statistics from about this many voxels, whatever the volume size (a mean to 0.05 % of the std)


def is_zarr_path(path: str) -> bool:
    """A Zarr store by name (``.zarr``) or because it is a folder (a prefix, for a URL)."""
    stripped = path.rstrip("/")
    return ".zarr" in stripped or isdir(stripped)


@dataclass(frozen=True)
class VolumeSource:
    """Where a volume is and what it is; ``mrc`` is set for MRC files, ``zarr`` for Zarr arrays."""

    path: str
    shape: Shape
    dtype: str
    voxel_size: tuple[float, float, float] | None
    mrc: MrcInfo | None = None
    zarr: ZarrInput | None = None

    @classmethod
    def of_mrc(cls, mrc: MrcInfo) -> "VolumeSource":
        return cls(mrc.path, mrc.shape, mrc.dtype, mrc.voxel_size, mrc=mrc)

    @property
    def kind(self) -> str:
        return "mrc" if self.mrc else "zarr"

    @property
    def origin(self) -> tuple[float, float, float]:
        """(z, y, x) origin in Å, from the MRC header (or what 'tileseg convert' kept of it)."""
        origin = self.mrc.origin if self.mrc else self.zarr.origin if self.zarr else (0.0, 0.0, 0.0)
        return tuple(float(v) if math.isfinite(v) else 0.0 for v in origin)  # type: ignore[return-value]

    @property
    def translation(self) -> tuple[float, float, float]:
        """(z, y, x) Å of the first voxel's centre in the OME sense: what an OME-Zarr input's metadata
        say, 0 for an MRC. Kept apart from the MRC origin, which programs read with either sign; an
        output carries it on, so viewers overlay the two."""
        shift = self.zarr.translation if self.zarr else (0.0, 0.0, 0.0)
        return tuple(float(v) if math.isfinite(v) else 0.0 for v in shift)  # type: ignore[return-value]


def open_volume(path: str | os.PathLike) -> VolumeSource:
    """Describe the volume at ``path`` (an MRC file, a Zarr array or an OME-Zarr group; local or a URL)."""
    path = os.fspath(path)
    try:
        there = exists(path)
        zarr_like = there and is_zarr_path(path)
    except Exception as exc:  # only URLs get here: no credentials, endpoint unreachable, ...
        raise InputError(f"{path}: cannot be read: {describe_failure(exc)}.", remedy(path, exc)) from None
    if not there:
        raise InputError(f"{path}: no such file or directory.", remedy(path) if is_url(path) else "Check the input path.")
    if zarr_like:
        info = describe_zarr_input(path)
        return VolumeSource(path, info.shape, info.dtype, info.voxel_size, zarr=info)
    return VolumeSource.of_mrc(inspect_mrc(path))


def check_is_a_tomogram(source: VolumeSource) -> None:
    """A segmentation given as the tomogram (an earlier run's output, say) would be segmented without
    complaint, its labels normalised as if they were densities; an unfinished convert, its unwritten
    chunks read as zeros."""
    if source.zarr is None:
        return
    made = source.zarr.made_from
    if source.zarr.label_image:
        raise InputError(f"{source.path}: an OME-Zarr label image{f' (a segmentation of {made})' if made else ''}, not a tomogram.",
                         f"Give the tomogram itself{f', {made}' if made else ''}: an MRC file or an OME-Zarr image.")
    if source.zarr.status == "incomplete":  # a stopped or failed 'tileseg convert'
        raise InputError(f"{source.path}: an unfinished 'tileseg convert'{f' of {made}' if made else ''} (its status is incomplete): "
                         "parts of it were never written.", f"Convert it again{f' from {made}' if made else ''}, with --overwrite.")


def read_native(source: VolumeSource, box: Box) -> np.ndarray:
    """Read ``box`` (inside the volume) in the volume's own dtype."""
    if source.mrc is not None:
        return read_mrc_region(source.mrc, box)
    assert source.zarr is not None
    data = read_region(source.zarr.array_path, box)
    return data.reshape(box.shape) if data.ndim > 3 else data  # an image's single time point and channel


def read_volume(source: VolumeSource, box: Box) -> np.ndarray:
    """Read ``box`` as float32; parts outside the volume are filled by mirroring (reflect padding)."""
    inside = box.intersect(Box.from_shape(source.shape))
    data = read_native(source, inside).astype(np.float32, copy=False)
    if inside == box:
        return data
    pad = [(a - b, d - c) for a, b, c, d in zip(inside.start, box.start, inside.stop, box.stop)]
    mode = "reflect" if min(data.shape) > 1 else "edge"
    return np.pad(data, pad, mode=mode)


def intensity_statistics(source: VolumeSource) -> tuple[float, float]:
    """Mean and standard deviation of the whole volume from a regular subsample (or a coarse level).

    Computed once per run and applied to every tile alike: per-block normalisation creates seams.
    Raises :class:`InputError` for NaN/Inf voxels and for a constant volume.
    """
    step = max(1, round((np.prod(source.shape) / STATS_SAMPLE_VOXELS) ** (1 / 3)))
    if source.zarr is not None and len(source.zarr.levels) > 1 and step > 1:
        # a coarse pyramid level is a cheap, smoothed sample of the whole volume
        level = min(len(source.zarr.levels) - 1, int(np.log2(step)))
        info = describe_zarr_input(source.zarr.levels[level])
        coarse = VolumeSource(source.path, info.shape, info.dtype, None, zarr=info)
        return intensity_statistics_of(coarse, max(1, step >> level))
    return intensity_statistics_of(source, step)


def intensity_statistics_of(source: VolumeSource, step: int) -> tuple[float, float]:
    total = total_sq = 0.0
    count = 0
    for z0, sample in _sampled_slabs(source, step):
        sample = sample.astype(np.float64)
        if not np.isfinite(sample).all():
            raise InputError(f"{source.path}: the volume contains NaN or infinite voxels (seen near z={z0}).",
                             "Replace them (e.g. with the mean) before segmenting; tileseg refuses rather than guess.")
        total += float(sample.sum())
        total_sq += float(np.square(sample).sum())
        count += sample.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    if std <= 1e-12 * max(1.0, abs(mean)):
        raise InputError(f"{source.path}: the volume is constant (every sampled voxel is {mean:g}).",
                         "Check that this is the right file: an empty or constant tomogram has nothing to segment.")
    return mean, std


def _sampled_slabs(source: VolumeSource, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(z, voxels)`` for every ``step``-th voxel along each axis, a few million voxels at a time.

    An MRC file is read one sampled plane at a time (each plane is one contiguous read), so only
    1/step of the file is read; a Zarr array is read in slabs, since its chunks span many planes.
    """
    nz, ny, nx = source.shape
    if source.mrc is not None and step > 1:
        for z in range(0, nz, step):
            yield z, read_native(source, Box((z, 0, 0), (z + 1, ny, nx)))[:, ::step, ::step]
        return
    slab = max(step, ceil_div(4_000_000, max(1, ny * nx // (step * step))) * step)
    for z0 in range(0, nz, slab):
        yield z0, read_native(source, Box((z0, 0, 0), (min(nz, z0 + slab), ny, nx)))[::step, ::step, ::step]

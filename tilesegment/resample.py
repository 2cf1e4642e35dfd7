"""Resampling a tomogram to another voxel size, region by region, for ``tileseg convert --voxel-size``.

A model sees the world at the voxel size it was trained at; tomograms come at many others (the
CryoET Data Portal's 7.84, 10.012 or 13.48 Å, say), and 2× binning reaches only some of them.
Resampling is a smoothing then a linear interpolation, both local, so each output region needs
only its own input region and a small halo: memory stays bounded whatever the volume's size, and
the result does not depend on how the volume was cut into regions (the regions' values are the
whole volume's, to the bit: a test checks it).

Conventions (as binning's, so that a 2× resampling lands where a 2× bin does): the volume's
*edges* stay in place, the output has ``round(n · old / new)`` voxels per axis, and output voxel
``j`` samples the input at ``(j + ½) · new/old − ½`` (clamped to the first and last voxel).
Going to a coarser voxel size first smooths with a Gaussian of σ = (new/old − 1)/2 input voxels
(scikit-image's anti-aliasing rule), so that fine detail is averaged rather than aliased; going
finer only interpolates. Integer data are rounded and clipped to their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError, OptionError
from .geometry import Box, Shape

__all__ = ["Resampling", "resampling_for", "SAME_VOXEL_SIZE", "nearest_resampled"]

SAME_VOXEL_SIZE = 1e-4  # relative difference under which a target is the input's own voxel size: a copy, no resampling
TRUNCATE = 4.0  # the Gaussian's radius in σ (scipy.ndimage's default)


@dataclass(frozen=True)
class Resampling:
    """Input of ``shape`` at ``voxel`` Å (z, y, x) to ``target`` Å: pure geometry and arithmetic."""

    shape: Shape
    voxel: tuple[float, float, float]
    target: tuple[float, float, float]

    @property
    def factor(self) -> tuple[float, float, float]:
        """Input voxels per output voxel, per axis (above 1: coarser)."""
        return tuple(t / v for t, v in zip(self.target, self.voxel))  # type: ignore[return-value]

    @property
    def out_shape(self) -> Shape:
        return tuple(max(1, round(n / f)) for n, f in zip(self.shape, self.factor))  # type: ignore[return-value]

    @property
    def sigma(self) -> tuple[float, float, float]:
        return tuple(max(0.0, (f - 1.0) / 2.0) for f in self.factor)  # type: ignore[return-value]

    @property
    def halo(self) -> Shape:
        """Input voxels beyond an output region's interpolation support that its smoothing reads."""
        return tuple(int(TRUNCATE * s + 0.5) for s in self.sigma)  # type: ignore[return-value]

    @property
    def origin_shift(self) -> tuple[float, float, float]:
        """Å from the input's first voxel centre to the output's (the edges stay where they were)."""
        return tuple((t - v) / 2.0 for t, v in zip(self.target, self.voxel))  # type: ignore[return-value]

    def nearest_resampled(self, axis: int) -> np.ndarray:
        """For every input voxel along ``axis``, the output voxel whose centre lies nearest: the way
        back from the resampled grid to the input's (for labels made on the resampled grid). The
        inverse of :meth:`coordinates`: input voxel ``k`` lies at output position ``(k + ½) · old/new − ½``."""
        return nearest_resampled(self.shape[axis], self.out_shape[axis], self.factor[axis])

    def coordinates(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Input positions (in voxels, float64) that output voxels ``start..stop`` sample along ``axis``."""
        f, n = self.factor[axis], self.shape[axis]
        return np.clip((np.arange(start, stop, dtype=np.float64) + 0.5) * f - 0.5, 0.0, n - 1.0)

    def source_box(self, out_box: Box) -> Box:
        """The input region that output region ``out_box`` reads: its interpolation's neighbours and
        the smoothing's halo, clipped to the volume."""
        start, stop = [], []
        for axis, (a, b) in enumerate(zip(out_box.start, out_box.stop)):
            first, last = self.coordinates(axis, a, a + 1)[0], self.coordinates(axis, b - 1, b)[0]
            start.append(max(0, math.floor(first) - self.halo[axis]))
            stop.append(min(self.shape[axis], math.floor(last) + 2 + self.halo[axis]))
        return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]

    def resample(self, data: np.ndarray, data_box: Box, out_box: Box, dtype: np.dtype | str) -> np.ndarray:
        """Output region ``out_box`` from ``data``, the input's ``data_box`` (at least ``source_box(out_box)``)."""
        values = data.astype(np.float32, copy=False)
        if any(self.sigma):
            # 'nearest' at the volume's own faces; inside, the halo makes a cut face invisible
            values = ndimage.gaussian_filter(values, self.sigma, mode="nearest", truncate=TRUNCATE)
        for axis in range(3):  # separable: linear along z, then y, then x
            position = self.coordinates(axis, out_box.start[axis], out_box.stop[axis]) - data_box.start[axis]
            below = np.minimum(np.floor(position).astype(np.intp), values.shape[axis] - 1)
            above = np.minimum(below + 1, values.shape[axis] - 1)
            shape = [1, 1, 1]
            shape[axis] = len(position)
            weight = (position - below).astype(np.float32).reshape(shape)
            low, high = np.take(values, below, axis=axis), np.take(values, above, axis=axis)
            high -= low  # low + weight · (high − low), in place: two arrays of the new size, not five
            high *= weight
            high += low
            values = high
        return _as_dtype(values, np.dtype(dtype))


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def resampling_for(shape: Shape, voxel: Sequence[float] | None, target: float | None, path: str) -> Resampling | None:
    """The resampling ``convert --voxel-size target`` asks of a tomogram, or ``None`` for a plain copy
    (no target, or the input's own voxel size already)."""
    if target is None:
        return None
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise OptionError(f"--voxel-size {target!r} is not a voxel size.", "Give the target in Å per voxel, e.g. --voxel-size 10.")
    if voxel is None:
        raise InputError(f"{path} records no voxel size, so it cannot be resampled to {target:.4g} Å/voxel.",
                         "Record it first (in an MRC header with IMOD's 'alterheader -del X,Y,Z'), then convert.")
    if all(abs(v - target) <= SAME_VOXEL_SIZE * target for v in voxel):
        return None
    plan = Resampling(tuple(shape), tuple(float(v) for v in voxel), (float(target),) * 3)  # type: ignore[arg-type]
    if min(plan.out_shape) < 2 and min(shape) >= 2:
        raise OptionError(f"--voxel-size {target:.4g} leaves {path} ({'×'.join(map(str, shape))} voxels of "
                          f"{max(voxel):.4g} Å) {'×'.join(map(str, plan.out_shape))} voxels.", "Give a finer voxel size.")
    return plan


def nearest_resampled(original: int, resampled: int, factor: float) -> np.ndarray:
    """:meth:`Resampling.nearest_resampled` of one axis: ``original`` input voxels, ``resampled``
    output voxels, ``factor`` input voxels per output voxel; ties go up, every index is clipped in."""
    position = (np.arange(original, dtype=np.float64) + 0.5) / factor - 0.5
    return np.clip(np.floor(position + 0.5), 0, resampled - 1).astype(np.intp)

"""Overlap blending: window weights, weighted accumulation and normalisation (numpy only).

A voxel's result is ``Σ wᵢ·pᵢ / Σ wᵢ`` over every tile that covers it, where ``w`` is a smooth
window that falls off towards the tile's border (where a CNN sees the least context).

Only what cannot be derived is accumulated:

* **No weight channel.** The window is separable (an outer product of one profile per axis) and the
  global grid is a product of per-axis origins, so ``Σ wᵢ`` over every tile covering a voxel is the
  product of three one-dimensional sums: :func:`grid_weights` computes it for any box from the grid
  alone, exactly (in real arithmetic) what accumulating the windows would give.
* **No class 0 of a softmax.** Its probabilities are 1 minus the others', so its weighted sum is
  ``Σ w − Σ`` the others': an accumulator of a ``C``-class softmax holds classes ``1 … C-1``
  (:func:`summed_channels`). For the common two classes that is one channel instead of three,
  a third of the blending traffic, accumulator memory and spill-piece bytes.

Windows are strictly positive (the gaussian's smallest value, in a tile's corner, is about 4e-11 of
its centre, far above float32's smallest normal number), so every covered voxel has a defined result.
They have no floor, as nnU-Net's gaussian has none: a floor such as MONAI's (every weight below
1e-3 of the centre raised to 1e-3) would make the window, and so ``Σ w``, non-separable.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .errors import OptionError
from .geometry import Box, Shape

if TYPE_CHECKING:
    from .plan import TileGrid

__all__ = ["BLEND_MODES", "window", "profiles", "grid_weights", "GridWeights", "summed_channels", "summed_count", "new_accumulator", "Placement",
           "placement", "accumulate", "add_piece", "normalise"]

#: Where one tile's prediction goes in an accumulator: ``(accumulator slices, tile slices)``.
Placement = tuple[tuple[slice, ...], tuple[slice, ...]]

BLEND_MODES = ("gaussian", "linear", "constant")
GAUSSIAN_SIGMA = 0.125  # of the tile size, as MONAI's and nnU-Net's gaussian importance maps


def _profile(length: int, mode: str) -> np.ndarray:
    centre = (length - 1) / 2.0
    position = np.arange(length, dtype=np.float64)
    if mode == "constant":
        return np.ones(length)
    if mode == "linear":
        return 1.0 - np.abs(position - centre) / (centre + 1.0)
    sigma = max(GAUSSIAN_SIGMA * length, 1e-6)
    return np.exp(-0.5 * ((position - centre) / sigma) ** 2)


def _check_mode(mode: str) -> None:
    if mode not in BLEND_MODES:
        raise OptionError(f"--blend {mode!r} is not a blending mode.", f"Use one of: {', '.join(BLEND_MODES)}.")


@lru_cache(maxsize=16)
def profiles(tile: Shape, mode: str = "gaussian") -> tuple[np.ndarray, ...]:
    """The window's profile along each axis (float64, maximum 1, strictly positive; read-only)."""
    _check_mode(mode)
    found = []
    for n in tile:
        profile = _profile(n, mode)
        profile = profile / profile.max()
        profile.setflags(write=False)
        found.append(profile)
    return tuple(found)


@lru_cache(maxsize=16)
def window(tile: Shape, mode: str = "gaussian") -> np.ndarray:
    """Separable blending window of shape ``tile``: the outer product of :func:`profiles`, maximum 1,
    strictly positive (float32, read-only)."""
    z, y, x = profiles(tile, mode)
    weights = (z[:, None, None] * (y[:, None] * x[None, :])[None]).astype(np.float32)
    weights.setflags(write=False)
    return weights


def _axis_coverage(origins: tuple[int, ...], profile: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``Σ`` of the profile of every tile along one axis, over positions ``start … stop-1``."""
    length = len(profile)
    total = np.zeros(stop - start, np.float64)
    first = bisect.bisect_right(origins, start - length)  # tiles that end after start
    for origin in origins[first:]:
        if origin >= stop:
            break
        lo, hi = max(origin, start), min(origin + length, stop)
        total[lo - start:hi - start] += profile[lo - origin:hi - origin]
    return total


@dataclass(frozen=True)
class GridWeights:
    """``Σ w`` over a box, kept as its two factors: per z-plane a scalar times one (y, x) plane.

    Whoever needs it walks the box plane by plane (:meth:`plane`), so no array of the box's size is
    made (28 MB for a 192³ block, and as much again for each temporary computed from it)."""

    z: np.ndarray  # (nz,) float32
    yx: np.ndarray  # (ny, nx) float32

    @property
    def shape(self) -> Shape:
        return (len(self.z), *self.yx.shape)  # type: ignore[return-value]

    def plane(self, i: int, scale: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
        """Plane ``i`` of the weights times ``scale`` (a power of two keeps it exact)."""
        return np.multiply(self.yx, np.float32(self.z[i] * np.float32(scale)), out=out)

    def array(self) -> np.ndarray:
        """The whole box (the same float32 values as :meth:`plane`, plane by plane)."""
        return np.multiply(self.z[:, None, None], self.yx[None])


def grid_weights(grid: "TileGrid", box: Box, mode: str) -> GridWeights:
    """``Σ w`` over every tile of ``grid`` that covers each voxel of ``box``.

    The product of the per-axis sums: the grid's tiles are every combination of its per-axis origins
    and the window is a product of per-axis profiles, so the sum of the products is the product of
    the sums. Positive at every voxel of the volume. The per-axis sums are float64; the (y, x) plane
    and the z factor are rounded to float32 once each, so every voxel is within 2 float32 roundings
    of the exact sum.
    """
    z, y, x = (_axis_coverage(o, p, a, b) for o, p, a, b in zip(grid.origins, profiles(grid.tile, mode), box.start, box.stop))
    return GridWeights(z.astype(np.float32), (y[:, None] * x[None, :]).astype(np.float32))


def summed_channels(channels: int, softmax: bool) -> slice:
    """Which of a network's ``channels`` outputs an accumulator holds: all of them, except class 0
    of a softmax over two or more classes (its sum is ``Σ w`` minus the others')."""
    return slice(1, None) if softmax and channels > 1 else slice(None)


def summed_count(channels: int, softmax: bool) -> int:
    """How many channels :func:`summed_channels` keeps: an accumulator's first axis."""
    return len(range(channels)[summed_channels(channels, softmax)])


def new_accumulator(channels: int, box: Box) -> np.ndarray:
    """Zeroed weighted sums of ``channels`` (the summed ones, see :func:`summed_channels`) over ``box``."""
    return np.zeros((channels, *box.shape), dtype=np.float32)


def placement(acc_box: Box, tile_box: Box) -> Placement | None:
    """Where the tile at ``tile_box`` adds into an accumulator over ``acc_box``: only the part of the
    tile inside ``acc_box`` (a tile that reaches past a small volume contributes nothing outside it)."""
    overlap = tile_box.intersect(acc_box)
    if overlap.empty:
        return None
    return overlap.slices(acc_box), overlap.slices(tile_box)


def accumulate(acc: np.ndarray, acc_box: Box, prediction: np.ndarray, tile_box: Box, weights: np.ndarray) -> None:
    """Add one tile's summed channels ``prediction`` (``(S, *tile)``), weighted, into ``acc`` (which
    covers ``acc_box``).

    The numpy reference of what a block does (:meth:`tilesegment.predict.Predictor.forward_into`
    does the same arithmetic in PyTorch, on both cores). The weighting happens in place:
    ``prediction`` is used up.
    """
    where = placement(acc_box, tile_box)
    if where is None:
        return
    dst, src = where
    weighted = prediction[(slice(None), *src)]
    weighted *= weights[src]
    acc[(slice(None), *dst)] += weighted


def add_piece(acc: np.ndarray, acc_box: Box, piece: np.ndarray, piece_box: Box) -> None:
    """Add a spilled accumulator piece (weighted sums) into ``acc``."""
    acc[(slice(None), *piece_box.slices(acc_box))] += piece


def normalise(sums: np.ndarray, weights: GridWeights, channels: int) -> np.ndarray:
    """The blended ``(channels, ...)`` probabilities of an accumulator's weighted sums and their
    :func:`grid_weights`; a softmax's class 0, left out of the sums, is 1 minus the others (at least 0)."""
    out = np.empty((channels, *sums.shape[1:]), dtype=np.float32)
    first = channels - len(sums)
    plane = np.empty(weights.yx.shape, np.float32)
    for i in range(sums.shape[1]):  # plane by plane: no temporary of the block's size
        np.divide(sums[:, i], weights.plane(i, out=plane), out=out[first:, i])
        if first:
            np.sum(out[1:, i], axis=0, dtype=np.float32, out=out[0, i])
            np.subtract(np.float32(1.0), out[0, i], out=out[0, i])
            np.maximum(out[0, i], np.float32(0.0), out=out[0, i])
    return out

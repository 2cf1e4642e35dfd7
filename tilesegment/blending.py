"""Overlap blending: window weights, weighted accumulation and normalisation (numpy only).

A voxel's result is ``Σ wᵢ·pᵢ / Σ wᵢ`` over every tile that covers it, where ``w`` is a smooth
window that falls off towards the tile's border (where a CNN sees the least context). Windows are
strictly positive, so every covered voxel has a defined result. Accumulators hold the weighted sums
of the ``C`` output channels followed by the sum of weights in one ``(C + 1, z, y, x)`` float32 array,
so a spill piece travels as one array.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import OptionError
from .geometry import Box, Shape

__all__ = ["BLEND_MODES", "window", "new_accumulator", "Placement", "placement", "accumulate", "add_piece", "normalise"]

#: Where one tile's prediction goes in an accumulator: ``(accumulator slices, tile slices)``.
Placement = tuple[tuple[slice, ...], tuple[slice, ...]]

BLEND_MODES = ("gaussian", "linear", "constant")
GAUSSIAN_SIGMA = 0.125  # of the tile size, as MONAI's and nnU-Net's gaussian importance maps
MIN_WEIGHT = 1e-3  # floor, relative to the centre, so border voxels covered by one tile stay defined


def _profile(length: int, mode: str) -> np.ndarray:
    centre = (length - 1) / 2.0
    position = np.arange(length, dtype=np.float64)
    if mode == "constant":
        return np.ones(length)
    if mode == "linear":
        return 1.0 - np.abs(position - centre) / (centre + 1.0)
    sigma = max(GAUSSIAN_SIGMA * length, 1e-6)
    return np.exp(-0.5 * ((position - centre) / sigma) ** 2)


@lru_cache(maxsize=16)
def window(tile: Shape, mode: str = "gaussian") -> np.ndarray:
    """Separable blending window of shape ``tile``, maximum 1, strictly positive (read-only)."""
    if mode not in BLEND_MODES:
        raise OptionError(f"--blend {mode!r} is not a blending mode.", f"Use one of: {', '.join(BLEND_MODES)}.")
    profiles = [_profile(n, mode) for n in tile]
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights = np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)
    weights.setflags(write=False)
    return weights


def new_accumulator(channels: int, box: Box) -> np.ndarray:
    return np.zeros((channels + 1, *box.shape), dtype=np.float32)


def placement(acc_box: Box, tile_box: Box) -> Placement | None:
    """Where the tile at ``tile_box`` adds into an accumulator over ``acc_box``: only the part of the
    tile inside ``acc_box`` (a tile that reaches past a small volume contributes nothing outside it)."""
    overlap = tile_box.intersect(acc_box)
    if overlap.empty:
        return None
    return overlap.slices(acc_box), overlap.slices(tile_box)


def accumulate(acc: np.ndarray, acc_box: Box, prediction: np.ndarray, tile_box: Box, weights: np.ndarray) -> None:
    """Add one tile's ``(C, *tile)`` prediction, weighted, into ``acc`` (which covers ``acc_box``).

    The numpy reference of what a block does (:meth:`tilesegment.predict.Predictor.forward_into`
    does the same arithmetic in PyTorch, on both cores). The weighting happens in place:
    ``prediction`` is used up.
    """
    where = placement(acc_box, tile_box)
    if where is None:
        return
    dst, src = where
    w = weights[src]
    weighted = prediction[(slice(None), *src)]
    weighted *= w
    acc[(slice(None, -1), *dst)] += weighted
    acc[(-1, *dst)] += w


def add_piece(acc: np.ndarray, acc_box: Box, piece: np.ndarray, piece_box: Box) -> None:
    """Add a spilled accumulator piece (weighted sums and weights) into ``acc``."""
    acc[(slice(None), *piece_box.slices(acc_box))] += piece


def normalise(acc: np.ndarray) -> np.ndarray:
    """Weighted sums over weights: the blended ``(C, ...)`` result (0 where nothing was added)."""
    weights = acc[-1]
    out = np.zeros((acc.shape[0] - 1, *acc.shape[1:]), dtype=np.float32)
    np.divide(acc[:-1], weights, out=out, where=weights > 0)
    return out

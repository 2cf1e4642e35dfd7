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

__all__ = ["BLEND_MODES", "window", "new_accumulator", "accumulate", "add_piece", "normalise"]

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


def accumulate(acc: np.ndarray, acc_box: Box, prediction: np.ndarray, tile_box: Box, weights: np.ndarray) -> None:
    """Add one tile's ``(C, *tile)`` prediction, weighted, into ``acc`` (which covers ``acc_box``).

    Only the part of the tile inside ``acc_box`` is added: a tile that reaches past a small volume
    contributes nothing outside it. The weighting happens in place: ``prediction`` is used up.
    """
    overlap = tile_box.intersect(acc_box)
    if overlap.empty:
        return
    dst = overlap.slices(acc_box)
    src = overlap.slices(tile_box)
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

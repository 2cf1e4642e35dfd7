"""A small synthetic tomogram for the demo and the tests: dense blobs in noise, with ground truth.

This is deliberately simple (ellipsoidal blobs of a few sizes, gaussian noise at a given SNR); the
realistic cryo-ET simulator (real structures, CTF, missing wedge) is :mod:`tilesegment.simulate`.
"""

from __future__ import annotations

import numpy as np

from .geometry import Shape

__all__ = ["blobs"]


def blobs(shape: Shape, seed: int = 0, count: int | None = None, snr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(tomogram float32, truth uint8)``: bright ellipsoids (label 1) on a noisy background."""
    rng = np.random.default_rng(seed)
    count = count if count is not None else max(4, int(np.prod(shape) / 6000))
    clean = np.zeros(shape, np.float32)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(count):
        centre = [rng.uniform(0, n) for n in shape]
        radii = rng.uniform(2.5, 6.0, size=3)
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
        clean[inside] = 1.0
    truth = (clean > 0).astype(np.uint8)
    signal = clean.std() or 1.0
    noisy = clean + rng.normal(0.0, signal / np.sqrt(snr), size=shape).astype(np.float32)
    return noisy.astype(np.float32), truth

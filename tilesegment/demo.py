"""The embedded default job's input: a small synthetic tomogram written as MRC."""

from __future__ import annotations

import mrcfile

from .synthetic import blobs

__all__ = ["make_demo_tomogram", "DEMO_VOXEL_SIZE"]

DEMO_VOXEL_SIZE = 10.0  # Å, the default model's voxel size


def make_demo_tomogram(path: str, size: int = 96, seed: int = 0) -> str:
    volume, _ = blobs((size, size, size), seed=seed)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = DEMO_VOXEL_SIZE
    return path

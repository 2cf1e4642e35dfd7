"""Small real segmentation outputs for the tests of what comes after a run (export, preview, NGFF validation)."""

from __future__ import annotations

import shutil

import numpy as np
import zarr

from tilesegment.pipeline import segment
from tilesegment.zarr_io import update_attrs

from .conftest import mrc_file, random_volume

SHAPE = (20, 26, 30)  # odd-ish, not a multiple of the chunk, z the shortest (like a tomogram)
VOXEL_XYZ = (10.0, 9.0, 11.0)  # anisotropic, within the model's tolerance
ORIGIN_XYZ = (100.0, -50.0, 7.5)


def segmented(directory, model: str, client, *, volume: np.ndarray | None = None, ngff: str = "0.4", probabilities: bool = True,
              probability_dtype: str = "float32", levels: int = 2, name: str = "seg.zarr") -> tuple[str, str]:
    """``(tomogram.mrc, OUTPUT.zarr)``: a tomogram with anisotropic voxels and an origin, segmented by ``model``."""
    volume = random_volume(SHAPE, seed=7) if volume is None else volume
    src = directory / "tomo.mrc"
    if not src.exists():
        mrc_file(src, volume, voxel=VOXEL_XYZ, origin=ORIGIN_XYZ)
    out = str(directory / name)
    segment(str(src), out, model=model, tile=16, chunk=8, ngff=ngff, levels=levels, probabilities=probabilities,
            probability_dtype=probability_dtype, client=client)
    return str(src), out


def labels(out: str, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{out}/{level}", mode="r")[:])


def probabilities(out: str, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{out}/probabilities/{level}", mode="r")[:])


def copy_with_meta(out: str, directory, **changes) -> str:
    """A copy of ``out`` whose ``tilesegment`` attribute has ``changes`` (a value None removes the key;
    a changed ``input`` is also made the input of the recorded run settings, if any)."""
    copy = str(directory / "copy.zarr")
    shutil.copytree(out, copy)
    meta = dict(zarr.open_group(copy, mode="r").attrs)["tilesegment"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    if "input" in changes and isinstance(meta.get("run"), dict):
        meta["run"] = {**meta["run"], "input": changes["input"]}
    update_attrs(copy, {"tilesegment": meta})
    return copy


def blosc_settings(array) -> tuple[int, str]:
    """``(zstd level, shuffle)`` of a Zarr v2 or v3 array's one Blosc compressor."""
    (codec,) = array.compressors
    if isinstance(codec.shuffle, int):  # numcodecs (Zarr v2)
        return codec.clevel, {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}[codec.shuffle]
    return codec.clevel, codec.shuffle.value

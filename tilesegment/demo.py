"""The embedded default job: a simulated crowded tomogram, converted, segmented and scored.

``tileseg demo`` is the first thing a new user runs, so it exercises the real path end to end: the
simulator writes a tomogram the default model has never seen (its seeds differ from training's),
``convert`` makes the OME-Zarr, ``run`` segments it, and the result is scored against the
simulation's ground truth so the user sees what the model does, not just that it ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mrcfile
import numpy as np

from .convert import convert
from .simulate import SimulationConfig, simulate

__all__ = ["DemoFiles", "prepare_demo", "score_demo"]


@dataclass(frozen=True)
class DemoFiles:
    directory: str
    mrc: str
    zarr: str
    truth: str
    segmentation: str
    particles: int


def prepare_demo(directory: str, size: int = 96, seed: int = 0) -> DemoFiles:
    """Simulate and convert the demo tomogram; write a binary ground truth (macromolecule = 1)."""
    os.makedirs(directory, exist_ok=True)
    report = simulate(os.path.join(directory, "simulation"), SimulationConfig(shape=(size, size, size), snr=1.0, seed=seed),
                      overwrite=True)
    with mrcfile.open(report.labels, permissive=True) as mrc:
        truth = (np.asarray(mrc.data) > 0).astype(np.int8)
    truth_path = os.path.join(directory, "truth.mrc")
    with mrcfile.new(truth_path, overwrite=True) as mrc:
        mrc.set_data(truth)
        mrc.voxel_size = report.voxel_size
    zarr_path = os.path.join(directory, "tomogram.zarr")
    convert(report.tomogram, zarr_path, overwrite=True)
    return DemoFiles(directory, report.tomogram, zarr_path, truth_path, os.path.join(directory, "segmentation.zarr"),
                     report.particle_count)


def score_demo(files: DemoFiles) -> float | None:
    """Foreground IoU of the demo's segmentation against the simulation's ground truth."""
    from .evaluate import evaluate

    return evaluate(files.segmentation, files.truth).foreground.iou

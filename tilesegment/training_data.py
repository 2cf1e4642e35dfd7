"""Where training tomograms come from: ``tileseg simulate`` output folders, or simulated on the fly.

A simulation folder holds ``tomogram.mrc``, ``labels.mrc`` and ``particles.json`` (whose ``classes``
name each label). Volumes simulated on the fly use consecutive seeds, training first, so a
validation tomogram is never a training one.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Sequence

import mrcfile
import numpy as np

from .errors import InputError, OptionError
from .train import Volume

__all__ = ["load_simulation", "simulated_volumes", "split_volumes"]


def load_simulation(directory: str) -> tuple[Volume, tuple[str, ...]]:
    """A ``tileseg simulate`` folder as a training volume, with its kinds (label k = kinds[k-1])."""
    paths = {name: os.path.join(directory, name) for name in ("tomogram.mrc", "labels.mrc", "particles.json")}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        raise InputError(f"{directory}: not a simulation folder (missing {', '.join(missing)}).",
                         "Give folders written by 'tileseg simulate'.")
    with open(paths["particles.json"]) as f:
        document = json.load(f)
    kinds = tuple(c["name"] for c in sorted(document.get("classes", []), key=lambda c: c["label"]) if c["label"] > 0)
    with mrcfile.open(paths["tomogram.mrc"], permissive=True) as mrc:
        tomogram = np.array(mrc.data, dtype=np.float32)
    with mrcfile.open(paths["labels.mrc"], permissive=True) as mrc:
        labels = np.array(mrc.data).astype(np.uint8)
    if tomogram.shape != labels.shape:
        raise InputError(f"{directory}: tomogram {tomogram.shape} and labels {labels.shape} differ in shape.", "Simulate the folder again.")
    return Volume(tomogram, labels, name=directory), kinds


def simulated_volumes(count: int, config, first_seed: int) -> list[Volume]:
    """``count`` tomograms simulated in memory with seeds ``first_seed, first_seed + 1, ...``."""
    from .simulate import simulate_volume

    volumes = []
    for i in range(count):
        sim = simulate_volume(replace(config, seed=first_seed + i))
        volumes.append(Volume(sim.tomogram, sim.labels, name=f"simulated seed {first_seed + i}"))
    return volumes


def split_volumes(directories: Sequence[str], validation: int) -> tuple[list[Volume], list[Volume], tuple[str, ...]]:
    """Load simulation folders and keep the last ``validation`` of them for validation."""
    loaded = [load_simulation(d) for d in directories]
    kinds = loaded[0][1]
    for (volume, other), directory in zip(loaded, directories):
        if other != kinds:
            raise InputError(f"{directory}: its kinds {list(other)} differ from {list(kinds)} of {directories[0]}.",
                             "Train on folders simulated with the same --templates.")
    if not 1 <= validation < len(loaded):
        raise OptionError(f"--validation {validation} with {len(loaded)} folders leaves no training or no validation data.",
                          "Give at least two folders and 1 <= --validation < number of folders.")
    volumes = [v for v, _ in loaded]
    return volumes[:-validation], volumes[-validation:], kinds

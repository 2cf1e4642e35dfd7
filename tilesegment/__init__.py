"""tilesegment: segment macromolecules in whole cryo-ET tomograms with 3D CNNs, tile by tile on Dask."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CheckpointError, ClusterError, InputError, OptionError, OutputError, TilesegError
from .geometry import Box
from .plan import BlockPlan, TileGrid

__all__ = [
    "__version__",
    "segment",
    "convert",
    "Box",
    "BlockPlan",
    "TileGrid",
    "TilesegError",
    "InputError",
    "OptionError",
    "CheckpointError",
    "OutputError",
    "ClusterError",
]


def __getattr__(name: str):
    # the heavy entry points (Dask, torch) load on first use, so `import tilesegment` stays light
    if name == "segment":
        from .pipeline import segment

        return segment
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(name)

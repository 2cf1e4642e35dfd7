"""The two task functions of a segmentation run: predict a block, finalise a block.

``predict_block`` forwards the block's own tiles (each exactly once), blends them into an
accumulator over the block's extent and splits it into the pieces of :meth:`BlockPlan.pieces`.
``finalise_block`` adds the pieces that land in one block's region (its own and its lower
neighbours' spills), normalises, and writes every chunk of the region once. See
:mod:`tilesegment.plan` for why this meets the three stitching requirements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blending import accumulate, add_piece, new_accumulator, normalise, window
from .errors import InputError
from .plan import OFFSETS, BlockPlan
from .geometry import Shape
from .volume import VolumeSource, read_volume
from .zarr_io import write_region

__all__ = ["BlockJob", "BlockResult", "predict_block", "finalise_block", "to_labels", "to_probability_dtype"]


@dataclass(frozen=True)
class BlockJob:
    """Everything a block task needs: paths, geometry and settings, never arrays or models."""

    source: VolumeSource
    plan: BlockPlan
    model_key: str
    channels: int
    batch_size: int
    blend: str
    normalization: tuple[float, float] | None  # whole-volume (mean, std), or None to feed raw values
    label_rule: str  # 'argmax' (softmax classes) or 'threshold' (one channel, > 0.5)
    labels_path: str
    label_dtype: str
    probabilities_path: str | None = None
    probability_dtype: str = "float16"


@dataclass(frozen=True)
class BlockResult:
    index: Shape
    tiles_forwarded: int
    voxels_written: int
    foreground_voxels: int


def predict_block(job: BlockJob, index: Shape) -> tuple:
    """Forward the block's tiles; return its 8 accumulator pieces (``None`` where empty) and the count."""
    from .predict import get_predictor  # torch only where the network runs

    plan = job.plan
    pieces = plan.pieces(index)
    tiles = plan.tiles(index)
    if not tiles:
        return (None,) * len(OFFSETS) + (0,)
    input_box = plan.input_box(index)
    data = read_volume(job.source, input_box)
    if not np.isfinite(data).all():
        raise InputError(f"{job.source.path}: NaN or infinite voxels in region {input_box}.",
                         "Replace them before segmenting; tileseg refuses rather than guess.")
    if job.normalization is not None:
        mean, std = job.normalization
        data -= np.float32(mean)
        data /= np.float32(std)
    extent = plan.extent(index)
    acc = new_accumulator(job.channels, extent)
    weights = window(plan.grid.tile, job.blend)
    predictor = get_predictor(job.model_key)
    forwarded = 0
    for start in range(0, len(tiles), job.batch_size):
        batch = tiles[start : start + job.batch_size]
        stacked = np.stack([data[tile.slices(input_box)] for tile in batch])
        predictions = predictor(stacked)
        forwarded += len(batch)
        for tile, prediction in zip(batch, predictions):
            accumulate(acc, extent, prediction, tile, weights)
    out = tuple(
        np.ascontiguousarray(acc[(slice(None), *pieces[o].slices(extent))]) if o in pieces else None for o in OFFSETS
    )
    return out + (forwarded,)


def to_labels(probabilities: np.ndarray, rule: str, dtype: str) -> np.ndarray:
    if rule == "argmax":
        return np.argmax(probabilities, axis=0).astype(dtype)
    return (probabilities[0] > 0.5).astype(dtype)


def to_probability_dtype(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.round(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probabilities.astype(dtype)


def finalise_block(job: BlockJob, index: Shape, forwarded: int, *pieces: np.ndarray) -> BlockResult:
    """Blend the pieces that land in the block's region, and write its chunks (once each)."""
    plan = job.plan
    region = plan.region(index)
    acc = new_accumulator(job.channels, region)
    incoming = plan.incoming(index)
    if len(incoming) != len(pieces):
        raise RuntimeError(f"block {index}: expected {len(incoming)} pieces, got {len(pieces)}")
    for (source, offset), piece in zip(incoming, pieces):
        add_piece(acc, region, piece, plan.pieces(source)[offset])
    probabilities = normalise(acc)
    del acc
    labels = to_labels(probabilities, job.label_rule, job.label_dtype)
    write_region(job.labels_path, region, labels)
    if job.probabilities_path:
        write_region(job.probabilities_path, region, to_probability_dtype(probabilities, job.probability_dtype))
    return BlockResult(index, forwarded, region.size, int(np.count_nonzero(labels)))

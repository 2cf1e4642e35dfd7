"""The task function of a segmentation run: process one block.

``process_block`` forwards the block's own tiles (each exactly once) and blends them into an
accumulator over the block's extent; adds the thin spill pieces its (up to 7) lower neighbours
recorded in the run's journal; normalises and writes every chunk of its region once, and the
units of the coarser pyramid levels it owns (:func:`tilesegment.pyramid.owned_level_box`); and records
its own spill pieces for its upper neighbours, which marks it done (see :mod:`tilesegment.journal`).
The whole block never waits in memory for anyone: only spill pieces (faces, edges, corners a tile
overlap thick) wait, on disk. A block already in the journal is not computed again. See
:mod:`tilesegment.plan` for the geometry.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .blending import GridWeights, add_piece, grid_weights, normalise, placement, summed_count, window
from .errors import InputError
from .geometry import Box, Shape
from .journal import BlockJournal
from .plan import BlockPlan, batches
from .pyramid import write_owned_levels
from .storage import write_failure
from .volume import VolumeSource, read_volume
from .zarr_io import write_region

__all__ = ["BlockJob", "BlockResult", "process_block", "block_accumulator", "to_labels", "labels_of_sums", "to_probability_dtype", "set_progress_hook"]

_progress_hook: Callable[[str, int], None] | None = None


#: The threads that write journal records while block chunks are written: one per block in flight
#: (a thread starts only when every started one is busy, so a CPU worker with one block in flight
#: uses one or two; 8 leaves room for ``dask worker --nthreads`` up to 8 on a GPU).
_STAGER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tileseg-journal")


#: Each block thread's accumulator memory, kept for its next block (see :func:`block_accumulator`).
_ACCUMULATORS = threading.local()


def block_accumulator(channels: int, box: Box) -> np.ndarray:
    """Zeroed float32 sums of ``channels`` over ``box``, in memory this thread reuses for its next
    block. Each block's own ``np.zeros`` mostly came from untouched pages, which its tiles' additions
    then faulted in: over a 256³ run's 8 blocks 17 500 page faults and 0.10-0.12 s of additions
    here, against 8 800 faults (the largest block's, once) and 0.02 s with the memory reused. The
    caller must be done with the array and every view of it before the thread asks for the next:
    :func:`process_block` returns only once its pieces are staged and its chunks written."""
    size = channels * box.size
    memory = getattr(_ACCUMULATORS, "memory", None)
    if memory is None or memory.size < size:
        _ACCUMULATORS.memory = memory = np.empty(size, np.float32)
    acc = memory[:size].reshape((channels, *box.shape))
    acc.fill(0.0)
    return acc


def set_progress_hook(hook: Callable[[str, int], None] | None) -> None:
    """Install ``hook(run, tiles)``, called after every forwarded batch (the executor routes it to the client)."""
    global _progress_hook
    _progress_hook = hook


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
    journal: BlockJournal
    probabilities_path: str | None = None
    probability_dtype: str = "float16"
    # the coarser levels (1, 2, …), of which each block writes the units it owns (pyramid.owned_level_box);
    # a job with levels has every block wait for all its lower neighbours (executor.block_graph)
    label_levels: tuple[str, ...] = ()
    probability_levels: tuple[str, ...] = ()

    @property
    def summed_count(self) -> int:
        """The channels of the block's accumulator (a softmax's class 0 is left out, see
        :func:`tilesegment.blending.summed_channels`)."""
        return summed_count(self.channels, self.label_rule == "argmax")


@dataclass(frozen=True)
class BlockResult:
    index: Shape
    tiles_forwarded: int
    voxels_written: int
    foreground_voxels: int


def forward_tiles(job: BlockJob, index: Shape, acc: np.ndarray, acc_box: Box) -> int:
    """Forward the block's own tiles in batches and add their weighted predictions into ``acc``."""
    from .predict import get_predictor  # torch only where the network runs

    plan = job.plan
    tiles = plan.tiles(index)
    if not tiles:
        return 0
    input_box = plan.input_box(index)
    data = read_volume(job.source, input_box)
    if not np.isfinite(data).all():
        raise InputError(f"{job.source.path}: NaN or infinite voxels in region {input_box}.",
                         "Replace them before segmenting; tileseg refuses rather than guess.")
    if job.normalization is not None:
        mean, std = job.normalization
        data -= np.float32(mean)
        data /= np.float32(std)
    weights = window(plan.grid.tile, job.blend)
    predictor = get_predictor(job.model_key)
    for batch in batches(tiles, job.batch_size):
        predictor.forward_into([data[tile.slices(input_box)] for tile in batch], acc,
                               [placement(acc_box, tile) for tile in batch], weights)
        if _progress_hook is not None:
            _progress_hook(job.labels_path, len(batch))
    return len(tiles)


def to_labels(probabilities: np.ndarray, rule: str, dtype: str) -> np.ndarray:
    """Class labels of ``(C, ...)`` probabilities: the first most probable class (``np.argmax``'s
    answer, ties included), or channel 0 above one half for a one-channel (sigmoid) network."""
    if rule != "argmax":
        return (probabilities[0] > 0.5).astype(dtype)
    if len(probabilities) == 1:
        return np.zeros(probabilities.shape[1:], dtype)
    # whole-array comparisons, class by class: argmax along a leading axis walks the data with a
    # stride and took 4x (many classes) to 50x (two classes) as long on a block
    labels = np.greater(probabilities[1], probabilities[0]).astype(dtype)
    if len(probabilities) > 2:
        best = np.maximum(probabilities[0], probabilities[1])
        for c in range(2, len(probabilities)):
            np.putmask(labels, probabilities[c] > best, c)
            np.maximum(best, probabilities[c], out=best)
    return labels


def labels_of_sums(sums: np.ndarray, weights: GridWeights, rule: str, dtype: str, channels: int) -> np.ndarray:
    """:func:`to_labels` of an accumulator's weighted sums (of the summed channels,
    :func:`tilesegment.blending.summed_channels`) and their ``Σ w`` (``weights``), without dividing:
    the weights are positive, so comparing sums compares probabilities (exactly, where a division
    could round two close ones to a tie). A two-class softmax holds class 1 only: class 1 wins where
    its probability is above one half (at one half the classes tie and class 0, the first, wins).
    Plane by plane, so that no temporary of the block's size is made."""
    if channels == 1 and rule == "argmax":
        return np.zeros(sums.shape[1:], dtype)
    plane = np.empty(weights.yx.shape, np.float32)
    if rule != "argmax" or channels == 2:
        above = np.empty(sums.shape[1:], bool)
        for i in range(sums.shape[1]):
            np.greater(sums[0, i], weights.plane(i, 0.5, out=plane), out=above[i])
        return above.view(np.uint8) if np.dtype(dtype) == np.uint8 else above.astype(dtype)
    every = np.empty((channels, *sums.shape[1:]), np.float32)
    every[1:] = sums
    np.sum(sums, axis=0, dtype=np.float32, out=every[0])
    for i in range(sums.shape[1]):
        np.subtract(weights.plane(i, out=plane), every[0, i], out=every[0, i])
    return to_labels(every, rule, dtype)


def to_probability_dtype(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.round(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probabilities.astype(dtype)


def process_block(job: BlockJob, index: Sequence[int], *_neighbours: BlockResult) -> BlockResult:
    """Forward, blend, finalise and write one block, then record it in the journal.

    ``_neighbours`` are the results of the lower neighbours whose spill pieces this block takes:
    they are there to order the tasks; the pieces themselves come from the journal.
    """
    plan, journal = job.plan, job.journal
    index = tuple(index)  # type: ignore[assignment]
    recorded = journal.counts(index)
    if recorded is not None:  # a retry, a re-run after a lost worker, or a resumed run
        return BlockResult(index, *recorded)
    region = plan.region(index)
    extent = plan.extent(index)
    acc_box = extent if not extent.empty else region
    acc = block_accumulator(job.summed_count, acc_box)
    forwarded = forward_tiles(job, index, acc, acc_box)
    for source, offset in plan.spills_into(index):
        add_piece(acc, acc_box, journal.piece(source, offset), plan.pieces(source)[offset])
    sums = acc[(slice(None), *region.slices(acc_box))]
    weights = grid_weights(plan.grid, region, job.blend)
    labels = labels_of_sums(sums, weights, job.label_rule, job.label_dtype, job.channels)
    result = BlockResult(index, forwarded, region.size, int(np.count_nonzero(labels)))
    pieces = {offset: acc[(slice(None), *box.slices(acc_box))] for offset, box in plan.pieces(index).items() if any(offset)}
    # the record is written beside the chunks (on the other core: the network is idle meanwhile) and
    # made visible only once every chunk is written, so its presence still proves the block done
    staging = _STAGER.submit(journal.stage, index, (result.tiles_forwarded, result.voxels_written, result.foreground_voxels), pieces)
    try:
        try:
            write_region(job.labels_path, region, labels)
            write_owned_levels((job.labels_path, *job.label_levels), region, labels, "nearest", plan.volume, plan.chunk)
            if job.probabilities_path:
                probabilities = to_probability_dtype(normalise(sums, weights, job.channels), job.probability_dtype)
                write_region(job.probabilities_path, region, probabilities)
                write_owned_levels((job.probabilities_path, *job.probability_levels), region, probabilities, "mean", plan.volume, plan.chunk)
        except BaseException:
            with contextlib.suppress(Exception):
                staging.result().discard()
            raise
        staging.result().commit()
    except OSError as exc:  # a full disk or a refusing store: the user's to fix, and the run's to resume
        raise write_failure(journal.output, exc) from None
    return result

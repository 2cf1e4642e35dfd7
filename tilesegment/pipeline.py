"""``segment``: the main job, read → plan tiles → predict → blend → write, as one library call.

This module validates everything up front (so bad input fails in a second with one clear line,
before any output exists), takes the output's lock (one writer per output), lays out the output
OME-Zarr (or picks up a stopped run's, with ``resume``), and hands the unfinished blocks to
:mod:`tilesegment.executor`. The output is a label image (``image-label`` metadata, nearest-
neighbour pyramid) at the group's root, and optionally the class probabilities under
``probabilities/``. Until the last chunk and pyramid level are written it is marked
``incomplete`` and has no OME metadata (see :mod:`tilesegment.output`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import __version__
from .allocator import keep_freed_memory
from .blocks import BlockJob
from .blending import BLEND_MODES
from .errors import OptionError, VoxelSizeError
from .geometry import Shape, option_text, shape_option
from .journal import BlockJournal
from .lock import OutputLock
from .output import CONTINUE, CREATE, FINISHED, OutputLayout, check_same_run, create_output, decide, finish_output, output_state
from .plan import BlockPlan
from .pyramid import check_levels, level_shapes
from .storage import check_not_nested, is_url, normalize
from .volume import VolumeSource, check_is_a_tomogram, intensity_statistics, open_volume
from .zarr_io import output_spec, write_unit

__all__ = ["segment", "RunReport", "PROBABILITY_DTYPES", "VOXEL_SIZE_TOLERANCE"]

log = logging.getLogger(__name__)

PROBABILITY_DTYPES = ("float16", "float32", "uint8")
VOXEL_SIZE_TOLERANCE = 1.25  # refuse when the tomogram's voxel size is off the model's by more than this factor


@dataclass(frozen=True)
class RunReport:
    """What a run did, for the CLI's summary and for tests."""

    output: str
    shape: Shape
    tiles_forwarded: int
    tile_count: int
    blocks: int
    foreground_voxels: int
    seconds: float
    class_names: tuple[str, ...]
    dashboard: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tiles_per_second(self) -> float:
        return self.tiles_forwarded / self.seconds if self.seconds > 0 else 0.0


#: file name endings of projection images, not volumes: IMOD's raw and aligned tilt series, RELION's image stacks
IMAGE_STACK_SUFFIXES = (".st", ".ali", ".mrcs")


def _warn_if_image_stack(source: VolumeSource) -> None:
    """A tilt series given instead of its reconstruction is an easy mistake that the MRC header
    cannot reliably tell (many reconstructions have space group 0, as image stacks do), so only the
    name is trusted, and only for a warning."""
    suffix = next((s for s in IMAGE_STACK_SUFFIXES if source.path.lower().rstrip("/").endswith(s)), None)
    if suffix:
        log.warning("%s looks like a tilt series or image stack (%s), not a tomogram; tileseg segments reconstructed "
                    "volumes (IMOD's .rec, say), and on projections its labels mean nothing.", source.path, suffix)


def _fits(voxel: tuple[float, float, float] | None, model_voxel: float) -> bool:
    return voxel is not None and 1 / VOXEL_SIZE_TOLERANCE <= max(voxel) / model_voxel <= VOXEL_SIZE_TOLERANCE


def _binned_level(source: VolumeSource, model_voxel: float) -> str:
    """Where the tomogram is already binned to the model's voxel size, the words that say so: a
    level of its own pyramid, or the level 'tileseg convert' would write (its 2× means)."""
    if source.zarr is not None:
        for path, voxel in zip(source.zarr.levels[1:], source.zarr.level_voxel_sizes[1:]):
            if _fits(voxel, model_voxel):
                size = " × ".join(f"{v:.4g}" for v in voxel)  # type: ignore[union-attr]
                return f"Its pyramid level {path} is {size} Å/voxel: segment that ('tileseg run {path} OUTPUT.zarr')."
    elif source.voxel_size is not None:
        for level in range(1, 7):
            binned = tuple(v * 2**level for v in source.voxel_size)
            if _fits(binned, model_voxel) and min(source.shape) >> level >= 16:  # type: ignore[arg-type]
                return (f"'tileseg convert' writes it {2**level}× binned ({max(binned):.4g} Å/voxel) as pyramid level {level}: "
                        f"convert it and segment that ('tileseg run TOMO.zarr/{level} OUTPUT.zarr').")
    return ""


def _check_voxel_size(source: VolumeSource, model_voxel: float, ignore: bool) -> None:
    if source.voxel_size is None:
        log.warning("%s records no voxel size; assuming the model's %.3g Å.", source.path, model_voxel)
        return
    ratio = max(source.voxel_size) / model_voxel
    if not ignore and not _fits(source.voxel_size, model_voxel):
        size = " × ".join(f"{v:.4g}" for v in source.voxel_size)
        binned = _binned_level(source, model_voxel)
        remedy = (f"resample it to the model's voxel size ('tileseg convert {source.path} TOMO.zarr --voxel-size {model_voxel:.4g}', "
                  "then segment TOMO.zarr), use a model trained at this voxel size, or pass --ignore-voxel-size.")
        raise VoxelSizeError(
            f"{source.path}: voxel size {size} Å is {ratio:.2f}× the model's {model_voxel:.4g} Å; tileseg does not resample while it segments.",
            f"{binned} Otherwise {remedy}" if binned else remedy[0].upper() + remedy[1:], model_voxel,
        )


def _check_tile(tile: Shape, multiple: int, architecture: str) -> None:
    bad = [t for t in tile if t % multiple or t < multiple]
    if bad:
        fixed = [max(multiple, -(-t // multiple) * multiple) for t in tile]
        raise OptionError(f"--tile {option_text(tile)} does not fit the {architecture} network, which needs multiples of {multiple}.",
                          f"Use --tile {option_text(fixed)}.")


def segment(
    input_path: str,
    output: str,
    *,
    model: str | None = None,
    tile: int | Sequence[int] = 64,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch: int = 4,
    device: str = "cpu",
    scheduler: str | None = None,
    workers: int | None = None,
    block: int | Sequence[int] | None = None,
    chunk: int | Sequence[int] = 64,
    shard: int | Sequence[int] | None = None,
    ngff: str = "0.4",
    levels: int | None = None,
    probabilities: bool = False,
    probability_dtype: str = "float16",
    overwrite: bool = False,
    resume: bool = False,
    precision: str = "fp32",
    ignore_voxel_size: bool = False,
    threads: int | None = None,
    client: Any = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[BlockPlan, str | None], None] | None = None,
) -> RunReport:
    """Segment the tomogram at ``input_path`` into the OME-Zarr label image ``output``.

    ``resume`` finishes a stopped run on ``output`` (same settings), computing only the blocks it
    had not finished. ``progress(n)`` is called as tiles are forwarded; ``on_start(plan,
    dashboard_link)`` once the cluster is up. Raises :class:`~tilesegment.errors.TilesegError`
    subclasses for bad input.
    """
    from .executor import (blocks_in_flight, connect, dashboard_link, default_torch_threads, embedded_worker_count,
                           install_model, predict_resources, run_blocks)
    from .model import load_checkpoint, read_checkpoint
    from .predict import check_forward_memory, check_precision, device_memory_available, model_key, resolve_device

    started = time.perf_counter()
    keep_freed_memory()  # before the embedded cluster's threads first allocate (see tilesegment.allocator)
    input_path, output = os.fspath(input_path), os.fspath(output)
    output = normalize(output) if is_url(output) else os.path.normpath(output)
    if blend not in BLEND_MODES:
        raise OptionError(f"--blend {blend!r} is not a blending mode.", f"Use one of: {', '.join(BLEND_MODES)}.")
    if batch < 1:
        raise OptionError(f"--batch {batch} must be at least 1.", "Use --batch 1 or more (4-16 on a GPU).")
    if workers is not None and workers < 1:
        raise OptionError(f"--workers {workers} must be at least 1.", "Use --workers 1 or more, or leave it out (1 on a CPU, one per GPU).")
    if probability_dtype not in PROBABILITY_DTYPES:
        raise OptionError(f"--probability-dtype {probability_dtype} is not supported.", f"Use one of: {', '.join(PROBABILITY_DTYPES)}.")
    check_precision(precision, device, on_this_machine=scheduler is None and client is None)
    spec = output_spec(ngff, chunk, shard)
    tile_shape = shape_option(tile, "--tile")
    block_shape = shape_option(block, "--block") if block is not None else None
    if scheduler is None and client is None:
        resolve_device(device)  # an embedded cluster's GPU is this machine's
    check_not_nested(input_path, output)
    source = open_volume(input_path)
    check_is_a_tomogram(source)
    _warn_if_image_stack(source)
    decide(output, output_state(output), resume, overwrite)  # fail fast; decided again under the lock

    checkpoint = read_checkpoint(model)
    _, config = load_checkpoint(checkpoint, "cpu", name=model or "the default model")
    _check_tile(tile_shape, config.size_multiple, config.architecture)
    if scheduler is None and client is None:  # an embedded cluster's workers share this machine's memory
        count = workers or embedded_worker_count(device)
        if not device.startswith("cuda"):
            available = device_memory_available(device)
            check_forward_memory(config, tile_shape, batch, device, None if available is None else available // count)
        elif count == 1:  # the worker runs in this process; asking a GPU first makes a CUDA context, which
            # worker processes of their own would each have beside this one's (their forwards say when they run out)
            check_forward_memory(config, tile_shape, batch, device, device_memory_available(device))
    _check_voxel_size(source, config.voxel_size, ignore_voxel_size)
    plan = BlockPlan.create(source.shape, tile_shape, overlap, write_unit(spec), block_shape)
    n_levels = check_levels(levels, source.shape)
    layout = OutputLayout(ngff, spec, level_shapes(source.shape, n_levels), source.voxel_size or (config.voxel_size,) * 3,
                          _label_names(config), "uint8" if len(config.class_names) <= 255 else "uint16", config.out_channels,
                          probability_dtype if probabilities else None, source.translation)
    # what decides the output's bytes: a resumed run must repeat all of it
    where = normalize(source.path) if is_url(source.path) else os.path.abspath(source.path)
    run = {"input": where, "shape": list(source.shape), "model_sha256": hashlib.sha256(checkpoint).hexdigest(),
           "tile": list(tile_shape), "overlap": overlap, "blend": blend, "block": list(plan.block), "chunk": list(spec.chunk),
           "shard": list(spec.shard) if spec.shard else None, "ngff": ngff, "levels": n_levels,
           "probabilities": layout.probability_dtype, "precision": precision,
           # the blocks write every level (before 2026-12-01, only some: such a run cannot be resumed)
           "pyramid_levels_by_blocks": "all",
           # spill pieces hold the summed channels only, weights come from the grid (blending.py);
           # until the evening of 2026-12-01 they held every class and the weights: such a run cannot be resumed
           "blend_sums": "grid weights"}
    if not is_url(output):  # an object store has no folders to make
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with OutputLock(output) as lock:
        action = decide(output, output_state(output), resume, overwrite)
        if action == CREATE:
            normalization = intensity_statistics(source) if config.normalization == "zscore" else None
            info = {"version": __version__, "input": source.path, "origin_angstrom": list(source.origin), "run": run,
                    # so 'tileseg export --original-grid' can map the labels back without the input
                    "input_resampled": source.zarr.resampled if source.zarr else None,
                    "settings": {"batch": batch, "model": model or "default", "architecture": config.architecture,
                                 "model_voxel_size": config.voxel_size},
                    "normalization": list(normalization) if normalization else None,
                    "tiles": plan.grid.count, "blocks": plan.block_count}
        else:  # the first run's statistics, exactly: a resumed run must give the same bytes
            info = check_same_run(output, run)
            normalization = tuple(info["normalization"]) if info.get("normalization") else None
        journal = BlockJournal(output)
        if action == FINISHED:
            journal.remove()  # left over if the finishing run was stopped right after marking complete
            return RunReport(output, source.shape, 0, plan.grid.count, plan.block_count, int(info.get("foreground_voxels", 0)),
                             time.perf_counter() - started, _label_names(config), None, {"already_complete": True})
        job = BlockJob(
            source=source, plan=plan, model_key=model_key(checkpoint, device, precision), channels=config.out_channels, batch_size=batch,
            blend=blend, normalization=normalization, label_rule="argmax" if config.output == "softmax" else "threshold",
            labels_path=f"{output}/0", label_dtype=layout.label_dtype, journal=journal,
            probabilities_path=f"{output}/probabilities/0" if probabilities else None, probability_dtype=probability_dtype,
            label_levels=tuple(f"{output}/{level}" for level in range(1, n_levels)),
            probability_levels=tuple(f"{output}/probabilities/{level}" for level in range(1, n_levels)) if probabilities else (),
        )
        embedded = client is None and scheduler is None
        if embedded and threads is None:  # share this machine's cores among the embedded workers' block threads
            threads = max(1, default_torch_threads() // (workers or embedded_worker_count(device)) // blocks_in_flight(device))
        with (connect(scheduler, workers, device) if client is None else contextlib.nullcontext(client)) as active:
            link = dashboard_link(active)
            if on_start:
                on_start(plan, link)
            install_model(active, job.model_key, checkpoint, device, threads, precision)
            # the output exists only once input, model and cluster are known to be usable
            if action == CREATE:
                lock.check()
                create_output(output, layout, info, overwrite)
            done = set(journal.done()) if action == CONTINUE else set()
            if progress and done:
                progress(sum(plan.tile_count(index) for index in done))
            results = run_blocks(active, job, predict_resources(device), on_tiles=progress, done=done)
        lock.check()  # an object-store lock taken over while this run stalled: do not mark a mixed output complete
        forwarded = sum(r.tiles_forwarded for r in results)
        foreground = sum(r.foreground_voxels for r in results) + sum((journal.counts(i) or (0, 0, 0))[2] for i in done)
        seconds = time.perf_counter() - started
        finish_output(output, layout, {**info, "tiles_forwarded": forwarded, "foreground_voxels": foreground,
                                       "seconds": round(seconds, 3), "resumed_blocks": len(done)})
        journal.remove()
    return RunReport(output, source.shape, forwarded, plan.grid.count, plan.block_count, foreground, seconds,
                     _label_names(config), link, {"resumed_blocks": len(done)})


def _label_names(config: Any) -> tuple[str, ...]:
    return tuple(config.class_names) if config.out_channels > 1 else ("background", config.class_names[-1])

"""``segment``: the main job, read → plan tiles → predict → blend → write, as one library call.

This module validates everything up front (so bad input fails in a second with one clear line,
before any output exists), lays out the output OME-Zarr, and hands the block graph to
:mod:`tilesegment.executor`. The output is a label image (``image-label`` metadata, nearest-
neighbour pyramid) at the group's root, and optionally the class probabilities under
``probabilities/``. The root's ``tilesegment.status`` attribute reads ``running`` until the last
chunk and pyramid level are written, then ``complete``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import __version__
from .blocks import BlockJob
from .blending import BLEND_MODES
from .errors import InputError, OptionError, OutputError
from .geometry import Shape, shape_option
from .ome import image_label, multiscales, ome_attrs
from .plan import BlockPlan
from .pyramid import auto_levels, build_level_region, level_regions, level_shapes
from .volume import VolumeSource, intensity_statistics, open_volume
from .zarr_io import ArraySpec, create_array, create_group, output_spec, update_attrs, write_unit

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


def _check_paths(input_path: str, output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not overwrite:
        raise OutputError(f"{output} already exists.", "Choose another output path, or pass --overwrite to replace it.")
    src, dst = os.path.realpath(input_path), os.path.realpath(output)
    if dst == src or dst.startswith(src.rstrip(os.sep) + os.sep):
        raise OptionError(f"output {output} is inside the input {input_path}.", "Write the output somewhere else; tileseg never modifies its input.")
    if src.startswith(dst.rstrip(os.sep) + os.sep):
        raise OptionError(f"output {output} contains the input {input_path}; overwriting it would delete the input.", "Choose another output path.")


def _check_voxel_size(source: VolumeSource, model_voxel: float, ignore: bool) -> None:
    if source.voxel_size is None:
        log.warning("%s records no voxel size; assuming the model's %.3g Å.", source.path, model_voxel)
        return
    ratio = max(source.voxel_size) / model_voxel
    if not ignore and not (1 / VOXEL_SIZE_TOLERANCE <= ratio <= VOXEL_SIZE_TOLERANCE):
        size = " × ".join(f"{v:.4g}" for v in source.voxel_size)
        raise InputError(
            f"{source.path}: voxel size {size} Å is {ratio:.2f}× the model's {model_voxel:.4g} Å; tileseg refuses rather than resample.",
            f"Bin or rescale the tomogram to about {model_voxel:.4g} Å/voxel (e.g. IMOD 'binvol'), use a model trained at this voxel size, or pass --ignore-voxel-size.",
        )


def _check_tile(tile: Shape, multiple: int, architecture: str) -> None:
    bad = [t for t in tile if t % multiple or t < multiple]
    if bad:
        fixed = [max(multiple, -(-t // multiple) * multiple) for t in tile]
        suggestion = str(fixed[0]) if len(set(fixed)) == 1 else ",".join(map(str, fixed))
        raise OptionError(f"--tile {','.join(map(str, tile))} does not fit the {architecture} network, which needs multiples of {multiple}.",
                          f"Use --tile {suggestion}.")


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
    ignore_voxel_size: bool = False,
    threads: int | None = None,
    client: Any = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[BlockPlan, str | None], None] | None = None,
) -> RunReport:
    """Segment the tomogram at ``input_path`` into the OME-Zarr label image ``output``.

    ``progress(n)`` is called as tiles are forwarded; ``on_start(plan, dashboard_link)`` once the
    cluster is up. Raises :class:`~tilesegment.errors.TilesegError` subclasses for bad input.
    """
    from .executor import (connect, dashboard_link, default_torch_threads, embedded_worker_count, install_model,
                           map_tasks, predict_resources, run_blocks)
    from .model import load_checkpoint, read_checkpoint
    from .predict import model_key, resolve_device

    started = time.perf_counter()
    input_path, output = os.fspath(input_path), os.fspath(output)
    if blend not in BLEND_MODES:
        raise OptionError(f"--blend {blend!r} is not a blending mode.", f"Use one of: {', '.join(BLEND_MODES)}.")
    if batch < 1:
        raise OptionError(f"--batch {batch} must be at least 1.", "Use --batch 1 or more (4-16 on a GPU).")
    spec = output_spec(ngff, chunk, shard)
    tile_shape = shape_option(tile, "--tile")
    block_shape = shape_option(block, "--block") if block is not None else None
    if scheduler is None and client is None:
        resolve_device(device)  # an embedded cluster's GPU is this machine's
    _check_paths(input_path, output, overwrite)

    source = open_volume(input_path)
    checkpoint = read_checkpoint(model)
    _, config = load_checkpoint(checkpoint, "cpu", name=model or "the default model")
    _check_tile(tile_shape, config.size_multiple, config.architecture)
    _check_voxel_size(source, config.voxel_size, ignore_voxel_size)
    normalization = intensity_statistics(source) if config.normalization == "zscore" else None

    plan = BlockPlan.create(source.shape, tile_shape, overlap, write_unit(spec), block_shape)
    n_levels = levels or auto_levels(source.shape)
    shapes = level_shapes(source.shape, n_levels)
    voxel = source.voxel_size or (config.voxel_size,) * 3

    settings = {"tile": list(tile_shape), "overlap": overlap, "blend": blend, "block": list(plan.block), "batch": batch,
                "model": model or "default", "architecture": config.architecture, "model_voxel_size": config.voxel_size}
    info = {"version": __version__, "status": "running", "input": source.path, "settings": settings,
            "tiles": plan.grid.count, "blocks": plan.block_count}
    job = BlockJob(
        source=source, plan=plan, model_key=model_key(checkpoint, device), channels=config.out_channels, batch_size=batch,
        blend=blend, normalization=normalization, label_rule="argmax" if config.output == "softmax" else "threshold",
        labels_path=f"{output}/0", label_dtype="uint8" if len(config.class_names) <= 255 else "uint16",
        probabilities_path=f"{output}/probabilities/0" if probabilities else None, probability_dtype=probability_dtype,
    )
    embedded = client is None and scheduler is None
    if embedded and threads is None:  # share this machine's cores among the embedded workers
        threads = max(1, default_torch_threads() // (workers or embedded_worker_count(device)))
    with (connect(scheduler, workers, device) if client is None else contextlib.nullcontext(client)) as active:
        link = dashboard_link(active)
        if on_start:
            on_start(plan, link)
        install_model(active, job.model_key, checkpoint, device, threads)
        # the output exists only once input, model and cluster are known to be usable
        _create_output(output, job, info, ngff, spec, shapes, voxel, _label_names(config), overwrite)
        results = run_blocks(active, job, predict_resources(device, embedded), on_tiles=progress)
        for level in range(1, n_levels):
            for prefix, method in ((f"{output}/", "nearest"), *(((f"{output}/probabilities/", "mean"),) if probabilities else ())):
                src, dst = f"{prefix}{level - 1}", f"{prefix}{level}"
                tasks = [(src, dst, box, shapes[level - 1], method) for box in level_regions(shapes[level], write_unit(spec))]
                map_tasks(active, build_level_region, tasks)
    forwarded = sum(r.tiles_forwarded for r in results)
    seconds = time.perf_counter() - started
    update_attrs(output, {"tilesegment": {**info, "status": "complete", "tiles_forwarded": forwarded, "seconds": round(seconds, 3)}})
    return RunReport(output, source.shape, forwarded, plan.grid.count, plan.block_count,
                     sum(r.foreground_voxels for r in results), seconds, _label_names(config), link)


def _label_names(config: Any) -> tuple[str, ...]:
    return tuple(config.class_names) if config.out_channels > 1 else ("background", config.class_names[-1])


def _create_output(output: str, job: BlockJob, info: dict[str, Any], ngff: str, spec: ArraySpec, shapes: list[Shape],
                   voxel: Sequence[float], class_names: tuple[str, ...], overwrite: bool) -> None:
    """Lay out the output OME-Zarr: every level of labels (and probabilities), metadata, status ``running``."""
    group = create_group(output, ngff, overwrite=overwrite)
    paths = [str(i) for i in range(len(shapes))]
    factors = [2**i for i in range(len(shapes))]
    for path, shape in zip(paths, shapes):
        create_array(group, path, shape, job.label_dtype, spec)
    if job.probabilities_path:
        prob_group = group.create_group("probabilities")
        for path, shape in zip(paths, shapes):
            create_array(prob_group, path, shape, job.probability_dtype, spec, channels=job.channels)
        prob_group.attrs.update(ome_attrs(ngff, multiscales=[multiscales("probabilities", paths, voxel, factors, ngff, channel=True)]))
    group.attrs.update({
        **ome_attrs(ngff, multiscales=[multiscales("segmentation", paths, voxel, factors, ngff, method="nearest")],
                    **{"image-label": image_label(class_names, ngff)}),
        "tilesegment": info,
    })

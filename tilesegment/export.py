"""``export``: a finished segmentation back to MRC, for tools that read only MRC (IMOD, Chimera, RELION, Amira).

The label mask becomes MRC mode 0 (int8; mode 6, uint16, only if a label value exceeds 127) and
the probabilities mode 2 (float32), with the input's shape, z/y/x data order, voxel size (the scale
of the exported pyramid level) and origin (a coarser level's probabilities, 2× means, start where
their first mean's centre lies: half the level's extra voxel size further on). Probabilities: a
model with one output channel or two (background, foreground) gives one file, the foreground
probability; a model with more classes gives one file per foreground class,
``NAME_<label>_<class>.mrc``. Background is left out: it is one minus the rest.

Data are streamed z-slab by z-slab (about ``SLAB_BYTES``) with plain writes, no memory map, so
memory stays at one slab whatever the volume. Each file is written under a hidden temporary name
next to its target, header last, then renamed: a killed export never leaves a valid-looking MRC.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zarr
from mrcfile.mrcinterpreter import MrcInterpreter

from .errors import InputError, OptionError, OutputError
from .geometry import Shape
from .resample import Resampling
from .result import Segmentation, find_input, open_segmentation, origin_xyz
from .storage import check_output_file, is_url, replaced_when_written
from .volume import is_zarr_path
from .zarr_io import open_array, open_group

__all__ = ["export", "ExportReport", "probability_files", "original_grid", "SLAB_BYTES"]

SLAB_BYTES = 32 * 2**20  # bytes of one slab as written; whole planes, so at least one plane
STATS_PIECE = 1 << 20  # voxels widened to float64 at a time for the header statistics


@dataclass(frozen=True)
class ExportReport:
    mask: str
    probabilities: tuple[str, ...]
    shape: Shape  # (z, y, x)
    level: int
    voxel_size: tuple[float, float, float]  # (z, y, x) Å
    origin: tuple[float, float, float]  # (x, y, z) Å, as in the MRC header
    mask_mode: int
    seconds: float


def probability_files(segmentation: Segmentation, path: str) -> list[tuple[int, str]]:
    """``(channel, file)`` for each probability MRC ``path`` stands for (see the module docstring)."""
    channels = segmentation.channels
    if channels <= 2:
        return [(channels - 1, path)]
    stem, ext = os.path.splitext(path)
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "-", segmentation.class_name(c)).strip("-") or "class" for c in range(channels)]
    return [(c, f"{stem}_{c}_{safe[c]}{ext or '.mrc'}") for c in range(1, channels)]


class _Stats:
    """Running min, max, mean and standard deviation for the MRC header (dmin, dmax, dmean, rms)."""

    def __init__(self) -> None:
        self.count, self.total, self.squares = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, data: np.ndarray) -> None:
        flat = data.reshape(-1)
        self.low, self.high = min(self.low, float(flat.min())), max(self.high, float(flat.max()))
        for i in range(0, flat.size, STATS_PIECE):
            piece = flat[i:i + STATS_PIECE].astype(np.float64)
            self.total += float(piece.sum())
            self.squares += float(np.dot(piece, piece))
        self.count += flat.size

    def header_values(self) -> tuple[float, float, float, float]:
        mean = self.total / self.count
        return self.low, self.high, mean, float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0)))


def _header(shape: Shape, dtype: np.dtype, voxel: tuple[float, float, float], origin: tuple[float, float, float],
            stats: _Stats, label: str) -> bytes:
    """An MRC2014 header made by mrcfile itself, sized from a zero-stride stand-in for the data."""
    mrc = MrcInterpreter()
    mrc._create_default_attributes()  # mrcfile's documented way to start a header for a write-only stream
    mrc._set_new_data(np.broadcast_to(np.zeros((), dtype), shape))
    mrc.update_header_from_data()
    mrc.voxel_size = (voxel[2], voxel[1], voxel[0])
    header = mrc.header
    header.origin = origin
    header.dmin, header.dmax, header.dmean, header.rms = stats.header_values()
    mrc.add_label(label[:80])
    return header.tobytes()


def _planes_per_slab(array: zarr.Array, plane_bytes: int) -> int:
    """Whole chunks deep when they fit in ``SLAB_BYTES`` (each chunk decoded once), else fewer planes."""
    depth = max(1, SLAB_BYTES // max(1, plane_bytes))
    chunk = array.chunks[-3]
    return depth // chunk * chunk if depth >= chunk else depth


def _stream(array_path: str, channel: int | None, partial: str, dtype: np.dtype, convert: Callable[[np.ndarray], np.ndarray],
            voxel: tuple[float, float, float], origin: tuple[float, float, float], label: str,
            progress: Callable[[int], None] | None, grid: tuple[np.ndarray, ...] | None = None) -> None:
    """Write one MRC to ``partial``: zeros where the header goes, the data slab by slab, then the header.
    ``grid``: per axis, the stored voxel each written voxel takes (another grid's shape), else the stored shape."""
    array = open_array(array_path)
    nz, ny, nx = (len(g) for g in grid) if grid is not None else array.shape[-3:]
    depth = _planes_per_slab(array, ny * nx * dtype.itemsize)
    stats = _Stats()
    with open(partial, "wb") as f:
        f.write(bytes(1024))  # the header goes in last, once the statistics are known
        for z0 in range(0, nz, depth):
            if grid is None:
                index = (slice(z0, min(nz, z0 + depth)),)
            else:  # the stored planes these output planes take, read once, then picked
                planes = grid[0][z0:z0 + depth]
                index = (slice(int(planes[0]), int(planes[-1]) + 1),)
            slab = np.asarray(array[index if channel is None else (channel, *index)])
            if grid is not None:
                slab = slab.take(planes - planes[0], axis=0).take(grid[1], axis=1).take(grid[2], axis=2)
            data = np.ascontiguousarray(convert(slab), dtype=dtype)
            stats.add(data)
            f.write(memoryview(data).cast("B"))
            if progress:
                progress(data.size)
        f.seek(0)
        f.write(_header((nz, ny, nx), dtype, voxel, origin, stats, label))
        f.flush()
        os.fsync(f.fileno())


def original_grid(segmentation: Segmentation) -> Resampling:
    """How 'tileseg convert --voxel-size' made the tomogram that ``segmentation`` was segmented from:
    recorded by the run (since 2026-12-03), else read from that tomogram's metadata, if it is still there."""
    record = segmentation.meta.get("input_resampled")
    if not isinstance(record, dict):
        source = find_input(segmentation)
        try:
            ours = dict(open_group(source).attrs).get("tilesegment", {}) if source and is_zarr_path(source) else {}
            record = ours.get("resampled") if isinstance(ours, dict) else None
        except Exception:
            record = None
    if not isinstance(record, dict):
        raise OptionError(f"--original-grid: {segmentation.path} was not segmented from a tomogram that 'tileseg convert "
                          "--voxel-size' resampled (or that tomogram is gone), so there is no other grid to map it back to.",
                          "Leave out --original-grid: the mask lies on the grid of the tomogram it was segmented from.")
    try:
        plan = Resampling(tuple(int(n) for n in record["from_shape"]), tuple(float(v) for v in record["from_angstrom"]),  # type: ignore[arg-type]
                          tuple(float(v) for v in record["to_angstrom"]))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{segmentation.path}: its tomogram's resampling record is unreadable ({record!r}).",
                         "Export without --original-grid.") from None
    if plan.out_shape != tuple(segmentation.shapes[0]):
        raise InputError(f"{segmentation.path}: its labels are {'×'.join(map(str, segmentation.shapes[0]))} voxels, not the "
                         f"{'×'.join(map(str, plan.out_shape))} that resampling {'×'.join(map(str, plan.shape))} voxels gives.",
                         "Export without --original-grid.")
    return plan


def _labels_to(dtype: np.dtype, path: str) -> Callable[[np.ndarray], np.ndarray]:
    top = np.iinfo(dtype).max

    def convert(labels: np.ndarray) -> np.ndarray:
        if labels.size and int(labels.max()) > top:
            raise InputError(f"{path}: holds label value {int(labels.max())}, more than MRC mode 0 (int8) can store.",
                             "Report this: the label metadata lists fewer classes than the mask holds.")
        if labels.dtype.itemsize == dtype.itemsize and labels.dtype.kind in "iu":
            return labels.view(dtype)  # the values fit (checked above): the same bytes, no copy
        return labels.astype(dtype)

    return convert


def _probabilities_to_float(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint8:  # stored as round(p * 255)
        return data.astype(np.float32) / np.float32(255)
    return data.astype(np.float32, copy=False)


def export(output: str | os.PathLike, mask: str | os.PathLike, *, probabilities: str | os.PathLike | None = None,
           level: int = 0, overwrite: bool = False, original: bool = False,
           progress: Callable[[int], None] | None = None) -> ExportReport:
    """Write the label mask (and optionally the probabilities) of the segmentation ``output`` as MRC files.

    ``original``: on the grid of the tomogram that 'tileseg convert --voxel-size' resampled (its
    shape, voxel size and origin), each voxel taking the nearest resampled voxel's value."""
    started = time.perf_counter()
    output, mask = os.fspath(output), os.fspath(mask)
    probabilities = os.fspath(probabilities) if probabilities is not None else None
    segmentation = open_segmentation(output)
    index = segmentation.level(level)
    if original and index:
        raise OptionError(f"--original-grid maps full-resolution labels back to the tomogram they were resampled from, not level {index}.",
                          "Leave out --level, or --original-grid.")
    plan = original_grid(segmentation) if original else None
    prob_files: list[tuple[int, str]] = []
    if probabilities is not None:
        if not segmentation.probabilities:
            raise OptionError(f"{output} holds no probabilities.", "Leave out --probabilities, or run again with 'tileseg run --probabilities'.")
        prob_files = probability_files(segmentation, probabilities)
    targets = [mask] + [p for _, p in prob_files]
    if len({os.path.abspath(t) for t in targets}) != len(targets):
        raise OptionError(f"the mask and the probabilities would both be written to {mask}.", "Give --probabilities another file name.")
    source = find_input(segmentation)
    for target in targets:
        if source and not is_url(source) and os.path.exists(target) and os.path.samefile(target, source):
            stem = os.path.basename(target).split(".")[0]
            raise OutputError(f"{target} is the tomogram {output} was segmented from; writing there would replace it, even with --overwrite.",
                              f"Give the mask another name, such as {stem}_mask.mrc.")
        check_output_file(target, overwrite, "mask.mrc")

    shape = segmentation.shapes[index]
    voxel = segmentation.voxel_sizes[index]
    origin = origin_xyz(segmentation)
    grid = None
    if plan is not None:  # the resampled grid's first centre moved by the shift; the original's did not
        shape, voxel, grid = plan.shape, plan.voxel, tuple(plan.nearest_resampled(axis) for axis in range(3))
        origin = tuple(o - d for o, d in zip(origin, plan.origin_shift[::-1]))  # type: ignore[assignment]
    top_label = max([*segmentation.classes, segmentation.channels - 1, 1])
    label_dtype = np.dtype("<i1") if top_label <= 127 else np.dtype("<u2")
    where = f"level {index}" if index else "on the original grid" if grid is not None else "full resolution"
    # a coarser level's labels are every second voxel, so they start where level 0 does; its mean
    # probabilities start half its extra size further on (ome.level_translation)
    fine = segmentation.voxel_sizes[0]
    mean_origin = tuple(o + (2**index - 1) / 2 * v for o, v in zip(origin, (fine[2], fine[1], fine[0])))
    jobs = [(segmentation.levels[index], None, mask, label_dtype, _labels_to(label_dtype, output), "labels", origin)]
    for channel, target in prob_files:
        name = segmentation.class_name(channel if segmentation.channels > 1 else 1)
        jobs.append((segmentation.probabilities[index], channel, target, np.dtype("<f4"), _probabilities_to_float, f"P({name})", mean_origin))
    with contextlib.ExitStack() as files:  # every file under its temporary name first, so an interrupted export leaves no MRC at all
        partials = [files.enter_context(replaced_when_written(job[2])) for job in jobs]
        for (array_path, channel, _, dtype, convert, what, start), partial in zip(jobs, partials):
            label = f"tileseg export: {what} of {os.path.basename(output)} ({where})".encode("ascii", "replace").decode()
            _stream(array_path, channel, partial, dtype, convert, voxel, start, label, progress, grid)
    return ExportReport(mask, tuple(p for _, p in prob_files), shape, index, voxel, origin,
                        0 if label_dtype.itemsize == 1 else 6, time.perf_counter() - started)

"""``preview``: one PNG to check a segmentation by eye, without a viewer.

The three orthogonal slices through a point (xy top left, xz below it, yz to its right, as in IMOD
and Fiji's orthogonal views) of the tomogram in grey, contrast from its 1st-99th percentiles, with
the label mask over it in the label image's own colours (alpha ``ALPHA``, background transparent)
and a legend of class names. Only the three planes are read, from a pyramid level coarse enough
that the picture stays within about ``MAX_SIDE`` pixels; small volumes are enlarged by a whole
factor so that they can be seen. Without the tomogram the mask is drawn alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError, OptionError, OutputError
from .geometry import Box, ceil_div
from .ome import LABEL_COLORS
from .result import Segmentation, find_input, open_segmentation
from .storage import check_output_file, replaced_when_written
from .volume import VolumeSource, describe_zarr_input, open_volume, read_volume
from .zarr_io import read_region

__all__ = ["preview", "PreviewReport", "ALPHA", "GAP", "MAX_SIDE"]

ALPHA = 0.45  # opacity of the label colours over the tomogram
GAP = 4  # pixels between panels
MAX_SIDE = 1024  # the slices alone stay within this many pixels per side
TARGET_SIDE = 512  # smaller pictures are enlarged (nearest neighbour) towards this, at most MAX_ZOOM times
MAX_ZOOM = 4
LINE = 16  # legend line height, pixels
PANEL_BACKGROUND = (24, 24, 24)


@dataclass(frozen=True)
class PreviewReport:
    path: str
    size: tuple[int, int]  # (width, height) in pixels
    level: int
    step: int  # extra subsampling of the level's voxels (1 unless even the coarsest level is too big)
    zoom: int  # pixels per voxel of the level (after ``step``)
    position: tuple[int, int, int]  # (z, y, x) of the slices, in full-resolution voxels
    panels: dict[str, tuple[int, int, int, int]]  # name -> (left, top, width, height) in pixels
    tomogram: str | None
    note: str | None = None


def _choose_level(segmentation: Segmentation, level: int | None) -> tuple[int, int]:
    """The requested level, else the finest whose slices fit in ``MAX_SIDE``; and the extra step."""
    def side(shape: Sequence[int]) -> int:
        nz, ny, nx = shape
        return max(nx + nz, ny + nz) + GAP

    if level is None:
        fitting = [i for i, shape in enumerate(segmentation.shapes) if side(shape) <= MAX_SIDE]
        level = fitting[0] if fitting else len(segmentation.shapes) - 1
    level = segmentation.level(level)
    return level, max(1, ceil_div(side(segmentation.shapes[level]), MAX_SIDE))


def _position(position: Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int]:
    if position is None:
        return tuple(n // 2 for n in shape)  # type: ignore[return-value]
    if len(position) != 3 or any(not 0 <= p < n for p, n in zip(position, shape)):
        raise OptionError(f"--position {','.join(map(str, position))} is outside the volume of {'×'.join(map(str, shape))} voxels (z, y, x).",
                          f"Give Z,Y,X with 0 <= Z < {shape[0]}, 0 <= Y < {shape[1]}, 0 <= X < {shape[2]} (full-resolution voxels).")
    return tuple(int(p) for p in position)  # type: ignore[return-value]


def _planes(read, shape: Sequence[int], at: Sequence[int], step: int, strided_yz: bool = False) -> list[np.ndarray]:
    """xy (y, x), xz (z, x) and yz (y, z) planes through ``at``, every ``step``-th voxel.

    ``read(box)`` reads a (z, y, x) box. ``strided_yz`` reads the yz plane one kept z at a time:
    an MRC file reads a one-voxel-wide column row by row, so skipping z saves most of the reads.
    """
    nz, ny, nx = shape
    z, y, x = at
    xy = read(Box((z, 0, 0), (z + 1, ny, nx)))[0, ::step, ::step]
    xz = read(Box((0, y, 0), (nz, y + 1, nx)))[::step, 0, ::step]
    if strided_yz and step > 1:
        yz = np.stack([read(Box((k, 0, x), (k + 1, ny, x + 1)))[0, ::step, 0] for k in range(0, nz, step)], axis=1)
    else:
        yz = read(Box((0, 0, x), (nz, ny, x + 1)))[::step, :, 0].T[::step]
    return [xy, xz, yz]


def _tomogram_planes(source: VolumeSource, segmentation: Segmentation, level: int, step: int,
                     at_level: Sequence[int]) -> list[np.ndarray]:
    """The tomogram's planes matching the label planes: from its own pyramid level if it has one of
    that shape, else from full resolution, every ``2**level * step``-th voxel (as the label pyramid)."""
    if source.zarr is not None and level < len(source.zarr.levels):
        info = describe_zarr_input(source.zarr.levels[level])
        if info.shape == segmentation.shapes[level]:
            coarse = VolumeSource(info.array_path, info.shape, info.dtype, None, zarr=info)
            return _planes(lambda box: read_volume(coarse, box), info.shape, at_level, step)
    return _planes(lambda box: read_volume(source, box), source.shape, [p << level for p in at_level], step * 2**level,
                   strided_yz=source.mrc is not None)


def _grey(planes: list[np.ndarray]) -> list[np.ndarray]:
    values = np.concatenate([p.ravel() for p in planes]).astype(np.float64)
    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    scale = 255.0 / (high - low) if high > low else 0.0
    return [np.clip((np.nan_to_num(p.astype(np.float64), nan=low) - low) * scale, 0, 255).astype(np.uint8) for p in planes]


def _colour(segmentation: Segmentation, value: int) -> tuple[int, int, int]:
    rgba = segmentation.colors.get(value) or LABEL_COLORS[(value - 1) % len(LABEL_COLORS)]
    return tuple(int(c) for c in rgba[:3])  # type: ignore[return-value]


def _overlay(grey: np.ndarray | None, labels: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    if grey is None:  # the mask alone: colours at full strength on a dark background
        rgb, alpha = np.zeros((*labels.shape, 3), np.float64), 1.0
    else:
        rgb, alpha = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64), ALPHA
    for value, colour in colours.items():
        hit = labels == value
        rgb[hit] = (1 - alpha) * rgb[hit] + alpha * np.asarray(colour, np.float64)
    return np.rint(rgb).astype(np.uint8)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except (ImportError, TypeError, ValueError):  # Pillow without FreeType: its small bitmap font
        return ImageFont.load_default()


def _compose(rgb: list[np.ndarray], zoom: int, entries: list[tuple[tuple[int, int, int], str]], info: list[str]):
    """The three panels, enlarged ``zoom`` times, and the legend: in the empty corner below the yz
    panel when it fits there, else in a strip below."""
    from PIL import Image, ImageDraw

    (ny, nx), nz = rgb[0].shape[:2], rgb[1].shape[0]
    panels = {"xy": (0, 0, zoom * nx, zoom * ny), "xz": (0, zoom * ny + GAP, zoom * nx, zoom * nz),
              "yz": (zoom * nx + GAP, 0, zoom * nz, zoom * ny)}
    font = _font()
    legend_w = 8 + max([20 + int(font.getlength(t)) for _, t in entries] + [int(font.getlength(t)) for t in info])
    legend_h = 8 + LINE * (len(entries) + len(info))
    width, height = zoom * (nx + nz) + GAP, zoom * (ny + nz) + GAP
    if legend_w <= zoom * nz and legend_h <= zoom * nz:
        x, y = zoom * nx + GAP + 4, zoom * ny + GAP + 4
    else:
        x, y = 4, height + 4
        width, height = max(width, legend_w), height + legend_h
    image = Image.new("RGB", (width, height), PANEL_BACKGROUND)
    for name, panel in zip(("xy", "xz", "yz"), rgb):
        image.paste(Image.fromarray(np.repeat(np.repeat(panel, zoom, axis=0), zoom, axis=1)), panels[name][:2])
    draw = ImageDraw.Draw(image)
    for colour, text in entries:
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=colour)
        draw.text((x + 16, y), text, fill=(235, 235, 235), font=font)
        y += LINE
    for text in info:
        draw.text((x, y), text, fill=(180, 180, 180), font=font)
        y += LINE
    return image, panels


def preview(output: str | os.PathLike, png: str | os.PathLike, *, tomogram: str | os.PathLike | None = None, level: int | None = None,
            position: Sequence[int] | None = None, zoom: int | None = None) -> PreviewReport:
    """Draw the orthogonal slices of the segmentation ``output`` (over its tomogram) into ``png``."""
    output, png = os.fspath(output), os.fspath(png)
    if not png.lower().endswith(".png"):
        raise OptionError(f"{png}: the preview is a PNG image; its name must end in .png.", "Give a name such as preview.png.")
    check_output_file(png, True, "preview.png")  # before the drawing: a preview replaces an older one
    if zoom is not None and zoom < 1:
        raise OptionError(f"zoom {zoom} must be at least 1.", "Give 1 or more, or leave it out.")
    segmentation = open_segmentation(output)
    level, step = _choose_level(segmentation, level)
    at = _position(position, segmentation.shapes[0])
    shape = segmentation.shapes[level]
    at_level = tuple(min(p >> level, n - 1) for p, n in zip(at, shape))
    labels = _planes(lambda box: read_region(segmentation.levels[level], box), shape, at_level, step)

    note = None
    if tomogram is not None:
        source_path: str | None = os.fspath(tomogram)
    else:
        source_path = find_input(segmentation)
        if source_path is None:
            note = f"the tomogram {segmentation.meta.get('input')!r} recorded in {output} is not there; drawing the mask alone (give --tomogram to add it)."
    greys: list[np.ndarray | None] = [None] * 3
    if source_path is not None:
        source = open_volume(source_path)
        if source.shape != segmentation.shapes[0]:
            raise InputError(f"{source_path}: shape {'×'.join(map(str, source.shape))} differs from the segmentation's "
                             f"{'×'.join(map(str, segmentation.shapes[0]))}.", "Give the tomogram that was segmented (--tomogram).")
        greys = _grey(_tomogram_planes(source, segmentation, level, step, at_level))  # type: ignore[assignment]

    found = set().union(*(np.unique(p).tolist() for p in labels)) | set(segmentation.classes)
    colours = {v: _colour(segmentation, v) for v in sorted(found) if v != 0}
    rgb = [_overlay(g, lab, colours) for g, lab in zip(greys, labels)]
    zoom = zoom or max(1, min(MAX_ZOOM, TARGET_SIDE // (max(rgb[0].shape[:2]) + rgb[1].shape[0])))
    entries = [(colour, f"{v} {segmentation.class_name(v)}") for v, colour in colours.items()]
    info = [f"xy at z={at[0]}, xz at y={at[1]}, yz at x={at[2]}",
            f"level {level}{f' every {step}' if step > 1 else ''}, {segmentation.voxel_sizes[level][-1] * step / 10:.3g} nm/voxel"]
    image, panels = _compose(rgb, zoom, entries, info)
    try:
        with replaced_when_written(png) as partial:
            image.save(partial, format="PNG", optimize=True)
    except OSError as exc:
        raise OutputError(f"cannot write {png}: {exc.strerror or exc}.", "Check that its folder exists and is writable.") from None
    return PreviewReport(png, image.size, level, step, zoom, at, panels, source_path, note)

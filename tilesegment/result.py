"""Reading a finished segmentation (the OUTPUT.zarr of ``tileseg run``) for export and preview.

Everything downstream of a run needs the same few facts: where each pyramid level is, its voxel
size, the class names and colours, the probabilities, and the input tomogram and its origin. They
are read once here from the OME and ``tilesegment`` attributes. A run that has not finished is
refused with the command that finishes it: its unwritten chunks read as background, and a silently
truncated mask is worse than an error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, OptionError
from .geometry import Shape
from .mrc import inspect_mrc
from .ome import dataset_voxel_sizes, label_classes, label_colors, read_ome_attrs
from .storage import describe_failure, exists, is_url, join, parent, remedy
from .volume import is_zarr_path
from .zarr_io import open_group

__all__ = ["Segmentation", "open_segmentation", "find_input", "origin_xyz"]

RGBA = tuple[int, int, int, int]


@dataclass(frozen=True)
class Segmentation:
    """A complete segmentation output: its levels (finest first) and what its metadata says."""

    path: str
    meta: dict[str, Any]
    levels: tuple[str, ...]  # array paths of the label pyramid
    shapes: tuple[Shape, ...]
    voxel_sizes: tuple[tuple[float, float, float], ...]  # Å per voxel (z, y, x), per level
    classes: dict[int, str] = field(default_factory=dict)
    colors: dict[int, RGBA] = field(default_factory=dict)
    probabilities: tuple[str, ...] = ()  # array paths of the (c, z, y, x) probability pyramid, if any
    channels: int = 0

    def level(self, level: int | None, option: str = "--level") -> int:
        """``level`` checked against the pyramid (0 when None)."""
        level = 0 if level is None else level
        if not 0 <= level < len(self.levels):
            raise OptionError(f"{option} {level}: {self.path} has levels 0 to {len(self.levels) - 1}.",
                              f"Give {option} between 0 (full resolution) and {len(self.levels) - 1}.")
        return level

    def class_name(self, value: int) -> str:
        return self.classes.get(value, "background" if value == 0 else f"label {value}")


def _fail(path: str, what: str, fix: str = "Give the OUTPUT.zarr folder written by 'tileseg run'.") -> InputError:
    return InputError(f"{path}: {what}", fix)


def _multiscale(path: str, attrs: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[float, float, float]]]:
    try:
        entry = read_ome_attrs(attrs)["multiscales"][0]
        return entry, dataset_voxel_sizes(entry)
    except (KeyError, IndexError, TypeError, ValueError, StopIteration):
        raise _fail(path, "has no usable OME 'multiscales' metadata.") from None


def open_segmentation(path: str | os.PathLike) -> Segmentation:
    """Open a segmentation output, or raise :class:`InputError` saying why it cannot be used."""
    path = os.fspath(path).rstrip("/")
    try:
        there = exists(path)
    except Exception as exc:  # only URLs get here: no credentials, endpoint unreachable, ...
        raise InputError(f"{path}: cannot be read: {describe_failure(exc)}.", remedy(path, exc)) from None
    if not there:
        raise _fail(path, "no such file or directory.")
    try:
        group = open_group(path)
        attrs = dict(group.attrs)
    except Exception:
        raise _fail(path, "is not a Zarr group.") from None
    meta = attrs.get("tilesegment")
    if not isinstance(meta, dict) or "status" not in meta:
        raise _fail(path, "is not a tileseg segmentation (it has no 'tilesegment' status attribute).")
    if meta["status"] != "complete":
        source = meta.get("input") or "INPUT"
        raise _fail(path, f"the segmentation is not complete (status '{meta['status']}'): its run was interrupted or is still writing.",
                    f"Finish it with 'tileseg run {source} {path} --resume' (or wait for the running job), then try again.")
    if "image-label" not in read_ome_attrs(attrs):
        raise _fail(path, "is an image, not a label image (it has no OME 'image-label' metadata), e.g. a 'tileseg convert' output.")
    entry, voxel_sizes = _multiscale(path, attrs)
    names = [d["path"] for d in entry["datasets"]]
    if not names or any(n not in group for n in names):
        raise _fail(path, f"lists pyramid levels {names} in its metadata but not all of them exist.", "The output is damaged; run the segmentation again.")
    shapes = tuple(tuple(int(n) for n in group[n].shape) for n in names)
    if any(len(s) != 3 for s in shapes):
        raise _fail(path, f"holds label arrays of shapes {list(shapes)}, not 3D (z, y, x).")
    label = read_ome_attrs(attrs)["image-label"] or {}
    probabilities: tuple[str, ...] = ()
    channels = 0
    if "probabilities" in group:
        prob_attrs = dict(group["probabilities"].attrs)
        prob_entry, _ = _multiscale(f"{path}/probabilities", prob_attrs)
        probabilities = tuple(f"{path}/probabilities/{d['path']}" for d in prob_entry["datasets"])
        channels = int(group["probabilities"][prob_entry["datasets"][0]["path"]].shape[0])
    return Segmentation(path, meta, tuple(f"{path}/{n}" for n in names), shapes, tuple(voxel_sizes),  # type: ignore[arg-type]
                        label_classes(label), label_colors(label), probabilities, channels)


def find_input(segmentation: Segmentation) -> str | None:
    """The recorded input tomogram if it still exists: as recorded (absolute, or relative to the
    current folder, as the run was given it), else relative to the output's own folder."""
    run = segmentation.meta.get("run")
    recorded = [segmentation.meta.get("input"), run.get("input") if isinstance(run, dict) else None]
    candidates = [p for p in recorded if isinstance(p, str) and p]
    folder = parent(segmentation.path)
    candidates += [join(folder, p) for p in candidates if not is_url(p) and not os.path.isabs(p)]
    return next((c for c in candidates if _exists(c)), None)


def _exists(path: str) -> bool:
    try:
        return exists(path)
    except Exception:  # an unreachable input only costs the drawing under the mask
        return False


def _finite3(values: Any) -> tuple[float, float, float] | None:
    try:
        a, b, c = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return (a, b, c) if all(math.isfinite(v) for v in (a, b, c)) else None


def origin_xyz(segmentation: Segmentation) -> tuple[float, float, float]:
    """The input tomogram's origin (x, y, z) in Å: as the run recorded it, else from the input's MRC
    header (or the origin 'tileseg convert' kept from it), else zero (MRC's own default)."""
    recorded = _finite3(segmentation.meta.get("origin"))  # (x, y, z), as in an MRC header
    if recorded is not None:
        return recorded
    zyx = _finite3(segmentation.meta.get("origin_angstrom"))  # (z, y, x), as 'tileseg convert' records it
    if zyx is not None:
        return (zyx[2], zyx[1], zyx[0])
    source = find_input(segmentation)
    if source is None:
        return (0.0, 0.0, 0.0)
    try:
        if is_zarr_path(source):
            zyx = _finite3(dict(open_group(source).attrs).get("tilesegment", {}).get("origin_angstrom"))
        else:
            zyx = _finite3(inspect_mrc(source).origin)
    except Exception:  # an unreadable input only costs the origin, which is then zero
        zyx = None
    return (zyx[2], zyx[1], zyx[0]) if zyx else (0.0, 0.0, 0.0)

"""The simulator's macromolecule templates: finding, reading, filtering and normalising density maps.

Its own module because every simulated particle starts here, and a template is prepared once per
process (cached) for both the in-memory and the out-of-core simulation. The maps themselves are
the data folder ``tilesegment/templates/`` next to this module (see its README for attribution).

Density maps of real complexes (``tilesegment/templates``, 10 Å/voxel, from the polnet project,
computed from PDB entries) are low-pass filtered (Gaussian, sigma 1 voxel), resampled to
``voxel_size`` and divided by their *interior level* (95th percentile of the voxels above 10 % of
the maximum), so protein interior is about 1 in every template. A prepared :class:`Template` also
holds what resampling a rotated copy needs (see :mod:`tilesegment.placement`).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .errors import InputError, OptionError
from .options import positive_option

__all__ = [
    "TEMPLATE_DIR",
    "TEMPLATE_SUFFIXES",
    "Template",
    "list_templates",
    "load_template",
    "template_name",
    "resolve_template",
    "prepared_template",
    "prepared_templates",
]

TEMPLATE_DIR = Path(__file__).with_name("templates")
TEMPLATE_SUFFIXES = (".mrc.gz", ".mrc", ".map.gz", ".map")
TEMPLATE_SIGMA = 1.0  # Gaussian low-pass of the raw maps, in output voxels (and at least one map voxel)
INTERIOR_PERCENTILE = 95.0  # the interior level: this percentile of the voxels above ...
INTERIOR_FLOOR = 0.1  # ... this fraction of the filtered maximum
SUPPORT_LEVEL = 0.01  # density below this fraction of the interior level is set to zero


def list_templates(directory: str | os.PathLike | None = None) -> list[str]:
    """Ids of the templates shipped with tilesegment, or of the MRC maps in ``directory``."""
    folder = Path(directory) if directory is not None else TEMPLATE_DIR
    if not folder.is_dir():
        raise OptionError(f"template folder {str(folder)!r} does not exist.", "Give a folder holding .mrc or .mrc.gz density maps.")
    return sorted({template_name(p.name) for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TEMPLATE_SUFFIXES)})


def template_name(name: str) -> str:
    """A map's file name without its template suffix (``1bxn.mrc.gz`` -> ``1bxn``)."""
    for suffix in TEMPLATE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_template(id_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(class name, file)`` of a shipped id or a path to a map."""
    text = os.fspath(id_or_path)
    shipped = TEMPLATE_DIR / f"{text.lower()}.mrc.gz"
    if os.sep not in text and shipped.is_file():
        return text.lower(), str(shipped)
    if os.path.isfile(text):
        return template_name(os.path.basename(text)), text
    raise OptionError(f"unknown template {text!r}.",
                      f"Use a shipped id ({', '.join(list_templates())}) or the path of an MRC density map.")


class Template(NamedTuple):
    """A prepared template: its normalised density and the precomputed arrays that resampling reads."""

    name: str
    density: np.ndarray  # filtered, normalised, read-only
    centre: np.ndarray  # centre of mass (z, y, x) in voxels: the particle's position
    half: int  # a rotated, shifted particle fits in a (2 half + 1)³ cube around its centre voxel
    padded: np.ndarray  # density with a zero border, raveled: trilinear reads need no bounds checks
    origin: np.ndarray  # (3, 1) float32: the centre in the padded array
    strides: tuple[int, int]  # element strides of the padded array along z and y (x is 1)
    offsets: np.ndarray  # (3, M) float32: the cube voxels within ``half`` of the cube centre, relative to it
    index: np.ndarray  # (M,) their flat index in the cube
    grid: np.ndarray  # (M, 3) their (z, y, x) index in the cube


def _read_map(path: str) -> tuple[np.ndarray, float]:
    import mrcfile

    try:
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.array(mrc.data, dtype=np.float32)
            voxel = float(mrc.voxel_size.x)
    except Exception as exc:  # mrcfile raises ValueError, OSError, EOFError ... for bad files
        raise InputError(f"{path}: is not a readable MRC density map ({exc}).", "Give an MRC/CCP4 map (.mrc or .mrc.gz) of one complex.") from None
    if data.ndim != 3 or min(data.shape) < 3:
        raise InputError(f"{path}: holds a {data.shape} array, not a 3D density map.", "Give a 3D map (a cube around one complex).")
    if not np.isfinite(data).all() or data.max() <= 0:
        raise InputError(f"{path}: has no positive finite density.", "Give a density map with protein positive (not inverted) and no NaN/inf.")
    return data, voxel


@lru_cache(maxsize=64)
def prepared_template(id_or_path: str, voxel_size: float) -> Template:
    """Read, low-pass, resample and normalise a map once per process (see the module docstring)."""
    import scipy.ndimage as ndi

    name, path = resolve_template(id_or_path)
    data, native = _read_map(path)
    native = native if native > 0 else voxel_size  # a map without a voxel size is taken at voxel_size
    factor = voxel_size / native
    data = ndi.gaussian_filter(data, TEMPLATE_SIGMA * max(1.0, factor), mode="constant")
    if abs(factor - 1.0) > 1e-6:
        data = ndi.zoom(data, 1.0 / factor, order=1, mode="grid-constant", grid_mode=True)
    data = np.maximum(data, 0.0, dtype=np.float32)
    peak = float(data.max())
    if peak <= 0:
        raise InputError(f"{path}: the map vanishes at {voxel_size} Å/voxel.", "Use a smaller voxel size or a larger complex.")
    data /= np.percentile(data[data > INTERIOR_FLOOR * peak], INTERIOR_PERCENTILE)
    data[data < SUPPORT_LEVEL] = 0.0
    centre = np.asarray(ndi.center_of_mass(data), dtype=np.float64)
    reach = float(np.sqrt(((np.argwhere(data > 0) - centre) ** 2).sum(axis=1)).max())
    data.flags.writeable = False
    return _prepare(name, data, centre, reach)


def prepared_templates(ids_or_paths: Sequence[str], voxel_size: float) -> list[Template]:
    """:func:`prepared_template` of each, in order (label k is the (k-1)th)."""
    return [prepared_template(t, voxel_size) for t in ids_or_paths]


def _prepare(name: str, data: np.ndarray, centre: np.ndarray, reach: float) -> Template:
    """Precompute what resampling needs: a zero-padded copy and the cube voxels that can be non-zero.

    A sample at distance d from the particle's position reads voxels within d + sqrt(3) of the
    template centre, and the sub-voxel shift moves the cube by up to sqrt(3)/2: a cube voxel
    farther than reach + 2.6 from the cube centre is always zero.
    """
    half = int(math.ceil(reach + 2.6))
    grid = np.indices((2 * half + 1,) * 3).reshape(3, -1).T
    inside = ((grid - half) ** 2).sum(axis=1) <= half * half
    pad = half + 3
    padded = np.pad(data, pad)
    strides = (padded.shape[1] * padded.shape[2], padded.shape[2])
    return Template(name, data, centre, half, padded.ravel(), (centre + pad).astype(np.float32)[:, None], strides,
                    np.ascontiguousarray((grid[inside] - half).T, dtype=np.float32), np.flatnonzero(inside), grid[inside].astype(np.int32))


def load_template(id_or_path: str | os.PathLike, voxel_size: float = 10.0) -> np.ndarray:
    """A template's density at ``voxel_size`` Å: low-passed, interior level 1, float32 (z, y, x).

    ``id_or_path`` is a shipped id (see :func:`list_templates`) or the path of an MRC map (its
    header's voxel size is used; a map without one is taken to be at ``voxel_size``).
    """
    return prepared_template(os.fspath(id_or_path), positive_option(voxel_size, "voxel_size", "e.g. 10.0 (Å)")).density.copy()

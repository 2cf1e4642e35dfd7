"""Realistic simulated cryo-ET tomograms with ground truth, for training and testing segmentation.

The model follows the simulations of Xu et al. and Liu et al. (ICIP 2018, "Deep learning based
supervised semantic segmentation of electron cryo-subtomograms"): crowded cellular volumes built
from real macromolecular structures, imaged with the microscope's contrast transfer function (CTF),
a limited tilt range (missing wedge) and noise at a chosen signal-to-noise ratio.

Model, step by step (every number is a :class:`SimulationConfig` field):

1. **Templates.** Density maps of real complexes (``tilesegment/templates``, 10 Å/voxel, from the
   polnet project, computed from PDB entries) are low-pass filtered (Gaussian, sigma 1 voxel),
   resampled to ``voxel_size`` and divided by their *interior level* (95th percentile of the
   voxels above 10 % of the maximum), so protein interior is about 1 in every template.
2. **Crowding.** Particles of kinds drawn uniformly from ``templates`` get a rotation uniform on
   SO(3) (a normalised Gaussian quaternion) and a uniform sub-voxel offset, and are resampled by
   trilinear interpolation (the same values as ``scipy.ndimage.affine_transform`` with order 1,
   computed faster). Each is tried at up to ``attempts`` random positions, tested against an
   occupancy grid (the label map); it is pasted at the first one where its mask overlaps no
   placed particle (touching is allowed; particles may be cut by the volume border). Placement
   stops when the masks cover ``density`` of the volume or ``patience`` particles in a row found
   no room (then ``Simulation.density`` is below the goal). Big complexes fail more often in a
   crowded volume, so the counts per kind end up unequal.
3. **Ground truth.** A particle's mask is its rotated noise-free density (before CTF, wedge and
   noise) above ``mask_threshold`` (a fraction of the interior level). ``labels`` holds the
   1-based index of the particle's kind in ``templates`` (0 = background), ``instances`` the
   1-based particle number. The rendered density is the sum of the particles' densities (their
   faint halos below the threshold may overlap).
4. **Microscope.** The density is filtered in 3D Fourier space by the CTF evaluated at the
   spatial frequency ``|k|`` (weak-phase approximation; the common approximation for a
   tomogram, ignoring the defocus gradient across tilted images) and by the missing wedge of a
   single-axis tilt series of ``±tilt_range`` degrees about the y axis: Fourier components whose
   direction lies outside the tilt range (``|k_z| > tan(tilt_range)·|k_x|``) are set to zero.
   This is the Fourier-mask approximation of projection + weighted back-projection with
   continuous angular sampling, not a real projection/reconstruction.
   ``CTF(k) = -[sqrt(1 - A²)·sin γ + A·cos γ]·exp(-B k²/4)``, ``γ = π λ Δf k² - π/2 Cs λ³ k⁴``,
   with ``Δf = defocus_um`` (positive = underfocus, the CTFFIND/RELION convention), ``A =
   amplitude_contrast``, ``B = bfactor`` (Å², 0 = no envelope) and λ the relativistic electron
   wavelength at ``voltage_kv``. In underfocus the CTF is negative at low frequency: protein is
   dark in a raw tomogram. **The output is negated (filtered by -CTF): protein is bright**, as
   most segmentation tools expect.
5. **Noise.** White Gaussian noise, restricted to the same tilt range (a reconstruction has no
   data, hence no noise, in the missing wedge), is scaled so that
   ``SNR = var(signal) / var(noise)`` exactly (Xu et al.'s definition), where *signal* is the
   CTF- and wedge-filtered noise-free volume (``Simulation.clean``) and *noise* is
   ``tomogram - clean``. ``snr=float('inf')`` adds no noise.

Output units are arbitrary (interior protein density ~1, times the transfer function). The
Fourier filtering is periodic: a particle cut by one face rings faintly at the opposite face.

The same config (seed included) gives bit-identical outputs on one machine and library stack. :func:`simulate_volume` works in memory
up to ``IN_MEMORY_LIMIT`` voxels per axis (about 30 bytes per voxel at peak). Above that,
:func:`simulate` computes the same model out of core: particles are placed globally, the density
is rendered and the 3D FFT done slab by slab (``SLAB_VOXELS`` voxels) through an anonymous
scratch file of 4 bytes per voxel next to the output, and the MRC files are written slab by slab
through ``mrcfile.new_mmap``. Memory then holds the uint8 label map (1 byte per voxel, the
placement's occupancy grid) and a few slabs; the result equals the in-memory one up to float
rounding. Placement is the slow part: about 2 ms per particle, roughly 3000 particles per 256³
at density 0.25.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import InputError, OptionError, OutputError
from .geometry import Box, Shape, shape_option

__all__ = [
    "TEMPLATE_DIR",
    "IN_MEMORY_LIMIT",
    "SimulationConfig",
    "Simulation",
    "SimulationReport",
    "list_templates",
    "load_template",
    "electron_wavelength",
    "ctf",
    "simulate_volume",
    "simulate",
]

TEMPLATE_DIR = Path(__file__).with_name("templates")
TEMPLATE_SUFFIXES = (".mrc.gz", ".mrc", ".map.gz", ".map")
TEMPLATE_SIGMA = 1.0  # Gaussian low-pass of the raw maps, in output voxels (and at least one map voxel)
INTERIOR_PERCENTILE = 95.0  # the interior level: this percentile of the voxels above ...
INTERIOR_FLOOR = 0.1  # ... this fraction of the filtered maximum
SUPPORT_LEVEL = 0.01  # density below this fraction of the interior level is set to zero
IN_MEMORY_LIMIT = 320  # voxels per axis for simulate_volume; simulate() works out of core above
SLAB_VOXELS = 1 << 23  # out of core: voxels per slab (32 MiB of float32; ~40 bytes per slab voxel at peak)
MAX_CLASSES = 127  # labels are written as int8 (MRC mode 0)
MAX_INSTANCES = 65535  # instances are uint16
PROBES = 32  # mask voxels tested before the full overlap test
FILES = {"tomogram": "tomogram.mrc", "labels": "labels.mrc", "particles": "particles.json"}
_PLACEMENT, _NOISE = 1, 2  # independent random streams of one seed


def _fft():
    import scipy.fft

    return scipy.fft


def _ndimage():
    import scipy.ndimage

    return scipy.ndimage


# ----------------------------------------------------------------------------------------- templates


def list_templates(directory: str | os.PathLike | None = None) -> list[str]:
    """Ids of the templates shipped with tilesegment, or of the MRC maps in ``directory``."""
    folder = Path(directory) if directory is not None else TEMPLATE_DIR
    if not folder.is_dir():
        raise OptionError(f"template folder {str(folder)!r} does not exist.", "Give a folder holding .mrc or .mrc.gz density maps.")
    return sorted({_stem(p.name) for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TEMPLATE_SUFFIXES)})


def _stem(name: str) -> str:
    for suffix in TEMPLATE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _resolve(id_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(class name, file)`` of a shipped id or a path to a map."""
    text = os.fspath(id_or_path)
    shipped = TEMPLATE_DIR / f"{text.lower()}.mrc.gz"
    if os.sep not in text and shipped.is_file():
        return text.lower(), str(shipped)
    if os.path.isfile(text):
        return _stem(os.path.basename(text)), text
    raise OptionError(f"unknown template {text!r}.",
                      f"Use a shipped id ({', '.join(list_templates())}) or the path of an MRC density map.")


class _Template(NamedTuple):
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
def _template(id_or_path: str, voxel_size: float) -> _Template:
    """Read, low-pass, resample and normalise a map once per process (see the module docstring, step 1)."""
    ndi = _ndimage()
    name, path = _resolve(id_or_path)
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


def _prepare(name: str, data: np.ndarray, centre: np.ndarray, reach: float) -> _Template:
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
    return _Template(name, data, centre, half, padded.ravel(), (centre + pad).astype(np.float32)[:, None], strides,
                     np.ascontiguousarray((grid[inside] - half).T, dtype=np.float32), np.flatnonzero(inside), grid[inside].astype(np.int32))


def load_template(id_or_path: str | os.PathLike, voxel_size: float = 10.0) -> np.ndarray:
    """A template's density at ``voxel_size`` Å: low-passed, interior level 1, float32 (z, y, x).

    ``id_or_path`` is a shipped id (see :func:`list_templates`) or the path of an MRC map (its
    header's voxel size is used; a map without one is taken to be at ``voxel_size``).
    """
    return _template(os.fspath(id_or_path), _positive(voxel_size, "voxel_size", "e.g. 10.0 (Å)")).density.copy()


# ------------------------------------------------------------------------------------------- config


def _positive(value: float, name: str, example: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise OptionError(f"{name} {value!r} must be a positive number.", f"Give {example}.")
    return number


def _in_range(value: float, name: str, low: float, high: float, fix: str, low_open: bool = True, high_open: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not ok:  # also rejects NaN
        brackets = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise OptionError(f"{name} {value!r} is outside {brackets}.", fix)
    return number


def _count(value: int, name: str, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise OptionError(f"{name} {value!r} must be an integer >= {low}.", fix)
    return int(value)


def _shipped() -> tuple[str, ...]:
    return tuple(list_templates())


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulated tomogram; validated on construction (OptionError)."""

    shape: Shape = (128, 128, 128)  # (z, y, x) voxels; z is the beam direction at zero tilt
    voxel_size: float = 10.0  # Å per voxel
    templates: tuple[str, ...] = field(default_factory=_shipped)  # ids or map paths; label k = templates[k-1]
    target: str | None = None  # the macromolecule of interest: Simulation.target_mask marks its particles
    density: float = 0.25  # fraction of the volume covered by particle masks ("crowded": 0.2-0.3)
    snr: float = 1.0  # var(signal) / var(noise); float('inf') = no noise
    tilt_range: float = 60.0  # degrees: the tilt series spans ±tilt_range about y; 90 = no missing wedge
    defocus_um: float = 3.0  # µm, positive = underfocus
    voltage_kv: float = 300.0  # acceleration voltage, kV (sets the electron wavelength)
    cs_mm: float = 2.7  # spherical aberration, mm
    amplitude_contrast: float = 0.07  # fraction of amplitude contrast, in [0, 1)
    bfactor: float = 0.0  # Å², CTF envelope exp(-bfactor·k²/4); 0 = none
    mask_threshold: float = 0.2  # ground truth: rotated noise-free density > this fraction of the interior level
    attempts: int = 64  # random positions tried per particle
    patience: int = 200  # placement stops after this many particles in a row found no room
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "shape", shape_option(self.shape, "shape"))
        set_(self, "voxel_size", _positive(self.voxel_size, "voxel_size", "the voxel size in Å, e.g. 10.0"))
        templates = (self.templates,) if isinstance(self.templates, (str, os.PathLike)) else tuple(self.templates)
        templates = tuple(os.fspath(t) for t in templates)
        if not templates:
            raise OptionError("templates is empty.", f"Give at least one template id, e.g. ('1bxn', '4v4r'); shipped: {', '.join(_shipped())}.")
        try:
            names = [_resolve(t)[0] for t in templates]
        except OptionError as err:
            raise OptionError(f"templates: {err.what}", err.fix) from None
        if len(set(names)) != len(names):
            raise OptionError(f"templates {templates} name a complex twice.", "Give each complex once.")
        if len(names) > MAX_CLASSES:
            raise OptionError(f"templates: {len(names)} complexes, more than the {MAX_CLASSES} an int8 label map holds.",
                              f"Give at most {MAX_CLASSES} templates.")
        set_(self, "templates", templates)
        if self.target is not None:
            target = _stem(os.path.basename(os.fspath(self.target))).lower()
            if target not in [n.lower() for n in names]:
                raise OptionError(f"target {self.target!r} is not one of the templates {tuple(names)}.", "Give one of the template ids as target, or None.")
            set_(self, "target", names[[n.lower() for n in names].index(target)])
        set_(self, "density", _in_range(self.density, "density", 0.0, 0.6, "Give the fraction of the volume to fill, e.g. 0.25."))
        snr = float(self.snr) if isinstance(self.snr, (int, float, np.floating)) and not isinstance(self.snr, bool) else float("nan")
        if not snr > 0:  # rejects NaN too
            raise OptionError(f"snr {self.snr!r} must be positive.", "Give var(signal)/var(noise), e.g. 1.0 (0.01-100), or float('inf') for no noise.")
        set_(self, "snr", snr)
        set_(self, "tilt_range", _in_range(self.tilt_range, "tilt_range", 0.0, 90.0, "Give the half tilt range in degrees, e.g. 60 (±60°); 90 means no missing wedge."))
        try:
            defocus = float(self.defocus_um)
        except (TypeError, ValueError):
            defocus = float("nan")
        if not math.isfinite(defocus):
            raise OptionError(f"defocus_um {self.defocus_um!r} is not a number.", "Give the defocus in µm, positive for underfocus, e.g. 3.0.")
        set_(self, "defocus_um", defocus)
        set_(self, "voltage_kv", _positive(self.voltage_kv, "voltage_kv", "the acceleration voltage in kV, e.g. 300"))
        set_(self, "cs_mm", _in_range(self.cs_mm, "cs_mm", 0.0, 100.0, "Give the spherical aberration in mm, e.g. 2.7.", low_open=False))
        set_(self, "amplitude_contrast", _in_range(self.amplitude_contrast, "amplitude_contrast", 0.0, 1.0, "Give a fraction, e.g. 0.07.", low_open=False, high_open=True))
        set_(self, "bfactor", _in_range(self.bfactor, "bfactor", 0.0, 1e6, "Give a B-factor in Å² >= 0, e.g. 0 (no envelope) or 100.", low_open=False))
        set_(self, "mask_threshold", _in_range(self.mask_threshold, "mask_threshold", 0.0, 1.0, "Give a fraction of the interior density, e.g. 0.2.", high_open=True))
        set_(self, "attempts", _count(self.attempts, "attempts", 1, "Give the positions to try per particle, e.g. 64."))
        set_(self, "patience", _count(self.patience, "patience", 1, "Give how many failed particles in a row end placement, e.g. 200."))
        set_(self, "seed", _count(self.seed, "seed", 0, "Give a non-negative integer seed, e.g. 0."))

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names: label k is ``classes[k - 1]``."""
        return tuple(_resolve(t)[0] for t in self.templates)

    def to_dict(self) -> dict:
        """JSON-ready fields (an infinite snr is written as the string 'inf')."""
        values = dataclasses.asdict(self)
        values["shape"] = list(self.shape)
        values["templates"] = list(self.templates)
        if math.isinf(self.snr):
            values["snr"] = "inf"
        return values


def _templates(config: SimulationConfig) -> list[_Template]:
    return [_template(t, config.voxel_size) for t in config.templates]


# ---------------------------------------------------------------------------------------- placement


class _Particle(NamedTuple):
    kind: int  # 0-based index into config.templates
    centre: tuple[int, int, int]  # voxel nearest the particle's position
    shift: np.ndarray  # position - centre, each in [-0.5, 0.5)
    rotation: np.ndarray  # 3x3, acts on (z, y, x)

    def box(self, half: int) -> Box:
        return Box(tuple(c - half for c in self.centre), tuple(c + half + 1 for c in self.centre))  # type: ignore[arg-type]

    def record(self, number: int, templates: Sequence[_Template]) -> dict:
        return {
            "id": number,
            "class": self.kind + 1,
            "template": templates[self.kind].name,
            "position": [float(c + s) for c, s in zip(self.centre, self.shift)],
            "rotation": self.rotation.tolist(),
        }


def _rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *key]))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform on SO(3): a unit quaternion from four Gaussians."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


class _Scratch(threading.local):
    """Work arrays reused between particles: fresh large temporaries cost a page fault per 4 KiB."""

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        size = math.prod(shape)
        buffer = self.__dict__.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self.__dict__[name] = np.empty(size, dtype)
        return buffer[:size].reshape(shape)


_SCRATCH = _Scratch()


def _rotated(template: _Template, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Density of the template turned by ``rotation`` about its centre, at the cube voxels ``template.index``.

    The cube is (2h+1)³ with the particle's position at ``h + shift``. Trilinear interpolation
    (what ``scipy.ndimage.affine_transform`` does with order 1), vectorised over the voxels
    that can be non-zero, in reused work arrays: several times faster than affine_transform.
    """
    m = len(template.index)
    source = _SCRATCH.get("source", (3, m), np.float32)
    np.subtract(template.offsets, shift.astype(np.float32)[:, None], out=source)
    source = np.matmul(rotation.T.astype(np.float32), source, out=_SCRATCH.get("rotated", (3, m), np.float32))
    source += template.origin  # all >= 1 thanks to the padding
    floor = _SCRATCH.get("floor", (3, m), np.intp)
    np.copyto(floor, source, casting="unsafe")  # truncation is floor here
    source -= floor  # now the interpolation weights
    sz, sy = template.strides
    index = _SCRATCH.get("index", (m,), np.intp)
    np.multiply(floor[0], sz, out=index)
    floor[1] *= sy
    index += floor[1]
    index += floor[2]
    # the 8 neighbours, ordered (z, y, x) = 000, 001, 010, 011, 100, 101, 110, 111
    neighbours = _SCRATCH.get("neighbours", (8, m), np.intp)
    np.add(index, np.array([0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1])[:, None], out=neighbours)
    v = np.take(template.padded, neighbours, out=_SCRATCH.get("values", (8, m), np.float32))
    _lerp(v[0::2], v[1::2], source[2])  # along x, into rows 1, 3, 5, 7
    _lerp(v[1::4], v[3::4], source[1])  # along y, into rows 3, 7
    _lerp(v[3], v[7], source[0])  # along z, into row 7
    return v[7].copy()


def _cube(template: _Template, values: np.ndarray) -> np.ndarray:
    """The (2h+1)³ cube holding ``values`` at ``template.index`` (a work array: valid until the next call)."""
    side = 2 * template.half + 1
    cube = _SCRATCH.get("cube", (side, side, side), np.float32)
    cube.fill(0.0)
    cube.ravel()[template.index] = values
    return cube


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> None:
    """``b = a + w (b - a)`` in place."""
    b -= a
    b *= w
    b += a


def _clip(corner: np.ndarray, size: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of the volume and of a cube at ``corner`` where they overlap, or None."""
    lo = np.maximum(corner, 0)
    hi = np.minimum(corner + np.asarray(size), shape)
    if (hi <= lo).any():
        return None
    return (tuple(slice(a, b) for a, b in zip(lo, hi)), tuple(slice(a, b) for a, b in zip(lo - corner, hi - corner)))


def _fit(labels: np.ndarray, points: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(corner, mask)``: the first cube corner where the mask (voxels ``points`` of the cube) covers
    some voxel of ``labels`` and overlaps no labelled one; ``mask`` is the mask on the cube's
    bounding box of ``points``, which starts at ``corner + points.min(axis=0)``. None: no room.
    """
    if not len(points):
        return None
    lo = points.min(axis=0)
    tight = np.zeros(points.max(axis=0) + 1 - lo, bool)
    tight[tuple((points - lo).T)] = True
    shape = np.asarray(labels.shape)
    # cheap rejection first: a few mask voxels at every candidate position
    probes = points[np.linspace(0, len(points) - 1, min(PROBES, len(points))).astype(int)]
    spots = corners[:, None, :] + probes[None, :, :]
    inside = ((spots >= 0) & (spots < shape)).all(axis=2)
    spots = np.clip(spots, 0, shape - 1)
    blocked = ((labels[spots[..., 0], spots[..., 1], spots[..., 2]] != 0) & inside).any(axis=1)
    for i in np.flatnonzero(~blocked):
        region = _clip(corners[i] + lo, tight.shape, shape)
        if region is None:
            continue
        sub = tight[region[1]]
        if sub.any() and not labels[region[0]][sub].any():
            return corners[i], tight
    return None


def _place(config: SimulationConfig, templates: Sequence[_Template], labels: np.ndarray,
           instances: np.ndarray | None = None, density: np.ndarray | None = None) -> tuple[list[_Particle], int]:
    """Random sequential placement without overlap; fills ``labels`` (and ``instances``/``density`` when given).

    Returns the particles and the number of labelled voxels. Each particle consumes the same
    random numbers whether or not it fits, so the stream does not depend on the arrays' contents.
    """
    rng = _rng(config.seed, _PLACEMENT)
    shape = np.asarray(labels.shape)
    goal = config.density * labels.size
    limit = MAX_INSTANCES if instances is not None else np.iinfo(np.int64).max
    particles: list[_Particle] = []
    filled = failures = 0
    while filled < goal and failures < config.patience and len(particles) < limit:
        kind = int(rng.integers(len(templates)))
        rotation = _random_rotation(rng)
        shift = rng.uniform(-0.5, 0.5, 3)
        centres = rng.integers(0, shape, size=(config.attempts, 3))
        template = templates[kind]
        values = _rotated(template, rotation, shift)
        points = template.grid[values > config.mask_threshold]
        fit = _fit(labels, points, centres - template.half)
        if fit is None:
            failures += 1
            continue
        failures = 0
        corner, mask = fit
        target, source = _clip(corner + points.min(axis=0), mask.shape, shape)  # type: ignore[misc]
        sub = mask[source]
        labels[target][sub] = kind + 1
        if instances is not None:
            instances[target][sub] = len(particles) + 1
        if density is not None:
            cube = _cube(template, values)
            target, source = _clip(corner, cube.shape, shape)  # type: ignore[misc]
            density[target] += cube[source]
        filled += int(np.count_nonzero(sub))
        particles.append(_Particle(kind, tuple(int(c) for c in corner + template.half), shift, rotation))  # type: ignore[arg-type]
    return particles, filled


# --------------------------------------------------------------------------------------- microscope


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å at an acceleration voltage in kV (0.0197 Å at 300 kV)."""
    volts = float(voltage_kv) * 1e3
    return 12.264259 / math.sqrt(volts * (1.0 + 0.97847574e-6 * volts))


def ctf(k: np.ndarray | float, defocus_um: float = 3.0, voltage_kv: float = 300.0, cs_mm: float = 2.7,
        amplitude_contrast: float = 0.07, bfactor: float = 0.0) -> np.ndarray:
    """The signed CTF at spatial frequency ``k`` (1/Å); defocus positive = underfocus, so CTF(0) = -A.

    ``-[sqrt(1-A²) sin γ + A cos γ] exp(-B k²/4)`` with ``γ = π λ Δf k² - π/2 Cs λ³ k⁴``.
    """
    k2 = np.square(np.asarray(k))
    wavelength = electron_wavelength(voltage_kv)
    a = wavelength * defocus_um * 1e4 * math.pi
    b = 0.5 * math.pi * cs_mm * 1e7 * wavelength**3
    gamma = k2 * (a - b * k2)
    value = -np.sin(gamma + math.asin(amplitude_contrast))
    if bfactor:
        value = value * np.exp(-0.25 * bfactor * k2)
    return value


def _frequencies(shape: Shape, voxel_size: float, ys: slice = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kz, ky (rows ``ys`` only), kx (1/Å) on the rfftn grid, shaped to broadcast."""
    fft = _fft()
    z, y, x = shape
    return (fft.fftfreq(z, voxel_size).astype(np.float32)[:, None, None],
            fft.fftfreq(y, voxel_size).astype(np.float32)[ys][None, :, None],
            fft.rfftfreq(x, voxel_size).astype(np.float32)[None, None, :])


def _wedge(shape: Shape, config: SimulationConfig) -> np.ndarray | None:
    """1 where a ±tilt_range tilt series about y measured the Fourier component, else 0: (Z, 1, X//2+1) float32.

    None when nothing is missing (tilt_range 90). The wedge does not depend on k_y.
    """
    if config.tilt_range >= 90.0:
        return None
    kz, _, kx = _frequencies(shape, config.voxel_size, slice(0, 0))
    return (np.abs(kz) <= math.tan(math.radians(config.tilt_range)) * np.abs(kx)).astype(np.float32)


def _transfer(shape: Shape, config: SimulationConfig, ys: slice = slice(None)) -> np.ndarray:
    """-CTF(|k|) times the wedge on the rfftn grid (rows ``ys`` of k_y), float32: the filter from density to signal."""
    kz, ky, kx = _frequencies(shape, config.voxel_size, ys)
    k = np.sqrt(kz * kz + ky * ky + kx * kx)
    h = -ctf(k, config.defocus_um, config.voltage_kv, config.cs_mm, config.amplitude_contrast, config.bfactor)
    h = h.astype(np.float32, copy=False)
    wedge = _wedge(shape, config)
    if wedge is not None:
        h *= wedge
    return h


def _filter(volume: np.ndarray, transfer: np.ndarray | None) -> np.ndarray:
    if transfer is None:
        return volume
    fft = _fft()
    spectrum = fft.rfftn(volume, workers=-1)
    spectrum *= transfer
    return fft.irfftn(spectrum, s=volume.shape, workers=-1).astype(np.float32, copy=False)


def _moments(volume: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64, a few planes at a time (no full-size temporary, no BLAS)."""
    total = squares = 0.0
    step = max(1, (1 << 18) // max(1, volume[0].size))
    for start in range(0, len(volume), step):
        chunk = volume[start:start + step].astype(np.float64).ravel()
        total += float(chunk.sum())
        squares += float(np.einsum("i,i->", chunk, chunk))
    return total, squares


def _variance(volume: np.ndarray) -> float:
    total, squares = _moments(volume)
    mean = total / volume.size
    return max(0.0, squares / volume.size - mean * mean)


def _white_noise(config: SimulationConfig, ys: range) -> np.ndarray:
    """Gaussian white noise for the rows ``ys`` (Z, len(ys), X): one random stream per y, so any slab is reproducible."""
    z, _, x = config.shape
    out = np.empty((z, len(ys), x), np.float32)
    for j, y in enumerate(ys):
        out[:, j, :] = _rng(config.seed, _NOISE, y).standard_normal((z, x), dtype=np.float32)
    return out


def _wedge_noise(config: SimulationConfig, ys: range) -> np.ndarray:
    """White noise restricted to the measured tilt range: filtered in (z, x) only, as the wedge ignores k_y."""
    noise = _white_noise(config, ys)
    wedge = _wedge(config.shape, config)
    if wedge is None:
        return noise
    fft = _fft()
    spectrum = fft.rfftn(noise, axes=(0, 2), workers=-1)
    spectrum *= wedge
    return fft.irfftn(spectrum, s=(config.shape[0], config.shape[2]), axes=(0, 2), workers=-1).astype(np.float32, copy=False)


# -------------------------------------------------------------------------------------- in memory


@dataclass(frozen=True, eq=False)
class Simulation:
    """A simulated tomogram in memory with its ground truth; arrays are (z, y, x)."""

    config: SimulationConfig
    classes: tuple[str, ...]  # label k (1-based) is classes[k - 1]
    tomogram: np.ndarray  # float32: clean + noise, protein bright
    clean: np.ndarray  # float32: the CTF- and wedge-filtered noise-free signal
    labels: np.ndarray  # uint8: 0 background, k = kind of the particle
    instances: np.ndarray  # uint16: 0 background, i = particles[i - 1]
    target_mask: np.ndarray | None  # uint8: 1 on particles of config.target, None without a target
    # id, class (label), template, position (z, y, x voxels: the template's centre of mass) and rotation
    # (3x3 matrix R on (z, y, x) offsets: the template point centre + u lands at position + R u)
    particles: list[dict]
    density: float  # fraction of voxels labelled
    signal_variance: float
    noise_variance: float

    @property
    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for p in self.particles:
            counts[p["template"]] += 1
        return counts


def simulate_volume(config: SimulationConfig | None = None) -> Simulation:
    """Simulate one crowded tomogram in memory (shapes up to ``IN_MEMORY_LIMIT`` per axis)."""
    config = config if config is not None else SimulationConfig()
    if max(config.shape) > IN_MEMORY_LIMIT:
        raise OptionError(f"shape {config.shape} exceeds the in-memory limit of {IN_MEMORY_LIMIT} voxels per axis.",
                          "Use simulate(output_dir, config), which computes large tomograms slab by slab on disk.")
    templates = _templates(config)
    labels = np.zeros(config.shape, np.uint8)
    instances = np.zeros(config.shape, np.uint16)
    density = np.zeros(config.shape, np.float32)
    particles, filled = _place(config, templates, labels, instances, density)
    clean = _filter(density, _transfer(config.shape, config))
    del density
    signal_variance = _variance(clean)
    if math.isinf(config.snr):
        tomogram, noise_variance = clean.copy(), 0.0
    else:
        noise_variance = signal_variance / config.snr
        tomogram = _wedge_noise(config, range(config.shape[1]))
        tomogram *= np.float32(math.sqrt(noise_variance / (_variance(tomogram) or 1.0)))
        tomogram += clean
    target_mask = None
    if config.target is not None:
        target_mask = (labels == config.classes.index(config.target) + 1).astype(np.uint8)
    return Simulation(config, config.classes, tomogram, clean, labels, instances, target_mask,
                      [p.record(i + 1, templates) for i, p in enumerate(particles)],
                      filled / labels.size, signal_variance, noise_variance)


# ------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SimulationReport:
    """What :func:`simulate` wrote."""

    directory: str
    tomogram: str
    labels: str
    particles: str
    shape: Shape
    voxel_size: float
    particle_count: int
    class_counts: Mapping[str, int]
    density: float  # fraction of voxels labelled
    out_of_core: bool  # True: generated and written slab by slab (shape over IN_MEMORY_LIMIT)


def _output_paths(output_dir: str | os.PathLike, overwrite: bool) -> dict[str, Path]:
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder.", "Give a folder for the simulated tomogram.")
    paths = {key: folder / name for key, name in FILES.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} already exists.", "Pass overwrite=True (--overwrite on the command line) to replace it, or choose another output folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror}).", "Choose a writable location.") from None
    return paths


def _write_json(path: Path, config: SimulationConfig, particles: list[dict], density: float,
                signal_variance: float, noise_variance: float, out_of_core: bool) -> dict[str, int]:
    counts = dict.fromkeys(config.classes, 0)
    for p in particles:
        counts[p["template"]] += 1
    document = {
        "format": "tilesegment-simulation/1",
        "axes": "zyx",
        "shape": list(config.shape),
        "voxel_size": config.voxel_size,
        "config": config.to_dict(),
        "classes": [{"label": 0, "name": "background"}]
        + [{"label": k + 1, "name": name, "particles": counts[name]} for k, name in enumerate(config.classes)],
        "target": None if config.target is None else {"label": config.classes.index(config.target) + 1, "name": config.target},
        "density": density,
        "signal_variance": signal_variance,
        "noise_variance": noise_variance,
        "out_of_core": out_of_core,
        "conventions": {
            "position": "particle centre of mass (z, y, x) in voxels from the centre of voxel (0, 0, 0)",
            "rotation": "3x3 matrix R acting on (z, y, x): template point centre+u lands at position + R u",
            "labels": "labels.mrc: 0 background, k = classes[k] (int8)",
            "snr": "var(signal) / var(noise); signal = CTF- and wedge-filtered noise-free volume",
            "contrast": "protein bright (the volume is filtered by -CTF)",
            "defocus": "positive defocus_um = underfocus",
        },
        "particles": particles,
    }
    path.write_text(json.dumps(document, indent=1, allow_nan=False))
    return counts


def _write_mrc(path: Path, data: np.ndarray, voxel_size: float) -> None:
    import mrcfile

    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size


def simulate(output_dir: str | os.PathLike, config: SimulationConfig | None = None, *, overwrite: bool = False) -> SimulationReport:
    """Simulate a tomogram and write ``tomogram.mrc``, ``labels.mrc`` (int8) and ``particles.json``.

    Shapes above ``IN_MEMORY_LIMIT`` in any axis are computed out of core, slab by slab (memory:
    1 byte per voxel plus a few slabs); smaller ones are exactly :func:`simulate_volume`'s.
    Existing files are an OutputError unless ``overwrite``.
    """
    config = config if config is not None else SimulationConfig()
    paths = _output_paths(output_dir, overwrite)
    out_of_core = max(config.shape) > IN_MEMORY_LIMIT
    if out_of_core:
        particles, density, signal_variance, noise_variance = _simulate_out_of_core(config, paths)
    else:
        sim = simulate_volume(config)
        _write_mrc(paths["tomogram"], sim.tomogram, config.voxel_size)
        _write_mrc(paths["labels"], sim.labels.view(np.int8), config.voxel_size)
        particles, density, signal_variance, noise_variance = sim.particles, sim.density, sim.signal_variance, sim.noise_variance
    counts = _write_json(paths["particles"], config, particles, density, signal_variance, noise_variance, out_of_core)
    return SimulationReport(str(Path(output_dir)), str(paths["tomogram"]), str(paths["labels"]), str(paths["particles"]),
                            config.shape, config.voxel_size, len(particles), counts, density, out_of_core)


# ------------------------------------------------------------------------------------- out of core


def _slabs(n: int, plane: int) -> Iterator[range]:
    """Ranges covering ``0..n`` with about ``SLAB_VOXELS`` voxels each, for planes of ``plane`` voxels."""
    step = max(1, SLAB_VOXELS // max(1, plane))
    for start in range(0, n, step):
        yield range(start, min(n, start + step))


def _rendered_slabs(particles: Sequence[_Particle], templates: Sequence[_Template], shape: Shape) -> Iterator[tuple[range, np.ndarray]]:
    """The density, z-slab after z-slab, each particle rotated once (a rolling buffer one particle deeper than a slab)."""
    nz, ny, nx = shape
    slabs = list(_slabs(nz, ny * nx))
    thickness = len(slabs[0])
    deepest = max((2 * t.half + 1 for t in templates), default=1)
    buffer = np.zeros((thickness + deepest, ny, nx), np.float32)
    order = sorted(particles, key=lambda p: p.centre[0] - templates[p.kind].half)
    i = 0
    for zs in slabs:
        while i < len(order) and order[i].centre[0] - templates[order[i].kind].half < zs.stop:
            p, template = order[i], templates[order[i].kind]
            cube = _cube(template, _rotated(template, p.rotation, p.shift))
            corner = np.asarray(p.box(template.half).start) - (zs.start, 0, 0)
            region = _clip(corner, cube.shape, buffer.shape)
            if region is not None:
                buffer[region[0]] += cube[region[1]]
            i += 1
        yield zs, buffer[:len(zs)]
        buffer[:-thickness] = buffer[thickness:]
        buffer[-thickness:] = 0.0


def _rfft_weights(x: int) -> np.ndarray:
    """How often each rfft column appears in the full spectrum (Parseval on a half spectrum)."""
    weights = np.full(x // 2 + 1, 2.0)
    weights[0] = 1.0
    if x % 2 == 0:
        weights[-1] = 1.0
    return weights


def _simulate_out_of_core(config: SimulationConfig, paths: dict[str, Path]) -> tuple[list[dict], float, float, float]:
    """The in-memory model, with the 3D FFT done slab by slab through a scratch file.

    1. place globally (the uint8 label map is the occupancy grid) and write labels.mrc;
    2. z-slabs: render the density, FFT along y and x, store in the scratch file;
    3. y-slabs: FFT along z, apply -CTF·wedge (signal variance by Parseval), inverse FFT along z;
       meanwhile write wedge-filtered noise into tomogram.mrc (its variance measured);
    4. z-slabs: inverse FFT along y and x, add the noise scaled to var(signal)/snr, write.
    """
    import mrcfile

    fft = _fft()
    templates = _templates(config)
    nz, ny, nx = config.shape
    size = nz * ny * nx
    labels = np.zeros(config.shape, np.uint8)  # also the occupancy grid: 1 byte per voxel
    particles, filled = _place(config, templates, labels)
    with mrcfile.new_mmap(str(paths["labels"]), config.shape, mrc_mode=0, overwrite=True) as mrc:
        for zs in _slabs(nz, ny * nx):
            mrc.data[zs.start:zs.stop] = labels[zs.start:zs.stop].view(np.int8)
        mrc.voxel_size = config.voxel_size
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = 0, int(labels.max(initial=0)), filled / size
    del labels
    # an anonymous scratch file next to the output (same disk): freed on close, whatever happens
    with tempfile.TemporaryFile(dir=paths["tomogram"].parent) as scratch, \
            mrcfile.new_mmap(str(paths["tomogram"]), config.shape, mrc_mode=2, overwrite=True) as mrc:
        spectrum = np.memmap(scratch, np.complex64, "w+", shape=(nz, ny, nx // 2 + 1))
        for zs, density in _rendered_slabs(particles, templates, config.shape):
            spectrum[zs.start:zs.stop] = fft.rfftn(density, axes=(1, 2), workers=-1)
        weights = _rfft_weights(nx)
        squares, noise_total, noise_squares, dc = 0.0, 0.0, 0.0, 0.0  # signal by Parseval; noise as written
        for ys in _slabs(ny, nz * nx):
            rows = fft.fft(spectrum[:, ys.start:ys.stop], axis=0, workers=-1)
            rows *= _transfer(config.shape, config, slice(ys.start, ys.stop))
            squares += float(np.square(np.abs(rows)).sum(axis=(0, 1), dtype=np.float64) @ weights)
            if ys.start == 0:
                dc = float(rows[0, 0, 0].real)
            spectrum[:, ys.start:ys.stop] = fft.ifft(rows, axis=0, workers=-1)
            if not math.isinf(config.snr):
                noise = _wedge_noise(config, ys)
                s, q = _moments(noise)
                noise_total, noise_squares = noise_total + s, noise_squares + q
                mrc.data[:, ys.start:ys.stop] = noise
        mean = dc / size
        signal_variance = max(0.0, squares / size**2 - mean * mean)
        noise_variance = 0.0 if math.isinf(config.snr) else signal_variance / config.snr
        raw = max(0.0, noise_squares / size - (noise_total / size) ** 2)
        scale = np.float32(math.sqrt(noise_variance / raw)) if noise_variance > 0 and raw > 0 else np.float32(0.0)
        total = squares = 0.0
        lo, hi = math.inf, -math.inf
        for zs in _slabs(nz, ny * nx):
            out = fft.irfftn(spectrum[zs.start:zs.stop], s=(ny, nx), axes=(1, 2), workers=-1).astype(np.float32, copy=False)
            if not math.isinf(config.snr):
                out += scale * mrc.data[zs.start:zs.stop]
            mrc.data[zs.start:zs.stop] = out
            s, q = _moments(out)
            total, squares = total + s, squares + q
            lo, hi = min(lo, float(out.min())), max(hi, float(out.max()))
        del spectrum
        mean = total / size
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
        mrc.header.rms = math.sqrt(max(0.0, squares / size - mean * mean))
        mrc.voxel_size = config.voxel_size
    records = [p.record(i + 1, templates) for i, p in enumerate(particles)]
    return records, filled / size, signal_variance, noise_variance

"""Realistic simulated cryo-ET tomograms with ground truth, for training and testing segmentation.

The model follows the simulations of Xu et al. and Liu et al. (ICIP 2018, "Deep learning based
supervised semantic segmentation of electron cryo-subtomograms"): crowded cellular volumes built
from real macromolecular structures, imaged with the microscope's contrast transfer function (CTF),
a limited tilt range (missing wedge) and noise at a chosen signal-to-noise ratio.

This module owns the configuration, the in-memory simulation and the output files; each step of
the model lives in its own module, whose docstring gives the details (every number is a
:class:`SimulationConfig` field):

1. **Templates** (:mod:`tilesegment.templates`): density maps of real complexes, low-pass
   filtered, resampled to ``voxel_size`` and normalised to an interior density of about 1.
2. **Crowding** (:mod:`tilesegment.placement`): particles of random kinds, rotations and positions
   are placed without overlap until their masks cover ``density`` of the volume.
3. **Ground truth** (:mod:`tilesegment.placement`): ``labels`` (kind) and ``instances`` (particle)
   from each particle's noise-free density above ``mask_threshold``.
4. **Microscope** (:mod:`tilesegment.microscope`): the density is filtered by -CTF (protein bright)
   and the missing wedge of a ``±tilt_range`` tilt series about y.
5. **Noise** (:mod:`tilesegment.microscope`): wedge-restricted Gaussian noise scaled to
   ``SNR = var(signal) / var(noise)``.

Output units are arbitrary (interior protein density ~1, times the transfer function).

The same config (seed included) gives bit-identical outputs on one machine and library stack.
:func:`simulate_volume` works in memory up to ``IN_MEMORY_LIMIT`` voxels per axis (about 30 bytes
per voxel at peak). Above that, :func:`simulate` computes the same model out of core, slab by slab
through a scratch file (:mod:`tilesegment.simulate_large`), in about 1 byte per voxel of memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .allocator import memory_available
from .errors import OptionError, OutputError
from .geometry import Shape, shape_option
from .microscope import apply_transfer, ctf, electron_wavelength, transfer, variance, wedge_noise
from .options import count_option, positive_option, range_option
from .placement import place
from .simulate_large import simulate_out_of_core
from .templates import TEMPLATE_DIR, list_templates, load_template, prepared_templates, resolve_template, template_name

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

IN_MEMORY_LIMIT = 320  # voxels per axis for simulate_volume; simulate() works out of core above
SLAB_VOXELS = 1 << 23  # out of core: voxels per slab (32 MiB of float32; ~40 bytes per slab voxel at peak), given to simulate_out_of_core
MAX_CLASSES = 127  # labels are written as int8 (MRC mode 0)
FILES = {"tomogram": "tomogram.mrc", "labels": "labels.mrc", "particles": "particles.json"}
_STREAMS = {"placement": 1, "noise": 2}  # independent random streams of one seed


# ------------------------------------------------------------------------------------------- config


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
        set_(self, "voxel_size", positive_option(self.voxel_size, "voxel_size", "the voxel size in Å, e.g. 10.0"))
        templates = (self.templates,) if isinstance(self.templates, (str, os.PathLike)) else tuple(self.templates)
        templates = tuple(os.fspath(t) for t in templates)
        if not templates:
            raise OptionError("templates is empty.", f"Give at least one template id, e.g. ('1bxn', '4v4r'); shipped: {', '.join(_shipped())}.")
        try:
            names = [resolve_template(t)[0] for t in templates]
        except OptionError as err:
            raise OptionError(f"templates: {err.what}", err.fix) from None
        if len(set(names)) != len(names):
            raise OptionError(f"templates {templates} name a complex twice.", "Give each complex once.")
        if len(names) > MAX_CLASSES:
            raise OptionError(f"templates: {len(names)} complexes, more than the {MAX_CLASSES} an int8 label map holds.",
                              f"Give at most {MAX_CLASSES} templates.")
        set_(self, "templates", templates)
        if self.target is not None:
            target = template_name(os.path.basename(os.fspath(self.target))).lower()
            if target not in [n.lower() for n in names]:
                raise OptionError(f"target {self.target!r} is not one of the templates {tuple(names)}.", "Give one of the template ids as the target, or no target.")
            set_(self, "target", names[[n.lower() for n in names].index(target)])
        set_(self, "density", range_option(self.density, "density", 0.0, 0.6, "Give the fraction of the volume to fill, e.g. 0.25."))
        snr = float(self.snr) if isinstance(self.snr, (int, float, np.floating)) and not isinstance(self.snr, bool) else float("nan")
        if not snr > 0:  # rejects NaN too
            raise OptionError(f"snr {self.snr!r} must be positive.", "Give var(signal)/var(noise), e.g. 1.0 (0.01-100), or inf for no noise.")
        set_(self, "snr", snr)
        set_(self, "tilt_range", range_option(self.tilt_range, "tilt_range", 0.0, 90.0, "Give the half tilt range in degrees, e.g. 60 (±60°); 90 means no missing wedge."))
        try:
            defocus = float(self.defocus_um)
        except (TypeError, ValueError):
            defocus = float("nan")
        if not math.isfinite(defocus):
            raise OptionError(f"defocus_um {self.defocus_um!r} is not a number.", "Give the defocus in µm, positive for underfocus, e.g. 3.0.")
        set_(self, "defocus_um", defocus)
        set_(self, "voltage_kv", positive_option(self.voltage_kv, "voltage_kv", "the acceleration voltage in kV, e.g. 300"))
        set_(self, "cs_mm", range_option(self.cs_mm, "cs_mm", 0.0, 100.0, "Give the spherical aberration in mm, e.g. 2.7.", low_open=False))
        set_(self, "amplitude_contrast", range_option(self.amplitude_contrast, "amplitude_contrast", 0.0, 1.0, "Give a fraction, e.g. 0.07.", low_open=False, high_open=True))
        set_(self, "bfactor", range_option(self.bfactor, "bfactor", 0.0, 1e6, "Give a B-factor in Å² >= 0, e.g. 0 (no envelope) or 100.", low_open=False))
        set_(self, "mask_threshold", range_option(self.mask_threshold, "mask_threshold", 0.0, 1.0, "Give a fraction of the interior density, e.g. 0.2.", high_open=True))
        set_(self, "attempts", count_option(self.attempts, "attempts", 1, "Give the positions to try per particle, e.g. 64."))
        set_(self, "patience", count_option(self.patience, "patience", 1, "Give how many failed particles in a row end placement, e.g. 200."))
        set_(self, "seed", count_option(self.seed, "seed", 0, "Give a non-negative integer seed, e.g. 0."))

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names: label k is ``classes[k - 1]``."""
        return tuple(resolve_template(t)[0] for t in self.templates)

    def to_dict(self) -> dict:
        """JSON-ready fields (an infinite snr is written as the string 'inf')."""
        values = dataclasses.asdict(self)
        values["shape"] = list(self.shape)
        values["templates"] = list(self.templates)
        if math.isinf(self.snr):
            values["snr"] = "inf"
        return values

    def random_stream(self, purpose: str, *key: int) -> np.random.Generator:
        """A random generator for ``purpose`` ('placement' or 'noise', further split by ``key``),
        independent of the other purposes' and a function of the seed only."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, _STREAMS[purpose], *key]))


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
    templates = prepared_templates(config.templates, config.voxel_size)
    labels = np.zeros(config.shape, np.uint8)
    instances = np.zeros(config.shape, np.uint16)
    density = np.zeros(config.shape, np.float32)
    particles, filled = place(config, templates, labels, instances, density)
    clean = apply_transfer(density, transfer(config.shape, config))
    del density
    signal_variance = variance(clean)
    if math.isinf(config.snr):
        tomogram, noise_variance = clean.copy(), 0.0
    else:
        noise_variance = signal_variance / config.snr
        tomogram = wedge_noise(config, range(config.shape[1]))
        tomogram *= np.float32(math.sqrt(noise_variance / (variance(tomogram) or 1.0)))
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
        raise OutputError(f"{existing[0]} already exists.", "Pass --overwrite (overwrite=True in Python) to replace it, or choose another output folder.")
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


#: out of core, per voxel: the uint8 label map in memory; on disk the float32 tomogram, the int8
#: labels and the float32 scratch file of the slab-by-slab FFT (see :mod:`tilesegment.simulate_large`)
OUT_OF_CORE_MEMORY_BYTES, OUT_OF_CORE_DISK_BYTES = 1, 4 + 1 + 4


def _check_room(shape: Shape, output_dir: Path) -> None:
    """Refuse, before placing a single particle, a simulation this machine cannot hold: hours of
    placement would otherwise end in a MemoryError or a full disk."""
    voxels = math.prod(shape)
    memory = voxels * OUT_OF_CORE_MEMORY_BYTES + 40 * SLAB_VOXELS  # a few slabs at peak
    available = memory_available()
    size = "×".join(map(str, shape))
    if available is not None and memory > available:
        raise OptionError(f"--shape {size} needs about {memory / 2**30:.1f} GiB of memory (its label map), "
                          f"but {available / 2**30:.1f} GiB is available.", "Simulate a smaller --shape, or on a machine with more memory.")
    where = output_dir.absolute()
    while not where.exists() and where != where.parent:  # the folder may not exist yet
        where = where.parent
    disk, free = voxels * OUT_OF_CORE_DISK_BYTES, shutil.disk_usage(where).free
    if disk > free:
        raise OutputError(f"--shape {size} needs about {disk / 2**30:.1f} GiB of disk in {output_dir} (tomogram, labels and "
                          f"scratch), but {free / 2**30:.1f} GiB is free.", "Simulate a smaller --shape, or write it where there is room.")


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
    out_of_core = max(config.shape) > IN_MEMORY_LIMIT
    if out_of_core:
        _check_room(config.shape, Path(output_dir))
    paths = _output_paths(output_dir, overwrite)
    try:
        if out_of_core:
            particles, density, signal_variance, noise_variance = simulate_out_of_core(config, paths, SLAB_VOXELS)
        else:
            sim = simulate_volume(config)
            _write_mrc(paths["tomogram"], sim.tomogram, config.voxel_size)
            _write_mrc(paths["labels"], sim.labels.view(np.int8), config.voxel_size)
            particles, density, signal_variance, noise_variance = sim.particles, sim.density, sim.signal_variance, sim.noise_variance
        counts = _write_json(paths["particles"], config, particles, density, signal_variance, noise_variance, out_of_core)
    except BaseException:  # a full disk or Ctrl-C: no half-written tomogram that looks like a whole one
        for path in paths.values():
            path.unlink(missing_ok=True)
        raise
    return SimulationReport(str(Path(output_dir)), str(paths["tomogram"]), str(paths["labels"]), str(paths["particles"]),
                            config.shape, config.voxel_size, len(particles), counts, density, out_of_core)

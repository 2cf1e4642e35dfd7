"""The cryo-ET simulator: templates, placement without overlap, CTF, missing wedge, SNR, files, errors."""

from __future__ import annotations

import json
import math

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from tilesegment import placement as placement_module
from tilesegment import simulate as sim_module
from tilesegment.errors import OptionError, OutputError
from tilesegment.simulate import (
    TEMPLATE_DIR,
    SimulationConfig,
    ctf,
    electron_wavelength,
    list_templates,
    load_template,
    simulate,
    simulate_volume,
)

SHIPPED = {"1bxn", "1qvr", "1s3x", "1u6g", "2cg9", "2uv8", "3cf3", "3d2f", "3gl1", "3h84", "3j9i", "3qm1", "4cr2", "4v4r", "5mrc", "6pxm"}
SMALL = ("1bxn", "3qm1", "4cr2", "2uv8")
INF = float("inf")


def small(**kwargs) -> SimulationConfig:
    values = dict(shape=(48, 48, 48), templates=SMALL, seed=1)
    values.update(kwargs)
    return SimulationConfig(**values)


@pytest.fixture(scope="module")
def crowded():
    return simulate_volume(small(shape=(56, 64, 64), density=0.25, snr=0.5, target="4cr2", seed=7))


# ------------------------------------------------------------------------------------------ templates


def test_all_templates_ship_with_their_attribution():
    assert set(list_templates()) == SHIPPED
    assert all((TEMPLATE_DIR / f"{t}.mrc.gz").is_file() for t in SHIPPED)
    readme = (TEMPLATE_DIR / "README.md").read_text()
    for needle in ("polnet", "Apache License 2.0", "Antonio Martinez-Sanchez", "Protein Data Bank", *SHIPPED):
        assert needle in readme


def test_templates_are_filtered_and_on_a_common_scale():
    for name in sorted(SHIPPED):
        density = load_template(name)
        assert density.dtype == np.float32 and density.ndim == 3 and density.min() >= 0
        interior = np.percentile(density[density > 0.1 * density.max()], 95)
        assert interior == pytest.approx(1.0, abs=1e-3), name  # 2uv8 and 6pxm peak near 20 raw, the others near 220
        assert 1.0 <= density.max() < 2.0, name


def test_template_from_a_path_and_at_another_voxel_size(tmp_path):
    with mrcfile.open(TEMPLATE_DIR / "1bxn.mrc.gz") as mrc:
        raw = np.array(mrc.data)
    path = tmp_path / "rubisco.mrc"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(raw)
        mrc.voxel_size = 10.0
    np.testing.assert_array_equal(load_template(path), load_template("1bxn"))
    coarse = load_template("1bxn", voxel_size=20.0)
    assert coarse.shape == (26, 26, 26)
    # the molecule keeps its physical volume: about 1/8 of the voxels at twice the voxel size
    ratio = (coarse > 0.2).sum() / (load_template("1bxn") > 0.2).sum()
    assert 0.08 < ratio < 0.3
    config = SimulationConfig(shape=16, templates=(str(path), "4v4r"), target="rubisco")
    assert config.classes == ("rubisco", "4v4r")
    assert list_templates(tmp_path) == ["rubisco"]
    with pytest.raises(OptionError):
        list_templates(tmp_path / "missing")


def test_unknown_template_is_an_option_error():
    with pytest.raises(OptionError) as err:
        load_template("9zzz")
    assert "9zzz" in err.value.what and "1bxn" in err.value.fix


# ----------------------------------------------------------------------------------- volume contents


def test_same_seed_is_bit_identical_and_another_seed_differs():
    a, b, c = simulate_volume(small()), simulate_volume(small()), simulate_volume(small(seed=2))
    for name in ("tomogram", "clean", "labels", "instances"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.particles == b.particles
    assert not np.array_equal(a.labels, c.labels)
    assert a.particles[0]["position"] != c.particles[0]["position"]


def test_shapes_dtypes_and_label_values(crowded):
    shape = (56, 64, 64)
    assert crowded.tomogram.shape == crowded.clean.shape == crowded.labels.shape == crowded.instances.shape == shape
    assert crowded.tomogram.dtype == crowded.clean.dtype == np.float32
    assert crowded.labels.dtype == np.uint8 and crowded.instances.dtype == np.uint16
    assert crowded.classes == SMALL
    assert set(np.unique(crowded.labels)) <= set(range(len(SMALL) + 1))
    assert crowded.target_mask.dtype == np.uint8
    np.testing.assert_array_equal(crowded.target_mask, crowded.labels == SMALL.index("4cr2") + 1)
    assert simulate_volume(small(shape=24)).target_mask is None


def test_crowded_density_is_reached(crowded):
    assert crowded.density == pytest.approx((crowded.labels > 0).mean())
    assert 0.25 <= crowded.density < 0.28
    assert len(crowded.particles) > 10
    assert set(crowded.class_counts) == set(SMALL) and min(crowded.class_counts.values()) > 0


def test_labels_are_the_class_of_each_nonoverlapping_instance(crowded):
    particles = crowded.particles
    assert [p["id"] for p in particles] == list(range(1, len(particles) + 1))
    # every placed particle owns voxels, and labels are exactly the class of the instance there
    assert set(np.unique(crowded.instances)) == set(range(len(particles) + 1))
    classes = np.array([0] + [p["class"] for p in particles], np.uint8)
    np.testing.assert_array_equal(crowded.labels, classes[crowded.instances])
    for p in particles:
        assert SMALL[p["class"] - 1] == p["template"]


def _independent_mask(particle: dict, shape, threshold: float = 0.2):
    """Render one particle's ground truth from its published position and rotation, with scipy.

    Returns (mask, ambiguous): voxels above the threshold, and voxels within rounding of it.
    """
    density = load_template(particle["template"])
    centre = np.array(ndimage.center_of_mass(density))
    position, rotation = np.array(particle["position"]), np.array(particle["rotation"])
    radius = int(np.ceil(np.sqrt(((np.argwhere(density > 0) - centre) ** 2).sum(axis=1)).max())) + 3
    lo = np.maximum(np.round(position).astype(int) - radius, 0)
    hi = np.minimum(np.round(position).astype(int) + radius + 1, shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    source = (grid - position) @ rotation + centre  # template point centre + u lands at position + R u
    values = ndimage.map_coordinates(density, source.reshape(-1, 3).T, order=1, cval=0.0).reshape(grid.shape[:3])
    mask, ambiguous = np.zeros(shape, bool), np.zeros(shape, bool)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask[box] = values > threshold
    ambiguous[box] = np.abs(values - threshold) < 1e-4
    return mask, ambiguous


def test_published_positions_and_rotations_reproduce_disjoint_masks(crowded):
    """Each particle's mask, re-rendered independently from particles.json data, is its instance; none overlap."""
    claimed = np.zeros(crowded.labels.shape, np.int32)
    for p in crowded.particles[:40]:
        rotation = np.array(p["rotation"])
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        mask, ambiguous = _independent_mask(p, crowded.labels.shape)
        own = crowded.instances == p["id"]
        assert own.sum() > 0
        assert not ((mask != own) & ~ambiguous).any(), p["id"]
        assert not (claimed[mask & ~ambiguous] > 0).any()
        claimed[mask & ~ambiguous] = p["id"]


def test_rotations_are_spread_over_so3():
    rotations = np.array([placement_module.random_rotation(np.random.default_rng(i)) for i in range(4000)])
    # uniform on SO(3): every matrix entry averages 0 and has mean square 1/3
    assert np.abs(rotations.mean(axis=0)).max() < 0.03
    np.testing.assert_allclose((rotations**2).mean(axis=0), 1 / 3, atol=0.02)


# --------------------------------------------------------------------------------------- microscope


def test_snr_is_signal_variance_over_noise_variance(crowded):
    noise = crowded.tomogram.astype(np.float64) - crowded.clean
    measured = crowded.clean.var(dtype=np.float64) / noise.var()
    assert measured == pytest.approx(0.5, rel=0.05)
    assert crowded.signal_variance / crowded.noise_variance == pytest.approx(0.5)
    clean = simulate_volume(small(shape=32, snr=INF))
    np.testing.assert_array_equal(clean.tomogram, clean.clean)
    assert clean.noise_variance == 0.0


def test_protein_is_bright(crowded):
    assert crowded.clean[crowded.labels > 0].mean() > crowded.clean[crowded.labels == 0].mean() + 0.03


def _wedge_power_fraction(volume: np.ndarray, tilt_range: float) -> float:
    power = np.abs(np.fft.fftn(volume)) ** 2
    kz = np.fft.fftfreq(volume.shape[0])[:, None, None]
    kx = np.fft.fftfreq(volume.shape[2])[None, None, :]
    angle = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    wedge = np.broadcast_to(angle > tilt_range + 1.0, power.shape)  # a degree away from the edge
    return float(power[wedge].sum() / power.sum())


@pytest.mark.parametrize("snr", [INF, 1.0])
def test_missing_wedge_is_empty(snr):
    sim = simulate_volume(small(shape=(48, 40, 56), tilt_range=50.0, snr=snr, seed=3))
    assert _wedge_power_fraction(sim.tomogram, 50.0) < 1e-9
    # without the wedge the same region holds a good share of the power
    open_ = simulate_volume(small(shape=(48, 40, 56), tilt_range=90.0, snr=snr, seed=3))
    assert _wedge_power_fraction(open_.tomogram, 50.0) > 0.2


def test_ctf_matches_hand_computed_values():
    # λ = h / sqrt(2 m e V (1 + e V / 2 m c²)) = 0.019687 Å at 300 kV
    assert electron_wavelength(300) == pytest.approx(0.0196875, rel=1e-4)
    assert electron_wavelength(200) == pytest.approx(0.0250793, rel=1e-4)
    assert ctf(0.0, amplitude_contrast=0.07) == pytest.approx(-0.07)
    # k = 0.02/Å, 3 µm underfocus, Cs 2.7 mm, 300 kV: γ = π·λ·3e4·4e-4 − π/2·2.7e7·λ³·1.6e-7 = 0.742149 rad
    lam = 0.0196875
    gamma = math.pi * lam * 3e4 * 0.02**2 - 0.5 * math.pi * 2.7e7 * lam**3 * 0.02**4
    assert gamma == pytest.approx(0.742149, rel=1e-5)
    expected = -(math.sqrt(1 - 0.07**2) * math.sin(gamma) + 0.07 * math.cos(gamma))
    assert ctf(0.02) == pytest.approx(expected, rel=1e-4)
    assert ctf(0.02, bfactor=100.0) == pytest.approx(expected * math.exp(-100 * 0.02**2 / 4), rel=1e-4)
    # overfocus flips the phase term: protein would look bright at low frequency
    assert ctf(0.01, defocus_um=-3.0) > 0 > ctf(0.01, defocus_um=3.0)


def test_power_spectrum_vanishes_at_the_first_ctf_zero():
    sim = simulate_volume(small(shape=64, tilt_range=90.0, snr=INF, defocus_um=3.0, seed=5))
    power = np.abs(np.fft.fftn(sim.tomogram)) ** 2
    freqs = np.fft.fftfreq(64, 10.0)
    k = np.sqrt(freqs[:, None, None] ** 2 + freqs[None, :, None] ** 2 + freqs[None, None, :] ** 2)
    edges = np.linspace(0.03, 0.05, 21)
    profile = np.array([power[(k >= a) & (k < b)].mean() for a, b in zip(edges[:-1], edges[1:])])
    centres = (edges[:-1] + edges[1:]) / 2
    # first zero: π λ Δf k² − π/2 Cs λ³ k⁴ + asin(A) = π  ->  k ≈ 0.0407/Å (24.6 Å)
    k0 = math.sqrt((math.pi - math.asin(0.07)) / (math.pi * electron_wavelength(300) * 3e4))
    assert k0 == pytest.approx(0.0407, abs=2e-4)
    assert abs(centres[np.argmin(profile)] - k0) <= 0.001
    assert profile.min() < 0.02 * profile[0]


# ---------------------------------------------------------------------------------------------- files


def test_simulate_writes_three_files_and_refuses_to_overwrite(tmp_path):
    config = small(shape=(32, 40, 48), target="1bxn")
    report = simulate(tmp_path / "out", config)
    memory = simulate_volume(config)
    assert not report.out_of_core and report.shape == (32, 40, 48)
    with mrcfile.open(report.tomogram) as mrc:
        assert mrc.data.dtype == np.float32 and mrc.voxel_size.x == mrc.voxel_size.z == 10.0
        np.testing.assert_array_equal(mrc.data, memory.tomogram)
    with mrcfile.open(report.labels) as mrc:
        assert int(mrc.header.mode) == 0 and mrc.voxel_size.y == 10.0
        np.testing.assert_array_equal(mrc.data.view(np.uint8), memory.labels)
    document = json.loads(open(report.particles).read())
    assert document["shape"] == [32, 40, 48] and document["voxel_size"] == 10.0
    assert [c["name"] for c in document["classes"]] == ["background", *SMALL]
    assert document["target"] == {"label": 1, "name": "1bxn"}
    assert document["particles"] == memory.particles and report.particle_count == len(memory.particles)
    assert sum(report.class_counts.values()) == report.particle_count
    with pytest.raises(OutputError) as err:
        simulate(tmp_path / "out", config)
    assert "overwrite=True" in err.value.fix
    simulate(tmp_path / "out", small(shape=16, snr=INF), overwrite=True)
    assert json.loads(open(report.particles).read())["config"]["snr"] == "inf"


@pytest.mark.parametrize("snr", [INF, 0.7])
def test_large_volumes_go_out_of_core_with_the_same_result(tmp_path, monkeypatch, snr):
    config = small(shape=(33, 36, 47), snr=snr, tilt_range=55.0, seed=4)
    memory = simulate_volume(config)
    monkeypatch.setattr(sim_module, "IN_MEMORY_LIMIT", 32)
    monkeypatch.setattr(sim_module, "SLAB_VOXELS", 2000)  # many slabs of a few planes
    with pytest.raises(OptionError, match="simulate"):
        simulate_volume(config)
    report = simulate(tmp_path, config)
    assert report.out_of_core
    with mrcfile.open(report.tomogram) as mrc:
        np.testing.assert_allclose(mrc.data, memory.tomogram, atol=1e-5 * float(memory.tomogram.std()))
        assert mrc.header.rms == pytest.approx(float(mrc.data.std()), rel=1e-4)
        assert mrc.voxel_size.x == 10.0
    with mrcfile.open(report.labels) as mrc:
        np.testing.assert_array_equal(mrc.data.view(np.uint8), memory.labels)
    assert json.loads(open(report.particles).read())["particles"] == memory.particles
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.mrc", "particles.json", "tomogram.mrc"]


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("field, value", [
    ("shape", (0, 16, 16)),
    ("shape", -8),
    ("shape", (16, 16)),
    ("snr", 0.0),
    ("snr", -1.0),
    ("snr", float("nan")),
    ("tilt_range", 0.0),
    ("tilt_range", 90.5),
    ("tilt_range", -30.0),
    ("templates", ("1bxn", "nope")),
    ("templates", ()),
    ("templates", ("1bxn", "1bxn")),
    ("target", "4v4r"),
    ("density", 0.0),
    ("density", 0.9),
    ("voxel_size", 0.0),
    ("amplitude_contrast", 1.0),
    ("mask_threshold", 0.0),
    ("seed", -1),
    ("attempts", 0),
])
def test_bad_inputs_are_option_errors_with_a_fix(field, value):
    values = dict(shape=16, templates=("1bxn", "3qm1"))
    values[field] = value
    with pytest.raises(OptionError) as err:
        SimulationConfig(**values)
    assert err.value.fix and field in err.value.what


def test_output_path_that_is_a_file_is_an_output_error(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputError):
        simulate(tmp_path / "taken", small(shape=16))


def test_a_simulation_this_machine_cannot_hold_is_refused_before_it_starts(tmp_path, monkeypatch):
    """Out of core the label map stays in memory (1 byte per voxel) and the disk takes 9 bytes per
    voxel: a shape past either is refused at once, and leaves no folder behind."""
    out = tmp_path / "new" / "sim"
    with pytest.raises(OptionError, match=r"--shape 10000×10000×10000 needs about 931.\d GiB of memory"):
        simulate(out, SimulationConfig(shape=(10000, 10000, 10000)))  # more than any machine here has
    assert not (tmp_path / "new").exists()
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sim_module, "memory_available", lambda: 64 * 2**30)  # a machine with room in memory, not on disk
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**30, 2**30))
    with pytest.raises(OutputError, match=r"needs about 8.4 GiB of disk .* but 1.0 GiB is free"):
        simulate(out, SimulationConfig(shape=(1000, 1000, 1000)))
    assert not (tmp_path / "new").exists()


def test_a_simulation_that_fails_midway_leaves_no_files(tmp_path, monkeypatch):
    """A full disk while the labels are written: the tomogram already written goes too, so no
    half-made simulation looks like a whole one."""
    import errno

    written = []
    real = sim_module._write_mrc

    def second_fails(path, data, voxel_size):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(path, data, voxel_size)

    monkeypatch.setattr(sim_module, "_write_mrc", second_fails)
    with pytest.raises(OSError, match="No space"):
        simulate(tmp_path / "sim", SimulationConfig(shape=(32, 32, 32), seed=1))
    assert written and list((tmp_path / "sim").iterdir()) == []

"""The simulated microscope: CTF, missing wedge, Fourier filtering and noise of a cryo-ET tomogram.

Its own module because it is pure signal processing on a density volume, shared by the in-memory
and the out-of-core simulation (which filters slab by slab with the same transfer function).

**Transfer.** The density is filtered in 3D Fourier space by the CTF evaluated at the spatial
frequency ``|k|`` (weak-phase approximation; the common approximation for a tomogram, ignoring
the defocus gradient across tilted images) and by the missing wedge of a single-axis tilt series
of ``±tilt_range`` degrees about the y axis: Fourier components whose direction lies outside the
tilt range (``|k_z| > tan(tilt_range)·|k_x|``) are set to zero. This is the Fourier-mask
approximation of projection + weighted back-projection with continuous angular sampling, not a
real projection/reconstruction.
``CTF(k) = -[sqrt(1 - A²)·sin γ + A·cos γ]·exp(-B k²/4)``, ``γ = π λ Δf k² - π/2 Cs λ³ k⁴``,
with ``Δf = defocus_um`` (positive = underfocus, the CTFFIND/RELION convention), ``A =
amplitude_contrast``, ``B = bfactor`` (Å², 0 = no envelope) and λ the relativistic electron
wavelength at ``voltage_kv``. In underfocus the CTF is negative at low frequency: protein is dark
in a raw tomogram. **The output is negated (filtered by -CTF): protein is bright**, as most
segmentation tools expect.

**Noise.** White Gaussian noise, restricted to the same tilt range (a reconstruction has no data,
hence no noise, in the missing wedge), is scaled so that ``SNR = var(signal) / var(noise)``
exactly (Xu et al.'s definition), where *signal* is the CTF- and wedge-filtered noise-free volume
(``Simulation.clean``) and *noise* is ``tomogram - clean``. ``snr=float('inf')`` adds no noise.

The Fourier filtering is periodic: a particle cut by one face rings faintly at the opposite face.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .geometry import Shape

if TYPE_CHECKING:
    from .simulate import SimulationConfig

__all__ = ["electron_wavelength", "ctf", "transfer", "apply_transfer", "wedge_noise", "moments", "variance"]


def _fft():
    import scipy.fft

    return scipy.fft


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


def transfer(shape: Shape, config: SimulationConfig, ys: slice = slice(None)) -> np.ndarray:
    """-CTF(|k|) times the wedge on the rfftn grid (rows ``ys`` of k_y), float32: the filter from density to signal."""
    kz, ky, kx = _frequencies(shape, config.voxel_size, ys)
    k = np.sqrt(kz * kz + ky * ky + kx * kx)
    h = -ctf(k, config.defocus_um, config.voltage_kv, config.cs_mm, config.amplitude_contrast, config.bfactor)
    h = h.astype(np.float32, copy=False)
    wedge = _wedge(shape, config)
    if wedge is not None:
        h *= wedge
    return h


def apply_transfer(volume: np.ndarray, response: np.ndarray | None) -> np.ndarray:
    """``volume`` filtered in Fourier space by ``response`` (from :func:`transfer`; None: unfiltered), float32."""
    if response is None:
        return volume
    fft = _fft()
    spectrum = fft.rfftn(volume, workers=-1)
    spectrum *= response
    return fft.irfftn(spectrum, s=volume.shape, workers=-1).astype(np.float32, copy=False)


def moments(volume: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64, a few planes at a time (no full-size temporary, no BLAS)."""
    total = squares = 0.0
    step = max(1, (1 << 18) // max(1, volume[0].size))
    for start in range(0, len(volume), step):
        chunk = volume[start:start + step].astype(np.float64).ravel()
        total += float(chunk.sum())
        squares += float(np.einsum("i,i->", chunk, chunk))
    return total, squares


def variance(volume: np.ndarray) -> float:
    """The population variance of ``volume``, from :func:`moments`."""
    total, squares = moments(volume)
    mean = total / volume.size
    return max(0.0, squares / volume.size - mean * mean)


def _white_noise(config: SimulationConfig, ys: range) -> np.ndarray:
    """Gaussian white noise for the rows ``ys`` (Z, len(ys), X): one random stream per y, so any slab is reproducible."""
    z, _, x = config.shape
    out = np.empty((z, len(ys), x), np.float32)
    for j, y in enumerate(ys):
        out[:, j, :] = config.random_stream("noise", y).standard_normal((z, x), dtype=np.float32)
    return out


def wedge_noise(config: SimulationConfig, ys: range) -> np.ndarray:
    """White noise restricted to the measured tilt range: filtered in (z, x) only, as the wedge ignores k_y."""
    noise = _white_noise(config, ys)
    wedge = _wedge(config.shape, config)
    if wedge is None:
        return noise
    fft = _fft()
    spectrum = fft.rfftn(noise, axes=(0, 2), workers=-1)
    spectrum *= wedge
    return fft.irfftn(spectrum, s=(config.shape[0], config.shape[2]), axes=(0, 2), workers=-1).astype(np.float32, copy=False)

"""Out-of-core simulation: the in-memory model for tomograms too large for memory, slab by slab on disk.

Its own module because only :func:`tilesegment.simulate.simulate` calls it, for shapes over
``IN_MEMORY_LIMIT`` voxels per axis, and its slab bookkeeping has nothing to do with the model.

Particles are placed globally, the density is rendered and the 3D FFT done slab by slab
(``slab_voxels`` voxels, ``SLAB_VOXELS`` in :mod:`tilesegment.simulate`) through an anonymous
scratch file of 4 bytes per voxel next to the output, and the MRC files are written slab by slab
through ``mrcfile.new_mmap``. Memory then holds the uint8 label map (1 byte per voxel, the
placement's occupancy grid) and a few slabs; the result equals the in-memory one up to float
rounding. Placement is the slow part (see :mod:`tilesegment.placement`).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .microscope import moments, transfer, wedge_noise
from .placement import place, render_slabs
from .templates import prepared_templates

if TYPE_CHECKING:
    from .simulate import SimulationConfig

__all__ = ["simulate_out_of_core"]


def _slabs(n: int, plane: int, slab_voxels: int) -> Iterator[range]:
    """Ranges covering ``0..n`` with about ``slab_voxels`` voxels each, for planes of ``plane`` voxels."""
    step = max(1, slab_voxels // max(1, plane))
    for start in range(0, n, step):
        yield range(start, min(n, start + step))


def _rfft_weights(x: int) -> np.ndarray:
    """How often each rfft column appears in the full spectrum (Parseval on a half spectrum)."""
    weights = np.full(x // 2 + 1, 2.0)
    weights[0] = 1.0
    if x % 2 == 0:
        weights[-1] = 1.0
    return weights


def simulate_out_of_core(config: SimulationConfig, paths: dict[str, Path], slab_voxels: int) -> tuple[list[dict], float, float, float]:
    """The in-memory model, with the 3D FFT done slab by slab through a scratch file; writes ``paths``.

    1. place globally (the uint8 label map is the occupancy grid) and write labels.mrc;
    2. z-slabs: render the density, FFT along y and x, store in the scratch file;
    3. y-slabs: FFT along z, apply -CTF·wedge (signal variance by Parseval), inverse FFT along z;
       meanwhile write wedge-filtered noise into tomogram.mrc (its variance measured);
    4. z-slabs: inverse FFT along y and x, add the noise scaled to var(signal)/snr, write.

    Returns the particle records, the labelled fraction, the signal and the noise variance.
    """
    import mrcfile
    import scipy.fft as fft

    templates = prepared_templates(config.templates, config.voxel_size)
    nz, ny, nx = config.shape
    size = nz * ny * nx
    labels = np.zeros(config.shape, np.uint8)  # also the occupancy grid: 1 byte per voxel
    particles, filled = place(config, templates, labels)
    with mrcfile.new_mmap(str(paths["labels"]), config.shape, mrc_mode=0, overwrite=True) as mrc:
        for zs in _slabs(nz, ny * nx, slab_voxels):
            mrc.data[zs.start:zs.stop] = labels[zs.start:zs.stop].view(np.int8)
        mrc.voxel_size = config.voxel_size
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = 0, int(labels.max(initial=0)), filled / size
    del labels
    # an anonymous scratch file next to the output (same disk): freed on close, whatever happens
    with tempfile.TemporaryFile(dir=paths["tomogram"].parent) as scratch, \
            mrcfile.new_mmap(str(paths["tomogram"]), config.shape, mrc_mode=2, overwrite=True) as mrc:
        spectrum = np.memmap(scratch, np.complex64, "w+", shape=(nz, ny, nx // 2 + 1))
        for zs, density in render_slabs(particles, templates, config.shape, list(_slabs(nz, ny * nx, slab_voxels))):
            spectrum[zs.start:zs.stop] = fft.rfftn(density, axes=(1, 2), workers=-1)
        weights = _rfft_weights(nx)
        squares, noise_total, noise_squares, dc = 0.0, 0.0, 0.0, 0.0  # signal by Parseval; noise as written
        for ys in _slabs(ny, nz * nx, slab_voxels):
            rows = fft.fft(spectrum[:, ys.start:ys.stop], axis=0, workers=-1)
            rows *= transfer(config.shape, config, slice(ys.start, ys.stop))
            squares += float(np.square(np.abs(rows)).sum(axis=(0, 1), dtype=np.float64) @ weights)
            if ys.start == 0:
                dc = float(rows[0, 0, 0].real)
            spectrum[:, ys.start:ys.stop] = fft.ifft(rows, axis=0, workers=-1)
            if not math.isinf(config.snr):
                noise = wedge_noise(config, ys)
                s, q = moments(noise)
                noise_total, noise_squares = noise_total + s, noise_squares + q
                mrc.data[:, ys.start:ys.stop] = noise
        mean = dc / size
        signal_variance = max(0.0, squares / size**2 - mean * mean)
        noise_variance = 0.0 if math.isinf(config.snr) else signal_variance / config.snr
        raw = max(0.0, noise_squares / size - (noise_total / size) ** 2)
        scale = np.float32(math.sqrt(noise_variance / raw)) if noise_variance > 0 and raw > 0 else np.float32(0.0)
        total = squares = 0.0
        lo, hi = math.inf, -math.inf
        for zs in _slabs(nz, ny * nx, slab_voxels):
            out = fft.irfftn(spectrum[zs.start:zs.stop], s=(ny, nx), axes=(1, 2), workers=-1).astype(np.float32, copy=False)
            if not math.isinf(config.snr):
                out += scale * mrc.data[zs.start:zs.stop]
            mrc.data[zs.start:zs.stop] = out
            s, q = moments(out)
            total, squares = total + s, squares + q
            lo, hi = min(lo, float(out.min())), max(hi, float(out.max()))
        del spectrum
        mean = total / size
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
        mrc.header.rms = math.sqrt(max(0.0, squares / size - mean * mean))
        mrc.voxel_size = config.voxel_size
    records = [p.record(i + 1, templates) for i, p in enumerate(particles)]
    return records, filled / size, signal_variance, noise_variance

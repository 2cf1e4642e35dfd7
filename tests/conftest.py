"""Shared fixtures: tiny volumes written as MRC/Zarr, an identity checkpoint, one in-process cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import warnings

import mrcfile
import numpy as np
import pytest

from tilesegment.model import ModelConfig, build_model, save_checkpoint

VOXEL = 10.0


def write_mrc(path, data: np.ndarray, voxel: float = VOXEL, **kwargs) -> str:
    with mrcfile.new(str(path), overwrite=True, **kwargs) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel
    return str(path)


def sample(shape, dtype, seed: int = 0) -> np.ndarray:
    """Values spanning ``dtype``; floats include NaN, -0.0 and ±inf, which must survive bit for bit."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype.newbyteorder("=")).astype(dtype)
    data = rng.normal(scale=100, size=shape).astype(dtype)
    if data.size >= 4:
        data.flat[:3] = [np.nan, -0.0, np.inf]
        data.flat[-1] = -np.inf  # not in the same 2x2x2 group as +inf
    return data


def mrc_file(path, data: np.ndarray, voxel=(1.5, 2.5, 3.5), ext: np.ndarray | None = None, origin=(0.0, 0.0, 0.0)) -> str:
    """Write ``data`` with an anisotropic voxel size (x, y, z) and optionally an extended header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN/inf in the data
        with mrcfile.new(str(path), overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = voxel
            mrc.header.origin = origin
            if ext is not None:
                mrc.set_extended_header(ext)
    return str(path)


def random_volume(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32)


@pytest.fixture(scope="session")
def identity_model(tmp_path_factory) -> str:
    config = ModelConfig(architecture="identity", channels=(), class_names=("background", "value"), voxel_size=VOXEL,
                         normalization="none", output="none", description="test identity")
    path = tmp_path_factory.mktemp("models") / "identity.safetensors"
    save_checkpoint(path, build_model(config), config)
    return str(path)


@pytest.fixture(scope="session")
def small_net(tmp_path_factory) -> str:
    """A tiny randomly initialised SSN3D encoder-decoder with non-trivial (non-zero) batch-norm statistics."""
    import torch

    torch.manual_seed(1)
    config = ModelConfig(architecture="ssn3d-encdec", channels=(4, 8, 8), class_names=("background", "a", "b"), voxel_size=VOXEL)
    model = build_model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("models") / "small.safetensors"
    save_checkpoint(path, model, config)
    return str(path)


@pytest.fixture(scope="session")
def client():
    """One in-process cluster (threads) for the fast pipeline tests; real processes are tested apart."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture
def chdir_tmp(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def blobs(shape, seed: int = 0, count: int | None = None, snr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(tomogram, truth)``: bright ellipsoids (label 1) in gaussian noise, an easy training task."""
    rng = np.random.default_rng(seed)
    count = count if count is not None else max(4, int(np.prod(shape) / 6000))
    clean = np.zeros(shape, np.float32)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(count):
        centre = [rng.uniform(0, n) for n in shape]
        radii = rng.uniform(2.5, 6.0, size=3)
        clean[sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0] = 1.0
    noisy = clean + rng.normal(0.0, (clean.std() or 1.0) / np.sqrt(snr), size=shape).astype(np.float32)
    return noisy.astype(np.float32), (clean > 0).astype(np.uint8)


@contextlib.contextmanager
def process_holding_lock(output: str):
    """Another process that holds ``output``'s lock until the block ends, then dies by SIGKILL
    (no clean-up of its own runs, as after a crash)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from tilesegment.lock import OutputLock\n"
                               f"OutputLock({output!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

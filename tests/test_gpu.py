"""The CUDA path: same results as the CPU, reduced precision within bounds. Skipped without a GPU
(CI never has one); run on a GPU machine with ``python -m pytest tests/test_gpu.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tilesegment.pipeline import segment
from tilesegment.simulate import SimulationConfig, simulate_volume

from .conftest import write_mrc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def labels(path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/0", mode="r")[:])


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory):
    sim = simulate_volume(SimulationConfig(shape=(96, 96, 96), snr=1.0, seed=4))
    return write_mrc(tmp_path_factory.mktemp("gpu") / "sim.mrc", sim.tomogram)


def test_gpu_run_matches_the_cpu_run(tmp_path, tomogram):
    cpu = segment(tomogram, str(tmp_path / "cpu.zarr"), probabilities=True, probability_dtype="float32")
    gpu = segment(tomogram, str(tmp_path / "gpu.zarr"), device="cuda", batch=8, probabilities=True, probability_dtype="float32")
    assert gpu.tiles_forwarded == gpu.tile_count == cpu.tiles_forwarded
    a = zarr.open_array(str(tmp_path / "cpu.zarr/probabilities/0"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "gpu.zarr/probabilities/0"), mode="r")[:]
    # IEEE float32 on both (predict.cudnn_math: not PyTorch's TF32 default for cuDNN), summed in other orders
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert (labels(str(tmp_path / "cpu.zarr")) == labels(str(tmp_path / "gpu.zarr"))).mean() > 0.999


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_reduced_precision_on_the_gpu_agrees_with_fp32(tmp_path, tomogram, precision):
    segment(tomogram, str(tmp_path / "fp32.zarr"), device="cuda", batch=8)
    segment(tomogram, str(tmp_path / "half.zarr"), device="cuda", batch=8, precision=precision)
    assert (labels(str(tmp_path / "fp32.zarr")) == labels(str(tmp_path / "half.zarr"))).mean() > 0.99


def test_pinned_batches_reused_across_forwards_give_fresh_batches_sums():
    """On the GPU a batch of views goes through one pinned buffer per thread, copied to the device
    asynchronously: reusing it batch after batch must not change what is summed."""
    from tilesegment.blending import new_accumulator, placement, window
    from tilesegment.geometry import Box
    from tilesegment.model import read_checkpoint
    from tilesegment.predict import Predictor

    predictor = Predictor(read_checkpoint(None), "cuda")
    weights = window((32, 32, 32), "gaussian")
    block = np.random.default_rng(3).standard_normal((80, 48, 48)).astype(np.float32)
    acc_box = Box.from_shape(block.shape)
    boxes = [Box((z, y, x), (z + 32, y + 32, x + 32)) for z in (0, 16, 32, 48) for y in (0, 16) for x in (0, 16)]
    got, expected = new_accumulator(1, acc_box), new_accumulator(1, acc_box)
    for k in range(0, len(boxes), 4):
        batch = boxes[k:k + 4]
        places = [placement(acc_box, box) for box in batch]
        predictor.forward_into([block[box.slices()] for box in batch], got, places, weights)
        predictor.forward_into(np.stack([block[box.slices()] for box in batch]), expected, places, weights)
    np.testing.assert_allclose(got, expected, atol=1e-5)  # a batch overwritten before its copy would differ by far more
    assert got.max() > 0


def test_a_batch_the_gpu_cannot_hold_is_refused_before_the_run(tmp_path, tomogram):
    import os

    from tilesegment.errors import OptionError

    with pytest.raises(OptionError, match="GiB of memory available on cuda"):
        segment(tomogram, str(tmp_path / "big.zarr"), device="cuda", tile=2048)
    assert not os.path.exists(tmp_path / "big.zarr")

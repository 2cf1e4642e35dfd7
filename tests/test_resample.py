"""Resampling to a model's voxel size (`tileseg convert --voxel-size`): scipy as the oracle, region
by region equal to the whole volume at once, and the converted store a run takes."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import zarr
from hypothesis import given, settings, strategies as st
from scipy import ndimage

import tilesegment.convert as convert_module
from tilesegment.convert import convert
from tilesegment.errors import InputError, OptionError
from tilesegment.geometry import Box
from tilesegment.pyramid import downsample
from tilesegment.resample import Resampling, resampling_for
from tilesegment.volume import open_volume

from .conftest import random_volume, write_mrc


def whole(plan: Resampling, data: np.ndarray, dtype="float32") -> np.ndarray:
    box = Box.from_shape(plan.shape)
    return plan.resample(data, box, Box.from_shape(plan.out_shape), dtype)


def scipy_oracle(plan: Resampling, data: np.ndarray) -> np.ndarray:
    """The same resampling from scipy.ndimage's own routines, on the whole array."""
    smoothed = ndimage.gaussian_filter(data.astype(np.float64), plan.sigma, mode="nearest") if any(plan.sigma) else data.astype(np.float64)
    grid = np.meshgrid(*(plan.coordinates(axis, 0, n) for axis, n in enumerate(plan.out_shape)), indexing="ij")
    return ndimage.map_coordinates(smoothed, grid, order=1, mode="nearest")


@pytest.mark.parametrize("voxel, target", [(13.48, 10.0), (7.84, 10.0), (5.0, 10.0), (10.0, 4.0), ((20.0, 10.0, 10.0), 10.0)])
def test_agrees_with_scipy(voxel, target):
    data = random_volume((23, 30, 27), seed=1)
    voxel = voxel if isinstance(voxel, tuple) else (voxel,) * 3
    plan = Resampling(data.shape, voxel, (target,) * 3)
    assert plan.out_shape == tuple(max(1, round(n * v / target)) for n, v in zip(data.shape, voxel))
    np.testing.assert_allclose(whole(plan, data), scipy_oracle(plan, data), rtol=0, atol=2e-5)


def test_a_2x_resampling_samples_where_a_2x_bin_puts_its_voxels():
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32), (8, 8, 16)).copy()
    plan = Resampling(ramp.shape, (5.0,) * 3, (10.0,) * 3)
    out = whole(plan, ramp)
    assert out.shape == (4, 4, 8)
    # the mean of voxels 2j and 2j+1, as binning gives (the smoothing keeps a ramp a ramp inside)
    np.testing.assert_allclose(out[0, 0, 1:-1], ramp[0, 0].reshape(8, 2).mean(axis=1)[1:-1], atol=1e-5)
    constant = np.full((9, 10, 11), 3.25, np.float32)
    np.testing.assert_allclose(whole(Resampling(constant.shape, (13.48,) * 3, (10.0,) * 3), constant), 3.25, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(*[st.integers(4, 26)] * 3), voxel=st.sampled_from([3.3, 7.84, 13.48, 21.0]),
       target=st.sampled_from([5.0, 10.0]), piece=st.tuples(*[st.integers(1, 9)] * 3))
def test_region_by_region_is_the_whole_volume_to_the_bit(shape, voxel, target, piece):
    data = random_volume(shape, seed=3)
    plan = Resampling(shape, (voxel,) * 3, (target,) * 3)
    expected = whole(plan, data)
    assembled = np.full(plan.out_shape, np.nan, np.float32)
    for box in Box.from_shape(plan.out_shape).split(piece):
        read = plan.source_box(box)
        assert Box.from_shape(shape).contains(read)
        assembled[box.slices()] = plan.resample(data[read.slices()], read, box, "float32")
    assert np.array_equal(assembled, expected)


def test_integers_are_rounded_and_clipped_to_their_dtype():
    data = np.array([[[-128, 127, 127, -128] * 2] * 8] * 8, np.int8)
    plan = Resampling(data.shape, (10.0,) * 3, (4.0,) * 3)
    out = whole(plan, data, "int8")
    reference = np.clip(np.rint(whole(plan, data)), -128, 127)
    assert out.dtype == np.int8 and np.array_equal(out, reference)


def test_what_needs_no_resampling_and_what_cannot_be():
    assert resampling_for((8, 8, 8), (10.0,) * 3, None, "t.mrc") is None
    assert resampling_for((8, 8, 8), (10.0, 10.0, 10.0004), 10.0, "t.mrc") is None  # its own voxel size: a copy
    assert resampling_for((8, 8, 8), (13.48,) * 3, 10.0, "t.mrc").out_shape == (11, 11, 11)
    with pytest.raises(InputError, match="t.mrc records no voxel size, so it cannot be resampled to 10 Å/voxel"):
        resampling_for((8, 8, 8), None, 10.0, "t.mrc")
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(OptionError, match="is not a voxel size"):
            resampling_for((8, 8, 8), (10.0,) * 3, bad, "t.mrc")
    with pytest.raises(OptionError, match="leaves t.mrc"):
        resampling_for((8, 8, 8), (10.0,) * 3, 100.0, "t.mrc")


# --- convert --voxel-size ---


def test_convert_resamples_level_0_region_by_region_and_records_it(tmp_path, monkeypatch):
    data = random_volume((40, 44, 36), seed=4)
    src = write_mrc(tmp_path / "portal.mrc", data, voxel=13.48)
    with mrcfile.open(src, mode="r+") as mrc:  # an origin, which moves with the first voxel's centre
        mrc.header.origin = (100.0, 200.0, 300.0)  # x, y, z
    monkeypatch.setattr(convert_module, "REGION_BYTES", 16 * 16 * 16 * 8 * 2)  # many regions, each with its halo
    report = convert(src, tmp_path / "tomo.zarr", chunk=16, voxel_size=10.0)
    header_voxel = open_volume(src).voxel_size  # 13.48 as float32 holds it
    plan = Resampling(data.shape, header_voxel, (10.0,) * 3)
    assert report.shape == plan.out_shape == (54, 59, 49) and report.voxel_size == (10.0,) * 3
    assert report.resampled_from == header_voxel == pytest.approx((13.48,) * 3)
    group = zarr.open_group(str(tmp_path / "tomo.zarr"), mode="r")
    assert np.array_equal(group["0"][:], whole(plan, data))
    assert np.array_equal(group["1"][:], downsample(group["0"][:], "mean"))  # the pyramid is built on the resampled level
    attrs = group.attrs.asdict()
    scales = [d["coordinateTransformations"][0]["scale"] for d in attrs["multiscales"][0]["datasets"]]
    assert scales[0] == [10.0, 10.0, 10.0] and scales[1] == [20.0, 20.0, 20.0]
    meta = attrs["tilesegment"]
    assert meta["resampled"]["from_angstrom"] == list(header_voxel) and meta["resampled"]["from_shape"] == [40, 44, 36]
    shift = (10.0 - header_voxel[0]) / 2
    assert meta["origin_angstrom"] == pytest.approx([300.0 + shift, 200.0 + shift, 100.0 + shift])
    volume = open_volume(str(tmp_path / "tomo.zarr"))
    assert volume.voxel_size == (10.0, 10.0, 10.0) and volume.shape == plan.out_shape


def test_its_own_voxel_size_is_a_plain_copy(tmp_path):
    data = random_volume((20, 20, 20), seed=5)
    src = write_mrc(tmp_path / "t.mrc", data, voxel=10.0)
    report = convert(src, tmp_path / "t.zarr", chunk=16, voxel_size=10.0)
    assert report.resampled_from is None
    group = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    assert np.array_equal(group["0"][:], data) and "resampled" not in group.attrs["tilesegment"]


def test_a_zarr_image_is_resampled_and_never_replaced(tmp_path):
    data = random_volume((32, 32, 32), seed=6)
    fine = tmp_path / "fine.zarr"
    convert(write_mrc(tmp_path / "fine.mrc", data, voxel=7.84), fine, chunk=16)
    report = convert(fine, tmp_path / "tomo.zarr", chunk=16, voxel_size=10.0)
    plan = Resampling(data.shape, open_volume(str(fine)).voxel_size, (10.0,) * 3)
    assert report.shape == plan.out_shape
    assert np.array_equal(zarr.open_group(str(tmp_path / "tomo.zarr"), mode="r")["0"][:], whole(plan, data))
    before = sorted(os.listdir(fine))
    with pytest.raises(OptionError, match="is inside the input"):
        convert(fine, fine, voxel_size=10.0, overwrite=True)
    with pytest.raises(OptionError, match="contains the input"):
        convert(f"{fine}/0", fine, voxel_size=10.0, overwrite=True)
    assert sorted(os.listdir(fine)) == before and np.array_equal(zarr.open_group(str(fine), mode="r")["0"][:], data)
    with pytest.raises(InputError, match="needs no converting.*--voxel-size"):  # without a voxel size there is nothing to do
        convert(fine, tmp_path / "again.zarr")


def test_a_compressed_mrc_is_resampled_as_the_plain_file_is(tmp_path):
    import gzip

    src = write_mrc(tmp_path / "t.mrc", random_volume((24, 20, 28), seed=7), voxel=7.84)
    with open(src, "rb") as plain, gzip.open(tmp_path / "t.mrc.gz", "wb") as packed:
        packed.write(plain.read())
    convert(src, tmp_path / "a.zarr", chunk=16, voxel_size=10.0)
    report = convert(tmp_path / "t.mrc.gz", tmp_path / "b.zarr", chunk=16, voxel_size=10.0)
    a, b = (zarr.open_group(str(tmp_path / name), mode="r")["0"][:] for name in ("a.zarr", "b.zarr"))
    assert report.shape == a.shape == (19, 16, 22) and np.array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["a.zarr", "b.zarr", "t.mrc", "t.mrc.gz"]  # the decompressed copy is gone


@pytest.mark.parametrize("voxel", [13.48, 5.0])
def test_a_resampled_tomogram_lies_where_its_metadata_place_it(tmp_path, voxel):
    """A linear ramp of position stays one under smoothing and linear interpolation: the resampled
    voxels, placed by their scale and translation, hold the ramp at that position (away from the
    edges, where the smoothing repeats the edge voxel), so the segmentation of the resampled
    tomogram overlays the original in a viewer."""
    from .test_convert import placed, ramp

    shape = (48, 44, 40)
    data = ramp(*np.meshgrid(*(np.arange(n) * voxel for n in shape), indexing="ij")).astype(np.float32)
    convert(write_mrc(tmp_path / "ramp.mrc", data, voxel=voxel), tmp_path / "ramp.zarr", chunk=16, voxel_size=10.0, levels=2)
    group = zarr.open_group(str(tmp_path / "ramp.zarr"), mode="r")
    for dataset in group.attrs["multiscales"][0]["datasets"]:
        level = np.asarray(group[dataset["path"]][:])
        positions = placed(dataset, level.shape)
        inside = np.logical_and.reduce([(p > 4 * voxel + 10) & (p < (n - 5) * voxel - 10) for p, n in zip(positions, shape)])
        assert inside.sum() >= 27
        np.testing.assert_allclose(level[inside], ramp(*positions)[inside], rtol=1e-5, atol=1e-2)


def test_the_way_back_takes_each_input_voxel_to_the_nearest_resampled_one():
    from tilesegment.resample import nearest_resampled

    # a 2× coarsening: voxels 0 and 1 went into output voxel 0, 2 and 3 into 1, ...
    assert nearest_resampled(8, 4, 2.0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert nearest_resampled(3, 6, 0.5).tolist() == [1, 3, 5]  # 2× finer: ties go up
    plan = Resampling((20, 24, 24), (13.48,) * 3, (10.0,) * 3)  # finer: every input voxel has a nearest output voxel
    for axis in range(3):
        back = plan.nearest_resampled(axis)
        forward = np.rint(plan.coordinates(axis, 0, plan.out_shape[axis])).astype(int)  # each output voxel's nearest input voxel
        assert forward[back].tolist() == list(range(plan.shape[axis]))  # there and back is the identity
        centres_in, centres_out = (np.arange(plan.shape[axis]) + 0.5) * 13.48, (back + 0.5) * 10.0
        assert np.abs(centres_in - centres_out).max() <= 5.0 + 1e-9  # at most half an output voxel away

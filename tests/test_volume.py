"""intensity_statistics: the whole-volume mean/std from a regular subsample, against numpy, and what it reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tilesegment import volume
from tilesegment.errors import InputError
from tilesegment.volume import intensity_statistics, open_volume

from .conftest import write_mrc


def subsample_oracle(data: np.ndarray, step: int) -> tuple[float, float]:
    part = data[::step, ::step, ::step].astype(np.float64)
    return float(part.mean()), float(part.std())


@pytest.fixture
def data() -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.normal(5.0, 2.0, (37, 29, 41)) + np.linspace(0, 3, 41)).astype(np.float32)


@pytest.mark.parametrize("step_target", [1, 2, 3, 5])
def test_mrc_statistics_equal_numpy_on_the_same_subsample(tmp_path, monkeypatch, data, step_target):
    path = write_mrc(tmp_path / "v.mrc", data)
    # the sample size that makes the step come out at step_target
    monkeypatch.setattr(volume, "STATS_SAMPLE_VOXELS", data.size / step_target**3)
    mean, std = intensity_statistics(open_volume(path))
    np.testing.assert_allclose((mean, std), subsample_oracle(data, step_target), rtol=1e-9)


@pytest.mark.parametrize("step_target", [1, 2, 4])
def test_zarr_statistics_equal_numpy_on_the_same_subsample(tmp_path, monkeypatch, data, step_target):
    path = str(tmp_path / "v.zarr")
    zarr.create_array(path, shape=data.shape, chunks=(8, 8, 8), dtype="float32")[...] = data
    monkeypatch.setattr(volume, "STATS_SAMPLE_VOXELS", data.size / step_target**3)
    mean, std = intensity_statistics(open_volume(path))
    np.testing.assert_allclose((mean, std), subsample_oracle(data, step_target), rtol=1e-9)


def test_mrc_statistics_read_only_the_sampled_planes(tmp_path, monkeypatch, data):
    path = write_mrc(tmp_path / "v.mrc", data)
    monkeypatch.setattr(volume, "STATS_SAMPLE_VOXELS", data.size / 27)  # step 3
    read, real_read = [], volume.read_mrc_region
    monkeypatch.setattr(volume, "read_mrc_region", lambda info, box: read.append(box) or real_read(info, box))
    intensity_statistics(open_volume(path))
    planes = sorted(z for box in read for z in range(box.start[0], box.stop[0]))
    assert planes == list(range(0, data.shape[0], 3))


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")  # mrcfile warns as the fixture writes the NaN
def test_nan_in_a_sampled_plane_is_refused_with_its_place(tmp_path, monkeypatch, data):
    data[12, 3, 6] = np.nan
    path = write_mrc(tmp_path / "v.mrc", data)
    monkeypatch.setattr(volume, "STATS_SAMPLE_VOXELS", data.size / 27)
    with pytest.raises(InputError, match="z=12"):
        intensity_statistics(open_volume(path))


# --- the voxel size of a pyramid level, and a level that fits the model --------------------------


def test_a_pyramid_level_given_as_input_has_its_own_voxel_size(tmp_path):
    """tomo.zarr/1 is twice level 0's voxel size (it was level 0's), and an array the image's
    metadata do not list has none."""
    from tilesegment.convert import convert

    convert(write_mrc(tmp_path / "t.mrc", np.zeros((32, 32, 32), np.float32), voxel=5.0), tmp_path / "t.zarr", chunk=16, levels=2)
    assert open_volume(str(tmp_path / "t.zarr")).voxel_size == (5.0, 5.0, 5.0)
    assert open_volume(str(tmp_path / "t.zarr" / "0")).voxel_size == (5.0, 5.0, 5.0)
    assert open_volume(str(tmp_path / "t.zarr" / "1")).voxel_size == (10.0, 10.0, 10.0)
    assert open_volume(str(tmp_path / "t.zarr")).zarr.level_voxel_sizes == ((5.0, 5.0, 5.0), (10.0, 10.0, 10.0))
    zarr.open_group(str(tmp_path / "t.zarr"), mode="a").create_array("extra", shape=(4, 4, 4), dtype="f4")
    assert open_volume(str(tmp_path / "t.zarr" / "extra")).voxel_size is None


def test_a_scale_for_the_whole_image_multiplies_each_levels(tmp_path):
    from tilesegment.ome import dataset_voxel_sizes

    entry = {"axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
             "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}],
             "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.5, 1.0]}]}]}
    assert dataset_voxel_sizes(entry) == [(10.0, 10.0, 20.0)]


def test_translations_follow_ngff_order_and_units():
    """A dataset's translation, then the whole image's scale and translation (NGFF applies them in
    that order), in Å; none given is zero."""
    from tilesegment.ome import dataset_translations

    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 3}, {"type": "translation", "translation": [1.0, 2.0, 3.0]}]},
                {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [2.0] * 3}]}]
    overall = [{"type": "scale", "scale": [2.0, 2.0, 2.0]}, {"type": "translation", "translation": [0.5, 0.0, -1.0]}]
    assert dataset_translations({"axes": axes, "datasets": datasets}) == [(10.0, 20.0, 30.0), (0.0, 0.0, 0.0)]
    assert dataset_translations({"axes": axes, "datasets": datasets, "coordinateTransformations": overall}) == [(25.0, 40.0, 50.0), (5.0, 0.0, -10.0)]


def test_an_ome_zarr_inputs_translation_is_read_per_level(tmp_path):
    from tilesegment.convert import convert

    convert(write_mrc(tmp_path / "t.mrc", np.zeros((32, 32, 32), np.float32), voxel=5.0), tmp_path / "t.zarr", chunk=16, levels=3)
    assert open_volume(str(tmp_path / "t.zarr")).translation == (0.0, 0.0, 0.0)
    assert open_volume(str(tmp_path / "t.zarr" / "1")).translation == (2.5, 2.5, 2.5)  # the first 2× mean's centre
    assert open_volume(str(tmp_path / "t.zarr" / "2")).translation == (7.5, 7.5, 7.5)
    assert open_volume(str(tmp_path / "t.mrc")).translation == (0.0, 0.0, 0.0)  # an MRC's origin is not an OME translation

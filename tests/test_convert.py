"""convert(): an exact, streamed MRC -> OME-Zarr copy with a 2x mean pyramid, for NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import warnings
from unittest import mock

import mrcfile
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tilesegment.convert as convert_module
from tilesegment.convert import ConvertReport, convert, copy_regions
from tilesegment.errors import InputError, OptionError, OutputError
from tilesegment.geometry import Box, ceil_div
from tilesegment.zarr_io import intensity_compression

from .conftest import mrc_file, random_volume, sample, write_mrc
from .outputs import blosc_settings

MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
ODD = (37, 41, 29)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def group_of(path):
    return zarr.open_group(str(path), mode="r")


def level(path, i: int) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/{i}", mode="r")[:])


def ome(path, ngff: str) -> dict:
    attrs = dict(group_of(path).attrs)
    if ngff == "0.4":
        assert "ome" not in attrs
        assert attrs["multiscales"][0]["version"] == "0.4"
        return attrs
    assert "multiscales" not in attrs
    assert attrs["ome"]["version"] == "0.5"
    assert "version" not in attrs["ome"]["multiscales"][0]
    return attrs["ome"]


def mean2(a: np.ndarray) -> np.ndarray:
    """Independent 2x2x2 mean of an even-shaped volume: the average of its 8 strided sub-volumes."""
    total = sum(a[i::2, j::2, k::2].astype(np.float64) for i, j, k in itertools.product((0, 1), repeat=3))
    return total / 8


# --- exact round trip and metadata --------------------------------------------------------------


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("mode", sorted(MODE_DTYPES))
def test_round_trip_is_exact(tmp_path, mode, ngff):
    dtype = MODE_DTYPES[mode]
    data = sample(ODD, dtype, seed=mode)
    src = mrc_file(tmp_path / "in.mrc", data, voxel=(1.5, 2.5, 3.5))
    out = tmp_path / "out.zarr"
    report = convert(src, out, ngff=ngff, chunk=16, levels=3)

    stored = level(out, 0)
    assert stored.dtype == np.dtype(dtype)
    assert stored.shape == ODD
    assert np.array_equal(bits(stored), bits(data))

    group = group_of(out)
    assert group.metadata.zarr_format == (2 if ngff == "0.4" else 3)
    array = group["0"]
    assert array.metadata.zarr_format == group.metadata.zarr_format
    assert array.chunks == (16, 16, 16)
    wanted = intensity_compression(dtype)  # integers never bitshuffled: that left them uncompressed
    assert wanted.shuffle != "bitshuffle" or np.dtype(dtype).kind == "f"
    for name in ("0", "1", "2"):
        assert blosc_settings(group[name]) == (wanted.level, wanted.shuffle)

    ms = ome(out, ngff)["multiscales"]
    assert len(ms) == 1
    assert [a["name"] for a in ms[0]["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "angstrom" for a in ms[0]["axes"])
    assert [d["path"] for d in ms[0]["datasets"]] == ["0", "1", "2"]
    for i, dataset in enumerate(ms[0]["datasets"]):
        transform, shift = dataset["coordinateTransformations"]
        assert transform["type"] == "scale"
        assert transform["scale"] == pytest.approx([3.5 * 2**i, 2.5 * 2**i, 1.5 * 2**i])  # (z, y, x)
        assert shift["type"] == "translation"  # a 2^i mean's first centre: (2^i - 1) / 2 voxels on
        assert shift["translation"] == pytest.approx([(2**i - 1) / 2 * v for v in (3.5, 2.5, 1.5)])
    meta = dict(group.attrs)["tilesegment"]
    assert meta["status"] == "complete"
    assert meta["mrc_mode"] == mode
    assert meta["voxel_size_recorded"] is True
    assert meta["source"] == "in.mrc"

    assert isinstance(report, ConvertReport)
    assert report.shape == ODD and report.levels == 3 and report.dtype == np.dtype(dtype).name
    assert report.voxel_size == pytest.approx((3.5, 2.5, 1.5))
    assert report.bytes_read == data.nbytes
    assert report.output == str(out)


@pytest.mark.parametrize("shape", [ODD, (5, 9, 7), (64, 20, 33)])
def test_sharded_ngff_05(tmp_path, shape):
    data = sample(shape, np.float32, seed=3)
    src = mrc_file(tmp_path / "in.mrc", data)
    out = tmp_path / "out.zarr"
    convert(src, out, ngff="0.5", chunk=16, shard=32, levels=3)
    assert np.array_equal(bits(level(out, 0)), bits(data))
    group = group_of(out)
    assert group.metadata.zarr_format == 3
    for i in range(3):
        array = group[str(i)]
        shards, chunks = array.shards, array.chunks
        assert shards is not None
        assert all(s % c == 0 for s, c in zip(shards, chunks)), (shards, chunks)
        for n, s, c in zip(array.shape, shards, chunks):
            assert s <= 32 and c <= 16
            if n >= 32:
                assert s == 32 and c == 16
        assert array.metadata.dimension_names == ("z", "y", "x")
    assert group["0"].shape == shape
    if shape == ODD:
        assert group["0"].shards[:2] == (32, 32)
    assert dict(group.attrs)["tilesegment"]["status"] == "complete"


def test_anisotropic_chunks_and_shards(tmp_path):
    data = sample((50, 70, 40), np.int16, seed=4)
    src = mrc_file(tmp_path / "in.mrc", data)
    out = tmp_path / "out.zarr"
    convert(src, out, ngff="0.5", chunk=(8, 16, 8), shard=(16, 64, 32), levels=2)
    array = group_of(out)["0"]
    assert array.chunks == (8, 16, 8) and array.shards == (16, 64, 32)
    np.testing.assert_array_equal(level(out, 0), data)
    np.testing.assert_array_equal(level(out, 1), np.rint(mean2(data[:, :, :])).astype(np.int16))


def test_ngff_05_without_shard(tmp_path):
    data = sample(ODD, np.int16)
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, ngff="0.5", chunk=16, levels=1)
    array = group_of(out)["0"]
    assert array.shards is None and array.chunks == (16, 16, 16)
    np.testing.assert_array_equal(level(out, 0), data)


def test_ngff_04_is_readable_as_plain_zarr_v2(tmp_path):
    data = sample(ODD, np.float32)
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, chunk=16, levels=2)
    assert (out / ".zgroup").exists() and (out / ".zattrs").exists() and (out / "0" / ".zarray").exists()
    assert not (out / "zarr.json").exists()
    assert json.loads((out / "0" / ".zarray").read_text())["dimension_separator"] == "/"


def test_voxel_size_missing_is_recorded_as_1(tmp_path):
    data = sample((20, 20, 20), np.float32)
    out = tmp_path / "out.zarr"
    report = convert(mrc_file(tmp_path / "in.mrc", data, voxel=0.0), out, chunk=16, levels=2)
    assert report.voxel_size is None
    datasets = ome(out, "0.4")["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [[1.0] * 3, [2.0] * 3]
    assert dict(group_of(out).attrs)["tilesegment"]["voxel_size_recorded"] is False


def test_origin_is_recorded(tmp_path):
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", sample((4, 5, 6), np.float32), origin=(1.0, 2.0, 3.0)), out, levels=1)
    assert dict(group_of(out).attrs)["tilesegment"]["origin_angstrom"] == [3.0, 2.0, 1.0]


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_metadata_is_strict_json_even_with_a_nan_origin(tmp_path, ngff):
    src = mrc_file(tmp_path / "in.mrc", sample((4, 5, 6), np.float32), origin=(np.nan, 0.0, np.inf))
    out = tmp_path / "out.zarr"
    convert(src, out, ngff=ngff, levels=1)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    files = [out / ".zattrs"] if ngff == "0.4" else [out / "zarr.json"]
    for file in files:
        json.loads(file.read_text(), parse_constant=refuse)
    assert dict(group_of(out).attrs)["tilesegment"]["origin_angstrom"] is None


# --- unusual files ------------------------------------------------------------------------------


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_extended_header(tmp_path, ngff):
    data = sample(ODD, np.int16, seed=5)
    ext = np.frombuffer(np.random.default_rng(6).bytes(1234), dtype="V1")  # not a multiple of the itemsize
    src = mrc_file(tmp_path / "in.mrc", data, ext=ext)
    with mrcfile.open(src) as mrc:
        assert int(mrc.header.nsymbt) == 1234
    out = tmp_path / "out.zarr"
    convert(src, out, ngff=ngff, chunk=16, levels=2)
    np.testing.assert_array_equal(level(out, 0), data)


@pytest.mark.parametrize("dtype", [">i2", ">f4", ">u2", ">f2", ">i1"])
def test_big_endian(tmp_path, dtype):
    data = sample(ODD, dtype, seed=7)
    src = mrc_file(tmp_path / "be.mrc", data)
    if np.dtype(dtype).itemsize > 1:
        with open(src, "rb") as f:
            f.seek(212)
            assert f.read(2) == b"\x11\x11"
    out = tmp_path / "out.zarr"
    report = convert(src, out, chunk=16, levels=2)
    stored = level(out, 0)
    assert stored.dtype.isnative and stored.dtype == np.dtype(dtype).newbyteorder("=")
    assert np.array_equal(bits(stored), bits(data.astype(stored.dtype)))
    assert report.dtype == stored.dtype.name


def test_unsigned_bytes_of_an_imod_file_convert_as_uint8(tmp_path):
    """IMOD's unsigned byte tomograms keep their values (not wrapped round to negative) in a uint8 Zarr,
    its pyramid a mean of the unsigned values."""
    from .test_mrc import byte_file

    values = np.random.default_rng(4).integers(0, 256, size=(16, 18, 20), dtype=np.uint8)
    out = tmp_path / "out.zarr"
    report = convert(byte_file(tmp_path / "b.mrc", values, stamp=1146047817, flags=0), out, chunk=8, levels=2)
    assert report.dtype == "uint8"
    np.testing.assert_array_equal(level(out, 0), values)
    assert level(out, 1).dtype == np.uint8
    np.testing.assert_array_equal(level(out, 1), np.rint(mean2(values)).astype(np.uint8))


def test_volume_smaller_than_a_chunk(tmp_path):
    data = sample((2, 3, 5), np.float32)
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, chunk=64, levels=3)
    assert np.array_equal(bits(level(out, 0)), bits(data))
    assert [group_of(out)[str(i)].shape for i in range(3)] == [(2, 3, 5), (1, 2, 3), (1, 1, 2)]


def test_default_levels_are_automatic(tmp_path):
    out = tmp_path / "out.zarr"
    report = convert(mrc_file(tmp_path / "in.mrc", sample((64, 40, 70), np.int8)), out, chunk=16)
    assert report.levels == 2  # 40 -> 20 -> 10 (< 16)
    assert sorted(group_of(out).array_keys()) == ["0", "1"]


# --- pyramid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float32, np.float16])
def test_pyramid_is_a_2x_mean_for_even_shapes(tmp_path, dtype, ngff):
    shape = (32, 48, 40)
    data = sample(shape, dtype, seed=8)
    if np.dtype(dtype).kind == "f":
        data.flat[:3] = data.flat[-1] = 1.0  # keep NaN/inf out of the means
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, ngff=ngff, chunk=8, shard=16 if ngff == "0.5" else None, levels=4)
    previous = level(out, 0)
    for i in range(1, 4):
        current = level(out, i)
        assert current.shape == tuple(n // 2**i for n in shape)
        assert current.dtype == np.dtype(dtype)
        expected = mean2(previous)
        if np.dtype(dtype).kind in "iu":
            np.testing.assert_array_equal(current, np.rint(expected).astype(dtype))
        else:
            np.testing.assert_allclose(current.astype(np.float64), expected.astype(dtype).astype(np.float64), rtol=1e-6, atol=0)
        previous = current
    assert dict(group_of(out).attrs)["tilesegment"]["status"] == "complete"


def test_pyramid_of_odd_shapes(tmp_path):
    data = sample(ODD, np.float32, seed=9)
    data.flat[:3] = data.flat[-1] = 0.0
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, chunk=16, levels=5)
    shapes = [group_of(out)[str(i)].shape for i in range(5)]
    assert shapes == [ODD, (19, 21, 15), (10, 11, 8), (5, 6, 4), (3, 3, 2)]
    for i in range(1, 5):
        below, current = level(out, i - 1), level(out, i)
        assert current.shape == tuple(ceil_div(n, 2) for n in below.shape)
        # the inner, complete 2x2x2 groups are plain means
        inner = tuple(n // 2 for n in below.shape)
        expected = mean2(below[: 2 * inner[0], : 2 * inner[1], : 2 * inner[2]])
        np.testing.assert_allclose(current[: inner[0], : inner[1], : inner[2]], expected, rtol=1e-5, atol=1e-5)


def test_pyramid_partial_groups_at_odd_edges_average_the_voxels_that_exist(tmp_path):
    data = sample((5, 7, 3), np.float32, seed=10)
    data.flat[:3] = data.flat[-1] = 0.0
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, levels=2)
    current = level(out, 1)
    assert current.shape == (3, 4, 2)
    for z, y, x in itertools.product(*(range(n) for n in current.shape)):
        group = data[2 * z:2 * z + 2, 2 * y:2 * y + 2, 2 * x:2 * x + 2].astype(np.float64)
        assert current[z, y, x] == pytest.approx(group.mean(), rel=1e-5, abs=1e-5), (z, y, x)


def test_integer_pyramid_rounds_to_nearest(tmp_path):
    data = np.zeros((4, 4, 4), np.int16)
    data[0, 0, 0] = 3  # mean 3/8 -> 0
    data[0, 0, 2], data[0, 1, 2] = 3, 2  # mean 5/8 -> 1
    data[2, 2, 2:4] = -7  # mean -14/8 = -1.75 -> -2
    data[2, 0, 0] = 32767
    data[2, 0, 1] = 32767
    data[2, 1, 0] = 32767
    data[2, 1, 1] = 32767
    data[3, 0:2, 0:2] = 32767  # mean 32767, no overflow on the way
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, levels=2)
    np.testing.assert_array_equal(level(out, 1), [[[0, 1], [0, 0]], [[32767, 0], [0, -2]]])


# --- regions ------------------------------------------------------------------------------------

small = st.integers(1, 40)


@settings(max_examples=200, deadline=None)
@given(shape=st.tuples(small, small, small), unit=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
       itemsize=st.sampled_from([1, 2, 4, 8]), region_bytes=st.integers(1, 20_000))
def test_copy_regions_tile_the_volume_once(shape, unit, itemsize, region_bytes):
    with mock.patch.object(convert_module, "REGION_BYTES", region_bytes):
        boxes = copy_regions(shape, unit, itemsize)
    cover = np.zeros(shape, np.int32)
    for box in boxes:
        assert not box.empty
        assert Box.from_shape(shape).contains(box)
        cover[box.slices()] += 1
        for a, b, u, n in zip(box.start, box.stop, unit, shape):
            assert a % u == 0  # starts on a write unit
            assert b % u == 0 or b == n  # and ends on one, or at the end of the volume
        # at most REGION_BYTES, unless one write unit alone is bigger
        assert box.size * itemsize <= max(region_bytes, int(np.prod(unit)) * itemsize)
    assert (cover == 1).all()
    # a slab of the volume one write unit deep
    assert all(box.shape[0] <= unit[0] for box in boxes)


def test_copy_regions_take_whole_rows_when_they_fit():
    boxes = copy_regions((100, 300, 500), (64, 64, 64), 4)  # a 64-deep slab of 300x500 float32 is 38 MB
    assert all(box.shape[1:] == (300, 500) for box in boxes)
    assert [box.start[0] for box in boxes] == [0, 64]


def test_copy_regions_tile_wide_slabs(monkeypatch):
    monkeypatch.setattr(convert_module, "REGION_BYTES", 64 * 64 * 64 * 4 * 4)  # four float32 write units
    boxes = copy_regions((64, 1000, 1000), (64, 64, 64), 4)
    assert max(box.size * 4 for box in boxes) <= convert_module.REGION_BYTES
    assert len(boxes) > 16
    assert sum(box.size for box in boxes) == 64 * 1000 * 1000


@pytest.mark.parametrize("ngff, shard", [("0.4", None), ("0.5", 16)])
def test_convert_with_tiny_regions_is_still_exact(tmp_path, monkeypatch, ngff, shard):
    monkeypatch.setattr(convert_module, "REGION_BYTES", 2000)
    data = sample(ODD, np.float32, seed=11)
    calls = []
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, ngff=ngff, chunk=8, shard=shard, levels=1, threads=3, progress=calls.append)
    assert np.array_equal(bits(level(out, 0)), bits(data))
    unit = (shard or 8,) * 3
    assert len(calls) == len(copy_regions(ODD, unit, 4)) > 10


# --- progress -----------------------------------------------------------------------------------


def test_progress_counts_voxels(tmp_path):
    data = sample(ODD, np.int16)
    calls: list[int] = []
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "in.mrc", data), out, chunk=16, levels=3, progress=calls.append)
    n0 = len(copy_regions(ODD, (32, 32, 32), 2))  # regions two chunks deep and wide, which write level 1 too
    assert all(isinstance(c, int) and c > 0 for c in calls)
    shapes = [group_of(out)[str(i)].shape for i in range(3)]
    assert sum(calls[:n0]) == data.size + int(np.prod(shapes[1]))  # levels 0 and 1 first, one call per region
    assert sum(calls) == sum(int(np.prod(s)) for s in shapes)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shape=st.tuples(st.integers(2, 24), st.integers(1, 24), st.integers(1, 24)), chunk=st.sampled_from([4, 8, (4, 8, 16)]),
       shard_factor=st.sampled_from([None, 1, 2, 4]), levels=st.integers(1, 4))
def test_any_shape_chunk_and_shard_converts_exactly(tmp_path_factory, shape, chunk, shard_factor, levels):
    from tilesegment.pyramid import most_levels

    levels = min(levels, most_levels(shape))  # more are refused (tested in test_pyramid)
    data = sample(shape, np.int16, seed=sum(shape))
    base = tmp_path_factory.mktemp("any")
    src = mrc_file(base / "in.mrc", data)
    chunk3 = chunk if isinstance(chunk, tuple) else (chunk,) * 3
    shard = None if shard_factor is None else tuple(c * shard_factor for c in chunk3)
    calls: list[int] = []
    convert(src, base / "out.zarr", ngff="0.5" if shard else "0.4", chunk=chunk, shard=shard, levels=levels, progress=calls.append)
    np.testing.assert_array_equal(level(base / "out.zarr", 0), data)
    expected_shapes = [tuple(ceil_div(n, 2**i) for n in shape) for i in range(levels)]
    assert [group_of(base / "out.zarr")[str(i)].shape for i in range(levels)] == expected_shapes
    assert sum(calls) == sum(int(np.prod(s)) for s in expected_shapes)


# --- output and option errors -------------------------------------------------------------------


def test_refuses_to_overwrite_without_overwrite(tmp_path):
    src = mrc_file(tmp_path / "in.mrc", sample(ODD, np.float32))
    out = tmp_path / "out.zarr"
    convert(src, out, chunk=16, levels=1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(OutputError) as info:
        convert(src, out, chunk=16, levels=1)
    assert str(out) in info.value.what and info.value.fix and "overwrite" in info.value.fix
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize("kind", ["file", "empty dir"])
def test_refuses_to_replace_other_things(tmp_path, kind):
    src = mrc_file(tmp_path / "in.mrc", sample((4, 5, 6), np.float32))
    out = tmp_path / "out.zarr"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
    with pytest.raises(OutputError):
        convert(src, out)
    if kind == "file":
        assert out.read_text() == "keep me"
        with pytest.raises(OutputError, match="is a file, not a Zarr store; --overwrite replaces a store, never a file"):
            convert(src, out, overwrite=True)
        assert out.read_text() == "keep me"


def test_the_input_as_output_is_refused_even_with_overwrite(tmp_path):
    data = sample((4, 5, 6), np.float32)
    src = mrc_file(tmp_path / "in.mrc", data)
    before = open(src, "rb").read()
    with pytest.raises(OutputError, match="is a file, not a Zarr store"):
        convert(src, src, overwrite=True)
    assert open(src, "rb").read() == before


@pytest.mark.parametrize("first, second", [("0.4", "0.4"), ("0.5", "0.4"), ("0.4", "0.5")])
def test_overwrite_replaces_the_output(tmp_path, first, second):
    old = sample((40, 40, 40), np.float32, seed=1)
    new = sample(ODD, np.int16, seed=2)
    out = tmp_path / "out.zarr"
    convert(mrc_file(tmp_path / "old.mrc", old), out, ngff=first, chunk=16, levels=3)
    convert(mrc_file(tmp_path / "new.mrc", new), out, ngff=second, chunk=16, levels=1, overwrite=True)
    group = group_of(out)
    assert group.metadata.zarr_format == (2 if second == "0.4" else 3)
    assert sorted(group.array_keys()) == ["0"]  # no stale levels of the old pyramid
    assert not (out / "1").exists() and not (out / "2").exists()
    stale = "zarr.json" if second == "0.4" else ".zgroup"
    assert not (out / stale).exists()
    np.testing.assert_array_equal(level(out, 0), new)
    assert dict(group.attrs)["tilesegment"]["source"] == "new.mrc"


@pytest.mark.parametrize("options", [
    dict(ngff="0.6"),
    dict(ngff="0.4", shard=32),
    dict(ngff="0.5", chunk=16, shard=24),
    dict(chunk=0),
    dict(chunk=(16, 16)),
    dict(chunk=(16, -1, 16)),
    dict(ngff="0.5", shard=0),
    dict(levels=0),
    dict(levels=-1),
    dict(threads=0),
])
def test_bad_options(tmp_path, options):
    src = mrc_file(tmp_path / "in.mrc", sample((4, 5, 6), np.float32))
    out = tmp_path / "out.zarr"
    with pytest.raises(OptionError) as info:
        convert(src, out, **options)
    assert info.value.what and info.value.fix and "\n" not in info.value.message
    assert not out.exists()


@pytest.mark.parametrize("bad", ["missing", "2d", "truncated"])
def test_bad_input_creates_no_output(tmp_path, bad):
    src = tmp_path / "in.mrc"
    if bad == "2d":
        mrc_file(src, sample((1, 8, 8), np.float32))
    elif bad == "truncated":
        mrc_file(src, sample((4, 5, 6), np.float32))
        os.truncate(src, os.path.getsize(src) - 1)
    out = tmp_path / "out.zarr"
    with pytest.raises(InputError) as info:
        convert(src, out)
    assert str(src) in info.value.what
    assert not out.exists()


def test_conftest_volume_round_trips(tmp_path):
    volume = random_volume((20, 24, 28))
    out = tmp_path / "out.zarr"
    report = convert(write_mrc(tmp_path / "in.mrc", volume), out, chunk=16, levels=2)
    assert report.voxel_size == (10.0, 10.0, 10.0)
    np.testing.assert_array_equal(level(out, 0), volume)


@pytest.mark.parametrize("ngff, shard", [("0.4", None), ("0.5", 16)])
def test_level_1_from_the_regions_equals_level_1_from_the_stored_level_0(tmp_path, monkeypatch, ngff, shard):
    """Regions two write units deep write level 1 from the data they hold; regions too small for that
    (one unit each) leave it to the pass over stored level 0: the two pyramids are the same bits."""
    data = sample(ODD, np.float32, seed=12)
    data.flat[:3] = data.flat[-1] = 0.0
    src = mrc_file(tmp_path / "in.mrc", data)
    built_from = []
    real = convert_module.build_level_region
    monkeypatch.setattr(convert_module, "build_level_region", lambda src, dst, *a: built_from.append(src[-1]) or real(src, dst, *a))
    convert(src, tmp_path / "regions.zarr", ngff=ngff, chunk=8, shard=shard, levels=3)
    assert set(built_from) == {"1"}  # level 2 from level 1; level 1 came from the regions
    built_from.clear()
    monkeypatch.setattr(convert_module, "REGION_BYTES", 2000)  # below two units of float32 in every axis
    convert(src, tmp_path / "stored.zarr", ngff=ngff, chunk=8, shard=shard, levels=3)
    assert set(built_from) == {"0", "1"}
    for i in range(3):
        assert np.array_equal(bits(level(tmp_path / "regions.zarr", i)), bits(level(tmp_path / "stored.zarr", i)))


# --- compressed MRC files (.mrc.gz, .bz2, .xz) ---------------------------------------------------


def compressed(path, data: np.ndarray, kind: str, **kwargs) -> str:
    """``data`` as an MRC file compressed with ``kind`` (gzip and bzip2 by mrcfile itself, xz by lzma)."""
    import lzma

    if kind == "xz":
        plain = mrc_file(f"{path}.plain", data, **kwargs)
        with open(plain, "rb") as f, lzma.open(path, "wb") as out:
            out.write(f.read())
        os.remove(plain)
        return str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN/inf in the data
        with mrcfile.new(str(path), compression=kind) as mrc:
            mrc.set_data(data)
            mrc.voxel_size = (1.5, 2.5, 3.5)
    return str(path)


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz"])
def test_a_compressed_mrc_converts_exactly_and_leaves_no_copy(tmp_path, kind, monkeypatch):
    import tilesegment.decompress as decompress

    monkeypatch.setattr(decompress, "PIECE", 1000)  # many pieces, one ending inside the header
    data = sample(ODD, np.int16, seed=3)
    src = compressed(tmp_path / f"in.mrc.{kind}", data, kind)
    plain = tmp_path / "plain.zarr"
    convert(mrc_file(tmp_path / "plain.mrc", data), plain, chunk=16, levels=2)
    os.remove(tmp_path / "plain.mrc")
    calls: list[int] = []
    report = convert(src, tmp_path / "out.zarr", chunk=16, levels=2, progress=calls.append)
    assert report.voxel_size == (3.5, 2.5, 1.5)
    for i in range(2):
        np.testing.assert_array_equal(bits(level(tmp_path / "out.zarr", i)), bits(level(plain, i)))
    assert group_of(tmp_path / "out.zarr").attrs["tilesegment"]["source"] == f"in.mrc.{kind}"
    # the decompression is counted too: the volume's voxels once more than a plain convert
    assert sum(calls) == data.size + sum(int(np.prod(group_of(plain)[str(i)].shape)) for i in range(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.mrc." + kind, "out.zarr", "plain.zarr"])


def test_a_compressed_mrc_is_decompressed_beside_the_output(tmp_path, monkeypatch):
    seen: list[str] = []
    real = convert_module.decompressed_copy

    @contextlib.contextmanager
    def watching(*args, **kwargs):
        with real(*args, **kwargs) as copy:
            seen.append(copy)
            assert os.path.getsize(copy) == 1024 + 2 * data.size
            yield copy

    monkeypatch.setattr(convert_module, "decompressed_copy", watching)
    data = sample((8, 9, 10), np.int16)
    (tmp_path / "out").mkdir()
    convert(compressed(tmp_path / "in.mrc.gz", data, "gzip"), tmp_path / "out" / "tomo.zarr", levels=1)
    assert len(seen) == 1 and os.path.dirname(seen[0]) == str(tmp_path / "out") and not os.path.exists(seen[0])


def test_a_compressed_mrc_is_checked_from_its_header_before_any_output(tmp_path):
    """A bad header inside the compressed file is found before the output exists, with the file's own name."""
    import gzip

    src = tmp_path / "flat.mrc.gz"
    compressed(src, sample((1, 8, 8), np.float32), "gzip")
    with pytest.raises(InputError, match="is a 2D image") as info:
        convert(src, tmp_path / "out.zarr")
    assert str(src) in info.value.what and not (tmp_path / "out.zarr").exists()
    (tmp_path / "junk.mrc.gz").write_bytes(gzip.compress(b"not an MRC file at all" * 100))
    with pytest.raises(InputError, match="no 'MAP ' signature"):
        convert(tmp_path / "junk.mrc.gz", tmp_path / "out.zarr")
    (tmp_path / "tiny.mrc.gz").write_bytes(gzip.compress(b"MAP "))
    with pytest.raises(InputError, match="too short to hold an MRC header"):
        convert(tmp_path / "tiny.mrc.gz", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("damage", ["truncated stream", "truncated data", "corrupt"])
def test_a_damaged_compressed_mrc_is_one_line_and_leaves_no_copy(tmp_path, damage):
    import gzip

    src = tmp_path / "in.mrc.gz"
    data = sample((16, 16, 16), np.float32)
    if damage == "truncated data":  # a complete gzip stream of an MRC file missing its last plane
        raw = open(mrc_file(tmp_path / "whole.mrc", data), "rb").read()
        os.remove(tmp_path / "whole.mrc")
        src.write_bytes(gzip.compress(raw[: -16 * 16 * 4]))
    else:
        blob = bytearray(open(compressed(src, data, "gzip"), "rb").read())
        if damage == "truncated stream":
            blob = blob[: len(blob) // 2]
        else:
            blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
        src.write_bytes(bytes(blob))
    with pytest.raises(InputError) as info:
        convert(src, tmp_path / "out.zarr")
    assert info.value.what.startswith(f"{src}: ") and info.value.fix and "\n" not in info.value.message
    assert {"truncated stream": "ends before its end marker", "truncated data": "header promises",
            "corrupt": "not a readable gzip file"}[damage] in info.value.what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc.gz", "out.zarr"]  # the unfinished output, no copy
    assert group_of(tmp_path / "out.zarr").attrs["tilesegment"]["status"] == "incomplete"


def test_no_room_for_the_decompressed_copy_is_refused_before_writing_it(tmp_path, monkeypatch):
    from collections import namedtuple

    import tilesegment.decompress as decompress

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(decompress.shutil, "disk_usage", lambda folder: usage(10**6, 10**6 - 5000, 5000))
    src = compressed(tmp_path / "in.mrc.gz", sample((8, 16, 16), np.float32), "gzip")
    with pytest.raises(OutputError, match=r"needs 0\.00 GiB in .* which has 0\.00 GiB free") as info:
        convert(src, tmp_path / "out.zarr")
    assert "gunzip -c" in info.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc.gz", "out.zarr"]


def test_a_compressed_mrc_elsewhere_names_convert_and_the_decompressor(tmp_path):
    from tilesegment.mrc import inspect_mrc

    for kind, command in [("gzip", "gunzip -k"), ("bzip2", "bunzip2 -k"), ("xz", "unxz -k")]:
        src = compressed(tmp_path / f"in.mrc.{kind}", sample((4, 4, 4), np.float32), kind)
        with pytest.raises(InputError, match=f"is {kind}-compressed") as info:
            inspect_mrc(src)
        assert "tileseg convert" in info.value.fix and f"{command} {src}" in info.value.fix


def test_zstd_is_recognised_and_left_to_zstd(tmp_path):
    src = tmp_path / "in.mrc.zst"
    src.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(2000))
    with pytest.raises(InputError, match="zstd-compressed, which tileseg cannot decompress") as info:
        convert(src, tmp_path / "out.zarr")
    assert f"zstd -d {src}" in info.value.fix and not (tmp_path / "out.zarr").exists()


def placed(dataset: dict, shape) -> list[np.ndarray]:
    """The (z, y, x) Å position of every voxel of one OME dataset, by its scale and translation."""
    transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
    scale, shift = transforms["scale"]["scale"][-3:], transforms.get("translation", {}).get("translation", [0.0] * 3)[-3:]
    return np.meshgrid(*(t + s * np.arange(n) for n, s, t in zip(shape, scale, shift)), indexing="ij")


def ramp(z, y, x):
    return z + 2 * y + 3 * x


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_every_level_lies_where_its_metadata_place_it(tmp_path, ngff):
    """A linear ramp of position: each level's voxels, placed by their scale and translation, hold the
    ramp at that position (a 2× mean of a ramp is the ramp at the group's centre), so a viewer that
    follows the metadata shows every level where level 0 is."""
    shape, voxel = (32, 32, 32), (3.0, 2.0, 1.5)  # z, y, x
    data = ramp(*np.meshgrid(*(np.arange(n) * v for n, v in zip(shape, voxel)), indexing="ij")).astype(np.float32)
    convert(write_mrc(tmp_path / "ramp.mrc", data, voxel=voxel[::-1]), tmp_path / "ramp.zarr", chunk=8, levels=4, ngff=ngff)
    group = zarr.open_group(str(tmp_path / "ramp.zarr"), mode="r")
    datasets = ome(tmp_path / "ramp.zarr", ngff)["multiscales"][0]["datasets"]
    for dataset in datasets:
        level = np.asarray(group[dataset["path"]][:])
        np.testing.assert_allclose(level, ramp(*placed(dataset, level.shape)), rtol=1e-6, atol=1e-4)
    assert [d["coordinateTransformations"][1]["translation"] for d in datasets][3] == [10.5, 7.0, 5.25]  # (8 - 1) / 2 voxels

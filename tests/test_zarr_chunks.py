"""The direct chunk writer against zarr's own write path: the same files, byte for byte."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from tilesegment.geometry import Box
from tilesegment.zarr_chunks import local_chunks
from tilesegment.zarr_io import PROBABILITY_COMPRESSION, create_array, create_group, open_array, output_spec, write_region


def stored_files(folder: str) -> dict[str, bytes]:
    """Every chunk file below an array's folder (metadata left out), by its key."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name in (".zarray", ".zattrs", "zarr.json"):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def volume(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 3).astype(dtype) if np.dtype(dtype).kind == "f" else rng.integers(0, 3, shape).astype(dtype)
    data[..., :16, :16, :16] = 0  # a chunk of zeros: stored as no file
    if np.dtype(dtype).kind == "f":
        data[..., 16:32, :16, :16] = -0.0  # not the fill value bit for bit: stored, as zarr does
    return data


LAYOUTS = [("0.4", None), ("0.5", None), ("0.5", 32)]  # (ngff, shard): Zarr v2, v3, v3 sharded (2×2×2 chunks of 16³)


@pytest.mark.parametrize("ngff, shard", LAYOUTS)
@pytest.mark.parametrize("dtype, channels", [("uint8", None), ("uint16", None), ("float16", 2), ("float32", 2), ("uint8", 3)])
def test_direct_writes_are_zarrs_bytes(tmp_path, ngff, shard, dtype, channels):
    shape = (40, 33, 50)  # clipped chunks (and shards) at every far end
    spec = output_spec(ngff, 16, shard)
    compression = PROBABILITY_COMPRESSION[dtype] if channels else None
    arrays = []
    for name in ("direct", "zarr"):
        group = create_group(str(tmp_path / f"{name}.zarr"), ngff)
        kwargs = {"compression": compression} if compression else {}
        create_array(group, "0", shape, dtype, spec, channels=channels, **kwargs)
        arrays.append(str(tmp_path / f"{name}.zarr" / "0"))
    full = (channels,) * (channels is not None) + shape
    data = volume(dtype, full, seed=len(dtype))
    if shard:
        data[..., 32:, 32:, :] = 0  # a whole shard of zeros: stored as no file
    assert local_chunks(arrays[0], lambda: open_array(arrays[0], "r+")) is not None  # the direct path is taken
    for box in (Box((0, 0, 0), (32, 33, 32)), Box((32, 0, 0), (40, 33, 50)), Box((0, 0, 32), (32, 33, 50))):
        part = data[(Ellipsis, *box.slices())]
        write_region(arrays[0], box, part)
        zarr.open_array(arrays[1], mode="r+")[(Ellipsis, *box.slices())] = part
    direct, reference = stored_files(arrays[0]), stored_files(arrays[1])
    assert direct.keys() == reference.keys() and direct == reference
    assert not any(name.endswith(".partial") for name in direct)
    np.testing.assert_array_equal(open_array(arrays[0])[...], data)
    metadata = zarr.open_array(arrays[0]).metadata
    for c in range(channels or 1):
        lead = (c,) if channels else ()
        if shard:
            assert metadata.encode_chunk_key((*lead, 0, 0, 0)).replace("/", os.sep) in direct  # zeros and data: a shard
            assert metadata.encode_chunk_key((*lead, 1, 1, 0)).replace("/", os.sep) not in direct  # all zeros: no file
        else:
            assert metadata.encode_chunk_key((*lead, 0, 0, 0)).replace("/", os.sep) not in direct  # all zeros: no file
            assert metadata.encode_chunk_key((*lead, 1, 0, 0)).replace("/", os.sep) in direct  # -0.0 or data: a file


def test_a_shard_written_again_replaces_its_chunks_and_its_index(tmp_path):
    """Rewriting a shard with fewer stored chunks (some now zeros) and then all zeros, as a resumed
    or repeated block does: zarr reads what was written at each step; the last leaves no file."""
    group = create_group(str(tmp_path / "s.zarr"), "0.5")
    create_array(group, "0", (32, 32, 32), "uint8", output_spec("0.5", 8, 16))
    path = str(tmp_path / "s.zarr" / "0")
    box = Box((0, 0, 0), (16, 16, 16))
    data = np.arange(16**3, dtype=np.uint32).reshape((16,) * 3).astype(np.uint8)
    write_region(path, box, data)
    data[:8] = 0  # 4 of the shard's 8 chunks now empty
    write_region(path, box, data)
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:16, :16, :16], data)
    shard_file = os.path.join(path, "c", "0", "0", "0")
    assert os.path.getsize(shard_file) < 16**3  # compressed chunks and an index of 8 entries
    write_region(path, box, np.zeros_like(data))
    assert not os.path.exists(shard_file)
    assert not zarr.open_array(path, mode="r")[...].any()


def test_a_damaged_shard_index_is_refused_on_reading(tmp_path):
    from tilesegment.zarr_io import read_region

    group = create_group(str(tmp_path / "s.zarr"), "0.5")
    create_array(group, "0", (16, 16, 16), "uint8", output_spec("0.5", 8, 16))
    path = str(tmp_path / "s.zarr" / "0")
    write_region(path, Box((0, 0, 0), (16, 16, 16)), np.ones((16, 16, 16), np.uint8))
    shard_file = os.path.join(path, "c", "0", "0", "0")
    with open(shard_file, "r+b") as f:
        f.seek(-10, os.SEEK_END)  # inside the index: an offset changed
        f.write(b"\x07")
    with pytest.raises(OSError, match="index is damaged"):
        read_region(path, Box((0, 0, 0), (8, 8, 8)))


def test_a_chunk_written_empty_leaves_no_file_and_reads_as_zeros(tmp_path):
    group = create_group(str(tmp_path / "o.zarr"), "0.4")
    create_array(group, "0", (32, 32, 32), "uint8", output_spec("0.4", 16, None))
    path = str(tmp_path / "o.zarr" / "0")
    box = Box((0, 0, 0), (16, 16, 16))
    write_region(path, box, np.ones(box.shape, np.uint8))
    assert os.path.exists(os.path.join(path, "0", "0", "0"))
    write_region(path, box, np.zeros(box.shape, np.uint8))
    assert not os.path.exists(os.path.join(path, "0", "0", "0"))
    assert not open_array(path)[...].any()


def test_an_array_made_again_at_the_same_path_is_looked_at_afresh(tmp_path):
    path = str(tmp_path / "o.zarr" / "0")
    for dtype in ("uint8", "float32"):
        group = create_group(str(tmp_path / "o.zarr"), "0.4", overwrite=True)
        create_array(group, "0", (16, 16, 16), dtype, output_spec("0.4", 16, None))
        data = np.full((16, 16, 16), 2.5, dtype)
        write_region(path, Box((0, 0, 0), (16, 16, 16)), data)
        np.testing.assert_array_equal(open_array(path)[...], data)


@pytest.mark.parametrize("ngff, shard", LAYOUTS)
@pytest.mark.parametrize("dtype, channels", [("uint8", None), ("float16", 2), ("float32", None)])
def test_direct_reads_equal_zarrs_over_random_boxes(tmp_path, ngff, shard, dtype, channels):
    """Boxes anywhere (across chunks, clipped chunks, never-written chunks, all-zero chunks)."""
    from tilesegment.zarr_io import read_region, region_reader

    shape = (40, 33, 50)
    group = create_group(str(tmp_path / "r.zarr"), ngff)
    create_array(group, "0", shape, dtype, output_spec(ngff, 16, shard), channels=channels)
    path = str(tmp_path / "r.zarr" / "0")
    full = (channels,) * (channels is not None) + shape
    data = volume(dtype, full, seed=3)
    data[..., 32:, :, :] = 0
    write_region(path, Box((0, 0, 0), (32, 33, 50)), data[..., :32, :, :])  # z 32-40 never written: read as 0
    reference = zarr.open_array(path, mode="r")
    assert local_chunks(path, lambda: open_array(path)) is not None
    rng = np.random.default_rng(0)
    read = region_reader(path)
    for _ in range(25):
        start = tuple(int(rng.integers(0, n)) for n in shape)
        stop = tuple(int(rng.integers(a + 1, n + 1)) for a, n in zip(start, shape))
        box = Box(start, stop)
        expected = reference[(Ellipsis, *box.slices())]
        got = read(box)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(read_region(path, box), expected)


def test_a_failing_chunk_fails_the_write_after_every_other_chunk_has_finished(tmp_path, monkeypatch):
    import tilesegment.zarr_chunks as zc

    group = create_group(str(tmp_path / "f.zarr"), "0.4")
    create_array(group, "0", (32, 32, 32), "uint8", output_spec("0.4", 16, None))
    path = str(tmp_path / "f.zarr" / "0")
    writer = local_chunks(path, lambda: open_array(path, "r+"))
    write_chunk = zc.LocalChunks._write_chunk

    def failing(self, key, part):
        if key == (0, 0, 0):
            raise OSError("injected: disk full")
        write_chunk(self, key, part)

    monkeypatch.setattr(zc.LocalChunks, "_write_chunk", failing)
    with pytest.raises(OSError, match="injected"):
        writer.write(Box((0, 0, 0), (32, 32, 32)), np.ones((32, 32, 32), np.uint8))
    files = stored_files(path)
    assert len(files) == 7 and not any(name.endswith(".partial") for name in files)  # the other 7 chunks, whole


def test_a_failing_chunk_of_a_shard_leaves_the_shards_as_they_were(tmp_path, monkeypatch):
    import tilesegment.zarr_chunks as zc

    group = create_group(str(tmp_path / "f.zarr"), "0.5")
    create_array(group, "0", (32, 32, 32), "uint8", output_spec("0.5", 8, 16))
    path = str(tmp_path / "f.zarr" / "0")
    writer = local_chunks(path, lambda: open_array(path, "r+"))
    encoded = zc.LocalChunks._encoded
    calls = []

    def failing(self, part):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("injected: out of memory")
        return encoded(self, part)

    monkeypatch.setattr(zc.LocalChunks, "_encoded", failing)
    with pytest.raises(OSError, match="injected"):
        writer.write(Box((0, 0, 0), (32, 32, 32)), np.ones((32, 32, 32), np.uint8))
    assert len(calls) == 64 and stored_files(path) == {}  # every chunk encoded, no shard written

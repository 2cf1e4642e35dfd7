"""The main job's invariants: identity round trip, independence of block/chunk/worker counts,
agreement with an in-memory sliding-window reference, and exactly one forward per tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tilesegment.blending import window
from tilesegment.model import load_checkpoint, read_checkpoint
from tilesegment.pipeline import segment
from tilesegment.predict import _PREDICTORS

from .conftest import random_volume, write_mrc
from .outputs import blosc_settings


def probabilities(path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/probabilities/0", mode="r")[:])


def labels(path: str) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/0", mode="r")[:])


@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
@pytest.mark.parametrize(
    "shape, tile, chunk",
    [
        ((37, 41, 29), 16, 8),  # odd, non-chunk-multiple
        ((20, 48, 33), (8, 16, 16), (8, 16, 16)),  # anisotropic tiles and chunks
        ((5, 9, 7), 16, 8),  # smaller than one tile on every axis
        ((40, 6, 50), 16, 16),  # smaller than a tile on one axis only
    ],
)
def test_identity_network_returns_the_input(tmp_path, client, identity_model, blend, shape, tile, chunk):
    volume = random_volume(shape)
    src = write_mrc(tmp_path / "in.mrc", volume)
    out = str(tmp_path / "out.zarr")
    report = segment(src, out, model=identity_model, tile=tile, chunk=chunk, blend=blend, overlap=0.5,
                     probabilities=True, probability_dtype="float32", client=client)
    np.testing.assert_allclose(probabilities(out)[0], volume, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels(out), (volume > 0.5).astype(np.uint8))
    assert report.tiles_forwarded == report.tile_count


def run_small(tmp_path, client, model, volume, name, **options):
    src = tmp_path / "in.mrc"
    if not src.exists():
        write_mrc(src, volume)
    out = str(tmp_path / f"{name}.zarr")
    report = segment(str(src), out, model=model, tile=16, overlap=0.25, probabilities=True, probability_dtype="float32",
                     client=client, **options)
    return report, probabilities(out), labels(out)


def pyramid(path: str) -> list[np.ndarray]:
    """Every level of the labels and of the probabilities, finest first."""
    group = zarr.open_group(path, mode="r")
    return [np.asarray(group[name][:]) for name in sorted(group.array_keys(), key=int)] + \
        [np.asarray(group["probabilities"][name][:]) for name in sorted(group["probabilities"].array_keys(), key=int)]


def assert_each_level_downsamples_the_one_below(path: str) -> None:
    """The stored pyramid, which the blocks wrote unit by unit, against downsampling each whole
    stored level (labels by nearest, probabilities by mean): the same bits."""
    from tilesegment.pyramid import downsample

    group = zarr.open_group(path, mode="r")
    for arrays, method in [(group, "nearest")] + ([(group["probabilities"], "mean")] if "probabilities" in group else []):
        names = sorted(arrays.array_keys(), key=int)
        for below, level in zip(names, names[1:]):
            np.testing.assert_array_equal(arrays[level][:], downsample(arrays[below][:], method), err_msg=f"{path} level {level}")


def test_result_independent_of_block_and_chunk(tmp_path, client, small_net):
    """Other blocks and chunks give the same result, pyramid levels included, and every level is
    the one below it downsampled, though the blocks wrote the coarser levels unit by unit (16-voxel
    blocks of 16-voxel chunks: a level-1 unit spans two blocks per axis; 24-voxel blocks of 8-voxel
    chunks: units straddle block borders; one block across the whole volume; Zarr v3 shards, the
    write unit, straddling 48-voxel blocks)."""
    volume = random_volume((40, 52, 36), seed=3)
    reference = run_small(tmp_path, client, small_net, volume, "a", chunk=16, block=16, levels=3)
    levels = pyramid(str(tmp_path / "a.zarr"))
    assert_each_level_downsamples_the_one_below(str(tmp_path / "a.zarr"))
    cases = [dict(chunk=16, block=48), dict(chunk=8, block=24), dict(chunk=(8, 16, 8), block=(32, 16, 40)), dict(chunk=8, block=32),
             dict(chunk=8, block=(40, 56, 40)), dict(chunk=8, shard=16, ngff="0.5", block=48)]
    for i, options in enumerate(cases):
        report, probs, labs = run_small(tmp_path, client, small_net, volume, f"b{i}", levels=3, **options)
        assert report.blocks != reference[0].blocks or options["chunk"] != 16
        np.testing.assert_allclose(probs, reference[1], atol=1e-6)
        assert (labs != reference[2]).mean() < 1e-4  # argmax may flip only at exact ties
        assert_each_level_downsamples_the_one_below(str(tmp_path / f"b{i}.zarr"))
        for got, expected in zip(pyramid(str(tmp_path / f"b{i}.zarr")), levels, strict=True):
            if np.issubdtype(expected.dtype, np.integer):
                assert got.shape == expected.shape and (got != expected).mean() < 1e-3  # labels: the ties above, picked
            else:
                np.testing.assert_allclose(got, expected, atol=1e-6)


def test_result_independent_of_batch_size(tmp_path, client, small_net):
    """A batch of one tile (oneDNN on the CPU, model.OneDNNConv3d), uneven batches and whole ones
    give the same sums to float rounding."""
    volume = random_volume((36, 40, 28), seed=7)
    _, reference, reference_labels = run_small(tmp_path, client, small_net, volume, "b4", chunk=8, block=16, batch=4)
    for batch in (1, 3):
        _, probs, labs = run_small(tmp_path, client, small_net, volume, f"b{batch}", chunk=8, block=16, batch=batch)
        np.testing.assert_allclose(probs, reference, atol=2e-5)
        assert (labs != reference_labels).mean() < 1e-4


def test_pyramid_built_by_concurrent_blocks_without_spills(tmp_path, client, identity_model, monkeypatch):
    """With no tile overlap no block takes spill pieces, so only the pyramid orders the blocks: each
    waits for its lower neighbours, whose stored output its coarser units read. Two workers run
    blocks at once, the first blocks along x write their level 0 late (so a block that did not wait
    would read its lower neighbour's chunks before they exist), and 24-voxel blocks of 8-voxel chunks put
    level-1 and level-2 units across block borders. Every level must still be the one below it
    downsampled (the identity network: level 0 is the input's labels)."""
    import time

    from tilesegment import blocks

    write_region = blocks.write_region

    def slow_write_region(path, box, data):
        if box.start[2] == 0:  # the first blocks along x write last
            time.sleep(0.1)
        write_region(path, box, data)

    monkeypatch.setattr(blocks, "write_region", slow_write_region)
    volume = random_volume((72, 64, 56), seed=11)
    src = write_mrc(tmp_path / "in.mrc", volume)
    out = str(tmp_path / "out.zarr")
    report = segment(src, out, model=identity_model, tile=8, overlap=0.0, chunk=8, block=24, levels=4,
                     probabilities=True, probability_dtype="float32", client=client)
    assert report.blocks == 27 and report.tiles_forwarded == report.tile_count
    np.testing.assert_allclose(probabilities(out)[0], volume, rtol=1e-5, atol=1e-6)
    assert_each_level_downsamples_the_one_below(out)


def test_result_independent_of_worker_count(tmp_path, small_net):
    from distributed import Client, LocalCluster

    volume = random_volume((30, 40, 34), seed=4)
    results = []
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, Client(cluster) as c:
            results.append(run_small(tmp_path, c, small_net, volume, f"w{n}", chunk=8, block=16))
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-6)
    np.testing.assert_array_equal(results[0][2], results[1][2])


def sliding_window_reference(volume: np.ndarray, model_path: str, tile: int, overlap: float, blend: str) -> np.ndarray:
    """A plain in-memory sliding window: every tile of the global grid, weighted, summed, divided."""
    model, config = load_checkpoint(read_checkpoint(model_path))
    data = (volume - volume.mean(dtype=np.float64)) / volume.std(dtype=np.float64)
    stride = max(1, round(tile * (1 - overlap)))

    def origins(n: int) -> list[int]:
        if n <= tile:
            return [0]
        starts = list(range(0, n - tile, stride))
        return starts + [n - tile]

    pad = [(0, max(0, tile - n)) for n in volume.shape]
    padded = np.pad(data, pad, mode="reflect").astype(np.float32)
    w = window((tile,) * 3, blend)
    total = np.zeros((config.out_channels, *padded.shape), np.float64)
    weight = np.zeros(padded.shape, np.float64)
    for z in origins(volume.shape[0]):
        for y in origins(volume.shape[1]):
            for x in origins(volume.shape[2]):
                sl = (slice(z, z + tile), slice(y, y + tile), slice(x, x + tile))
                with torch.no_grad():
                    p = torch.softmax(model(torch.from_numpy(padded[sl][None, None].copy())), 1)[0].numpy()
                total[(slice(None), *sl)] += p * w
                weight[sl] += w
    z, y, x = volume.shape
    return (total / weight)[:, :z, :y, :x].astype(np.float32)


@pytest.mark.parametrize("shape", [(36, 44, 30), (12, 40, 40)])
def test_matches_in_memory_sliding_window(tmp_path, client, small_net, shape):
    volume = random_volume(shape, seed=5) * 3 + 1
    _, probs, labs = run_small(tmp_path, client, small_net, volume, "ref", chunk=8, block=16)
    expected = sliding_window_reference(volume, small_net, 16, 0.25, "gaussian")
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    assert (labs == np.argmax(expected, axis=0)).mean() > 0.9999


def test_each_tile_forwarded_exactly_once(tmp_path, client, small_net):
    volume = random_volume((44, 30, 38), seed=6)
    run_small(tmp_path, client, small_net, volume, "warm", chunk=8, block=16)  # loads the model in this process
    (predictor,) = [p for p in _PREDICTORS.values() if p.config.channels == (4, 8, 8)]
    seen: list[int] = []
    handle = predictor.model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        heard: list[int] = []
        report, _, _ = run_small(tmp_path, client, small_net, volume, "count", chunk=8, block=16, batch=3, progress=heard.append)
    finally:
        handle.remove()
    assert sum(heard) == report.tile_count and max(heard) <= 3  # the progress bar hears of every batch
    origins = [len(range(0, n - 16, 12)) + 1 for n in volume.shape]
    assert sum(seen) == report.tiles_forwarded == report.tile_count == origins[0] * origins[1] * origins[2]
    assert max(seen) <= 3


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_probabilities_get_their_own_compression(tmp_path, client, identity_model, ngff, dtype):
    """Every level of the probabilities is written with the settings chosen for its dtype (fast zstd),
    the labels with theirs; what is read back is what was computed."""
    from tilesegment.zarr_io import LABEL_COMPRESSION, PROBABILITY_COMPRESSION

    volume = random_volume((40, 36, 44), seed=5)
    src = write_mrc(tmp_path / "in.mrc", volume)
    out = str(tmp_path / "out.zarr")
    segment(src, out, model=identity_model, tile=16, chunk=8, ngff=ngff, levels=2, probabilities=True, probability_dtype=dtype, client=client)
    group = zarr.open_group(out, mode="r")
    wanted = PROBABILITY_COMPRESSION[dtype]
    for level in ("0", "1"):
        assert blosc_settings(group[level]) == (LABEL_COMPRESSION.level, LABEL_COMPRESSION.shuffle)
        assert blosc_settings(group["probabilities"][level]) == (wanted.level, wanted.shuffle)
    expected = volume if dtype != "uint8" else np.round(np.clip(volume, 0, 1) * 255)
    tolerance = {"float16": dict(rtol=1e-3, atol=1e-3), "float32": dict(rtol=1e-5, atol=1e-6), "uint8": dict(rtol=0, atol=1)}[dtype]
    np.testing.assert_allclose(probabilities(out)[0].astype(np.float32), expected, **tolerance)


def test_output_metadata_and_pyramid(tmp_path, client, identity_model):
    volume = random_volume((64, 70, 66))
    src = write_mrc(tmp_path / "in.mrc", volume)
    out = str(tmp_path / "out.zarr")
    segment(src, out, model=identity_model, tile=16, chunk=16, client=client)
    group = zarr.open_group(out, mode="r")
    attrs = dict(group.attrs)
    assert attrs["tilesegment"]["status"] == "complete"
    assert attrs["image-label"]["properties"][1]["class"] == "value"
    datasets = attrs["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"][0] for d in datasets] == [10.0, 20.0, 40.0]
    level0 = group["0"][:]
    for level in (1, 2):  # nearest-neighbour label pyramid
        np.testing.assert_array_equal(group[str(level)][:], level0[:: 2**level, :: 2**level, :: 2**level])


def test_zarr_v3_sharded_output_equals_v2(tmp_path, client, small_net):
    volume = random_volume((37, 41, 29), seed=7)  # odd: partial shards at every far edge
    _, p2, l2 = run_small(tmp_path, client, small_net, volume, "v2", chunk=16)
    _, p3, l3 = run_small(tmp_path, client, small_net, volume, "v3", chunk=8, shard=16, ngff="0.5")
    np.testing.assert_allclose(p2, p3, atol=1e-6)
    np.testing.assert_array_equal(l2, l3)
    meta = zarr.open_group(str(tmp_path / "v3.zarr"), mode="r").attrs["ome"]
    assert meta["version"] == "0.5" and "image-label" in meta


def test_zarr_input_equals_mrc_input(tmp_path, client, small_net):
    from tilesegment.convert import convert

    volume = random_volume((33, 35, 37), seed=8)
    _, from_mrc, _ = run_small(tmp_path, client, small_net, volume, "mrc", chunk=8)
    convert(str(tmp_path / "in.mrc"), str(tmp_path / "in.zarr"), chunk=16)
    out = str(tmp_path / "fromzarr.zarr")
    segment(str(tmp_path / "in.zarr"), out, model=small_net, tile=16, overlap=0.25, probabilities=True,
            probability_dtype="float32", client=client, chunk=8)
    np.testing.assert_allclose(probabilities(out), from_mrc, atol=2e-5)  # stats from a coarse level differ slightly


def test_an_image_with_one_time_point_and_channel_is_its_volume(tmp_path, client, small_net):
    """OME-Zarr images from other tools are often (t, c, z, y, x) with single t and c: the same
    volume as tileseg's own (z, y, x) image, so the same result; several channels are refused."""
    from tilesegment.convert import convert
    from tilesegment.errors import InputError

    write_mrc(tmp_path / "in.mrc", random_volume((33, 35, 37), seed=8))
    convert(str(tmp_path / "in.mrc"), str(tmp_path / "in.zarr"), chunk=16)
    three = zarr.open_group(str(tmp_path / "in.zarr"), mode="r")
    five = zarr.open_group(str(tmp_path / "five.zarr"), mode="w", zarr_format=2)
    entry = dict(three.attrs["multiscales"][0])
    space = [a for a in entry["axes"]]
    entry["axes"] = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, *space]
    datasets = []
    for dataset in entry["datasets"]:
        level = np.asarray(three[dataset["path"]][:])
        five.create_array(dataset["path"], data=level[None, None], chunks=(1, 1, 16, 16, 16))
        scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
        datasets.append({"path": dataset["path"], "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, *scale]}]})
    entry["datasets"] = datasets
    five.attrs["multiscales"] = [entry]
    results = []
    for name in ("in", "five"):
        out = str(tmp_path / f"{name}.seg.zarr")
        segment(str(tmp_path / f"{name}.zarr"), out, model=small_net, tile=16, probabilities=True, probability_dtype="float32",
                client=client, chunk=8)
        results.append(probabilities(out))
    np.testing.assert_array_equal(results[1], results[0])
    two = zarr.open_array(str(tmp_path / "two.zarr"), mode="w", shape=(2, 16, 16, 16), dtype="float32", zarr_format=2)
    two[:] = 1.0
    with pytest.raises(InputError, match=r"2 channels or time points of a 16×16×16 volume"):
        segment(str(tmp_path / "two.zarr"), str(tmp_path / "two.seg.zarr"), model=small_net, tile=16, client=client)


def test_bf16_autocast_agrees_with_fp32_and_fp16_and_tf32_need_a_gpu(tmp_path, client):
    """Reduced precision is opt-in; on a realistic tomogram its labels stay within 1% of fp32's.
    A CPU without native bf16 (AVX512-BF16, AMX) is refused bf16, by the worker that would run it
    and, for an embedded cluster, before it starts: there PyTorch emulates bf16 at 100-350x the time."""
    from tilesegment.errors import OptionError
    from tilesegment.predict import check_precision, native_cpu_bf16
    from tilesegment.simulate import SimulationConfig, simulate_volume

    sim = simulate_volume(SimulationConfig(shape=(48, 48, 48), snr=1.0, seed=3))
    src = write_mrc(tmp_path / "sim.mrc", sim.tomogram)
    segment(src, str(tmp_path / "fp32.zarr"), tile=32, client=client)
    fp32 = labels(str(tmp_path / "fp32.zarr"))
    assert 0.02 < fp32.mean() < 0.9  # a real segmentation, not an empty one
    check_precision("bf16", "cpu")  # the client does not judge a cluster's CPUs
    if native_cpu_bf16():
        check_precision("bf16", "cpu", on_this_machine=True)
        segment(src, str(tmp_path / "bf16.zarr"), tile=32, client=client, precision="bf16")
        assert (fp32 == labels(str(tmp_path / "bf16.zarr"))).mean() > 0.99
    else:
        with pytest.raises(OptionError, match="bf16 on a CPU without AVX512-BF16 or AMX"):
            check_precision("bf16", "cpu", on_this_machine=True)
        with pytest.raises(OptionError, match="bf16 on a CPU without AVX512-BF16 or AMX"):
            segment(src, str(tmp_path / "bf16.zarr"), tile=32, client=client, precision="bf16")
    with pytest.raises(OptionError, match="fp16 needs a GPU"):
        segment(src, str(tmp_path / "fp16.zarr"), tile=32, client=client, precision="fp16")
    with pytest.raises(OptionError, match="tf32 needs an NVIDIA GPU"):
        segment(src, str(tmp_path / "tf32.zarr"), tile=32, client=client, precision="tf32")


# --- a tomogram at another voxel size: refused, with a pyramid level that fits where there is one ---


def test_a_finer_tomogram_is_refused_naming_the_level_that_fits_and_that_level_segments(tmp_path, client, identity_model):
    from tilesegment.convert import convert
    from tilesegment.errors import InputError

    data = random_volume((32, 32, 32), seed=2)
    mrc = write_mrc(tmp_path / "fine.mrc", data, voxel=5.0)  # the identity model's is 10 Å
    with pytest.raises(InputError, match="voxel size 5 × 5 × 5 Å is 0.50× the model's 10 Å") as info:
        segment(mrc, tmp_path / "a.zarr", model=identity_model, tile=8, client=client)
    assert "'tileseg convert' writes it 2× binned (10 Å/voxel) as pyramid level 1" in info.value.fix
    assert f"Otherwise resample it to the model's voxel size ('tileseg convert {mrc} TOMO.zarr --voxel-size 10'" in info.value.fix
    assert not (tmp_path / "a.zarr").exists()
    convert(mrc, tmp_path / "fine.zarr", chunk=16, levels=2)
    with pytest.raises(InputError) as info:
        segment(tmp_path / "fine.zarr", tmp_path / "a.zarr", model=identity_model, tile=8, client=client)
    assert f"Its pyramid level {tmp_path / 'fine.zarr'}/1 is 10 × 10 × 10 Å/voxel" in info.value.fix
    out = str(tmp_path / "a.zarr")
    segment(f"{tmp_path / 'fine.zarr'}/1", out, model=identity_model, tile=8, overlap=0.5, chunk=8, probabilities=True,
            probability_dtype="float32", levels=2, client=client)
    coarse = np.asarray(zarr.open_array(str(tmp_path / "fine.zarr" / "1"), mode="r")[:])  # the 2x means of the data
    np.testing.assert_allclose(probabilities(out)[0], coarse, rtol=1e-5, atol=1e-6)
    entry = zarr.open_group(out, mode="r").attrs["multiscales"][0]
    assert entry["datasets"][0]["coordinateTransformations"][0]["scale"][-3:] == [10.0, 10.0, 10.0]  # Å: level 1's
    # placed where level 1 lies in the 5 Å grid: labels (every second voxel) at its first centre on
    # every level, the probabilities' 2× means half a level-0 voxel further on each level
    assert [d["coordinateTransformations"][1]["translation"] for d in entry["datasets"]] == [[2.5] * 3, [2.5] * 3]
    entry = zarr.open_group(f"{out}/probabilities", mode="r").attrs["multiscales"][0]
    assert [d["coordinateTransformations"][1]["translation"] for d in entry["datasets"]] == [[0.0, 2.5, 2.5, 2.5], [0.0, 7.5, 7.5, 7.5]]


def test_a_coarser_tomogram_gets_no_level_hint(tmp_path, client, identity_model):
    from tilesegment.errors import InputError

    mrc = write_mrc(tmp_path / "coarse.mrc", random_volume((24, 24, 24)), voxel=20.0)
    with pytest.raises(InputError) as info:
        segment(mrc, tmp_path / "a.zarr", model=identity_model, tile=8, client=client)
    assert info.value.fix.startswith(f"Resample it to the model's voxel size ('tileseg convert {mrc} TOMO.zarr --voxel-size 10'")


def test_errors_cross_processes_with_every_field():
    """Dask pickles an error raised on a worker: what, fix and the voxel-size error's model voxel survive."""
    import pickle

    from tilesegment.errors import InputError, VoxelSizeError

    back = pickle.loads(pickle.dumps(VoxelSizeError("too fine", "resample it", 10.0)))
    assert isinstance(back, InputError) and (back.what, back.fix, back.model_voxel, back.exit_code) == ("too fine", "resample it", 10.0, 3)
    back = pickle.loads(pickle.dumps(InputError("bad", "fix it")))
    assert (back.what, back.fix) == ("bad", "fix it")

"""copick projects and CryoET Data Portal tomograms: read where copick keeps them, write where copick lists them.

copick 1.x pins zarr<3, so it cannot live in tileseg's environment. The project layout and the
store names are checked here against copick's documented rules; ``test_copick_itself_lists_and_reads_it``
checks the same with copick, run in its own environment: set ``TILESEG_COPICK_PYTHON`` to a Python
that has copick (``python -m venv cp && cp/bin/pip install copick``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numcodecs
import numpy as np
import pytest
import zarr
from ome_zarr_models.v04.image import Image as Image04
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabel04

from tilesegment.copick_io import segment_copick, store_name
from tilesegment.errors import InputError, OptionError, OutputError
from tilesegment.pipeline import segment
from tilesegment.volume import open_volume

from .conftest import random_volume

SHAPE = (24, 30, 36)
RUN = "TS_001"
STORE = "10.000_tileseg_0_macromolecule-multilabel.zarr"
FAST = {"tile": 16, "chunk": 16}


def portal_tomogram(path, volume: np.ndarray, voxel: float = 10.0, levels: int = 3) -> str:
    """An OME-NGFF 0.4 / Zarr v2 tomogram as the CryoET Data Portal and copick write it: levels "0", "1", "2" at
    100/50/25 %, axes z, y, x in ångström, float32, 256³ Blosc-lz4 chunks with '/' chunk keys."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets, level = [], volume.astype(np.float32)
    for i in range(levels):
        array = group.create_array(str(i), shape=level.shape, chunks=tuple(min(256, n) for n in level.shape), dtype="float32",
                                   compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                                   chunk_key_encoding={"name": "v2", "separator": "/"}, fill_value=0.0)
        array[:] = level
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [voxel * 2**i] * 3}]})
        level = level[: level.shape[0] // 2 * 2, : level.shape[1] // 2 * 2, : level.shape[2] // 2 * 2]
        level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, level.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]
    group.attrs["multiscales"] = [{"axes": axes, "datasets": datasets, "metadata": {}, "name": "/", "version": "0.4"}]
    return str(path)


def copick_project(root, volume: np.ndarray | None = None, voxel: float = 10.0, **config) -> str:
    """A local copick filesystem project: one run, one voxel spacing, one 'wbp' tomogram in the static root."""
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "static" / "ExperimentRuns" / RUN
    spacing = run_dir / "VoxelSpacing10.000"
    spacing.mkdir(parents=True)
    for folder in (run_dir, spacing):  # what copick's ensure(create=True) leaves
        (folder / ".meta").write_text("meta")
    portal_tomogram(spacing / "wbp.zarr", random_volume(SHAPE, seed=5) if volume is None else volume, voxel=voxel)
    data = {
        "config_type": "filesystem", "name": "test project", "version": "1.31.0",
        "pickable_objects": [
            {"name": "ribosome", "is_particle": True, "label": 1, "color": [0, 117, 220, 255], "radius": 150},
            {"name": "membrane", "is_particle": False, "label": 2, "color": [255, 0, 0, 128]},
        ],
        "overlay_root": f"local://{root / 'overlay'}", "static_root": f"local://{root / 'static'}",
        "overlay_fs_args": {"auto_mkdir": True}, **config,
    }
    path = root / "copick.json"
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def tomogram_of(config: str) -> str:
    return os.path.join(os.path.dirname(config), "static", "ExperimentRuns", RUN, "VoxelSpacing10.000", "wbp.zarr")


def segmentations(config: str) -> str:
    return os.path.join(os.path.dirname(config), "overlay", "ExperimentRuns", RUN, "Segmentations")


def listed_by_copick(folder: str) -> list[dict]:
    """What copick's list_segmentation_stores finds: non-hidden *.zarr folders, name split as {vs}_{user}_{session}_{name}."""
    found = []
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".zarr") and not entry.startswith(".") and os.path.isdir(os.path.join(folder, entry)):
            vs, user, session, name = entry[:-5].split("_", 3)
            multilabel = name.endswith("-multilabel")
            found.append({"voxel_size": float(vs), "user_id": user, "session_id": session,
                          "name": name[: -len("-multilabel")] if multilabel else name, "is_multilabel": multilabel})
    return found


def labels(path: str, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{path}/{level}", mode="r")[:])


def test_a_portal_tomogram_is_read_at_10_angstrom_and_segmented(tmp_path, identity_model, client):
    volume = random_volume(SHAPE, seed=2)
    tomo = portal_tomogram(tmp_path / "TS_001.zarr", volume)
    Image04.from_zarr(zarr.open_group(tomo, mode="r"))  # the fixture is a valid NGFF 0.4 image (independent validator)
    source = open_volume(tomo)
    assert source.voxel_size == (10.0, 10.0, 10.0) and source.shape == SHAPE and np.dtype(source.dtype) == np.float32
    assert [os.path.basename(p) for p in source.zarr.levels] == ["0", "1", "2"]
    out = str(tmp_path / "seg.zarr")
    segment(tomo, out, model=identity_model, client=client, **FAST)
    np.testing.assert_array_equal(labels(out), (volume > 0.5).astype(np.uint8))  # level 0 was segmented, voxel for voxel
    ms = zarr.open_group(out, mode="r").attrs["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [10.0, 10.0, 10.0]
    assert [a["unit"] for a in ms["axes"]] == ["angstrom"] * 3


def test_the_mask_lands_where_copick_lists_it(tmp_path, small_net, client):
    config = copick_project(tmp_path / "project")
    tomogram = tomogram_of(config)
    before = {f: open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tomogram) for f in fs}
    result = segment_copick(config, RUN, 10, "wbp", "macromolecule", model=small_net, client=client, **FAST)
    folder = segmentations(config)
    assert result.path == os.path.join(folder, STORE) == os.path.join(folder, store_name(10.0, "tileseg", "0", "macromolecule"))
    assert os.listdir(folder) == [STORE]  # no staging store, no lock file left
    assert listed_by_copick(folder) == [{"voxel_size": 10.0, "user_id": "tileseg", "session_id": "0", "name": "macromolecule",
                                         "is_multilabel": True}]
    # a Zarr v2 OME-NGFF 0.4 label image, complete, at the tomogram's voxel size
    assert os.path.exists(os.path.join(result.path, ".zgroup")) and os.path.exists(os.path.join(result.path, "0", ".zarray"))
    attrs = zarr.open_group(result.path, mode="r").attrs
    assert attrs["tilesegment"]["status"] == "complete" and attrs["multiscales"][0]["version"] == "0.4"
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [10.0, 10.0, 10.0]
    assert [p["class"] for p in attrs["image-label"]["properties"]] == ["background", "a", "b"]
    ImageLabel04.from_zarr(zarr.open_group(result.path, mode="r"))  # still a valid NGFF 0.4 label image
    mask = labels(result.path)
    assert mask.shape == SHAPE and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}
    segment(tomogram, str(tmp_path / "direct.zarr"), model=small_net, client=client, **FAST)
    np.testing.assert_array_equal(mask, labels(str(tmp_path / "direct.zarr")))
    after = {f: open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(tomogram) for f in fs}
    assert after == before  # the project's tomogram is never modified


def test_an_existing_segmentation_is_refused_resumed_or_replaced(tmp_path, identity_model, client):
    volume = random_volume(SHAPE, seed=3)
    config = copick_project(tmp_path / "project", volume=volume)
    segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    with pytest.raises(OutputError, match="already lists.*--overwrite"):
        segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    assert segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, resume=True, **FAST).report is None
    again = segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, overwrite=True, **FAST)
    assert again.report.tiles_forwarded == again.report.tile_count and os.listdir(segmentations(config)) == [STORE]
    np.testing.assert_array_equal(labels(again.path), (volume > 0.5).astype(np.uint8))  # every chunk written anew
    other = segment_copick(config, RUN, 10.0, "wbp", "macromolecule", user_id="alice", session_id="7", model=identity_model,
                           client=client, **FAST)
    assert os.path.basename(other.path) == "10.000_alice_7_macromolecule-multilabel.zarr"
    assert len(listed_by_copick(segmentations(config))) == 2


def test_a_stopped_run_stays_hidden_from_copick_until_resumed(tmp_path, small_net, client, monkeypatch):
    from tilesegment import blocks

    config = copick_project(tmp_path / "project", volume=random_volume((32, 24, 24), seed=4))
    read = blocks.read_volume

    def failing_storage(source, box):
        if box.stop[0] >= 32:  # the blocks of the second z layer cannot be read
            raise OSError("injected: storage went away")
        return read(source, box)

    monkeypatch.setattr(blocks, "read_volume", failing_storage)
    with pytest.raises(OSError, match="injected"):
        segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=small_net, client=client, block=16, **FAST)
    monkeypatch.setattr(blocks, "read_volume", read)
    folder = segmentations(config)
    assert os.listdir(folder) == ["." + STORE] and listed_by_copick(folder) == []  # copick skips hidden names
    with pytest.raises(OutputError, match="--resume"):
        segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=small_net, client=client, block=16, **FAST)
    result = segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=small_net, client=client, block=16, resume=True, **FAST)
    assert 0 < result.report.extra["resumed_blocks"] < result.report.blocks
    assert os.listdir(folder) == [STORE]
    segment(tomogram_of(config), str(tmp_path / "direct.zarr"), model=small_net, client=client, block=16, **FAST)
    np.testing.assert_array_equal(labels(result.path), labels(str(tmp_path / "direct.zarr")))
    # a stopped --overwrite keeps the old mask listed until the new one is complete; --resume finishes the replacement
    # (with probabilities: other settings than the runs above, whose Dask results the shared client may still hold)
    monkeypatch.setattr(blocks, "read_volume", failing_storage)
    with pytest.raises(OSError, match="injected"):
        segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=small_net, client=client, block=16, overwrite=True,
                       probabilities=True, **FAST)
    monkeypatch.setattr(blocks, "read_volume", read)
    assert sorted(os.listdir(folder)) == ["." + STORE, STORE] and len(listed_by_copick(folder)) == 1
    again = segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=small_net, client=client, block=16, resume=True,
                           probabilities=True, **FAST)
    assert 0 < again.report.extra["resumed_blocks"] < again.report.blocks and os.listdir(folder) == [STORE]
    np.testing.assert_array_equal(labels(again.path), labels(str(tmp_path / "direct.zarr")))


def test_mismatches_are_noted(tmp_path, identity_model, client):
    config = copick_project(tmp_path / "project", voxel=10.5)  # within the model's tolerance, but not the folder's 10.000
    quiet = segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    assert len(quiet.notes) == 1 and "records 10.5 Å/voxel but lies in VoxelSpacing10.000" in quiet.notes[0]
    scale = zarr.open_group(quiet.path, mode="r").attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [10.5, 10.5, 10.5]  # the tomogram's own scale, so the mask overlays it
    # the identity model's class 'value' is 1 in the mask; a pickable object 'value' with label 2 would be misread
    objects = [{"name": "value", "is_particle": False, "label": 2}]
    clash = copick_project(tmp_path / "clash", pickable_objects=objects)
    result = segment_copick(clash, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    assert result.notes == (f"class 'value' is value 1 in the mask, but pickable object 'value' has label 2 in {clash}; "
                            "copick tools that map values to objects will misname it.",)


def test_errors_say_what_exists(tmp_path):
    config = copick_project(tmp_path / "project")
    args = (RUN, 10.0, "wbp", "macromolecule")
    with pytest.raises(InputError, match="no such copick config"):
        segment_copick(str(tmp_path / "missing.json"), *args)
    with pytest.raises(InputError, match=r"no run 'TS_999' \(runs: TS_001\).*--run"):
        segment_copick(config, "TS_999", 10.0, "wbp", "macromolecule")
    with pytest.raises(InputError, match=r"no run '\.\./static'"):
        segment_copick(config, "../static", 10.0, "wbp", "macromolecule")
    with pytest.raises(InputError, match=r"no voxel spacing 7.500 Å \(voxel spacings: 10.000\).*--voxel-spacing"):
        segment_copick(config, RUN, 7.5, "wbp", "macromolecule")
    with pytest.raises(InputError, match=r"no 'denoised' tomogram at 10.000 Å \(tomogram types: wbp\).*--tomo-type"):
        segment_copick(config, RUN, 10.0, "denoised", "macromolecule")
    with pytest.raises(OptionError, match="--name 'my_mask'.*--name my-mask"):
        segment_copick(config, RUN, 10.0, "wbp", "my_mask")
    with pytest.raises(OptionError, match="--user-id"):
        segment_copick(config, *args, user_id="tile seg")
    with pytest.raises(OptionError, match="Zarr v2"):
        segment_copick(config, *args, ngff="0.5")
    s3 = copick_project(tmp_path / "s3", overlay_root="s3://bucket/overlay")
    with pytest.raises(InputError, match="not on a local file system"):
        segment_copick(s3, *args)
    portal = copick_project(tmp_path / "portal", config_type="cryoet_data_portal", dataset_ids=[10445])
    with pytest.raises(InputError, match="'filesystem' projects only"):
        segment_copick(portal, *args)
    assert not os.path.exists(segmentations(config))  # nothing written by refused runs


TILESEG_COPICK = ["-c", "from tilesegment.cli.main import main; from tilesegment.cli.ecosystem import copick; "
                  "'copick' in main.commands or main.add_command(copick); main()", "copick"]


def tileseg_copick(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *TILESEG_COPICK, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CI": "1"})


def test_the_copick_command_is_registered():
    from tilesegment.cli.main import main

    assert "copick" in main.commands, "add the copick command to cli/main.py"


def test_copick_command_errors_in_one_line(tmp_path):
    config = copick_project(tmp_path / "project")
    result = tileseg_copick(config, "--run", "TS_9", "--voxel-spacing", "10", "--tomo-type", "wbp", "--name", "macromolecule")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert lines[0].startswith("tileseg: error:") and "runs: TS_001" in lines[0]
    help_text = tileseg_copick("--help").stdout
    assert "Examples:" in help_text and "--voxel-spacing" in help_text and "--resume" in help_text


@pytest.mark.slow
def test_copick_command_writes_the_segmentation(tmp_path, identity_model):
    config = copick_project(tmp_path / "project")
    result = tileseg_copick(config, "--run", RUN, "--voxel-spacing", "10", "--tomo-type", "wbp", "--name", "macromolecule",
                            "--model", identity_model, "--tile", "16", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"wrote copick multilabel segmentation {STORE}" in result.stdout
    assert listed_by_copick(segmentations(config))[0]["name"] == "macromolecule"


COPICK_PYTHON = os.environ.get("TILESEG_COPICK_PYTHON")

WRITE_WITH_COPICK = """
import json, sys, numpy as np, copick
root_dir, volume = sys.argv[1], np.load(sys.argv[2])
static = {"config_type": "filesystem", "pickable_objects": [{"name": "ribosome", "is_particle": True, "label": 1}],
          "overlay_root": "local://" + root_dir + "/static", "overlay_fs_args": {"auto_mkdir": True}}
json.dump(static, open(root_dir + "/static.json", "w"))
json.dump({**static, "overlay_root": "local://" + root_dir + "/overlay", "static_root": "local://" + root_dir + "/static"},
          open(root_dir + "/copick.json", "w"))
run = copick.from_file(root_dir + "/static.json").new_run("TS_001")
run.new_voxel_spacing(10.0).new_tomogram("wbp").from_numpy(volume, levels=3)
"""

READ_WITH_COPICK = """
import sys, numpy as np, copick
run = copick.from_file(sys.argv[1] + "/copick.json").get_run("TS_001")
found = run.get_segmentations(user_id="tileseg", session_id="0", name="macromolecule", voxel_size=10.0, is_multilabel=True)
assert len(found) == 1 and len(run.segmentations) == 1, run.segmentations
np.save(sys.argv[2], found[0].numpy())
"""


@pytest.mark.slow
@pytest.mark.skipif(not COPICK_PYTHON, reason="set TILESEG_COPICK_PYTHON to a Python with copick (it pins zarr<3, so it needs its own env)")
def test_copick_itself_lists_and_reads_it(tmp_path, identity_model, client):
    """copick writes the project and its tomogram; tileseg segments it; copick lists the mask and reads the same array."""
    volume = random_volume(SHAPE, seed=9)
    np.save(tmp_path / "volume.npy", volume)
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run([COPICK_PYTHON, "-c", textwrap.dedent(WRITE_WITH_COPICK), str(root), str(tmp_path / "volume.npy")], check=True, timeout=120)
    result = segment_copick(str(root / "copick.json"), RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    read = subprocess.run([COPICK_PYTHON, "-c", textwrap.dedent(READ_WITH_COPICK), str(root), str(tmp_path / "read.npy")],
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "read.npy"), labels(result.path))
    np.testing.assert_array_equal(labels(result.path), (volume > 0.5).astype(np.uint8))  # the identity network's mask


def test_a_tomogram_at_another_voxel_spacing_is_resampled_into_the_project_and_segmented(tmp_path, identity_model, client):
    """copick holds a run at several voxel spacings: the refusal names the 10 Å copy for 'tileseg
    convert' to write into the overlay, and that copy segments as any tomogram of the project."""
    from tilesegment.convert import convert

    config = copick_project(tmp_path / "project", voxel=13.48)
    run_dir = tmp_path / "project" / "static" / "ExperimentRuns" / RUN
    os.rename(run_dir / "VoxelSpacing10.000", run_dir / "VoxelSpacing13.480")
    with pytest.raises(InputError, match="1.35× the model's 10 Å") as info:
        segment_copick(config, RUN, 13.48, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    copy = str(tmp_path / "project" / "overlay" / "ExperimentRuns" / RUN / "VoxelSpacing10.000" / "wbp.zarr")
    source = str(run_dir / "VoxelSpacing13.480" / "wbp.zarr")
    assert f"'tileseg convert {source} {copy} --voxel-size 10'" in info.value.fix
    assert f"'tileseg copick {config} --run {RUN} --voxel-spacing 10 --tomo-type wbp --name macromolecule'" in info.value.fix
    assert not [e for e in os.listdir(segmentations(config)) if ".zarr" in e]  # nothing started, not even the hidden staging store
    convert(source, copy, voxel_size=10.0)
    result = segment_copick(config, RUN, 10.0, "wbp", "macromolecule", model=identity_model, client=client, **FAST)
    assert result.tomogram == copy and os.path.basename(result.path) == STORE
    assert labels(result.path).shape == tuple(round(n * 1.348) for n in SHAPE)

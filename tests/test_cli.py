"""The command line as a user meets it: real `tileseg` processes, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import zarr

from .conftest import random_volume, write_mrc

TILESEG = [sys.executable, "-m", "tilesegment.cli.main"]


def tileseg(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1"}
    return subprocess.run([*TILESEG, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tileseg: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_version_and_help():
    assert tileseg("--version").stdout.startswith("tileseg, version")
    from tilesegment.cli.main import main

    assert len(main.commands) >= 9
    for command in main.commands:
        result = tileseg(command, "--help")
        assert result.returncode == 0 and "Example" in result.stdout, command


def test_precision_choices_are_the_predictors_precisions():
    """The CLI lists the choices itself (so that --help imports no PyTorch); they must not drift."""
    from tilesegment.cli.main import main
    from tilesegment.predict import PRECISIONS

    for command in ("run", "copick"):
        option = next(p for p in main.commands[command].params if p.name == "precision")
        assert list(option.type.choices) == list(PRECISIONS), command


def test_json_summaries_and_verbosity(tmp_path, identity_model):
    import json

    src = write_mrc(tmp_path / "tomo.mrc", random_volume((24, 24, 24)))
    result = tileseg("-v", "run", src, str(tmp_path / "seg.zarr"), "--model", identity_model, "--tile", "16", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tiles_forwarded"] == summary["tile_count"] > 0 and summary["shape"] == [24, 24, 24]
    assert "tileseg: INFO:" in result.stderr and "tiles of 16×16×16" in result.stderr
    assert "distributed" not in result.stderr  # Dask's chatter only from -vv
    status = tileseg("status", str(tmp_path / "seg.zarr"), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["complete"] is True
    converted = tileseg("-q", "convert", src, str(tmp_path / "tomo.zarr"), "--json")
    assert json.loads(converted.stdout)["shape"] == [24, 24, 24]
    quiet = tileseg("-q", "run", src, str(tmp_path / "seg2.zarr"), "--model", identity_model, "--tile", "16")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_progress_is_a_line_now_and_then_where_there_is_no_terminal(tmp_path, identity_model):
    """A batch job's log gets progress lines (every TILESEG_PROGRESS_SECONDS, 60 by default), not a
    bar's carriage returns; a short run says nothing before its summary."""
    src = write_mrc(tmp_path / "tomo.mrc", random_volume((24, 24, 24)))
    short = tileseg("run", src, str(tmp_path / "a.zarr"), "--model", identity_model, "--tile", "16")
    assert short.returncode == 0 and "tileseg: segment:" not in short.stderr and "\r" not in short.stderr
    env = {**os.environ, "CI": "1", "TILESEG_PROGRESS_SECONDS": "0"}
    every = subprocess.run([*TILESEG, "run", src, str(tmp_path / "b.zarr"), "--model", identity_model, "--tile", "16"],
                           capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in every.stderr.splitlines() if line.startswith("tileseg: segment:")]
    assert every.returncode == 0 and lines and "\r" not in every.stderr, every.stderr
    assert lines[-1].startswith("tileseg: segment: 8/8 tiles (100.0 %), ") and lines[-1].endswith(" left")


def test_progress_lines_read_as_a_bar_would():
    from tilesegment.cli.common import ProgressLines

    steps = ProgressLines(2000, "step", "train", False, 3600.0)
    steps.update(500)
    steps.set_postfix(loss=0.1234567, val_iou=0.8)
    started = steps._started
    assert steps.line(started + 100) == "tileseg: train: 500/2000 steps (25.0 %), 5 steps/s, about 5 min left, loss 0.1235, val_iou 0.8"
    voxels = ProgressLines(None, "vox", "convert", True, 3600.0)
    voxels.update(3_500_000_000)
    assert voxels.line(voxels._started + 10) == "tileseg: convert: 3.50 G vox, 350.00 M vox/s"


def test_a_segmentation_given_as_the_tomogram_is_refused(tmp_path, identity_model):
    """An earlier run's output as INPUT (easy to mix up) would be segmented as if its labels were
    densities; the group and its arrays are refused, while evaluate and export still read it."""
    src = write_mrc(tmp_path / "tomo.mrc", random_volume((24, 24, 24)))
    seg = str(tmp_path / "seg.zarr")
    assert tileseg("-q", "run", src, seg, "--model", identity_model, "--tile", "16").returncode == 0
    for given in (seg, f"{seg}/0"):
        assert_one_line_error(tileseg("run", given, str(tmp_path / "again.zarr"), "--model", identity_model, "--tile", "16"), 3,
                              "label image", "not a tomogram", "tomo.mrc")
    assert not os.path.exists(tmp_path / "again.zarr")
    # an unfinished output has no OME label metadata yet, but says it is tileseg's
    group = zarr.open_group(seg, mode="r+")
    complete = dict(group.attrs)
    group.attrs.put({k: v for k, v in complete.items() if k not in ("image-label", "multiscales")})
    assert_one_line_error(tileseg("run", seg, str(tmp_path / "again.zarr"), "--model", identity_model, "--tile", "16"), 3, "label image")
    group.attrs.put(complete)  # as it was, for export and evaluate
    assert tileseg("-q", "export", seg, str(tmp_path / "seg.mrc")).returncode == 0
    assert tileseg("-q", "evaluate", seg, str(tmp_path / "seg.mrc")).returncode == 0


def test_a_tilt_series_by_its_name_gets_a_warning(tmp_path, identity_model):
    src = write_mrc(tmp_path / "TS_01.st", random_volume((24, 24, 24)))
    result = tileseg("run", src, str(tmp_path / "seg.zarr"), "--model", identity_model, "--tile", "16")
    assert result.returncode == 0, result.stderr
    assert "tileseg: WARNING:" in result.stderr and "looks like a tilt series or image stack (.st)" in result.stderr


def test_a_full_disk_met_anywhere_is_one_line_naming_what_was_written():
    """Commands whose own code does not map a write failure (convert, export, simulate) still say it
    in one line with exit 5; --resume is offered only where a run can be resumed."""
    import errno

    import click
    from click.testing import CliRunner

    from tilesegment.cli.common import handle_errors

    @click.command()
    @click.argument("output_dir")
    @handle_errors
    def writes(output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    @click.command("run")
    @click.argument("output")
    @handle_errors
    def run(output):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", f"{output}/0/0.0.0")

    result = CliRunner().invoke(writes, ["/data/sim"])
    assert result.exit_code == 5 and result.output.strip().splitlines() == [
        "tileseg: error: cannot write /data/sim: no space is left on the device. Free space (or fix the permissions), or choose another output."]
    result = CliRunner().invoke(run, ["/data/seg.zarr"])
    assert result.exit_code == 5 and "cannot write /data/seg.zarr/0/0.0.0: the disk quota is exceeded" in result.output
    assert "--resume" in result.output


def test_an_unfinished_convert_is_refused_as_input(tmp_path, small_mrc, identity_model):
    tomo = str(tmp_path / "tomo.zarr")
    assert tileseg("-q", "convert", small_mrc, tomo).returncode == 0
    group = zarr.open_group(tomo, mode="r+")
    group.attrs["tilesegment"] = {**group.attrs["tilesegment"], "status": "incomplete"}  # as a stopped convert leaves it
    assert_one_line_error(tileseg("run", tomo, str(tmp_path / "seg.zarr"), "--model", identity_model, "--tile", "16"), 3,
                          "an unfinished 'tileseg convert' of tomo.mrc", "--overwrite")
    # converting again says what is there, too
    assert_one_line_error(tileseg("convert", small_mrc, tomo), 5, "already exists: an unfinished 'tileseg convert' or run of", "--overwrite")


@pytest.fixture
def small_mrc(tmp_path):
    return write_mrc(tmp_path / "tomo.mrc", random_volume((24, 24, 24)))


def test_bad_input_gets_one_line_and_an_exit_code(tmp_path, small_mrc):
    out = str(tmp_path / "out.zarr")
    assert_one_line_error(tileseg("run", str(tmp_path / "nope.mrc"), out), 3, "no such file")
    (tmp_path / "notes.txt").write_text("not a tomogram\n" * 200)
    assert_one_line_error(tileseg("run", str(tmp_path / "notes.txt"), out), 3, "not an MRC file")
    assert_one_line_error(tileseg("run", small_mrc, out, "--tile", "18"), 2, "--tile 20")
    assert_one_line_error(tileseg("run", small_mrc, out, "--overlap", "1.5"), 2, "overlap")
    assert_one_line_error(tileseg("run", small_mrc, out, "--ngff", "0.5", "--shard", "100"), 2,
                          "--shard 100 is not a multiple of --chunk 64", "--shard 128")
    assert_one_line_error(tileseg("run", small_mrc, out, "--model", str(tmp_path / "missing.safetensors")), 4, "does not exist")
    assert_one_line_error(tileseg("run", small_mrc, out, "--scheduler", "tcp://127.0.0.1:9"), 6, "--scheduler")
    far = write_mrc(tmp_path / "far.mrc", random_volume((24, 24, 24)), voxel=4.0)
    assert_one_line_error(tileseg("run", far, out), 3, "voxel size", "--ignore-voxel-size")
    assert_one_line_error(tileseg("run", small_mrc, out, "--chunk", "0"), 2, "--chunk '0' is not a size", "32,64,64")
    assert_one_line_error(tileseg("run", small_mrc, out, "--tile", "16x16"), 2, "--tile '16x16' is not a size")
    assert_one_line_error(tileseg("convert", small_mrc, out, "--ngff", "0.5", "--shard", "a"), 2, "--shard 'a'")
    assert_one_line_error(tileseg("simulate", str(tmp_path / "sim"), "--shape", "-8"), 2, "--shape '-8'")
    assert_one_line_error(tileseg("run", small_mrc, out, "--workers", "0"), 2, "--workers 0 must be at least 1")
    # a batch whose forward this machine's memory cannot hold: refused before the run (it ended in an internal error)
    assert_one_line_error(tileseg("run", small_mrc, out, "--tile", "1000"), 2, "--tile 1000 with --batch 4", "GiB", "fits at --batch 4")
    # the simulation's settings are named as the options that set them, not as SimulationConfig's fields
    assert_one_line_error(tileseg("simulate", str(tmp_path / "sim"), "--tilt-range", "95"), 2, "--tilt-range 95.0 is outside (0, 90]")
    assert_one_line_error(tileseg("simulate", str(tmp_path / "sim"), "--voltage", "-1"), 2, "--voltage -1.0 must be a positive number")
    assert_one_line_error(tileseg("train", str(tmp_path / "t.safetensors"), "--simulate", "1", "--templates", "1bxn", "--hold-out", "1bxn"), 2,
                          "--hold-out 1bxn leaves none of the complexes")
    # options the command body parses itself (click.BadParameter there): one line too, not an internal error
    assert_one_line_error(tileseg("train", str(tmp_path / "t.safetensors"), "--simulate", "1", "--channels", "x"), 2, "--channels 'x'")
    assert_one_line_error(tileseg("preview", str(tmp_path / "nothing.zarr"), str(tmp_path / "p.png"), "--position", "a"), 2, "--position")
    model = str(tmp_path / "m.safetensors")
    assert_one_line_error(tileseg("train", model, "--simulate", "1", "--steps", "0"), 2, "--steps 0 must be at least 1")
    assert_one_line_error(tileseg("train", model, "--simulate", "1", "--validation", "0"), 2, "--validation 0 must be at least 1")
    assert_one_line_error(tileseg("train", model, "--simulate", "1", "--shape", "32", "--crop", "64"), 2,
                          "--crop 64 is larger than every training tomogram", "--crop 32")
    assert_one_line_error(tileseg("convert", small_mrc, out, "--levels", "7"), 2, "--levels 7 is more than a 24×24×24 volume has", "at most 6")
    # a folder that is no Zarr store: the tomograms in it are named
    os.makedirs(tmp_path / "data")
    write_mrc(tmp_path / "data" / "tomo_a.mrc", random_volume((8, 8, 8)))
    assert_one_line_error(tileseg("run", str(tmp_path / "data"), out), 3, "a folder, but not a Zarr store", "tomo_a.mrc")
    assert not os.path.exists(out)  # nothing half-written left behind by refused runs


def test_files_a_command_writes_are_checked_before_its_work(tmp_path, small_mrc):
    """A folder of the output's name or a missing folder is refused up front (train used to train for
    minutes, then end in an internal error and lose the model); a folder given as convert's INPUT.mrc
    gets tileseg's one line, saying what it is."""
    os.makedirs(tmp_path / "taken.png")
    missing = str(tmp_path / "no-such-folder" / "m.safetensors")
    assert_one_line_error(tileseg("train", missing, "--simulate", "1"), 5, "the folder", "does not exist")
    assert_one_line_error(tileseg("train", str(tmp_path / "taken.png"), "--simulate", "1"), 5, "is a directory", "model.safetensors")
    assert_one_line_error(tileseg("preview", str(tmp_path / "nothing.zarr"), str(tmp_path / "taken.png")), 5, "is a directory", "preview.png")
    assert not os.path.exists(tmp_path / "no-such-folder")
    out = str(tmp_path / "out.zarr")
    assert_one_line_error(tileseg("convert", str(tmp_path / "taken.png"), out), 3, "is a folder, not an MRC file")
    assert tileseg("convert", small_mrc, str(tmp_path / "in.zarr")).returncode == 0
    assert_one_line_error(tileseg("convert", str(tmp_path / "in.zarr"), out), 3, "is a Zarr store", "tileseg run")
    assert_one_line_error(tileseg("status", str(tmp_path / "in.zarr")), 3, "is a tomogram 'tileseg convert' made from", "not a segmentation")
    # an anisotropic voxel is said as it is (the summary said the x size alone)
    flat = write_mrc(tmp_path / "flat.mrc", random_volume((16, 24, 24)), voxel=(10.0, 10.0, 20.0))
    summary = tileseg("convert", flat, str(tmp_path / "flat.zarr"), "--levels", "1")
    assert summary.returncode == 0 and "20×10×10 Å/voxel (z, y, x), 1 level," in summary.stdout, summary.stdout
    assert not os.path.exists(out)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_refused(tmp_path, small_mrc):
    assert_one_line_error(tileseg("run", small_mrc, str(tmp_path / "o.zarr"), "--device", "cuda"), 6, "no CUDA GPU")


def test_output_is_never_overwritten_or_put_inside_the_input(tmp_path, small_mrc):
    os.makedirs(tmp_path / "exists.zarr")
    assert_one_line_error(tileseg("run", small_mrc, str(tmp_path / "exists.zarr")), 5, "--overwrite")
    notes = tmp_path / "notes.txt"  # a file as OUTPUT: refused before the cluster starts (one line, no dashboard), and kept
    notes.write_text("keep me")
    assert_one_line_error(tileseg("run", small_mrc, str(notes), "--overwrite"), 5, "is a file, not a Zarr store")
    assert notes.read_text() == "keep me"
    write_mrc(tmp_path / "in.mrc", random_volume((24, 24, 24)))
    assert tileseg("convert", str(tmp_path / "in.mrc"), str(tmp_path / "in.zarr")).returncode == 0
    assert_one_line_error(tileseg("run", str(tmp_path / "in.zarr"), str(tmp_path / "in.zarr" / "seg.zarr")), 2, "inside the input")


@pytest.mark.slow
def test_demo_runs_the_whole_job_on_an_embedded_cluster(tmp_path):
    result = tileseg("demo", "demo", "--size", "48", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote demo/segmentation.zarr" in result.stdout and "IoU against the simulation's ground truth" in result.stdout
    seg = zarr.open_group(str(tmp_path / "demo" / "segmentation.zarr"), mode="r")
    assert seg.attrs["tilesegment"]["status"] == "complete"
    assert seg["0"].shape == (48, 48, 48) and seg["0"].dtype == np.uint8
    tomo = zarr.open_group(str(tmp_path / "demo" / "tomogram.zarr"), mode="r")
    assert tomo["0"].shape == (48, 48, 48)


def test_a_tomogram_at_another_voxel_size_is_resampled_by_convert_and_then_segments(tmp_path, identity_model):
    portal = write_mrc(tmp_path / "portal.mrc", random_volume((20, 24, 24)), voxel=13.48)
    refused = tileseg("run", portal, str(tmp_path / "seg.zarr"), "--model", identity_model)
    assert_one_line_error(refused, 3, "1.35× the model's 10 Å", f"'tileseg convert {portal} TOMO.zarr --voxel-size 10'")
    converted = tileseg("convert", portal, str(tmp_path / "tomo.zarr"), "--voxel-size", "10", "--levels", "1")
    assert converted.returncode == 0, converted.stderr
    assert "27×32×32 float32, 10 Å/voxel (resampled from 13.48 Å), 1 level," in converted.stdout, converted.stdout
    assert_one_line_error(tileseg("convert", portal, str(tmp_path / "t.zarr"), "--voxel-size", "0"), 2, "--voxel-size 0.0 is not a voxel size")
    run = tileseg("-q", "run", str(tmp_path / "tomo.zarr"), str(tmp_path / "seg.zarr"), "--model", identity_model, "--tile", "16")
    assert run.returncode == 0, run.stderr
    assert zarr.open_group(str(tmp_path / "seg.zarr"), mode="r")["0"].shape == (27, 32, 32)
    back = tileseg("export", str(tmp_path / "seg.zarr"), str(tmp_path / "mask.mrc"), "--original-grid")
    assert back.returncode == 0, back.stderr
    assert "mask.mrc: 20×24×24 (z, y, x), 13.48×13.48×13.48 Å/voxel" in back.stdout, back.stdout
    with mrcfile.open(tmp_path / "mask.mrc") as mrc:
        assert mrc.data.shape == (20, 24, 24)
    # the run's own tomogram was not resampled
    plain = tileseg("-q", "run", portal, str(tmp_path / "seg2.zarr"), "--model", identity_model, "--tile", "16", "--ignore-voxel-size")
    assert plain.returncode == 0, plain.stderr
    assert_one_line_error(tileseg("export", str(tmp_path / "seg2.zarr"), str(tmp_path / "m.mrc"), "--original-grid"), 2,
                          "was not segmented from a tomogram that 'tileseg convert --voxel-size' resampled", "Leave out --original-grid")

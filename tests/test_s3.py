"""Object stores: INPUT and OUTPUT as ``s3://`` URLs, against a local S3 server (moto) on 127.0.0.1.

The server runs in this process; the endpoint and fake credentials reach ``tileseg`` subprocesses and
Dask workers (threads or processes) through the standard AWS environment variables, as they would
on a real cluster. Every result is compared with the same run on local files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid

import mrcfile
import numpy as np
import pytest
import zarr

from tilesegment import lock as lock_module
from tilesegment.convert import convert
from tilesegment.errors import InputError, OptionError, OutputError
from tilesegment.export import export
from tilesegment.geometry import Box
from tilesegment.journal import BlockJournal
from tilesegment.lock import OutputLock, lock_holder, lock_path
from tilesegment.mrc import inspect_mrc, read_mrc_region
from tilesegment.output import describe_output
from tilesegment.pipeline import segment
from tilesegment.storage import filesystem, zarr_store

from .conftest import process_holding_lock, mrc_file, random_volume, write_mrc
from .test_cli import TILESEG, assert_one_line_error, tileseg
from .test_reliability import assert_same_output, wait_for_blocks

pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")
pytest.importorskip("s3fs", reason="the S3 tests need s3fs")

BUCKET = "tileseg-test"
SHAPE = (32, 28, 36)  # 2 x 2 x 3 blocks: a local S3 server takes ~20 ms a request, so few chunks
SETTINGS = dict(tile=16, chunk=16, block=16, probabilities=True, probability_dtype="float32")
OPTIONS = ["--tile", "16", "--chunk", "16", "--block", "16", "--probabilities", "--probability-dtype", "float32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with


def close_fs_sessions() -> None:
    """Close the HTTP sessions of the S3 filesystems this process made, on the loops they run on.
    Dropped unclosed, a session's finaliser may run only at exit, when its loop has stopped, and
    aiohttp then reports an unclosed client session."""
    import s3fs
    import zarr.core.sync
    from fsspec.asyn import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        session = getattr(fs, "_s3", None)
        if session is None:
            continue
        with contextlib.suppress(Exception):  # hygiene only: a session that cannot be closed here is left as before
            if fs.asynchronous:  # made by zarr's FsspecStore: its session lives on zarr's loop
                zarr.core.sync.sync(session.__aexit__(None, None, None))
            else:
                sync(fs.loop, session.__aexit__, None, None, None)
            fs._s3 = None


@pytest.fixture(scope="module")
def s3():
    """A local S3 server with one bucket; the environment points every client (and child process) at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith(("AWS_", "FSSPEC_S3"))]:
            mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        clear_fs_cache()
        fs, _ = filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield port
        close_fs_sessions()
        clear_fs_cache()
    server.stop()


@pytest.fixture
def prefix(s3) -> str:
    """A fresh folder in the bucket for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


def upload(local: str, url: str) -> str:
    fs, key = filesystem(url)
    fs.put_file(local, key)
    return url


def settle(client, timeout: float = 60) -> None:
    """Wait until no task is running on any worker, cancelled ones included."""
    deadline = time.time() + timeout
    while sum(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()) and time.time() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory):
    return write_mrc(tmp_path_factory.mktemp("s3") / "tomo.mrc", random_volume(SHAPE, seed=5))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tomogram, small_net, client):
    out = str(tmp_path_factory.mktemp("s3ref") / "reference.zarr")
    segment(tomogram, out, model=small_net, client=client, **SETTINGS)
    return out


# ---- the main job on S3 -------------------------------------------------------------------------

def test_convert_to_s3_then_run_on_s3_gives_the_labels_of_local_files(tmp_path, prefix, tomogram, small_net, client, reference):
    convert(tomogram, f"{prefix}/tomo.zarr")
    local = str(tmp_path / "tomo.zarr")
    convert(tomogram, local)
    converted = zarr.open_group(zarr_store(f"{prefix}/tomo.zarr"), mode="r")
    np.testing.assert_array_equal(converted["0"][:], zarr.open_group(local, mode="r")["0"][:])
    assert converted.attrs["multiscales"] == zarr.open_group(local, mode="r").attrs["multiscales"]

    segment(f"{prefix}/tomo.zarr", f"{prefix}/seg.zarr", model=small_net, client=client, **SETTINGS)
    assert_same_output(f"{prefix}/seg.zarr", reference)
    with pytest.raises(OutputError, match="--overwrite"):
        segment(f"{prefix}/tomo.zarr", f"{prefix}/seg.zarr", model=small_net, client=client, **SETTINGS)
    for inside in (f"{prefix}/tomo.zarr/seg.zarr", f"{prefix.replace('s3://', 'S3://')}//tomo.zarr/./0"):
        with pytest.raises(OptionError, match="inside the input"):
            segment(f"{prefix}/tomo.zarr/", inside, model=small_net, client=client)


@pytest.mark.slow
def test_tileseg_run_from_s3_to_s3(tmp_path, prefix, tomogram, small_net, reference):
    """The command line end to end: its embedded worker (a thread of the tileseg process) reads and writes S3."""
    assert tileseg("convert", tomogram, f"{prefix}/tomo.zarr").returncode == 0
    result = tileseg("run", f"{prefix}/tomo.zarr", f"{prefix}/seg.zarr", "--model", small_net, *OPTIONS)
    assert result.returncode == 0, result.stderr
    assert_same_output(f"{prefix}/seg.zarr", reference, exact=False)
    status = tileseg("status", f"{prefix}/seg.zarr")
    assert status.returncode == 0 and "complete" in status.stdout
    assert_one_line_error(tileseg("run", f"{prefix}/tomo.zarr", f"{prefix}/seg.zarr", "--model", small_net, *OPTIONS), 5, "--overwrite")


def test_an_mrc_on_s3_is_read_by_byte_ranges_like_a_local_file(tmp_path, prefix):
    volume = random_volume((20, 36, 44), seed=3).astype(">f4")  # big-endian, with an extended header
    local = mrc_file(tmp_path / "t.mrc", volume, ext=np.zeros(7, dtype="S10"), origin=(1.0, 2.0, 3.0))
    url = upload(local, f"{prefix}/t.mrc")
    info, expected = inspect_mrc(url), inspect_mrc(local)
    assert info.path == url and dataclasses.replace(info, path=local) == expected
    for box in [Box((0, 0, 0), (20, 36, 44)), Box((3, 5, 0), (9, 30, 44)), Box((2, 4, 7), (11, 9, 12)), Box((19, 35, 43), (20, 36, 44)),
                Box((0, 0, 20), (20, 36, 21))]:
        np.testing.assert_array_equal(read_mrc_region(info, box), read_mrc_region(expected, box))


def test_nearby_rows_of_an_mrc_object_are_fetched_as_one_range(tmp_path, prefix, monkeypatch):
    from tilesegment import mrc

    url = upload(write_mrc(tmp_path / "t.mrc", random_volume((10, 30, 40))), f"{prefix}/t.mrc")
    info = inspect_mrc(url)
    fs, _ = filesystem(url)  # the same (cached) instance the reader gets
    ranges = []
    original = fs.cat_ranges

    def counting(paths, starts, ends, **kwargs):
        ranges.extend(zip(starts, ends))
        return original(paths, starts, ends, **kwargs)

    monkeypatch.setattr(fs, "cat_ranges", counting)
    narrow = Box((2, 3, 5), (6, 20, 9))  # 4 planes x 17 rows of 16 bytes, 160 bytes apart
    expected = read_mrc_region(inspect_mrc(tmp_path / "t.mrc"), narrow)
    np.testing.assert_array_equal(read_mrc_region(info, narrow), expected)
    assert len(ranges) == 1  # one request, not 68
    ranges.clear()
    monkeypatch.setattr(mrc, "MAX_GAP", 0)
    np.testing.assert_array_equal(read_mrc_region(info, narrow), expected)
    assert len(ranges) == 4 * 17


def test_mrc_validation_errors_are_the_same_for_objects(tmp_path, prefix):
    short = tmp_path / "short.mrc"
    short.write_bytes(b"x" * 100)
    text = tmp_path / "notes.mrc"
    text.write_text("not a tomogram\n" * 200)
    full = write_mrc(tmp_path / "full.mrc", random_volume((8, 8, 8)))
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(open(full, "rb").read()[:-100])
    for local in (short, text, truncated):
        url = upload(str(local), f"{prefix}/{local.name}")
        with pytest.raises(InputError) as remote:
            inspect_mrc(url)
        with pytest.raises(InputError) as here:
            inspect_mrc(local)
        assert remote.value.message.replace(url, "PATH") == here.value.message.replace(str(local), "PATH")
    with pytest.raises(InputError, match="no such file"):
        inspect_mrc(f"{prefix}/missing.mrc")


def test_a_tomogram_zarr_on_s3_is_resampled_as_the_local_mrc_is(tmp_path, prefix):
    """The portal's case: an OME-Zarr tomogram in a bucket at 13.48 Å, resampled to 10 Å on the way in."""
    local = write_mrc(tmp_path / "portal.mrc", random_volume((20, 24, 28), seed=9), voxel=13.48)
    convert(local, f"{prefix}/portal.zarr", chunk=16)
    convert(f"{prefix}/portal.zarr", tmp_path / "from_s3.zarr", chunk=16, voxel_size=10.0)
    convert(local, tmp_path / "from_mrc.zarr", chunk=16, voxel_size=10.0)
    a, b = (np.asarray(zarr.open_array(str(tmp_path / name / "0"), mode="r")[:]) for name in ("from_s3.zarr", "from_mrc.zarr"))
    assert a.shape == (27, 32, 38)
    np.testing.assert_array_equal(a, b)


def test_a_compressed_mrc_on_s3_converts_like_the_local_file(tmp_path, prefix, monkeypatch):
    """The .mrc.gz object is streamed through gzip into a temporary copy: in the system's temporary
    folder for an output in the store, beside a local output; the copy is gone afterwards."""
    import gzip
    import tempfile

    volume = random_volume((20, 24, 28), seed=8)
    local = write_mrc(tmp_path / "tomo.mrc", volume)
    packed = tmp_path / "tomo.mrc.gz"
    packed.write_bytes(gzip.compress(open(local, "rb").read()))
    url = upload(str(packed), f"{prefix}/tomo.mrc.gz")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    convert(url, f"{prefix}/tomo.zarr", chunk=16, levels=2)
    convert(url, tmp_path / "here.zarr", chunk=16, levels=2)
    for i in range(2):
        expected = np.asarray(zarr.open_array(str(tmp_path / "here.zarr" / str(i)), mode="r")[:])
        np.testing.assert_array_equal(np.asarray(zarr.open_array(zarr_store(f"{prefix}/tomo.zarr/{i}"), mode="r")[:]), expected)
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(tmp_path / "here.zarr" / "0"), mode="r")[:]), volume)
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here.zarr", "scratch", "tomo.mrc", "tomo.mrc.gz"]


@pytest.fixture(scope="module")
def mrc_run(s3, tomogram, small_net, client) -> tuple[str, str]:
    """``(s3://…/tomo.mrc, s3://…/seg.zarr)``: the MRC uploaded and segmented from S3 to S3."""
    url = upload(tomogram, f"s3://{BUCKET}/mrc-run/tomo.mrc")
    segment(url, f"s3://{BUCKET}/mrc-run/seg.zarr", model=small_net, client=client, **SETTINGS)
    return url, f"s3://{BUCKET}/mrc-run/seg.zarr"


def test_an_mrc_input_on_s3_segments_like_the_local_file(mrc_run, reference):
    url, out = mrc_run
    assert_same_output(out, reference)
    info = zarr.open_group(zarr_store(out), mode="r").attrs["tilesegment"]
    assert info["input"] == url and info["run"]["input"] == url


def test_a_failed_run_on_s3_is_resumed_to_the_same_output(prefix, tomogram, small_net, client, reference, monkeypatch):
    from tilesegment import blocks

    src, out = upload(tomogram, f"{prefix}/tomo.mrc"), f"{prefix}/seg.zarr"
    read = blocks.read_volume

    def failing_storage(source, box):  # the blocks at the far end of z cannot be read
        if box.stop[0] >= SHAPE[0]:
            raise OSError("injected: storage went away")
        return read(source, box)

    monkeypatch.setattr(blocks, "read_volume", failing_storage)
    with pytest.raises(OSError, match="injected"):
        segment(src, out, model=small_net, client=client, **SETTINGS)
    settle(client)  # blocks already running when the run failed still finish (threads cannot be interrupted)
    monkeypatch.setattr(blocks, "read_volume", read)
    done = set(BlockJournal(out).done())
    status = describe_output(out)
    assert not status.complete and status.blocks_done == len(done) and 0 < len(done) < status.blocks
    assert status.writer is None and lock_holder(out) is None  # the failed run released its lock
    with pytest.raises(OutputError, match="--resume.*--overwrite"):
        segment(src, out, model=small_net, client=client, **SETTINGS)
    report = segment(src, out, model=small_net, client=client, resume=True, **SETTINGS)
    assert report.extra["resumed_blocks"] == len(done)
    assert_same_output(out, reference)


def test_export_and_preview_read_a_segmentation_on_s3(tmp_path, mrc_run, reference):
    from tilesegment.preview import preview

    src, out = mrc_run
    result = tileseg("export", out, str(tmp_path / "mask.mrc"))
    assert result.returncode == 0, result.stderr
    export(reference, tmp_path / "local.mrc")
    with mrcfile.open(tmp_path / "mask.mrc") as mask, mrcfile.open(tmp_path / "local.mrc") as local:
        np.testing.assert_array_equal(mask.data, local.data)
        assert mask.voxel_size == local.voxel_size
    report = preview(out, tmp_path / "p.png")
    assert report.tomogram == src and report.note is None  # the recorded input, found on S3
    assert os.path.getsize(tmp_path / "p.png") > 0


def test_overwrite_on_s3_replaces_only_the_output(prefix, tomogram, identity_model, client):
    out = f"{prefix}/seg.zarr"
    fs, key = filesystem(out)
    fs.pipe_file(f"{key}-sibling/keep", b"x")  # shares the output's name as a prefix, not its folder
    segment(tomogram, out, model=identity_model, tile=16, client=client)
    fs.pipe_file(f"{key}/stray", b"x")
    segment(tomogram, out, model=identity_model, tile=16, client=client, overwrite=True)
    assert fs.exists(f"{key}-sibling/keep") and not fs.exists(f"{key}/stray")
    assert zarr.open_group(zarr_store(out), mode="r").attrs["tilesegment"]["status"] == "complete"


# ---- bad URLs: one line, the right exit code -------------------------------------------------------

@pytest.fixture
def reconfigure(s3):
    """Change the S3 environment for one test (then call ``clear_fs_cache``); instances made meanwhile are closed and forgotten after."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp
    close_fs_sessions()
    clear_fs_cache()


def test_bad_urls_get_one_clear_error(tmp_path, prefix, tomogram, identity_model, client):
    assert_one_line_error(tileseg("run", "s3://no-such-bucket/tomo.zarr", str(tmp_path / "out.zarr")), 3,
                          "s3://no-such-bucket/tomo.zarr: no such file", "AWS_ENDPOINT_URL")
    for missing in ("s3://no-such-bucket/tomo.zarr", f"{prefix}/missing.mrc", f"{prefix}/missing.zarr"):
        with pytest.raises(InputError, match="no such file"):
            segment(missing, str(tmp_path / "out.zarr"), model=identity_model, client=client)
    with pytest.raises(OutputError, match="s3://no-such-bucket/seg.zarr.*bucket does not exist"):
        segment(tomogram, "s3://no-such-bucket/seg.zarr", model=identity_model, tile=16, client=client)
    with pytest.raises(OutputError, match="cannot create s3://no-such-bucket/tomo.zarr.*bucket"):
        convert(tomogram, "s3://no-such-bucket/tomo.zarr")
    with pytest.raises(InputError, match="no such file"):
        export("s3://no-such-bucket/seg.zarr", tmp_path / "m.mrc")
    assert not os.path.exists(tmp_path / "out.zarr")


def test_missing_credentials_get_one_clear_error(tmp_path, prefix, tomogram, identity_model, client, reconfigure):
    url = upload(tomogram, f"{prefix}/tomo.mrc")
    reconfigure.delenv("AWS_ACCESS_KEY_ID")
    reconfigure.delenv("AWS_SECRET_ACCESS_KEY")
    clear_fs_cache()
    with pytest.raises(InputError, match=f"{url}: cannot be read: no credentials were found.*AWS_ACCESS_KEY_ID"):
        segment(url, str(tmp_path / "out.zarr"), model=identity_model, client=client)
    with pytest.raises(OutputError, match="no credentials were found"):
        segment(tomogram, f"{prefix}/seg.zarr", model=identity_model, tile=16, client=client)


@pytest.mark.slow
def test_bad_urls_on_the_command_line(tmp_path, prefix, tomogram, identity_model):
    local_out = str(tmp_path / "out.zarr")
    assert_one_line_error(tileseg("run", f"{prefix}/missing.mrc", local_out), 3, "no such file", "AWS_ENDPOINT_URL")
    assert_one_line_error(tileseg("run", tomogram, "s3://no-such-bucket/seg.zarr", "--model", identity_model, "--tile", "16"), 5,
                          "s3://no-such-bucket/seg.zarr", "bucket")
    assert_one_line_error(tileseg("convert", tomogram, "s3://no-such-bucket/tomo.zarr"), 5, "no-such-bucket")
    assert_one_line_error(tileseg("export", "s3://no-such-bucket/seg.zarr", str(tmp_path / "m.mrc")), 3, "no such file")
    url = upload(tomogram, f"{prefix}/tomo.mrc")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        environment = {**os.environ, "CI": "1", **env}
        for name in [k for k, v in env.items() if not v]:
            del environment[name]
        return subprocess.run([*TILESEG, *args], capture_output=True, text=True, env=environment, timeout=120)

    anonymous = dict(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    assert_one_line_error(run("run", url, local_out, **anonymous), 3, "no credentials", "AWS_ACCESS_KEY_ID")
    assert_one_line_error(run("run", tomogram, f"{prefix}/seg.zarr", "--model", identity_model, "--tile", "16", **anonymous), 5,
                          "no credentials")
    unreachable = dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1")
    assert_one_line_error(run("run", url, local_out, **unreachable), 3, "cannot be reached", "AWS_ENDPOINT_URL")
    assert not os.path.exists(local_out)


# ---- one writer per output, without locks in the store ------------------------------------------

def test_the_lock_object_refuses_a_second_writer_and_is_removed_on_release(prefix):
    out = f"{prefix}/seg.zarr"
    with OutputLock(out):
        assert lock_holder(out)["pid"] == os.getpid()
        with pytest.raises(OutputError, match=f"being written by another tileseg run \\(pid {os.getpid()}"):
            OutputLock(out).acquire()
    assert lock_holder(out) is None
    fs, key = filesystem(lock_path(out))
    assert lock_path(out) == f"{out}.lock" and not fs.exists(key)


def test_a_killed_holder_on_this_machine_leaves_no_stale_lock(prefix):
    out = f"{prefix}/seg.zarr"
    with process_holding_lock(out) as holder:
        assert lock_holder(out)["pid"] == holder.pid
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            OutputLock(out).acquire()
    fs, key = filesystem(lock_path(out))
    assert fs.exists(key)  # nobody removed the object ...
    assert lock_holder(out) is None  # ... but its owner is gone: it is stale at once
    with OutputLock(out):
        assert lock_holder(out)["pid"] == os.getpid()


def test_a_lock_from_another_machine_holds_until_it_is_not_renewed(prefix, monkeypatch):
    out = f"{prefix}/seg.zarr"
    fs, key = filesystem(lock_path(out))
    owner = {"pid": 4242, "host": "elsewhere", "boot": "x", "pidns": 1, "started": time.time(), "stale_s": 2}
    fs.pipe_file(key, json.dumps(owner).encode())
    with pytest.raises(OutputError, match="pid 4242 on elsewhere.*expires 2 s after its last renewal"):
        OutputLock(out).acquire()
    assert lock_holder(out)["host"] == "elsewhere"
    time.sleep(3.2)  # the store's clock has whole seconds
    assert lock_holder(out) is None
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.2)
    lock = OutputLock(out)
    lock.acquire()
    try:
        first = fs.info(key)["ETag"]
        time.sleep(1.0)
        assert fs.info(key)["ETag"] != first  # renewed while held
        lock.check()
        fs.pipe_file(key, json.dumps({**owner, "started": time.time()}).encode())  # another run took it over
        time.sleep(1.0)
        with pytest.raises(OutputError, match="lost the lock"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(fs.cat_file(key))["host"] == "elsewhere"  # the new owner's lock is left alone


# ---- processes: workers and a killed run ----------------------------------------------------------

@pytest.mark.slow
def test_two_worker_processes_reach_the_store(prefix, tomogram, small_net, reference):
    """The embedded cluster's worker processes get the endpoint and credentials from the environment."""
    src = upload(tomogram, f"{prefix}/tomo.mrc")
    segment(src, f"{prefix}/seg.zarr", model=small_net, workers=2, **SETTINGS)
    assert_same_output(f"{prefix}/seg.zarr", reference, exact=False)


@pytest.mark.slow
def test_resume_on_s3_after_sigkill_of_the_whole_run(tmp_path, prefix, small_net, client):
    src = upload(write_mrc(tmp_path / "big.mrc", random_volume((64, 64, 64), seed=8)), f"{prefix}/big.mrc")
    out = f"{prefix}/seg.zarr"
    options = ["--model", small_net, *OPTIONS]
    proc = subprocess.Popen([*TILESEG, "run", src, out, *options], env={**os.environ, "CI": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_blocks(out, 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean-up runs: the lock object and the journal stay behind
    proc.wait()
    done = set(BlockJournal(out).done())
    assert 5 <= len(done) < 4**3, "the run finished before it was killed; make the volume bigger"
    result = tileseg("status", out)
    assert result.returncode == 1 and "no run is writing it" in result.stdout
    result = tileseg("run", src, out, *options, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed: {len(done)} of {4**3} blocks" in result.stdout
    reference = str(tmp_path / "reference.zarr")
    segment(str(tmp_path / "big.mrc"), reference, model=small_net, client=client, **SETTINGS)
    assert_same_output(out, reference, exact=False)

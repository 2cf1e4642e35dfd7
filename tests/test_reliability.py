"""Crashes, lost workers, second writers: the output is finished correctly or refused, never mixed.

Resume and worker-loss tests compare against an undisturbed run of the same settings."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import zarr

from tilesegment.blocks import process_block
from tilesegment.errors import OptionError, OutputError
from tilesegment.journal import BlockJournal
from tilesegment.plan import BlockPlan
from tilesegment.lock import OutputLock, lock_holder, lock_path
from tilesegment.output import describe_output
from tilesegment.pipeline import segment
from tilesegment.storage import exists, join, zarr_store

from .conftest import process_holding_lock, random_volume, write_mrc
from .test_cli import TILESEG, assert_one_line_error, tileseg
from .test_cluster import dask_cluster

SETTINGS = dict(tile=16, chunk=8, block=16, probabilities=True, probability_dtype="float32")


def arrays(path: str, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(zarr_store(path), mode="r")
    return np.asarray(group[str(level)][:]), np.asarray(group[f"probabilities/{level}"][:])


def assert_same_output(path: str, reference: str, exact: bool = True) -> None:
    """Same labels and probabilities as ``reference`` at every pyramid level, complete, and no journal
    or lock left (local or URL)."""
    levels = len(list(zarr.open_group(zarr_store(reference), mode="r").array_keys()))
    for level in range(levels):
        (labels, probs), (ref_labels, ref_probs) = arrays(path, level), arrays(reference, level)
        np.testing.assert_array_equal(labels, ref_labels)
        if exact:
            np.testing.assert_array_equal(probs, ref_probs)
        else:  # another process tree may use other thread counts: float sums in another order
            np.testing.assert_allclose(probs, ref_probs, atol=1e-6)
    group = zarr.open_group(zarr_store(path), mode="r")
    assert group.attrs["tilesegment"]["status"] == "complete" and "multiscales" in group.attrs
    assert not exists(join(path, ".tilesegment-journal")) and not exists(lock_path(path))


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def chunk_hashes(array: str) -> dict[str, str]:
    return {os.path.join(root, name): sha256(os.path.join(root, name))
            for root, _, names in os.walk(array) for name in names if not name.startswith(".")}


@pytest.fixture
def tomogram(tmp_path):
    return write_mrc(tmp_path / "tomo.mrc", random_volume((48, 40, 44), seed=5))


@pytest.fixture
def reference(tmp_path, tomogram, small_net, client):
    out = str(tmp_path / "reference.zarr")
    segment(tomogram, out, model=small_net, client=client, **SETTINGS)
    return out


# ---- the journal and the lock -------------------------------------------------------------------

def test_journal_records_counts_and_pieces_atomically(tmp_path):
    journal = BlockJournal(str(tmp_path / "out.zarr"))
    assert journal.counts((0, 1, 2)) is None and list(journal.done()) == []
    piece = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    journal.record((0, 1, 2), (5, 100, 7), {(1, 0, 0): piece})
    journal.record((3, 0, 0), (0, 8, 0), {})
    assert journal.counts((0, 1, 2)) == (5, 100, 7)
    np.testing.assert_array_equal(journal.piece((0, 1, 2), (1, 0, 0)), piece)
    assert sorted(journal.done()) == [(0, 1, 2), (3, 0, 0)]
    assert not [n for n in os.listdir(journal.directory) if n.endswith(".partial")]
    journal.remove()
    assert list(journal.done()) == []


def test_a_record_is_the_npz_numpy_would_write(tmp_path):
    """Records are written by hand (one copy of each piece, not np.savez's two): strided views, other
    dtypes and empty pieces come back equal, and np.savez's file of the same arrays has the same members."""
    journal = BlockJournal(str(tmp_path / "out.zarr"))
    acc = np.random.default_rng(0).random((3, 9, 8, 7), dtype=np.float32)
    pieces = {(1, 0, 0): acc[:, 6:], (0, 1, 1): acc[:, :, 5:, 4:], (0, 0, 1): np.zeros((3, 0, 8, 2), np.float32),
              (1, 1, 1): np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]}
    journal.record((0, 0, 0), (4, 504, 17), pieces)
    for offset, piece in pieces.items():
        got = journal.piece((0, 0, 0), offset)
        assert got.dtype == piece.dtype and got.shape == piece.shape
        np.testing.assert_array_equal(got, piece)
    np.savez(tmp_path / "numpy.npz", result=np.array([4, 504, 17]), **{"piece-" + "".join(map(str, k)): v for k, v in pieces.items()})
    with np.load(tmp_path / "numpy.npz") as expected:
        assert sorted(journal.members((0, 0, 0))) == sorted(expected.files)
    # pieces are read in place (one positioned read, no zipfile reader): a damaged record is refused
    damaged = bytearray(open(journal.path((0, 0, 0)), "rb").read())
    assert damaged[:4] == b"PK\x03\x04"  # the local header of the first member, piece (1, 0, 0)
    damaged[:4] = b"XXXX"
    open(journal.path((0, 0, 0)), "wb").write(bytes(damaged))
    with pytest.raises(ValueError, match="no zip member header"):
        journal.piece((0, 0, 0), (1, 0, 0))


def test_a_staged_record_is_invisible_until_committed_and_discarding_leaves_nothing(tmp_path):
    journal = BlockJournal(str(tmp_path / "out.zarr"))
    staged = journal.stage((1, 0, 0), (3, 64, 2), {(0, 0, 1): np.ones((2, 2, 2, 2), np.float32)})
    assert journal.counts((1, 0, 0)) is None and list(journal.done()) == []  # written, not yet done
    staged.commit()
    assert journal.counts((1, 0, 0)) == (3, 64, 2)
    journal.stage((2, 0, 0), (1, 8, 0), {}).discard()
    assert journal.counts((2, 0, 0)) is None
    assert sorted(os.listdir(journal.directory)) == [os.path.basename(journal.path((1, 0, 0)))]


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path / "seg.zarr")
    with process_holding_lock(out) as holder:
        assert lock_holder(out)["pid"] == holder.pid
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            OutputLock(out).acquire()
    assert lock_holder(out) is None  # the kernel dropped the dead process's lock
    with OutputLock(out):
        assert lock_holder(out)["pid"] == os.getpid()
    assert not os.path.exists(lock_path(out))


def test_tileseg_run_refuses_an_output_another_run_is_writing(tmp_path, tomogram, identity_model):
    out = str(tmp_path / "seg.zarr")
    with OutputLock(out):
        result = tileseg("run", tomogram, out, "--model", identity_model, "--tile", "16")
    assert_one_line_error(result, 5, "being written by another tileseg run", f"pid {os.getpid()}")
    assert not os.path.exists(out)


# ---- what a run does with what is already at OUTPUT ---------------------------------------------

def test_block_written_twice_gives_the_same_bytes(tmp_path, tomogram, small_net, client, reference, monkeypatch):
    """A retried or speculative block re-writes identical chunk files (and journal entry)."""
    from tilesegment import pipeline

    out = str(tmp_path / "twice.zarr")
    jobs = []
    original = pipeline.BlockJob
    monkeypatch.setattr(pipeline, "BlockJob", lambda *a, **k: jobs.append(original(*a, **k)) or jobs[-1])
    segment(tomogram, out, model=small_net, client=client, **SETTINGS)
    job = jobs[0]
    chunks = chunk_hashes(os.path.join(out, "0"))
    index = job.plan.sweep()[0]
    assert job.journal.counts(index) is None  # the finished run removed its journal
    result = process_block(job, index)  # with no neighbours' pieces needed for the first block
    assert job.journal.counts(index) == (result.tiles_forwarded, result.voxels_written, result.foreground_voxels)
    assert chunk_hashes(os.path.join(out, "0")) == chunks
    job.journal.remove()
    assert_same_output(out, reference)


def test_the_journal_keeps_pieces_only_until_every_block_that_takes_them_is_done(tmp_path, small_net, client, monkeypatch):
    """Disk stays bounded: a done block's record drops its pieces once its upper neighbours are done."""
    src = write_mrc(tmp_path / "long.mrc", random_volume((96, 40, 40), seed=8))  # 6 x 3 x 3 blocks of 16
    out = str(tmp_path / "seg.zarr")
    journal = BlockJournal(out)
    holding, dropped = [], []
    drop = BlockJournal.drop_pieces

    def watched(self, index):
        with_pieces = [i for i in self.done() if self.members(i) != ["result"]]
        holding.append(len(with_pieces))
        drop(self, index)
        dropped.append(tuple(index))

    monkeypatch.setattr(BlockJournal, "drop_pieces", watched)
    plan = BlockPlan.create((96, 40, 40), SETTINGS["tile"], 0.25, SETTINGS["chunk"], block=SETTINGS["block"])
    segment(src, out, model=small_net, client=client, **SETTINGS)
    assert sorted(dropped) == sorted(i for i in plan.indices() if plan.consumers(i))
    assert max(holding) <= 2 * 3 * 3  # about a plane of blocks (3 x 3) in the wavefront, not all 54
    assert not os.path.exists(journal.directory)


def test_a_block_whose_chunks_fail_to_write_leaves_no_record(tmp_path, tomogram, small_net, client, monkeypatch):
    """The record is staged while the chunks are written; a failed write must not make it visible."""
    from tilesegment import blocks, pipeline

    out = str(tmp_path / "fails.zarr")
    jobs = []
    original = pipeline.BlockJob
    monkeypatch.setattr(pipeline, "BlockJob", lambda *a, **k: jobs.append(original(*a, **k)) or jobs[-1])
    segment(tomogram, out, model=small_net, client=client, **SETTINGS)
    job, index = jobs[0], jobs[0].plan.sweep()[0]

    def full_disk(path, box, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blocks, "write_region", full_disk)
    with pytest.raises(OutputError, match=f"cannot write {out}: no space is left on the device.*--resume"):  # the user's to fix
        process_block(job, index)
    assert job.journal.counts(index) is None
    assert not os.path.exists(job.journal.directory) or not os.listdir(job.journal.directory)


def test_write_failures_say_what_to_fix():
    import errno

    from tilesegment.storage import write_failure

    quota = write_failure("/data/seg.zarr", OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert isinstance(quota, OutputError) and quota.exit_code == 5
    assert quota.message.startswith("cannot write /data/seg.zarr: the disk quota is exceeded. Free space")
    store = write_failure("s3://bucket/seg.zarr", PermissionError("Access Denied"))
    assert "access was denied (Access Denied)" in store.message and "AWS_ACCESS_KEY_ID" in store.message and "--resume" in store.message


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Data array contains NaN values")  # mrcfile, writing the NaN on purpose
def test_a_block_that_fails_on_a_worker_is_said_in_one_line(tmp_path, small_net):
    """Dask logs a failed task with its arguments and a traceback; at tileseg's usual verbosity the
    client's one line is all the user sees, from an in-process worker and from worker processes
    alike (a NaN between the voxels that the intensity statistics sample, every second one at
    256³, is found by the first block, which reads it)."""
    volume = random_volume((256, 256, 256), seed=3)
    volume[1, 1, 1] = np.nan
    tomo = write_mrc(tmp_path / "tomo.mrc", volume)
    for workers in ("1", "2"):
        result = tileseg("run", tomo, str(tmp_path / f"seg{workers}.zarr"), "--model", small_net, "--tile", "16", "--workers", workers)
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Dask dashboard:")]
        assert result.returncode == 3 and len(lines) == 1 and "NaN or infinite voxels in region [0:" in lines[0], result.stderr
    verbose = tileseg("-vv", "run", tomo, str(tmp_path / "seg3.zarr"), "--model", small_net, "--tile", "16")
    assert "Compute Failed" in verbose.stderr  # Dask's own record, at -vv


def test_a_failed_run_is_incomplete_refused_and_resumed_to_the_same_output(tmp_path, small_net, client, reference, tomogram,
                                                                           monkeypatch):
    """A run stopped by a read error in its last blocks keeps its finished blocks; once storage is
    back, --resume computes only the rest and the output equals an undisturbed run's."""
    from tilesegment import blocks

    src, out = tomogram, str(tmp_path / "seg.zarr")
    read = blocks.read_volume

    def failing_storage(source, box):  # the blocks at the far end of z cannot be read
        if box.stop[0] >= 48:
            raise OSError("injected: storage went away")
        return read(source, box)

    monkeypatch.setattr(blocks, "read_volume", failing_storage)
    with pytest.raises(OSError, match="injected"):
        segment(src, out, model=small_net, client=client, **SETTINGS)
    monkeypatch.setattr(blocks, "read_volume", read)
    done = set(BlockJournal(out).done())
    status = describe_output(out)
    assert not status.complete and status.blocks_done == len(done) and 0 < len(done) < status.blocks
    assert "--resume" in status.describe() and zarr.open_group(out).attrs["tilesegment"]["status"] == "incomplete"
    assert "multiscales" not in zarr.open_group(out).attrs  # viewers do not take it for a finished mask
    with pytest.raises(OutputError, match="--resume.*--overwrite"):
        segment(src, out, model=small_net, client=client, **SETTINGS)
    with pytest.raises(OptionError, match="tile"):
        segment(src, out, model=small_net, client=client, resume=True, **{**SETTINGS, "tile": 8})
    # a run begun by a version whose blocks did not write every pyramid level themselves: resuming it
    # would leave the coarser units its finished blocks own empty, so it is refused
    group = zarr.open_group(out, mode="r+")
    recorded = group.attrs["tilesegment"]
    assert recorded["run"]["pyramid_levels_by_blocks"] == "all"
    group.attrs["tilesegment"] = {**recorded, "run": {**recorded["run"], "pyramid_levels_by_blocks": 1}}
    with pytest.raises(OptionError, match="pyramid_levels_by_blocks was 1, now 'all'"):
        segment(src, out, model=small_net, client=client, resume=True, **SETTINGS)
    # nor one whose spill pieces held every class and the weights (before the weights came from the grid)
    group.attrs["tilesegment"] = {**recorded, "run": {k: v for k, v in recorded["run"].items() if k != "blend_sums"}}
    with pytest.raises(OptionError, match="blend_sums was None, now 'grid weights'"):
        segment(src, out, model=small_net, client=client, resume=True, **SETTINGS)
    group.attrs["tilesegment"] = recorded
    report = segment(src, out, model=small_net, client=client, resume=True, **SETTINGS)
    from tilesegment.plan import BlockPlan

    plan = BlockPlan.create((48, 40, 44), (16,) * 3, 0.25, (8,) * 3, (16,) * 3)
    assert report.extra["resumed_blocks"] == len(done)
    assert report.tiles_forwarded == sum(plan.tile_count(i) for i in plan.indices() if i not in done)
    assert_same_output(out, reference)
    assert describe_output(out).complete
    again = segment(src, out, model=small_net, client=client, resume=True, **SETTINGS)
    assert again.extra["already_complete"] and again.tiles_forwarded == 0
    with pytest.raises(OutputError, match="already exists"):
        segment(src, out, model=small_net, client=client, **SETTINGS)
    # the failed run's futures may still be alive on this client: a new identical run must compute
    # (and here fail) for itself, not be handed the earlier run's results
    monkeypatch.setattr(blocks, "read_volume", failing_storage)
    with pytest.raises(OSError, match="injected"):
        segment(src, out, model=small_net, client=client, overwrite=True, **SETTINGS)


def test_input_is_never_modified(tmp_path, tomogram, identity_model, client):
    before = sha256(tomogram)
    segment(tomogram, str(tmp_path / "a.zarr"), model=identity_model, tile=16, client=client)
    assert sha256(tomogram) == before


def test_status_command_and_resume_flags(tmp_path, tomogram, reference):
    result = tileseg("status", reference)
    assert result.returncode == 0 and "complete" in result.stdout
    assert_one_line_error(tileseg("status", str(tmp_path / "nothing.zarr")), 3, "no such file")
    assert_one_line_error(tileseg("run", tomogram, reference, "--resume", "--overwrite"), 2, "--resume")


# ---- real crashes ------------------------------------------------------------------------------

def wait_for_blocks(out: str, count: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> int:
    journal, deadline = BlockJournal(out), time.time() + timeout
    while time.time() < deadline:
        done = len(list(journal.done()))
        if done >= count:
            return done
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {count} blocks were done: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} blocks done after {timeout} s")


@pytest.mark.slow
def test_resume_after_sigkill_of_the_whole_run(tmp_path, small_net, client):
    volume = random_volume((80, 80, 80), seed=8)
    src = write_mrc(tmp_path / "big.mrc", volume)
    out = str(tmp_path / "seg.zarr")
    options = ["--model", small_net, "--tile", "16", "--chunk", "8", "--block", "16", "--probabilities", "--probability-dtype", "float32"]
    proc = subprocess.Popen([*TILESEG, "run", src, out, *options], env={**os.environ, "CI": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_blocks(out, 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its embedded scheduler and workers: no clean-up runs
    proc.wait()
    done = set(BlockJournal(out).done())
    total = 5**3
    assert 5 <= len(done) < total, "the run finished before it was killed; make the volume bigger"
    result = tileseg("status", out)
    assert result.returncode == 1 and "incomplete" in result.stdout and "--resume" in result.stdout
    assert_one_line_error(tileseg("run", src, out, *options), 5, "--resume", "--overwrite")
    result = tileseg("run", src, out, *options, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed: {len(done)} of {total} blocks" in result.stdout
    reference = str(tmp_path / "reference.zarr")
    assert tileseg("run", src, reference, *options).returncode == 0
    assert_same_output(out, reference)


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly_and_it_resumes_to_the_same_output(tmp_path, small_net):
    """A batch system's time limit or a container's stop sends SIGTERM: the run stops as on Ctrl-C
    (blocks cancelled, the output's lock released), says so in one line, exits 143 (128 + 15), and
    --resume finishes it to the bytes an uninterrupted run writes."""
    src = write_mrc(tmp_path / "big.mrc", random_volume((80, 80, 80), seed=9))
    out = str(tmp_path / "seg.zarr")
    options = ["--model", small_net, "--tile", "16", "--chunk", "8", "--block", "16", "--probabilities", "--probability-dtype", "float32"]
    proc = subprocess.Popen([*TILESEG, "run", src, out, *options], env={**os.environ, "CI": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_blocks(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Dask dashboard:")]
    assert lines == ["tileseg: stopped by SIGTERM (finish it with 'tileseg run ... --resume')."], stderr
    done = set(BlockJournal(out).done())
    assert 5 <= len(done) < 5**3, "the run finished before it was stopped; make the volume bigger"
    result = tileseg("status", out)
    assert result.returncode == 1 and "no run is writing it" in result.stdout, result.stdout  # the lock was released
    assert tileseg("run", src, out, *options, "--resume").returncode == 0
    reference = str(tmp_path / "reference.zarr")
    assert tileseg("run", src, reference, *options).returncode == 0
    assert_same_output(out, reference)


@pytest.mark.slow
def test_losing_an_embedded_worker_mid_run_changes_nothing(tmp_path, small_net):
    from distributed import Client, LocalCluster

    volume = random_volume((80, 80, 80), seed=9)
    src = write_mrc(tmp_path / "big.mrc", volume)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"MODEL": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as cl:
        reference = str(tmp_path / "reference.zarr")
        segment(src, reference, model=small_net, client=cl, **SETTINGS)
        out = str(tmp_path / "seg.zarr")
        victim = next(iter(cl.run(os.getpid).values()))
        killed = {}

        def kill_one() -> None:
            killed["at"] = wait_for_blocks(out, 10)
            os.kill(victim, signal.SIGKILL)  # the nanny starts a new worker; its blocks are re-run

        killer = threading.Thread(target=kill_one)
        killer.start()
        report = segment(src, out, model=small_net, client=cl, **SETTINGS)
        killer.join()
    assert killed["at"] < report.blocks, "the run finished before the worker was killed"
    assert report.tiles_forwarded == report.tile_count
    assert_same_output(out, reference)


@pytest.mark.slow
def test_losing_a_real_dask_worker_mid_run_changes_nothing(tmp_path, small_net, client):
    volume = random_volume((80, 80, 80), seed=10)
    src = write_mrc(tmp_path / "big.mrc", volume)
    reference = str(tmp_path / "reference.zarr")
    segment(src, reference, model=small_net, client=client, **SETTINGS)
    out = str(tmp_path / "seg.zarr")
    options = ["--model", small_net, "--tile", "16", "--chunk", "8", "--block", "16", "--probabilities", "--probability-dtype", "float32"]
    with dask_cluster(tmp_path, workers=2, nanny=False) as (address, _, workers):
        proc = subprocess.Popen([*TILESEG, "run", src, out, *options, "--scheduler", address], env={**os.environ, "CI": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed_at = wait_for_blocks(out, 10, proc)
        workers[0].kill()  # gone for good: the other worker finishes the job
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert killed_at < 5**3
    assert_same_output(out, reference, exact=False)

"""`tileseg run --scheduler` against a real `dask scheduler` and two `dask worker` processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from tilesegment.pipeline import segment

from .conftest import random_volume, write_mrc
from .test_cli import tileseg

pytestmark = pytest.mark.slow


def dask_command(name: str) -> list[str]:
    exe = shutil.which("dask") or os.path.join(os.path.dirname(sys.executable), "dask")
    return [exe, name]


@contextlib.contextmanager
def dask_cluster(tmp_path, workers: int = 2, nanny: bool = True, nthreads: int = 1):
    """A real ``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1:
    yields (address, scheduler file, worker processes)."""
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([*dask_command("scheduler"), "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(scheduler_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(workers):
            procs.append(subprocess.Popen([*dask_command("worker"), address, "--nthreads", str(nthreads), "--nworkers", "1",
                                           *([] if nanny else ["--no-nanny"]),
                                           "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=90)
        yield address, str(scheduler_file), procs[1:]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def real_cluster(tmp_path):
    with dask_cluster(tmp_path) as (address, scheduler_file, _):
        yield address, scheduler_file


def test_run_on_a_real_scheduler_and_two_workers(tmp_path, real_cluster, small_net, client):
    address, scheduler_file = real_cluster
    volume = random_volume((40, 36, 44), seed=11)
    src = write_mrc(tmp_path / "tomo.mrc", volume)
    options = ["--model", small_net, "--tile", "16", "--chunk", "8", "--block", "16", "--probabilities", "--probability-dtype", "float32"]
    result = tileseg("run", src, str(tmp_path / "remote.zarr"), "--scheduler", address, *options)
    assert result.returncode == 0, result.stderr
    assert "tiles" in result.stdout
    # the same through a scheduler file, as HPC users start Dask
    result = tileseg("run", src, str(tmp_path / "remote2.zarr"), "--scheduler", scheduler_file, *options)
    assert result.returncode == 0, result.stderr
    segment(src, str(tmp_path / "local.zarr"), model=small_net, tile=16, chunk=8, block=16, probabilities=True,
            probability_dtype="float32", client=client)
    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    for name in ("remote.zarr", "remote2.zarr"):
        remote = zarr.open_group(str(tmp_path / name), mode="r")
        assert remote.attrs["tilesegment"]["status"] == "complete"
        assert remote.attrs["tilesegment"]["tiles_forwarded"] == remote.attrs["tilesegment"]["tiles"]
        np.testing.assert_allclose(remote["probabilities/0"][:], local["probabilities/0"][:], atol=1e-6)
        np.testing.assert_array_equal(remote["0"][:], local["0"][:])


def test_embedded_cpu_worker_runs_one_block_at_a_time_with_little_housekeeping():
    """On a CPU the network already uses every core: one block per worker, no Dask profiler sampling
    the threads, and slow housekeeping timers (benchmarks/RESULTS.md measures why)."""
    from tilesegment.executor import blocks_in_flight, connect

    assert blocks_in_flight("cpu") == 1 and blocks_in_flight("cuda") == blocks_in_flight("cuda:1") == 2
    with connect(None, device="cpu") as client:
        assert list(client.nthreads().values()) == [1]
        profiling = client.run(lambda dask_worker: any("profile" in name for name in dask_worker.periodic_callbacks))
        assert list(profiling.values()) == [False]
        # housekeeping no more often than once a second (Dask's defaults: 20 ms, 100 ms, 500 ms)
        intervals = client.run(lambda dask_worker: {k: dask_worker.periodic_callbacks[k].callback_time for k in ("tick", "memory_monitor", "monitor")})
        assert all(ms >= 1000 for ms in next(iter(intervals.values())).values()), intervals


@pytest.mark.slow
def test_a_worker_shares_its_cores_among_its_block_threads(tmp_path):
    """A worker started with two threads runs two blocks at once (a GPU worker's layout): PyTorch gets
    half its cores, so the two blocks' work on the CPU starts no more OpenMP threads than cores."""
    from distributed import Client

    from tilesegment.executor import install_model
    from tilesegment.model import read_checkpoint
    from tilesegment.predict import model_key

    data = read_checkpoint(None)
    with dask_cluster(tmp_path, workers=1, nthreads=2) as (address, _, _), Client(address, timeout="30s") as client:
        install_model(client, model_key(data, "cpu"), data, "cpu", None)

        def threads() -> tuple[int, int]:
            import torch

            return torch.get_num_threads(), len(os.sched_getaffinity(0))

        (torch_threads, cores), = client.run(threads).values()
        assert torch_threads == max(1, cores // 2)

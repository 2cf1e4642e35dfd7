"""The deployment recipes in examples/: the SLURM job dask-jobqueue would submit, and the scheduler-file
script run for real (on CPU workers; the GPU flags are checked as text, no GPU or SLURM needed)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import zarr

from tilesegment.executor import predict_resources
from tilesegment.pipeline import segment

from .conftest import random_volume, write_mrc

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SLURM_EXAMPLE = os.path.join(EXAMPLES, "slurm_gpu.py")
RECIPE = os.path.join(EXAMPLES, "scheduler_file.sh")


def load_example(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_options(command: str) -> dict[str, str]:
    """``--option value`` pairs of a ``dask worker`` command line."""
    words = shlex.split(command)
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--") and not words[i + 1].startswith("--")}


def gpu_blocks_per_worker(options: dict[str, str]) -> float:
    """How many tileseg block tasks a worker with these options runs at once on a --device cuda run."""
    gpu = float(re.fullmatch(r"GPU=([0-9.]+)", options["--resources"]).group(1))
    return min(int(options["--nthreads"]), gpu / predict_resources("cuda")["GPU"])


def test_slurm_job_asks_for_one_gpu_and_gives_its_worker_the_gpu_resource(tmp_path):
    pytest.importorskip("dask_jobqueue", reason="the SLURM example needs the 'cluster' extra (dask-jobqueue)")
    example = load_example(SLURM_EXAMPLE)
    with example.gpu_cluster(queue="gpu", account="myproject", walltime="01:30:00", log_directory=str(tmp_path / "logs"),
                             prologue=["module load cuda", "source /shared/venv/bin/activate"], dashboard_address=":0") as cluster:
        script = cluster.job_script()
        assert not cluster.workers  # nothing submitted: job_script() only renders the sbatch file
    lines = script.splitlines()
    for directive in ("#SBATCH --gres=gpu:1", "#SBATCH -p gpu", "#SBATCH -A myproject", "#SBATCH -t 01:30:00", "#SBATCH -n 1"):
        assert directive in lines, script
    worker = next(line for line in lines if "dask_worker" in line or "dask worker" in line)
    assert lines.index("source /shared/venv/bin/activate") < lines.index(worker)  # the environment comes first
    options = worker_options(worker)
    assert options["--resources"] == "GPU=1" and options["--nthreads"] == "2"
    assert options.get("--nworkers", "1") == "1"  # one worker per job, so one GPU per worker
    assert gpu_blocks_per_worker(options) == 2  # both threads get block tasks: one on the GPU, one reading or writing


def test_slurm_example_prints_its_job_script_without_slurm(tmp_path):
    pytest.importorskip("dask_jobqueue", reason="the SLURM example needs the 'cluster' extra (dask-jobqueue)")
    result = subprocess.run([sys.executable, SLURM_EXAMPLE, "tomo.zarr", "seg.zarr", "--print-job-script", "--queue", "gpu"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --gres=gpu:1" in result.stdout and "--resources GPU=1" in result.stdout


def test_the_scheduler_file_recipe_gives_each_worker_one_gpu_and_the_gpu_resource():
    subprocess.run(["bash", "-n", RECIPE], check=True)  # parses
    text = open(RECIPE).read()
    gpu_worker = re.search(r"CUDA_VISIBLE_DEVICES=\$gpu dask worker (.*?)&\n", text.replace("\\\n", " "), re.S).group(1)
    gpu_worker = re.sub(r"\s+", " ", gpu_worker).replace('"$THREADS"', re.search(r"THREADS=\$\{THREADS:-(\d+)\}", text).group(1))
    options = worker_options(gpu_worker)
    assert options["--scheduler-file"] == "$SCHEDULER_FILE" and options["--nworkers"] == "1"
    assert gpu_blocks_per_worker(options) == 2
    assert 'dask scheduler --scheduler-file "$SCHEDULER_FILE"' in text
    assert 'tileseg run "$1" "$2" --scheduler "$SCHEDULER_FILE" --device "$DEVICE"' in text


@pytest.mark.slow
def test_the_scheduler_file_recipe_runs_for_real(tmp_path, small_net, client):
    """``scheduler_file.sh all`` on CPU workers: a real scheduler, two real workers, tileseg run through the scheduler
    file, the same labels as an in-process run, and every process it started stopped at the end."""
    src = write_mrc(tmp_path / "tomo.mrc", random_volume((32, 36, 40), seed=8))
    options = ["--model", small_net, "--tile", "16", "--chunk", "8", "--block", "16"]
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "CI": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "DEVICE": "cpu", "CPU_WORKERS": "2", "SCHEDULER_FILE": str(scheduler_file), "WORKER_DIR": str(tmp_path / "scratch"),
           "SCHEDULER_ARGS": "--host 127.0.0.1 --port 0 --dashboard-address :0"}
    result = subprocess.run(["bash", RECIPE, "all", src, str(tmp_path / "seg.zarr"), *options], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout
    segment(src, str(tmp_path / "local.zarr"), model=small_net, tile=16, chunk=8, block=16, client=client)
    remote = zarr.open_group(str(tmp_path / "seg.zarr"), mode="r")
    assert remote.attrs["tilesegment"]["status"] == "complete"
    np.testing.assert_array_equal(remote["0"][:], zarr.open_array(str(tmp_path / "local.zarr" / "0"), mode="r")[:])
    leftover = subprocess.run(["pgrep", "-f", str(scheduler_file)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes still running: {leftover}"

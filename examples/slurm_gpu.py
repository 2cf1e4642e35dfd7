"""Segment a tomogram on SLURM GPU nodes: dask-jobqueue submits one job per GPU, each running one Dask worker.

Run this on a login node, in the environment where tilesegment is installed (the jobs use the same
Python, so it must be on a shared file system, as must the tomogram and the output):

    pip install 'tilesegment[cluster]'            # dask-jobqueue
    python examples/slurm_gpu.py /data/tomo.zarr /data/seg.zarr --jobs 4 --queue gpu --account myproject
    python examples/slurm_gpu.py /data/tomo.zarr /data/seg.zarr --print-job-script   # show the sbatch script only

Each job asks SLURM for one GPU (``#SBATCH --gres=gpu:1``; SLURM sets CUDA_VISIBLE_DEVICES, so the
worker sees it as ``cuda``) and starts one worker with two threads and the Dask resource ``GPU=1``:
tileseg's block tasks each ask for half a GPU, so a worker runs two at a time, one on the GPU while
the other reads or writes. Without ``--resources GPU=1`` a ``--device cuda`` run never gets a task.

If the run stops (walltime, pre-emption), run the same command with ``--resume``: only the blocks not
yet finished are computed. To drive the cluster from ``tileseg run`` instead, pass ``--scheduler-file
FILE``: this script then starts the jobs, writes the scheduler's address to FILE and waits (Ctrl-C
ends the jobs) while you run ``tileseg run IN OUT --scheduler FILE --device cuda`` elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

__all__ = ["gpu_cluster", "main"]

THREADS_PER_WORKER = 2  # two block tasks per GPU worker: tileseg asks for GPU=0.5 per block


def gpu_cluster(queue: str | None = None, account: str | None = None, walltime: str = "04:00:00", memory: str = "64GB",
                cpus_per_job: int = 8, local_directory: str = "${TMPDIR:-/tmp}", log_directory: str | None = "dask-logs",
                prologue: Sequence[str] = (), dashboard_address: str = ":8787", **kwargs: Any):
    """A SLURMCluster whose every job is one GPU worker: ``--gres=gpu:1``, 2 threads, resource ``GPU=1``.

    ``cpus_per_job`` CPUs are reserved for the job (reading, decompressing and writing chunks runs
    beside the GPU); ``prologue`` lines run before the worker starts (``module load cuda``, ``source
    venv/bin/activate``). Other keyword arguments go to ``dask_jobqueue.SLURMCluster``.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        sys.exit("this example needs dask-jobqueue: pip install 'tilesegment[cluster]'")
    return SLURMCluster(
        queue=queue, account=account, walltime=walltime, memory=memory,
        cores=THREADS_PER_WORKER, processes=1,  # one worker of 2 threads per job
        job_cpu=cpus_per_job,
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1"],
        job_script_prologue=list(prologue),
        local_directory=local_directory, log_directory=log_directory,
        scheduler_options={"dashboard_address": dashboard_address}, **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="tomogram: MRC, Zarr array or OME-Zarr (on a shared file system)")
    parser.add_argument("output", help="OUTPUT.zarr (on a shared file system)")
    parser.add_argument("--jobs", type=int, default=2, help="GPU jobs (= GPUs = workers)")
    parser.add_argument("--queue", help="SLURM partition (-p)")
    parser.add_argument("--account", help="SLURM account (-A)")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--memory", default="64GB", help="memory per job")
    parser.add_argument("--cpus-per-job", type=int, default=8)
    parser.add_argument("--prologue", action="append", default=[], help="shell line run before the worker (repeatable)")
    parser.add_argument("--model", default=None, help="checkpoint (.safetensors); default: the built-in model")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward")
    parser.add_argument("--resume", action="store_true", help="finish a stopped run on OUTPUT")
    parser.add_argument("--scheduler-file", help="write the scheduler address here and wait, for 'tileseg run --scheduler FILE'")
    parser.add_argument("--print-job-script", action="store_true", help="print the sbatch script and submit nothing")
    args = parser.parse_args(argv)

    cluster = gpu_cluster(args.queue, args.account, args.walltime, args.memory, args.cpus_per_job, prologue=args.prologue)
    with cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return
        from distributed import Client

        from tilesegment.pipeline import segment

        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(f"Dask dashboard: {client.dashboard_link}; waiting for the first GPU worker (jobs queued: {args.jobs})", flush=True)
            client.wait_for_workers(1, timeout=None)  # the rest join as SLURM starts their jobs
            if args.scheduler_file:
                with open(args.scheduler_file, "w") as f:
                    json.dump({"address": cluster.scheduler_address}, f)  # read as 'dask scheduler --scheduler-file' writes it
                print(f"run:  tileseg run {args.input} {args.output} --scheduler {args.scheduler_file} --device cuda --batch {args.batch}")
                try:
                    while True:
                        time.sleep(60)
                except KeyboardInterrupt:
                    return
            report = segment(args.input, args.output, model=args.model, device="cuda", batch=args.batch, resume=args.resume,
                             client=client)
            print(f"wrote {report.output}: {report.tiles_forwarded}/{report.tile_count} tiles in {report.seconds:.0f} s "
                  f"({report.tiles_per_second:.1f} tiles/s)")


if __name__ == "__main__":
    main()

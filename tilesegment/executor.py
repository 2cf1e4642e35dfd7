"""Everything Dask: the cluster, the model on each worker, and the task graph of a run.

* With no scheduler address an embedded ``LocalCluster`` is started; otherwise tileseg attaches to
  an existing cluster (``dask scheduler`` + ``dask worker``, dask-jobqueue, ...).
* The model reaches each worker once, through a worker plugin that carries the checkpoint bytes
  (workers started later get it too); tasks carry only the model's key.
* The graph has one ``block`` task per unfinished block (see :mod:`tilesegment.blocks`), which
  depends on its unfinished lower neighbours (whose spill pieces it reads from the run's journal,
  and whose stored output it reads for its units of the coarser pyramid levels),
  with falling priority in sweep order so the workers go through the volume plane by plane. A GPU
  worker runs two blocks at once (two threads): while one block's tiles are on the device, the
  other reads its input or blends and writes its output; the predictor lets one forward at a time
  use the device. GPU block tasks ask for half a ``GPU`` resource (``dask worker --nthreads 2
  --resources GPU=1``), so they go only to GPU workers, two at a time. An embedded CPU worker runs
  one block at a time (:func:`blocks_in_flight`): there the network already uses every core.
* The embedded cluster of one CPU worker runs in this process (threads, no worker process to start
  and no second copy of PyTorch to import); more workers, or GPUs, get one process each.
* Lost workers: Dask re-runs the tasks that were on them; a block already in the journal returns
  its recorded result at once, so only the blocks that were running are computed again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import dask
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Client, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from .allocator import PROCESS_ENVIRONMENT
from .blocks import BlockJob, BlockResult, process_block, set_progress_hook
from .errors import ClusterError
from .plan import SpentPieces

__all__ = ["connect", "ModelPlugin", "install_model", "run_blocks", "map_tasks", "dashboard_link"]

log = logging.getLogger(__name__)

PROGRESS_TOPIC = "tilesegment-tiles"  # workers report forwarded tiles per batch here

#: Dask settings of the embedded cluster. Its periodic housekeeping runs on the cores the network
#: uses: the statistical profiler walks every thread's stack 100 times a second (about 7 % of a core
#: on a 2-core machine), and the event-loop tick (every 20 ms), the worker's memory monitor (100 ms)
#: and the system monitor (500 ms) took 4.5 % of a core on an idle embedded cluster, 0.7 % at these
#: intervals (benchmarks/RESULTS.md). Memory limits are still enforced, within a second.
EMBEDDED_CONFIG = {
    "distributed.worker.daemon": False,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # worker processes keep freed memory for the next forward and numpy asks for no huge pages
    # (tilesegment.allocator), which replaces Dask's own setting of the opposite (return freed
    # memory above 64 kB)
    **{f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in PROCESS_ENVIRONMENT.items()},
}


class QuietTaskFailures(logging.Filter):
    """Drops Dask's "Compute Failed" record (the task, its arguments and a traceback, many lines):
    a failed block's error reaches the client, which says it in one line. Installed on the
    workers of an embedded cluster only (an external cluster's logs are its operator's), and not
    at ``-vv``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def quiet_task_failures(quiet: bool = True) -> None:
    """Install :class:`QuietTaskFailures` on Dask's worker logger in this process, once; or take it
    away again (an embedded cluster's worker in the client's own process, after the run)."""
    worker_log = logging.getLogger("distributed.worker")
    for existing in [f for f in worker_log.filters if isinstance(f, QuietTaskFailures)]:
        worker_log.removeFilter(existing)
    if quiet:
        worker_log.addFilter(QuietTaskFailures())


class QuietFailuresPlugin(WorkerPlugin):
    """:func:`quiet_task_failures` on every worker of an embedded cluster, restarted ones too."""

    name = "tilesegment-quiet-task-failures"

    def setup(self, worker: Any) -> None:
        quiet_task_failures()


class ModelPlugin(WorkerPlugin):
    """Loads the model once in every worker process (and in workers that join later)."""

    name = "tilesegment-model"

    def __init__(self, key: str, data: bytes, device: str, threads: int | None, precision: str = "fp32") -> None:
        self.key, self.data, self.device, self.threads, self.precision = key, data, device, threads, precision

    def setup(self, worker: Any) -> None:
        from .predict import install_predictor

        device = self.device
        if device == "cuda" and isinstance(worker.name, int):
            import torch

            device = f"cuda:{worker.name % max(1, torch.cuda.device_count())}"
        threads = self.threads or max(1, default_torch_threads() // max(1, worker.state.nthreads))
        install_predictor(self.key, self.data, device, threads, self.precision)
        set_progress_hook(lambda run, tiles: worker.log_event(PROGRESS_TOPIC, (run, tiles)))


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int | None = None, device: str = "cpu",
            threads_per_worker: int | None = None) -> Iterator[Client]:
    """A client to ``scheduler`` (address or scheduler file), or to a fresh embedded LocalCluster
    running ``threads_per_worker`` (default :func:`blocks_in_flight`) blocks at a time per worker."""
    if scheduler:
        kwargs: dict[str, Any] = {"timeout": "5s"}
        if os.path.isfile(scheduler):
            kwargs["scheduler_file"] = scheduler
        else:
            kwargs["address"] = scheduler
        try:
            client = Client(**kwargs)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}).",
                               "Start one with 'dask scheduler' (and 'dask worker ADDRESS'), check the address, or leave out --scheduler to use an embedded cluster.") from None
        with client:
            yield client
        return
    n_workers = workers or embedded_worker_count(device)
    resources = {"GPU": 1} if device.startswith("cuda") else None
    with dask.config.set(EMBEDDED_CONFIG):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker or blocks_in_flight(device),
                               processes=n_workers > 1, resources=resources, dashboard_address=":0", silence_logs=logging.ERROR)
    with cluster, Client(cluster) as client:
        if not log.isEnabledFor(logging.DEBUG):  # Dask's own record of a failed block only at -vv
            client.register_plugin(QuietFailuresPlugin())
        try:
            yield client
        finally:
            quiet_task_failures(False)  # an in-process worker's logger is this process's: Dask's again


def default_torch_threads() -> int:
    """CPUs this worker may use. Dask's nanny sets OMP_NUM_THREADS=1 for its workers, which would
    leave PyTorch on one core; the network is the one thing that should use them all. A worker that
    runs several blocks at once (a GPU worker's two threads) shares them out among its threads, so
    that their blending and stacking on the CPU do not start more OpenMP threads than cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def blocks_in_flight(device: str) -> int:
    """Blocks an embedded worker runs at once. On a GPU two: one block's tiles on the device while
    the other reads, blends and writes (the predictor lets one forward at a time use the device).
    On a CPU one: the network already uses every core, and a second block's reading, blending and
    compression would take them from it (measured in benchmarks/RESULTS.md)."""
    return 2 if device.startswith("cuda") else 1


def embedded_worker_count(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count()) if device == "cuda" else 1
    return 1


def dashboard_link(client: Client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:
        return None


def install_model(client: Client, key: str, data: bytes, device: str, threads: int | None, precision: str = "fp32") -> None:
    """Register the model plugin and wait until every current worker has loaded the model."""
    plugin = ModelPlugin(key, data, device, threads, precision)
    try:
        client.register_plugin(plugin, name=f"{ModelPlugin.name}-{key}")
    except Exception as exc:
        from .errors import TilesegError

        cause = exc
        while cause is not None and not isinstance(cause, TilesegError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, TilesegError):
            raise cause from None
        raise ClusterError(f"the workers could not load the model ({type(exc).__name__}: {exc}).",
                           "Check that tilesegment and PyTorch are installed on the workers (same versions as here).") from None


def predict_resources(device: str) -> dict[str, float] | None:
    """A share of a GPU per block task, so that :func:`blocks_in_flight` blocks run on each GPU worker
    (half a GPU: one block on the device, one reading or writing)."""
    return {"GPU": 1 / blocks_in_flight(device)} if device.startswith("cuda") else None


def block_graph(job: BlockJob, resources: dict[str, float] | None,
                done: Collection[tuple[int, ...]] = ()) -> tuple[HighLevelGraph, list[str]]:
    """The task graph of a run, built as plain dicts: one ``block`` task per block not in ``done``,
    depending on its lower neighbours that are not in ``done`` either.

    Built directly rather than through ``dask.delayed``: delayed objects carry their upstream graph,
    so a wavefront of them costs quadratic time to build (minutes for a few thousand blocks).
    """
    plan = job.plan
    # unique per run: a client that still holds an earlier identical run's keys (a failed run's
    # futures, say) must not hand its results back instead of writing this run's chunks
    token = dask.base.tokenize(job, uuid.uuid4().hex)
    job_key = f"job-{token}"

    def block_key(index: Sequence[int]) -> str:
        return f"block-{token}-" + "-".join(map(str, index))

    blocks, priority = {}, {}
    for order, index in enumerate(plan.sweep()):
        if index in done:
            continue
        key = block_key(index)
        # the lower neighbours whose pieces it takes, and with a pyramid all of them: a block builds
        # its units of the coarser levels partly from what the blocks below it stored
        sources = {source for source, _ in plan.spills_into(index)} | (set(plan.lower_neighbours(index)) if job.label_levels else set())
        waits_for = [block_key(source) for source in sorted(sources) if source not in done]
        blocks[key] = (process_block, job_key, list(index), *waits_for)
        priority[key] = -order  # sweep order: a block's lower neighbours (its inputs) come first
    annotations: dict[str, Any] = {"priority": priority.__getitem__}
    if resources:
        annotations["resources"] = resources
    layers = {"job": MaterializedLayer({job_key: job}), "blocks": MaterializedLayer(blocks, annotations=annotations)}
    graph = HighLevelGraph(layers, {"job": set(), "blocks": {"job"}})
    return graph, list(blocks)


def run_blocks(client: Client, job: BlockJob, resources: dict[str, float] | None,
               on_tiles: Callable[[int], None] | None = None, done: Collection[tuple[int, ...]] = ()) -> list[BlockResult]:
    """Run the blocks not in ``done``; ``on_tiles(n)`` hears of every forwarded batch."""
    graph, keys = block_graph(job, resources, done)
    if not keys:
        return []

    def heard(event: tuple[float, Any]) -> None:
        run, tiles = event[1]
        if run == job.labels_path and on_tiles:
            on_tiles(tiles)

    client.subscribe_topic(PROGRESS_TOPIC, heard)
    futures = client.get(graph, keys, sync=False)
    results = []
    spent = SpentPieces(job.plan, done)
    for index in spent.already_spent():  # left with their pieces by a stopped run
        job.journal.drop_pieces(index)
    try:
        for future in as_completed(futures):
            results.append(future.result())
            for index in spent.finished(results[-1].index):
                job.journal.drop_pieces(index)
    except BaseException:
        client.cancel(futures)
        _wait_for_stragglers(client, keys)
        raise
    finally:
        client.unsubscribe_topic(PROGRESS_TOPIC)
    return results


def _still_running(keys: set[str], dask_worker: Any = None) -> list[str]:
    """On a worker: which of ``keys`` a thread is still executing (cancelled tasks run to their end)."""
    return [str(ts.key) for ts in list(dask_worker.state.tasks.values())
            if ts.key in keys and ts.state in ("executing", "long-running", "cancelled", "resumed")]


def _wait_for_stragglers(client: Client, keys: Sequence[str], timeout: float = 120.0) -> None:
    """After a failure, wait until no block of this run is still writing, so that the output's lock
    is released only when the run has really stopped (a resume then never races a straggler)."""
    import time

    deadline, wanted = time.monotonic() + timeout, set(keys)
    while time.monotonic() < deadline:
        try:
            running = client.run(_still_running, wanted)
        except Exception:  # workers gone or unreachable: nothing more to wait for here
            return
        if not any(running.values()):
            return
        time.sleep(0.1)
    log.warning("blocks still running on the workers %.0f s after the run stopped", timeout)


def map_tasks(client: Client, func: Callable[..., Any], argument_lists: Sequence[Iterable[Any]],
              on_done: Callable[[Any], None] | None = None) -> list[Any]:
    """Run ``func(*args)`` for every argument list on the cluster; results in completion order."""
    futures = [client.submit(func, *args, pure=False) for args in argument_lists]
    results = []
    try:
        for future in as_completed(futures):
            results.append(future.result())
            if on_done:
                on_done(results[-1])
    except BaseException:
        client.cancel(futures)
        raise
    return results

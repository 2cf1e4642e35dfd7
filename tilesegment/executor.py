"""Everything Dask: the cluster, the model on each worker, and the task graph of a run.

* With no scheduler address an embedded ``LocalCluster`` is started; otherwise tileseg attaches to
  an existing cluster (``dask scheduler`` + ``dask worker``, dask-jobqueue, ...).
* The model reaches each worker once, through a worker plugin that carries the checkpoint bytes
  (workers started later get it too); tasks carry only the model's key.
* The graph has one ``predict`` task per block (no dependencies: the scheduler's root-task queuing
  keeps only a few in flight), the split of its result into 8 pieces, and one ``finalise`` task per
  block that depends on its own and its lower neighbours' pieces. Predict tasks ask for a ``GPU``
  resource on GPU runs (``dask worker --resources GPU=1``) and for ``MODEL`` on the embedded CPU
  cluster, so one block at a time runs the network per worker while another is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import dask
from dask import delayed
from distributed import Client, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from .blocks import BlockJob, BlockResult, finalise_block, predict_block
from .errors import ClusterError
from .plan import OFFSETS

__all__ = ["connect", "ModelPlugin", "install_model", "run_blocks", "map_tasks", "dashboard_link"]

log = logging.getLogger(__name__)


class ModelPlugin(WorkerPlugin):
    """Loads the model once in every worker process (and in workers that join later)."""

    name = "tilesegment-model"

    def __init__(self, key: str, data: bytes, device: str, threads: int | None) -> None:
        self.key, self.data, self.device, self.threads = key, data, device, threads

    def setup(self, worker: Any) -> None:
        from .predict import install_predictor

        device = self.device
        if device == "cuda" and isinstance(worker.name, int):
            import torch

            device = f"cuda:{worker.name % max(1, torch.cuda.device_count())}"
        install_predictor(self.key, self.data, device, self.threads or default_torch_threads())


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int | None = None, device: str = "cpu",
            threads_per_worker: int = 2) -> Iterator[Client]:
    """A client to ``scheduler`` (address or scheduler file), or to a fresh embedded LocalCluster."""
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
    resources = {"GPU": 1} if device.startswith("cuda") else {"MODEL": 1}
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                               resources=resources, dashboard_address=":0", silence_logs=logging.ERROR)
    with cluster, Client(cluster) as client:
        yield client


def default_torch_threads() -> int:
    """CPUs this worker may use. Dask's nanny sets OMP_NUM_THREADS=1 for its workers, which would
    leave PyTorch on one core; the network is the one thing that should use them all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


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


def install_model(client: Client, key: str, data: bytes, device: str, threads: int | None) -> None:
    """Register the model plugin and wait until every current worker has loaded the model."""
    plugin = ModelPlugin(key, data, device, threads)
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


def predict_resources(client: Client, device: str, embedded: bool) -> dict[str, float] | None:
    if device.startswith("cuda"):
        return {"GPU": 1}
    return {"MODEL": 1} if embedded else None


def run_blocks(client: Client, job: BlockJob, resources: dict[str, float] | None,
               on_done: Callable[[BlockResult], None] | None = None) -> list[BlockResult]:
    """Build the block graph, run it, and call ``on_done`` as each block is written."""
    plan = job.plan
    token = dask.base.tokenize(job)
    job_key = delayed(job, pure=True, name=f"job-{token}")
    predicted = {}
    with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
        for index in plan.indices():
            name = f"predict-{token}-" + "-".join(map(str, index))
            predicted[index] = delayed(predict_block, pure=True, nout=len(OFFSETS) + 1)(job_key, index, dask_key_name=name)
    finals = []
    for index in plan.indices():
        pieces = [predicted[source][OFFSETS.index(offset)] for source, offset in plan.incoming(index)]
        name = f"finalise-{token}-" + "-".join(map(str, index))
        finals.append(delayed(finalise_block, pure=True)(job_key, index, predicted[index][len(OFFSETS)], *pieces, dask_key_name=name))
    futures = client.compute(finals, optimize_graph=False)
    results = []
    try:
        for future in as_completed(futures):
            result = future.result()
            future.release()
            results.append(result)
            if on_done:
                on_done(result)
    except BaseException:
        client.cancel(futures)
        raise
    return results


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

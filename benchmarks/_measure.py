"""Shared helpers of the benchmarks: peak memory and reads from /proc, test volumes, and the two
measurements more than one benchmark runs in a child process (the bare network, and ``segment()``
with its phases timed).

Peak RSS is VmHWM from /proc/<pid>/status: a process's own high-water mark (reset by exec, unlike
getrusage's ru_maxrss), read for a process and all its descendants (Dask's worker processes).

Child processes: a benchmark script runs ``python SCRIPT --child KIND JSON`` (see :func:`spawn_child`);
the child does one measurement and writes its result as JSON to ``params["result_path"]``, so the
parent's sampler sees the child's memory on its own and Python's import time stays outside every timing.

This file is also a Dask worker preload (``distributed.worker.preload``): with
``TILESEG_BENCH_READ_COUNTS=DIR`` set, :func:`dask_setup` instruments each worker to count the bytes
tileseg's MRC reader takes from the input and the time spent in the network's forward (see
:func:`install_read_counter`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Any, Callable

READ_COUNTS_ENV = "TILESEG_BENCH_READ_COUNTS"
MIB = 2**20
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# /proc: processes, peak memory, reads


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident memory (reset by exec, unlike getrusage's ru_maxrss)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def proc_io(pid: int) -> dict[str, int]:
    """/proc/<pid>/io (rchar counts every read syscall's bytes, sockets and page-cache hits included)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {key: int(value) for key, value in (line.split(":") for line in f if ":" in line)}
    except OSError:
        return {}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cpu_of_children() -> float:
    """User + system CPU seconds of this process's children that have exited and been waited for."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakSampler:
    """Samples the VmHWM of a process and of its descendants in a thread, until stopped.

    The list of descendants is refreshed every ``refresh`` seconds (scanning /proc is the costly
    part); known processes are read every ``interval`` seconds. VmHWM only grows, so a sample
    taken late still holds the peak; only the last ``interval`` before a process exits is missed.
    """

    def __init__(self, pid: int, interval: float = 0.05, refresh: float = 0.5) -> None:
        self.pid, self.interval, self.refresh = pid, interval, refresh
        self.peaks: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        known: list[int] = []
        last = -1e9
        while True:
            now = time.monotonic()
            if now - last >= self.refresh:
                known, last = descendants(self.pid), now
            for pid in (self.pid, *known):
                value = peak_rss_mib(pid)
                if value > self.peaks.get(pid, 0.0):
                    self.peaks[pid] = value
                    if pid not in self.names:
                        self.names[pid] = cmdline(pid)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def merge(self, peaks: dict[int, float], names: dict[int, str] | None = None) -> None:
        for pid, value in peaks.items():
            self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0.0), value)
        for pid, name in (names or {}).items():
            self.names.setdefault(int(pid), name)

    @property
    def root_peak_mib(self) -> float:
        return self.peaks.get(self.pid, 0.0)

    @property
    def child_peak_mib(self) -> float:
        """The largest descendant's peak (for tileseg: the largest Dask worker process; 0 if the
        workers run inside the process itself). Helper processes (multiprocessing's resource
        tracker) do not count."""
        return max((v for pid, v in self.peaks.items() if pid != self.pid and not is_helper(self.names.get(pid, ""))), default=0.0)

    @property
    def child_count(self) -> int:
        return sum(1 for pid in self.peaks if pid != self.pid and not is_helper(self.names.get(pid, "")))


def is_helper(command: str) -> bool:
    return "resource_tracker" in command or "forkserver" in command


def spawn_child(script: str, kind: str, params: dict[str, Any], workdir: str, sample: bool = True,
                env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``python SCRIPT --child KIND JSON`` and return (its JSON result, memory peaks in MiB).

    The peaks are those of the child (``root``) and of its largest descendant (``child``), sampled
    from outside, merged with any exact figures the child reports itself (``self_peak_rss_mib``,
    ``descendant_peaks_mib``).
    """
    result_path = os.path.join(workdir, f"result-{kind}-{time.monotonic_ns()}.json")
    params = {**params, "result_path": result_path}
    command = [sys.executable, script, "--child", kind, json.dumps(params)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})})
    sampler = PeakSampler(proc.pid) if sample else None
    with sampler if sampler else contextlib.nullcontext():
        proc.wait()
    process_seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"benchmark child '{kind}' failed (exit {proc.returncode}); its error is above.")
    with open(result_path) as f:
        result = json.load(f)
    os.remove(result_path)
    result["process_seconds"] = process_seconds
    peaks = {"root": 0.0, "child": 0.0, "children": 0}
    if sampler:
        sampler.merge({proc.pid: result.get("self_peak_rss_mib", 0.0)})
        sampler.merge({int(k): v for k, v in result.get("descendant_peaks_mib", {}).items()},
                      {int(k): v for k, v in result.get("descendant_commands", {}).items()})
        peaks = {"root": sampler.root_peak_mib, "child": sampler.child_peak_mib, "children": sampler.child_count}
    return result, peaks


def write_result(params: dict[str, Any], result: dict[str, Any]) -> None:
    result = {**result, "self_peak_rss_mib": peak_rss_mib(os.getpid())}
    with open(params["result_path"], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------
# the machine


def save_report(out_dir: str, name: str, result: dict[str, Any], text: str) -> None:
    """Write a benchmark's ``NAME.json`` and ``NAME.md`` into ``out_dir`` and print the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)


def machine_info() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    cpu, flags = "", []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    # the instructions that run bf16/fp16 networks natively on a CPU (benchmarks/precision.py)
    matrix = sorted(set(flags) & {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile"})
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpu_matrix_flags": matrix, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": round(meminfo_bytes("MemTotal") / GIB, 1), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def code_fingerprint() -> str:
    """A hash of tilesegment's source files as this run imports them (to notice edits during a run)."""
    import hashlib

    import tilesegment

    digest = hashlib.sha256()
    root = os.path.dirname(tilesegment.__file__)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['platform']}, {m['cpu'] or m['machine']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}, "
            f"PyTorch {m['torch']}, Python {m['python']} (load average at start {', '.join(map(str, m['load_average_at_start']))})")


# ---------------------------------------------------------------------------------------------
# test volumes and models


def write_noise_mrc(path: str, size: int, mode: int = 2, seed: int = 0, voxel_size: float = 10.0, slab_bytes: int = 64 * MIB) -> None:
    """A cubic MRC of random noise (mode 2: float32 N(0, 1); mode 0: int8 uniform), written slab by
    slab with plain writes, so the volume is never whole in memory (nor mapped)."""
    import mrcfile
    import numpy as np

    with mrcfile.new_mmap(path, shape=(size, size, size), mrc_mode=mode, overwrite=True) as mrc:  # header; data left sparse
        mrc.voxel_size = voxel_size
        offset = 1024 + int(mrc.header.nsymbt)
        dtype = mrc.data.dtype
    rng = np.random.default_rng(seed)
    plane = size * size * dtype.itemsize
    depth = max(1, slab_bytes // plane)
    with open(path, "r+b") as f:
        for z in range(0, size, depth):
            n = min(depth, size - z)
            if mode == 0:
                slab = rng.integers(-128, 128, size=(n, size, size), dtype=np.int8)
            else:
                slab = rng.standard_normal(size=(n, size, size), dtype=np.float32)
            f.seek(offset + z * plane)
            f.write(slab.astype(dtype, copy=False).tobytes())  # the file's dtype, byte order included


def identity_checkpoint(path: str, normalization: str = "none") -> None:
    from tilesegment.model import ModelConfig, build_model, save_checkpoint

    config = ModelConfig(architecture="identity", channels=(), class_names=("background", "value"),
                         normalization=normalization, output="none")
    save_checkpoint(path, build_model(config), config)


def plan_for(shape: Any, tile: int, overlap: float, chunk: int = 64, ngff: str = "0.4") -> Any:
    """The BlockPlan ``segment()`` builds for these settings (default block)."""
    from tilesegment.plan import BlockPlan
    from tilesegment.zarr_io import output_spec, write_unit

    return BlockPlan.create(tuple(shape), tile, overlap, write_unit(output_spec(ngff, chunk, None)))


def planned_block_read_bytes(plan: Any, itemsize: int) -> int:
    """Bytes the blocks read from the input: each block's input box, clipped to the volume, once."""
    volume = plan.volume_box
    return sum(plan.input_box(index).intersect(volume).size for index in plan.indices()) * itemsize


# ---------------------------------------------------------------------------------------------
# counting the bytes tileseg reads from an MRC input (wrapping its reader, in every process)


COUNTED = ("logical_bytes", "physical_bytes", "page_bytes", "regions", "reads", "forward_seconds", "forwards", "forward_tiles")
PAGE = 4096  # what a disk reads at least: a region's reads touch whole pages of the file


def install_read_counter(directory: str, role: str) -> Callable[[], None]:
    """Instrument tileseg in this process (counting only; results unchanged); returns a function
    that writes the counts to ``DIRECTORY/<role>-<pid>.json`` (also written after every region read
    and every forward); its ``counts()`` returns them.

    Reads of an MRC input: ``logical_bytes``, the regions asked for (``read_mrc_region``'s boxes);
    ``physical_bytes``, what its positioned reads (``_read_into``, an ``os.preadv`` per run of bytes)
    took from the file, which is more where whole rows are read for a wide box; ``page_bytes``, the
    distinct 4 KiB pages of the file each region's reads touched (what a disk would read for it,
    read-ahead aside: bytes read beside the box in pages the box touches anyway cost a disk nothing). The network:
    ``forward_seconds``, the time inside the model's forward (forward hooks on every Predictor's
    module; on a GPU the hook synchronises, as tileseg's copy of the result back does anyway).
    Wrapped functions that this tilesegment does not have are left alone (their counts stay 0 and
    ``missing`` names them).
    """
    import tilesegment.mrc as mrc
    import tilesegment.predict as predict
    import tilesegment.volume as volume

    if getattr(mrc, "_benchmark_read_counter", None):  # once per process (a preload runs in in-process workers too)
        return mrc._benchmark_read_counter
    lock = threading.Lock()
    counts: dict[str, Any] = {"pid": os.getpid(), "role": role, **{key: 0 for key in COUNTED}, "missing": []}
    path = os.path.join(directory, f"{role}-{os.getpid()}.json")
    local = threading.local()

    def dump() -> None:
        with lock:  # two blocks run at once in an in-process worker: one writer at a time
            with open(path + ".tmp", "w") as f:
                f.write(json.dumps(counts))
            os.replace(path + ".tmp", path)

    def add(**values: Any) -> None:
        with lock:
            for key, value in values.items():
                counts[key] += value

    read_into = getattr(mrc, "_read_into", None)
    read_region = getattr(volume, "read_mrc_region", None)
    if read_into is not None:
        def counted_read_into(fd: int, buffer: Any, offset: int, *args: Any, **kwargs: Any) -> Any:
            result = read_into(fd, buffer, offset, *args, **kwargs)
            add(physical_bytes=buffer.nbytes, reads=1)
            pages = getattr(local, "pages", None)
            if pages is not None and buffer.nbytes:
                pages.update(range(offset // PAGE, (offset + buffer.nbytes - 1) // PAGE + 1))
            return result

        mrc._read_into = counted_read_into
    else:
        counts["missing"].append("tilesegment.mrc._read_into")
    if read_region is not None:
        def counted_read_region(info: Any, box: Any, *args: Any, **kwargs: Any) -> Any:
            local.pages = set()
            try:
                data = read_region(info, box, *args, **kwargs)
            finally:
                pages, local.pages = local.pages, None
            add(logical_bytes=box.size * data.dtype.itemsize, regions=1, page_bytes=len(pages) * PAGE)
            dump()
            return data

        volume.read_mrc_region = counted_read_region
    else:
        counts["missing"].append("tilesegment.volume.read_mrc_region")

    def before_forward(module: Any, inputs: Any) -> None:
        local.started = time.perf_counter()

    def after_forward(module: Any, inputs: Any, output: Any) -> None:
        if getattr(output, "is_cuda", False):
            import torch

            torch.cuda.synchronize(output.device)
        add(forward_seconds=time.perf_counter() - local.started, forwards=1, forward_tiles=int(inputs[0].shape[0]))
        dump()

    init = predict.Predictor.__init__

    def counted_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.model.register_forward_pre_hook(before_forward)
        self.model.register_forward_hook(after_forward)

    predict.Predictor.__init__ = counted_init

    def snapshot() -> dict[str, Any]:
        with lock:
            return dict(counts)

    dump.counts = snapshot  # type: ignore[attr-defined]
    mrc._benchmark_read_counter = dump
    return dump


def read_counts(directory: str) -> dict[str, dict[str, Any]]:
    """Totals per role (``client``, ``worker``) of the counts written by :func:`install_read_counter`."""
    totals: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                counts = json.load(f)
            total = totals.setdefault(counts["role"], {**{key: 0 for key in COUNTED}, "processes": 0, "missing": []})
            for key in COUNTED:
                total[key] += counts.get(key, 0)
            total["processes"] += 1
            total["missing"] = sorted(set(total["missing"]) | set(counts.get("missing", [])))
    return totals


def dask_setup(worker: Any) -> None:  # Dask worker preload hook
    directory = os.environ.get(READ_COUNTS_ENV)
    if directory:
        install_read_counter(directory, "worker")


# ---------------------------------------------------------------------------------------------
# child: the bare network over exactly the tiles tileseg forwards


def child_bare(params: dict[str, Any]) -> None:
    """Forward time of the network alone for every tile of ``segment()``'s global grid.

    Same checkpoint, device, batch and torch thread count as tileseg's workers (all the usable
    cores shared among the embedded workers), inference mode, the activation tileseg applies.
    The volume is read and normalised (tileseg's own whole-volume statistics) and all batches are
    built, on the device, before the clock starts: the timed loop is the network and nothing else
    (on a GPU too small to hold them all, they wait in pinned memory and their copies are timed).
    """
    import numpy as np
    import torch

    from tilesegment.executor import default_torch_threads
    from tilesegment.geometry import Box
    from tilesegment.allocator import keep_freed_memory
    from tilesegment.model import for_inference, load_checkpoint, read_checkpoint
    from tilesegment.plan import batches as split_batches
    from tilesegment.predict import resolve_device
    from tilesegment.volume import intensity_statistics, open_volume, read_volume

    source = open_volume(params["input"])
    device = resolve_device(params["device"])
    model, config = load_checkpoint(read_checkpoint(params.get("model")), device)
    # the network exactly as tileseg's predictor runs it, unless told which memory order to try
    model = for_inference(model, **({"channels_last": params["channels_last"]} if "channels_last" in params else {}))
    if "cudnn_benchmark" in params:  # cuDNN timing its algorithms for each new shape (tileseg leaves it off: see predict.py)
        torch.backends.cudnn.benchmark = bool(params["cudnn_benchmark"])
    if params.get("keep_freed_memory", True):  # the process as tileseg's workers run it (benchmarks/allocator.py)
        keep_freed_memory()
    threads = max(1, default_torch_threads() // params.get("workers", 1))
    torch.set_num_threads(threads)
    plan = plan_for(source.shape, params["tile"], params["overlap"])
    tiles = list(plan.grid.tiles())
    bounds = Box((0, 0, 0), tuple(max(t.stop[a] for t in tiles) for a in range(3)))  # reflect-padded like tileseg where a tile passes the edge
    data = read_volume(source, bounds)
    if config.normalization == "zscore":
        mean, std = intensity_statistics(source)
        data -= np.float32(mean)
        data /= np.float32(std)
    batch = params["batch"]
    autocast = _network_math(device, params.get("precision"), params.get("cudnn_deterministic", True))

    def activate(y: Any) -> Any:
        y = y.float()
        return torch.softmax(y, dim=1) if config.output == "softmax" else torch.sigmoid(y) if config.output == "sigmoid" else y

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # on a GPU the batches wait on the device when they take under a quarter of its free memory;
    # otherwise in pinned host memory, and the timed loop includes copying them over
    staged = "device"
    batch_bytes = len(tiles) * math.prod(plan.grid.tile) * 4
    if device.type == "cuda" and batch_bytes > torch.cuda.mem_get_info(device)[0] / 4:
        staged = "host (pinned; copies timed)"
    # in tileseg's batches (no lone leftover tile), over the whole grid at once
    batches = [torch.from_numpy(np.stack([data[t.slices(bounds)] for t in group]))[:, None] for group in split_batches(tiles, batch)]
    batches = [x.to(device) if staged == "device" else x.pin_memory() for x in batches]
    del data
    with torch.inference_mode(), autocast:
        started = time.perf_counter()
        # warm-up (allocator, kernels, oneDNN/cuDNN choices); on a GPU once for each batch shape: cuDNN
        # with its benchmark mode on times algorithms at every new shape, which must not fall in the
        # loop (on the CPU one forward, as in every run of benchmarks/RESULTS.md)
        shapes = {tuple(x.shape): x for x in batches} if device.type == "cuda" else {0: batches[0]}
        for x in shapes.values():
            activate(model(x.to(device)))
        sync()
        warmup = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        for x in batches:
            activate(model(x.to(device, non_blocking=True)))
        sync()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    result = {"seconds": seconds, "cpu_seconds": cpu, "warmup_seconds": warmup, "tiles": len(tiles), "batches": len(batches), "batch": batch,
              "threads": threads, "device": str(device), "shape": list(source.shape), "grid_count": plan.grid.count,
              "precision": params.get("precision"), "staged": staged, "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
              "cudnn_deterministic": params.get("cudnn_deterministic", True),
              "channels_last": any(p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
                                   for p in model.parameters())}
    if device.type == "cuda":
        result["gpu_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    write_result(params, result)


def _network_math(device: Any, precision: str | None, deterministic: bool = True) -> Any:
    """The precision tileseg's predictor runs a forward in: its autocast, and on CUDA its cuDNN
    settings (``tilesegment.predict.cudnn_math``: IEEE or TF32 float32 convolutions, deterministic
    algorithms), where this tilesegment has them."""
    import torch

    stack = contextlib.ExitStack()
    try:  # tileseg's own names for precisions, where it has them
        from tilesegment.predict import PRECISIONS
    except ImportError:
        PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        from tilesegment.predict import cudnn_math
    except ImportError:
        cudnn_math = None
    name = precision if precision and precision != "float32" else "fp32"
    if cudnn_math is not None:
        stack.enter_context(cudnn_math(device, name, deterministic))
    dtype = PRECISIONS[name]
    if dtype is not None:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
    return stack


# ---------------------------------------------------------------------------------------------
# child: segment() with its phases timed


def child_segment(params: dict[str, Any]) -> None:
    """Run ``segment()`` once (an embedded cluster unless told otherwise) and time its phases.

    The phases come from wrapping the functions ``segment()`` calls (timing only): the intensity
    statistics, ``connect`` (cluster start; its exit is the cluster's shut-down), ``install_model``
    (the model loaded on every worker) and ``run_blocks`` (the blocks write the pyramid too); ``on_start`` and the first
    progress report are marked too. ``cpu_seconds``: CPU time of this process (every thread: client,
    scheduler, an in-process worker) plus that of worker processes, reaped when the cluster closes.
    Just before the cluster shuts down, the workers' VmHWM is read
    (exact, where the parent's sampler could miss a worker's last moments). With ``read_counts``
    set, the MRC reads of this process and of every worker (a Dask preload) are counted. Python's
    imports in this process (tilesegment, Dask, PyTorch) come before the clock starts.
    """
    imported = time.perf_counter()
    import dask

    import tilesegment.executor as executor
    import tilesegment.model  # noqa: F401  (torch: imported before the clock starts, as for the bare network and MONAI)
    import tilesegment.pipeline as pipeline
    import tilesegment.predict  # noqa: F401

    imported = time.perf_counter() - imported

    marks: dict[str, float] = {}
    worker_peaks: dict[str, float] = {}
    worker_io: dict[str, dict[str, int]] = {}
    worker_commands: dict[str, str] = {}
    counts_dir = params.get("read_counts")
    dump_client = install_read_counter(counts_dir, "client") if counts_dir else None
    config = {"distributed.worker.preload": [os.path.abspath(__file__)]} if counts_dir else {}

    def clock() -> float:
        return time.perf_counter()

    def timed(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault(f"{name}_start", clock())
            try:
                return func(*args, **kwargs)
            finally:
                marks[f"{name}_end"] = clock()
        return wrapper

    connect = executor.connect

    @contextlib.contextmanager
    def timed_connect(*args: Any, **kwargs: Any) -> Any:
        marks["connect_start"] = clock()
        with connect(*args, **kwargs) as client:
            marks["connect_end"] = clock()
            yield client
            for pid in descendants(os.getpid()):
                worker_peaks[str(pid)] = peak_rss_mib(pid)
                worker_io[str(pid)] = proc_io(pid)
                worker_commands[str(pid)] = cmdline(pid)
            marks["shutdown_start"] = clock()
        marks["shutdown_end"] = clock()

    executor.connect = timed_connect
    executor.install_model = timed("install_model", executor.install_model)
    executor.run_blocks = timed("run_blocks", executor.run_blocks)
    statistics = timed("statistics", pipeline.intensity_statistics)
    statistics_reads: dict[str, int] = {}

    def counted_statistics(*args: Any, **kwargs: Any) -> Any:
        before = dump_client.counts() if dump_client else {}
        try:
            return statistics(*args, **kwargs)
        finally:
            after = dump_client.counts() if dump_client else {}
            statistics_reads.update({k: after[k] - before[k] for k in ("logical_bytes", "physical_bytes", "page_bytes", "regions", "reads")} if after else {})  # noqa: E501

    pipeline.intensity_statistics = counted_statistics
    pipeline.finish_output = timed("finish_output", pipeline.finish_output)

    tiles = [0]

    def progress(n: int) -> None:
        if not tiles[0]:
            marks["first_tiles"] = clock()
        tiles[0] += n

    def on_start(plan: Any, link: Any) -> None:
        marks["on_start"] = clock()

    if params.get("blocks_in_flight"):  # an embedded worker's blocks at a time, other than tileseg's choice
        executor.blocks_in_flight = lambda device: int(params["blocks_in_flight"])
    kwargs = {key: params[key] for key in ("model", "tile", "overlap", "blend", "batch", "device", "workers") if key in params}
    if params.get("precision"):
        kwargs["precision"] = params["precision"]
    if params.get("threads"):  # torch threads per worker, other than tileseg's share of the cores
        kwargs["threads"] = int(params["threads"])
    with dask.config.set(config):
        cpu, children = time.process_time(), cpu_of_children()
        started = clock()
        report = pipeline.segment(params["input"], params["output"], overwrite=True, progress=progress, on_start=on_start, **kwargs)
        ended = clock()
        cpu = time.process_time() - cpu + cpu_of_children() - children
    if dump_client:
        dump_client()
    write_result(params, {
        "seconds": ended - started, "cpu_seconds": cpu, "report_seconds": report.seconds, "import_seconds": imported, "tiles_forwarded": report.tiles_forwarded,
        "tile_count": report.tile_count, "tiles_reported_by_progress": tiles[0], "blocks": report.blocks,
        "shape": list(report.shape), "foreground_voxels": report.foreground_voxels,
        "marks": {k: v - started for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
        "descendant_peaks_mib": worker_peaks, "descendant_commands": worker_commands, "worker_io": worker_io,
        "statistics_reads": statistics_reads, "client_io": proc_io(os.getpid()),
    })


def phases_of(result: dict[str, Any]) -> dict[str, float]:
    """Seconds of each phase of a ``child_segment`` run, from its marks (indented names are parts of the one above)."""
    m = result["marks"]
    spans = {
        "before cluster (checks, statistics, plan)": m["connect_start"],
        "  of which intensity statistics": m.get("statistics_end", 0.0) - m.get("statistics_start", 0.0),
        "cluster start": m["connect_end"] - m["connect_start"],
        "model on every worker": m["install_model_end"] - m["install_model_start"],
        "create output": m["run_blocks_start"] - m["install_model_end"],
        "blocks (read, forward, blend, write, pyramid)": m["run_blocks_end"] - m["run_blocks_start"],
        "  of which until the first tiles were reported": m.get("first_tiles", m["run_blocks_start"]) - m["run_blocks_start"],
        "cluster shut-down": m["shutdown_end"] - m["shutdown_start"],
        "finish output (metadata)": m["finish_output_end"] - m["finish_output_start"],
    }
    spans["other"] = result["seconds"] - sum(v for k, v in spans.items() if not k.startswith("  "))
    return spans


CHILDREN: dict[str, Callable[[dict[str, Any]], None]] = {"bare": child_bare, "segment": child_segment}


def child_main(argv: list[str], children: dict[str, Callable[[dict[str, Any]], None]]) -> bool:
    """If ``argv`` is ``--child KIND JSON``, run that child and return True."""
    if len(argv) == 3 and argv[0] == "--child":
        children[argv[1]](json.loads(argv[2]))
        return True
    return False


if __name__ == "__main__":
    if not child_main(sys.argv[1:], CHILDREN):
        raise SystemExit("usage: _measure.py --child KIND JSON (run by the benchmark scripts)")

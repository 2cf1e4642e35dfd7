"""Keep freed memory in the process for reuse, so that every forward does not page-fault it back.

A forward of a 64³ batch allocates and frees activations of 30-70 MB. glibc's malloc serves blocks
above 32 MB with fresh ``mmap`` regions and unmaps them again on ``free``: every forward then makes
the kernel find and zero those pages once more (about 160 000 page faults per batch of 4 of the
default network, nearly half its CPU time; ``benchmarks/allocator.py``). Raising the mmap and trim
thresholds keeps that memory in the heap for the next forward. One arena for all threads keeps a
worker thread's blocks in the main heap too: a thread's own arena maps a block above 64 MB afresh,
and drops its extra heaps once they are empty. glibc fixes a thread's arena at the thread's first
allocation, so :func:`~tilesegment.pipeline.segment` applies this before it starts the embedded
cluster (a worker process gets :data:`GLIBC_TUNABLES` in its environment; a worker started by hand
gets the setting when it loads the model, which may be after its threads chose their arenas). The
process's peak memory grows a little (memory is held at its peak instead of being handed back
between forwards, and the heap fragments).

Huge pages are not asked for either: numpy advises the kernel to back every array above 4 MB
with 2 MB pages (``MADV_HUGEPAGE``), and on a virtual machine whose host backs memory lazily a
fresh huge page cost 2.2-3.2 ms per MiB to fault against 0.5-0.95 ms for small pages (this
project's VM, benchmarks/RESULTS.md). tileseg's arrays are streamed through once per block, so
they gain nothing from larger pages, and the advice also sticks to the heap range the array
occupied, where the network's activations land next. Worker processes get
``NUMPY_MADVISE_HUGEPAGE=0`` (:data:`PROCESS_ENVIRONMENT`).

Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

__all__ = ["keep_freed_memory", "memory_available", "cgroup_room", "KEEP_BELOW", "GLIBC_TUNABLES", "PROCESS_ENVIRONMENT"]

log = logging.getLogger(__name__)

#: Blocks below this size come from (and go back to) the heap, not mmap; free memory at the top of
#: the heap is returned to the kernel only beyond it. Well above a forward's transient memory.
KEEP_BELOW = 1 << 30

#: The same settings for a process about to start (read by glibc before anything allocates, so
#: the single arena always holds): the environment of the worker processes tileseg spawns.
GLIBC_TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={KEEP_BELOW}:glibc.malloc.trim_threshold={KEEP_BELOW}"

#: The environment of a worker process tileseg spawns: the settings above, and numpy without
#: huge-page advice (numpy reads it at import).
PROCESS_ENVIRONMENT = {"MALLOC_TRIM_THRESHOLD_": KEEP_BELOW, "GLIBC_TUNABLES": GLIBC_TUNABLES, "NUMPY_MADVISE_HUGEPAGE": "0"}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_LOCK = threading.Lock()
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True where they took effect (glibc)."""
    global _applied
    with _LOCK:
        if _applied is None:
            _no_numpy_hugepages()
            _applied = _apply()
        return _applied


def _no_numpy_hugepages() -> None:
    """Stop numpy advising huge pages for the arrays it allocates from now on (see module docstring)."""
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray  # numpy 2 / 1.26
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = all(mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_THRESHOLD, KEEP_BELOW), (_M_TRIM_THRESHOLD, KEEP_BELOW), (_M_ARENA_MAX, 1)))
    if not done:
        log.debug("mallopt refused a setting; freed memory may be returned to the kernel between forwards")
    return done


#: where this process's cgroups are listed and mounted (module variables, so tests can point them elsewhere)
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def memory_available() -> int | None:
    """Bytes this process can still allocate without swapping or being killed: this machine's
    MemAvailable (/proc/meminfo), and no more than the room under the memory limits of this
    process's cgroup (a SLURM job's ``--mem``, a container's ``--memory``), which MemAvailable does
    not show. None where neither is known (not Linux)."""
    known = [room for room in (_meminfo_available(), cgroup_room()) if room is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_room() -> int | None:
    """The least room (limit less anonymous memory in use: the page cache can be reclaimed) under
    the memory limits of this process's cgroup and of each cgroup above it, cgroup v2 or v1; None
    where no limit applies or none can be read."""
    try:
        with open(PROC_CGROUP) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    rooms = []
    for _, controllers, path in entries:
        if controllers == "":  # v2: one hierarchy (at the root, or beside v1 controllers under unified/)
            layouts = [(base, "memory.max", "anon") for base in (CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified"))]
        elif "memory" in controllers.split(","):
            layouts = [(os.path.join(CGROUP_ROOT, "memory"), "memory.limit_in_bytes", "total_rss")]
        else:
            continue
        for base, limit_name, used_name in layouts:
            rooms += _rooms_up_to(base, path, limit_name, used_name)
    return min(rooms) if rooms else None


def _rooms_up_to(base: str, path: str, limit_name: str, used_name: str) -> list[int]:
    """limit - used of every limited cgroup from ``base/path`` up to ``base``."""
    rooms = []
    base = os.path.normpath(base)
    folder = os.path.normpath(os.path.join(base, path.lstrip("/")))
    while True:
        limit = _read_number(os.path.join(folder, limit_name))
        if limit is not None and limit < _NO_LIMIT:
            used = _stat_value(os.path.join(folder, "memory.stat"), used_name)
            rooms.append(max(0, limit - (used or 0)))
        if len(folder) <= len(base):  # base itself (or a path that climbed out of it)
            return rooms
        folder = os.path.dirname(folder)


def _read_number(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat_value(path: str, name: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None

"""Freed memory kept for reuse: a process that allocates and frees large blocks again and again (as
every forward does) stops page-faulting them back in. Each case runs in its own process, since the
setting is process-wide and cannot be undone. (Whether a worker thread's blocks share the main
arena depends on the threads that allocated before; benchmarks/allocator.py measures a real run.)"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tilesegment.allocator import GLIBC_TUNABLES

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

SCRIPT = """
import ctypes, resource, sys
from tilesegment.allocator import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # applied once, idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.memset.argtypes, libc.free.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], [ctypes.c_void_p]
size = 48 * 2**20

def forward():  # allocate, touch and free a block, as a forward does for an activation
    block = libc.malloc(size)
    assert block
    libc.memset(block, 1, size)
    libc.free(block)

forward()  # 48 MB: above the largest mmap threshold glibc picks by itself (32 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, env: dict[str, str] | None = None) -> int:
    environment = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                          env={**environment, **(env or {})})
    return int(done.stdout.strip())


def test_kept_memory_is_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 5 * 48 * 2**20 // 4096 // 2  # glibc's default: every 48 MB block mapped afresh
    assert kept < default / 20, (kept, default)


def test_worker_processes_get_the_same_settings_from_their_environment():
    """What an embedded cluster's worker processes start with (glibc ignores a tunable it rejects)."""
    from tilesegment.executor import EMBEDDED_CONFIG

    environment = {k.rsplit(".", 1)[1]: str(v) for k, v in EMBEDDED_CONFIG.items() if ".pre-spawn-environ." in k}
    assert environment["GLIBC_TUNABLES"] == GLIBC_TUNABLES
    default = page_faults("default")
    assert page_faults("default", environment) < default / 20


HUGEPAGE_SCRIPT = """
import sys
import numpy as np

if sys.argv[1] == "keep":
    from tilesegment.allocator import keep_freed_memory
    keep_freed_memory()
array = np.ones(64 * 2**20, np.uint8)
address = array.ctypes.data + array.nbytes // 2  # numpy advises whole 4 kB pages: the middle
start = None
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:  # a mapping's first line: its address range
        low, high = (int(a, 16) for a in head.split("-"))
        start = low if low <= address < high else None
    elif start is not None and head == "VmFlags:":
        print("hg" in line.split()[1:])
        break
"""


def advised_huge(mode: str, env: dict[str, str] | None = None) -> bool:
    environment = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    done = subprocess.run([sys.executable, "-c", HUGEPAGE_SCRIPT, mode], capture_output=True, text=True, check=True,
                          env={**environment, **(env or {})})
    return done.stdout.strip() == "True"


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="no transparent huge pages here")
def test_numpy_arrays_are_not_advised_onto_huge_pages():
    """numpy's default asks for huge pages (slow to fault on a lazily backed VM, see
    tilesegment.allocator); a tileseg process and its worker processes do not."""
    from tilesegment.executor import EMBEDDED_CONFIG

    assert advised_huge("default")  # numpy's own default on Linux, so the check below can fail
    assert not advised_huge("keep")
    environment = {k.rsplit(".", 1)[1]: str(v) for k, v in EMBEDDED_CONFIG.items() if ".pre-spawn-environ." in k}
    assert not advised_huge("default", environment)

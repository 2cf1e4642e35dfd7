"""Bytes a run reads from the disk for its input, from a cold page cache, with ample or little memory.

``performance.py`` counts what the blocks ask for, what their reads take from the file and the
4 KiB pages those reads touch: per block, with the file in the page cache. What a terabyte user
pays for is what comes off the disk, which depends on what the page cache still holds when a
block's neighbour reads the same pages (a box narrow in x touches whole rows of an MRC file, and
neighbouring blocks share a halo of ``tile - stride`` voxels). This script evicts the input's pages
(``posix_fadvise(DONTNEED)``), runs ``segment()`` in a fresh process and reads that process's
``read_bytes`` (``/proc/PID/io``: bytes fetched from the block device) around the call, for

* the MRC file and the same volume converted to OME-Zarr by ``tileseg convert``;
* an unlimited page cache, and the run in a memory cgroup whose limit leaves ``--budgets`` MiB
  beside the run's own peak memory (as a batch job's memory limit does: page cache counts
  against it). The limited runs need root and a cgroup memory controller; without them only the
  unlimited rows are measured, and the table says so.

The identity network keeps the runs short; the reads are the same for any network of this tile
size (the default model also reads a sample for its intensity statistics).

    python benchmarks/cold_reads.py                      # 1024³ int8 (1 GiB), budgets 64, 256 and 1024 MiB: about 4 minutes
    python benchmarks/cold_reads.py --size 512 --budgets 64

Writes benchmarks/results/cold_reads.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import MIB, identity_checkpoint, machine_info, machine_line, save_report, write_noise_mrc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RSS_MARGIN_MIB = 48  # beside the unlimited run's peak: allocator slack and the kernel's own charges


def files_of(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]


def evict(path: str) -> None:
    """Drop the page cache's copy of every file under ``path`` (written back first)."""
    os.sync()
    for name in files_of(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {key: int(value) for key, value in (line.split(": ") for line in f.read().splitlines() if line)}


def child(params: dict[str, Any]) -> None:
    """In the fresh process: everything imported first, then the counters around ``segment()``."""
    import importlib
    import resource

    for name in ("tilesegment.executor", "tilesegment.model", "tilesegment.predict"):  # Dask and PyTorch, before the count
        importlib.import_module(name)
    from tilesegment.pipeline import segment

    before, started = io_counters(), time.perf_counter()
    report = segment(params["input"], params["output"], model=params["model"], overwrite=True)
    seconds, after = time.perf_counter() - started, io_counters()
    print(json.dumps({"seconds": seconds, "read_bytes": after["read_bytes"] - before["read_bytes"],
                      "rchar": after["rchar"] - before["rchar"], "tiles": report.tiles_forwarded, "blocks": report.blocks,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _read_words(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


class MemoryCgroup:
    """A memory cgroup of this machine (v2 or v1) that a child process joins before it starts."""

    def __init__(self, path: str, version: int) -> None:
        self.path, self.version = path, version

    @classmethod
    def create(cls, name: str) -> "MemoryCgroup | None":
        candidates = [("/sys/fs/cgroup", 2), ("/sys/fs/cgroup/unified", 2), ("/sys/fs/cgroup/memory", 1)]
        for root, version in candidates:
            if version == 2 and "memory" not in _read_words(os.path.join(root, "cgroup.controllers")):
                continue
            if version == 1 and not os.path.exists(os.path.join(root, "memory.limit_in_bytes")):
                continue
            path = os.path.join(root, name)
            try:
                os.makedirs(path, exist_ok=True)
                group = cls(path, version)
                group.limit(None)
                return group
            except OSError:
                continue
        return None

    def limit(self, mib: float | None) -> None:
        name, unlimited = ("memory.max", "max") if self.version == 2 else ("memory.limit_in_bytes", "-1")
        with open(os.path.join(self.path, name), "w") as f:
            f.write(unlimited if mib is None else str(int(mib * MIB)))

    def join(self) -> None:  # in the child, before exec
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def run(params: dict[str, Any], group: MemoryCgroup | None) -> dict[str, Any]:
    evict(params["input"])
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(params)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, preexec_fn=group.join if group else None)
    if done.returncode:
        raise SystemExit(f"cold_reads: the run on {params['input']} failed (exit {done.returncode}); its error is above.")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="cube edge of the int8 volume (default 1024: 1 GiB)")
    parser.add_argument("--budgets", type=int, nargs="*", default=[64, 256, 1024],
                        help="MiB of page cache left beside the run's peak memory, one limited run each (default 64 256 1024)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--workdir", default=None, help="where the volumes go (default: a temporary folder on the disk of /var/tmp)")
    args = parser.parse_args()
    result: dict[str, Any] = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "size": args.size, "runs": []}
    group = MemoryCgroup.create(f"tileseg-cold-reads-{os.getpid()}") if args.budgets else None
    if args.budgets and group is None:
        print("cold_reads: no memory cgroup can be made here (needs root and a cgroup memory controller); measuring the unlimited runs only",
              file=sys.stderr)
    result["cgroup"] = f"v{group.version} {group.path}" if group else None
    try:
        with tempfile.TemporaryDirectory(prefix="tileseg-cold-", dir=args.workdir or "/var/tmp") as workdir:
            mrc = os.path.join(workdir, f"v{args.size}.mrc")
            write_noise_mrc(mrc, args.size, mode=0)
            model = os.path.join(workdir, "identity.safetensors")
            identity_checkpoint(model)
            from tilesegment.convert import convert

            zarr_input = os.path.join(workdir, f"v{args.size}.zarr")
            convert(mrc, zarr_input)
            inputs = {"MRC": (mrc, os.path.getsize(mrc)),
                      "OME-Zarr (tileseg convert)": (zarr_input, sum(os.path.getsize(f) for f in files_of(os.path.join(zarr_input, "0"))))}
            for kind, (path, nbytes) in inputs.items():
                params = {"input": path, "output": os.path.join(workdir, "seg.zarr"), "model": model}
                if group:
                    group.limit(None)
                free = run(params, group)
                result["runs"].append({"input": kind, "input_bytes": nbytes, "budget_mib": None, "limit_mib": None, **free})
                print(f"[{time.strftime('%H:%M:%S')}] {kind}, unlimited: {free['read_bytes'] / nbytes:.2f}× the input from disk", flush=True)
                for budget in (args.budgets if group else []):
                    limit = free["peak_rss_mib"] + RSS_MARGIN_MIB + budget
                    group.limit(limit)
                    limited = run(params, group)
                    result["runs"].append({"input": kind, "input_bytes": nbytes, "budget_mib": budget, "limit_mib": limit, **limited})
                    print(f"[{time.strftime('%H:%M:%S')}] {kind}, {budget} MiB of cache: {limited['read_bytes'] / nbytes:.2f}× the input from disk", flush=True)
    finally:
        if group:
            group.remove()
    save_report(args.out_dir, "cold_reads", result, report(result))


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = ["# Input bytes read from the disk (`benchmarks/cold_reads.py`)", "",
             f"- Command: `{result['command']}`", f"- Machine: {machine_line(result['machine'])}", f"- Date: {result['date']}",
             f"- {result['size']}³ int8 noise, identity network, default tile (64), overlap (0.25), block and chunk; "
             f"{runs[0]['blocks']} blocks, {runs[0]['tiles']} tiles. Before each run the input's pages were evicted from the page cache; "
             "each run is a fresh process. The OME-Zarr input's size is its level 0 (what the blocks read); the whole store with "
             "its pyramid is larger.",
             f"- Limited runs: {'a memory cgroup (' + result['cgroup'] + ') whose limit is the unlimited run’s peak RSS + ' + str(RSS_MARGIN_MIB) + ' MiB + the budget; the output’s and the journal’s pages count against it too' if result['cgroup'] else 'not measured: no memory cgroup could be made (needs root)'}.",
             "", "| input | page cache beside the run | cgroup limit MiB | read from the disk MiB | × input | through read calls × input | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        budget = "unlimited" if r["budget_mib"] is None else f"{r['budget_mib']} MiB"
        limit = "–" if r["limit_mib"] is None else f"{r['limit_mib']:.0f}"
        lines.append(f"| {r['input']} | {budget} | {limit} | {r['read_bytes'] / MIB:,.0f} | {r['read_bytes'] / r['input_bytes']:.2f} | "
                     f"{r['rchar'] / r['input_bytes']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "Read from the disk: the process's `read_bytes` (`/proc/PID/io`) around `segment()`, every thread: the input, "
              "and in the limited runs any page of the journal or the output that was read back after the cache had dropped it. "
              "Through read calls: its `rchar`, the bytes its read calls returned, page-cache hits included (the input's pages "
              "read again by neighbouring blocks, the journal's spill pieces and the output's units read back for the coarser "
              "levels).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()

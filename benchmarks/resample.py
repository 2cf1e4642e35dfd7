"""`tileseg convert --voxel-size`: time and peak memory of resampling, against the plain copy of the same MRC.

A CryoET Data Portal-like float32 noise tomogram at 13.48 Å/voxel is resampled to 10 Å (finer: 2.5×
the voxels, interpolation only) and one at 5 Å to 10 Å (coarser: smoothing, then interpolation),
each size in a fresh process, next to `convert()` without resampling. Memory should stay flat as
the volume grows: each output region needs only its own input region and a halo.

    python benchmarks/resample.py                     # 256³, 512³, 768³ (about 4 minutes)
    python benchmarks/resample.py --sizes 128 256     # quicker

Writes benchmarks/results/resample.json and .md.
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

from _measure import machine_info, machine_line, save_report, write_noise_mrc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = """
import json, sys, time
from tilesegment.convert import convert
source, output, target = sys.argv[1], sys.argv[2], None if sys.argv[3] == "-" else float(sys.argv[3])
started = time.perf_counter()
report = convert(source, output, voxel_size=target, overwrite=True)
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # KiB, this process's own
print(json.dumps({"seconds": seconds, "shape": list(report.shape), "levels": report.levels, "peak_rss_mib": peak / 1024}))
"""


def convert_in_a_process(source: str, output: str, target: float | None) -> dict[str, Any]:
    """One ``convert()`` in a fresh Python, with its peak RSS (VmHWM: the rusage of a child counts its
    parent's memory at the fork)."""
    done = subprocess.run([sys.executable, "-c", CHILD, source, output, "-" if target is None else str(target)],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"convert failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    result: dict[str, Any] = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "runs": []}
    cases = [(13.48, 10.0), (5.0, 10.0)]
    with tempfile.TemporaryDirectory(prefix="tileseg-resample-") as workdir:
        for size in args.sizes:
            for voxel, target in cases:
                source = os.path.join(workdir, f"v{size}.mrc")
                write_noise_mrc(source, size, voxel_size=voxel)
                for goal in (target, None):
                    run = convert_in_a_process(source, os.path.join(workdir, "out.zarr"), goal)
                    run.update(size=size, voxel=voxel, target=goal, input_mib=size**3 * 4 / 2**20)
                    result["runs"].append(run)
                    print(f"{size}³ at {voxel} Å -> {goal or 'copy'}: {run['seconds']:.1f} s, {run['peak_rss_mib']:.0f} MiB", flush=True)
                os.remove(source)
    lines = ["# Resampling in `tileseg convert --voxel-size` (`benchmarks/resample.py`)", "", f"- Command: `{result['command']}`",
             f"- Machine: {machine_line(result['machine'])}", f"- Date: {result['date']}",
             "- float32 N(0, 1) noise MRC, default chunks (64³) and pyramid, 2 threads; each convert in a fresh process.", "",
             "| input | voxel size | output | wall s | MiB/s of input | output voxels/s (M) | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        voxels = r["shape"][0] * r["shape"][1] * r["shape"][2]
        what = f"{r['voxel']:g} → {r['target']:g} Å" if r["target"] else f"{r['voxel']:g} Å, copied"
        lines.append(f"| {r['size']}³ ({r['input_mib']:,.0f} MiB) | {what} | {'×'.join(map(str, r['shape']))} | {r['seconds']:.1f} | "
                     f"{r['input_mib'] / r['seconds']:.0f} | {voxels / r['seconds'] / 1e6:.1f} | {r['peak_rss_mib']:.0f} |")
    lines.append("")
    save_report(args.out_dir, "resample", result, "\n".join(lines))


if __name__ == "__main__":
    main()

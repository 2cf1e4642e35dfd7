"""Peak memory per process of `tileseg run` as the volume grows (the design claims it is flat).

Runs `tileseg run` in a fresh process for each cubic volume size, with an identity network so the
figures are about tileseg's own buffers (tiles, accumulators, spill pieces, Zarr chunks), not the
network's activations. Reports the peak RSS of the client process (with the embedded scheduler) and the largest of its
child processes (the workers), read as VmHWM from /proc while the run goes: the memory one worker needs.

    python benchmarks/memory_scaling.py --sizes 128 256 384 [--out benchmarks/results/memory_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import mrcfile
import numpy as np

from _measure import descendants, peak_rss_mib  # VmHWM from /proc, shared with performance.py


def make_volume(path: str, size: int) -> None:
    with mrcfile.new_mmap(path, shape=(size, size, size), mrc_mode=2, overwrite=True) as mrc:
        rng = np.random.default_rng(0)
        for z in range(0, size, 32):
            mrc.data[z : z + 32] = rng.normal(size=mrc.data[z : z + 32].shape).astype(np.float32)
        mrc.voxel_size = 10.0


def identity_checkpoint(path: str) -> None:
    from tilesegment.model import ModelConfig, build_model, save_checkpoint

    config = ModelConfig(architecture="identity", channels=(), class_names=("background", "value"),
                         normalization="none", output="none")
    save_checkpoint(path, build_model(config), config)


def measure(size: int, workdir: str, model: str) -> dict:
    src = os.path.join(workdir, f"v{size}.mrc")
    subprocess.run([sys.executable, __file__, "--make", src, str(size)], check=True)
    command = [sys.executable, "-m", "tilesegment.cli.main", "-q", "run", src, os.path.join(workdir, f"s{size}.zarr"),
               "--model", model, "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    main_peak, worker_peak = 0.0, 0.0
    while proc.poll() is None:
        main_peak = max(main_peak, peak_rss_mib(proc.pid))
        for pid in descendants(proc.pid):
            worker_peak = max(worker_peak, peak_rss_mib(pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"tileseg run failed for {size}³ (exit {proc.returncode})")
    os.remove(src)
    return {"size": size, "voxels": size**3, "seconds": round(seconds, 2),
            "client_peak_rss_mib": round(main_peak, 1), "worker_peak_rss_mib": round(worker_peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--out", default=None)
    parser.add_argument("--make", nargs=2, metavar=("PATH", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        return make_volume(args.make[0], int(args.make[1]))
    with tempfile.TemporaryDirectory() as workdir:
        model = os.path.join(workdir, "identity.safetensors")
        identity_checkpoint(model)
        rows = [measure(size, workdir, model) for size in args.sizes]
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    print("| size | voxels | wall s | client peak RSS MiB | worker peak RSS MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}³ | {r['voxels']:,} | {r['seconds']} | {r['client_peak_rss_mib']} | {r['worker_peak_rss_mib']} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

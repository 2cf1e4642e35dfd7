"""The bare network's forward time with glibc's default allocator settings and with the ones
tileseg's workers use (``tilesegment.allocator.keep_freed_memory``), each in its own process.

    python benchmarks/allocator.py              # 256³, 3 rounds (about 4 minutes on 2 cores)
    python benchmarks/allocator.py --size 128 --rounds 2

Each round runs both cases in turn (same volume, tiles, batches and threads as ``performance.py``'s
bare network); the median and range over rounds are reported. Writes
benchmarks/results/allocator.json and prints a markdown line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import CHILDREN, child_main, machine_info, machine_line, spawn_child, write_noise_mrc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"tile": 64, "overlap": 0.25, "batch": 4, "device": "cpu", "model": None}
CASES = {"glibc defaults": False, "kept for reuse": True}


def main() -> None:
    if child_main(sys.argv[1:], CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="tileseg-allocator-") as workdir:
        volume = os.path.join(workdir, "v.mrc")
        write_noise_mrc(volume, args.size, seed=args.size)
        for _ in range(args.rounds):
            for case, keep in CASES.items():
                result, peaks = spawn_child(os.path.abspath(__file__), "bare", {**SETTINGS, "input": volume, "keep_freed_memory": keep}, workdir)
                runs[case].append({"seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                                   "peak_rss_mib": peaks.get("root", result.get("self_peak_rss_mib"))})
                print(f"[{time.strftime('%H:%M:%S')}] {case}: {result['seconds']:.2f} s", file=sys.stderr, flush=True)
    median = {case: statistics.median(r["seconds"] for r in values) for case, values in runs.items()}
    result = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "settings": {**SETTINGS, "size": args.size},
              "rounds": args.rounds, "runs": runs, "median_seconds": median,
              "kept_over_default": median["kept for reuse"] / median["glibc defaults"]}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "allocator.json"), "w") as f:
        json.dump(result, f, indent=2)
    line = "; ".join(f"{case} {median[case]:.2f} s ({min(r['seconds'] for r in runs[case]):.2f}–{max(r['seconds'] for r in runs[case]):.2f}), "
                     f"peak RSS {statistics.median(r['peak_rss_mib'] for r in runs[case]):.0f} MiB" for case in CASES)
    print(f"Bare network, {args.size}³, {args.rounds} rounds on {machine_line(result['machine'])}: {line}; "
          f"kept/default {result['kept_over_default']:.3f}×")


if __name__ == "__main__":
    main()

"""One or two blocks in flight per embedded CPU worker, against the bare network (issue #4).

On a GPU a worker runs two blocks at once: one block's tiles on the device while the other reads,
blends and writes. Whether that pays on a CPU, where the network already uses every core, is
measured here: rounds of (bare network, ``segment()`` with 1 block in flight, ``segment()`` with 2
as tileseg would run them, with the cores shared among the block threads, i.e. 1 torch thread
each on 2 cores, and with 2 blocks whose forwards each get every core, the predictor letting one
forward run at a time), interleaved so that a slow spell of the machine hits every case alike,
each in its own process, reporting the median and range of each and of the ratios within a round.

    python benchmarks/blocks_in_flight.py                  # 256³, 3 rounds (about 2 minutes on 2 cores)
    python benchmarks/blocks_in_flight.py --size 128 --rounds 2

Writes benchmarks/results/blocks_in_flight.json and .md (the markdown is printed as well).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import CHILDREN, child_main, machine_info, machine_line, phases_of, save_report, spawn_child, write_noise_mrc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"tile": 64, "overlap": 0.25, "blend": "gaussian", "batch": 4, "device": "cpu", "model": None}
#: case: (blocks in flight (0: the bare network), torch threads (None: tileseg's choice))
CASES = {"bare": (0, None), "1 block in flight": (1, None), "2 blocks in flight": (2, None),
         "2 blocks in flight, 2 torch threads each": (2, 2)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def markdown(result: dict[str, Any]) -> str:
    runs, size = result["runs"], result["settings"]["size"]
    bare = [r["seconds"] for r in runs["bare"]]
    lines = [f"# Blocks in flight per CPU worker, {size}³", "", f"- Command: `{result['command']}`",
             f"- Machine: {machine_line(result['machine'])}; {result['date']}",
             f"- {result['settings']['rounds']} rounds of the cases in turn; default model, tile 64, overlap 0.25, "
             "gaussian, batch 4, MRC in, OME-Zarr out", "",
             "| case | wall s, median (range) | over bare, same round | CPU s | peak RSS MiB |", "|---|---|---|---|---|"]
    for case in CASES:
        if case not in runs:  # a results file from before the case existed
            continue
        seconds = [r["seconds"] for r in runs[case]]
        ratios = [s / b for s, b in zip(seconds, bare)]
        lines.append(f"| {case} | {spread(seconds)} | {spread(ratios, 3)} | {spread([r['cpu_seconds'] for r in runs[case]], 1)} | "
                     f"{spread([r['peak_rss_mib'] for r in runs[case]], 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if child_main(sys.argv[1:], CHILDREN):
        return
    if sys.argv[1:2] == ["--markdown"]:  # re-write the table of a results file
        with open(sys.argv[2]) as f:
            print(markdown(json.load(f)), end="")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    script = os.path.abspath(__file__)
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tileseg-inflight-") as workdir:
        volume = os.path.join(workdir, "v.mrc")
        write_noise_mrc(volume, args.size, seed=args.size)
        for round_ in range(args.rounds):
            for case in CASES:
                params = {**SETTINGS, "input": volume}
                in_flight, threads = CASES[case]
                if in_flight:
                    params.update(output=os.path.join(workdir, "out.zarr"), blocks_in_flight=in_flight, threads=threads)
                result, peaks = spawn_child(script, "bare" if case == "bare" else "segment", params, workdir)
                row = {"seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"], "peak_rss_mib": max(peaks["root"], peaks["child"])}
                if case != "bare":
                    row["phases"] = phases_of(result)
                runs[case].append(row)
                log(f"round {round_ + 1} {case}: {row['seconds']:.2f} s, peak {row['peak_rss_mib']:.0f} MiB")
    result = {"command": " ".join(["python", os.path.relpath(script), *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine_info(), "settings": {**SETTINGS, "size": args.size, "rounds": args.rounds}, "runs": runs,
              "total_seconds": time.perf_counter() - started}
    save_report(args.out_dir, "blocks_in_flight", result, markdown(result))


if __name__ == "__main__":
    main()

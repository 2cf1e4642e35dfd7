"""How much of a block's other work could hide behind the CPU network: the idle room in its forwards.

On a GPU the device computes while the host reads, blends and writes, so that work can overlap the
network. On a CPU the network's threads are the cores. This measures what is left over: a loop of
forwards of the packaged network (batches of 4 × 64³, all usable cores) alone, and again with a
second thread that repeats a block's finishing work (normalise, label, compress 8 chunks, write a
spill piece) as fast as it is allowed to, at three priorities:

* ``normal``: the thread competes with the network's threads as an equal;
* ``nice 19`` and ``SCHED_IDLE``: it runs only where a core would otherwise idle.

Each case reports the loop's wall time and the background work done (in seconds of that work run
alone). Overlap pays only where the work done exceeds the loop's slowdown. ``--passive`` repeats
the whole run with ``OMP_WAIT_POLICY=PASSIVE`` (the network's threads sleep at once instead of
spinning when they wait), in a child process since OpenMP reads it at start.

    python benchmarks/overlap_headroom.py            # about 2 minutes on 2 cores
    python benchmarks/overlap_headroom.py --passive

Writes benchmarks/results/overlap_headroom.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import machine_info, machine_line, save_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = ("none", "normal", "nice 19", "SCHED_IDLE")


def measure(rounds: int, batches: int) -> dict[str, Any]:
    import numcodecs
    import numpy as np
    import torch

    from tilesegment.allocator import keep_freed_memory
    from tilesegment.executor import default_torch_threads
    from tilesegment.model import for_inference, load_checkpoint, read_checkpoint

    keep_freed_memory()
    torch.set_num_threads(default_torch_threads())
    model = for_inference(load_checkpoint(read_checkpoint(None))[0])
    x = torch.randn(4, 1, 64, 64, 64)
    acc = np.random.default_rng(0).random((3, 144, 144, 144), dtype=np.float32)
    codec = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    scratch = tempfile.NamedTemporaryFile(prefix="overlap-", suffix=".bin")

    def finish_a_block() -> None:  # what a block does after its forwards, at a 128³ block
        probabilities = np.divide(acc[:-1, :128, :128, :128], acc[-1, :128, :128, :128] + 1)
        labels = np.greater(probabilities[1], probabilities[0]).astype(np.uint8)
        for z in (0, 64):
            for y in (0, 64):
                for x0 in (0, 64):
                    codec.encode(np.ascontiguousarray(labels[z:z + 64, y:y + 64, x0:x0 + 64]))
        scratch.seek(0)
        scratch.write(acc[:, :16].tobytes())

    def forwards() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for _ in range(batches):
                torch.softmax(model(x), 1)
            return time.perf_counter() - started

    with torch.inference_mode():
        model(x)
    started = time.perf_counter()
    for _ in range(5):
        finish_a_block()
    unit = (time.perf_counter() - started) / 5

    results: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
    for _ in range(rounds):
        for policy in POLICIES:
            done, stop = [0], threading.Event()

            def background() -> None:
                tid = threading.get_native_id()
                if policy == "SCHED_IDLE":
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                elif policy == "nice 19":
                    os.setpriority(os.PRIO_PROCESS, tid, 19)
                while not stop.is_set():
                    finish_a_block()
                    done[0] += 1

            thread = threading.Thread(target=background) if policy != "none" else None
            if thread:
                thread.start()
            wall = forwards()
            stop.set()
            if thread:
                thread.join()
            results[policy].append({"loop_seconds": wall, "background_work_seconds": done[0] * unit})
    return {"unit_seconds": unit, "runs": results,
            "median": {p: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for p, runs in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16, help="forwards of 4 × 64³ per loop (default 16)")
    parser.add_argument("--passive", action="store_true", help="also with OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.child:
        import json

        print(json.dumps(measure(args.rounds, args.batches)))
        return
    import json

    result: dict[str, Any] = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "cases": {}}
    for label, env in [("default", {})] + ([("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"})] if args.passive else []):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(args.rounds),
                              "--batches", str(args.batches)], env={**os.environ, **env}, check=True, capture_output=True, text=True)
        result["cases"][label] = json.loads(out.stdout.strip().splitlines()[-1])
    lines = ["# Room for overlap beside the CPU network (`benchmarks/overlap_headroom.py`)", "",
             f"- Command: `{result['command']}`", f"- Machine: {machine_line(result['machine'])}", f"- Date: {result['date']}",
             f"- A loop of {args.batches} forwards of 4 × 64³ (packaged network, all usable cores) with a thread repeating a block's "
             f"finishing work beside it; medians of {args.rounds} rounds.", "",
             "| OpenMP waiting | background thread | loop s | × alone | background work done s | work done − slowdown s |",
             "|---|---|---|---|---|---|"]
    for label, case in result["cases"].items():
        alone = case["median"]["none"]["loop_seconds"]
        for policy in POLICIES:
            m = case["median"][policy]
            gain = m["background_work_seconds"] - (m["loop_seconds"] - alone)
            lines.append(f"| {label} | {policy} | {m['loop_seconds']:.2f} | {m['loop_seconds'] / alone:.3f} | "
                         f"{m['background_work_seconds']:.2f} | {gain:+.2f} |")
    lines.append("")
    save_report(args.out_dir, "overlap_headroom", result, "\n".join(lines))


if __name__ == "__main__":
    main()

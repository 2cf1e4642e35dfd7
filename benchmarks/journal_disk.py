"""Disk taken by a run's journal while it runs: with spent pieces dropped (tileseg) and kept to the end.

A done block's record holds the spill pieces its upper neighbours take (the weighted sums of the
summed channels, float32, as thick as the tiles reach past the block: one channel for the default
model and for the identity network; see ``tilesegment.blending``). tileseg rewrites a record with its counts alone once every block that takes one of its
pieces is done (``tilesegment.plan.SpentPieces``, ``BlockJournal.drop_pieces``). This runs
``segment()`` on the same volume twice, once as shipped and once with dropping turned off, samples
the journal folder's size every 0.2 s, and reports the peak of each with the run's wall time
(``--rounds``: both runs again, in the other order each round).

    python benchmarks/journal_disk.py                 # 768³ int8, identity network (about 1 minute)
    python benchmarks/journal_disk.py --size 512 --model default

Writes benchmarks/results/journal_disk.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import identity_checkpoint, machine_info, machine_line, save_report, write_noise_mrc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def folder_bytes(path: str) -> int:
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:  # renamed or replaced meanwhile
                    pass
    except FileNotFoundError:
        pass
    return total


def run(volume: str, output: str, model: str | None, drop: bool) -> dict[str, Any]:
    from tilesegment.journal import JOURNAL_DIR, BlockJournal
    from tilesegment.pipeline import segment

    original = BlockJournal.drop_pieces
    if not drop:
        BlockJournal.drop_pieces = lambda self, index: None  # type: ignore[method-assign]
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], folder_bytes(os.path.join(output, JOURNAL_DIR)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        report = segment(volume, output, model=model, overwrite=True)
    finally:
        stop.set()
        sampler.join()
        BlockJournal.drop_pieces = original  # type: ignore[method-assign]
    return {"dropped": drop, "seconds": time.perf_counter() - started, "peak_journal_bytes": peak[0],
            "blocks": report.blocks, "tiles": report.tiles_forwarded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--model", choices=["identity", "default"], default="identity")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both runs, the order swapped each round (default 1)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    result: dict[str, Any] = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "size": args.size,
                              "model": args.model, "runs": []}
    with tempfile.TemporaryDirectory(prefix="tileseg-journal-") as workdir:
        volume = os.path.join(workdir, f"v{args.size}.mrc")
        write_noise_mrc(volume, args.size, mode=0 if args.model == "identity" else 2)
        model = None
        if args.model == "identity":
            model = os.path.join(workdir, "identity.safetensors")
            identity_checkpoint(model)
        for round_ in range(args.rounds):
            for drop in ((True, False) if round_ % 2 == 0 else (False, True)):
                result["runs"].append(run(volume, os.path.join(workdir, "seg.zarr"), model, drop))
    input_bytes = args.size**3 * (1 if args.model == "identity" else 4)
    lines = ["# A run's journal on disk (`benchmarks/journal_disk.py`)", "", f"- Command: `{result['command']}`",
             f"- Machine: {machine_line(result['machine'])}", f"- Date: {result['date']}",
             f"- {args.size}³ {'int8' if args.model == 'identity' else 'float32'} noise MRC ({input_bytes / 2**20:,.0f} MiB), "
             f"{args.model} network, default tile, overlap, block and chunk; {result['runs'][0]['blocks']} blocks.", "",
             "| run | spent pieces | peak journal MiB | × input | wall s |", "|---|---|---|---|---|"]
    for k, r in enumerate(result["runs"], 1):
        lines.append(f"| {k} | {'dropped (tileseg)' if r['dropped'] else 'kept to the end'} | {r['peak_journal_bytes'] / 2**20:,.0f} | "
                     f"{r['peak_journal_bytes'] / input_bytes:.2f} | {r['seconds']:.1f} |")
    lines.append("")
    save_report(args.out_dir, "journal_disk", result, "\n".join(lines))


if __name__ == "__main__":
    main()

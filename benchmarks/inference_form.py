"""The packaged default network in the forms it can run in: forward time on the same batches.

Three forms of the same function (``tilesegment.model.for_inference`` makes the last, which every
segmentation runs): as trained; batch norms folded into the convolutions; folded and channels-last
(``NDHWC``, oneDNN's fast order for 3D convolutions on the CPU). Then the final form's time per tile
at several batch sizes, which is why ``tilesegment.plan.batches`` avoids a lone leftover tile.

    python benchmarks/inference_form.py               # 5 rounds of 12 batches of 4 × 64³ (about 2 minutes on 2 cores)

Each round times the forms one after the other in this process (same threads, same inputs, after a
warm-up forward each); the median and range over rounds are reported, with the largest difference
of each form's softmax output from the trained form's. Writes benchmarks/results/inference_form.json
and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import machine_info, machine_line  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()

    import torch

    from tilesegment.allocator import keep_freed_memory
    from tilesegment.executor import default_torch_threads
    from tilesegment.model import for_inference, load_checkpoint, read_checkpoint

    keep_freed_memory()  # the process as tileseg's workers run it
    torch.set_num_threads(default_torch_threads())
    plain, _ = load_checkpoint(read_checkpoint(None))
    plain.eval()
    folded = copy.deepcopy(plain)
    for_inference(folded).to(memory_format=torch.contiguous_format)  # folded only
    final = for_inference(copy.deepcopy(plain))
    forms = {"as trained": plain, "folded": folded, "folded, channels-last (tileseg)": final}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1, 64, 64, 64, generator=generator) for _ in range(args.batches)]
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        reference = torch.softmax(plain(batches[0]), 1)
        difference = {name: float((torch.softmax(model(batches[0]), 1) - reference).abs().max()) for name, model in forms.items()}
        for _ in range(args.rounds):
            for name, model in forms.items():
                model(batches[0])  # warm-up
                started = time.perf_counter()
                for x in batches:
                    torch.softmax(model(x), 1)
                times[name].append(time.perf_counter() - started)
        per_tile: dict[int, float] = {}
        for size in (1, 2, 3, 4, 8):
            x = torch.randn(size, 1, 64, 64, 64, generator=generator)
            final(x)
            runs = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                for _ in range(max(1, 8 // size)):
                    torch.softmax(final(x), 1)
                runs.append((time.perf_counter() - started) / (max(1, 8 // size) * size))
            per_tile[size] = statistics.median(runs)
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["as trained"]
    result = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "rounds": args.rounds,
              "batches": args.batches, "seconds": times, "median_seconds": median,
              "over_as_trained": {name: m / base for name, m in median.items()},
              "max_softmax_difference": difference, "final_form_seconds_per_tile_by_batch": per_tile}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "inference_form.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.batches} batches of 4 × 64³, {args.rounds} rounds on {machine_line(result['machine'])}:\n")
    print("| form | median s (range) | × as trained | largest softmax difference |\n|---|---|---|---|")
    for name in forms:
        print(f"| {name} | {median[name]:.2f} ({min(times[name]):.2f}–{max(times[name]):.2f}) | {median[name] / base:.3f} | {difference[name]:.1e} |")
    print("\nThe last form, seconds per tile by batch size: " + ", ".join(f"{k}: {v:.3f}" for k, v in per_tile.items()))


if __name__ == "__main__":
    main()

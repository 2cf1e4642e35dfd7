"""The packaged default network as trained against the form tileseg runs (batch norms folded into
the convolutions, ``tilesegment.model.for_inference``): forward time on the same batches.

    python benchmarks/fold_batchnorm.py               # 5 rounds of 12 batches of 4 × 64³ (about 4 minutes on 2 cores)

Each round times both forms one after the other in this process (same threads, same inputs, after
a warm-up forward each); the median and range over rounds are reported, with the largest difference
between the two forms' softmax outputs. Writes benchmarks/results/fold_batchnorm.json and prints
a markdown line.
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

    from tilesegment.executor import default_torch_threads
    from tilesegment.model import for_inference, load_checkpoint, read_checkpoint

    torch.set_num_threads(default_torch_threads())
    plain, _ = load_checkpoint(read_checkpoint(None))
    folded = for_inference(copy.deepcopy(plain))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1, 64, 64, 64, generator=generator) for _ in range(args.batches)]
    times: dict[str, list[float]] = {"as trained": [], "folded": []}
    with torch.inference_mode():
        difference = float((torch.softmax(plain(batches[0]), 1) - torch.softmax(folded(batches[0]), 1)).abs().max())
        for _ in range(args.rounds):
            for name, model in (("as trained", plain), ("folded", folded)):
                started = time.perf_counter()
                for x in batches:
                    model(x)
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {"command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "rounds": args.rounds,
              "batches": args.batches, "seconds": times, "median_seconds": median,
              "folded_over_plain": median["folded"] / median["as trained"], "max_softmax_difference": difference}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "fold_batchnorm.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{args.batches} batches of 4 × 64³, {args.rounds} rounds on {machine_line(result['machine'])}: as trained "
          f"{median['as trained']:.2f} s ({min(times['as trained']):.2f}–{max(times['as trained']):.2f}), folded "
          f"{median['folded']:.2f} s ({min(times['folded']):.2f}–{max(times['folded']):.2f}): "
          f"{result['folded_over_plain']:.3f}×; largest softmax difference {difference:.1e}")


if __name__ == "__main__":
    main()

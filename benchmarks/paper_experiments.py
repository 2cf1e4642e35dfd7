"""Reproduce the two experiments of Liu et al. (ICIP 2018) on tileseg's simulator.

1. **Baseline vs encoder-decoder across SNR.** For each SNR, both networks are trained to segment
   one macromolecule of interest (``--target``, default 4v4r, the 70S ribosome) against everything else in
   crowded tomograms of all 16 kinds, then tested on a new tomogram: IoU of the target class.
2. **Structures absent from training.** Both networks are trained to segment every macromolecule
   against background on 12 kinds, then tested on a new tomogram of those kinds and on one made
   only of the 4 kinds never seen in training: foreground IoU.

Inference is ``tileseg run``'s library call (tiles, blending, Zarr), scoring is ``tileseg evaluate``'s.
Same seeds, crops (40³, as the paper's subtomograms), widths and steps for both networks.

    python benchmarks/paper_experiments.py [--snr 1 0.3 0.1 0.03] [--steps 500] [--train 4] [--repeats 2]

``--repeats N`` runs every cell N times with new simulated data and a new training seed, and reports
the mean and the range, so a difference between the networks can be read against run-to-run spread.
Each finished cell is saved to ``--out`` at once; ``--resume`` keeps the cells already there (same
settings: data, seeds and training are deterministic) and runs only the missing ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import mrcfile
import numpy as np

from tilesegment.evaluate import evaluate
from tilesegment.pipeline import segment
from tilesegment.simulate import SimulationConfig, list_templates, simulate_volume
from tilesegment.train import TrainConfig, Volume, train

HELD_OUT = ("1bxn", "3cf3", "4cr2", "6pxm")
ARCHITECTURES = {"ssn3d-fcn": "FCN baseline", "ssn3d-encdec": "encoder-decoder"}


def volumes(kinds, snr, seeds, shape):
    out = []
    for seed in seeds:
        sim = simulate_volume(SimulationConfig(shape=shape, templates=tuple(kinds), snr=snr, seed=seed))
        out.append(Volume(sim.tomogram, sim.labels, name=f"seed {seed}"))
    return out


def write_mrc(path, data):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 10.0


def test_iou(model, test: Volume, truth: np.ndarray, work: str) -> float:
    tomo, truth_path, seg = (os.path.join(work, f) for f in ("test.mrc", "truth.mrc", "seg.zarr"))
    write_mrc(tomo, test.tomogram)
    write_mrc(truth_path, truth.astype(np.int8))
    segment(tomo, seg, model=model, tile=40, overlap=0.25, overwrite=True)
    return round(evaluate(seg, truth_path).score(1).iou or 0.0, 4)


def fit(arch, train_volumes, val_volumes, classes, kinds, args, path, seed):
    config = TrainConfig(architecture=arch, channels=tuple(args.channels), crop=40, batch=4, max_steps=args.steps,
                         validate_every=max(1, args.steps // 6), patience=3, learning_rate=2e-3, seed=seed)
    report = train(train_volumes, val_volumes, path, config, classes=classes, kinds=kinds)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03])
    parser.add_argument("--target", default="4v4r")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--channels", type=int, nargs=3, default=[8, 16, 32])
    parser.add_argument("--out", default="benchmarks/results/paper_experiments.json")
    parser.add_argument("--resume", action="store_true", help="keep the finished cells in --out and run the rest")
    args = parser.parse_args()
    shape = (args.size,) * 3
    started = time.perf_counter()
    kinds = list_templates()
    settings = {"shape": list(shape), "train_tomograms": args.train, "steps": args.steps, "crop": 40,
                "channels": args.channels, "target": args.target, "held_out": list(HELD_OUT)}
    rows_snr, rows_held, seconds_before = [], [], 0
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            before = json.load(f)
        if {k: v for k, v in before["settings"].items() if k != "repeats"} != settings:
            sys.exit(f"{args.out} was made with other settings; leave out --resume or use another --out")
        rows_snr, rows_held, seconds_before = before["snr_experiment"], before["held_out_experiment"], before.get("seconds", 0)

    def have(rows, **cell):
        return any(all(row.get(k) == v for k, v in cell.items()) for row in rows)

    def save():
        result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
                  "seconds": round(seconds_before + time.perf_counter() - started),
                  "settings": {**settings, "repeats": args.repeats}, "snr_experiment": rows_snr, "held_out_experiment": rows_held}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "m.safetensors")
        for snr in args.snr:
            for repeat in range(args.repeats):
                seeds = range(100 + 1000 * repeat, 100 + 1000 * repeat + args.train + 2)
                data = volumes(kinds, snr, seeds, shape)
                truth = data[-1].labels == kinds.index(args.target) + 1
                for arch, name in ARCHITECTURES.items():
                    if have(rows_snr, snr=snr, repeat=repeat, network=name):
                        continue
                    report = fit(arch, data[: args.train], data[args.train : args.train + 1], f"target:{args.target}",
                                 kinds, args, model, seed=repeat)
                    rows_snr.append({"snr": snr, "repeat": repeat, "network": name, "target_iou": test_iou(model, data[-1], truth, work),
                                     "validation_iou": round(report.best_validation_iou, 4), "steps": report.steps})
                    print(rows_snr[-1], flush=True)
                    save()
        seen = [k for k in kinds if k not in HELD_OUT]
        for repeat in range(args.repeats):
            base = 200 + 1000 * repeat
            data = volumes(seen, 0.5, range(base, base + args.train + 2), shape)
            unseen = volumes(HELD_OUT, 0.5, [base + 100], shape)[0]
            for arch, name in ARCHITECTURES.items():
                if have(rows_held, repeat=repeat, network=name):
                    continue
                fit(arch, data[: args.train], data[args.train : args.train + 1], "foreground", seen, args, model, seed=repeat)
                rows_held.append({"network": name, "snr": 0.5, "repeat": repeat,
                                  "iou_training_kinds": test_iou(model, data[-1], data[-1].labels > 0, work),
                                  "iou_held_out_kinds": test_iou(model, unseen, unseen.labels > 0, work)})
                print(rows_held[-1], flush=True)
                save()
    save()
    print(table(args, rows_snr, rows_held))


def summary(values) -> str:
    """Mean, and the range when there is more than one repeat."""
    values = list(values)
    mean = f"{np.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.3f}–{max(values):.3f})"


def table(args, rows_snr, rows_held) -> str:
    lines = ["| SNR | FCN baseline IoU | encoder-decoder IoU |", "|---|---|---|"]
    for snr in args.snr:
        cells = [summary(r["target_iou"] for r in rows_snr if r["snr"] == snr and r["network"] == name) for name in ARCHITECTURES.values()]
        lines.append(f"| {snr:g} | {cells[0]} | {cells[1]} |")
    lines += ["", "| network | IoU, training kinds | IoU, 4 held-out kinds |", "|---|---|---|"]
    for name in ARCHITECTURES.values():
        rows = [r for r in rows_held if r["network"] == name]
        lines.append(f"| {name} | {summary(r['iou_training_kinds'] for r in rows)} | {summary(r['iou_held_out_kinds'] for r in rows)} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()

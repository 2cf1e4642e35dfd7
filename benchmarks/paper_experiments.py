"""Reproduce the two experiments of Liu et al. (ICIP 2018) on tileseg's simulator.

1. **Baseline vs encoder-decoder across SNR.** For each SNR, both networks are trained to segment
   one macromolecule of interest (``--target``, default 4v4r, the 70S ribosome) against everything else in
   crowded tomograms of all 16 kinds, then tested on a new tomogram: IoU of the target class.
2. **Structures absent from training.** Both networks are trained to segment every macromolecule
   against background on 12 kinds, then tested on a new tomogram of those kinds and on one made
   only of the 4 kinds never seen in training: foreground IoU.

Inference is ``tileseg run``'s library call (tiles, blending, Zarr), scoring is ``tileseg evaluate``'s.
Same seeds, crops (40³, as the paper's subtomograms), widths and steps for both networks.

    python benchmarks/paper_experiments.py [--snr 1 0.3 0.1 0.05] [--steps 300] [--train 4]
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


def fit(arch, train_volumes, val_volumes, classes, kinds, args, path):
    config = TrainConfig(architecture=arch, channels=tuple(args.channels), crop=40, batch=4, max_steps=args.steps,
                         validate_every=max(1, args.steps // 6), patience=3, learning_rate=2e-3, seed=0)
    report = train(train_volumes, val_volumes, path, config, classes=classes, kinds=kinds)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.05])
    parser.add_argument("--target", default="4v4r")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--channels", type=int, nargs=3, default=[8, 16, 32])
    parser.add_argument("--out", default="benchmarks/results/paper_experiments.json")
    args = parser.parse_args()
    shape = (args.size,) * 3
    started = time.perf_counter()
    kinds = list_templates()
    rows_snr, rows_held = [], []
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "m.safetensors")
        for snr in args.snr:
            data = volumes(kinds, snr, range(100, 100 + args.train + 2), shape)
            target_label = kinds.index(args.target) + 1
            truth = data[-1].labels == target_label
            for arch, name in ARCHITECTURES.items():
                report = fit(arch, data[: args.train], data[args.train : args.train + 1], f"target:{args.target}", kinds, args, model)
                iou = test_iou(model, data[-1], truth, work)
                rows_snr.append({"snr": snr, "network": name, "target_iou": iou, "validation_iou": round(report.best_validation_iou, 4),
                                 "steps": report.steps})
                print(rows_snr[-1], flush=True)
        seen = [k for k in kinds if k not in HELD_OUT]
        data = volumes(seen, 0.5, range(200, 200 + args.train + 2), shape)
        unseen = volumes(HELD_OUT, 0.5, [300], shape)[0]
        for arch, name in ARCHITECTURES.items():
            report = fit(arch, data[: args.train], data[args.train : args.train + 1], "foreground", seen, args, model)
            rows_held.append({"network": name, "snr": 0.5,
                              "iou_training_kinds": test_iou(model, data[-1], data[-1].labels > 0, work),
                              "iou_held_out_kinds": test_iou(model, unseen, unseen.labels > 0, work)})
            print(rows_held[-1], flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "seconds": round(time.perf_counter() - started),
              "settings": {"shape": list(shape), "train_tomograms": args.train, "steps": args.steps, "crop": 40,
                           "channels": args.channels, "target": args.target, "held_out": list(HELD_OUT)},
              "snr_experiment": rows_snr, "held_out_experiment": rows_held}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| SNR | FCN baseline IoU | encoder-decoder IoU |\n|---|---|---|")
    for snr in args.snr:
        r = {row["network"]: row["target_iou"] for row in rows_snr if row["snr"] == snr}
        print(f"| {snr:g} | {r['FCN baseline']:.3f} | {r['encoder-decoder']:.3f} |")
    print("\n| network | IoU, training kinds | IoU, 4 held-out kinds |\n|---|---|---|")
    for row in rows_held:
        print(f"| {row['network']} | {row['iou_training_kinds']:.3f} | {row['iou_held_out_kinds']:.3f} |")


if __name__ == "__main__":
    main()

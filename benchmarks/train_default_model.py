"""Train the default model that ships with tileseg, and measure it on tomograms it has never seen.

Recipe (all simulated with :mod:`tilesegment.simulate`, 10 Å/voxel, crowded, ±60° missing wedge,
3 µm underfocus at 300 kV):

* kinds: 12 of the 16 shipped complexes; 4 (``HELD_OUT``) are kept out of training entirely;
* training: ``--train`` tomograms of 128³, validation: 2 more, each at an SNR drawn log-uniformly
  from 0.3-3; targets: every macromolecule voxel vs background (label 1 vs 0);
* network: SSN3D encoder-decoder, widths 8/16/32, 48³ crops, AdamW, early stopping on validation IoU;
* test: new seeds, 160³, (a) all 16 kinds, (b) only the 4 held-out kinds, at SNR 1 and 0.3,
  segmented end to end by ``tileseg run``'s library call and scored by ``tileseg evaluate``'s.

    python benchmarks/train_default_model.py --out tilesegment/data/default_model.safetensors
    python benchmarks/train_default_model.py --retest    # the shipped model's figures again, with the current code
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

HELD_OUT = ("1bxn", "3cf3", "4cr2", "6pxm")  # RuBisCO, ..., 26S proteasome, ... never seen in training


def simulated(kinds, seed, snr, shape=(128, 128, 128)) -> Volume:
    sim = simulate_volume(SimulationConfig(shape=shape, templates=tuple(kinds), snr=snr, seed=seed))
    return Volume(sim.tomogram, sim.labels, name=f"seed {seed}, snr {snr:.2f}")


def write_mrc(path, data, voxel=10.0):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel


def test_model(model: str) -> list[dict]:
    """The model card's figures: new 160³ tomograms (seed 5000), segmented by ``segment()`` and scored by ``evaluate()``."""
    tests = []
    with tempfile.TemporaryDirectory() as work:
        for name, test_kinds in (("all 16 kinds", list_templates()), ("4 held-out kinds only", list(HELD_OUT))):
            for snr in (1.0, 0.3):
                sim = simulate_volume(SimulationConfig(shape=(160, 160, 160), templates=tuple(test_kinds), snr=snr, seed=5000))
                tomo, truth, seg = (os.path.join(work, f) for f in ("t.mrc", "truth.mrc", "seg.zarr"))
                write_mrc(tomo, sim.tomogram)
                write_mrc(truth, (sim.labels > 0).astype(np.int8))
                segment(tomo, seg, model=model, overwrite=True)
                scores = evaluate(seg, truth)
                tests.append({"test": name, "snr": snr, "shape": [160, 160, 160], "seed": 5000,
                              "foreground_iou": round(scores.foreground.iou, 4), "foreground_dice": round(scores.foreground.dice, 4)})
                print(tests[-1], flush=True)
    return tests


def retest(args: argparse.Namespace) -> None:
    """Measure the model at ``--out`` again with the code as it is now (no training), and record the
    new figures beside the training record in ``--results``."""
    import subprocess

    with open(args.results) as f:
        result = json.load(f)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    result["retested"] = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "commit": commit,
                          "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "tests": test_model(args.out)}
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["retested"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tilesegment/data/default_model.safetensors")
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--results", default="benchmarks/results/default_model.json")
    parser.add_argument("--retest", action="store_true", help="no training: measure the model at --out again with the current code")
    args = parser.parse_args()
    if args.retest:
        retest(args)
        return
    started = time.perf_counter()
    kinds = [k for k in list_templates() if k not in HELD_OUT]
    rng = np.random.default_rng(2026)
    snrs = np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=args.train + 2))
    volumes = [simulated(kinds, 1000 + i, float(s)) for i, s in enumerate(snrs)]
    print(f"simulated {len(volumes)} tomograms in {time.perf_counter() - started:.0f} s", flush=True)
    config = TrainConfig(channels=(8, 16, 32), crop=48, batch=4, max_steps=args.steps, validate_every=100, patience=4, centred_crops=0.0,
                         learning_rate=2e-3, seed=0,
                         description=f"SSN3D encoder-decoder trained by benchmarks/train_default_model.py on {args.train} simulated "
                                     f"crowded 128³ tomograms (10 Å/voxel, SNR 0.3-3, ±60° wedge) of {len(kinds)} complexes; "
                                     f"held out: {', '.join(HELD_OUT)}",
                         extra={"trained_on": kinds, "held_out": list(HELD_OUT)})
    report = train(volumes[:-2], volumes[-2:], args.out, config, classes="foreground",
                   progress=lambda step, r: print(f"step {step}: loss {r['loss']:.4f} val IoU {r['validation_iou']:.4f}", flush=True))
    tests = test_model(args.out)
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "trained_on": kinds, "held_out": list(HELD_OUT),
              "training": {"steps": report.steps, "best_step": report.best_step, "best_validation_iou": round(report.best_validation_iou, 4),
                           "seconds": round(report.seconds), "stopped_early": report.stopped_early, "history": list(report.history)},
              "tests": tests}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(tests, indent=2))


if __name__ == "__main__":
    main()

"""Reduced precision against fp32: what ``--precision bf16`` (and tf32, fp16 on a GPU) costs in accuracy
and gains in speed (GitHub issue #4: "optional bf16/fp16 autocast, with a measured accuracy impact").

With the packaged default model, tile 64, overlap 0.25, gaussian blending and batch 4, every run in
its own child process (Python's imports outside the timings):

1. accuracy: ``--seeds`` new simulated crowded tomograms (``--size``³, SNR 1, the 16 shipped
   complexes, seeds 7000 on, which training never used) segmented by ``segment()`` in each precision
   and scored against the simulation's ground truth (foreground IoU, ``tilesegment.evaluate``), and
   each precision's labels compared voxel by voxel with fp32's;
2. speed: ``--rounds`` rounds, in each the bare network (``_measure.child_bare``: the same tiles,
   module, batch and threads, no I/O) and ``segment()`` end to end on a ``--time-size``³ float32
   noise MRC, once per precision, one after the other; medians over rounds.

Whether bf16 is faster depends on the processor: on a CPU with AVX512-BF16 or AMX, oneDNN runs bf16
convolutions natively; without them it may well be slower than fp32. The table says which
instructions the machine has.

    python benchmarks/precision.py                     # CPU: fp32 and bf16 (about 4 minutes on 2 cores)
    python benchmarks/precision.py --device cuda       # adds tf32 and fp16
    python benchmarks/precision.py --quick             # small sizes, one round, for development

Writes benchmarks/results/precision.json and precision.md (the markdown is printed as well).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import CHILDREN, child_main, code_fingerprint, machine_info, machine_line, save_report, spawn_child, write_noise_mrc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"tile": 64, "overlap": 0.25, "blend": "gaussian", "batch": 4}
FIRST_SEED = 7000  # the default model was trained on seeds 1000-1009 and tested on 5000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def labels_of(output: str) -> Any:
    import numpy as np
    import zarr

    return np.asarray(zarr.open_array(f"{output}/0", mode="r")[...])


def accuracy(args: argparse.Namespace, precisions: list[str], workdir: str, script: str) -> list[dict[str, Any]]:
    import numpy as np

    from tilesegment.demo import prepare_demo
    from tilesegment.evaluate import evaluate

    rows = []
    for i in range(args.seeds):
        seed = FIRST_SEED + i
        files = prepare_demo(os.path.join(workdir, f"tomogram-{seed}"), args.size, seed=seed)
        log(f"simulated {args.size}³ seed {seed} ({files.particles} particles)")
        row: dict[str, Any] = {"seed": seed, "size": args.size, "particles": files.particles, "runs": {}}
        reference = None
        for precision in precisions:
            output = os.path.join(workdir, f"seg-{seed}-{precision}.zarr")
            run, _ = spawn_child(script, "segment", {**SETTINGS, "device": args.device, "input": files.mrc, "output": output,
                                                     "model": None, "precision": precision}, workdir)
            score = evaluate(output, files.truth).foreground
            labels = labels_of(output)
            if reference is None:
                reference = labels
            same = float(np.count_nonzero(labels == reference)) / labels.size
            row["runs"][precision] = {"iou": score.iou, "dice": score.dice, "agreement_with_fp32": same, "seconds": run["seconds"]}
            log(f"  {precision}: IoU {score.iou:.4f}, {100 * same:.3f} % of voxels as fp32's, {run['seconds']:.2f} s")
        rows.append(row)
    return rows


def speed(args: argparse.Namespace, precisions: list[str], workdir: str, script: str) -> list[dict[str, Any]]:
    volume = os.path.join(workdir, f"noise-{args.time_size}.mrc")
    write_noise_mrc(volume, args.time_size, mode=2, seed=args.time_size)
    rounds = []
    for r in range(args.rounds):
        log(f"round {r + 1} of {args.rounds} at {args.time_size}³")
        entry: dict[str, Any] = {}
        for precision in precisions:
            common = {**SETTINGS, "device": args.device, "input": volume, "model": None, "precision": precision}
            bare, _ = spawn_child(script, "bare", {**common, "device": "cuda:0" if args.device == "cuda" else args.device}, workdir)
            run, peaks = spawn_child(script, "segment", {**common, "output": os.path.join(workdir, "timed.zarr")}, workdir)
            entry[precision] = {"bare_seconds": bare["seconds"], "segment_seconds": run["seconds"], "tiles": bare["tiles"],
                                "tiles_forwarded": run["tiles_forwarded"], "peak_rss_mib": peaks["root"]}
            log(f"  {precision}: bare network {bare['seconds']:.2f} s, segment() {run['seconds']:.2f} s")
        rounds.append(entry)
    return rounds


def summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per precision: mean IoU, its change from fp32, the least agreement, and median times and ratios."""
    precisions, out = result["precisions"], {}
    for p in precisions:
        ious = [row["runs"][p]["iou"] for row in result["accuracy"]]
        rounds = result["speed"]
        s: dict[str, float] = {"mean_iou": statistics.fmean(ious), "min_agreement": min(row["runs"][p]["agreement_with_fp32"] for row in result["accuracy"])}
        s["mean_iou_change"] = s["mean_iou"] - statistics.fmean(row["runs"]["fp32"]["iou"] for row in result["accuracy"])
        if rounds:
            s["bare_seconds"] = statistics.median(r[p]["bare_seconds"] for r in rounds)
            s["segment_seconds"] = statistics.median(r[p]["segment_seconds"] for r in rounds)
            s["segment_over_bare"] = statistics.median(r[p]["segment_seconds"] / r[p]["bare_seconds"] for r in rounds)
            s["bare_over_fp32"] = statistics.median(r[p]["bare_seconds"] / r["fp32"]["bare_seconds"] for r in rounds)
            s["segment_over_fp32"] = statistics.median(r[p]["segment_seconds"] / r["fp32"]["segment_seconds"] for r in rounds)
        out[p] = s
    return out


def markdown(r: dict[str, Any]) -> str:
    s, precisions, summ = r["settings"], r["precisions"], r["summary"]
    flags = ", ".join(r["machine"].get("cpu_matrix_flags", [])) or "none of avx512_bf16, avx512_fp16, amx_bf16, amx_fp16"
    lines = ["# Reduced precision against fp32 (`benchmarks/precision.py`)", "",
             f"- Command: `{r['command']}`",
             f"- Machine: {machine_line(r['machine'])}; the processor's bf16/fp16 instructions: {flags}",
             f"- Date: {r['date']}; whole benchmark {r['minutes']:.1f} min; tilesegment {r['version']}, source fingerprint {r['source_fingerprint']}",
             f"- Settings: the packaged default model, tile {s['tile']}, overlap {s['overlap']}, {s['blend']} blending, batch {s['batch']}, "
             f"device {s['device']}; every run in its own process. Every figure below is measured in this run.", "",
             f"## Accuracy: {len(r['accuracy'])} simulated {s['size']}³ tomograms (SNR 1, 16 complexes, seeds {FIRST_SEED} on)", "",
             "| precision | " + " | ".join(f"IoU seed {row['seed']}" for row in r["accuracy"]) + " | mean IoU | change from fp32 | "
             "labels as fp32's, least of the tomograms |",
             "|---|" + "---|" * len(r["accuracy"]) + "---|---|---|"]
    for p in precisions:
        ious = " | ".join(f"{row['runs'][p]['iou']:.4f}" for row in r["accuracy"])
        lines.append(f"| {p} | {ious} | {summ[p]['mean_iou']:.4f} | {summ[p]['mean_iou_change']:+.4f} | {100 * summ[p]['min_agreement']:.3f} % |")
    if r["speed"]:
        lines += ["", f"## Speed: {s['time_size']}³ float32 noise MRC, {len(r['speed'])} rounds (medians; ratios taken within a round)", "",
                  "| precision | bare network s | × fp32's | `segment()` end to end s | × fp32's | `segment()` / bare network |",
                  "|---|---|---|---|---|---|"]
        for p in precisions:
            v = summ[p]
            lines.append(f"| {p} | {v['bare_seconds']:.2f} | {v['bare_over_fp32']:.3f} | {v['segment_seconds']:.2f} | {v['segment_over_fp32']:.3f} | "
                         f"{v['segment_over_bare']:.3f} |")
        lines += ["", "Rounds (s): " + "; ".join(
            f"{i + 1}: " + ", ".join(f"{p} {e[p]['bare_seconds']:.2f} bare / {e[p]['segment_seconds']:.2f} segment" for p in precisions)
            for i, e in enumerate(r["speed"]))]
    return "\n".join(lines) + "\n"


def main() -> int:
    if child_main(sys.argv[1:], CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default="cpu", help="cpu (fp32, bf16) or cuda (also tf32, fp16)")
    parser.add_argument("--size", type=int, default=192, help="edge of the simulated tomograms for accuracy (default 192)")
    parser.add_argument("--seeds", type=int, default=3, help="simulated tomograms for accuracy (default 3)")
    parser.add_argument("--time-size", type=int, default=256, help="edge of the noise volume for speed (default 256; 0 skips)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the speed comparison (default 3)")
    parser.add_argument("--quick", action="store_true", help="96³, one tomogram, 128³ timing in one round")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.seeds, args.time_size, args.rounds = 96, 1, 128, 1

    import torch

    import tilesegment

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("precision: skipped: --device cuda, but PyTorch sees no CUDA GPU here. Nothing was measured.")
        return 0
    from tilesegment.predict import native_cpu_bf16

    if args.device == "cpu" and not native_cpu_bf16():
        print("precision: skipped: this CPU has neither AVX512-BF16 nor AMX, so tileseg refuses --precision bf16 here "
              "(PyTorch would emulate it at 100-350x fp32's time). Nothing was measured.")
        return 0
    precisions = ["fp32", "bf16"] + (["tf32", "fp16"] if args.device.startswith("cuda") else [])
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
        "settings": {**SETTINGS, "device": args.device, "size": args.size, "time_size": args.time_size},
        "precisions": precisions, "version": tilesegment.__version__, "source_fingerprint": code_fingerprint(),
    }
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="tileseg-precision-", dir=args.workdir) as workdir:
        result["accuracy"] = accuracy(args, precisions, workdir, script)
        result["speed"] = []
        save_report(args.out_dir, "precision", result, markdown({**result, "minutes": (time.perf_counter() - started) / 60, "summary": summary(result)}))  # kept if speed is cut short
        result["speed"] = speed(args, precisions, workdir, script) if args.time_size else []
    result["minutes"] = (time.perf_counter() - started) / 60
    result["summary"] = summary(result)
    save_report(args.out_dir, "precision", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

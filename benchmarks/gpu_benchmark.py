"""One-command GPU benchmark: tileseg end to end on a GPU against the bare network's limit.

With the packaged default model, tile 64, overlap 0.25, gaussian blending and batch 8 on
``--device cuda``, measures (each in its own child process, Python imports outside the timings):

* the limit: the bare network's forward time (+ softmax) for exactly the tiles of tileseg's global
  grid, same module, device, batch and torch threads, inference mode, after a warm-up forward, the
  batches already on the GPU (see ``_measure.child_bare``);
* tileseg's ``segment()`` end to end (MRC in, compressed OME-Zarr out, cluster start-up included,
  and also from the cluster being up).

and reports voxels/s of both, their ratio (target: tileseg ≥ 0.85 of the bare throughput), the
network's own time inside tileseg's run (forward hooks) and the GPU's name; and the bare network
in the other memory order (channels-last weights, which tileseg uses on the CPU), to decide CUDA's;
and on a GPU the bare network with ``torch.backends.cudnn.benchmark`` on, to decide whether tileseg
should turn it on, and with ``torch.backends.cudnn.deterministic`` off, to show what tileseg's
deterministic algorithms cost (these variants for the first precision only). ``--precision tf32``,
``bf16`` (or fp16) runs the network in that precision too, only where
tileseg's ``segment()`` takes a ``precision`` argument (checked with ``inspect.signature``).
Without a CUDA GPU it says so and exits 0; ``--device cpu`` runs the same steps on the CPU (a check
of the script itself, before a lent GPU's minutes are spent on it). ``--blocks-in-flight`` runs
``segment()`` again with other numbers of blocks at once on the GPU worker, for the first precision
only: tileseg runs 2 (one on the device while the other reads, blends and writes), and whether the
CPU side of two blocks keeps a fast GPU busy is what this measures.

    python benchmarks/gpu_benchmark.py                     # 512³, fp32
    python benchmarks/gpu_benchmark.py --size 768 --precision fp32 bf16
    python benchmarks/gpu_benchmark.py --blocks-in-flight 2 4 8   # fp32 with 4 and 8 blocks at once too
    python benchmarks/gpu_benchmark.py --device cpu --size 96 --precision fp32 bf16 --out-dir /tmp/gpu-smoke

Writes benchmarks/results/gpu.json and gpu.md (the markdown is printed as well).
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import (CHILDREN, READ_COUNTS_ENV, child_main, code_fingerprint, machine_info, machine_line, phases_of,  # noqa: E402
                      read_counts, save_report, spawn_child, write_noise_mrc)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 0.85  # tileseg's throughput over the bare network's, at least


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = ["# tileseg on a GPU (`benchmarks/gpu_benchmark.py`)", "",
             f"- Command: `{r['command']}`",
             f"- Machine: {machine_line(r['machine'])}; {r['gpus']} GPU(s) used by tileseg's embedded cluster",
             f"- Date: {r['date']}; tilesegment {r['version']}, source fingerprint {r['source_fingerprint']}",
             f"- Settings: the packaged default model, {s['size']}³ float32 MRC of noise, tile {s['tile']}, overlap {s['overlap']}, "
             f"{s['blend']} blending, batch {s['batch']}, device {s['device']}. Every figure is measured in this run.", ""]
    if r.get("precision_note"):
        lines += [r["precision_note"], ""]
    lines += ["| precision | blocks in flight | bare network s | bare voxels/s | tileseg `segment()` s | tileseg voxels/s | tileseg / bare throughput "
              f"(target ≥ {TARGET}) | met | from cluster up: s, × bare throughput | network time inside the run s, / wall | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    default = s.get("blocks_in_flight")
    for row in r["rows"]:
        flight = row.get("blocks_in_flight", default)
        flight = f"{flight} (tileseg's)" if flight == default else str(flight)
        lines.append(f"| {row['precision']} | {flight} | {row['bare_seconds']:.2f} | {row['bare_voxels_per_s']:,.0f} | {row['seconds']:.2f} | "
                     f"{row['voxels_per_s']:,.0f} | {row['ratio']:.3f} | {'yes' if row['ratio'] >= TARGET else '**no**'} | "
                     f"{row['seconds_after_cluster_up']:.2f}, {row['ratio_after_cluster_up']:.3f} | "
                     f"{row['network_seconds_inside_run']:.2f}, {row['network_seconds_inside_run'] / row['seconds']:.3f} | "
                     f"{max(row['client_peak_rss_mib'], row['worker_peak_rss_mib']):,.0f} |")
    lines.append("")
    lines += ["The bare network in the other memory order (tileseg's CUDA default is the first): " + "; ".join(
        f"{row['precision']}: channels_last={row['bare'].get('channels_last')} {row['bare_seconds']:.2f} s, "
        f"channels_last={row['bare_other_memory_order'].get('channels_last')} {row['bare_other_memory_order']['seconds']:.2f} s"
        for row in r["rows"] if row.get("bare_other_memory_order") and row.get("blocks_in_flight", default) == default), ""]
    tuned = [row for row in r["rows"] if row.get("bare_cudnn_benchmark") and row.get("blocks_in_flight", default) == default]
    if tuned:
        lines += ["The bare network with `torch.backends.cudnn.benchmark = True` (cuDNN times its algorithms for every new input "
                  "shape; tileseg leaves it off, see `tilesegment/predict.py`): " + "; ".join(
                      f"{row['precision']}: {row['bare_cudnn_benchmark']['seconds']:.2f} s against {row['bare_seconds']:.2f} s "
                      f"({row['bare_seconds'] / row['bare_cudnn_benchmark']['seconds']:.2f}× as fast; its warm-up forward "
                      f"{row['bare_cudnn_benchmark']['warmup_seconds']:.2f} s)" for row in tuned), ""]
    loose = [row for row in r["rows"] if row.get("bare_nondeterministic") and row.get("blocks_in_flight", default) == default]
    if loose:
        lines += ["The bare network with `torch.backends.cudnn.deterministic = False` (cuDNN free to choose algorithms that add "
                  "in any order; tileseg asks for deterministic ones, see `tilesegment.predict.cudnn_math`): " + "; ".join(
                      f"{row['precision']}: {row['bare_nondeterministic']['seconds']:.2f} s against {row['bare_seconds']:.2f} s "
                      f"({row['bare_seconds'] / row['bare_nondeterministic']['seconds']:.2f}× as fast)" for row in loose), ""]
    if r["gpus"] > 1:
        lines += [f"The bare figure is one GPU's, times {r['gpus']} (ideal scaling): tileseg's embedded cluster uses every GPU.", ""]
    lines += ["Phases of each `segment()` run (s): " + "; ".join(
        f"{row['precision']}, {row.get('blocks_in_flight', default)} in flight: "
        + ", ".join(f"{k.strip()} {v:.2f}" for k, v in row["phases"].items() if not k.startswith("  "))
        for row in r["rows"]), ""]
    return "\n".join(lines)


def main() -> int:
    if child_main(sys.argv[1:], CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic test volume (default 512)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", nargs="+", default=["fp32"],
                        help="network precisions to run (fp32, and tf32/bf16/fp16 where segment() takes a precision)")
    parser.add_argument("--blocks-in-flight", type=int, nargs="+", default=None, metavar="N",
                        help="also run segment() with N blocks at once on the GPU worker (first precision only; tileseg's "
                             "own choice always runs): how much CPU work beside the GPU keeps it busy")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_benchmark: skipped: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False: no GPU, a CPU-only "
              f"PyTorch build ({torch.__version__}), or CUDA_VISIBLE_DEVICES hides it). Nothing was measured.")
        return 0

    import tilesegment
    from tilesegment.errors import OptionError
    from tilesegment.executor import blocks_in_flight, embedded_worker_count
    from tilesegment.predict import check_precision
    from tilesegment.pipeline import segment

    takes_precision = "precision" in inspect.signature(segment).parameters
    precisions, note = [], None
    for p in args.precision:
        if p == "fp32" or takes_precision:
            precisions.append(p)
    skipped = [p for p in args.precision if p not in precisions]
    if skipped:
        note = (f"Precision(s) {', '.join(skipped)} skipped: this tilesegment's `segment()` takes no `precision` argument, "
                "so tileseg cannot run them.")
        log(note)
    refused = []  # what tileseg refuses here (on a CPU: what it would emulate), as a check of the script
    for p in list(precisions):
        try:
            check_precision(p, args.device, on_this_machine=True)
        except OptionError as exc:
            precisions.remove(p)
            refused.append(f"{p} ({exc.what})")
    if refused:
        note = " ".join(filter(None, [note, f"Refused by tileseg on this machine, so not run: {'; '.join(refused)}."]))
        log(note)
    gpus = embedded_worker_count(args.device)
    settings = {"size": args.size, "tile": 64, "overlap": 0.25, "blend": "gaussian", "batch": args.batch, "device": args.device,
                "blocks_in_flight": blocks_in_flight(args.device)}
    result: dict[str, Any] = {
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "settings": settings, "gpus": gpus,
        "version": tilesegment.__version__, "source_fingerprint": code_fingerprint(), "precision_note": note, "rows": [],
    }
    voxels = args.size**3
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory(prefix="tileseg-gpu-", dir=args.workdir) as workdir:
        volume = os.path.join(workdir, f"v{args.size}.mrc")
        write_noise_mrc(volume, args.size, mode=2, seed=args.size)
        common = {k: settings[k] for k in ("tile", "overlap", "blend", "batch", "device")}
        for order, precision in enumerate(precisions):
            extra = {} if precision == "fp32" and not takes_precision else {"precision": precision}
            log(f"bare network, {precision} ...")
            # the bare limit on one GPU, with the torch threads one of tileseg's GPU workers gets
            bare, _ = spawn_child(script, "bare", {**common, **extra, "input": volume, "model": None, "workers": gpus,
                                                   "device": "cuda:0" if args.device == "cuda" else args.device}, workdir)
            log(f"  {bare['seconds']:.2f} s for {bare['tiles']} tiles")
            other = tuned = loose = None
            if order == 0:  # the variants for the first precision only, to keep the run short
                # the other memory order, for the record: tileseg runs CUDA networks channels-first until this says otherwise
                other, _ = spawn_child(script, "bare", {**common, **extra, "input": volume, "model": None, "workers": gpus,
                                                        "device": bare["device"], "channels_last": not bare.get("channels_last", False)}, workdir)
                log(f"  {other['seconds']:.2f} s with channels_last={other.get('channels_last')}")
            if order == 0 and bare["device"].startswith("cuda"):
                # cuDNN timing its algorithms per shape, which tileseg does not ask for
                tuned, _ = spawn_child(script, "bare", {**common, **extra, "input": volume, "model": None, "workers": gpus,
                                                        "device": bare["device"], "cudnn_benchmark": True}, workdir)
                log(f"  {tuned['seconds']:.2f} s with torch.backends.cudnn.benchmark=True (warm-up {tuned['warmup_seconds']:.2f} s)")
                # cuDNN free to pick nondeterministic algorithms (tileseg asks for deterministic ones: predict.cudnn_math)
                loose, _ = spawn_child(script, "bare", {**common, **extra, "input": volume, "model": None, "workers": gpus,
                                                        "device": bare["device"], "cudnn_deterministic": False}, workdir)
                log(f"  {loose['seconds']:.2f} s with torch.backends.cudnn.deterministic=False")
            variants = [None] + [n for n in (args.blocks_in_flight or []) if order == 0 and n != settings["blocks_in_flight"]]
            for in_flight in variants:
                log(f"segment() {precision}" + (f", {in_flight} blocks in flight" if in_flight else "") + " ...")
                output = os.path.join(workdir, "seg.zarr")
                counts = tempfile.mkdtemp(prefix="counts-", dir=workdir)  # the network's time inside the run (forward hooks)
                run, peaks = spawn_child(script, "segment", {**common, **extra, "input": volume, "output": output, "model": None,
                                                             "read_counts": counts, "blocks_in_flight": in_flight},
                                         workdir, env={READ_COUNTS_ENV: counts})
                network = sum(c.get("forward_seconds", 0.0) for c in read_counts(counts).values())
                shutil.rmtree(output, ignore_errors=True)
                bare_rate = voxels / bare["seconds"] * gpus
                after = run["seconds"] - run["marks"]["on_start"]
                row = {"precision": precision, "blocks_in_flight": in_flight or settings["blocks_in_flight"],
                       "bare_seconds": bare["seconds"], "bare_voxels_per_s": bare_rate, "bare": bare,
                       "bare_other_memory_order": other, "bare_cudnn_benchmark": tuned, "bare_nondeterministic": loose,
                       "seconds": run["seconds"], "voxels_per_s": voxels / run["seconds"], "seconds_after_cluster_up": after,
                       "tiles_forwarded": run["tiles_forwarded"], "tile_count": run["tile_count"], "phases": phases_of(run),
                       "network_seconds_inside_run": network,
                       "client_peak_rss_mib": peaks["root"], "worker_peak_rss_mib": peaks["child"]}
                row["ratio"] = row["voxels_per_s"] / bare_rate
                row["ratio_after_cluster_up"] = voxels / after / bare_rate
                log(f"  {run['seconds']:.2f} s: {row['ratio']:.3f} of the bare throughput")
                result["rows"].append(row)
                save_report(args.out_dir, "gpu", result, markdown(result))  # after every row: a run cut short keeps its rows
    save_report(args.out_dir, "gpu", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

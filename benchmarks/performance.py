"""The whole performance comparison of tileseg in one command (GitHub issue #4).

Runs, in one process tree (every measurement in its own child process, so each peak RSS is its own
and Python's import time stays outside the timings), with the packaged default model (an SSN3D
encoder-decoder), tile 64, overlap 0.25, gaussian blending and batch 4 everywhere:

1. the limit: the bare network's forward time for exactly the tiles `tileseg run` forwards (same
   BlockPlan, module, device and torch thread count, inference mode, after a warm-up forward, no
   I/O) against `segment()`'s end-to-end wall time (MRC in, compressed Zarr out, cluster start-up
   included, and also without it);
2. the peer: MONAI's `sliding_window_inference` (same tile, overlap, gaussian window: tileseg's, given as
   `roi_weight_map`, since MONAI's own floors weights at 1e-3; same batch, model
   + softmax, threads) on the same volume held in memory: wall time and peak RSS against tileseg's
   (1 and 2 run in ``--rounds`` rounds of bare network, ``segment()`` and MONAI one after the other,
   every other round in reverse order; ratios are taken within a round and their median reported,
   as single runs on a VM vary);
3. scale: wall time and peak RSS of `segment()` at each size, plus one volume larger than MONAI
   could hold in this machine's RAM (an identity network there, said so in the table);
4. tiles forwarded over the global grid's tile count, and the bytes read from the input, computed
   from the plan and counted in the run;
5. `tileseg convert` throughput against reading the MRC and compressing the same chunks alone;
6. the 1- and 2-worker embedded clusters, and the cost of starting each (cluster + model per worker).

    python benchmarks/performance.py                   # 128³, 256³ (3 rounds), 512³ + an oversize volume (about 20 min on 2 cores)
    python benchmarks/performance.py --quick           # tiny sizes, a minute or two, for development
    python benchmarks/performance.py --sizes 128 256 --oversize 0

Writes benchmarks/results/performance.json and performance.md (the markdown is printed as well).
Needs MONAI: pip install -e '.[benchmark]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import (CHILDREN, GIB, MIB, child_main, code_fingerprint, machine_info, phases_of, machine_line, meminfo_bytes, plan_for,  # noqa: E402
                      planned_block_read_bytes, read_counts, save_report, spawn_child, write_noise_mrc, write_result, identity_checkpoint)

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"tile": 64, "overlap": 0.25, "blend": "gaussian", "batch": 4, "device": "cpu"}
TARGETS = {"end_to_end_over_bare": 1.10, "peak_rss_growth": 1.30, "tile_redundancy": 1.00}
MONAI_MISSING = ("MONAI is not installed, and the comparison with MONAI's sliding_window_inference needs it. "
                 "Install the benchmark extra: pip install -e '.[benchmark]' (or pip install 'monai>=1.3').")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# children specific to this benchmark (the bare network and segment() live in _measure.py)


def child_monai(params: dict[str, Any]) -> None:
    """MONAI's sliding-window inference of the whole volume in memory, timed from the MRC read on."""
    import mrcfile
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from tilesegment.allocator import keep_freed_memory
    from tilesegment.blending import window
    from tilesegment.executor import default_torch_threads
    from tilesegment.model import for_inference, load_checkpoint, read_checkpoint

    from _measure import peak_rss_mib

    threads = default_torch_threads()
    torch.set_num_threads(threads)
    model, config = load_checkpoint(read_checkpoint(params.get("model")), "cpu")
    model = for_inference(model)  # the network exactly as tileseg's predictor runs it
    keep_freed_memory()  # and the process as tileseg's workers run it
    tile, batch = (params["tile"],) * 3, params["batch"]
    forwarded = {"tiles": 0, "calls": 0}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        forwarded["tiles"] += x.shape[0]
        forwarded["calls"] += 1
        return torch.softmax(model(x), dim=1)

    with torch.inference_mode():
        predictor(torch.randn(batch, 1, *tile))  # warm-up, as for the bare network
    forwarded.update(tiles=0, calls=0)
    before = peak_rss_mib(os.getpid())
    started, cpu = time.perf_counter(), time.process_time()
    with mrcfile.open(params["input"], mode="r", permissive=True) as mrc:
        volume = np.array(mrc.data, dtype=np.float32)  # a copy in memory: the file is closed after
    if config.normalization == "zscore":  # the whole volume's statistics, as tileseg (which samples them)
        mean, std = float(volume.mean(dtype=np.float64)), float(volume.std(dtype=np.float64))
        volume -= np.float32(mean)
        volume /= np.float32(std)
    inputs = torch.from_numpy(volume)[None, None]
    # tileseg's gaussian window, so that both blend with the same weights: MONAI's own gaussian
    # raises every weight below 1e-3 of the centre to 1e-3 (over half of a 64³ tile); tileseg's, as
    # nnU-Net's, does not. The cost is the same either way (one multiplication per voxel of a tile)
    weights = torch.from_numpy(np.array(window(tile, "gaussian")))
    read = time.perf_counter()
    with torch.inference_mode():
        probabilities = sliding_window_inference(inputs, roi_size=tile, sw_batch_size=batch, predictor=predictor,
                                                 overlap=params["overlap"], mode="gaussian", roi_weight_map=weights)
        inferred = time.perf_counter()
        labels = probabilities[0].argmax(dim=0).to(torch.uint8).numpy()
    ended, cpu = time.perf_counter(), time.process_time() - cpu
    np.save(params["labels"], labels)
    import monai

    write_result(params, {"seconds": ended - started, "cpu_seconds": cpu, "read_seconds": read - started, "inference_seconds": inferred - read,
                          "argmax_seconds": ended - inferred, "tiles": forwarded["tiles"], "calls": forwarded["calls"],
                          "threads": threads, "peak_rss_before_mib": before, "monai": monai.__version__,
                          "output_dtype": str(probabilities.dtype), "output_shape": list(probabilities.shape)})


def child_convert(params: dict[str, Any]) -> None:
    from tilesegment.convert import convert

    started = time.perf_counter()
    report = convert(params["input"], params["output"], levels=params.get("levels"), overwrite=True)
    seconds = time.perf_counter() - started
    write_result(params, {"seconds": seconds, "report_seconds": report.seconds, "bytes_read": report.bytes_read,
                          "levels": report.levels, "threads": inspect.signature(convert).parameters["threads"].default})


def child_convert_bare(params: dict[str, Any]) -> None:
    """Read the MRC as `convert` does (same regions, same reader) and compress each chunk with the
    same codec on the same number of threads, writing nothing."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tilesegment.convert import convert, copy_regions
    from tilesegment.mrc import inspect_mrc, read_mrc_region
    from tilesegment.zarr_io import _compressor, intensity_compression, output_spec, write_unit

    threads = inspect.signature(convert).parameters["threads"].default
    info = inspect_mrc(params["input"])
    dtype = np.dtype(info.dtype).newbyteorder("=")
    codec = _compressor(2, dtype, intensity_compression(dtype))  # what convert's Zarr v2 (NGFF 0.4) arrays use
    unit = write_unit(output_spec("0.4", params.get("chunk", 64), None))

    def work(box: Any) -> tuple[int, int]:
        data = read_mrc_region(info, box)
        stored = 0
        for piece in box.split(unit):
            stored += len(codec.encode(np.ascontiguousarray(data[piece.slices(box)])))
        return box.size * dtype.itemsize, stored

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        done = list(pool.map(work, copy_regions(info.shape, unit, dtype.itemsize)))
    seconds = time.perf_counter() - started
    write_result(params, {"seconds": seconds, "bytes_read": sum(d[0] for d in done), "bytes_compressed": sum(d[1] for d in done),
                          "threads": threads, "codec": repr(codec)})


CHILDREN_HERE = {**CHILDREN, "monai": child_monai, "convert": child_convert, "convert_bare": child_convert_bare}


# ---------------------------------------------------------------------------------------------
# the orchestration


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args, self.workdir = args, workdir
        self.volumes: dict[tuple[int, int], str] = {}

    def child(self, kind: str, params: dict[str, Any], env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
        return spawn_child(os.path.abspath(__file__), kind, params, self.workdir, env=env)

    def volume(self, size: int, mode: int = 2) -> str:
        key = (size, mode)
        if key not in self.volumes:
            path = os.path.join(self.workdir, f"v{size}-mode{mode}.mrc")
            started = time.perf_counter()
            write_noise_mrc(path, size, mode=mode, seed=size)
            log(f"made {path} ({os.path.getsize(path) / MIB:.0f} MiB) in {time.perf_counter() - started:.1f} s")
            self.volumes[key] = path
        return self.volumes[key]

    def drop_volume(self, size: int, mode: int = 2) -> None:
        path = self.volumes.pop((size, mode), None)
        if path and os.path.exists(path):
            os.remove(path)

    def bare(self, size: int, workers: int = 1) -> dict[str, Any]:
        log(f"bare network over the grid of {size}³ ...")
        result, _ = self.child("bare", {**SETTINGS, "input": self.volume(size), "model": None, "workers": workers})
        log(f"  {result['tiles']} tiles in {result['seconds']:.2f} s (warm-up {result['warmup_seconds']:.2f} s, {result['threads']} threads)")
        return result

    def segment(self, size: int, workers: int = 1, model: str | None = None, mode: int = 2, label: str = "") -> dict[str, Any]:
        from tilesegment.volume import open_volume
        import numpy as np

        path = self.volume(size, mode)
        log(f"segment() {size}³ {label}with {workers} worker(s) ...")
        counts_dir = tempfile.mkdtemp(prefix="reads-", dir=self.workdir)
        output = os.path.join(self.workdir, f"s{size}-m{mode}-w{workers}.zarr")
        result, peaks = self.child("segment", {**SETTINGS, "input": path, "output": output, "model": model, "workers": workers,
                                               "read_counts": counts_dir},
                                   env={"TILESEG_BENCH_READ_COUNTS": counts_dir})
        reads = read_counts(counts_dir)
        shutil.rmtree(counts_dir)
        source = open_volume(path)
        itemsize = np.dtype(source.dtype).itemsize
        plan = plan_for(source.shape, SETTINGS["tile"], SETTINGS["overlap"])
        input_bytes = math.prod(source.shape) * itemsize
        planned = planned_block_read_bytes(plan, itemsize)
        marks = result["marks"]
        row = {
            "size": size, "voxels": math.prod(source.shape), "dtype": np.dtype(source.dtype).name, "model": model or "default",
            "workers": workers, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"], "process_seconds": result["process_seconds"],
            "seconds_after_cluster_up": result["seconds"] - marks["on_start"],
            "seconds_blocks_and_pyramid": marks["run_blocks_end"] - marks["run_blocks_start"],
            "startup_seconds": {"cluster": marks["connect_end"] - marks["connect_start"],
                                "model_on_every_worker": marks["install_model_end"] - marks["install_model_start"]},
            "phases": phases_of(result),
            "client_peak_rss_mib": peaks["root"], "worker_peak_rss_mib": peaks["child"],
            "tiles_forwarded": result["tiles_forwarded"], "grid_tile_count": plan.grid.count, "report_tile_count": result["tile_count"],
            "tile_redundancy": result["tiles_forwarded"] / plan.grid.count, "blocks": result["blocks"],
            "input_bytes": input_bytes, "planned_block_read_bytes": planned,
            "measured_reads": reads, "worker_rchar": sum(io.get("rchar", 0) for io in result["worker_io"].values()),
            "output": output,
        }
        # blocks read in the workers, and in the client too when its one worker runs in-process; the
        # statistics are the client's reads while intensity_statistics() ran
        stats = result.get("statistics_reads") or {}
        total = {k: sum(r.get(k, 0) for r in reads.values()) for k in ("logical_bytes", "physical_bytes", "page_bytes")}
        row["network_seconds"] = sum(r.get("forward_seconds", 0.0) for r in reads.values())
        row["network_forwards"] = sum(r.get("forwards", 0) for r in reads.values())
        row["network_tiles"] = sum(r.get("forward_tiles", 0) for r in reads.values())
        row["instrumentation_missing"] = sorted({m for r in reads.values() for m in r.get("missing", [])})
        row["worker_processes"] = peaks["children"]
        row["largest_process_peak_rss_mib"] = max(peaks["root"], peaks["child"])
        row["read_amplification"] = {
            "planned_blocks": planned / input_bytes,
            "measured_blocks_logical": (total["logical_bytes"] - stats.get("logical_bytes", 0)) / input_bytes,
            "measured_blocks_physical": (total["physical_bytes"] - stats.get("physical_bytes", 0)) / input_bytes,
            "measured_blocks_pages": (total["page_bytes"] - stats.get("page_bytes", 0)) / input_bytes,
            "measured_statistics": stats.get("physical_bytes", 0) / input_bytes,
            "measured_total": total["physical_bytes"] / input_bytes,
        }
        log(f"  {row['seconds']:.2f} s ({row['seconds_after_cluster_up']:.2f} s after the cluster was up), "
            f"{row['tiles_forwarded']}/{row['grid_tile_count']} tiles, client {row['client_peak_rss_mib']:.0f} MiB, "
            f"{row['worker_processes']} worker process(es) {row['worker_peak_rss_mib']:.0f} MiB, "
            f"network {row['network_seconds']:.1f} s in {row['network_forwards']} forwards, "
            f"reads {row['read_amplification']['measured_total']:.2f}× the input")
        return row

    def monai(self, size: int) -> dict[str, Any]:
        log(f"MONAI sliding_window_inference {size}³ ...")
        labels = os.path.join(self.workdir, f"monai-{size}.npy")
        result, peaks = self.child("monai", {**SETTINGS, "input": self.volume(size), "model": None, "labels": labels})
        result.update(peak_rss_mib=peaks["root"], labels_path=labels)
        log(f"  {result['seconds']:.2f} s, {result['tiles']} tiles, peak {result['peak_rss_mib']:.0f} MiB")
        return result

    def convert(self, size: int) -> dict[str, Any]:
        path = self.volume(size)
        log(f"convert {size}³ float32 ...")
        bare, _ = self.child("convert_bare", {"input": path})
        full, _ = self.child("convert", {"input": path, "output": os.path.join(self.workdir, "c.zarr")})
        shutil.rmtree(os.path.join(self.workdir, "c.zarr"), ignore_errors=True)
        level0, _ = self.child("convert", {"input": path, "output": os.path.join(self.workdir, "c1.zarr"), "levels": 1})
        shutil.rmtree(os.path.join(self.workdir, "c1.zarr"), ignore_errors=True)
        mib = full["bytes_read"] / MIB
        out = {"size": size, "input_mib": mib, "threads": bare["threads"], "codec": bare["codec"],
               "bare_seconds": bare["seconds"], "bare_mib_s": bare["bytes_read"] / MIB / bare["seconds"],
               "compression_ratio": bare["bytes_read"] / max(1, bare["bytes_compressed"]),
               "convert_seconds": full["seconds"], "convert_mib_s": mib / full["seconds"], "convert_levels": full["levels"],
               "convert_level0_seconds": level0["seconds"], "convert_level0_mib_s": mib / level0["seconds"]}
        out["ratio"] = out["convert_mib_s"] / out["bare_mib_s"]
        out["ratio_level0"] = out["convert_level0_mib_s"] / out["bare_mib_s"]
        log(f"  convert {out['convert_mib_s']:.0f} MiB/s ({out['convert_levels']} levels), level 0 only "
            f"{out['convert_level0_mib_s']:.0f} MiB/s, bare read+compress {out['bare_mib_s']:.0f} MiB/s")
        return out


def code_version() -> str:
    """The commit and whether the working tree differs from it (read-only git commands)."""
    import subprocess

    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "diff", "HEAD", "--shortstat"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (f" with uncommitted changes ({changes})" if changes else "")


def oversize_edge(mem_available: int, bytes_per_voxel: int, multiple: int = 64) -> int:
    """The smallest cube edge (a multiple of ``multiple``) whose MONAI buffers exceed ``mem_available``."""
    edge = math.ceil((mem_available / bytes_per_voxel) ** (1 / 3) / multiple) * multiple
    while edge**3 * bytes_per_voxel <= mem_available:
        edge += multiple
    return edge


def label_agreement(zarr_labels: str, npy_labels: str) -> float:
    import numpy as np
    import zarr

    ours = np.asarray(zarr.open_array(zarr_labels, mode="r")[...])
    theirs = np.load(npy_labels)
    return float(np.mean(ours == theirs)) if ours.shape == theirs.shape else float("nan")


# ---------------------------------------------------------------------------------------------
# the report


def median_by_seconds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def worker_cell(row: dict[str, Any]) -> str:
    """The largest worker process's peak, or a note where the one worker ran inside the client."""
    return fmt(row["worker_peak_rss_mib"], 0) if row["worker_processes"] else "– (worker in the client process)"


def tileseg_memory(row: dict[str, Any]) -> float:
    """Client plus largest worker process (the client alone when the worker runs inside it)."""
    return row["client_peak_rss_mib"] + (row["worker_peak_rss_mib"] if row["worker_processes"] else 0.0)


def markdown(r: dict[str, Any]) -> str:
    s, lines = r["settings"], []
    add = lines.append
    add("# tileseg performance (`benchmarks/performance.py`)")
    add("")
    add(f"- Command: `{r['command']}`")
    add(f"- Machine: {machine_line(r['machine'])}")
    add(f"- Date: {r['date']}; whole benchmark {fmt(r['total_seconds'] / 60, 1)} min; tilesegment {r['version']}, {r['code']}")
    add(f"- Settings everywhere: the packaged default model ({r['model']}), tile {s['tile']}, overlap {s['overlap']}, "
        f"{s['blend']} blending, batch {s['batch']}, device {s['device']}, {r['limit']['bare']['threads']} torch threads "
        f"(tileseg's workers share all usable cores); inputs are float32 MRC files of N(0, 1) noise at 10 Å/voxel; "
        f"tileseg writes OME-NGFF 0.4 (Zarr v2, labels at Blosc zstd 3 with bitshuffle, 64³ chunks) with its pyramid; embedded cluster of 1 worker "
        f"unless said otherwise. Every figure below is measured in this run.")
    if r["source_fingerprint_start"] != r["source_fingerprint_end"]:
        add(f"- **Warning: tilesegment's source changed during this run** (fingerprint {r['source_fingerprint_start']} at the start, "
            f"{r['source_fingerprint_end']} at the end): rows measured at different times may have run different code.")
    add("")
    add("## Targets")
    add("")
    add("| check | target | measured | met |")
    add("|---|---|---|---|")
    for t in r["targets"]:
        add(f"| {t['check']} | {t['target']} | {t['measured']} | {verdict(t['met'])} |")
    lim = r["limit"]
    row, bare = lim["segment"], lim["bare"]
    add("")
    add(f"## 1. The limit: the bare network over the same tiles ({lim['size']}³)")
    add("")
    add("| | wall s | × bare network | CPU s | × bare network's CPU s |")
    add("|---|---|---|---|---|")
    add(f"| bare network: forward + softmax of the {bare['tiles']} grid tiles in {bare['batches']} batches (after a "
        f"{fmt(bare['warmup_seconds'])} s warm-up forward); the median round's | {fmt(bare['seconds'])} | 1.00 | {fmt(bare['cpu_seconds'])} | 1.00 |")
    add(f"| tileseg `segment()` end to end (MRC → compressed OME-Zarr, cluster start-up and shut-down included), the median round's | "
        f"{fmt(row['seconds'])} | {fmt(row['seconds'] / bare['seconds'], 3)} | {fmt(row['cpu_seconds'])} | "
        f"{fmt(row['cpu_seconds'] / bare['cpu_seconds'], 3)} |")
    add(f"| … from `on_start` (cluster up) to return | {fmt(row['seconds_after_cluster_up'])} | "
        f"{fmt(row['seconds_after_cluster_up'] / bare['seconds'], 3)} | | |")
    add(f"| … blocks only, which write the pyramid too (first task submitted to last block done) | {fmt(row['seconds_blocks_and_pyramid'])} | "
        f"{fmt(row['seconds_blocks_and_pyramid'] / bare['seconds'], 3)} | | |")
    add(f"| (the whole child process that ran `segment()`, Python start-up and imports included) | {fmt(row['process_seconds'])} | "
        f"{fmt(row['process_seconds'] / bare['seconds'], 3)} | | |")
    add(f"| the network inside that `segment()` run: Σ of its {row['network_forwards']} forwards ({row['network_tiles']} tiles), "
        f"timed by forward hooks | {fmt(row['network_seconds'])} | {fmt(row['network_seconds'] / bare['seconds'], 3)} | | |")
    add("")
    add(f"Rounds (bare network, `segment()`, MONAI one after the other, in reverse order in the rounds marked so; ratios within a round): "
        f"**median `segment()` / bare {fmt(lim['ratio_median'], 3)}×**.")
    add("")
    add("| round | bare s | `segment()` s | MONAI s | segment / bare | segment / MONAI | network inside segment s | segment peak RSS MiB | MONAI peak RSS MiB |")
    add("|---|---|---|---|---|---|---|---|---|")
    for i, rd in enumerate(r["rounds"], 1):
        reverse = " (reverse)" if rd.get("order", ["bare"])[0] != "bare" else ""
        add(f"| {i}{reverse} | {fmt(rd['bare_seconds'])} | {fmt(rd['segment_seconds'])} | {fmt(rd['monai_seconds'])} | "
            f"{fmt(rd['segment_seconds'] / rd['bare_seconds'], 3)} | {fmt(rd['segment_seconds'] / rd['monai_seconds'], 3)} | "
            f"{fmt(rd['network_seconds'])} | {fmt(rd['segment_peak_rss_mib'], 0)} | {fmt(rd['monai_peak_rss_mib'], 0)} |")
    add("")
    add(f"**`segment()` wall / the network time inside the same run: {fmt(row['seconds'] / row['network_seconds'], 3)}** "
        f"(the share of the run the network was not busy: {fmt(100 * (1 - row['network_seconds'] / row['seconds']), 1)} %). "
        "Both halves of this ratio come from one run under the same load, so it is the steadier measure of tileseg's "
        "overhead on a shared machine; the ratio to the bare network above compares runs made at different moments.")
    add("")
    add("CPU s: user + system time of every thread and worker process of the run (for the bare network, of the timed loop): "
        "steadier than wall time when other work shares the machine, though spinning OpenMP threads inflate it under contention.")
    add("")
    add(f"Where `segment()`'s {fmt(row['seconds'])} s went (timed by wrapping the functions it calls):")
    add("")
    add("| phase | seconds |")
    add("|---|---|")
    for name, value in row["phases"].items():
        add(f"| {name.replace('  ', '&nbsp;&nbsp;')} | {fmt(value)} |")
    if r.get("monai"):
        mo = r["monai"]
        add("")
        add(f"## 2. The peer: MONAI {mo['monai']} `sliding_window_inference` ({mo['size']}³)")
        add("")
        add("| | wall s | CPU s | tiles forwarded | client / whole-process peak RSS MiB | largest worker process peak RSS MiB |")
        add("|---|---|---|---|---|---|")
        add(f"| tileseg `segment()` | {fmt(row['seconds'])} | {fmt(row['cpu_seconds'])} | {row['tiles_forwarded']} | "
            f"{fmt(row['client_peak_rss_mib'], 0)} | {worker_cell(row)} |")
        add(f"| MONAI (MRC read into a tensor, normalise, infer, argmax) | {fmt(mo['seconds'])} | {fmt(mo['cpu_seconds'])} | {mo['tiles']} | "
            f"{fmt(mo['peak_rss_mib'], 0)} | – |")
        add("")
        add(f"tileseg / MONAI wall time, median of the rounds' ratios: **{fmt(mo['ratio_median'], 3)}**; in the rows above (each the median round of its tool) "
            f"{fmt(row['seconds'] / mo['seconds'], 3)} "
            f"({fmt(row['seconds_after_cluster_up'] / mo['seconds'], 3)} from the cluster being up; CPU time "
            f"{fmt(row['cpu_seconds'] / mo['cpu_seconds'], 3)}). "
            f"MONAI's time: read + normalise {fmt(mo['read_seconds'])} s, inference {fmt(mo['inference_seconds'])} s, "
            f"argmax {fmt(mo['argmax_seconds'])} s; its peak RSS was {fmt(mo['peak_rss_before_mib'], 0)} MiB before the volume "
            f"was read (imports, model, warm-up). Labels agree with tileseg's on {fmt(100 * mo['label_agreement'], 3)} % of voxels. "
            f"Both run in their own processes with {mo['threads']} torch threads; MONAI's whole-process peak against "
            f"tileseg's client + largest worker process: {fmt(mo['peak_rss_mib'] / tileseg_memory(row), 2)}×.")
    add("")
    add("## 3. Scale")
    add("")
    add("| size | voxels | network | wall s | CPU s | network time / wall | tiles/s | client peak RSS MiB | worker peak RSS MiB | tiles forwarded / grid | "
        "input read (blocks + statistics) / input size |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for s_row in r["scale"]:
        amp = s_row["read_amplification"]
        add(f"| {s_row['size']}³ {s_row['dtype']} | {s_row['voxels']:,} | {s_row['network']} | {fmt(s_row['seconds'])} | {fmt(s_row['cpu_seconds'])} | "
            f"{fmt(100 * s_row['network_seconds'] / s_row['seconds'], 1)} % | "
            f"{fmt(s_row['tiles_forwarded'] / s_row['seconds'], 1)} | {fmt(s_row['client_peak_rss_mib'], 0)} | "
            f"{worker_cell(s_row)} | {s_row['tiles_forwarded']}/{s_row['grid_tile_count']} = "
            f"{fmt(s_row['tile_redundancy'])} | {fmt(amp['measured_total'], 3)} |")
    over = r.get("oversize")
    if over:
        add("")
        if over.get("skipped"):
            add(f"Oversize volume: not run ({over['skipped']}).")
        else:
            need = (f"it would need at least {fmt(over['monai_bytes'] / GIB, 1)} GiB (input + {over['channels']} output probabilities "
                    f"+ count map, float32: {over['bytes_per_voxel']} bytes/voxel × {over['voxels']:,} voxels)")
            fits = (f"**MONAI was not run there**: {need}, more than this machine's MemAvailable of "
                    f"{fmt(over['mem_available'] / GIB, 1)} GiB at the start of the benchmark."
                    if not over["monai_fits"] else
                    f"MONAI was not run there; {need}, which would fit in this machine's MemAvailable of "
                    f"{fmt(over['mem_available'] / GIB, 1)} GiB (the size was chosen with --oversize).")
            add(f"The {over['size']}³ row uses an **identity network**, so it shows tileseg's own memory and I/O, not a network's: "
                f"the default model would need about {fmt(over['default_model_hours'], 1)} h of network time alone here "
                f"({over['grid_tiles']:,} tiles at the bare network's measured {fmt(over['seconds_per_tile'], 3)} s per tile). {fits} "
                f"The input MRC ({over['dtype']}, {fmt(over['input_bytes'] / GIB, 2)} GiB) was written slab by slab, never whole in memory.")
    add("")
    add("## 4. Reads from the input")
    add("")
    add("| size | input MiB | planned block reads (Σ clipped input boxes) | counted: blocks, regions asked for | "
        "counted: blocks, bytes read from the file | counted: blocks, 4 KiB pages of the file those reads touched | "
        "counted: intensity statistics (client) | total read / input |")
    add("|---|---|---|---|---|---|---|---|")
    for s_row in r["scale"]:
        amp, mb = s_row["read_amplification"], s_row["input_bytes"]
        add(f"| {s_row['size']}³ | {fmt(mb / MIB, 0)} | {fmt(amp['planned_blocks'], 3)}× | {fmt(amp['measured_blocks_logical'], 3)}× | "
            f"{fmt(amp['measured_blocks_physical'], 3)}× | {fmt(amp['measured_blocks_pages'], 3)}× | "
            f"{fmt(amp['measured_statistics'], 3)}× | {fmt(amp['measured_total'], 3)}× |")
    add("")
    add("Planned: every block reads its input box (its own tiles' span, clipped to the volume) once, × itemsize. Counted: "
        "tileseg's MRC reader wrapped in the client and (a Dask worker preload) in every worker: the regions it was asked "
        "for, and the bytes its positioned reads (`os.preadv`) took from the file, which include the whole rows it reads "
        "for a box more than half the volume wide or whose rows lie less than a page apart (one read per plane instead of "
        "one per row). Those extra bytes lie in pages the box touches anyway: the pages column counts, per region, the "
        "distinct 4 KiB pages of the file its reads touched, which is what a disk would read for it (read-ahead aside). "
        "The statistics are read by the client before the cluster starts "
        "(the default model normalises with the whole volume's mean and std; the identity network does not).")
    cv = r.get("convert")
    if cv:
        add("")
        add(f"## 5. `tileseg convert` ({cv['size']}³ float32, {fmt(cv['input_mib'], 0)} MiB, file in the page cache)")
        add("")
        add("| | seconds | MiB/s of input | × bare |")
        add("|---|---|---|---|")
        add(f"| bare: read the same regions and compress every 64³ chunk ({cv['codec']}), {cv['threads']} threads, no writes | "
            f"{fmt(cv['bare_seconds'])} | {fmt(cv['bare_mib_s'], 0)} | 1.00 |")
        add(f"| `convert()`, level 0 only (`--levels 1`) | {fmt(cv['convert_level0_seconds'])} | {fmt(cv['convert_level0_mib_s'], 0)} | "
            f"{fmt(cv['ratio_level0'])} |")
        add(f"| `convert()` as `tileseg convert` runs it ({cv['convert_levels']} pyramid levels) | {fmt(cv['convert_seconds'])} | "
            f"{fmt(cv['convert_mib_s'], 0)} | {fmt(cv['ratio'])} |")
        add("")
        add(f"Compression ratio of the noise volume: {fmt(cv['compression_ratio'])}×.")
    wk = r.get("workers")
    if wk:
        add("")
        add(f"## 6. Workers of the embedded cluster ({wk[0]['size']}³)")
        add("")
        add("| workers | torch threads each | wall s | cluster start s | model on every worker s | blocks + pyramid s | "
            "client peak RSS MiB | largest worker process peak RSS MiB |")
        add("|---|---|---|---|---|---|---|---|")
        for w in wk:
            add(f"| {w['workers']} | {w['threads_each']} | {fmt(w['seconds'])} | {fmt(w['startup_seconds']['cluster'])} | "
                f"{fmt(w['startup_seconds']['model_on_every_worker'])} | {fmt(w['seconds_blocks_and_pyramid'])} | "
                f"{fmt(w['client_peak_rss_mib'], 0)} | {worker_cell(w)} |")
    add("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    if child_main(sys.argv[1:], CHILDREN_HERE):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for development (64³ and 96³, convert 128³, no oversize row)")
    parser.add_argument("--sizes", type=int, nargs="+", help="cube edges of the scale rows (default 128 256 512)")
    parser.add_argument("--limit-size", type=int, help="edge for the bare-network limit, MONAI and the worker comparison (default 256)")
    parser.add_argument("--convert-size", type=int, help="edge of the float32 MRC for the convert throughput (default 512; 0 skips)")
    parser.add_argument("--oversize", default=None,
                        help="edge of the volume too large for MONAI, or 'auto' (from MemAvailable, the default), or 0 to skip")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="embedded-cluster sizes to compare (default 1 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare network, segment() and MONAI at the limit size (default 3)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--workdir", default=None, help="where the volumes and outputs go (default: a temporary folder)")
    args = parser.parse_args()
    args.sizes = args.sizes or ([64, 96] if args.quick else [128, 256, 512])
    args.limit_size = args.limit_size or (96 if args.quick else 256)
    args.convert_size = (128 if args.quick else 512) if args.convert_size is None else args.convert_size
    args.oversize = args.oversize or ("0" if args.quick else "auto")

    if importlib.util.find_spec("monai") is None:
        raise SystemExit(MONAI_MISSING)
    from importlib.metadata import version

    if tuple(int(p) for p in version("monai").split(".")[:2]) < (1, 3):
        raise SystemExit(f"MONAI {version('monai')} is too old (1.3 or newer is needed). " + MONAI_MISSING.split(". ", 1)[1])

    import tilesegment
    from tilesegment.executor import default_torch_threads
    from tilesegment.model import load_checkpoint, read_checkpoint

    begun = time.perf_counter()
    machine = machine_info()
    mem_available = meminfo_bytes("MemAvailable")
    _, config = load_checkpoint(read_checkpoint(None), "cpu")
    model = f"{config.architecture}, widths {'/'.join(map(str, config.channels))}, {config.out_channels} classes"
    result: dict[str, Any] = {
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "settings": SETTINGS, "model": model,
        "mem_available_bytes": mem_available, "code": code_version(), "version": tilesegment.__version__,
        "source_fingerprint_start": code_fingerprint(),
    }
    with tempfile.TemporaryDirectory(prefix="tileseg-perf-", dir=args.workdir) as workdir:
        bench = Bench(args, workdir)
        # 1. the limit and 2. the peer: rounds of (bare network, segment(), MONAI) at the limit size, so
        # a slow spell of the machine hits all three alike; ratios are taken within a round, then the
        # median over rounds. Then 3. scale (the limit size's median run serves 1, 2 and 6 too).
        rounds = []
        for i in range(args.rounds):
            log(f"round {i + 1} of {args.rounds} at {args.limit_size}³")
            # every other round in reverse order (MONAI, segment(), bare network): a machine that speeds up
            # or slows down during the rounds then favours neither side of a ratio
            order = ("bare", "segment", "monai") if i % 2 == 0 else ("monai", "segment", "bare")
            done = {name: getattr(bench, name)(args.limit_size) for name in order}
            bare_i, segment_i, monai_i = done["bare"], done["segment"], done["monai"]
            monai_i["label_agreement"] = label_agreement(os.path.join(segment_i["output"], "0"), monai_i["labels_path"])
            os.remove(monai_i["labels_path"])
            shutil.rmtree(segment_i["output"], ignore_errors=True)
            rounds.append({"order": list(order), "bare": bare_i, "segment": segment_i, "monai": monai_i})
        limit_row = median_by_seconds([r["segment"] for r in rounds])
        bare = median_by_seconds([r["bare"] for r in rounds])
        monai = median_by_seconds([r["monai"] for r in rounds])
        monai["size"] = args.limit_size
        result["rounds"] = [{"order": r["order"], "bare_seconds": r["bare"]["seconds"], "segment_seconds": r["segment"]["seconds"],
                             "monai_seconds": r["monai"]["seconds"], "segment_peak_rss_mib": r["segment"]["largest_process_peak_rss_mib"],
                             "monai_peak_rss_mib": r["monai"]["peak_rss_mib"], "network_seconds": r["segment"]["network_seconds"]}
                            for r in rounds]
        result["limit"] = {"size": args.limit_size, "bare": bare, "segment": limit_row,
                           "ratio_median": statistics.median(r["segment_seconds"] / r["bare_seconds"] for r in result["rounds"])}
        result["monai"] = monai
        monai["ratio_median"] = statistics.median(r["segment_seconds"] / r["monai_seconds"] for r in result["rounds"])
        rows: dict[int, dict[str, Any]] = {args.limit_size: limit_row}
        limit_row["network"] = "default model"
        for size in sorted(set(args.sizes) - {args.limit_size}):
            rows[size] = bench.segment(size)
            rows[size]["network"] = "default model"
            if size != args.convert_size:
                bench.drop_volume(size)
            shutil.rmtree(rows[size]["output"], ignore_errors=True)
        # 6. workers
        workers = []
        for n in args.workers:
            w = limit_row if n == 1 else bench.segment(args.limit_size, workers=n)
            if n != 1:
                shutil.rmtree(w["output"], ignore_errors=True)
            workers.append({**w, "threads_each": max(1, default_torch_threads() // n)})
        result["workers"] = workers
        if args.limit_size != args.convert_size:
            bench.drop_volume(args.limit_size)
        # 5. convert
        if args.convert_size:
            result["convert"] = bench.convert(args.convert_size)
            bench.drop_volume(args.convert_size)
        # 3. the oversize row
        scale = [rows[s] for s in sorted(args.sizes)]
        bytes_per_voxel = 4 * (config.in_channels + config.out_channels + 1)
        if args.oversize != "0":
            edge = oversize_edge(mem_available, bytes_per_voxel) if args.oversize == "auto" else int(args.oversize)
            grid_tiles = plan_for((edge,) * 3, SETTINGS["tile"], SETTINGS["overlap"]).grid.count
            per_tile = bare["seconds"] / bare["tiles"]
            over = {"size": edge, "voxels": edge**3, "bytes_per_voxel": bytes_per_voxel, "monai_bytes": edge**3 * bytes_per_voxel,
                    "mem_available": mem_available, "channels": config.out_channels, "dtype": "int8", "input_bytes": edge**3,
                    "grid_tiles": grid_tiles, "seconds_per_tile": per_tile, "default_model_hours": grid_tiles * per_tile / 3600,
                    "monai_fits": edge**3 * bytes_per_voxel <= mem_available}
            free = shutil.disk_usage(workdir).free
            if free < 3 * edge**3:
                over["skipped"] = f"needs about {fmt(3 * edge**3 / GIB, 1)} GiB of disk for input and output, {fmt(free / GIB, 1)} GiB free"
            else:
                identity = os.path.join(workdir, "identity.safetensors")
                identity_checkpoint(identity)
                row = bench.segment(edge, model=identity, mode=0, label="(identity network) ")
                row["network"] = "identity (see note)"
                shutil.rmtree(row["output"], ignore_errors=True)
                bench.drop_volume(edge, mode=0)
                scale.append(row)
            result["oversize"] = over
        result["scale"] = scale

    # targets
    default_rows = [r for r in scale if r["network"] == "default model"]
    small, large = default_rows[0], default_rows[-1]
    growth = large["largest_process_peak_rss_mib"] / small["largest_process_peak_rss_mib"]
    ratio = result["limit"]["ratio_median"]
    vs_monai = monai["ratio_median"]
    redundancies = [r["tile_redundancy"] for r in scale]
    hooks_agree = all(r["network_tiles"] == r["grid_tile_count"] for r in scale if r["network_forwards"])
    result["targets"] = [
        {"check": f"end-to-end `segment()` / bare network at {args.limit_size}³", "target": f"≤ {TARGETS['end_to_end_over_bare']:.2f}×",
         "measured": f"{ratio:.3f}× ({limit_row['seconds']:.1f} s / {bare['seconds']:.1f} s; CPU time "
                     f"{limit_row['cpu_seconds'] / bare['cpu_seconds']:.3f}×; over the network time inside the same run "
                     f"{limit_row['seconds'] / limit_row['network_seconds']:.3f}×)", "met": ratio <= TARGETS["end_to_end_over_bare"]},
        {"check": f"tileseg / MONAI wall time at {args.limit_size}³", "target": "< 1 (faster)",
         "measured": f"{vs_monai:.3f}× ({limit_row['seconds']:.1f} s / {monai['seconds']:.1f} s; CPU time "
                     f"{limit_row['cpu_seconds'] / monai['cpu_seconds']:.3f}×)", "met": vs_monai < 1.0},
        {"check": f"peak RSS of the largest process at {large['size']}³ / at {small['size']}³", "target": f"≤ {TARGETS['peak_rss_growth']:.2f}×",
         "measured": f"{growth:.2f}× ({small['largest_process_peak_rss_mib']:.0f} → {large['largest_process_peak_rss_mib']:.0f} MiB)",
         "met": growth <= TARGETS["peak_rss_growth"]},
        {"check": "tiles forwarded / global grid's tiles, every run", "target": "= 1.00 exactly",
         "measured": ", ".join(f"{v:.2f}" for v in redundancies) + ("; the tiles counted by forward hooks agree" if hooks_agree else
                                                                     "; **the tiles counted by forward hooks differ**"),
         "met": all(v == TARGETS["tile_redundancy"] for v in redundancies) and hooks_agree},
    ]
    result["total_seconds"] = time.perf_counter() - begun
    result["source_fingerprint_end"] = code_fingerprint()
    for r in scale + workers:
        r.pop("output", None)
    save_report(args.out_dir, "performance", result, markdown(result))


if __name__ == "__main__":
    main()

"""Which Blosc/zstd settings to write labels and probabilities with: encode time and size, measured
on a realistic map rather than on noise.

Simulates a crowded tomogram (``tileseg simulate``: the 16 shipped complexes, density 0.25, SNR 1),
segments it with the packaged default model writing float16 probabilities, and compresses every
64³ chunk of the tomogram (as float32, and as float16, int16 and int8 MRC files would hold it: what
``tileseg convert`` writes), of the labels and of the probabilities (as float16, float32 and uint8,
the three ``--probability-dtype`` choices) with each candidate, on one thread, chunk by chunk as a block
writes them. Reports encode and decode seconds and the compression ratio; the settings tileseg
uses (``tilesegment.zarr_io``) are marked.

    python benchmarks/compression.py              # 256³, about a minute on 2 cores

Writes benchmarks/results/compression.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import machine_info, machine_line, save_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [(5, "bitshuffle"), (3, "bitshuffle"), (1, "bitshuffle"), (1, "shuffle"), (3, "shuffle"), (5, "shuffle")]


def chunks_of(data: np.ndarray, chunk: int = 64) -> list[np.ndarray]:
    *lead, nz, ny, nx = data.shape
    channels = [data[c] for c in range(lead[0])] if lead else [data]
    return [np.ascontiguousarray(v[z:z + chunk, y:y + chunk, x:x + chunk])
            for v in channels for z in range(0, nz, chunk) for y in range(0, ny, chunk) for x in range(0, nx, chunk)]


def measure(chunks: list[np.ndarray], level: int, shuffle: str) -> dict[str, float]:
    from tilesegment.zarr_io import Compression, _compressor

    codec = _compressor(2, chunks[0].dtype, Compression(level, shuffle))  # as tileseg's Zarr v2 arrays
    encode = []
    for _ in range(2):  # the faster of two passes
        started = time.perf_counter()
        encoded = [codec.encode(c) for c in chunks]
        encode.append(time.perf_counter() - started)
    started = time.perf_counter()
    for e in encoded:
        codec.decode(e)
    decode = time.perf_counter() - started
    raw = sum(c.nbytes for c in chunks)
    return {"level": level, "shuffle": shuffle, "encode_s": min(encode), "decode_s": decode, "ratio": raw / sum(map(len, encoded))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()

    import numcodecs
    import zarr

    from tilesegment import segment
    from tilesegment.simulate import SimulationConfig, simulate
    from tilesegment.geometry import Box
    from tilesegment.volume import open_volume, read_volume
    from tilesegment.zarr_io import LABEL_COMPRESSION, PROBABILITY_COMPRESSION, intensity_compression

    numcodecs.blosc.set_nthreads(1)
    machine = machine_info()
    with tempfile.TemporaryDirectory() as work:
        report = simulate(os.path.join(work, "sim"), SimulationConfig(shape=(args.size,) * 3, seed=3))
        out = os.path.join(work, "seg.zarr")
        segment(report.tomogram, out, probabilities=True)
        labels = np.asarray(zarr.open_array(f"{out}/0")[:])
        p16 = np.asarray(zarr.open_array(f"{out}/probabilities/0")[:])
        tomogram = open_volume(report.tomogram)
        density = read_volume(tomogram, Box.from_shape(tomogram.shape)).astype(np.float32)
    # intensities as `tileseg convert` gets them: the float32 reconstruction, and quantised the way
    # 8- and 16-bit MRC files hold one (about 30 and 1000 grey levels per standard deviation)
    scaled = (density - density.mean()) / density.std()
    intensities = {"float32": density, "float16": density.astype(np.float16),
                   "int16": np.clip(np.rint(scaled * 1000), -32768, 32767).astype(np.int16),
                   "int8": np.clip(np.rint(scaled * 30), -128, 127).astype(np.int8)}
    arrays = {f"intensities {dtype}": (data, intensity_compression(data.dtype)) for dtype, data in intensities.items()}
    arrays |= {"labels uint8": (labels, LABEL_COMPRESSION),
              "probabilities float16": (p16, PROBABILITY_COMPRESSION["float16"]),
              "probabilities float32": (p16.astype(np.float32), PROBABILITY_COMPRESSION["float32"]),
              "probabilities uint8": (np.round(np.clip(p16.astype(np.float32), 0, 1) * 255).astype(np.uint8), PROBABILITY_COMPRESSION["uint8"])}
    rows: list[dict[str, Any]] = []
    for name, (data, chosen) in arrays.items():
        chunks = chunks_of(data)
        for level, shuffle in CANDIDATES + ([(chosen.level, chosen.shuffle)] if (chosen.level, chosen.shuffle) not in CANDIDATES else []):
            row = {"array": name, "mib": data.nbytes / 2**20, **measure(chunks, level, shuffle)}
            row["tileseg"] = (level, shuffle) == (chosen.level, chosen.shuffle)
            rows.append(row)
    result = {"command": "python benchmarks/compression.py" + (f" --size {args.size}" if args.size != 256 else ""),
              "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"), "size": args.size,
              "foreground_fraction": float(labels.astype(bool).mean()), "rows": rows}
    lines = [f"# Compression of labels and probabilities ({args.size}³ simulated tomogram)", "",
             f"- Command: `{result['command']}`", f"- Machine: {machine_line(machine)}; {result['date']}",
             f"- Blosc/zstd on 64³ chunks, one thread; labels {100 * result['foreground_fraction']:.1f} % foreground; "
             "probabilities of the packaged default model (2 classes), float16 as written, float32 and uint8 from it.", "",
             "| array | MiB | zstd level | shuffle | encode s | decode s | ratio | tileseg |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['array']} | {r['mib']:.0f} | {r['level']} | {r['shuffle']} | {r['encode_s']:.3f} | {r['decode_s']:.3f} | "
                     f"{r['ratio']:.2f} | {'**yes**' if r['tileseg'] else ''} |")
    save_report(args.out_dir, "compression", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

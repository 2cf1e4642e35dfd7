"""Open tileseg's output in neuroglancer: the tomogram as an image layer, the
segmentation as a segmentation layer over it, both read by neuroglancer's own
``zarr://`` data source (OME-Zarr 0.4 / Zarr v2 and OME-Zarr 0.5 / Zarr v3 with
sharding).

    tileseg demo /tmp/ngdemo --size 96
    python examples/neuroglancer_view.py /tmp/ngdemo
        # prints a viewer URL to open in a browser; Ctrl-C to stop
    python examples/neuroglancer_view.py /tmp/ngdemo --screenshot ng.png
        # renders it in headless Chromium (WebGL on SwiftShader) and saves a PNG

Needs ``pip install neuroglancer`` (the wheel ships the web client) and, for
``--screenshot``, ``pip install selenium`` plus Chromium and chromedriver
(Debian: ``apt-get install chromium chromium-driver``).

The folder is served by a small HTTP server on 127.0.0.1 with CORS headers and
HTTP Range support (neuroglancer reads a sharded Zarr v3 array's shard index
with a suffix range request); neuroglancer's own server (also on 127.0.0.1)
serves the client. Nothing leaves the machine. The viewer puts x, y, z first
(OME-Zarr's axis order z, y, x would put z across neuroglancer's "xy" panel),
colours each label as the label image's ``image-label.colors`` say (neuroglancer
ignores them and hashes its own), and sets the tomogram's contrast from its
percentiles.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

# ----------------------------------------------------------------- HTTP server


class CORSRangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with CORS headers and single-range ``Range`` requests."""

    def log_message(self, format, *args):  # quiet; set NG_HTTP_LOG=1 to see requests
        if os.environ.get("NG_HTTP_LOG"):
            super().log_message(format, *args)

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_OPTIONS(self):
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
        size = os.path.getsize(path)
        if not m or (m.group(1) == "" and m.group(2) == ""):
            return super().send_head()  # multi-range or malformed: whole file
        if m.group(1) == "":  # suffix: the last N bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._range_left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        left = getattr(self, "_range_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        while left > 0:
            buf = source.read(min(left, 1 << 16))
            if not buf:
                break
            outputfile.write(buf)
            left -= len(buf)
        self._range_left = None


@contextlib.contextmanager
def serve_folder(folder: str | Path, port: int = 0):
    """Serve ``folder`` on http://127.0.0.1:PORT (0: any free port); yields the base URL."""

    def handler(*args, **kwargs):
        return CORSRangeHandler(*args, directory=str(folder), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------- viewer


def label_colors(label_zarr: str | Path) -> dict[int, str]:
    """``{label value: '#rrggbb'}`` from the OME ``image-label`` colours (alpha > 0)."""
    attrs = _ome_attrs(Path(label_zarr))
    colors = {}
    for entry in attrs.get("image-label", {}).get("colors", []):
        value, rgba = int(entry["label-value"]), entry["rgba"]
        if value != 0 and (len(rgba) < 4 or rgba[3] > 0):
            colors[value] = "#{:02x}{:02x}{:02x}".format(*rgba[:3])
    return colors


def _ome_attrs(group: Path) -> dict:
    if (group / "zarr.json").exists():  # OME-Zarr 0.5 (Zarr v3)
        return json.loads((group / "zarr.json").read_text()).get("attributes", {}).get("ome", {})
    return json.loads((group / ".zattrs").read_text())  # OME-Zarr 0.4 (Zarr v2)


def contrast_range(image_zarr: str | Path, percentiles=(0.5, 99.5), max_voxels=1 << 22):
    """A display range for the tomogram from the finest pyramid level of at most
    ``max_voxels`` voxels, or None (neuroglancer then uses its own default) when
    zarr/numpy are not at hand."""
    try:
        import numpy as np
        import zarr

        image_zarr = Path(image_zarr)
        datasets = _ome_attrs(image_zarr)["multiscales"][0]["datasets"]
        for ds in datasets:
            arr = zarr.open_array(str(image_zarr / ds["path"]), mode="r")
            if arr.size <= max_voxels or ds is datasets[-1]:
                break
        lo, hi = np.percentile(np.asarray(arr[...], dtype=np.float64), percentiles)
        return [float(lo), float(hi)] if hi > lo else None
    except Exception:
        return None


_UNIT_M = {"angstrom": 1e-10, "nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "meter": 1.0}


def display_dimensions(names, scales_m):
    """A ``neuroglancer.CoordinateSpace`` with x, y, z first: neuroglancer's "xy"
    panel shows the first two global dimensions, and OME-Zarr orders axes z, y, x,
    which would put z across the screen."""
    import neuroglancer

    order = sorted(range(len(names)), key=lambda i: ("x", "y", "z").index(names[i]) if names[i] in "xyz" else 3 + i)
    return neuroglancer.CoordinateSpace(names=[names[i] for i in order], units="m",
                                        scales=[float(scales_m[i]) for i in order])


def _image_dimensions(image_zarr: Path):
    """Display dimensions (x, y, z) from the image's OME multiscales, or None."""
    try:
        ms = _ome_attrs(image_zarr)["multiscales"][0]
        scale = next(t["scale"] for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
        names = [a["name"] for a in ms["axes"]]
        return display_dimensions(names, [v * _UNIT_M[a.get("unit", "meter")] for v, a in zip(scale, ms["axes"])])
    except Exception:
        return None


def make_viewer(
    base_url: str,
    folder: str | Path,
    image: str = "tomogram.zarr",
    segmentation: str = "segmentation.zarr",
    layout: str = "4panel",
    side_panel: bool = True,
):
    """A ``neuroglancer.Viewer`` with the tomogram and the segmentation as ``zarr://`` layers
    (``side_panel``: show the segmentation layer's Source tab: its data type and voxel size)."""
    import neuroglancer

    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    colors = label_colors(Path(folder) / segmentation) or {1: "#e69f00"}
    dims = _image_dimensions(Path(folder) / image)
    with viewer.txn() as s:
        if dims is not None:
            s.dimensions = dims
        tomo = neuroglancer.ImageLayer(source=f"zarr://{base_url}/{image}")
        rng = contrast_range(Path(folder) / image)
        if rng:
            tomo.shader_controls = {"normalized": {"range": rng}}
        s.layers["tomogram"] = tomo
        seg = neuroglancer.SegmentationLayer(source=f"zarr://{base_url}/{segmentation}")
        seg.segments = sorted(colors)  # label 1 (macromolecule) drawn; 0 (background) never is
        seg.segment_colors = colors  # the colours the label image declares
        seg.selected_alpha = 0.5
        s.layers["segmentation"] = seg
        s.layout = layout
        s.selected_layer.layer = "segmentation"
        s.selected_layer.visible = side_panel
    return viewer


def wait_until_loaded(viewer, layers=("tomogram", "segmentation"), timeout: float = 30.0):
    """Ask the client (through the browser) for each layer's volume info; raises on a
    data-source error (e.g. metadata neuroglancer rejects). Returns ``{layer: VolumeInfo}``."""
    infos = {}
    deadline = time.monotonic() + timeout
    for name in layers:
        while True:
            try:
                infos[name] = viewer.volume_info(name).result(timeout=max(1.0, deadline - time.monotonic()))
                break
            except ValueError as e:  # the layer's data source is not ready yet, or failed
                if time.monotonic() > deadline:
                    raise RuntimeError(f"neuroglancer could not load layer {name!r}: {e}") from e
                time.sleep(0.5)
    return infos


def read_through_neuroglancer(viewer, layer: str, info, timeout: float = 30.0):
    """The layer's full-resolution array as neuroglancer decodes it (fetched and
    decompressed by the web client, chunk by chunk), to compare with zarr's reading.
    Uses the viewer's (private) volume-chunk request, as ``Viewer.volume`` does."""
    import itertools

    import numpy as np

    lower, upper, cs = (np.asarray(v, dtype=np.int64) for v in (info.lower_bound, info.upper_bound, info.chunk_shape))
    origin = np.asarray(info.grid_origin, dtype=np.int64)
    out = np.zeros(upper - lower, dtype=np.dtype(info.data_type))
    first, last = (lower - origin) // cs, (upper - 1 - origin) // cs
    for pos in itertools.product(*(range(a, b + 1) for a, b in zip(first, last))):
        chunk = viewer._volume_chunk(layer, info, list(pos)).result(timeout=timeout)
        start = origin + np.asarray(pos) * cs
        lo, hi = np.maximum(start, lower), np.minimum(start + cs, upper)
        out[tuple(slice(a, b) for a, b in zip(lo - lower, hi - lower))] = chunk[
            tuple(slice(a, b) for a, b in zip(lo - start, hi - start))]
    return out


def fit_to_panels(viewer, info, window_size, layout="4panel", side_panel=300, top_bars=50):
    """Centre on the volume and zoom the cross sections so it fills a panel (the
    default draws one pixel per voxel), with x, y, z as the display dimensions."""
    names = list(info.dimensions.names)
    dims = display_dimensions(names, info.dimensions.scales)
    lower, upper = info.lower_bound.tolist(), info.upper_bound.tolist()
    centre = {n: (lo + hi) // 2 + 0.5 for n, lo, hi in zip(names, lower, upper)}
    # crossSectionScale counts the first display dimension's units per pixel
    physical = [(hi - lo) * scale for lo, hi, scale in zip(lower, upper, info.dimensions.scales)]
    extent = max(physical) / dims.scales[0]
    w, h = window_size[0] - side_panel, window_size[1] - top_bars
    if layout == "4panel":
        w, h = w / 2, h / 2
    with viewer.txn() as s:
        s.dimensions = dims  # set here too: don't rely on the client's echo of the dimensions
        s.position = [centre[n] for n in dims.names]
        s.cross_section_scale = extent / (0.92 * min(w, h))
        s.projection_scale = extent * 1.6


def _timed_screenshot(viewer, size, timeout, console=()):
    """``viewer.screenshot`` (which waits until all visible chunks are drawn), but
    giving up after ``timeout`` seconds: a chunk that never loads would hang it."""
    if size is not None:
        with viewer.config_state.txn() as s:
            s.show_ui_controls = False
            s.show_panel_borders = False
            s.viewer_size = size
    done, result, stats = threading.Event(), [], []

    def handler(reply):
        result.append(reply)
        done.set()

    viewer.async_screenshot(handler, statistics_callback=stats.append)
    if not done.wait(timeout):
        detail = stats[-1].to_json() if stats else "no statistics"
        msgs = "\n".join(console)
        raise TimeoutError(f"neuroglancer did not finish drawing in {timeout:g} s ({detail}); console:\n{msgs}")
    return result[0]


def _voxel(info) -> str:
    """'10 Å' style voxel size from a VolumeInfo's dimensions (metres)."""
    scales = {round(float(scale) * 1e10, 4) for scale, unit in zip(info.dimensions.scales, info.dimensions.units)}
    return " × ".join(f"{v:g} Å" for v in sorted(scales))


def _find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


def chromium_binary():
    return _find("chromium", "chromium-browser", "google-chrome", "chrome")


def chromedriver_binary():
    return _find("chromedriver")


@contextlib.contextmanager
def headless_browser(viewer, window_size=(900, 600), console: list | None = None):
    """Open ``viewer`` in headless Chromium (WebGL through SwiftShader) via selenium.

    chromedriver is taken from PATH and passed explicitly, so Selenium Manager
    (which would try to download a browser/driver) never runs."""
    import selenium.webdriver
    from selenium.webdriver.chrome.service import Service

    options = selenium.webdriver.ChromeOptions()
    options.enable_bidi = True  # console messages, via WebDriver BiDi
    options.binary_location = chromium_binary()
    for arg in (
        "--headless=new",
        "--no-sandbox",  # running as root in containers
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",  # software WebGL, no GPU needed
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={window_size[0]},{window_size[1]}",
    ):
        options.add_argument(arg)
    driver = selenium.webdriver.Chrome(options=options, service=Service(executable_path=chromedriver_binary()))
    try:
        if console is not None:
            def log(entry):
                console.append(f"console.{getattr(entry, 'level', '?')}: {getattr(entry, 'text', entry)}")

            driver.script.add_console_message_handler(log)
            driver.script.add_javascript_error_handler(log)
        # --window-size is the outer size; make the viewport exactly window_size
        w, h = driver.execute_script("return [window.innerWidth, window.innerHeight];")
        if (w, h) != tuple(window_size):
            outer = driver.get_window_size()
            driver.set_window_size(outer["width"] + window_size[0] - w, outer["height"] + window_size[1] - h)
        driver.get(viewer.get_viewer_url())
        yield driver
    finally:
        driver.quit()


def screenshot(
    folder: str | Path,
    out: str | Path,
    image: str = "tomogram.zarr",
    segmentation: str = "segmentation.zarr",
    size=(900, 600),
    layout: str = "4panel",
    ui: bool = True,
    timeout: float = 60.0,
):
    """Render the two layers in headless Chromium and write a PNG to ``out``.

    ``ui=True`` captures the whole page as a person sees it (layer bar, panels);
    ``ui=False`` uses neuroglancer's own screenshot (canvas only). Returns
    ``(volume infos by layer, console messages)``."""
    console: list[str] = []
    with serve_folder(folder) as base_url:
        viewer = make_viewer(base_url, folder, image, segmentation, layout=layout, side_panel=ui)
        with headless_browser(viewer, window_size=size, console=console) as wd:
            infos = wait_until_loaded(viewer, timeout=timeout)
            fit_to_panels(viewer, infos["tomogram"], size, layout, side_panel=300 if ui else 0, top_bars=50 if ui else 0)
            # neuroglancer's screenshot waits until every visible chunk is drawn
            shot = _timed_screenshot(viewer, None if ui else list(size), timeout, console)
            if ui:
                time.sleep(0.5)
                png = wd.get_screenshot_as_png()
            else:
                png = shot.screenshot.image
    Path(out).write_bytes(png)
    return infos, console


# ------------------------------------------------------------------------ CLI


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="folder with the tomogram and the segmentation (e.g. from 'tileseg demo')")
    p.add_argument("--image", default="tomogram.zarr", help="image OME-Zarr, relative to folder")
    p.add_argument("--segmentation", default="segmentation.zarr", help="label OME-Zarr, relative to folder")
    p.add_argument("--port", type=int, default=0, help="port for the data server (0: any free port)")
    p.add_argument("--layout", default="4panel", help="neuroglancer layout: 4panel, xy, xz, yz, 3d, xy-3d, ...")
    p.add_argument("--screenshot", metavar="PNG", help="render headless and save a PNG instead of serving")
    p.add_argument("--size", default="900x600", help="screenshot size WxH (default 900x600)")
    p.add_argument("--no-ui", action="store_true", help="screenshot the canvas only, without neuroglancer's UI")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    for name in (a.image, a.segmentation):
        if not (folder / name).is_dir():
            p.error(f"{folder / name} not found")

    if a.screenshot:
        if not chromium_binary():
            sys.exit("--screenshot needs Chromium (apt-get install chromium chromium-driver)")
        size = tuple(int(v) for v in a.size.lower().split("x"))
        infos, console = screenshot(folder, a.screenshot, a.image, a.segmentation, size=size,
                                    layout=a.layout, ui=not a.no_ui)
        for name, info in infos.items():
            print(f"{name}: {info.data_type}, bounds {info.lower_bound.tolist()}..{info.upper_bound.tolist()}, "
                  f"chunk {info.chunk_shape.tolist()}, voxel {_voxel(info)}")
        for line in console:
            if "error" in line.lower() or "warn" in line.lower():
                print(line, file=sys.stderr)
        print(f"wrote {a.screenshot}")
        return

    import neuroglancer

    with serve_folder(folder, a.port) as base_url:
        viewer = make_viewer(base_url, folder, a.image, a.segmentation, layout=a.layout)
        print(f"data:   {base_url}/  (zarr://{base_url}/{a.segmentation})")
        print(f"viewer: {viewer}")
        print("open the viewer URL in a browser on this machine; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            neuroglancer.stop()


if __name__ == "__main__":
    main()

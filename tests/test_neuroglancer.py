"""neuroglancer opens tileseg's output through its own ``zarr://`` data source.

For OME-Zarr 0.4 (Zarr v2, Blosc/zstd, "/" separator) and 0.5 (Zarr v3, sharded)
a small tomogram and its segmentation are served on 127.0.0.1 (CORS + Range, as
examples/neuroglancer_view.py does) and opened in neuroglancer's web client in
headless Chromium (software WebGL). Checked: neuroglancer takes both as volumes
with the right data type, bounds and voxel size, decodes every chunk to exactly
what zarr reads, reports no errors, and draws the label in the label image's
colour over the tomogram (and not when the segmentation layer is hidden).

Slow and optional: needs ``pip install neuroglancer selenium`` and Chromium with
chromedriver (Debian: ``apt-get install chromium chromium-driver``); without them
it skips. CI installs no Chromium, so in CI this test is skipped; run it locally
with ``pytest -m slow tests/test_neuroglancer.py``.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from .conftest import blobs, mrc_file

pytest.importorskip("neuroglancer")
pytest.importorskip("selenium")
if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
if not shutil.which("chromedriver"):
    pytest.skip("chromedriver is not installed (apt-get install chromium-driver)", allow_module_level=True)

pytestmark = pytest.mark.slow

SHAPE = (24, 40, 48)  # z, y, x: not a multiple of the chunk
VOXEL_XYZ = (10.0, 9.0, 11.0)  # Å, anisotropic
SIZE = (320, 240)


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "neuroglancer_view.py"
    spec = importlib.util.spec_from_file_location("neuroglancer_view", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nv = _example()


def _orange(png: bytes) -> np.ndarray:
    """Pixels tinted by the macromolecule colour (230, 159, 0) over a grey tomogram."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - b > 60) & (g - b > 30) & (r > g)


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def output(request, tmp_path_factory, identity_model, client):
    from tilesegment.convert import convert
    from tilesegment.pipeline import segment

    ngff = request.param
    shard = 32 if ngff == "0.5" else None
    folder = tmp_path_factory.mktemp(f"ng{ngff}")
    tomo, _ = blobs(SHAPE, seed=3)
    mrc_file(folder / "tomo.mrc", tomo, voxel=VOXEL_XYZ)
    convert(folder / "tomo.mrc", folder / "tomogram.zarr", ngff=ngff, chunk=16, shard=shard, levels=2)
    # the identity model thresholds the tomogram at 0.5: label 1 on the blobs
    segment(str(folder / "tomogram.zarr"), str(folder / "segmentation.zarr"), model=identity_model, tile=16,
            chunk=16, shard=shard, ngff=ngff, levels=2, client=client)
    return folder


def test_neuroglancer_reads_and_draws_the_segmentation(output):
    console: list[str] = []
    with nv.serve_folder(output) as base_url:
        viewer = nv.make_viewer(base_url, output, layout="xy", side_panel=False)
        with nv.headless_browser(viewer, window_size=SIZE, console=console):
            infos = nv.wait_until_loaded(viewer, timeout=30)

            voxel_zyx_m = [v * 1e-10 for v in VOXEL_XYZ[::-1]]
            for layer, dtype in (("tomogram", "float32"), ("segmentation", "uint8")):
                info = infos[layer]
                assert info.data_type == dtype, layer
                assert info.lower_bound.tolist() == [0, 0, 0], layer
                assert info.upper_bound.tolist() == list(SHAPE), layer
                assert list(info.dimensions.names) == ["z", "y", "x"], layer
                assert list(info.dimensions.units) == ["m", "m", "m"], layer
                np.testing.assert_allclose(info.dimensions.scales, voxel_zyx_m, rtol=1e-6, err_msg=layer)
                name = f"{layer}.zarr"
                expected = np.asarray(zarr.open_array(str(output / name / "0"), mode="r")[...])
                seen = nv.read_through_neuroglancer(viewer, layer, info)
                np.testing.assert_array_equal(seen, expected, err_msg=f"{name} as neuroglancer decodes it")

            nv.fit_to_panels(viewer, infos["tomogram"], SIZE, layout="xy", side_panel=0, top_bars=0)
            pixel_m = viewer.state.cross_section_scale * viewer.state.dimensions.scales[0]
            with_labels = nv._timed_screenshot(viewer, list(SIZE), 30, console).screenshot.image
            with viewer.txn() as s:
                s.layers["segmentation"].visible = False
            without = nv._timed_screenshot(viewer, list(SIZE), 30, console).screenshot.image

    errors = [line for line in console if "error" in line.lower()]
    assert not errors, errors
    z = SHAPE[0] // 2  # the "xy" panel shows this z slice, x across, y down (the example puts x, y, z first)
    fraction = float(np.mean(zarr.open_array(str(output / "segmentation.zarr" / "0"), mode="r")[z] == 1))
    assert fraction > 0.02  # the test data has label 1 in the slice drawn
    (vx, vy, _), (_, ny, nx) = (v * 1e-10 for v in VOXEL_XYZ), SHAPE
    slice_px = (nx * vx / pixel_m) * (ny * vy / pixel_m)  # the slice's area on the canvas
    expected = fraction * slice_px / (SIZE[0] * SIZE[1])
    drawn = float(_orange(with_labels).mean())
    assert 0.75 * expected < drawn < 1.25 * expected, f"{drawn:.4f} of the canvas in the label colour, expected {expected:.4f}"
    assert _orange(without).mean() < 0.001  # the colour comes from the segmentation layer

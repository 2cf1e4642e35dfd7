"""preview(): the three orthogonal slices of the tomogram, the mask over them in its label colour, in a PNG."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import zarr
from PIL import Image

import tilesegment.preview as preview_module
from tilesegment.convert import convert
from tilesegment.errors import InputError, OptionError
from tilesegment.ome import LABEL_COLORS
from tilesegment.preview import ALPHA, GAP, preview

from .outputs import SHAPE, copy_with_meta, labels, segmented
from .test_cli import assert_one_line_error, tileseg

COLOUR = np.array(LABEL_COLORS[0][:3], np.float64)  # label 1's colour in the image-label metadata


@pytest.fixture(scope="module")
def seg(tmp_path_factory, identity_model, client):
    return segmented(tmp_path_factory.mktemp("preview"), identity_model, client, probabilities=False)


def tomogram(src) -> np.ndarray:
    with mrcfile.open(src) as mrc:
        return np.array(mrc.data)


def pixels(png, report, name: str) -> np.ndarray:
    """The panel's pixels, one per voxel (the top-left pixel of each zoomed voxel), as float."""
    left, top, width, height = report.panels[name]
    image = np.asarray(Image.open(png).convert("RGB"), np.float64)
    return image[top:top + height:report.zoom, left:left + width:report.zoom]


def planes(volume: np.ndarray, at) -> dict[str, np.ndarray]:
    z, y, x = at
    return {"xy": volume[z], "xz": volume[:, y, :], "yz": volume[:, :, x].T}


def is_grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


def check_overlay(png, report, mask: dict[str, np.ndarray], values: dict[str, np.ndarray] | None) -> None:
    """Coloured pixels exactly where the mask is, grey elsewhere; the grey is the tomogram stretched
    from the 1st to the 99th percentile of the three slices, and under the mask it is blended with
    the label colour at ALPHA."""
    if values is not None:
        low, high = np.percentile(np.concatenate([v.ravel() for v in values.values()]), [1, 99])
    for name, expected in mask.items():
        rgb = pixels(png, report, name)
        inside = expected.astype(bool)
        assert rgb.shape[:2] == expected.shape, name
        np.testing.assert_array_equal(~is_grey(rgb), inside, err_msg=name)
        under = (rgb[inside] - ALPHA * COLOUR) / (1 - ALPHA)  # the grey below the colour
        assert np.ptp(under, axis=-1).max() <= 2.5, name
        if values is not None:
            grey = np.clip((values[name] - low) / (high - low) * 255, 0, 255)
            np.testing.assert_allclose(rgb[~inside][:, 0], grey[~inside], atol=1.01, err_msg=name)
            np.testing.assert_allclose(under[:, 0], grey[inside], atol=2.5, err_msg=name)


@pytest.mark.parametrize("zoom", [1, 3])
def test_slices_through_the_centre_with_the_mask_in_colour(tmp_path, seg, zoom):
    src, out = seg
    report = preview(out, tmp_path / "p.png", zoom=zoom, level=0)
    nz, ny, nx = SHAPE
    assert report.position == (nz // 2, ny // 2, nx // 2) and report.level == 0 and report.zoom == zoom
    assert report.panels == {"xy": (0, 0, zoom * nx, zoom * ny), "xz": (0, zoom * ny + GAP, zoom * nx, zoom * nz),
                             "yz": (zoom * nx + GAP, 0, zoom * nz, zoom * ny)}
    width, height = Image.open(tmp_path / "p.png").size
    assert (width, height) == report.size
    assert width >= zoom * (nx + nz) + GAP and height > zoom * (ny + nz) + GAP  # the legend below the slices
    volume = tomogram(src)
    check_overlay(tmp_path / "p.png", report, planes(labels(out), report.position), planes(volume, report.position))
    np.testing.assert_array_equal(planes(labels(out), report.position)["yz"], planes(volume > 0.5, report.position)["yz"])


def test_legend_goes_in_the_empty_corner_when_it_fits(tmp_path, seg):
    report = preview(seg[1], tmp_path / "p.png", zoom=12, level=0)
    nz, ny, nx = SHAPE
    assert report.size == (12 * (nx + nz) + GAP, 12 * (ny + nz) + GAP)
    corner = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))[12 * ny + GAP:, 12 * nx + GAP:]
    assert (np.abs(corner.astype(int) - COLOUR).sum(axis=-1) == 0).any()  # the legend's swatch


def test_position_and_a_coarser_level(tmp_path, seg):
    src, out = seg
    report = preview(out, tmp_path / "p.png", level=1, position=(3, 20, 9), zoom=2)
    at = (1, 10, 4)  # (3, 20, 9) at level 1
    assert report.level == 1 and report.position == (3, 20, 9)
    volume = tomogram(src)[::2, ::2, ::2]  # the label pyramid is nearest: every second voxel
    check_overlay(tmp_path / "p.png", report, planes(labels(out, 1), at), planes(volume, at))


def test_large_volumes_get_a_coarser_level_and_a_step(tmp_path, seg, monkeypatch):
    src, out = seg
    monkeypatch.setattr(preview_module, "MAX_SIDE", 40)  # level 0 needs 30 + 20 + GAP pixels, level 1 29
    report = preview(out, tmp_path / "a.png", zoom=1)
    assert (report.level, report.step) == (1, 1)
    monkeypatch.setattr(preview_module, "MAX_SIDE", 20)  # even level 1 is too big: every second voxel of it
    report = preview(out, tmp_path / "b.png", zoom=1)
    assert (report.level, report.step) == (1, 2)
    at = tuple(p // 2 for p in report.position)
    mask = {k: v[::2, ::2] for k, v in planes(labels(out, 1), at).items()}
    check_overlay(tmp_path / "b.png", report, mask, {k: v[::2, ::2] for k, v in planes(tomogram(src)[::2, ::2, ::2], at).items()})


def test_an_ome_zarr_tomogram_is_read_at_the_matching_level(tmp_path, seg):
    src, out = seg
    convert(src, tmp_path / "tomo.zarr", chunk=8, levels=2)
    report = preview(out, tmp_path / "p.png", tomogram=tmp_path / "tomo.zarr", level=1, zoom=1)
    assert report.tomogram == str(tmp_path / "tomo.zarr")
    at = tuple(p // 2 for p in report.position)
    coarse = np.asarray(zarr.open_array(str(tmp_path / "tomo.zarr" / "1"), mode="r")[:])  # its 2x mean level
    check_overlay(tmp_path / "p.png", report, planes(labels(out, 1), at), planes(coarse, at))


def test_without_the_tomogram_the_mask_is_drawn_alone(tmp_path, seg):
    copy = copy_with_meta(seg[1], tmp_path, input=str(tmp_path / "moved.mrc"))
    report = preview(copy, tmp_path / "p.png", zoom=1, level=0)
    assert report.tomogram is None and "moved.mrc" in report.note and "--tomogram" in report.note
    for name, mask in planes(labels(copy), report.position).items():
        rgb = pixels(tmp_path / "p.png", report, name)
        np.testing.assert_array_equal(rgb[mask == 1], np.broadcast_to(COLOUR, rgb[mask == 1].shape))
        assert (rgb[mask == 0] == 0).all()


def test_bad_requests(tmp_path, seg):
    src, out = seg
    with pytest.raises(OptionError, match="--position"):
        preview(out, tmp_path / "p.png", position=(0, 0, SHAPE[2]))
    with pytest.raises(OptionError, match="--level"):
        preview(out, tmp_path / "p.png", level=2)
    with pytest.raises(OptionError, match=".png"):
        preview(out, src)  # a slip of the arguments must not overwrite the tomogram
    small = tmp_path / "small.mrc"
    with mrcfile.new(small) as mrc:
        mrc.set_data(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(InputError, match="differs from the segmentation"):
        preview(out, tmp_path / "p.png", tomogram=small)
    assert not (tmp_path / "p.png").exists()
    assert mrcfile.validate(src)


def test_cli(tmp_path, seg):
    result = tileseg("preview", seg[1], str(tmp_path / "p.png"), "--position", "1,2,3")
    assert result.returncode == 0, result.stderr
    assert "slices through z=1 y=2 x=3" in result.stdout and result.stderr == ""
    assert Image.open(tmp_path / "p.png").format == "PNG"
    copy = copy_with_meta(seg[1], tmp_path, input=str(tmp_path / "moved.mrc"))
    result = tileseg("preview", copy, str(tmp_path / "q.png"))
    assert result.returncode == 0 and "drawing the mask alone" in result.stderr
    assert_one_line_error(tileseg("preview", str(tmp_path / "none.zarr"), str(tmp_path / "r.png")), 3, "no such file")
    assert_one_line_error(tileseg("preview", seg[1], str(tmp_path / "r.png"), "--position", "0,0,99"), 2, "--position")
    assert not (tmp_path / "r.png").exists()

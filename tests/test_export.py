"""export(): a finished segmentation as valid MRC files with the input's geometry, streamed, never half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mrcfile
import numpy as np
import pytest
import zarr

import tilesegment.export as export_module
from tilesegment.convert import convert
from tilesegment.errors import InputError, OptionError, OutputError
from tilesegment.export import export

from .outputs import ORIGIN_XYZ, SHAPE, VOXEL_XYZ, copy_with_meta, labels, probabilities, segmented
from .test_cli import assert_one_line_error, tileseg


@pytest.fixture(scope="module")
def seg(tmp_path_factory, identity_model, client):
    """``(tomogram, OUTPUT.zarr)`` of an identity-model run with float32 probabilities (label = value > 0.5)."""
    return segmented(tmp_path_factory.mktemp("export"), identity_model, client)


def read_mrc(path):
    assert mrcfile.validate(path), f"{path} is not a valid MRC2014 file"
    with mrcfile.open(path, permissive=False) as mrc:
        return np.array(mrc.data), mrc.header.copy(), mrc.voxel_size.copy()


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_mask_has_the_inputs_data_order_voxel_size_and_origin(tmp_path, identity_model, client, ngff):
    src, out = segmented(tmp_path, identity_model, client, ngff=ngff)
    report = export(out, tmp_path / "mask.mrc")
    data, header, voxel = read_mrc(tmp_path / "mask.mrc")
    with mrcfile.open(src) as tomogram:
        expected = (tomogram.data > 0.5).astype(np.int8)  # the identity network's labels, in the tomogram's own z, y, x order
        assert data.shape == tomogram.data.shape == SHAPE
    assert int(header.mode) == 0 and data.dtype == np.int8 and report.mask_mode == 0
    np.testing.assert_array_equal(data, expected)
    assert (voxel.x, voxel.y, voxel.z) == pytest.approx(VOXEL_XYZ)
    assert tuple(header.origin.item()) == pytest.approx(ORIGIN_XYZ)
    assert (int(header.nx), int(header.ny), int(header.nz)) == SHAPE[::-1]
    assert float(header.dmax) == 1 and float(header.dmin) == 0
    assert float(header.dmean) == pytest.approx(expected.mean(), rel=1e-5)
    assert report.shape == SHAPE and report.origin == pytest.approx(ORIGIN_XYZ)


def test_probabilities_of_a_one_channel_model_are_one_float32_file(tmp_path, seg):
    _, out = seg
    report = export(out, tmp_path / "mask.mrc", probabilities=tmp_path / "probs.mrc")
    assert report.probabilities == (str(tmp_path / "probs.mrc"),)
    data, header, _ = read_mrc(tmp_path / "probs.mrc")
    assert int(header.mode) == 2 and data.dtype == np.float32
    np.testing.assert_array_equal(data, probabilities(out)[0])
    assert tuple(header.origin.item()) == pytest.approx(ORIGIN_XYZ)


def test_multi_class_probabilities_give_one_file_per_foreground_class(tmp_path, small_net, client):
    _, out = segmented(tmp_path, small_net, client, probability_dtype="uint8", levels=1)
    report = export(out, tmp_path / "mask.mrc", probabilities=tmp_path / "p.mrc")
    assert report.probabilities == (str(tmp_path / "p_1_a.mrc"), str(tmp_path / "p_2_b.mrc"))
    stored = probabilities(out)
    assert stored.shape[0] == 3 and stored.dtype == np.uint8
    for channel, path in enumerate(report.probabilities, start=1):
        data, header, _ = read_mrc(path)
        assert data.dtype == np.float32 and 0 <= data.min() and data.max() <= 1
        np.testing.assert_allclose(data, stored[channel] / 255, rtol=0, atol=1e-6)
        assert b"P(" in header.label[1]
    assert not (tmp_path / "p.mrc").exists()
    np.testing.assert_array_equal(read_mrc(tmp_path / "mask.mrc")[0], labels(out))


def test_a_coarser_level_has_its_own_shape_and_voxel_size(tmp_path, seg):
    _, out = seg
    report = export(out, tmp_path / "mask1.mrc", level=1, probabilities=tmp_path / "p1.mrc")
    data, header, voxel = read_mrc(tmp_path / "mask1.mrc")
    np.testing.assert_array_equal(data, labels(out, 1))
    assert data.shape == tuple(-(-n // 2) for n in SHAPE) == report.shape
    assert (voxel.x, voxel.y, voxel.z) == pytest.approx([2 * v for v in VOXEL_XYZ])
    p1, p1_header, _ = read_mrc(tmp_path / "p1.mrc")
    np.testing.assert_array_equal(p1, probabilities(out, 1)[0])
    assert tuple(header.origin.item()) == pytest.approx(ORIGIN_XYZ)  # labels: every second voxel, from voxel 0
    # probabilities: 2× means, the first centred between voxels 0 and 1
    assert tuple(p1_header.origin.item()) == pytest.approx([o + v / 2 for o, v in zip(ORIGIN_XYZ, VOXEL_XYZ)])


def test_streams_slab_by_slab(tmp_path, seg, monkeypatch):
    _, out = seg
    plane = SHAPE[1] * SHAPE[2]
    monkeypatch.setattr(export_module, "SLAB_BYTES", 3 * plane)  # 3 int8 planes: fewer than a chunk (8) deep
    calls: list[int] = []
    export(out, tmp_path / "mask.mrc", progress=calls.append)
    assert calls == [3 * plane] * (SHAPE[0] // 3) + [SHAPE[0] % 3 * plane]
    np.testing.assert_array_equal(read_mrc(tmp_path / "mask.mrc")[0], labels(out))
    monkeypatch.setattr(export_module, "SLAB_BYTES", 17 * plane * 4)  # whole chunks: 16 planes, then the rest
    calls.clear()
    export(out, tmp_path / "mask.mrc", probabilities=tmp_path / "p.mrc", overwrite=True, progress=calls.append)
    assert calls[-2:] == [16 * plane, 4 * plane]
    np.testing.assert_array_equal(read_mrc(tmp_path / "p.mrc")[0], probabilities(out)[0])


@pytest.mark.parametrize("meta, expected", [
    (dict(origin=[1.0, 2.0, 3.0]), (1.0, 2.0, 3.0)),  # recorded by the run, (x, y, z)
    (dict(origin=None, origin_angstrom=None), ORIGIN_XYZ),  # not recorded: from the input's header
    (dict(origin=None, origin_angstrom=None, input="/nonexistent/tomo.mrc"), (0.0, 0.0, 0.0)),  # input gone: zero
])
def test_origin_comes_from_the_run_else_the_input(tmp_path, seg, meta, expected):
    copy = copy_with_meta(seg[1], tmp_path, **meta)
    export(copy, tmp_path / "mask.mrc")
    assert tuple(read_mrc(tmp_path / "mask.mrc")[1].origin.item()) == pytest.approx(expected)


def test_refuses_an_existing_mrc_without_overwrite(tmp_path, seg):
    (tmp_path / "p.mrc").write_bytes(b"keep")
    with pytest.raises(OutputError) as info:
        export(seg[1], tmp_path / "mask.mrc", probabilities=tmp_path / "p.mrc")
    assert "p.mrc" in info.value.what and "--overwrite" in info.value.fix
    assert (tmp_path / "p.mrc").read_bytes() == b"keep" and not (tmp_path / "mask.mrc").exists()
    export(seg[1], tmp_path / "mask.mrc", probabilities=tmp_path / "p.mrc", overwrite=True)
    assert mrcfile.validate(str(tmp_path / "p.mrc"))


def test_never_writes_over_the_tomogram_it_was_segmented_from(tmp_path, seg, monkeypatch):
    """Even with --overwrite (a slip of the mask's name), by the same file under another path too."""
    tomogram, out = seg
    before = open(tomogram, "rb").read()
    monkeypatch.chdir(os.path.dirname(tomogram))
    for target, kwargs in [(tomogram, {}), (os.path.basename(tomogram), {}), (tmp_path / "mask.mrc", {"probabilities": tomogram})]:
        with pytest.raises(OutputError, match="is the tomogram .* was segmented from") as info:
            export(out, target, overwrite=True, **kwargs)
        assert "_mask.mrc" in info.value.fix
    assert open(tomogram, "rb").read() == before and not (tmp_path / "mask.mrc").exists()


@pytest.mark.parametrize("status", ["running", "incomplete"])
def test_refuses_an_unfinished_run_and_names_resume(tmp_path, seg, status):
    copy = copy_with_meta(seg[1], tmp_path, status=status)
    with pytest.raises(InputError) as info:
        export(copy, tmp_path / "mask.mrc")
    assert status in info.value.what and "--resume" in info.value.fix and seg[0] in info.value.fix
    assert os.listdir(tmp_path) == ["copy.zarr"]


def test_bad_requests(tmp_path, seg, identity_model, client):
    _, out = seg
    with pytest.raises(OptionError, match="levels 0 to 1"):
        export(out, tmp_path / "m.mrc", level=2)
    with pytest.raises(OptionError):
        export(out, tmp_path / "m.mrc", probabilities=tmp_path / "m.mrc")
    _, bare = segmented(tmp_path, identity_model, client, probabilities=False, levels=1, name="bare.zarr")
    with pytest.raises(OptionError, match="no probabilities"):
        export(bare, tmp_path / "m.mrc", probabilities=tmp_path / "p.mrc")
    with pytest.raises(InputError, match="no such file"):
        export(tmp_path / "missing.zarr", tmp_path / "m.mrc")
    with pytest.raises(InputError, match="not a Zarr group"):
        export(tmp_path, tmp_path / "m.mrc")
    image = tmp_path / "image.zarr"
    convert(seg[0], image)  # complete, OME-Zarr, but an image rather than a label image
    with pytest.raises(InputError, match="not a label image"):
        export(image, tmp_path / "m.mrc")
    assert not (tmp_path / "m.mrc").exists()


def test_a_killed_export_leaves_no_valid_looking_mrc(tmp_path, seg):
    """SIGKILL after the first slab: no MRC under the target name, and the hidden partial is not a valid MRC."""
    script = textwrap.dedent(f"""
        import os, signal
        import tilesegment.export as e
        e.SLAB_BYTES = 1
        e.export({seg[1]!r}, {str(tmp_path / 'mask.mrc')!r}, progress=lambda n: os.kill(os.getpid(), signal.SIGKILL))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert not (tmp_path / "mask.mrc").exists()
    leftovers = os.listdir(tmp_path)
    assert leftovers and all(name.startswith(".mask.mrc.") and name.endswith(".partial") for name in leftovers)
    for name in leftovers:
        with open(tmp_path / name, "rb") as f:
            head = f.read(1024)
            assert head == bytes(len(head))  # zeros (or not yet flushed): the header is written last
        assert not mrcfile.validate(str(tmp_path / name), print_file=open(os.devnull, "w"))


def test_cli(tmp_path, seg):
    result = tileseg("export", seg[1], str(tmp_path / "mask.mrc"), "--probabilities", str(tmp_path / "p.mrc"))
    assert result.returncode == 0, result.stderr
    assert "mask.mrc" in result.stdout and "p.mrc" in result.stdout
    assert mrcfile.validate(str(tmp_path / "mask.mrc")) and mrcfile.validate(str(tmp_path / "p.mrc"))
    assert_one_line_error(tileseg("export", seg[1], str(tmp_path / "mask.mrc")), 5, "already exists", "--overwrite")
    assert_one_line_error(tileseg("export", str(tmp_path / "none.zarr"), str(tmp_path / "m.mrc")), 3, "no such file")
    copy = copy_with_meta(seg[1], tmp_path, status="running")
    assert_one_line_error(tileseg("export", copy, str(tmp_path / "m.mrc")), 3, "not complete", "--resume")
    assert_one_line_error(tileseg("export", seg[1], str(tmp_path / "m.mrc"), "--level", "5"), 2, "--level 5")


def test_a_resampled_tomograms_mask_goes_back_onto_its_original_grid(tmp_path, identity_model, client, monkeypatch):
    """A 13.48 Å tomogram, resampled to 10 Å, segmented there, exported with --original-grid: the
    mask has the original's shape, voxel size and origin; each voxel holds the label of the
    resampled voxel nearest to it by the segmentation's own OME scale and translation; and it agrees
    with thresholding the original directly except along the blobs' edges."""
    from tilesegment.pipeline import segment

    from .conftest import blobs, mrc_file

    _, clean = blobs((30, 34, 38), seed=7, count=8)
    origin_xyz = (130.0, -20.0, 6.0)
    portal = mrc_file(tmp_path / "portal.mrc", clean.astype(np.float32), voxel=(13.48,) * 3, origin=origin_xyz)
    convert(portal, tmp_path / "tomo.zarr", chunk=16, voxel_size=10.0)
    out = str(tmp_path / "seg.zarr")
    segment(str(tmp_path / "tomo.zarr"), out, model=identity_model, tile=16, chunk=16, probabilities=True,
            probability_dtype="float32", client=client)
    monkeypatch.setattr(export_module, "SLAB_BYTES", 5 * 34 * 38)  # slabs of 5 planes: each reads its own stored planes
    report = export(out, tmp_path / "mask.mrc", probabilities=tmp_path / "p.mrc", original=True)
    mask, header, voxel = read_mrc(tmp_path / "mask.mrc")
    assert mask.shape == clean.shape == report.shape
    assert (voxel.x, voxel.y, voxel.z) == pytest.approx((13.48,) * 3)
    assert tuple(header.origin.item()) == pytest.approx(origin_xyz, abs=1e-3) == report.origin
    assert b"original grid" in header.label[1]

    stored = labels(out)
    dataset = zarr.open_group(out, mode="r").attrs["multiscales"][0]["datasets"][0]
    scale, shift = (t[k] for t, k in zip(dataset["coordinateTransformations"], ("scale", "translation")))
    nearest = [np.clip(np.floor((np.arange(n) * 13.48 - t) / s + 0.5), 0, m - 1).astype(int)  # by position, Å
               for n, s, t, m in zip(clean.shape, scale, shift, stored.shape)]
    np.testing.assert_array_equal(mask, stored[np.ix_(*nearest)])
    np.testing.assert_array_equal(read_mrc(tmp_path / "p.mrc")[0], probabilities(out)[0][np.ix_(*nearest)])
    assert np.mean(mask == clean) > 0.95, np.mean(mask == clean)

    with pytest.raises(OptionError, match="not level 1"):
        export(out, tmp_path / "m.mrc", original=True, level=1)


def test_original_grid_needs_a_resampled_tomogram(tmp_path, seg):
    with pytest.raises(OptionError, match="was not segmented from a tomogram that 'tileseg convert --voxel-size' resampled") as info:
        export(seg[1], tmp_path / "m.mrc", original=True)
    assert "Leave out --original-grid" in info.value.fix and not (tmp_path / "m.mrc").exists()

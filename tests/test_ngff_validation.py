"""Our OME-Zarr metadata checked by independent code: the ome-zarr-models validator (pydantic models of the
NGFF 0.4 and 0.5 specifications) and, where installed, the ome-zarr-py reader that napari-ome-zarr uses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v04.image import Image as Image04
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabel04
from ome_zarr_models.v05.image import Image as Image05
from ome_zarr_models.v05.image_label import ImageLabel as ImageLabel05

from tilesegment.convert import convert
from tilesegment.ome import LABEL_COLORS

from .outputs import SHAPE, VOXEL_XYZ, segmented

MODELS = {"0.4": (ImageLabel04, Image04), "0.5": (ImageLabel05, Image05)}
SCALE = list(VOXEL_XYZ[::-1])  # (z, y, x)


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def seg(request, tmp_path_factory, small_net, client):
    """A three-class run (background, a, b) with probabilities, in each NGFF version."""
    _, out = segmented(tmp_path_factory.mktemp(f"ngff{request.param}"), small_net, client, ngff=request.param, probability_dtype="float16")
    return request.param, out


def group(path):
    return zarr.open_group(str(path), mode="r")


def image_label_of(model, ngff: str):
    return model.attributes.image_label if ngff == "0.4" else model.attributes.ome.image_label


def multiscale_of(model, ngff: str):
    return (model.attributes.multiscales if ngff == "0.4" else model.attributes.ome.multiscales)[0]


def test_segmentation_is_a_valid_image_label(seg):
    ngff, out = seg
    label_model, _ = MODELS[ngff]
    model = label_model.from_zarr(group(out))  # raises a pydantic ValidationError on any violation
    label = image_label_of(model, ngff)
    assert [(p.label_value, p.model_dump(by_alias=True)["class"]) for p in label.properties] == [(0, "background"), (1, "a"), (2, "b")]
    assert [(c.label_value, c.rgba) for c in label.colors] == [(0, (0, 0, 0, 0)), (1, LABEL_COLORS[0]), (2, LABEL_COLORS[1])]
    multiscale = multiscale_of(model, ngff)
    assert [a.name for a in multiscale.axes] == ["z", "y", "x"] and {a.unit for a in multiscale.axes} == {"angstrom"}
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    assert scales == [pytest.approx(SCALE), pytest.approx([2 * s for s in SCALE])]
    arrays = [group(out)[d.path] for d in multiscale.datasets]
    assert all(a.dtype.kind in "iu" for a in arrays)  # NGFF: label images MUST be integer
    assert arrays[0].shape == SHAPE
    # the generic entry point recognises it as a label image, not just an image
    assert type(open_ome_zarr(group(out))).__name__ == "ImageLabel"


def test_probabilities_are_a_valid_image_with_a_channel_axis(seg):
    ngff, out = seg
    _, image_model = MODELS[ngff]
    model = image_model.from_zarr(group(f"{out}/probabilities"))
    multiscale = multiscale_of(model, ngff)
    assert [(a.name, a.type) for a in multiscale.axes] == [("c", "channel"), ("z", "space"), ("y", "space"), ("x", "space")]
    assert multiscale.datasets[0].coordinateTransformations[0].scale == pytest.approx([1.0, *SCALE])
    assert group(f"{out}/probabilities")["0"].shape == (3, *SHAPE)


@pytest.mark.parametrize("ngff, shard", [("0.4", None), ("0.5", None), ("0.5", 16)])
def test_convert_output_is_a_valid_image(tmp_path, ngff, shard):
    from .conftest import mrc_file, random_volume

    src = mrc_file(tmp_path / "t.mrc", random_volume((40, 36, 34)), voxel=VOXEL_XYZ)
    convert(src, tmp_path / "t.zarr", ngff=ngff, chunk=8, shard=shard, levels=3)
    model = MODELS[ngff][1].from_zarr(group(tmp_path / "t.zarr"))
    multiscale = multiscale_of(model, ngff)
    assert [d.path for d in multiscale.datasets] == ["0", "1", "2"]
    assert multiscale.datasets[2].coordinateTransformations[0].scale == pytest.approx([4 * s for s in SCALE])
    # the validator's own model of the translation that follows the scale: level 2's 4× means start 1.5 voxels on
    assert multiscale.datasets[2].coordinateTransformations[1].translation == pytest.approx([1.5 * s for s in SCALE])
    assert type(open_ome_zarr(group(tmp_path / "t.zarr"))).__name__ == "Image"


def test_the_validator_catches_broken_metadata(tmp_path, seg):
    """A control: the same output with one label colour duplicated, or a coarse level finer than level 0, must fail."""
    ngff, out = seg
    broken = tmp_path / "broken.zarr"
    shutil.copytree(out, broken)
    attrs_file = broken / (".zattrs" if ngff == "0.4" else "zarr.json")
    document = json.loads(attrs_file.read_text())
    ome = document if ngff == "0.4" else document["attributes"]["ome"]
    ome["image-label"]["colors"][2]["label-value"] = 1
    attrs_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="label-value"):
        MODELS[ngff][0].from_zarr(group(broken))
    ome["image-label"]["colors"][2]["label-value"] = 2
    ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] = [1.0, 1.0, 1.0]
    attrs_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="scale"):
        MODELS[ngff][0].from_zarr(group(broken))


def test_ome_zarr_reader_takes_it_as_a_label_layer(seg):
    """What napari-ome-zarr does, without napari: ome-zarr-py's Reader finds a multiscale label image."""
    reader = pytest.importorskip("ome_zarr.reader", reason="ome-zarr is in the test extra: pip install -e '.[test]'")
    from ome_zarr.io import parse_url

    ngff, out = seg
    node = next(iter(reader.Reader(parse_url(out))()))
    assert {type(spec).__name__ for spec in node.specs} >= {"Label", "Multiscales"}
    assert [tuple(level.shape) for level in node.data] == [SHAPE, tuple(-(-n // 2) for n in SHAPE)]
    assert node.metadata["name"] == "segmentation"
    # what napari-ome-zarr makes a layer's scale and translate of: level 0's transformations
    assert [t["type"] for t in node.metadata["coordinateTransformations"][0]] == ["scale", "translation"]
    assert {k: v["class"] for k, v in node.metadata["properties"].items()} == {0: "background", 1: "a", 2: "b"}
    assert node.metadata["color"][1] == pytest.approx([c / 255 for c in LABEL_COLORS[0]])
    np.testing.assert_array_equal(np.asarray(node.data[0]), np.asarray(group(out)["0"][:]))

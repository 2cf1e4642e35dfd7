"""evaluate: per-class IoU/Dice against a hand-written numpy oracle, the same from MRC or OME-Zarr, slab by slab."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import tilesegment.evaluate as evaluate_module
from tilesegment.errors import InputError, OptionError
from tilesegment.evaluate import ClassScore, EvaluationReport, evaluate
from tilesegment.ome import image_label, multiscales, ome_attrs

from .conftest import write_mrc

SHAPE = (9, 13, 11)
NAMES = ("background", "ribosome", "membrane", "actin")


def masks(shape=SHAPE, classes: int = 4, seed: int = 0, agree: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """A random truth and a prediction that agrees with it on about ``agree`` of the voxels."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, size=shape).astype(np.int16)
    noise = rng.integers(0, classes, size=shape).astype(np.int16)
    prediction = np.where(rng.random(shape) < agree, truth, noise).astype(np.int16)
    return prediction, truth


def oracle(prediction: np.ndarray, truth: np.ndarray, labels: int, ignore=()) -> dict:
    """Scores counted class by class with boolean masks: independent of the confusion-matrix code."""
    keep = ~np.isin(truth, list(ignore))
    p, t = prediction[keep], truth[keep]
    out = {}
    for c in range(labels):
        tp = int(np.sum((p == c) & (t == c)))
        fp = int(np.sum((p == c) & (t != c)))
        fn = int(np.sum((p != c) & (t == c)))
        union = tp + fp + fn
        out[c] = dict(tp=tp, fp=fp, fn=fn, support=int(np.sum(t == c)),
                      iou=tp / union if union else None, dice=2 * tp / (2 * tp + fp + fn) if union else None)
    tp = int(np.sum((p != 0) & (t != 0)))
    fp = int(np.sum((p != 0) & (t == 0)))
    fn = int(np.sum((p == 0) & (t != 0)))
    out["foreground"] = dict(tp=tp, fp=fp, fn=fn, support=int(np.sum(t != 0)),
                             iou=tp / (tp + fp + fn), dice=2 * tp / (2 * tp + fp + fn))
    return out


def check(score: ClassScore, expected: dict) -> None:
    assert (score.true_positives, score.false_positives, score.false_negatives, score.support) == (
        expected["tp"], expected["fp"], expected["fn"], expected["support"])
    for key in ("iou", "dice"):
        value = getattr(score, key)
        if expected[key] is None:
            assert value is None
        else:
            assert value == pytest.approx(expected[key], rel=1e-12)


def ome_zarr(path, data: np.ndarray, names=None, ngff: str = "0.4", chunks=(4, 5, 6)) -> str:
    """An OME-Zarr label image written with zarr directly (two levels, ``image-label`` with ``names``)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if ngff == "0.4" else 3)
    group.create_array("0", shape=data.shape, chunks=chunks, dtype=data.dtype)[...] = data
    group.create_array("1", shape=tuple((n + 1) // 2 for n in data.shape), chunks=chunks, dtype=data.dtype)[...] = data[::2, ::2, ::2]
    entries = {"multiscales": [multiscales("labels", ["0", "1"], (10.0, 10.0, 10.0), [1, 2], ngff, method="nearest")]}
    if names:
        entries["image-label"] = image_label(names, ngff)
    group.attrs.update(ome_attrs(ngff, **entries))
    return str(path)


def zarr_array(path, data: np.ndarray, chunks=(3, 4, 5)) -> str:
    zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, zarr_format=2)[...] = data
    return str(path)


# --- correctness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_oracle(tmp_path, seed):
    prediction, truth = masks(seed=seed)
    report = evaluate(write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", truth))
    expected = oracle(prediction, truth, 4)
    assert [c.label for c in report.classes] == [0, 1, 2, 3]
    assert [c.name for c in report.classes] == ["class 0", "class 1", "class 2", "class 3"]
    for c in report.classes:
        check(c, expected[c.label])
    check(report.foreground, expected["foreground"])
    assert report.mean_iou == pytest.approx(np.mean([expected[c]["iou"] for c in (1, 2, 3)]))
    assert report.mean_dice == pytest.approx(np.mean([expected[c]["dice"] for c in (1, 2, 3)]))
    assert report.voxels == truth.size and report.shape == SHAPE
    confusion = np.array(report.confusion)
    assert confusion.sum() == truth.size
    assert confusion[2, 3] == np.sum((truth == 2) & (prediction == 3))  # rows truth, columns prediction


def test_perfect_prediction_scores_one(tmp_path):
    _, truth = masks()
    path = write_mrc(tmp_path / "t.mrc", truth)
    report = evaluate(path, path)
    assert all(c.iou == 1.0 and c.dice == 1.0 and c.false_positives == c.false_negatives == 0 for c in report.classes)
    assert report.foreground.iou == report.foreground.dice == 1.0
    assert report.mean_iou == report.mean_dice == 1.0


def test_disjoint_prediction_scores_zero(tmp_path):
    truth = np.zeros(SHAPE, np.int8)
    truth[:, :, :5] = 1
    prediction = (1 - truth).astype(np.int8)  # every voxel wrong
    report = evaluate(write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", truth))
    assert [(c.iou, c.dice) for c in report.classes] == [(0.0, 0.0), (0.0, 0.0)]
    assert (report.foreground.iou, report.foreground.dice) == (0.0, 0.0)
    assert report.mean_iou == 0.0


def test_foreground_ignores_which_class(tmp_path):
    """A particle found but given the wrong class is a hit for foreground, a miss for both classes."""
    truth = np.zeros(SHAPE, np.int16)
    truth[2:5, 2:5, 2:5] = 1
    prediction = truth * 2
    report = evaluate(write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", truth))
    assert report.foreground.iou == 1.0
    assert report.score(1).iou == 0.0 and report.score(2).iou == 0.0


# --- inputs --------------------------------------------------------------------------------------


def test_mrc_zarr_and_ome_zarr_give_the_same_numbers(tmp_path):
    prediction, truth = masks(seed=3)
    predictions = {
        "mrc": write_mrc(tmp_path / "p.mrc", prediction.astype(np.int8)),  # mode 0: signed bytes
        "array": zarr_array(tmp_path / "p_array.zarr", prediction.astype(np.uint8)),
        "ome": ome_zarr(tmp_path / "p.zarr", prediction.astype(np.uint8), NAMES),
        "ome 0.5": ome_zarr(tmp_path / "p5.zarr", prediction.astype(np.uint16), NAMES, ngff="0.5"),
    }
    truths = {"mrc": write_mrc(tmp_path / "t.mrc", truth), "ome": ome_zarr(tmp_path / "t.zarr", truth.astype(np.uint8))}
    reports = {(p, t): evaluate(pp, tt) for p, pp in predictions.items() for t, tt in truths.items()}
    numbers = {key: (r.to_dict()["confusion"], r.mean_iou, r.foreground) for key, r in reports.items()}
    assert len({json.dumps([n[0], n[1], n[2].iou]) for n in numbers.values()}) == 1
    assert [c.name for c in reports["ome", "mrc"].classes] == list(NAMES)  # from the prediction's image-label
    assert [c.name for c in reports["ome 0.5", "mrc"].classes] == list(NAMES)  # NGFF 0.5: under attrs["ome"]
    assert [c.name for c in reports["mrc", "mrc"].classes] == ["class 0", "class 1", "class 2", "class 3"]
    # a level-0 array inside the OME-Zarr takes its names from the group around it
    assert [c.name for c in evaluate(f"{predictions['ome']}/0", truths["mrc"]).classes] == list(NAMES)


def test_class_names_from_argument_then_metadata(tmp_path):
    prediction, truth = masks(seed=4)
    p = ome_zarr(tmp_path / "p.zarr", prediction.astype(np.uint8), NAMES)
    t_named = ome_zarr(tmp_path / "t.zarr", truth.astype(np.uint8), ("bg", "a", "b", "c"))
    assert [c.name for c in evaluate(p, t_named, classes=("x", "y")).classes] == ["x", "y", "membrane", "actin"]
    hand_written = {"image-label": {"version": "0.4", "properties": [{"label-value": 2, "class": "membrane"}]}}
    zarr.open_group(str(p), mode="r+").attrs.update(hand_written)
    assert [c.name for c in evaluate(p, write_mrc(tmp_path / "t.mrc", truth)).classes] == ["class 0", "class 1", "membrane", "class 3"]
    # a prediction without names falls back to the truth's
    assert [c.name for c in evaluate(write_mrc(tmp_path / "p.mrc", prediction), t_named).classes] == ["bg", "a", "b", "c"]


@pytest.mark.parametrize("slab", [1, 7, 11 * 13 - 1, 2 * 11 * 13 + 5, 500])
def test_many_slabs_equal_one_slab(tmp_path, monkeypatch, slab):
    prediction, truth = masks(seed=5)
    p = write_mrc(tmp_path / "p.mrc", prediction)
    t = ome_zarr(tmp_path / "t.zarr", truth.astype(np.uint8), chunks=(2, 3, 4))
    whole = evaluate(p, t)
    reads = []
    original = evaluate_module.read_native
    monkeypatch.setattr(evaluate_module, "SLAB_VOXELS", slab)
    monkeypatch.setattr(evaluate_module, "BINCOUNT_VOXELS", 10)
    monkeypatch.setattr(evaluate_module, "read_native", lambda source, box: reads.append(box) or original(source, box))
    sliced = evaluate(p, t)
    assert sliced == whole
    boxes = reads[::2]
    assert len(boxes) > 1
    assert sum(b.size for b in boxes) == truth.size  # the slabs tile the volume exactly once
    assert all(b.start[0] % 2 == 0 and b.start[1] % 3 == 0 and b.start[2] % 4 == 0 for b in boxes)  # chunk-aligned


def test_labels_growing_across_slabs(tmp_path, monkeypatch):
    """A label first seen in a later slab widens the matrix without disturbing earlier counts."""
    prediction, truth = masks(seed=6, classes=2)
    truth[-1, -1, -1] = prediction[-1, -1, -1] = 9
    prediction[-1, -1, -2] = 7
    prediction[-2, 0, 0] = 300  # past 256 labels: the wider index type
    p, t = write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", truth)
    monkeypatch.setattr(evaluate_module, "SLAB_VOXELS", 11 * 13)
    monkeypatch.setattr(evaluate_module, "BINCOUNT_VOXELS", 17)
    report = evaluate(p, t)
    expected = oracle(prediction, truth, 301)
    assert len(report.classes) == 301
    for c in report.classes:
        check(c, expected[c.label])
    assert report.score(5).iou is None and report.score(300).iou == 0.0


def test_ignore_leaves_truth_label_out(tmp_path):
    prediction, truth = masks(seed=7)
    truth[0] = 200  # an "unlabelled" slab
    report = evaluate(zarr_array(tmp_path / "p.zarr", prediction.astype(np.uint8)),
                      zarr_array(tmp_path / "t.zarr", truth.astype(np.uint8)), ignore=[200])
    expected = oracle(prediction, truth, 4, ignore=[200])
    assert [c.label for c in report.classes] == [0, 1, 2, 3]  # no rows for the unused values up to 200
    for c in report.classes[:4]:
        check(c, expected[c.label])
    check(report.foreground, expected["foreground"])
    assert report.voxels == truth.size - 13 * 11
    assert report.ignore == (200,)
    with pytest.raises(OptionError, match="--ignore -1 is not a label value"):
        evaluate(write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", prediction), ignore=[-1])


def test_absent_classes_are_none_and_left_out_of_the_mean(tmp_path):
    prediction, truth = masks(seed=8, classes=3)
    report = evaluate(write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", truth),
                      classes=("background", "ribosome", "membrane", "actin", "tric"))
    expected = oracle(prediction, truth, 3)
    assert [c.name for c in report.classes] == ["background", "ribosome", "membrane", "actin", "tric"]
    for name in ("actin", "tric"):
        score = report.score(name)
        assert score.iou is None and score.dice is None and not score.present
        assert (score.true_positives, score.false_positives, score.false_negatives, score.support) == (0, 0, 0, 0)
    assert report.mean_iou == pytest.approx((expected[1]["iou"] + expected[2]["iou"]) / 2)
    assert report.mean_dice == pytest.approx((expected[1]["dice"] + expected[2]["dice"]) / 2)


def test_only_background_has_no_mean(tmp_path):
    zeros = np.zeros(SHAPE, np.int8)
    report = evaluate(write_mrc(tmp_path / "p.mrc", zeros), write_mrc(tmp_path / "t.mrc", zeros))
    assert report.mean_iou is None and report.mean_dice is None
    assert report.foreground.iou is None and report.score(0).iou == 1.0
    json.dumps(report.to_dict(), allow_nan=False)


# --- errors --------------------------------------------------------------------------------------


def one_line(error: InputError, *words: str) -> None:
    assert error.fix and "\n" not in error.message
    for word in words:
        assert word in error.message, error.message


def test_shape_mismatch_names_both_shapes(tmp_path):
    prediction, truth = masks()
    with pytest.raises(InputError) as info:
        evaluate(write_mrc(tmp_path / "p.mrc", prediction[:, :, :10]), write_mrc(tmp_path / "t.mrc", truth))
    one_line(info.value, "9×13×10", "9×13×11", "same tomogram")


@pytest.mark.parametrize("where", ["prediction", "truth"])
def test_float_mask_is_refused(tmp_path, where):
    prediction, truth = masks()
    p = write_mrc(tmp_path / "p.mrc", prediction.astype(np.float32) if where == "prediction" else prediction)
    t = ome_zarr(tmp_path / "t.zarr", truth.astype(np.float32) if where == "truth" else truth)
    with pytest.raises(InputError) as info:
        evaluate(p, t)
    one_line(info.value, where, "float32", "threshold")


def test_negative_label_is_refused(tmp_path):
    prediction, truth = masks()
    prediction[4, 5, 6] = -1
    with pytest.raises(InputError) as info:
        evaluate(write_mrc(tmp_path / "p.mrc", prediction.astype(np.int8)), write_mrc(tmp_path / "t.mrc", truth))
    one_line(info.value, "negative label -1", "z=")


def test_instance_mask_is_refused(tmp_path):
    prediction, truth = masks()
    truth[0, 0, 0] = 5000
    with pytest.raises(InputError) as info:
        evaluate(write_mrc(tmp_path / "p.mrc", prediction), write_mrc(tmp_path / "t.mrc", truth))
    one_line(info.value, "5000", "instance")


# --- output --------------------------------------------------------------------------------------


def test_to_dict_is_json_and_table_is_fixed_width(tmp_path):
    prediction, truth = masks(seed=9)
    report = evaluate(ome_zarr(tmp_path / "p.zarr", prediction.astype(np.uint8), NAMES),
                      write_mrc(tmp_path / "t.mrc", truth), classes=(*NAMES, "a very long class name that goes on and on"))
    assert isinstance(report, EvaluationReport)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["classes"][1]["name"] == "ribosome" and data["classes"][4]["iou"] is None
    assert data["foreground"]["iou"] == pytest.approx(report.foreground.iou)
    table = report.to_table()
    lines = table.splitlines()
    assert lines[0].split() == ["label", "class", "IoU", "Dice", "support"]
    assert len(lines) == 2 + 5 + 1 + 2
    assert f"{report.score('ribosome').iou:.4f}" in table and "n/a" in table and "foreground" in table
    assert max(len(line) for line in lines) < 100
    with pytest.raises(Exception):
        report.mean_iou = 1.0  # frozen

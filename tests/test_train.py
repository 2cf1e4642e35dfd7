"""Training: learns a simple synthetic task, stops early, writes a checkpoint tileseg run can use."""

from __future__ import annotations

import numpy as np
import pytest

from tilesegment.errors import OptionError
from tilesegment.model import load_checkpoint, read_checkpoint
from tilesegment.train import TrainConfig, Volume, confusion, label_targets, scores, train

from .conftest import blobs


def volumes(seeds, shape=(40, 40, 40)):
    out = []
    for seed in seeds:
        tomogram, truth = blobs(shape, seed=seed, snr=4.0)
        out.append(Volume(tomogram, truth))
    return out


def test_training_learns_blobs_and_writes_a_loadable_checkpoint(tmp_path):
    config = TrainConfig(channels=(4, 8, 8), crop=24, batch=4, max_steps=120, validate_every=20, patience=10, learning_rate=5e-3)
    path = str(tmp_path / "m.safetensors")
    report = train(volumes([1, 2]), volumes([3]), path, config)
    assert report.best_validation_iou > 0.5  # bright blobs at SNR 4 are easy
    model, model_config = load_checkpoint(read_checkpoint(path))
    assert model_config.class_names == ("background", "macromolecule")
    assert model_config.extra["validation_iou"] == pytest.approx(report.best_validation_iou, abs=1e-4)
    assert model_config.normalization == "zscore" and model_config.voxel_size == 10.0


def test_early_stopping_stops_when_validation_stalls(tmp_path):
    config = TrainConfig(channels=(4, 4, 4), crop=16, batch=2, max_steps=500, validate_every=5, patience=2, learning_rate=0.0 + 1e-9)
    report = train(volumes([1]), volumes([2]), str(tmp_path / "m.safetensors"), config)
    assert report.stopped_early and report.steps < 500


def test_label_modes():
    labels = np.array([[[0, 1, 2, 3]]])
    assert label_targets(labels, "foreground", ["a", "b", "c"])[0].tolist() == [[[0, 1, 1, 1]]]
    target, names = label_targets(labels, "target:b", ["a", "b", "c"])
    assert target.tolist() == [[[0, 0, 1, 0]]] and names == ("background", "b")
    assert label_targets(labels, "kinds", ["a", "b", "c"])[1] == ("background", "a", "b", "c")
    with pytest.raises(OptionError):
        label_targets(labels, "target:zzz", ["a"])


def test_iou_from_confusion():
    truth = np.array([0, 1, 1, 0, 1])
    pred = np.array([0, 1, 0, 1, 1])
    # foreground: tp 2, fp 1, fn 1 -> 2 / 4
    assert scores(confusion(pred, truth, 2))["iou"] == pytest.approx(0.5)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(OptionError, match="crop"):
        TrainConfig(crop=30).check()
    with pytest.raises(OptionError, match="validation"):
        train(volumes([1]), [], str(tmp_path / "m.safetensors"), TrainConfig(crop=16))

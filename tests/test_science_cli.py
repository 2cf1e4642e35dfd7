"""`tileseg simulate`, `train` and `evaluate` as a user runs them."""

from __future__ import annotations

import json

import pytest

from .test_cli import assert_one_line_error, tileseg

pytestmark = pytest.mark.slow


def test_simulate_train_run_evaluate(tmp_path):
    for seed in (1, 2):
        result = tileseg("simulate", str(tmp_path / f"sim{seed}"), "--shape", "40", "--seed", str(seed), "--templates", "4v4r,1bxn,6pxm", "--snr", "4")
        assert result.returncode == 0, result.stderr
        assert "particles of" in result.stdout
    assert_one_line_error(tileseg("simulate", str(tmp_path / "sim1"), "--shape", "40"), 5, "already exists")
    model = str(tmp_path / "m.safetensors")
    result = tileseg("train", model, "--data", str(tmp_path / "sim1"), "--data", str(tmp_path / "sim2"), "--channels", "4,8,8",
                     "--crop", "24", "--steps", "20", "--validate-every", "10", "--classes", "target:4v4r")
    assert result.returncode == 0, result.stderr
    assert "best validation IoU" in result.stdout
    result = tileseg("run", str(tmp_path / "sim2" / "tomogram.mrc"), str(tmp_path / "seg.zarr"), "--model", model, "--tile", "24")
    assert result.returncode == 0, result.stderr
    result = tileseg("evaluate", str(tmp_path / "seg.zarr"), str(tmp_path / "seg.zarr"), "--json")
    scores = json.loads(result.stdout)
    assert scores["foreground"]["iou"] in (1.0, None)
    assert_one_line_error(tileseg("train", model, "--simulate", "1"), 5, "already exists")
    assert_one_line_error(tileseg("evaluate", str(tmp_path / "seg.zarr"), str(tmp_path / "sim2" / "tomogram.mrc")), 3, "integer")

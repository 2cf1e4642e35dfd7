"""Blending and labelling against plain numpy references (no network, no Dask)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tilesegment.blending import accumulate, new_accumulator, normalise, window
from tilesegment.blocks import labels_of_sums, to_labels
from tilesegment.geometry import Box


@settings(max_examples=60, deadline=None)
@given(classes=st.integers(1, 5), levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_argmax_labels_equal_numpy_argmax_ties_included(classes, levels, seed):
    """Few distinct values make ties common: the first most probable class wins, as in np.argmax."""
    rng = np.random.default_rng(seed)
    probabilities = rng.integers(0, levels, size=(classes, 3, 4, 5)).astype(np.float32)
    labels = to_labels(probabilities, "argmax", "uint8")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.argmax(probabilities, axis=0))


@settings(max_examples=60, deadline=None)
@given(classes=st.integers(1, 5), levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_labels_of_weighted_sums_equal_the_labels_of_their_probabilities(classes, levels, seed):
    """Weights that are powers of two keep every product exact, so ties stay ties: labelling the sums
    (no division) must give exactly np.argmax of the probabilities, and the threshold rule p > 1/2."""
    rng = np.random.default_rng(seed)
    probabilities = (rng.integers(0, levels + 1, size=(classes, 3, 4, 5)) / levels).astype(np.float32)
    weights = np.exp2(rng.integers(-8, 4, size=(3, 4, 5))).astype(np.float32)
    sums = np.concatenate([probabilities * weights, weights[None]])
    np.testing.assert_array_equal(labels_of_sums(sums, "argmax", "uint8"), np.argmax(probabilities, axis=0))
    np.testing.assert_array_equal(labels_of_sums(sums[[0, -1]], "threshold", "uint8"), probabilities[0] > 0.5)


def test_threshold_labels_are_channel_zero_above_one_half():
    probabilities = np.array([[[[0.2, 0.5, 0.51, 0.9]]]], dtype=np.float32)
    np.testing.assert_array_equal(to_labels(probabilities, "threshold", "uint8"), [[[0, 0, 1, 1]]])


def test_accumulate_and_normalise_equal_the_weighted_mean():
    """Two overlapping tiles, one reaching past the accumulator: every voxel is Σ w·p / Σ w."""
    rng = np.random.default_rng(0)
    tile = (4, 4, 4)
    weights = window(tile, "gaussian")
    acc_box = Box((0, 0, 0), (6, 5, 4))
    tiles = [Box((0, 0, 0), (4, 4, 4)), Box((2, 2, 0), (6, 6, 4))]
    predictions = [rng.random((2, *tile), dtype=np.float32) for _ in tiles]
    acc = new_accumulator(2, acc_box)
    expected_sum = np.zeros((2, 6, 6, 4))
    expected_weight = np.zeros((6, 6, 4))
    for box, prediction in zip(tiles, predictions):
        expected_sum[(slice(None), *box.slices())] += prediction * weights
        expected_weight[box.slices()] += weights
        accumulate(acc, acc_box, prediction.copy(), box, weights)  # a copy: accumulate weights it in place
    np.testing.assert_allclose(acc[:-1], expected_sum[:, :, :5], rtol=1e-6)
    np.testing.assert_allclose(acc[-1], expected_weight[:, :5], rtol=1e-6)
    covered = expected_weight > 0  # (z 0-1, y 4) is in no tile: 0 there
    expected = np.divide(expected_sum, expected_weight, out=np.zeros_like(expected_sum), where=covered)
    assert not covered.all()
    np.testing.assert_allclose(normalise(acc), expected[:, :, :5], rtol=1e-5)

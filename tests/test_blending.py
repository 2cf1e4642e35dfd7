"""Blending and labelling against plain numpy references (no network, no Dask)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from tilesegment.blending import BLEND_MODES, accumulate, grid_weights, new_accumulator, GridWeights, normalise, profiles, summed_channels, window
from tilesegment.blocks import labels_of_sums, to_labels
from tilesegment.errors import OptionError
from tilesegment.geometry import Box
from tilesegment.plan import TileGrid


@settings(max_examples=60, deadline=None)
@given(classes=st.integers(1, 5), levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_argmax_labels_equal_numpy_argmax_ties_included(classes, levels, seed):
    """Few distinct values make ties common: the first most probable class wins, as in np.argmax."""
    rng = np.random.default_rng(seed)
    probabilities = rng.integers(0, levels, size=(classes, 3, 4, 5)).astype(np.float32)
    labels = to_labels(probabilities, "argmax", "uint8")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.argmax(probabilities, axis=0))


def powers_of_two(rng: np.random.Generator) -> GridWeights:
    """Weights of a (3, 4, 5) box whose factors, and so every product, are powers of two."""
    return GridWeights(np.exp2(rng.integers(-4, 2, size=3)).astype(np.float32), np.exp2(rng.integers(-4, 2, size=(4, 5))).astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(classes=st.integers(1, 5), levels=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16))
def test_labels_of_weighted_sums_equal_the_labels_of_their_probabilities(classes, levels, seed):
    """Softmax probabilities (summing to 1) in steps of a power of two, and weights that are powers
    of two, keep every product and difference exact, so ties stay ties: labelling the summed
    channels (class 0 left out, no division) must give exactly np.argmax of the probabilities."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(levels, np.ones(classes) / classes, size=(3, 4, 5)).transpose(3, 0, 1, 2)
    probabilities = (counts / levels).astype(np.float32)
    weights = powers_of_two(rng)
    sums = probabilities[summed_channels(classes, softmax=True)] * weights.array()
    assert len(sums) == max(1, classes - 1)
    np.testing.assert_array_equal(labels_of_sums(sums, weights, "argmax", "uint8", classes), np.argmax(probabilities, axis=0))


@settings(max_examples=60, deadline=None)
@given(levels=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16))
def test_threshold_labels_of_sums_are_probabilities_above_one_half(levels, seed):
    rng = np.random.default_rng(seed)
    probabilities = (rng.integers(0, levels + 1, size=(1, 3, 4, 5)) / levels).astype(np.float32)
    weights = powers_of_two(rng)
    labels = labels_of_sums(probabilities * weights.array(), weights, "threshold", "uint8", 1)
    np.testing.assert_array_equal(labels, probabilities[0] > 0.5)


def test_threshold_labels_are_channel_zero_above_one_half():
    probabilities = np.array([[[[0.2, 0.5, 0.51, 0.9]]]], dtype=np.float32)
    np.testing.assert_array_equal(to_labels(probabilities, "threshold", "uint8"), [[[0, 0, 1, 1]]])


def test_window_is_the_outer_product_of_its_profiles():
    for mode in BLEND_MODES:
        z, y, x = profiles((5, 8, 3), mode)
        np.testing.assert_allclose(window((5, 8, 3), mode), np.einsum("i,j,k->ijk", z, y, x), rtol=1e-7)
        assert window((5, 8, 3), mode).max() == 1 and window((5, 8, 3), mode).min() > 0
    assert window((64,) * 3, "gaussian").min() > 1e-11  # a corner: far above float32's smallest normal
    with pytest.raises(OptionError, match="blending mode"):
        window((4, 4, 4), "hann")


@pytest.mark.parametrize("classes, softmax", [(3, True), (2, True), (1, False), (2, False)])
def test_accumulate_and_normalise_equal_the_weighted_mean(classes, softmax):
    """Tiles of a grid, some reaching past the accumulator: every voxel is Σ w·p / Σ w, with the
    weights from the grid and, for a softmax, class 0 from the others."""
    rng = np.random.default_rng(0)
    grid = TileGrid((10, 9, 4), (4, 4, 4), (3, 3, 4))
    acc_box = Box((2, 0, 0), (8, 9, 4))
    kept = summed_channels(classes, softmax)
    acc = new_accumulator(len(range(classes)[kept]), acc_box)
    expected_sum = np.zeros((classes, 10, 9, 4))
    expected_weight = np.zeros((10, 9, 4))
    weights = window(grid.tile, "gaussian")
    for box in grid.tiles():
        prediction = rng.random((classes, *grid.tile), dtype=np.float32)
        if softmax:
            prediction /= prediction.sum(axis=0)
        expected_sum[(slice(None), *box.slices())] += prediction * weights
        expected_weight[box.slices()] += weights
        accumulate(acc, acc_box, prediction[kept].copy(), box, weights)  # a copy: accumulate weights it in place
    inside = acc_box.slices()
    np.testing.assert_allclose(acc, expected_sum[(kept, *inside)], rtol=1e-6)
    sums_weights = grid_weights(grid, acc_box, "gaussian")
    np.testing.assert_allclose(sums_weights.array(), expected_weight[inside], rtol=1e-6)
    expected = expected_sum / expected_weight
    np.testing.assert_allclose(normalise(acc, sums_weights, classes), expected[(slice(None), *inside)], rtol=1e-5, atol=1e-6)


def test_a_block_accumulator_is_zeroed_even_in_memory_its_thread_used_before():
    import threading

    from tilesegment.blocks import block_accumulator

    big = block_accumulator(2, Box((0, 0, 0), (6, 5, 4)))
    big.fill(7.0)
    small = block_accumulator(1, Box((3, 3, 3), (6, 7, 8)))  # a smaller block after it, in the same memory
    assert small.shape == (1, 3, 4, 5) and small.dtype == np.float32 and small.flags.c_contiguous
    assert np.shares_memory(small, big) and not small.any()
    small.fill(1.0)
    grown = block_accumulator(3, Box((0, 0, 0), (8, 8, 8)))  # larger than any before: new memory, zeroed
    assert grown.shape == (3, 8, 8, 8) and not grown.any() and not np.shares_memory(grown, big)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(block_accumulator(1, Box((0, 0, 0), (6, 5, 4)))))
    thread.start()
    thread.join()
    assert not np.shares_memory(seen[0], grown)  # another block thread has its own


def test_summed_count_is_the_length_of_the_summed_channels():
    from tilesegment.blending import summed_count

    for channels in range(1, 5):
        for softmax in (True, False):
            assert summed_count(channels, softmax) == len(np.zeros(channels)[summed_channels(channels, softmax)])
    assert (summed_count(2, True), summed_count(3, True), summed_count(1, True), summed_count(2, False)) == (1, 2, 1, 2)

"""downsample: each coarser level's voxel against a plain oracle (the 2×2×2 group, the edge repeated)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilesegment.pyramid import downsample


def oracle(data: np.ndarray, method: str) -> np.ndarray:
    """Voxel by voxel: nearest takes the group's first voxel; mean averages the 8 of the group, an
    index past an odd edge taken as the edge's own."""
    *lead, nz, ny, nx = data.shape
    out_shape = tuple(-(-n // 2) for n in (nz, ny, nx))
    out = np.empty((*lead, *out_shape), data.dtype)
    for index in itertools.product(*(range(n) for n in out_shape)):
        if method == "nearest":
            out[(..., *index)] = data[(..., *(2 * i for i in index))]
            continue
        group = [data[(..., *(min(2 * i + d, n - 1) for i, d, n in zip(index, offset, (nz, ny, nx))))].astype(np.float64)
                 for offset in itertools.product((0, 1), repeat=3)]
        mean = sum(group) / 8
        out[(..., *index)] = np.rint(mean) if np.issubdtype(data.dtype, np.integer) else mean
    return out


@settings(max_examples=80, deadline=None)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), channels=st.sampled_from([None, 2]),
       dtype=st.sampled_from(["float32", "float16", "int8", "uint8", "int16", "uint16"]), method=st.sampled_from(["mean", "nearest"]),
       seed=st.integers(0, 2**16))
def test_downsample_matches_the_oracle_for_every_dtype_and_odd_edge(shape, channels, dtype, method, seed):
    rng = np.random.default_rng(seed)
    full = ((channels,) if channels else ()) + shape
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, full, endpoint=True).astype(dtype)
    else:
        data = (rng.standard_normal(full) * 100).astype(dtype)
    got = downsample(data, method)
    expected = oracle(data, method)
    assert got.dtype == data.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=80, deadline=None)
@given(volume=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40)), unit=st.tuples(*[st.sampled_from([1, 2, 3, 4, 8])] * 3),
       multiples=st.tuples(*[st.integers(1, 8)] * 3), levels=st.integers(1, 4), method=st.sampled_from(["mean", "nearest"]),
       seed=st.integers(0, 2**16))
def test_the_levels_blocks_write_themselves_equal_the_levels_built_whole(volume, unit, multiples, levels, method, seed):
    """Each block downsamples its own region into the levels levels_in_blocks allows: every level box
    is whole write units, the boxes tile the level, and the level equals downsampling the whole volume."""
    from tilesegment.geometry import Box, ceil_div
    from tilesegment.pyramid import level_shapes, levels_in_blocks

    block = tuple(m * u for m, u in zip(multiples, unit))
    counts = tuple(ceil_div(n, b) for n, b in zip(volume, block))
    k = levels_in_blocks(counts, block, unit, levels)
    assert 0 <= k < levels
    if k + 1 < levels:  # a further level would break the rule on some axis
        assert any(n > 1 and b % (2 ** (k + 1) * u) for n, b, u in zip(counts, block, unit))
    data = np.random.default_rng(seed).random(volume).astype(np.float32)
    whole, shapes = [data], level_shapes(volume, k + 1)
    for _ in range(k):
        whole.append(downsample(whole[-1], method))
    built = [np.full(shape, np.nan, np.float32) for shape in shapes]
    for index in itertools.product(*(range(n) for n in counts)):
        region = Box.from_shape(block, tuple(i * b for i, b in zip(index, block))).intersect(Box.from_shape(volume))
        part = data[region.slices()]
        for level in range(1, k + 1):
            part = downsample(part, method)
            box = region.scaled_down(2**level, shapes[level])
            assert all(a % u == 0 and (b % u == 0 or b == n) for a, b, u, n in zip(box.start, box.stop, unit, shapes[level]))
            assert box.shape == part.shape and np.isnan(built[level][box.slices()]).all()  # each voxel written once
            built[level][box.slices()] = part
    for level in range(1, k + 1):
        np.testing.assert_array_equal(built[level], whole[level])


@settings(max_examples=120, deadline=None)
@given(volume=st.tuples(st.integers(1, 48), st.integers(1, 48), st.integers(1, 48)), unit=st.tuples(*[st.sampled_from([1, 2, 3, 4, 8])] * 3),
       multiples=st.tuples(*[st.integers(1, 6)] * 3), levels=st.integers(1, 6), method=st.sampled_from(["mean", "nearest"]),
       channels=st.sampled_from([None, 2]), seed=st.integers(0, 2**16))
def test_blocks_writing_their_own_units_build_every_level_exactly_once(volume, unit, multiples, levels, method, channels, seed):
    """Blocks, in any order that puts a block after every block below it on all axes (what the task
    graph guarantees), write the units of every level they own: each unit is whole, written once, from
    stored data that was already written, and every level equals downsampling the whole level below."""
    from tilesegment.geometry import Box, ceil_div
    from tilesegment.pyramid import level_shapes, owned_level_box, owned_levels

    rng = np.random.default_rng(seed)
    block = tuple(m * u for m, u in zip(multiples, unit))
    counts = tuple(ceil_div(n, b) for n, b in zip(volume, block))
    lead = (channels,) if channels else ()
    data = rng.random(lead + volume).astype(np.float32)
    shapes = level_shapes(volume, levels)
    whole = [data]
    for _ in range(1, levels):
        whole.append(downsample(whole[-1], method))
    stored = [np.full(lead + shape, np.nan, np.float32) for shape in shapes]

    def read(level: int, box: Box) -> np.ndarray:
        part = stored[level][(Ellipsis, *box.slices())]
        assert not np.isnan(part).any(), f"read level {level} {box} before it was written"
        return part.copy()

    indices = list(itertools.product(*(range(n) for n in counts)))
    order = sorted(indices, key=lambda index: (sum(index), rng.random()))  # lower blocks first, ties in random order
    for index in order:
        region = Box.from_shape(block, tuple(i * b for i, b in zip(index, block))).intersect(Box.from_shape(volume))
        part = data[(Ellipsis, *region.slices())]
        stored[0][(Ellipsis, *region.slices())] = part
        for level, box, values in owned_levels(region, part, method, volume, unit, levels, read):
            assert box == owned_level_box(region, volume, level, unit) and not box.empty
            assert all(a % u == 0 and (b % u == 0 or b == n) for a, b, u, n in zip(box.start, box.stop, unit, shapes[level]))
            target = stored[level][(Ellipsis, *box.slices())]
            assert values.shape == target.shape and np.isnan(target).all()  # each voxel written once
            stored[level][(Ellipsis, *box.slices())] = values
    for level in range(levels):
        np.testing.assert_array_equal(stored[level], whole[level])


@pytest.mark.parametrize("shape, most", [((96, 96, 96), 8), ((1, 1, 1), 1), ((2, 3, 5), 4), ((64, 1024, 1024), 11), ((17, 1, 1), 6)])
def test_levels_stop_at_the_single_voxel(shape, most):
    """Every level after the one of a single voxel would be that 1×1×1 array again: refused."""
    from tilesegment.errors import OptionError
    from tilesegment.pyramid import auto_levels, check_levels, level_shapes, most_levels

    assert most_levels(shape) == most and check_levels(most, shape) == most and level_shapes(shape, most)[-1] == (1, 1, 1)
    assert most == 1 or level_shapes(shape, most - 1)[-1] != (1, 1, 1)
    assert check_levels(None, shape) == auto_levels(shape)
    for bad in (most + 1, 0, -1, True, 2.5):
        with pytest.raises(OptionError, match="--levels"):
            check_levels(bad, shape)

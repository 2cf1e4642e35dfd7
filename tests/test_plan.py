"""Property tests of the pure plan: coverage, ownership, and where every spill lands."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilesegment.blending import BLEND_MODES, grid_weights, window
from tilesegment.errors import OptionError
from tilesegment.geometry import Box
from tilesegment.plan import BlockPlan, SpentPieces, TileGrid, batches, stride_for, tile_origins


@st.composite
def plans(draw):
    volume = tuple(draw(st.integers(1, 40)) for _ in range(3))
    tile = tuple(draw(st.integers(1, 12)) for _ in range(3))
    overlap = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    chunk = tuple(draw(st.integers(1, 8)) for _ in range(3))
    block = tuple(c * draw(st.integers(max(1, -(-t // c)), max(1, -(-t // c)) + 3)) for c, t in zip(chunk, tile))
    return BlockPlan(TileGrid(volume, tile, stride_for(tile, overlap)), block, chunk)


@given(st.integers(1, 200), st.integers(1, 64), st.floats(0, 0.95))
def test_origins_cover_the_axis_in_order(length, tile, overlap):
    stride = stride_for((tile,) * 3, overlap)[0]
    origins = tile_origins(length, tile, stride)
    assert origins[0] == 0 and list(origins) == sorted(set(origins))
    assert origins[-1] + tile >= length
    assert all(b - a <= stride for a, b in zip(origins, origins[1:]))  # no gaps
    assert all(o + tile <= length for o in origins) or origins == (0,)


@settings(max_examples=200, deadline=None)
@given(plans(), st.sampled_from(BLEND_MODES), st.data())
def test_every_voxel_covered_and_grid_weights_equal_the_summed_windows(plan, mode, data):
    """The weights a block divides by come from the grid (a product of per-axis sums): they must
    equal the windows of every tile, added up voxel by voxel, over any box of the volume."""
    coverage = np.zeros(plan.volume, np.float64)
    vol = plan.volume_box
    w = window(plan.grid.tile, mode)
    for tile in plan.grid.tiles():
        inside = tile.intersect(vol)
        coverage[inside.slices()] += w[inside.slices(tile)]
    assert (coverage > 0).all()
    start = tuple(data.draw(st.integers(0, n - 1)) for n in plan.volume)
    stop = tuple(data.draw(st.integers(a + 1, n)) for a, n in zip(start, plan.volume))
    box = Box(start, stop)
    found = grid_weights(plan.grid, box, mode)
    weights = found.array()
    assert weights.dtype == np.float32 and weights.shape == found.shape == box.shape and (weights > 0).all()
    np.testing.assert_allclose(weights, coverage[box.slices()], rtol=1e-6)
    for i in range(box.shape[0]):  # what the blocks walk, plane by plane: the same values
        np.testing.assert_array_equal(found.plane(i), weights[i])
        np.testing.assert_array_equal(found.plane(i, 0.5), weights[i] * np.float32(0.5))


@settings(max_examples=200, deadline=None)
@given(plans())
def test_blocks_partition_volume_chunks_and_tiles(plan):
    owner = np.full(plan.volume, -1)
    tiles = []
    for n, index in enumerate(plan.indices()):
        region = plan.region(index)
        assert all(s % c == 0 for s, c in zip(region.start, plan.chunk))  # chunk aligned
        assert (owner[region.slices()] == -1).all()
        owner[region.slices()] = n
        tiles += plan.tiles(index)
        for t in plan.tiles(index):  # a block owns the tiles whose origin lies in its region
            assert all(a <= o < b for a, o, b in zip(region.start, t.start, region.stop))
    assert (owner >= 0).all()  # every voxel, so every chunk, belongs to exactly one block
    assert sorted(tiles) == sorted(plan.grid.tiles())  # each tile forwarded by exactly one block
    assert len(tiles) == plan.grid.count


@settings(max_examples=200, deadline=None)
@given(plans())
def test_pieces_land_in_one_neighbour_and_cover_every_tile(plan):
    for index in plan.indices():
        extent = plan.extent(index)
        pieces = plan.pieces(index)
        covered = np.zeros(extent.shape, bool)
        for offset, box in pieces.items():
            target = tuple(i + d for i, d in zip(index, offset))
            assert all(t < c for t, c in zip(target, plan.counts))
            assert plan.region(target).contains(box)
            assert (index, offset) in plan.incoming(target)
            covered[box.slices(extent)] = True
        assert covered.all()  # nothing a tile adds is lost
        for tile in plan.tiles(index):
            assert extent.contains(tile.intersect(plan.volume_box))


@settings(max_examples=100, deadline=None)
@given(plans())
def test_sweep_visits_every_block_once_after_its_lower_neighbours(plan):
    order = plan.sweep()
    assert sorted(order) == sorted(plan.indices())
    position = {index: i for i, index in enumerate(order)}
    for index in order:
        for source, _ in plan.spills_into(index):
            assert position[source] < position[index]


def test_sweep_runs_along_the_longest_axis():
    plan = BlockPlan.create((64, 640, 320), 16, 0.25, 16, block=64)  # counts (1, 10, 5)
    order = plan.sweep()
    assert [i[1] for i in order[:5]] == [0] * 5  # y (most blocks) outermost, x inside it


def test_spill_is_the_overlap_when_blocks_align_with_the_stride():
    plan = BlockPlan.create((400, 400, 400), 64, 0.25, 64, block=192)
    pieces = plan.pieces((0, 0, 0))
    assert pieces[(1, 0, 0)].shape == (16, 192, 192)  # tile - stride
    assert pieces[(1, 1, 1)].shape == (16, 16, 16)


def test_invalid_plans_are_refused_with_the_fix():
    with pytest.raises(OptionError, match=r"--block 24 is not a whole number of the output's write units \(16: ") as err:
        BlockPlan.create((100,) * 3, 16, 0.25, 16, block=24)
    assert "Use --block 32" in err.value.fix
    with pytest.raises(OptionError, match=r"--block 16 is shorter than the tile \(32\) along z") as err:
        BlockPlan.create((100,) * 3, 32, 0.25, 8, block=16)
    assert "Use --block 32" in err.value.fix
    with pytest.raises(OptionError, match="0 <= overlap < 1"):
        stride_for((16, 16, 16), 1.0)


def test_grid_counts_match_the_product_of_axes():
    grid = TileGrid((100, 50, 10), (16, 16, 16), (12, 12, 12))
    assert grid.count == len(list(grid.tiles())) == np.prod([len(o) for o in grid.origins])
    assert grid.origins[2] == (0,)
    assert list(itertools.islice(grid.tiles(), 1))[0] == Box((0, 0, 0), (16, 16, 16))


def test_box_operations():
    a = Box((0, 0, 0), (10, 10, 10))
    b = Box((5, -2, 8), (20, 4, 9))
    assert a.intersect(b) == Box((5, 0, 8), (10, 4, 9))
    assert a.intersect(Box((20, 20, 20), (30, 30, 30))).empty
    assert b.relative_to(a) == b
    assert Box((2, 2, 2), (4, 4, 4)).slices((1, 1, 1)) == (slice(1, 3),) * 3
    assert sum(p.size for p in a.split((3, 4, 10))) == a.size
    assert Box((3, 3, 3), (9, 9, 9)).scaled_down(2, (4, 4, 4)) == Box((1, 1, 1), (4, 4, 4))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 200), size=st.integers(1, 32))
def test_batches_keep_order_and_count_and_leave_no_lone_leftover(n, size):
    items = list(range(n))
    groups = batches(items, size)
    assert [i for group in groups for i in group] == items
    assert len(groups) == -(-n // size)  # as many forwards as plain slicing makes
    lengths = [len(group) for group in groups]
    assert all(1 <= length <= size for length in lengths)
    assert not lengths or max(lengths) - min(lengths) <= 1


def test_batches_split_a_leftover_evenly():
    assert [len(g) for g in batches(list(range(9)), 4)] == [3, 3, 3]
    assert [len(g) for g in batches(list(range(5)), 4)] == [2, 3]
    assert [len(g) for g in batches(list(range(8)), 4)] == [4, 4]
    with pytest.raises(ValueError):
        batches([1], 0)


@settings(max_examples=60, deadline=None)
@given(volume=st.tuples(st.integers(16, 90), st.integers(16, 90), st.integers(16, 90)), tile=st.sampled_from([8, 16]),
       block=st.sampled_from([16, 24, 32]), resumed=st.floats(0, 1))
def test_pieces_are_spent_once_and_only_after_every_block_that_takes_them(volume, tile, block, resumed):
    plan = BlockPlan.create(volume, tile, 0.25, 8, block=block)
    order = plan.sweep()
    done = set(order[: int(resumed * len(order))])  # a stopped run finished these
    spent_pieces = SpentPieces(plan, done)
    finished = set(done)
    reported = list(spent_pieces.already_spent())
    assert all(set(plan.consumers(i)) <= finished for i in reported)
    for index in order:
        if index in done:
            continue
        finished.add(index)
        for source in spent_pieces.finished(index):
            assert set(plan.consumers(source)) <= finished  # nobody still needs them
            reported.append(source)
    # every block that hands pieces on is reported exactly once, by the end
    assert sorted(reported) == sorted(i for i in order if plan.consumers(i))


def test_consumers_are_the_upper_neighbours_that_take_a_piece():
    plan = BlockPlan.create((64, 64, 64), 16, 0.25, 16, block=32)  # 2 x 2 x 2 blocks
    assert sorted(plan.consumers((0, 0, 0))) == sorted(i for i in plan.indices() if i != (0, 0, 0))
    assert plan.consumers((1, 1, 1)) == []
    for index in plan.indices():
        assert all((index, tuple(c - i for c, i in zip(consumer, index))) in plan.spills_into(consumer)
                   for consumer in plan.consumers(index))


@settings(max_examples=200, deadline=None)
@given(volume=st.tuples(*[st.integers(1, 120)] * 3), tile=st.tuples(*[st.integers(1, 24)] * 3),
       overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]), unit=st.tuples(*[st.integers(1, 16)] * 3))
def test_default_blocks_are_whole_units_and_whole_strides_where_they_can_be(volume, tile, overlap, unit):
    """The default block: whole write units, two to three tiles (or the whole axis), and where it is
    a whole number of strides, no block's sums reach more than tile - stride into its neighbours (but
    for the grid's last tile, shifted inward to end at the volume's edge)."""
    plan = BlockPlan.create(volume, tile, overlap, unit)
    stride = plan.grid.stride
    for axis, (n, t, s, u, b) in enumerate(zip(volume, tile, stride, unit, plan.block)):
        assert b % u == 0
        whole_axis = -(-n // u) * u
        assert b == whole_axis or min(2 * t, whole_axis) <= b <= max(3 * t, -(-2 * t // u) * u)
        whole_strides = [m for m in range(2 * t, 3 * t + 1) if m % s == 0 and m % u == 0]
        if whole_strides and b < whole_axis:  # a block of whole strides and units fits in 2-3 tiles: the least is taken
            assert b == whole_strides[0]
        if b % s == 0 and b < whole_axis:
            for index in plan.indices():
                extent = plan.extent(index)
                if extent.stop[axis] < n:
                    assert extent.stop[axis] - plan.region(index).stop[axis] <= t - s

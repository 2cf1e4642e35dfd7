"""The tile/block plan: pure geometry, no data, no Dask, no GPU.

Stitching strategy (see ``shared/DESIGN.md``): **one-directional spill, finalise whole blocks.**

* One global grid of overlapping tiles covers the volume. Along each axis the origins are
  ``0, s, 2s, ...`` with the last tile shifted inward to end at the volume's edge; an axis shorter
  than the tile gets one tile at 0 that is padded when read.
* The volume is cut into blocks aligned to the output's write unit (a chunk, or a shard for Zarr
  v3). A block *owns* the tiles whose origin lies inside it, and forwards each of them exactly once.
* Because tiles only reach *forwards* from their origin, and a block is at least one tile long, the
  weighted sums of a block's tiles land in its own region plus a thin shell on its high side: a face,
  edge or corner piece of each of its 7 upper neighbours (``offset`` in ``{0,1}³``).
* One task per block forwards its tiles, adds the spill pieces of its (up to 7) lower neighbours,
  normalises and writes every chunk of its region once, and hands its own spill pieces on (through
  the run's journal on disk). Blocks form a wavefront (a block runs once its lower neighbours have);
  tasks run in raster order, so only thin spill pieces, never whole blocks, wait for a neighbour. (A split into a predict and
  a finalise task per block was measured and dropped: a block's whole accumulator then waited for
  its finaliser whenever worker threads were busy.)

Each tile is forwarded once, each chunk written once by one task, and memory per task is bounded by
the block size; what waits between tasks is spill faces, about one plane of blocks' worth, on disk.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Collection, Iterator, Sequence, TypeVar

from .errors import OptionError
from .geometry import Box, Shape, as_shape, ceil_div, option_text

__all__ = ["TileGrid", "BlockPlan", "OFFSETS", "SPILL_OFFSETS", "tile_origins", "stride_for", "default_block", "batches", "SpentPieces"]

#: The 8 piece offsets of a block: (0,0,0) is its own region, the others spill into neighbours.
OFFSETS: tuple[Shape, ...] = tuple(itertools.product((0, 1), repeat=3))  # type: ignore[assignment]
SPILL_OFFSETS: tuple[Shape, ...] = OFFSETS[1:]

T = TypeVar("T")


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` in order, in the fewest batches of at most ``size``, whose sizes differ by at most one.

    As many network forwards as plain slicing would make, but no lone leftover: 9 tiles at batch 4
    go as 3 + 3 + 3, not 4 + 4 + 1. On the CPU a tile alone takes about 1.3× as long as a tile in a
    batch of two or more (0.067 s against 0.051 s for 64³ on 2 cores), so a lone leftover costs more.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    count = ceil_div(len(items), size)
    edges = [len(items) * k // count for k in range(count + 1)] if count else [0]
    return [items[a:b] for a, b in zip(edges, edges[1:])]


def stride_for(tile: Shape, overlap: float) -> Shape:
    """Tile stride for a fractional overlap (0 ≤ overlap < 1) between neighbouring tiles."""
    if not 0.0 <= overlap < 1.0:
        raise OptionError(f"--overlap {overlap} is out of range.", "Use a fraction 0 <= overlap < 1, e.g. 0.25.")
    return tuple(max(1, round(t * (1.0 - overlap))) for t in tile)  # type: ignore[return-value]


def default_block(volume: Shape, tile: Shape, stride: Shape, unit: Shape) -> Shape:
    """About two to three tiles per axis, whole write units, and where it can be a whole number of
    strides too, so that a block's spill pieces are ``tile - stride`` thick, the least they can be.

    A block's last owned tile starts up to a stride before the block's end; with blocks of whole
    strides it starts exactly one stride before, else up to a tile past the end reaches into the
    neighbours (64³ tiles at stride 48 in 128³ blocks: pieces 16-63 voxels thick, 32 on average;
    in 192³ blocks: 16). Measured: 512³ with the default model spent 4.0-4.4 s instead of 5.5-7.0 s
    outside the network, for 30 MB more peak memory. Where the least common multiple of stride and
    unit is over three tiles, two tiles rounded up to whole units (thicker pieces, smaller block).
    Never more than the volume, rounded up to whole units."""
    block = []
    for n, t, s, u in zip(volume, tile, stride, unit):
        both = s * u // math.gcd(s, u)
        aligned = ceil_div(2 * t, both) * both
        size = aligned if aligned <= 3 * t else ceil_div(2 * t, u) * u
        block.append(min(size, ceil_div(n, u) * u))
    return tuple(block)  # type: ignore[return-value]


def tile_origins(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Origins along one axis: a regular grid with the last tile shifted inward to end at the edge."""
    if length <= tile:
        return (0,)
    n = ceil_div(length - tile, stride) + 1
    return tuple(i * stride for i in range(n - 1)) + (length - tile,)


@dataclass(frozen=True)
class TileGrid:
    """The one global grid of overlapping tiles over a volume."""

    volume: Shape
    tile: Shape
    stride: Shape

    def __post_init__(self) -> None:
        for name, value in (("volume", self.volume), ("tile", self.tile), ("stride", self.stride)):
            if any(v < 1 for v in value):
                raise OptionError(f"{name} shape {value} has a non-positive size.", f"Give a {name} of at least 1 voxel per axis.")
        if any(s > t for s, t in zip(self.stride, self.tile)):
            raise OptionError(f"stride {self.stride} is larger than the tile {self.tile}, leaving gaps.", "Use an overlap >= 0.")

    @cached_property
    def origins(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return tuple(tile_origins(n, t, s) for n, t, s in zip(self.volume, self.tile, self.stride))  # type: ignore[return-value]

    @property
    def count(self) -> int:
        z, y, x = (len(o) for o in self.origins)
        return z * y * x

    def tile_box(self, origin: Shape) -> Box:
        """The tile at ``origin``; it may reach past the volume only where the volume is smaller."""
        return Box.from_shape(self.tile, origin)

    def tiles(self) -> Iterator[Box]:
        for origin in itertools.product(*self.origins):
            yield self.tile_box(origin)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BlockPlan:
    """Blocks of tiles over a :class:`TileGrid`, aligned to the output's write unit ``chunk``."""

    grid: TileGrid
    block: Shape
    chunk: Shape

    def __post_init__(self) -> None:
        block, chunk, tile = option_text(self.block), option_text(self.chunk), option_text(self.grid.tile)
        for axis, (b, c, t, n) in enumerate(zip(self.block, self.chunk, self.grid.tile, self.grid.volume)):
            if c < 1 or b < 1 or b % c:
                fixed = option_text([max(1, ceil_div(b, c)) * c for b, c in zip(self.block, self.chunk)])
                raise OptionError(
                    f"--block {block} is not a whole number of the output's write units ({chunk}: the --chunk, or the --shard if given) "
                    f"along {'zyx'[axis]}.",
                    f"Use --block {fixed}, or leave it out for the default.",
                )
            if b < t and b < n:
                fixed = option_text([max(b, ceil_div(t, c) * c) for b, c, t in zip(self.block, self.chunk, self.grid.tile)])
                raise OptionError(
                    f"--block {block} is shorter than the tile ({tile}) along {'zyx'[axis]}.",
                    f"Use --block {fixed} (blocks at least a tile long, so that a tile spills only into the blocks beside its own).",
                )

    @classmethod
    def create(
        cls,
        volume: Shape | int,
        tile: Shape | int,
        overlap: float,
        chunk: Shape | int,
        block: Shape | int | None = None,
    ) -> "BlockPlan":
        """Plan with the default block (:func:`default_block`) unless ``block`` is given."""
        volume, tile, chunk = as_shape(volume), as_shape(tile), as_shape(chunk)
        grid = TileGrid(volume, tile, stride_for(tile, overlap))
        if block is None:
            block = default_block(volume, tile, grid.stride, chunk)
        return cls(grid, as_shape(block), chunk)

    @property
    def volume(self) -> Shape:
        return self.grid.volume

    @property
    def volume_box(self) -> Box:
        return Box.from_shape(self.volume)

    @property
    def counts(self) -> Shape:
        return tuple(ceil_div(n, b) for n, b in zip(self.volume, self.block))  # type: ignore[return-value]

    @property
    def block_count(self) -> int:
        z, y, x = self.counts
        return z * y * x

    def indices(self) -> Iterator[Shape]:
        return itertools.product(*(range(c) for c in self.counts))  # type: ignore[return-value]

    def sweep(self) -> list[Shape]:
        """Block indices in the order to process them: raster order with the axis of most blocks
        outermost, so the spill faces waiting between planes span the two shorter axes (a thin
        tomogram is swept along y or x, not z). Lower neighbours always come first."""
        counts = self.counts
        axes = sorted(range(3), key=lambda a: -counts[a])  # outermost first; stable for ties
        order = []
        for position in itertools.product(*(range(counts[a]) for a in axes)):
            index = [0, 0, 0]
            for a, i in zip(axes, position):
                index[a] = i
            order.append(tuple(index))
        return order  # type: ignore[return-value]

    def region(self, index: Shape) -> Box:
        """The part of the volume whose chunks this block writes."""
        start = tuple(i * b for i, b in zip(index, self.block))
        return Box.from_shape(self.block, start).intersect(self.volume_box)

    @cached_property
    def _owned(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Per axis, per block index: the tile origins owned by that block."""
        owned = []
        for origins, b, c in zip(self.grid.origins, self.block, self.counts):
            owned.append(tuple(tuple(o for o in origins if i * b <= o < (i + 1) * b) for i in range(c)))
        return tuple(owned)

    def tile_origins(self, index: Shape) -> tuple[tuple[int, ...], ...]:
        return tuple(self._owned[axis][i] for axis, i in enumerate(index))

    def tiles(self, index: Shape) -> list[Box]:
        """The tiles this block forwards (those whose origin lies in its region)."""
        return [self.grid.tile_box(o) for o in itertools.product(*self.tile_origins(index))]  # type: ignore[arg-type]

    def tile_count(self, index: Shape) -> int:
        z, y, x = (len(o) for o in self.tile_origins(index))
        return z * y * x

    def input_box(self, index: Shape) -> Box:
        """The input region the block's tiles read (may reach past a volume smaller than a tile)."""
        origins = self.tile_origins(index)
        if any(not o for o in origins):
            return Box(self.region(index).start, self.region(index).start)
        return Box(
            tuple(o[0] for o in origins),  # type: ignore[arg-type]
            tuple(o[-1] + t for o, t in zip(origins, self.grid.tile)),  # type: ignore[arg-type]
        )

    def extent(self, index: Shape) -> Box:
        """Where the block's weighted sums land: from its region's start to its last tile's end, in the volume."""
        tiles = self.input_box(index)
        if tiles.empty:
            return tiles
        region = self.region(index)
        stop = tuple(max(r, t) for r, t in zip(region.stop, tiles.stop))
        return Box(region.start, stop).intersect(self.volume_box)  # type: ignore[arg-type]

    @lru_cache(maxsize=None)  # asked 8 times per block when the graph is built
    def pieces(self, index: Shape) -> dict[Shape, Box]:
        """The non-empty parts of the block's extent, keyed by the offset of the block they belong to."""
        extent = self.extent(index)
        if extent.empty:
            return {}
        region = self.region(index)
        result = {}
        for offset in OFFSETS:
            start, stop = [], []
            for axis, d in enumerate(offset):
                if d == 0:
                    start.append(region.start[axis])
                    stop.append(region.stop[axis])
                else:
                    start.append(region.stop[axis])
                    stop.append(max(region.stop[axis], extent.stop[axis]))
            box = Box(tuple(start), tuple(stop))  # type: ignore[arg-type]
            if not box.empty:
                result[offset] = box
        return result

    def incoming(self, index: Shape) -> list[tuple[Shape, Shape]]:
        """``(source block, offset)`` of every piece that lands in this block's region."""
        result = []
        for offset in OFFSETS:
            source = tuple(i - d for i, d in zip(index, offset))
            if min(source) < 0:
                continue
            if offset in self.pieces(source):  # type: ignore[arg-type]
                result.append((source, offset))
        return result  # type: ignore[return-value]

    def consumers(self, index: Shape) -> list[Shape]:
        """The upper neighbours that take a spill piece of this block: once they are all done, its
        pieces are spent (the run's journal then keeps only its counts)."""
        return [tuple(i + d for i, d in zip(index, offset)) for offset in self.pieces(index) if any(offset)]  # type: ignore[misc]

    def lower_neighbours(self, index: Shape) -> list[Shape]:
        """The (up to 7) blocks one below this one on some axes and level with it on the others."""
        below = (tuple(i - d for i, d in zip(index, offset)) for offset in SPILL_OFFSETS)
        return [source for source in below if min(source) >= 0]  # type: ignore[misc]

    def spills_into(self, index: Shape) -> list[tuple[Shape, Shape]]:
        """``(source block, offset)`` of the lower neighbours' pieces that land in this block."""
        return [(source, offset) for source, offset in self.incoming(index) if offset != OFFSETS[0]]


class SpentPieces:
    """Which done blocks' spill pieces no block needs any more, as blocks finish.

    A block's pieces are spent once every upper neighbour that takes one is done; only then may the
    journal drop them (a block that finished returns its recorded counts without reading pieces, so
    re-runs after a lost worker never need them)."""

    def __init__(self, plan: BlockPlan, done: Collection[Shape] = ()) -> None:
        self._plan, self._resumed = plan, frozenset(done)
        self._waiting: dict[Shape, set[Shape]] = {}

    def _wait(self, index: Shape) -> set[Shape]:
        """The consumers of ``index`` not yet done: made when the first of them finishes (or at the
        start, for a resumed run), from the blocks done before this run; then each one that
        finishes is taken out."""
        if index not in self._waiting:
            self._waiting[index] = set(self._plan.consumers(index)) - self._resumed
        return self._waiting[index]

    def already_spent(self) -> list[Shape]:
        """Done blocks (of a resumed run) whose consumers are all done too: their records may still hold pieces."""
        return [index for index in self._resumed if self._plan.consumers(index) and not self._wait(index)]

    def finished(self, index: Sequence[int]) -> list[Shape]:
        """Record ``index`` as done; the blocks whose pieces that spent."""
        index = tuple(index)  # type: ignore[assignment]
        spent = []
        for source, _ in self._plan.spills_into(index):
            waiting = self._wait(source)
            if index in waiting:
                waiting.discard(index)
                if not waiting:
                    spent.append(source)
        return spent

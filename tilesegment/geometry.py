"""Small frozen value objects for 3D voxel geometry.

A :class:`Box` is a half-open region ``[start, stop)`` in global voxel coordinates (z, y, x).
Everything that plans work (tiles, blocks, chunks) is expressed with boxes, so the plan is pure
data: it can be built, compared, pickled and tested without touching any array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

__all__ = ["Shape", "Box", "as_shape", "shape_option", "option_text", "ceil_div"]

Shape = tuple[int, int, int]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def as_shape(value: int | Sequence[int], name: str = "shape") -> Shape:
    """Turn ``64`` or ``(32, 64, 64)`` into a 3-tuple of ints (z, y, x)."""
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values (z, y, x), got {len(values)}: {tuple(value)}")
    return values  # type: ignore[return-value]


def shape_option(value: int | Sequence[int], option: str) -> Shape:
    """``as_shape`` for a user-given option: positive sizes, or an OptionError naming the option."""
    from .errors import OptionError

    fix = "Give N or Z,Y,X positive integers, e.g. 64 or 32,64,64."
    try:
        shape = as_shape(value, option)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{option} {value!r} is not a size ({exc}).", fix) from None
    if min(shape) < 1:
        raise OptionError(f"{option} {value!r} is not a size.", fix)
    return shape


def option_text(shape: Sequence[int]) -> str:
    """A shape as an option takes it (the inverse of :func:`shape_option`): ``64`` for a cube, else ``32,64,64``."""
    return str(shape[0]) if len(set(shape)) == 1 else ",".join(map(str, shape))


@dataclass(frozen=True, order=True)
class Box:
    """Half-open 3D region ``[start, stop)`` in voxel coordinates."""

    start: Shape
    stop: Shape

    def __post_init__(self) -> None:
        if len(self.start) != 3 or len(self.stop) != 3:
            raise ValueError(f"Box needs 3D start and stop, got {self.start}, {self.stop}")

    @classmethod
    def from_shape(cls, shape: Sequence[int], start: Sequence[int] = (0, 0, 0)) -> "Box":
        start = tuple(int(s) for s in start)
        return cls(start, tuple(s + int(n) for s, n in zip(start, shape)))  # type: ignore[arg-type]

    @property
    def shape(self) -> Shape:
        return tuple(max(0, b - a) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def size(self) -> int:
        z, y, x = self.shape
        return z * y * x

    @property
    def empty(self) -> bool:
        return self.size == 0

    def intersect(self, other: "Box") -> "Box":
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop))
        return Box(start, stop)  # type: ignore[arg-type]

    def contains(self, other: "Box") -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    def shift(self, offset: Sequence[int]) -> "Box":
        return Box(
            tuple(a + o for a, o in zip(self.start, offset)),  # type: ignore[arg-type]
            tuple(b + o for b, o in zip(self.stop, offset)),  # type: ignore[arg-type]
        )

    def relative_to(self, origin: "Box | Sequence[int]") -> "Box":
        """This box in the coordinates of an array that starts at ``origin``."""
        start = origin.start if isinstance(origin, Box) else tuple(origin)
        return self.shift(tuple(-s for s in start))

    def slices(self, origin: "Box | Sequence[int] | None" = None) -> tuple[slice, slice, slice]:
        """Numpy slices of this box, optionally relative to an array starting at ``origin``."""
        box = self if origin is None else self.relative_to(origin)
        return tuple(slice(a, b) for a, b in zip(box.start, box.stop))  # type: ignore[return-value]

    def scaled_down(self, factor: int, limit: Shape) -> "Box":
        """The box at a ``factor``× coarser level (rounded outwards), clipped to ``limit``."""
        return Box(
            tuple(a // factor for a in self.start),  # type: ignore[arg-type]
            tuple(min(ceil_div(b, factor), n) for b, n in zip(self.stop, limit)),  # type: ignore[arg-type]
        )

    def split(self, piece: Shape) -> Iterator["Box"]:
        """Cover this box with ``piece``-shaped boxes aligned to its start (last ones clipped)."""
        ranges = [range(a, b, p) for a, b, p in zip(self.start, self.stop, piece)]
        for z in ranges[0]:
            for y in ranges[1]:
                for x in ranges[2]:
                    yield Box((z, y, x), (z + piece[0], y + piece[1], x + piece[2])).intersect(self)

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop)) + ")"

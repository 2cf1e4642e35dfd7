"""Checks for numeric options a user gives (API fields or command-line flags).

Each check returns the value as a plain ``float``/``int`` or raises an :class:`OptionError` that
quotes the option, the bad value and the fix. They live here, not in one module, because both the
simulation config and the template loader check numbers the same way (sizes are
:func:`tilesegment.geometry.shape_option`).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import OptionError

__all__ = ["positive_option", "range_option", "count_option"]


def positive_option(value: float, name: str, example: str) -> float:
    """``value`` as a finite float > 0; ``example`` completes the fix "Give ..."."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise OptionError(f"{name} {value!r} must be a positive number.", f"Give {example}.")
    return number


def range_option(value: float, name: str, low: float, high: float, fix: str, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float in ``(low, high]`` (each end open or closed as asked); NaN is rejected."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not ok:  # also rejects NaN
        brackets = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise OptionError(f"{name} {value!r} is outside {brackets}.", fix)
    return number


def count_option(value: int, name: str, low: int, fix: str) -> int:
    """``value`` as an int >= ``low``; bools and non-integers are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise OptionError(f"{name} {value!r} must be an integer >= {low}.", fix)
    return int(value)

"""Checks shared by the batching units' constructors (messages name the setting and what it expects)."""

from __future__ import annotations

import math


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def is_finite_real(value: object) -> bool:
    """Whether ``value`` is a finite int or float (a bool is not a number of seconds)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

"""Small helpers shared by the format modules (hot path: keep them cheap)."""

from __future__ import annotations

import struct
from decimal import Decimal

from ..model import Value

_F32 = struct.Struct("<f")


def ndigits_for(scale: float) -> int:
    """Decimal places a scale factor carries: 0.1 -> 1, 0.01 -> 2, 0.35 -> 2, 1e-06 -> 6, 1 -> 0."""
    exponent = Decimal(repr(scale)).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def f32_value(v: float) -> float:
    """A float32 as the shortest decimal that reads back to the same float32 (26.1, not 26.100000381)."""
    for digits in range(1, 10):
        r = round(v, digits)
        if _F32.unpack(_F32.pack(r))[0] == v:
            return r
    return v


def put(values: dict[str, Value], name: str, value: Value) -> None:
    """Store a value; a second value of the same name in one frame becomes name_2, name_3 …"""
    if name not in values:
        values[name] = value
        return
    n = 2
    while f"{name}_{n}" in values:
        n += 1
    values[f"{name}_{n}"] = value

"""Bluetooth address spellings: every common one in, ``AA:BB:CC:DD:EE:FF`` out."""

from __future__ import annotations

import re
from functools import lru_cache

_HEX12 = re.compile(r"[0-9A-Fa-f]{12}")
_SEPARATED = re.compile(r"[0-9A-Fa-f]{1,2}([:\-. ])[0-9A-Fa-f]{1,2}(?:\1[0-9A-Fa-f]{1,2}){4}")
_DOTTED = re.compile(r"[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}")


class InvalidMac(ValueError):
    pass


@lru_cache(maxsize=4096)
def normalize_mac(text: str) -> str:
    """Return ``AA:BB:CC:DD:EE:FF`` for A4:C1:38:…, a4c138…, A4-C1-…, a4c1.3801.0203, 'a4 c1 …'.

    Raises InvalidMac with a message that names the problem."""
    s = text.strip()
    if _HEX12.fullmatch(s):
        digits = s
    elif _DOTTED.fullmatch(s):
        digits = s.replace(".", "")
    elif _SEPARATED.fullmatch(s):
        parts = re.split(r"[:\-. ]", s)
        digits = "".join(p.zfill(2) for p in parts)
    else:
        raise InvalidMac(
            f"{text!r} is not a Bluetooth address: expected 12 hex digits such as A4:C1:38:12:34:56, "
            "a4c138123456 or A4-C1-38-12-34-56"
        )
    digits = digits.upper()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


@lru_cache(maxsize=4096)
def mac_to_bytes(mac: str) -> bytes:
    """Display order (big-endian) bytes of an address in any spelling."""
    return bytes.fromhex(normalize_mac(mac).replace(":", ""))


@lru_cache(maxsize=4096)
def mac_to_le(mac: str) -> bytes:
    """Over-the-air (little-endian, reversed) bytes of an address, as MiBeacon and pvvx put it in frames."""
    return mac_to_bytes(mac)[::-1]


def mac_from_le(b: bytes) -> str:
    """``AA:BB:…`` from over-the-air (reversed) bytes."""
    return b[::-1].hex(":").upper()

"""Service UUIDs: 16-bit ints, "0xFE95", "fe95" or the full 128-bit Bluetooth base UUID string."""

from __future__ import annotations

from functools import lru_cache

MIBEACON = 0xFE95
CUSTOM_181A = 0x181A  # Environmental Sensing: atc1441 and pvvx custom firmware (and b-parasite)
BTHOME_V1 = 0x181C
BTHOME_V1_ENC = 0x181E
BTHOME_V2 = 0xFCD2

BASE_SUFFIX = "-0000-1000-8000-00805f9b34fb"
KNOWN = (MIBEACON, CUSTOM_181A, BTHOME_V1, BTHOME_V1_ENC, BTHOME_V2)


class InvalidUuid(ValueError):
    pass


@lru_cache(maxsize=256)
def _parse_str(text: str) -> int:
    s = text.strip().lower()
    if len(s) == 36 and s.endswith(BASE_SUFFIX) and s.startswith("0000"):
        s = s[4:8]
    elif s.startswith("0x"):
        s = s[2:]
    try:
        value = int(s, 16)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFF or not s:
        raise InvalidUuid(
            f"{text!r} is not a 16-bit service UUID: expected 0xFE95, fe95, 65173 or 0000fe95{BASE_SUFFIX}"
        )
    return value


def parse_service_uuid(uuid: int | str) -> int:
    if isinstance(uuid, int):
        if 0 <= uuid <= 0xFFFF:
            return uuid
        raise InvalidUuid(f"{uuid!r} is not a 16-bit service UUID")
    return _parse_str(uuid)


def uuid128(uuid16: int) -> str:
    return f"0000{uuid16:04x}{BASE_SUFFIX}"

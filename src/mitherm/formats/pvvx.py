"""pvvx custom firmware on UUID 0x181A (formats.md §3.2, §3.3). All little-endian.

Plain (15 bytes): MAC (6, reversed) | temperature int16 0.01 °C | humidity uint16 0.01 % |
battery mV uint16 | battery uint8 % | counter uint8 | flags uint8. 14 bytes: the same without flags
(firmware built without the trigger service).
Encrypted (11 bytes): counter | 6 sealed bytes: temperature int16 0.01 °C | humidity uint16 0.01 % |
battery % | flags | MIC (4)."""

from __future__ import annotations

import struct

from ..bindkey import Bindkey
from ..model import Reading
from ..uuids import CUSTOM_181A
from ._customenc import check_frame_mac, open_encrypted, seal

PLAIN = struct.Struct("<6shHHBBB")
PLAIN_NOFLAGS = struct.Struct("<6shHHBB")
SEALED = struct.Struct("<hHBB")
PLAIN_LEN = PLAIN.size  # 15
PLAIN_NOFLAGS_LEN = PLAIN_NOFLAGS.size  # 14
ENC_LEN = 1 + SEALED.size + 4  # 11

# flag bits (pvvx README "Custom format")
FLAG_REED = 0x01
FLAG_TRIGGER_OUT = 0x02
FLAG_TRIGGER_ACTIVE = 0x04
FLAG_TEMP_EVENT = 0x08
FLAG_HUM_EVENT = 0x10


def decode_plain(payload: bytes, mac: str, mac_le: bytes) -> Reading:
    r = Reading(mac=mac, service_uuid=CUSTOM_181A, format="pvvx", model="ATC")
    if len(payload) == PLAIN_LEN:
        m, t, h, mv, b, cnt, flags = PLAIN.unpack(payload)
    else:
        m, t, h, mv, b, cnt = PLAIN_NOFLAGS.unpack(payload)
        flags = None
    r.frame_counter = cnt
    if not check_frame_mac(r, m, mac_le):
        return r
    r.values = {"temperature_c": t / 100, "humidity_pct": h / 100, "battery_pct": b, "voltage_v": mv / 1000}
    if flags is not None:
        r.values["flags"] = flags
    return r


def decode_encrypted(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, key_error: str | None) -> Reading:
    r = Reading(mac=mac, service_uuid=CUSTOM_181A, format="pvvx_enc", model="ATC", encrypted=True)
    plain = open_encrypted(r, payload, mac_le, key, key_error, "pvvx")
    if plain is None:
        return r
    t, h, b, flags = SEALED.unpack(plain)
    r.values = {"temperature_c": t / 100, "humidity_pct": h / 100, "battery_pct": b, "flags": flags}
    return r


def encode_plain(
    mac_le: bytes,
    temperature_c: float,
    humidity_pct: float,
    battery_pct: int,
    voltage_v: float,
    counter: int,
    flags: int | None = 0,
) -> bytes:
    args = (
        mac_le,
        round(temperature_c * 100),
        round(humidity_pct * 100),
        round(voltage_v * 1000),
        battery_pct,
        counter & 0xFF,
    )
    if flags is None:
        return PLAIN_NOFLAGS.pack(*args)
    return PLAIN.pack(*args, flags)


def encode_encrypted(
    mac_le: bytes,
    key: Bindkey,
    temperature_c: float,
    humidity_pct: float,
    battery_pct: int,
    counter: int,
    flags: int = 0,
) -> bytes:
    plain = SEALED.pack(round(temperature_c * 100), round(humidity_pct * 100), battery_pct, flags)
    return seal(plain, counter, mac_le, key)

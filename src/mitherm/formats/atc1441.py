"""atc1441 custom firmware on UUID 0x181A (formats.md §3.1, §3.3).

Plain (13 bytes): MAC (6, display order) | temperature int16 BE 0.1 °C | humidity uint8 % |
battery uint8 % | battery mV uint16 BE | counter uint8.
Encrypted (8 bytes): counter | 3 sealed bytes: temperature = b0/2 − 40 °C, humidity = b1/2 %,
b2 = battery % | trigger << 7 | MIC (4)."""

from __future__ import annotations

import struct

from ..bindkey import Bindkey
from ..model import Reading
from ..uuids import CUSTOM_181A
from ._customenc import check_frame_mac, open_encrypted, seal

PLAIN = struct.Struct(">6shBBHB")
PLAIN_LEN = PLAIN.size  # 13
ENC_LEN = 8


def decode_plain(payload: bytes, mac: str, mac_le: bytes) -> Reading:
    r = Reading(mac=mac, service_uuid=CUSTOM_181A, format="atc1441", model="ATC")
    mac_be, t, h, b, mv, cnt = PLAIN.unpack(payload)
    r.frame_counter = cnt
    if not check_frame_mac(r, mac_be[::-1], mac_le):
        return r
    r.values = {"temperature_c": t / 10, "humidity_pct": h, "battery_pct": b, "voltage_v": mv / 1000}
    return r


def decode_encrypted(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, key_error: str | None) -> Reading:
    r = Reading(mac=mac, service_uuid=CUSTOM_181A, format="atc1441_enc", model="ATC", encrypted=True)
    plain = open_encrypted(r, payload, mac_le, key, key_error, "atc1441")
    if plain is None:
        return r
    r.values = {
        "temperature_c": plain[0] / 2 - 40,
        "humidity_pct": plain[1] / 2,
        "battery_pct": plain[2] & 0x7F,
        "trigger": plain[2] >> 7,
    }
    return r


def encode_plain(
    mac_le: bytes, temperature_c: float, humidity_pct: float, battery_pct: int, voltage_v: float, counter: int
) -> bytes:
    return PLAIN.pack(
        mac_le[::-1],
        round(temperature_c * 10),
        round(humidity_pct),
        battery_pct,
        round(voltage_v * 1000),
        counter & 0xFF,
    )


def encode_encrypted(
    mac_le: bytes,
    key: Bindkey,
    temperature_c: float,
    humidity_pct: float,
    battery_pct: int,
    counter: int,
    trigger: int = 0,
) -> bytes:
    t = max(0, min(255, round((temperature_c + 40) * 2)))
    h = max(0, min(255, round(humidity_pct * 2)))
    plain = bytes([t, h, (battery_pct & 0x7F) | (trigger & 1) << 7])
    return seal(plain, counter, mac_le, key)

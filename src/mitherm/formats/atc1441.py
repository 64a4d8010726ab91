"""atc1441 custom firmware on UUID 0x181A (formats.md §3.1, §3.3).

Plain (13 bytes): MAC (6, display order) | temperature int16 BE 0.1 °C | humidity uint8 % |
battery uint8 % | battery mV uint16 BE | counter uint8.
Encrypted (8 bytes): counter | 3 sealed bytes: temperature = b0/2 − 40 °C, humidity = b1/2 %,
b2 = battery % | trigger << 7 | MIC (4)."""

from __future__ import annotations

import struct

from ..bindkey import Bindkey
from ..mac import mac_from_bytes
from ..model import DecodeError, ErrorCode, Reading
from ..uuids import CUSTOM_181A
from ._customenc import open_sealed, seal

PLAIN = struct.Struct(">6shBBHB")
PLAIN_LEN = PLAIN.size  # 13
ENC_LEN = 8


def decode_plain(payload: bytes, mac: str, mac_le: bytes) -> Reading:
    r = Reading(mac=mac, service_uuid=CUSTOM_181A, format="atc1441", model="ATC")
    mac_be, t, h, b, mv, cnt = PLAIN.unpack(payload)
    r.frame_counter = cnt
    if mac_be != mac_le[::-1]:
        r.mac_in_frame = mac_from_bytes(mac_be)
        r.error = DecodeError(
            ErrorCode.MAC_MISMATCH, f"the frame carries MAC {r.mac_in_frame} but was sent by {mac}: not decoded"
        )
        return r
    r.mac_in_frame = mac
    r.values = {"temperature_c": t / 10, "humidity_pct": h, "battery_pct": b, "voltage_v": mv / 1000}
    return r


def decode_encrypted(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, key_error: str | None) -> Reading:
    r = Reading(mac=mac, service_uuid=CUSTOM_181A, format="atc1441_enc", model="ATC", encrypted=True)
    r.frame_counter = payload[0]
    err = _key_problem(key, key_error, mac)
    if err:
        r.error = err
        return r
    plain = open_sealed(payload, mac_le, key)  # type: ignore[arg-type]
    if plain is None:
        r.error = DecodeError(ErrorCode.WRONG_KEY, "MIC check failed: wrong bindkey for this atc1441 encrypted beacon")
        return r
    r.values = {
        "temperature_c": plain[0] / 2 - 40,
        "humidity_pct": plain[1] / 2,
        "battery_pct": plain[2] & 0x7F,
        "trigger": plain[2] >> 7,
    }
    return r


def _key_problem(key: Bindkey | None, key_error: str | None, mac: str) -> DecodeError | None:
    if key is None:
        if key_error:
            return DecodeError(ErrorCode.BAD_KEY, key_error)
        return DecodeError(
            ErrorCode.NO_KEY, f"encrypted custom-firmware beacon: the firmware's bindkey for {mac} is needed"
        )
    if len(key.raw) != 16:
        return DecodeError(ErrorCode.BAD_KEY, "custom firmware beacons need a 32-hex-digit bindkey")
    return None


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

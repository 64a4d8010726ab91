"""BTHome v1 (UUID 0x181C plain, 0x181E encrypted) and v2 (UUID 0xFCD2) (formats.md §4, §5).

v2: device_info (1) | [MAC 6, LE, bit 1] | objects | encrypted: ciphertext | counter (4, LE) | MIC (4).
v1: objects ``control | type | data`` where control bits 0-4 = bytes after the control byte and bits 5-7
the data format. Object types, lengths and factors are the table ``OBJECTS``."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from ..bindkey import Bindkey
from ..mac import mac_from_le
from ..model import DecodeError, ErrorCode, Reading, Value
from ..uuids import BTHOME_V1, BTHOME_V1_ENC, BTHOME_V2
from ._common import ndigits_for, put

INFO_ENCRYPTED = 0x01
INFO_MAC = 0x02
INFO_TRIGGER = 0x04
V1_AAD = b"\x11"
UUID_V1_ENC_LE = b"\x1e\x18"
UUID_V2_LE = b"\xd2\xfc"

# kinds: u unsigned, s signed, bin binary sensor (0/1), evt event, str / raw length-prefixed,
# cmd command (opcode + args, length in the low 5 bits), ts Unix timestamp, dev device type id,
# fw4 / fw3 firmware version.


@dataclass(frozen=True, slots=True)
class ObjectType:
    name: str
    length: int
    kind: str = "u"
    factor: float = 1.0


def _t(name: str, length: int = 1, kind: str = "u", factor: float = 1.0) -> ObjectType:
    return ObjectType(name, length, kind, factor)


# BTHome object ids (bthome.io "Format"; bthome-ble const.py MEAS_TYPES, PyPI 3.25.0).
OBJECTS: dict[int, ObjectType] = {
    0x00: _t("packet_id"),
    0x01: _t("battery_pct"),
    0x02: _t("temperature_c", 2, "s", 0.01),
    0x03: _t("humidity_pct", 2, "u", 0.01),
    0x04: _t("pressure_hpa", 3, "u", 0.01),
    0x05: _t("illuminance_lx", 3, "u", 0.01),
    0x06: _t("mass_kg", 2, "u", 0.01),
    0x07: _t("mass_lb", 2, "u", 0.01),
    0x08: _t("dew_point_c", 2, "s", 0.01),
    0x09: _t("count"),
    0x0A: _t("energy_kwh", 3, "u", 0.001),
    0x0B: _t("power_w", 3, "u", 0.01),
    0x0C: _t("voltage_v", 2, "u", 0.001),
    0x0D: _t("pm25_ug_m3", 2),
    0x0E: _t("pm10_ug_m3", 2),
    0x0F: _t("generic", kind="bin"),
    0x10: _t("power_on", kind="bin"),
    0x11: _t("opening", kind="bin"),
    0x12: _t("co2_ppm", 2),
    0x13: _t("tvoc_ug_m3", 2),
    0x14: _t("moisture_pct", 2, "u", 0.01),
    0x15: _t("battery_low", kind="bin"),
    0x16: _t("battery_charging", kind="bin"),
    0x17: _t("carbon_monoxide", kind="bin"),
    0x18: _t("cold", kind="bin"),
    0x19: _t("connectivity", kind="bin"),
    0x1A: _t("door", kind="bin"),
    0x1B: _t("garage_door", kind="bin"),
    0x1C: _t("gas", kind="bin"),
    0x1D: _t("heat", kind="bin"),
    0x1E: _t("light", kind="bin"),
    0x1F: _t("lock", kind="bin"),
    0x20: _t("moisture_detected", kind="bin"),
    0x21: _t("motion", kind="bin"),
    0x22: _t("moving", kind="bin"),
    0x23: _t("occupancy", kind="bin"),
    0x24: _t("plug", kind="bin"),
    0x25: _t("presence", kind="bin"),
    0x26: _t("problem", kind="bin"),
    0x27: _t("running", kind="bin"),
    0x28: _t("safety", kind="bin"),
    0x29: _t("smoke", kind="bin"),
    0x2A: _t("sound", kind="bin"),
    0x2B: _t("tamper", kind="bin"),
    0x2C: _t("vibration", kind="bin"),
    0x2D: _t("window", kind="bin"),
    0x2E: _t("humidity_pct"),
    0x2F: _t("moisture_pct"),
    0x3A: _t("button_event", kind="evt"),
    0x3B: _t("command", kind="cmd"),
    0x3C: _t("dimmer_event", 2, "evt"),
    0x3D: _t("count", 2),
    0x3E: _t("count", 4),
    0x3F: _t("rotation_deg", 2, "s", 0.1),
    0x40: _t("distance_mm", 2),
    0x41: _t("distance_m", 2, "u", 0.1),
    0x42: _t("duration_s", 3, "u", 0.001),
    0x43: _t("current_a", 2, "u", 0.001),
    0x44: _t("speed_m_s", 2, "u", 0.01),
    0x45: _t("temperature_c", 2, "s", 0.1),
    0x46: _t("uv_index", 1, "u", 0.1),
    0x47: _t("volume_l", 2, "u", 0.1),
    0x48: _t("volume_ml", 2),
    0x49: _t("volume_flow_rate_m3_h", 2, "u", 0.001),
    0x4A: _t("voltage_v", 2, "u", 0.1),
    0x4B: _t("gas_m3", 3, "u", 0.001),
    0x4C: _t("gas_m3", 4, "u", 0.001),
    0x4D: _t("energy_kwh", 4, "u", 0.001),
    0x4E: _t("volume_l", 4, "u", 0.001),
    0x4F: _t("water_l", 4, "u", 0.001),
    0x50: _t("timestamp", 4, "ts"),
    0x51: _t("acceleration_m_s2", 2, "u", 0.001),
    0x52: _t("gyroscope_deg_s", 2, "u", 0.001),
    0x53: _t("text", kind="str"),
    0x54: _t("raw", kind="raw"),
    0x55: _t("volume_storage_l", 4, "u", 0.001),
    0x56: _t("conductivity_us_cm", 2),
    0x57: _t("temperature_c", 1, "s"),
    0x58: _t("temperature_c", 1, "s", 0.35),
    0x59: _t("count", 1, "s"),
    0x5A: _t("count", 2, "s"),
    0x5B: _t("count", 4, "s"),
    0x5C: _t("power_w", 4, "s", 0.01),
    0x5D: _t("current_a", 2, "s", 0.001),
    0x5E: _t("direction_deg", 2, "u", 0.01),
    0x5F: _t("precipitation_mm", 2, "u", 0.1),
    0x60: _t("channel"),
    0x61: _t("rotational_speed_rpm", 2),
    0x62: _t("speed_m_s", 4, "s", 0.000001),
    0x63: _t("acceleration_m_s2", 4, "s", 0.000001),
    0x64: _t("light_level"),
    0x65: _t("settings_revision"),
    0xF0: _t("device_type_id", 2, "dev"),
    0xF1: _t("firmware_version", 4, "fw4"),
    0xF2: _t("firmware_version", 3, "fw3"),
}
_LEN_PREFIXED = frozenset({"str", "raw", "cmd"})
_DIGITS = {oid: ndigits_for(t.factor) for oid, t in OBJECTS.items()}
_BY_NAME: dict[str, int] = {}
for _oid, _t_ in OBJECTS.items():
    _BY_NAME.setdefault(_t_.name, _oid)


def _value(oid: int, t: ObjectType, data: bytes, signed: bool | None = None) -> Value:
    kind = t.kind
    if kind in ("u", "s", "bin", "ts", "dev"):
        v = int.from_bytes(data, "little", signed=(kind == "s") if signed is None else signed)
        if t.factor != 1.0:
            return round(v * t.factor, _DIGITS[oid])
        return v
    if kind == "evt":
        return data[0]
    if kind == "str":
        return data.decode("utf-8", "replace")
    if kind == "fw4":
        return f"{data[3]}.{data[2]}.{data[1]}.{data[0]}"
    if kind == "fw3":
        return f"{data[2]}.{data[1]}.{data[0]}"
    return data.hex()  # raw, cmd


def _store(oid: int, t: ObjectType, data: bytes, values: dict[str, Value]) -> None:
    put(values, t.name, _value(oid, t, data))
    if oid == 0x3C and len(data) == 2:
        values["dimmer_steps"] = data[1]


# Per object id, what the v2 walk needs, precomputed (the hot path): (name, length, signed, factor, digits)
# for fixed-length numbers; None for the other kinds (length-prefixed, events, firmware ...), which go
# through ``_value``.
_NUMERIC: list[tuple[str, int, bool, float, int] | None] = [None] * 256
for _oid, _t_ in OBJECTS.items():
    if _t_.kind in ("u", "s", "bin", "ts", "dev") and _oid != 0x3C:
        _NUMERIC[_oid] = (_t_.name, _t_.length, _t_.kind == "s", _t_.factor, _DIGITS[_oid])
_from_bytes = int.from_bytes


def _walk_v2(data: bytes, start: int, end: int, r: Reading, strict: bool) -> DecodeError | None:
    i = start
    values = r.values
    objects = r.objects
    while i < end:
        oid = data[i]
        num = _NUMERIC[oid]
        if num is not None:  # a fixed-length number: most objects
            name, ln, signed, factor, digits = num
            ds = i + 1
            de = ds + ln
            if de > end:
                return _cut(r, strict, oid)
            chunk = data[ds:de]
            objects.append((oid, chunk))
            v: Value = _from_bytes(chunk, "little", signed=signed)
            if factor != 1.0:
                v = round(v * factor, digits)
            if name in values:
                put(values, name, v)
            else:
                values[name] = v
            i = de
            continue
        t = OBJECTS.get(oid)
        if t is None:
            msg = f"unknown BTHome object id 0x{oid:02X}: parsing stops there"
            if strict:
                return DecodeError(ErrorCode.MALFORMED, msg)
            r.note = msg
            return None
        if t.kind in _LEN_PREFIXED:
            if i + 1 >= end:
                return _cut(r, strict, oid)
            ln = (data[i + 1] & 0x1F) + 1 if t.kind == "cmd" else data[i + 1]
            ds = i + 2
        else:
            ln = t.length
            ds = i + 1
        de = ds + ln
        if de > end:
            return _cut(r, strict, oid)
        chunk = data[ds:de]
        objects.append((oid, chunk))
        _store(oid, t, chunk, values)
        i = de
    return None


def _cut(r: Reading, strict: bool, oid: int) -> DecodeError | None:
    msg = f"BTHome object 0x{oid:02X} is cut off at the end of the frame"
    if strict:
        return DecodeError(ErrorCode.MALFORMED, msg)
    r.truncated = True
    r.note = msg + "; the complete objects before it are kept"
    return None


_V1_SIGNED = {0: False, 1: True}


def _walk_v1(data: bytes, start: int, end: int, r: Reading, strict: bool) -> DecodeError | None:
    i = start
    values = r.values
    while i < end:
        control = data[i]
        ln = control & 0x1F
        fmt = control >> 5
        if ln == 0:
            i += 1
            continue
        if i + 1 + ln > end or ln < 2:
            if ln < 2 and i + 1 + ln <= end:
                msg = f"BTHome v1 object with length {ln} has no data"
                if strict:
                    return DecodeError(ErrorCode.MALFORMED, msg)
                r.note = msg
                return None
            return _cut(r, strict, data[i + 1] if i + 1 < end else 0)
        oid = data[i + 1]
        chunk = data[i + 2 : i + 1 + ln]
        num = _NUMERIC[oid]
        if num is not None and fmt < 2:  # an unsigned (0) or signed (1) integer of a numeric type: most objects
            r.objects.append((oid, chunk))
            v = _from_bytes(chunk, "little", signed=fmt == 1)
            if num[3] != 1.0:
                v = round(v * num[3], num[4])
            put(values, num[0], v)
            i += 1 + ln
            continue
        t = OBJECTS.get(oid)
        if t is None:
            r.note = f"unknown BTHome object id 0x{oid:02X} skipped"
        else:
            r.objects.append((oid, chunk))
            if fmt == 2 and len(chunk) in (4, 8):
                v: Value = struct.unpack("<f" if len(chunk) == 4 else "<d", chunk)[0]
                put(values, t.name, round(v * t.factor, 6))
            elif fmt == 3:
                put(values, t.name, chunk.decode("utf-8", "replace"))
            elif fmt == 4:
                put(values, t.name, chunk.hex())
            else:
                put(values, t.name, _value(oid, t, chunk, _V1_SIGNED.get(fmt)))
        i += 1 + ln
    return None


def _set_counter_from_packet_id(r: Reading) -> None:
    pid = r.values.get("packet_id")
    if isinstance(pid, int):
        r.frame_counter = pid


def decode_v2(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, key_error: str | None) -> Reading:
    r = Reading(mac=mac, service_uuid=BTHOME_V2, format="bthome_v2", model="BTHome")
    n = len(payload)
    if n < 1:
        r.error = DecodeError(ErrorCode.MALFORMED, "empty BTHome v2 frame")
        return r
    info = payload[0]
    version = info >> 5
    encrypted = bool(info & INFO_ENCRYPTED)
    r.encrypted = encrypted
    if encrypted:
        r.format = "bthome_v2_enc"
    if version != 2:
        r.error = DecodeError(ErrorCode.UNSUPPORTED, f"BTHome device info announces version {version}, not 2")
        return r
    i = 1
    nonce_mac = mac_le[::-1]
    if info & INFO_MAC:
        if n < 7:
            r.error = DecodeError(ErrorCode.MALFORMED, "frame announces a MAC but is too short to hold it")
            return r
        # BTHome puts the real MAC in the frame when the advertiser uses a random address.
        nonce_mac = payload[6:0:-1]
        r.mac_in_frame = mac_from_le(payload[1:7])
        i = 7
    if not encrypted:
        r.error = _walk_v2(payload, i, n, r, strict=False)
        _set_counter_from_packet_id(r)
        return r
    if n - i < 8:
        r.error = DecodeError(ErrorCode.MALFORMED, "encrypted BTHome frame too short for its counter and MIC")
        return r
    return _decrypt_and_walk(
        r, payload, i, key, key_error, nonce_mac + UUID_V2_LE + payload[0:1], None, _walk_v2, "BTHome"
    )


def decode_v1(
    payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, key_error: str | None, uuid: int
) -> Reading:
    encrypted = uuid == BTHOME_V1_ENC
    r = Reading(
        mac=mac,
        service_uuid=uuid,
        format="bthome_v1_enc" if encrypted else "bthome_v1",
        model="BTHome",
        encrypted=encrypted,
    )
    n = len(payload)
    if not encrypted:
        r.error = _walk_v1(payload, 0, n, r, strict=False)
        _set_counter_from_packet_id(r)
        return r
    if n < 9:
        r.error = DecodeError(ErrorCode.MALFORMED, "encrypted BTHome v1 frame too short for its counter and MIC")
        return r
    return _decrypt_and_walk(
        r, payload, 0, key, key_error, mac_le[::-1] + UUID_V1_ENC_LE, V1_AAD, _walk_v1, "BTHome v1"
    )


def _decrypt_and_walk(
    r: Reading,
    payload: bytes,
    start: int,
    key: Bindkey | None,
    key_error: str | None,
    nonce_prefix: bytes,
    aad: bytes | None,
    walk: Callable[[bytes, int, int, Reading, bool], DecodeError | None],
    what: str,
) -> Reading:
    """The encrypted tail shared by v1 and v2: ``payload[start:]`` is ciphertext | counter (4) | MIC (4).

    Sets the frame counter, checks the key, decrypts with nonce ``nonce_prefix + counter`` and walks
    the plaintext strictly; on any failure ``r.error`` is set and no values are kept."""
    n = len(payload)
    counter = payload[n - 8 : n - 4]
    r.frame_counter = int.from_bytes(counter, "little")
    err = _key_problem(key, key_error, r.mac)
    if err:
        r.error = err
        return r
    ciphertext = payload[start : n - 8] + payload[n - 4 :]
    try:
        plain = key.ccm4().decrypt(nonce_prefix + counter, ciphertext, aad)  # type: ignore[union-attr]
    except InvalidTag:
        r.error = DecodeError(ErrorCode.WRONG_KEY, f"MIC check failed: wrong bindkey for this {what} device")
        return r
    err = walk(plain, 0, len(plain), r, True)
    if err:
        r.values.clear()
        r.objects.clear()
        r.error = err
    return r


def _key_problem(key: Bindkey | None, key_error: str | None, mac: str) -> DecodeError | None:
    if key is None:
        if key_error:
            return DecodeError(ErrorCode.BAD_KEY, key_error)
        return DecodeError(ErrorCode.NO_KEY, f"encrypted BTHome frame: the device's bindkey for {mac} is needed")
    if len(key.raw) != 16:
        return DecodeError(ErrorCode.BAD_KEY, "BTHome needs a 32-hex-digit bindkey")
    return None


# --- encoding (simulator and tests) -------------------------------------------------------------


def encode_object(name_or_id: str | int, value: Value) -> bytes:
    """``id | data`` (v2) for one object, from a value in natural units."""
    oid = _BY_NAME[name_or_id] if isinstance(name_or_id, str) else name_or_id
    t = OBJECTS[oid]
    if t.kind in ("u", "s", "bin", "ts", "dev", "evt"):
        raw = round(float(value) / t.factor) if t.factor != 1.0 else int(value)
        return bytes([oid]) + raw.to_bytes(t.length, "little", signed=t.kind == "s")
    if t.kind == "str":
        b = str(value).encode()
        return bytes([oid, len(b)]) + b
    if t.kind in ("raw", "cmd"):
        b = bytes.fromhex(str(value))
        return bytes([oid, len(b) if t.kind == "raw" else max(0, len(b) - 1)]) + b
    parts = [int(p) for p in str(value).split(".")][::-1]
    return bytes([oid, *parts])


def encode_v2(
    objects: Sequence[bytes],
    *,
    mac_le: bytes,
    key: Bindkey | None = None,
    counter: int = 0,
    include_mac: bool = False,
    trigger_based: bool = False,
) -> bytes:
    info = (
        0x40
        | (INFO_ENCRYPTED if key else 0)
        | (INFO_MAC if include_mac else 0)
        | (INFO_TRIGGER if trigger_based else 0)
    )
    head = bytes([info]) + (mac_le if include_mac else b"")
    body = b"".join(objects)
    if key is None:
        return head + body
    c = (counter & 0xFFFFFFFF).to_bytes(4, "little")
    sealed = key.ccm4().encrypt(mac_le[::-1] + UUID_V2_LE + bytes([info]) + c, body, None)
    return head + sealed[:-4] + c + sealed[-4:]


def encode_v1_object(name_or_id: str | int, value: Value) -> bytes:
    """``control | type | data`` (v1) for a numeric object."""
    oid = _BY_NAME[name_or_id] if isinstance(name_or_id, str) else name_or_id
    t = OBJECTS[oid]
    raw = round(float(value) / t.factor) if t.factor != 1.0 else int(value)
    signed = t.kind == "s"
    data = raw.to_bytes(t.length, "little", signed=signed)
    return bytes([(1 if signed else 0) << 5 | (len(data) + 1), oid]) + data


def encode_v1(objects: Sequence[bytes], *, mac_le: bytes, key: Bindkey | None = None, counter: int = 0) -> bytes:
    body = b"".join(objects)
    if key is None:
        return body
    c = (counter & 0xFFFFFFFF).to_bytes(4, "little")
    sealed = key.ccm4().encrypt(mac_le[::-1] + UUID_V1_ENC_LE + c, body, V1_AAD)
    return sealed[:-4] + c + sealed[-4:]


__all__ = ["BTHOME_V1", "OBJECTS", "decode_v1", "decode_v2", "encode_object", "encode_v1", "encode_v2"]

"""Xiaomi MiBeacon (service data UUID 0xFE95), versions 2 to 5, plain and encrypted.

Layout (shared/reference/formats.md §2): frame control (2, LE) | product id (2, LE) | frame counter (1) |
[MAC 6, reversed, FC bit 4] | [capability 1, FC bit 5 [+ I/O capability 2, capability bit 5]] |
objects (FC bit 6) | encrypted v4/v5: ext counter (3) + MIC (4); legacy v2/v3: ext counter (3) + 1 byte.

Objects are ``id (2, LE) | length (1) | data``; their layouts are the table ``OBJECTS`` below.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag

from ..bindkey import Bindkey
from ..catalogue import catalogue
from ..mac import mac_from_le
from ..model import DecodeError, ErrorCode, Reading, Value
from ..uuids import MIBEACON
from ._common import f32_value, ndigits_for, put

# Frame-control bits
FC_ENCRYPTED = 0x0008
FC_MAC = 0x0010
FC_CAPABILITY = 0x0020
FC_OBJECTS = 0x0040
FC_MESH = 0x0080
FC_REGISTERED = 0x0100
CAP_IO = 0x20
AAD = b"\x11"


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    fmt: str  # struct code ("h", "H", "B", "b", "f", "I") or "u24"
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class ObjectSpec:
    length: int
    fields: tuple[Field, ...]
    note: str = ""


def _o(length: int, *fields: tuple, note: str = "") -> ObjectSpec:
    return ObjectSpec(length, tuple(Field(*f) for f in fields), note)


# MiBeacon objects (formats.md §2.3; MI spec "BLE Object definition"). All little-endian.
OBJECTS: dict[int, ObjectSpec] = {
    0x1004: _o(2, ("temperature_c", "h", 0.1)),
    0x1006: _o(2, ("humidity_pct", "H", 0.1)),
    0x1007: _o(3, ("illuminance_lx", "u24")),
    0x1008: _o(1, ("moisture_pct", "B")),
    0x1009: _o(2, ("conductivity_us_cm", "H")),
    0x100A: _o(1, ("battery_pct", "B")),
    0x100D: _o(4, ("temperature_c", "h", 0.1), ("humidity_pct", "H", 0.1)),
    0x1010: _o(2, ("formaldehyde_mg_m3", "H", 0.01)),
    0x1013: _o(1, ("consumable_pct", "B")),
    0x1018: _o(1, ("light", "B")),
    0x4801: _o(4, ("temperature_c", "f")),
    0x4802: _o(1, ("humidity_pct", "B")),
    0x4803: _o(1, ("battery_pct", "B")),
    0x4C01: _o(4, ("temperature_c", "f")),
    0x4C02: _o(1, ("humidity_pct", "B")),
    0x4C03: _o(1, ("battery_pct", "B")),
    0x4C08: _o(4, ("humidity_pct", "f")),
    0x000A: _o(2, ("body_temperature_c", "h", 0.01), note="MMC-W505"),
    0x2000: _o(
        5, ("skin_temperature_c", "h", 0.01), ("pcb_temperature_c", "h", 0.01), ("battery_pct", "B"), note="MMC-T201-1"
    ),
    0x5403: _o(1, ("battery_pct", "B"), note="MJZNZ018H (ble_monitor)"),
    0x605D: _o(1, ("temperature_c", "B"), note="PTX-F1 display (ble_monitor)"),
    0x6012: _o(1, ("humidity_pct", "B"), note="PTX-F1 display (ble_monitor)"),
}


@dataclass(frozen=True, slots=True)
class _Compiled:
    length: int
    unpack: Callable[[bytes, int], tuple]
    #: (value name, raw -> value) per field, precomputed so the hot path only calls them
    convert: tuple[tuple[str, Callable[[Any], Value]], ...]
    scales: tuple[float, ...]
    floats: tuple[bool, ...]
    pack: Callable[..., bytes]


def _converter(f: Field) -> Callable[[Any], Value]:
    if f.fmt == "f":
        return f32_value
    if f.scale == 1.0:
        return int
    inverse = round(1 / f.scale)
    if abs(inverse * f.scale - 1) < 1e-12:
        # v / 10 is the correctly rounded decimal (46.7), as round(v * 0.1, 1) but ~50x cheaper
        return lambda v: v / inverse
    digits = ndigits_for(f.scale)
    scale = f.scale
    return lambda v: round(v * scale, digits)


def _compile(spec: ObjectSpec) -> _Compiled:
    if any(f.fmt == "u24" for f in spec.fields):
        if len(spec.fields) != 1:
            raise ValueError("u24 fields stand alone")

        def unpack(b: bytes, off: int) -> tuple:
            return (b[off] | b[off + 1] << 8 | b[off + 2] << 16,)

        def pack(v: int) -> bytes:
            return int(v).to_bytes(3, "little")
    else:
        st = struct.Struct("<" + "".join(f.fmt for f in spec.fields))
        if st.size != spec.length:
            raise ValueError(f"object table: struct size {st.size} != length {spec.length}")
        unpack = st.unpack_from
        pack = st.pack
    return _Compiled(
        spec.length,
        unpack,
        tuple((f.name, _converter(f)) for f in spec.fields),
        tuple(f.scale for f in spec.fields),
        tuple(f.fmt == "f" for f in spec.fields),
        pack,
    )


_COMPILED: dict[int, _Compiled] = {oid: _compile(spec) for oid, spec in OBJECTS.items()}


def object_values(oid: int, data: bytes, values: dict[str, Value]) -> bool:
    """Decode one object into ``values``. False when the id is unknown or its length does not match."""
    c = _COMPILED.get(oid)
    if c is None or len(data) != c.length:
        return False
    for (name, conv), raw in zip(c.convert, c.unpack(data, 0)):  # noqa: B905 - same length by construction
        if name in values:
            put(values, name, conv(raw))
        else:
            values[name] = conv(raw)
    return True


def encode_object(oid: int, *values: float) -> bytes:
    """``id | len | data`` for a table object from values in natural units (23.4 °C, 45.1 %)."""
    c = _COMPILED[oid]
    raw = []
    for v, scale, is_float in zip(values, c.scales, c.floats, strict=True):
        raw.append(float(v) if is_float else round(v / scale))
    return struct.pack("<HB", oid, c.length) + c.pack(*raw)


def _walk_objects(data: bytes, start: int, end: int, reading: Reading, strict: bool) -> DecodeError | None:
    """Walk ``id len data`` objects. Plain frames keep the objects before a cut-off one (truncated);
    decrypted frames are all or nothing (strict)."""
    values = reading.values
    objects = reading.objects
    compiled_get = _COMPILED.get
    i = start
    while i < end:
        if end - i < 3:
            if strict:
                return DecodeError(ErrorCode.MALFORMED, f"{end - i} stray byte(s) after the last object")
            reading.truncated = True
            return None
        oid = data[i] | data[i + 1] << 8
        olen = data[i + 2]
        j = i + 3 + olen
        if j > end:
            if strict:
                return DecodeError(
                    ErrorCode.MALFORMED,
                    f"object 0x{oid:04X} claims {olen} bytes but only {end - i - 3} remain",
                )
            reading.truncated = True
            return None
        chunk = data[i + 3 : j]
        objects.append((oid, chunk))
        c = compiled_get(oid)
        if c is not None and c.length != olen and strict:
            return DecodeError(ErrorCode.MALFORMED, f"object 0x{oid:04X} has length {olen}, expected {c.length}")
        object_values(oid, chunk, values)
        i = j
    return None


# indexed by version * 2 + encrypted (versions outside 2-5 are "mibeacon")
_FORMAT_NAMES = tuple(
    (f"mibeacon_v{v}_enc" if e else f"mibeacon_v{v}") if 2 <= v <= 5 else "mibeacon" for v in range(16) for e in (0, 1)
)
_MODELS = {pid: info.model for pid, info in catalogue().items()}


def decode(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, key_error: str | None) -> Reading:
    n = len(payload)
    if n < 5:
        return Reading(
            mac=mac,
            service_uuid=MIBEACON,
            format="mibeacon",
            error=DecodeError(ErrorCode.MALFORMED, f"MiBeacon frame of {n} bytes is shorter than its 5-byte header"),
        )
    fc = payload[0] | payload[1] << 8
    version = fc >> 12
    encrypted = bool(fc & FC_ENCRYPTED)
    pid = payload[2] | payload[3] << 8
    r = Reading(
        mac=mac,
        service_uuid=MIBEACON,
        format=_FORMAT_NAMES[version * 2 + encrypted],
        model=_MODELS.get(pid),
        product_id=pid,
        encrypted=encrypted,
        frame_counter=payload[4],
    )
    if not 2 <= version <= 5:
        r.error = DecodeError(ErrorCode.UNSUPPORTED, f"MiBeacon version {version} (only 2 to 5 exist)")
        return r
    if fc & FC_MESH:
        r.error = DecodeError(ErrorCode.UNSUPPORTED, "MiBeacon mesh frame (frame control bit 7)")
        return r
    i = 5
    if fc & FC_MAC:
        if n < 11:
            r.error = DecodeError(ErrorCode.MALFORMED, "frame announces a MAC but is too short to hold it")
            return r
        frame_mac_le = payload[5:11]
        if frame_mac_le != mac_le:
            r.mac_in_frame = mac_from_le(frame_mac_le)
            r.error = DecodeError(
                ErrorCode.MAC_MISMATCH,
                f"the frame carries MAC {r.mac_in_frame} but was sent by {mac}: relayed or spoofed, not decoded",
            )
            return r
        r.mac_in_frame = mac
        nonce_mac = frame_mac_le
        i = 11
    else:
        nonce_mac = mac_le
    if fc & FC_CAPABILITY:
        if i >= n:
            r.error = DecodeError(ErrorCode.MALFORMED, "frame announces a capability byte but ends before it")
            return r
        cap = payload[i]
        i += 1
        if cap & CAP_IO:
            i += 2  # I/O capability: 2 bytes per the MiBeacon spec
            if i > n:
                r.error = DecodeError(ErrorCode.MALFORMED, "frame ends inside the I/O capability field")
                return r
    if not fc & FC_OBJECTS:
        return r  # an idle frame: nothing to decode, not an error
    if not encrypted:
        r.error = _walk_objects(payload, i, n, r, strict=False)
        return r
    legacy = version <= 3
    if n - i < (5 if legacy else 8):
        r.error = DecodeError(ErrorCode.MALFORMED, "encrypted frame too short for its counter and MIC")
        return r
    if key is None:
        if key_error is not None:
            r.error = DecodeError(ErrorCode.BAD_KEY, key_error)
        else:
            r.error = DecodeError(ErrorCode.NO_KEY, f"encrypted MiBeacon v{version}: a bindkey for {mac} is needed")
        return r
    if legacy:
        return _decode_legacy(payload, i, n, nonce_mac, key, r)
    if len(key.raw) != 16:
        r.error = DecodeError(
            ErrorCode.BAD_KEY,
            f"MiBeacon v{version} needs a 32-hex-digit bindkey; 24 digits is a legacy key or a Mi token",
        )
        return r
    ext = payload[n - 7 : n - 4]
    r.ext_counter = ext[0] | ext[1] << 8 | ext[2] << 16
    try:
        plain = (key._ccm4 or key.ccm4()).decrypt(
            nonce_mac + payload[2:5] + ext, payload[i : n - 7] + payload[n - 4 :], AAD
        )
    except InvalidTag:
        r.error = DecodeError(ErrorCode.WRONG_KEY, "MIC check failed: wrong bindkey (or a corrupted frame)")
        return r
    n = len(plain)
    if n >= 3 and plain[2] == n - 3:
        # Stock sensors send exactly one object per encrypted frame: decode it without the general walk
        oid = plain[0] | plain[1] << 8
        chunk = plain[3:]
        c = _COMPILED.get(oid)
        if c is not None and c.length != n - 3:
            r.error = DecodeError(ErrorCode.MALFORMED, f"object 0x{oid:04X} has length {n - 3}, expected {c.length}")
            return r
        r.objects.append((oid, chunk))
        object_values(oid, chunk, r.values)
        return r
    err = _walk_objects(plain, 0, n, r, strict=True)
    if err is not None:
        r.values.clear()
        r.objects.clear()
        r.error = err
    return r


def _decode_legacy(payload: bytes, i: int, n: int, nonce_mac: bytes, key: Bindkey, r: Reading) -> Reading:
    """v2/v3: CTR decryption and the trailing byte = first byte of the 16-byte CCM tag as a 1-byte check.

    A 12-byte key padded with FFFFFFFF (how some tools store legacy keys) is tried as the 12-byte key first.
    The 1-byte check passes a wrong key 1 time in 256, so the strict object walk must agree too."""
    ext = payload[n - 4 : n - 1]
    r.ext_counter = ext[0] | ext[1] << 8 | ext[2] << 16
    nonce = payload[0:5] + ext + nonce_mac[0:5]
    ct = payload[i : n - 4]
    candidates = (_short_key(key), key) if len(key.raw) == 16 and key.raw[12:] == b"\xff\xff\xff\xff" else (key,)
    for k in candidates:
        plain = k.legacy_ctr(nonce, ct)
        if k.legacy_ccm16().encrypt(nonce, plain, AAD)[len(plain)] != payload[n - 1]:
            continue
        if _walk_objects(plain, 0, len(plain), r, strict=True) is None:
            return r
        r.values.clear()
        r.objects.clear()
    r.error = DecodeError(
        ErrorCode.WRONG_KEY, "integrity byte does not match: wrong bindkey for this legacy (v2/v3) frame"
    )
    return r


def _short_key(key: Bindkey) -> Bindkey:
    from ..bindkey import parse_bindkey

    return parse_bindkey(key.raw[:12].hex())


def encode(
    *,
    mac_le: bytes,
    product_id: int,
    frame_counter: int,
    objects: Sequence[bytes] = (),
    version: int = 5,
    key: Bindkey | None = None,
    ext_counter: int = 0,
    include_mac: bool = True,
    capability: int | None = None,
    registered: bool = False,
) -> bytes:
    """Build a MiBeacon payload. ``objects`` are encoded objects (see ``encode_object``). With a key the
    objects are encrypted (AES-CCM for v4/v5, the legacy scheme for v2/v3)."""
    fc = version << 12
    if objects:
        fc |= FC_OBJECTS
    if include_mac:
        fc |= FC_MAC
    if capability is not None:
        fc |= FC_CAPABILITY
    if key is not None and objects:
        fc |= FC_ENCRYPTED
    if registered:
        fc |= FC_REGISTERED
    head = struct.pack("<HHB", fc, product_id, frame_counter & 0xFF)
    if include_mac:
        head += mac_le
    if capability is not None:
        head += bytes([capability])
        if capability & CAP_IO:
            head += b"\x00\x00"
    body = b"".join(objects)
    if not fc & FC_ENCRYPTED:
        return head + body
    ext = (ext_counter & 0xFFFFFF).to_bytes(3, "little")
    if version <= 3:
        nonce = head[0:5] + ext + mac_le[0:5]
        ct = key.legacy_ctr(nonce, body)
        tag = key.legacy_ccm16().encrypt(nonce, body, AAD)[len(body)]
        return head + ct + ext + bytes([tag])
    nonce = mac_le + head[2:5] + ext
    sealed = key.ccm4().encrypt(nonce, body, AAD)
    return head + sealed[:-4] + ext + sealed[-4:]

"""Round trips: frames built with each format's encoder decode back to their values (within the format's
resolution); wrong keys, cut frames and foreign MACs fail the way the decoder promises."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import assume, given
from hypothesis import strategies as st

from mitherm.bindkey import parse_bindkey
from mitherm.decoder import Decoder
from mitherm.formats import atc1441, bthome, mibeacon, pvvx
from mitherm.model import ErrorCode, Reading

FE95, X181A, BTHOME_V1, BTHOME_V1_ENC, FCD2 = 0xFE95, 0x181A, 0x181C, 0x181E, 0xFCD2


# --- building blocks ------------------------------------------------------------------------------


def display(mac_le: bytes) -> str:
    return mac_le[::-1].hex(":").upper()


macs = st.binary(min_size=6, max_size=6)
keys16 = st.binary(min_size=16, max_size=16).map(bytes.hex)
keys12 = st.binary(min_size=12, max_size=12).map(bytes.hex)
counter8 = st.integers(0, 255)
counter24 = st.integers(0, 0xFFFFFF)
counter32 = st.integers(0, 0xFFFFFFFF)


@dataclass(frozen=True)
class Obj:
    """One encoded object and what it must decode to: (name, value, tolerance) in frame order."""

    oid: int
    wire: bytes
    want: tuple[tuple[str, float, float], ...]


def _f32(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)


def _fl(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


F32_TOL = -1.0  # marker: compare as float32 (relative)


def _mi(oid: int, *specs: tuple[str, st.SearchStrategy, float]) -> st.SearchStrategy[Obj]:
    def build(vals: tuple) -> Obj:
        wire = mibeacon.encode_object(oid, *vals)
        return Obj(oid, wire, tuple((n, v, tol) for (n, _, tol), v in zip(specs, vals, strict=True)))

    return st.tuples(*(s for _, s, _ in specs)).map(build)


MI_OBJECTS = st.one_of(
    _mi(0x1004, ("temperature_c", _fl(-300, 300), 0.05)),
    _mi(0x1006, ("humidity_pct", _fl(0, 100), 0.05)),
    _mi(0x100A, ("battery_pct", st.integers(0, 100), 0)),
    _mi(0x100D, ("temperature_c", _fl(-300, 300), 0.05), ("humidity_pct", _fl(0, 100), 0.05)),
    _mi(0x4801, ("temperature_c", _f32(-40, 85), F32_TOL)),
    _mi(0x4C01, ("temperature_c", _f32(-40, 85), F32_TOL)),
    _mi(0x4C02, ("humidity_pct", st.integers(0, 100), 0)),
    _mi(0x4C08, ("humidity_pct", _f32(0, 100), F32_TOL)),
)
mi_object_lists = st.lists(MI_OBJECTS, min_size=1, max_size=3)

# BTHome: (object id, value strategy); tolerance = half the factor
BT_SPECS = {
    0x00: st.integers(0, 255),
    0x01: st.integers(0, 100),
    0x02: _fl(-327, 327),
    0x03: _fl(0, 100),
    0x09: st.integers(0, 255),
    0x0C: _fl(0, 65),
    0x2E: st.integers(0, 100),
    0x3D: st.integers(0, 0xFFFF),
    0x45: _fl(-3000, 3000),
}


def _bt(oid: int, v1: bool) -> st.SearchStrategy[Obj]:
    t = bthome.OBJECTS[oid]
    tol = t.factor / 2 if t.factor != 1.0 else 0

    def build(v: float) -> Obj:
        wire = bthome.encode_v1_object(oid, v) if v1 else bthome.encode_object(oid, v)
        return Obj(oid, wire, ((t.name, v, tol),))

    return BT_SPECS[oid].map(build)


def bt_object_lists(v1: bool) -> st.SearchStrategy[list[Obj]]:
    return st.lists(
        st.sampled_from(sorted(BT_SPECS)).flatmap(lambda oid: _bt(oid, v1)),
        min_size=1,
        max_size=4,
        unique_by=lambda o: o.oid,
    )


def expected_values(objs: list[Obj]) -> list[tuple[str, float, float]]:
    """Names as the decoder reports them: a second value of the same name in one frame is name_2 …"""
    seen: dict[str, int] = {}
    out = []
    for o in objs:
        for name, v, tol in o.want:
            n = seen.get(name, 0) + 1
            seen[name] = n
            out.append((name if n == 1 else f"{name}_{n}", v, tol))
    return out


def check_values(r: Reading, want: list[tuple[str, float, float]]) -> None:
    assert r.error is None, r.error
    for name, v, tol in want:
        assert name in r.values, f"{name} missing from {r.values}"
        got = r.values[name]
        if tol == F32_TOL:
            assert got == pytest.approx(v, rel=1e-6, abs=1e-6), name
        else:
            assert abs(got - v) <= tol + 1e-9, (name, got, v)
    assert len(r.values) == len(want), r.values


def assert_failed(r: Reading, code: ErrorCode | None = None) -> None:
    assert r.error is not None, f"decoded {r.values}"
    if code is not None:
        assert r.error.code == code, r.error
    assert r.values == {}


def other_key(key_hex: str, data: st.DataObject) -> str:
    k = data.draw(st.binary(min_size=len(key_hex) // 2, max_size=len(key_hex) // 2).map(bytes.hex))
    return k if k != key_hex else ("0" if key_hex[0] != "0" else "1") + key_hex[1:]


def dec(mac_le: bytes, uuid: int, payload: bytes, key: str | None = None) -> Reading:
    return Decoder().decode(display(mac_le), uuid, payload, key=key)


# --- MiBeacon plain -------------------------------------------------------------------------------

capabilities = st.one_of(st.none(), st.integers(0, 255))


@given(
    mac=macs,
    version=st.sampled_from([2, 3, 5]),
    pid=st.integers(0, 0xFFFF),
    fcnt=counter8,
    objs=mi_object_lists,
    include_mac=st.booleans(),
    cap=capabilities,
)
def test_mibeacon_plain(mac, version, pid, fcnt, objs, include_mac, cap):
    frame = mibeacon.encode(
        mac_le=mac,
        product_id=pid,
        frame_counter=fcnt,
        objects=[o.wire for o in objs],
        version=version,
        include_mac=include_mac,
        capability=cap,
    )
    r = dec(mac, FE95, frame)
    check_values(r, expected_values(objs))
    assert r.format == f"mibeacon_v{version}"
    assert (r.product_id, r.frame_counter, r.encrypted, r.truncated) == (pid, fcnt, False, False)
    assert r.mac_in_frame == (display(mac) if include_mac else None)
    assert r.objects == [(o.oid, o.wire[3:]) for o in objs]


@given(
    mac=macs,
    version=st.sampled_from([2, 3, 5]),
    objs=mi_object_lists,
    cut=st.integers(1, 6),
    cap=capabilities,
    include_mac=st.booleans(),
)
def test_mibeacon_plain_truncated_keeps_earlier_objects(mac, version, objs, cut, cap, include_mac):
    cut = min(cut, len(objs[-1].wire) - 1)
    frame = mibeacon.encode(
        mac_le=mac,
        product_id=0x055B,
        frame_counter=1,
        objects=[o.wire for o in objs],
        version=version,
        include_mac=include_mac,
        capability=cap,
    )
    r = dec(mac, FE95, frame[:-cut])
    check_values(r, expected_values(objs[:-1]))
    assert r.truncated
    assert r.objects == [(o.oid, o.wire[3:]) for o in objs[:-1]]


@given(
    mac=macs, sender=macs, version=st.sampled_from([2, 3, 5]), objs=mi_object_lists, key=keys16, encrypted=st.booleans()
)
def test_mibeacon_mac_mismatch(mac, sender, version, objs, key, encrypted):
    assume(mac != sender)
    k = parse_bindkey(key if version == 5 else key[:24]) if encrypted else None
    frame = mibeacon.encode(
        mac_le=mac, product_id=0x055B, frame_counter=1, objects=[o.wire for o in objs], version=version, key=k
    )
    r = dec(sender, FE95, frame, key=k.hex if k else None)
    assert_failed(r, ErrorCode.MAC_MISMATCH)
    assert r.mac_in_frame == display(mac)
    assert r.objects == []


# --- MiBeacon v5 encrypted ------------------------------------------------------------------------


@given(
    mac=macs,
    key=keys16,
    pid=st.integers(0, 0xFFFF),
    fcnt=counter8,
    ext=counter24,
    objs=mi_object_lists,
    include_mac=st.booleans(),
    cap=capabilities,
    data=st.data(),
)
def test_mibeacon_v5_encrypted(mac, key, pid, fcnt, ext, objs, include_mac, cap, data):
    k = parse_bindkey(key)
    frame = mibeacon.encode(
        mac_le=mac,
        product_id=pid,
        frame_counter=fcnt,
        objects=[o.wire for o in objs],
        version=5,
        key=k,
        ext_counter=ext,
        include_mac=include_mac,
        capability=cap,
    )
    r = dec(mac, FE95, frame, key)
    check_values(r, expected_values(objs))
    assert r.format == "mibeacon_v5_enc" and r.encrypted
    assert (r.product_id, r.frame_counter, r.ext_counter) == (pid, fcnt, ext)
    assert r.mac_in_frame == (display(mac) if include_mac else None)
    assert r.objects == [(o.oid, o.wire[3:]) for o in objs]
    assert_failed(dec(mac, FE95, frame, other_key(key, data)), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, FE95, frame), ErrorCode.NO_KEY)
    if not include_mac:
        # the nonce holds the sender's address: another sender cannot be decrypted with this key
        sender = data.draw(macs.filter(lambda m: m != mac))
        assert_failed(dec(sender, FE95, frame, key), ErrorCode.WRONG_KEY)


@given(mac=macs, key=keys16, objs=mi_object_lists, cut=st.integers(1, 40), include_mac=st.booleans())
def test_mibeacon_v5_encrypted_cut_fails(mac, key, objs, cut, include_mac):
    frame = mibeacon.encode(
        mac_le=mac,
        product_id=0x055B,
        frame_counter=1,
        objects=[o.wire for o in objs],
        version=5,
        key=parse_bindkey(key),
        include_mac=include_mac,
    )
    cut = min(cut, len(frame) - 1)
    assert_failed(dec(mac, FE95, frame[:-cut], key))


# --- MiBeacon v2/v3 legacy encryption ---------------------------------------------------------------


def legacy_check_byte(frame: bytes, key12_hex: str, sender_le: bytes) -> int:
    """The 1-byte integrity value a legacy frame would need under ``key12_hex`` (formats.md §2.6),
    computed here independently of mitherm: first byte of the 16-byte CCM tag of the CTR-decrypted body."""
    k = bytes.fromhex(key12_hex)
    k16 = k[:6] + bytes.fromhex("8d3d3c97") + k[6:]
    fc = int.from_bytes(frame[0:2], "little")
    i = 5
    nonce_mac = sender_le
    if fc & 0x10:
        nonce_mac = frame[5:11]
        i = 11
    if fc & 0x20:
        i += 3 if frame[i] & 0x20 else 1
    nonce = frame[0:5] + frame[-4:-1] + nonce_mac[0:5]
    ctr = Cipher(algorithms.AES(k16), modes.CTR(b"\x01" + nonce + b"\x00\x01")).encryptor()
    plain = ctr.update(frame[i:-4])
    return AESCCM(k16, tag_length=16).encrypt(nonce, plain, b"\x11")[len(plain)]


@given(
    mac=macs,
    key=keys12,
    version=st.sampled_from([2, 3]),
    fcnt=counter8,
    ext=counter24,
    objs=mi_object_lists,
    include_mac=st.booleans(),
    data=st.data(),
)
def test_mibeacon_legacy_encrypted(mac, key, version, fcnt, ext, objs, include_mac, data):
    frame = mibeacon.encode(
        mac_le=mac,
        product_id=0x0153,
        frame_counter=fcnt,
        objects=[o.wire for o in objs],
        version=version,
        key=parse_bindkey(key),
        ext_counter=ext,
        include_mac=include_mac,
    )
    assert frame[-1] == legacy_check_byte(frame, key, mac)
    r = dec(mac, FE95, frame, key)
    check_values(r, expected_values(objs))
    assert r.format == f"mibeacon_v{version}_enc"
    assert (r.frame_counter, r.ext_counter) == (fcnt, ext)
    assert r.objects == [(o.oid, o.wire[3:]) for o in objs]
    # a wrong key must be caught by the integrity byte; draw keys until that byte really differs
    wrong = other_key(key, data)
    while legacy_check_byte(frame, wrong, mac) == frame[-1]:
        wrong = other_key(wrong, data)
    assert_failed(dec(mac, FE95, frame, wrong), ErrorCode.WRONG_KEY)
    # the 12-byte key followed by FFFFFFFF (how some tools show legacy keys) also decodes
    check_values(dec(mac, FE95, frame, key + "ffffffff"), expected_values(objs))


@given(mac=macs, key=keys12, objs=mi_object_lists, cut=st.integers(1, 40))
def test_mibeacon_legacy_encrypted_cut_fails(mac, key, objs, cut):
    frame = mibeacon.encode(
        mac_le=mac,
        product_id=0x0153,
        frame_counter=1,
        objects=[o.wire for o in objs],
        version=3,
        key=parse_bindkey(key),
    )
    cut = min(cut, len(frame) - 1)
    short = frame[:-cut]
    if len(short) >= 12:  # long enough to be checked: a 1/256 chance that the check byte still fits
        assume(legacy_check_byte(short, key, mac) != short[-1])
    assert_failed(dec(mac, FE95, short, key))


# --- atc1441 ----------------------------------------------------------------------------------------


@given(mac=macs, t=_fl(-300, 300), h=st.integers(0, 100), b=st.integers(0, 100), v=_fl(0, 65), cnt=counter8)
def test_atc1441_plain(mac, t, h, b, v, cnt):
    r = dec(mac, X181A, atc1441.encode_plain(mac, t, h, b, v, cnt))
    check_values(
        r, [("temperature_c", t, 0.05), ("humidity_pct", h, 0), ("battery_pct", b, 0), ("voltage_v", v, 0.0005)]
    )
    assert (r.format, r.frame_counter, r.mac_in_frame) == ("atc1441", cnt, display(mac))


@given(
    mac=macs,
    t=_fl(-40, 87.5),
    h=_fl(0, 100),
    b=st.integers(0, 100),
    cnt=counter8,
    trigger=st.integers(0, 1),
    key=keys16,
    data=st.data(),
)
def test_atc1441_encrypted(mac, t, h, b, cnt, trigger, key, data):
    frame = atc1441.encode_encrypted(mac, parse_bindkey(key), t, h, b, cnt, trigger)
    r = dec(mac, X181A, frame, key)
    check_values(
        r, [("temperature_c", t, 0.25), ("humidity_pct", h, 0.25), ("battery_pct", b, 0), ("trigger", trigger, 0)]
    )
    assert (r.format, r.frame_counter, r.encrypted) == ("atc1441_enc", cnt, True)
    assert_failed(dec(mac, X181A, frame, other_key(key, data)), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, X181A, frame), ErrorCode.NO_KEY)
    assert_failed(dec(mac, X181A, frame[: -data.draw(st.integers(1, 7))], key))


# --- pvvx -------------------------------------------------------------------------------------------


@given(
    mac=macs,
    t=_fl(-300, 300),
    h=_fl(0, 100),
    b=st.integers(0, 100),
    v=_fl(0, 65),
    cnt=counter8,
    flags=st.one_of(st.none(), st.integers(0, 255)),
)
def test_pvvx_plain(mac, t, h, b, v, cnt, flags):
    frame = pvvx.encode_plain(mac, t, h, b, v, cnt, flags)
    assert len(frame) == (14 if flags is None else 15)
    r = dec(mac, X181A, frame)
    want = [("temperature_c", t, 0.005), ("humidity_pct", h, 0.005), ("battery_pct", b, 0), ("voltage_v", v, 0.0005)]
    if flags is not None:
        want.append(("flags", flags, 0))
    check_values(r, want)
    assert (r.format, r.frame_counter, r.mac_in_frame) == ("pvvx", cnt, display(mac))


@given(
    mac=macs,
    t=_fl(-300, 300),
    h=_fl(0, 100),
    b=st.integers(0, 100),
    cnt=counter8,
    flags=st.integers(0, 255),
    key=keys16,
    data=st.data(),
)
def test_pvvx_encrypted(mac, t, h, b, cnt, flags, key, data):
    frame = pvvx.encode_encrypted(mac, parse_bindkey(key), t, h, b, cnt, flags)
    r = dec(mac, X181A, frame, key)
    check_values(
        r, [("temperature_c", t, 0.005), ("humidity_pct", h, 0.005), ("battery_pct", b, 0), ("flags", flags, 0)]
    )
    assert (r.format, r.frame_counter, r.encrypted) == ("pvvx_enc", cnt, True)
    assert_failed(dec(mac, X181A, frame, other_key(key, data)), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, X181A, frame), ErrorCode.NO_KEY)
    # the sender's address is part of the nonce
    assert_failed(dec(data.draw(macs.filter(lambda m: m != mac)), X181A, frame, key), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, X181A, frame[: -data.draw(st.integers(1, 10))], key))


@given(mac=macs, sender=macs, flags=st.one_of(st.none(), st.integers(0, 255)), pv=st.booleans())
def test_custom_firmware_mac_mismatch(mac, sender, flags, pv):
    assume(mac != sender)
    if pv:
        frame = pvvx.encode_plain(mac, 21.5, 45.5, 90, 2.9, 7, flags)
    else:
        frame = atc1441.encode_plain(mac, 21.5, 45, 90, 2.9, 7)
    r = dec(sender, X181A, frame)
    assert_failed(r, ErrorCode.MAC_MISMATCH)
    assert r.mac_in_frame == display(mac)


# --- BTHome v1 --------------------------------------------------------------------------------------


@given(mac=macs, objs=bt_object_lists(v1=True))
def test_bthome_v1_plain(mac, objs):
    r = dec(mac, BTHOME_V1, bthome.encode_v1([o.wire for o in objs], mac_le=mac))
    check_values(r, expected_values(objs))
    assert r.format == "bthome_v1" and not r.truncated
    assert r.objects == [(o.oid, o.wire[2:]) for o in objs]


@given(mac=macs, objs=bt_object_lists(v1=True), cut=st.integers(1, 3))
def test_bthome_v1_plain_truncated(mac, objs, cut):
    cut = min(cut, len(objs[-1].wire) - 1)
    r = dec(mac, BTHOME_V1, bthome.encode_v1([o.wire for o in objs], mac_le=mac)[:-cut])
    check_values(r, expected_values(objs[:-1]))
    assert r.truncated


@given(mac=macs, objs=bt_object_lists(v1=True), key=keys16, counter=counter32, data=st.data())
def test_bthome_v1_encrypted(mac, objs, key, counter, data):
    frame = bthome.encode_v1([o.wire for o in objs], mac_le=mac, key=parse_bindkey(key), counter=counter)
    r = dec(mac, BTHOME_V1_ENC, frame, key)
    check_values(r, expected_values(objs))
    assert (r.format, r.frame_counter, r.encrypted) == ("bthome_v1_enc", counter, True)
    assert_failed(dec(mac, BTHOME_V1_ENC, frame, other_key(key, data)), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, BTHOME_V1_ENC, frame), ErrorCode.NO_KEY)
    assert_failed(dec(mac, BTHOME_V1_ENC, frame[: -data.draw(st.integers(1, len(frame) - 1))], key))


# --- BTHome v2 --------------------------------------------------------------------------------------


@given(mac=macs, objs=bt_object_lists(v1=False), include_mac=st.booleans(), trigger=st.booleans())
def test_bthome_v2_plain(mac, objs, include_mac, trigger):
    frame = bthome.encode_v2([o.wire for o in objs], mac_le=mac, include_mac=include_mac, trigger_based=trigger)
    r = dec(mac, FCD2, frame)
    check_values(r, expected_values(objs))
    assert r.format == "bthome_v2" and not r.truncated
    assert r.mac_in_frame == (display(mac) if include_mac else None)
    assert r.objects == [(o.oid, o.wire[1:]) for o in objs]
    packet = [o for o in objs if o.oid == 0x00]
    if packet:
        assert r.frame_counter == packet[0].want[0][1]


@given(mac=macs, objs=bt_object_lists(v1=False), cut=st.integers(1, 2), include_mac=st.booleans())
def test_bthome_v2_plain_truncated(mac, objs, cut, include_mac):
    cut = min(cut, len(objs[-1].wire) - 1)
    frame = bthome.encode_v2([o.wire for o in objs], mac_le=mac, include_mac=include_mac)
    r = dec(mac, FCD2, frame[:-cut])
    check_values(r, expected_values(objs[:-1]))
    assert r.truncated


@given(
    mac=macs,
    objs=bt_object_lists(v1=False),
    key=keys16,
    counter=counter32,
    include_mac=st.booleans(),
    trigger=st.booleans(),
    data=st.data(),
)
def test_bthome_v2_encrypted(mac, objs, key, counter, include_mac, trigger, data):
    frame = bthome.encode_v2(
        [o.wire for o in objs],
        mac_le=mac,
        key=parse_bindkey(key),
        counter=counter,
        include_mac=include_mac,
        trigger_based=trigger,
    )
    r = dec(mac, FCD2, frame, key)
    check_values(r, expected_values(objs))
    assert (r.format, r.frame_counter, r.encrypted) == ("bthome_v2_enc", counter, True)
    assert_failed(dec(mac, FCD2, frame, other_key(key, data)), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, FCD2, frame), ErrorCode.NO_KEY)
    sender = data.draw(macs.filter(lambda m: m != mac))
    if include_mac:
        # the MAC in the frame (the device's real address) is the nonce's, whatever address sent it
        check_values(dec(sender, FCD2, frame, key), expected_values(objs))
    else:
        assert_failed(dec(sender, FCD2, frame, key), ErrorCode.WRONG_KEY)
    assert_failed(dec(mac, FCD2, frame[: -data.draw(st.integers(1, len(frame) - 1))], key))

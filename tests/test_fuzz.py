"""Whatever arrives over the air (or from a caller), ``Decoder.decode`` returns a Reading: it never raises,
a reading with an error carries no values, and ``to_json`` is always JSON-serialisable."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mitherm.decoder import Decoder
from mitherm.model import ErrorCode, Reading
from vectors import load_vectors

VECTORS = load_vectors()
UUIDS = [0xFE95, 0x181A, 0x181C, 0x181E, 0xFCD2]
FUZZ = settings(max_examples=400, deadline=None)

keys = st.one_of(
    st.none(),
    st.sampled_from(["zz", "", "0x", "g" * 32, "00" * 10, "ff" * 20]),
    st.binary(min_size=12, max_size=12).map(bytes.hex),  # 24 digits
    st.binary(min_size=16, max_size=16).map(bytes.hex),  # 32 digits
    st.binary(min_size=16, max_size=16).map(lambda b: b[:12].hex() + "ffffffff"),
    st.text(max_size=40),
)
uuids = st.one_of(st.sampled_from(UUIDS), st.integers(0, 0xFFFF))


def check(r: Reading) -> None:
    assert isinstance(r, Reading)
    if r.error is not None:
        assert r.values == {}, (r.error, r.values)
        assert isinstance(r.error.code, ErrorCode)
    json.loads(json.dumps(r.to_json()))


@FUZZ
@given(mac=st.binary(min_size=6, max_size=6), uuid=uuids, payload=st.binary(max_size=48), key=keys)
def test_random_payloads(mac, uuid, payload, key):
    check(Decoder().decode(mac.hex(":"), uuid, payload, key=key))


@st.composite
def mutated_vectors(draw):
    v = draw(st.sampled_from(VECTORS))
    data = bytearray(v.payload)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "extend", "byte"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) * 8 - 1))
            data[i // 8] ^= 1 << (i % 8)
        elif kind == "cut" and data:
            n = draw(st.integers(1, len(data)))
            data = data[:-n] if draw(st.booleans()) else data[n:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
        elif kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    key = draw(st.one_of(st.just(v.bindkey), keys))
    uuid = draw(st.one_of(st.just(v.service_uuid), st.sampled_from(UUIDS)))
    return v.mac, uuid, bytes(data), key


@FUZZ
@given(frame=mutated_vectors(), stored_key=st.booleans())
def test_mutated_vectors(frame, stored_key):
    mac, uuid, payload, key = frame
    if stored_key and key is not None:
        r = Decoder({mac: key}).decode(mac, uuid, payload)
    else:
        r = Decoder().decode(mac, uuid, payload, key=key)
    check(r)


@given(
    mac=st.one_of(st.text(max_size=20), st.binary(max_size=8), st.integers(), st.none()),
    uuid=st.one_of(st.text(max_size=40), st.integers(), st.none(), st.binary(max_size=4)),
    payload=st.one_of(st.binary(max_size=20), st.text(max_size=10), st.none(), st.integers(0, 5)),
)
def test_random_arguments(mac, uuid, payload):
    r = Decoder().decode(mac, uuid, payload)  # type: ignore[arg-type]
    check(r)


@given(mac=st.text(max_size=20).filter(lambda s: sum(c in "0123456789abcdefABCDEF" for c in s) < 12))
def test_bad_mac_is_an_error(mac):
    r = Decoder().decode(mac, 0xFE95, bytes.fromhex("5020aa01a3bf2e3b342d580d1004b40095020a10013b"))
    check(r)
    assert r.error is not None and r.error.code == ErrorCode.MALFORMED


@given(
    uuid=st.one_of(
        st.integers().filter(lambda u: not 0 <= u <= 0xFFFF),
        st.text(max_size=12).filter(lambda s: not s.strip().lower().removeprefix("0x").isalnum()),
    )
)
def test_bad_uuid_is_an_error(uuid):
    r = Decoder().decode("A4:C1:38:02:83:F4", uuid, bytes(13))
    check(r)
    assert r.error is not None and r.error.code == ErrorCode.UNSUPPORTED


@given(
    mac=st.binary(min_size=6, max_size=6),
    payload=st.binary(max_size=40),
    keys=st.dictionaries(st.text(max_size=17), st.text(max_size=40), max_size=3),
)
def test_bad_key_tables(mac, payload, keys):
    """Keys configured per device: a bad entry is reported per frame, never raised at decode time."""
    try:
        d = Decoder(keys)
    except ValueError:
        return  # an unparseable address in the table is the caller's error, raised at configuration
    for uuid in UUIDS:
        check(d.decode(mac.hex(":"), uuid, payload))

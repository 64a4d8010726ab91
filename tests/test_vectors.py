"""Every shared test vector, decoded by mitherm and compared field by field with its expected values."""

from __future__ import annotations

import json

import pytest

from mitherm.decoder import Decoder
from mitherm.model import ErrorCode, Reading
from vectors import Vector, load_vectors

VECTORS = load_vectors()

# expected keys that are Reading attributes rather than measurement values
COUNTER_KEYS = ("frame_counter", "counter", "encryption_counter")
SKIP_KEYS = frozenset({"note"})


def _decode(v: Vector) -> Reading:
    keys = {v.mac: v.bindkey} if v.bindkey else {}
    return Decoder(keys).decode(v.mac, v.service_uuid, v.payload)


def _expected_error(v: Vector) -> ErrorCode:
    if v.category == "needs_key":
        return ErrorCode.NO_KEY
    return ErrorCode.WRONG_KEY  # the negatives are wrong-key frames (legacy: caught by the 1-byte check)


def test_vector_count() -> None:
    assert len(VECTORS) == 203


@pytest.mark.parametrize("v", VECTORS, ids=[v.id for v in VECTORS])
def test_vector(v: Vector) -> None:
    r = _decode(v)
    assert not (r.error and r.values), "a reading with an error must not carry values"
    json.dumps(r.to_json())
    exp = v.expected
    if v.is_error:
        assert r.error is not None, f"expected {exp['decode_error']!r}, decoded {r.values}"
        assert r.error.code == _expected_error(v), r.error
        assert r.values == {}
        return
    assert r.error is None, r.error
    assert r.format == v.format
    objects = [(oid, bytes(data)) for oid, data in r.objects]
    for key, want in exp.items():
        if key in SKIP_KEYS:
            continue
        if key in COUNTER_KEYS:
            assert r.frame_counter == want, key
        elif key == "product_id":
            assert r.product_id == int(want, 16)
        elif key == "ext_counter":
            assert r.ext_counter == want
        elif key == "mac_in_frame":
            assert r.mac_in_frame == want
        elif key == "decrypted_objects":
            assert objects == [(int(o["id"], 16), bytes.fromhex(o["data_hex"])) for o in want]
        elif key == "other_objects":
            for oid, data_hex in want.items():
                assert (int(oid, 16), bytes.fromhex(data_hex)) in objects, oid
        else:
            assert key in r.values, f"{key} missing from {r.values}"
            got = r.values[key]
            if isinstance(want, float):
                assert got == pytest.approx(want, abs=1e-9), key
            else:
                assert got == want, key

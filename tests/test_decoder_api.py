"""The Decoder's public surface: address / UUID spellings, key management, key problems, idle and
unsupported frames, and the device catalogue."""

from __future__ import annotations

import pytest

from mitherm.bindkey import parse_bindkey
from mitherm.catalogue import CatalogueError, by_product_id, load_catalogue
from mitherm.decoder import Decoder
from mitherm.formats import mibeacon
from mitherm.model import ErrorCode

# xiaomi-ble test_Xiaomi_LYWSD03MMC_encrypted (formats.md §2.4)
LYWSD03_MAC = "A4:C1:38:02:83:F4"
LYWSD03_KEY = "e9ea895fac7cca6d30532432a516f3a8"
LYWSD03_FRAME = bytes.fromhex("58585b0550f4830238c1a495ef58763c26000097e2abb5")
# xiaomi-ble test_Xiaomi_YLKG07YL_press (legacy v3, 12-byte key)
YLKG_MAC = "F8:24:41:C5:98:8B"
YLKG_KEY = "b853075158487ca39a5b5ea9"
YLKG_FRAME = bytes.fromhex("5830b603d28b98c54124f8c3491476757e00000099")
# pvvx custom, plain (formats.md §3.2)
PVVX_MAC = "A4:C1:38:CF:01:56"
PVVX_FRAME = bytes.fromhex("5601cf38c1a462fdbd13470c64cc0f")


def ok(r) -> None:
    assert r.error is None, r.error


@pytest.mark.parametrize(
    "uuid",
    [
        0xFE95,
        "0xFE95",
        "0xfe95",
        "fe95",
        "FE95",
        " FE95 ",
        "0000fe95-0000-1000-8000-00805f9b34fb",
        "0000FE95-0000-1000-8000-00805F9B34FB",
    ],
)
def test_uuid_spellings(uuid):
    r = Decoder({LYWSD03_MAC: LYWSD03_KEY}).decode(LYWSD03_MAC, uuid, LYWSD03_FRAME)
    ok(r)
    assert r.service_uuid == 0xFE95
    assert r.values == {"humidity_pct": 46.7}


@pytest.mark.parametrize(
    "mac",
    [
        "A4:C1:38:02:83:F4",
        "a4:c1:38:02:83:f4",
        "a4c1380283f4",
        "A4C1380283F4",
        "A4-C1-38-02-83-F4",
        "a4-c1-38-02-83-f4",
    ],
)
def test_mac_spellings(mac):
    """Any spelling of the address finds the key and matches the MAC in the frame."""
    for d, key in (
        (Decoder({mac: LYWSD03_KEY}), None),
        (Decoder({LYWSD03_MAC: LYWSD03_KEY}), None),
        (Decoder(), LYWSD03_KEY),
    ):
        r = d.decode(mac, 0xFE95, LYWSD03_FRAME, key=key)
        ok(r)
        assert r.mac == LYWSD03_MAC
        assert r.mac_in_frame == LYWSD03_MAC
        assert r.values == {"humidity_pct": 46.7}
    r = Decoder().decode(mac.replace("F4", "F5").replace("f4", "f5"), 0xFE95, LYWSD03_FRAME, key=LYWSD03_KEY)
    assert r.error.code == ErrorCode.MAC_MISMATCH and not r.values


def test_set_key_and_remove_key():
    d = Decoder()
    assert d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME).error.code == ErrorCode.NO_KEY
    d.set_key("a4c1380283f4", LYWSD03_KEY)
    assert d.has_key(LYWSD03_MAC)
    ok(d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME))
    d.set_key(LYWSD03_MAC, "00" * 16)
    assert d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME).error.code == ErrorCode.WRONG_KEY
    d.set_key(LYWSD03_MAC, LYWSD03_KEY.upper())
    ok(d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME))
    d.remove_key("A4-C1-38-02-83-F4")
    assert not d.has_key(LYWSD03_MAC)
    assert d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME).error.code == ErrorCode.NO_KEY
    d.remove_key(LYWSD03_MAC)  # removing twice is harmless


def test_call_key_overrides_stored_key():
    d = Decoder({LYWSD03_MAC: "00" * 16})
    ok(d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME, key=LYWSD03_KEY))
    assert d.decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME).error.code == ErrorCode.WRONG_KEY


@pytest.mark.parametrize("key", ["zz" * 16, "not a key", "00" * 10, "0" * 31, "00" * 17, ""])
def test_bad_key(key):
    for r in (
        Decoder({LYWSD03_MAC: key}).decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME),
        Decoder().decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME, key=key),
    ):
        assert r.error is not None and r.error.code == ErrorCode.BAD_KEY, r.error
        assert r.values == {}


def test_key_spellings():
    spaced = " ".join(LYWSD03_KEY[i : i + 2] for i in range(0, 32, 2))
    for key in (LYWSD03_KEY.upper(), "0x" + LYWSD03_KEY, spaced, LYWSD03_KEY.replace("", ":")[1:-1]):
        ok(Decoder().decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME, key=key))


def test_legacy_key_on_v5_frame_is_bad_key():
    r = Decoder().decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME, key=LYWSD03_KEY[:24])
    assert r.error.code == ErrorCode.BAD_KEY and not r.values


def test_legacy_frame_with_12_byte_key_and_ffffffff_form():
    for key in (YLKG_KEY, YLKG_KEY + "ffffffff", YLKG_KEY.upper() + "FFFFFFFF"):
        r = Decoder({YLKG_MAC: key}).decode(YLKG_MAC, 0xFE95, YLKG_FRAME)
        ok(r)
        assert r.format == "mibeacon_v3_enc"
        assert r.objects == [(0x1001, bytes.fromhex("000103"))]


def test_legacy_ffffffff_key_when_the_raw_16_byte_key_passes_the_check_byte():
    """Regression (found by test_roundtrip): for this frame the 16-byte reading of key+FFFFFFFF happens to pass
    the 1-byte check (1 in 256), so the decoder never tries the 12-byte key the FFFFFFFF form stands for."""
    key = "62c6e3dd9ae46ace02a93e44"
    mac = "00:61:DF:BF:67:7D"
    frame = bytes.fromhex("4820530180b8cb7b0364000023")  # v2 legacy, object 0x4C02 humidity 88 %
    ok(Decoder().decode(mac, 0xFE95, frame, key=key))
    r = Decoder().decode(mac, 0xFE95, frame, key=key + "ffffffff")
    ok(r)
    assert r.values == {"humidity_pct": 88}


def test_idle_mibeacon_frame():
    """No objects (frame-control bit 6 clear): nothing to decode, and nothing wrong."""
    mac_le = bytes.fromhex(LYWSD03_MAC.replace(":", ""))[::-1]
    for version in (2, 3, 5):
        for frame in (
            mibeacon.encode(mac_le=mac_le, product_id=0x055B, frame_counter=9, version=version),
            mibeacon.encode(
                mac_le=mac_le,
                product_id=0x055B,
                frame_counter=9,
                version=version,
                key=parse_bindkey(LYWSD03_KEY),
                capability=0x08,
            ),
        ):
            r = Decoder().decode(LYWSD03_MAC, 0xFE95, frame)
            ok(r)
            assert r.values == {} and r.objects == []
            assert (r.product_id, r.frame_counter, r.model) == (0x055B, 9, "LYWSD03MMC")


@pytest.mark.parametrize("uuid", [0x181B, 0xFDCD, 0x0000, "0xFFFF"])
def test_unknown_uuid_is_unsupported(uuid):
    r = Decoder().decode(PVVX_MAC, uuid, PVVX_FRAME)
    assert r.error.code == ErrorCode.UNSUPPORTED and not r.values


@pytest.mark.parametrize("n", [16, 18])
def test_b_parasite_is_unsupported(n):
    r = Decoder().decode(PVVX_MAC, 0x181A, bytes(range(n)))
    assert r.error.code == ErrorCode.UNSUPPORTED and not r.values


@pytest.mark.parametrize("n", [0, 1, 7, 9, 10, 12, 17, 19, 30])
def test_other_181a_lengths_are_unsupported(n):
    r = Decoder().decode(PVVX_MAC, 0x181A, bytes(n))
    assert r.error.code == ErrorCode.UNSUPPORTED and not r.values


def test_reading_json():
    r = Decoder({LYWSD03_MAC: LYWSD03_KEY}).decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME)
    j = r.to_json()
    assert j["product_id"] == "0x055B" and j["error"] is None and j["values"] == {"humidity_pct": 46.7}
    j = Decoder().decode(LYWSD03_MAC, 0xFE95, LYWSD03_FRAME).to_json()
    assert j["error"]["code"] == "no_key"


def test_catalogue_lookup():
    info = by_product_id(0x055B)
    assert info is not None and info.model == "LYWSD03MMC"
    assert "temperature" in info.measures and info.stock_encrypted
    assert by_product_id(0xFFFE) is None


GOOD_ENTRY = """
[[device]]
product_id = 0x1234
model = "X"
name = "Test"
manufacturer = "Test"
measures = ["temperature"]
formats = ["mibeacon_v5_enc"]
stock_encrypted = true
"""


def test_catalogue_validator_accepts_a_good_entry():
    assert load_catalogue(GOOD_ENTRY)[0x1234].model == "X"


@pytest.mark.parametrize(
    "change",
    [
        ('formats = ["mibeacon_v5_enc"]', 'formats = ["mibeacon_v9"]'),
        ('measures = ["temperature"]', 'measures = ["warmth"]'),
        ("product_id = 0x1234", "product_id = 0x12345"),
        ("product_id = 0x1234", 'product_id = "0x1234"'),
        ('model = "X"\n', ""),
        ("stock_encrypted = true", 'stock_encrypted = "yes"'),
        ("stock_encrypted = true", "stock_encrypted = true\ncolour = 1"),
    ],
)
def test_catalogue_validator_rejects_bad_entries(change):
    with pytest.raises(CatalogueError):
        load_catalogue(GOOD_ENTRY.replace(*change))


def test_catalogue_validator_rejects_duplicate_ids():
    with pytest.raises(CatalogueError):
        load_catalogue(GOOD_ENTRY + GOOD_ENTRY)

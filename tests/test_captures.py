from __future__ import annotations

import io
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mitherm.captures as captures_module
from mitherm.captures import (
    CaptureError,
    JsonlWriter,
    _adv_from_json,
    _write_jsonl_line_json,
    build_ad_structures,
    build_le_adv_report,
    parse_ad_structures,
    parse_hci_event,
    read_btsnoop,
    read_capture,
    read_jsonl,
    write_btsnoop,
    write_jsonl_line,
)
from mitherm.model import Advertisement
from mitherm.sources.capture_source import CaptureSource

MAC = "A4:C1:38:12:34:56"
MAC_LE = bytes.fromhex("56341238c1a4")
# pvvx custom-format service data payload (after the 0x181A UUID): 15 bytes
PVVX = bytes.fromhex("56341238c1a4e4084b130c0b550f04")
# 2000-01-01T00:00:00Z in btsnoop's clock (µs since year 0), as BlueZ defines it
Y2K_US = 0x00E03AB44A676000
Y2K_UNIX = 946684800


# ------------------------------------------------------------------ AD structures


def test_parse_ad_structures_basic() -> None:
    data = (
        bytes([2, 0x01, 0x06])
        + bytes([len(PVVX) + 3, 0x16, 0x1A, 0x18])
        + PVVX
        + bytes([5, 0xFF, 0x8F, 0x03, 0xAA, 0xBB])
        + bytes([5, 0x08, *b"ATC_"])
        + bytes([11, 0x09, *b"ATC_123456"])
    )
    service, manufacturer, name = parse_ad_structures(data)
    assert service == {0x181A: PVVX}
    assert manufacturer == {0x038F: b"\xaa\xbb"}
    assert name == "ATC_123456"  # complete name wins over the short one


def test_parse_ad_short_name_only_and_trailing_nul() -> None:
    _, _, name = parse_ad_structures(bytes([5, 0x08, *b"LYW\0"]))
    assert name == "LYW"


def test_parse_ad_32_and_128_bit_service_data() -> None:
    uuid128_le = bytes.fromhex("fb349b5f8000008000100000") + bytes([0x95, 0xFE, 0, 0])
    not_base = bytes(range(16))
    data = (
        bytes([4 + 1 + 2, 0x20, 0xD2, 0xFC, 0, 0, 0x40, 0x01])
        + bytes([1 + 16 + 3, 0x21, *uuid128_le, 1, 2, 3])
        + bytes([1 + 16 + 1, 0x21, *not_base, 9])
        + bytes([7, 0x20, 1, 0, 1, 0, 5, 5])  # 32-bit UUID 0x00010001 does not map to 16 bits
    )
    service, _, _ = parse_ad_structures(data)
    assert service == {0xFCD2: b"\x40\x01", 0xFE95: b"\x01\x02\x03"}


def test_parse_ad_truncated_and_padding() -> None:
    data = bytes([0, 0]) + bytes([4, 0x16, 0x95, 0xFE, 0x30]) + bytes([0]) + bytes([9, 0xFF, 0x01])
    service, manufacturer, name = parse_ad_structures(data)
    assert service == {0xFE95: b"\x30"}
    assert manufacturer == {}
    assert name is None
    assert parse_ad_structures(b"") == ({}, {}, None)
    assert parse_ad_structures(bytes([2, 0x16, 0x95])) == ({}, {}, None)  # too short for a UUID


def test_build_ad_structures_inverse() -> None:
    ad = build_ad_structures({0x181A: PVVX}, {0x038F: b"\x01"}, name="ATC_123456")
    assert ad[:3] == bytes([2, 1, 6])
    assert ad[3:7] == bytes([len(PVVX) + 3, 0x16, 0x1A, 0x18])
    assert parse_ad_structures(ad) == ({0x181A: PVVX}, {0x038F: b"\x01"}, "ATC_123456")
    assert build_ad_structures({0xFE95: b""}, flags=None) == bytes([3, 0x16, 0x95, 0xFE])
    with pytest.raises(ValueError, match="too long"):
        build_ad_structures({0xFE95: bytes(300)})


# ------------------------------------------------------------------ HCI events


def legacy_event(addr_le: bytes, addr_type: int, ad: bytes, rssi: int) -> bytes:
    params = bytes([0x02, 1, 0x00, addr_type]) + addr_le + bytes([len(ad)]) + ad + struct.pack("b", rssi)
    return bytes([0x3E, len(params)]) + params


def extended_event(addr_le: bytes, addr_type: int, ad: bytes, rssi: int) -> bytes:
    report = (
        struct.pack("<HB", 0x0010, addr_type)
        + addr_le
        + bytes([1, 0, 0xFF, 0x7F])
        + struct.pack("b", rssi)
        + struct.pack("<H", 0)
        + bytes([0])
        + bytes(6)
        + bytes([len(ad)])
        + ad
    )
    params = bytes([0x0D, 1]) + report
    return bytes([0x3E, len(params)]) + params


AD = bytes([2, 1, 6, len(PVVX) + 3, 0x16, 0x1A, 0x18]) + PVVX


def test_parse_legacy_report() -> None:
    (adv,) = parse_hci_event(legacy_event(MAC_LE, 0, AD, -70), 12.5, "hci0")
    assert adv == Advertisement(
        mac=MAC,
        time=12.5,
        service_data={0x181A: PVVX},
        rssi=-70,
        name=None,
        address_type="public",
        source="hci0",
    )


def test_parse_legacy_report_from_hex() -> None:
    # one ADV_NONCONN_IND from a random address, rssi -89 (0xA7), written out byte by byte
    packet = bytes.fromhex("3e 12 02 01 03 01 06 05 04 03 02 01 06 05 16 95 fe 30 58 a7".replace(" ", ""))
    (adv,) = parse_hci_event(packet, 0.0)
    assert adv.mac == "01:02:03:04:05:06"
    assert adv.address_type == "random"
    assert adv.rssi == -89
    assert adv.service_data == {0xFE95: b"\x30\x58"}


def test_parse_extended_report() -> None:
    long_payload = bytes(range(60))
    ad = bytes([len(long_payload) + 3, 0x16, 0xD2, 0xFC]) + long_payload
    (adv,) = parse_hci_event(extended_event(MAC_LE, 3, ad, -55), 1.0, "x")
    assert adv.mac == MAC
    assert adv.address_type == "random"
    assert adv.rssi == -55
    assert adv.service_data == {0xFCD2: long_payload}


def test_parse_two_reports_and_address_types() -> None:
    e1 = legacy_event(MAC_LE, 2, AD, 127)
    e2 = legacy_event(bytes(6), 1, b"", -1)
    params = bytes([0x02, 2]) + e1[4:] + e2[4:]
    advs = parse_hci_event(bytes([0x3E, len(params)]) + params, 0.0)
    assert [(a.mac, a.address_type, a.rssi) for a in advs] == [
        (MAC, "public", None),
        ("00:00:00:00:00:00", "random", -1),
    ]


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x3e",
        bytes.fromhex("0e0401030c00"),  # command complete
        bytes.fromhex("3e0c0100"),  # connection complete subevent, short
        legacy_event(MAC_LE, 0, AD, -70)[:-1],  # rssi cut off
        legacy_event(MAC_LE, 0, AD, -70)[:12],  # report header cut off
        extended_event(MAC_LE, 0, AD, -70)[:20],
        bytes([0x3E, 3, 0x02, 1, 0]),  # claims a report that is not there
    ],
)
def test_parse_hci_event_rejects_without_raising(packet: bytes) -> None:
    assert parse_hci_event(packet, 0.0) == []


def test_build_le_adv_report_matches_hand_built() -> None:
    assert build_le_adv_report(MAC, AD, -70) == legacy_event(MAC_LE, 0, AD, -70)
    ext = build_le_adv_report(MAC, AD, -70, address_type="random", extended=True)
    (adv,) = parse_hci_event(ext, 0.0)
    assert (adv.address_type, adv.rssi, adv.service_data) == ("random", -70, {0x181A: PVVX})
    assert ext[2] == 0x0D
    with pytest.raises(ValueError):
        build_le_adv_report(MAC, bytes(32), -70)
    with pytest.raises(ValueError):
        build_le_adv_report(MAC, AD, -70, address_type="static")


# ------------------------------------------------------------------ btsnoop, built by hand


def btsnoop(datalink: int, records: list[tuple[int, int, bytes]]) -> bytes:
    out = b"btsnoop\0" + struct.pack(">II", 1, datalink)
    for flags, ts, data in records:
        out += struct.pack(">IIIIq", len(data), len(data), flags, 0, ts) + data
    return out


EXT_AD = bytes([43, 0x16, 0x95, 0xFE]) + bytes(range(40))
LEGACY = legacy_event(MAC_LE, 0, AD, -70)
EXTENDED = extended_event(bytes.fromhex("0102030405a4"), 1, EXT_AD, -80)


def test_read_btsnoop_h4_by_hand(tmp_path) -> None:
    raw = btsnoop(
        1002,
        [
            (2, Y2K_US, bytes.fromhex("01030c00")),  # HCI Reset command (sent)
            (3, Y2K_US + 500_000, b"\x04" + LEGACY),
            (0, Y2K_US + 600_000, bytes.fromhex("0201200500010000000000")),  # ACL
            (3, Y2K_US + 700_000, b"\x04" + bytes.fromhex("0e0401030c00")),  # command complete
            (3, Y2K_US + 1_000_001, b"\x04" + EXTENDED),
        ],
    )
    p = tmp_path / "btsnoop_hci.log"
    p.write_bytes(raw)
    advs = list(read_btsnoop(p))
    assert [a.time for a in advs] == [Y2K_UNIX + 0.5, Y2K_UNIX + 1.000001]
    assert advs[0].mac == MAC and advs[0].rssi == -70 and advs[0].service_data == {0x181A: PVVX}
    assert advs[1].mac == "A4:05:04:03:02:01"
    assert advs[1].address_type == "random"
    assert advs[1].rssi == -80
    assert advs[1].service_data == {0xFE95: bytes(range(40))}
    assert {a.source for a in advs} == {"btsnoop_hci.log"}


def test_read_btsnoop_monitor_by_hand(tmp_path) -> None:
    raw = btsnoop(
        2001,
        [
            (0, Y2K_US, bytes(16)),  # new index
            ((1 << 16) | 2, Y2K_US, bytes.fromhex("030c00")),  # command on hci1
            ((1 << 16) | 3, Y2K_US + 1, LEGACY),
            ((1 << 16) | 12, Y2K_US + 2, b"note\0"),  # system note
            (3, Y2K_US + 3, EXTENDED),
        ],
    )
    advs = list(read_btsnoop(io.BytesIO(raw), source="btmon"))
    assert [(a.mac, a.rssi, round((a.time - Y2K_UNIX) * 1e6)) for a in advs] == [
        (MAC, -70, 1),
        ("A4:05:04:03:02:01", -80, 3),
    ]
    assert advs[0].source == "btmon"


def test_read_btsnoop_unencapsulated_by_hand() -> None:
    raw = btsnoop(1001, [(2, Y2K_US, LEGACY), (3, Y2K_US + 5, LEGACY), (1, Y2K_US, LEGACY)])
    advs = list(read_btsnoop(io.BytesIO(raw)))
    assert len(advs) == 1 and advs[0].time == Y2K_UNIX + 0.000005


def test_read_btsnoop_truncated_tail_stops_cleanly(tmp_path) -> None:
    raw = btsnoop(1002, [(3, Y2K_US, b"\x04" + LEGACY), (3, Y2K_US, b"\x04" + LEGACY)])
    first_end = 16 + 24 + 1 + len(LEGACY)
    for end in (first_end + 5, first_end + 24, first_end + 30, len(raw) - 1):  # header / data cut
        p = tmp_path / f"cut{end}.log"
        p.write_bytes(raw[:end])
        assert len(list(read_btsnoop(p))) == 1
    assert len(list(read_btsnoop(io.BytesIO(raw)))) == 2


def test_read_btsnoop_wrong_magic(tmp_path) -> None:
    p = tmp_path / "notes.txt"
    p.write_bytes(b"hello world, not a capture")
    with pytest.raises(CaptureError, match=r"notes\.txt is not a btsnoop file.*btsnoop"):
        read_btsnoop(p)
    p.write_bytes(b"btsnoop\0" + struct.pack(">II", 1, 1003))
    with pytest.raises(CaptureError, match="unsupported btsnoop datalink 1003"):
        read_btsnoop(p)


# ------------------------------------------------------------------ round trips

names = st.none() | st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=10
)
macs = st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":").upper())


@st.composite
def advertisements(draw, source: str = "cap", micro: bool = True) -> Advertisement:
    time = draw(st.integers(0, 4_102_444_800_000_000)) / 1_000_000 if micro else draw(st.floats(0, 4e9))
    return Advertisement(
        mac=draw(macs),
        time=time,
        service_data=draw(st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=40), max_size=3)),
        rssi=draw(st.none() | st.integers(-128, 126)),
        name=draw(names),
        address_type=draw(st.sampled_from(["public", "random"])),
        manufacturer_data=draw(st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=20), max_size=2)),
        source=source,
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(advs=st.lists(advertisements(), max_size=6), datalink=st.sampled_from([1001, 1002, 2001]))
def test_btsnoop_round_trip(advs: list[Advertisement], datalink: int) -> None:
    buf = io.BytesIO()
    assert write_btsnoop(buf, advs, datalink=datalink) == len(advs)
    buf.seek(0)
    assert list(read_btsnoop(buf, source="cap")) == advs


def test_write_btsnoop_uses_extended_for_long_data(tmp_path) -> None:
    short = Advertisement(mac=MAC, time=1.0, service_data={0x181A: PVVX}, rssi=-1, address_type="public")
    long = Advertisement(mac=MAC, time=2.0, service_data={0xFE95: bytes(100)}, rssi=-2, address_type="random")
    p = tmp_path / "w.btsnoop"
    write_btsnoop(p, [short, long], datalink=2001)
    raw = p.read_bytes()
    assert raw[:16] == b"btsnoop\0" + struct.pack(">II", 1, 2001)
    first_len = struct.unpack(">I", raw[16:20])[0]
    assert raw[16 + 24 + 2] == 0x02  # legacy subevent
    second = 16 + 24 + first_len
    assert raw[second + 24 + 2] == 0x0D  # extended subevent
    assert [a.source for a in read_capture(p)] == ["w.btsnoop", "w.btsnoop"]


@settings(max_examples=150)
@given(
    advs=st.lists(
        advertisements(source="hci0", micro=False).map(
            lambda a: Advertisement(**{**{f: getattr(a, f) for f in a.__slots__}, "address_type": None})
        )
        | advertisements(source="proxy-1", micro=False),
        max_size=5,
    )
)
def test_jsonl_round_trip(advs: list[Advertisement]) -> None:
    text = "".join(write_jsonl_line(a) + "\n" for a in advs)
    assert list(read_jsonl(io.StringIO(text))) == advs
    assert list(read_jsonl(io.BytesIO(text.encode()))) == advs


# ------------------------------------------------------------------ JSON Lines


def test_write_jsonl_line_format() -> None:
    adv = Advertisement(
        mac=MAC,
        time=1718000000.25,
        service_data={0xFE95: b"\x30\x58"},
        rssi=-60,
        name="LYWSD03MMC",
        address_type="public",
        manufacturer_data={0x038F: b"\x01"},
        source="hci0",
    )
    line = write_jsonl_line(adv)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": 1718000000.25,
        "mac": MAC,
        "address_type": "public",
        "rssi": -60,
        "name": "LYWSD03MMC",
        "service_data": {"fe95": "3058"},
        "manufacturer_data": {"911": "01"},
        "source": "hci0",
    }


def test_read_jsonl_key_spellings_and_blank_lines(tmp_path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps({"time": 1, "mac": "a4c138123456", "service_data": {"0xFE95": "30"}}),
                "",
                "   ",
                json.dumps({"time": 2.5, "mac": MAC, "service_data": {"FCD2": "40"}, "rssi": -3}),
                json.dumps(
                    {
                        "time": 3,
                        "mac": "A4-C1-38-12-34-56",
                        "service_data": {"0000181a-0000-1000-8000-00805f9b34fb": "aa"},
                        "manufacturer_data": {"0x038f": "01", "76": "02"},
                        "source": "esp",
                    }
                ),
            ]
        )
        + "\n"
    )
    advs = list(read_jsonl(p))
    assert [a.service_data for a in advs] == [{0xFE95: b"\x30"}, {0xFCD2: b"\x40"}, {0x181A: b"\xaa"}]
    assert {a.mac for a in advs} == {MAC}
    assert advs[1].rssi == -3 and advs[0].rssi is None
    assert advs[2].manufacturer_data == {0x038F: b"\x01", 76: b"\x02"}
    assert advs[2].source == "esp"
    assert [a.time for a in advs] == [1.0, 2.5, 3.0]
    assert [a.source for a in read_jsonl(p, source="override")] == ["override"] * 3


def test_read_jsonl_bad_line(tmp_path) -> None:
    good = json.dumps({"time": 1, "mac": MAC})
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{good}\n\n{{not json\n{good}\n" + json.dumps({"time": 1, "mac": "zz"}) + "\n")
    with pytest.raises(CaptureError, match=r"bad\.jsonl:3:"):
        list(read_jsonl(p))
    assert len(list(read_jsonl(p, errors="skip"))) == 2
    for bad in (
        {"mac": MAC},
        {"time": "1", "mac": MAC},
        {"time": 1, "mac": MAC, "service_data": {"fe95": "xyz"}},
        {"time": 1, "mac": MAC, "service_data": {"12345": "00"}},
        {"time": 1, "mac": MAC, "address_type": "static"},
    ):
        with pytest.raises(CaptureError, match=":1:"):
            list(read_jsonl(io.StringIO(json.dumps(bad))))


def test_jsonl_writer_appends_and_flushes(tmp_path) -> None:
    p = tmp_path / "sub" / "live.jsonl"
    a = Advertisement(mac=MAC, time=1.5, service_data={0x181A: PVVX}, rssi=-1, source="s")
    with JsonlWriter(p) as w:
        w.write(a)
        assert list(read_jsonl(p)) == [a]  # visible before close
        w.write(a)
    with JsonlWriter(p) as w:
        w.write(a)
    assert list(read_capture(p)) == [a, a, a]
    assert w.count == 1


# ------------------------------------------------------------------ sniffing


def test_read_capture_dispatch_and_errors(tmp_path) -> None:
    snoop = tmp_path / "a.log"
    snoop.write_bytes(btsnoop(1002, [(3, Y2K_US, b"\x04" + LEGACY)]))
    (adv,) = read_capture(snoop, source="phone")
    assert (adv.mac, adv.source, adv.time) == (MAC, "phone", float(Y2K_UNIX))

    jl = tmp_path / "b.jsonl"
    jl.write_text("\n" + json.dumps({"time": 1, "mac": MAC}) + "\n")
    assert [a.mac for a in read_capture(jl)] == [MAC]

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert list(read_capture(empty)) == []

    junk = tmp_path / "junk.pcap"
    junk.write_bytes(bytes.fromhex("d4c3b2a1020004000000"))
    with pytest.raises(
        CaptureError,
        match=r"junk\.pcap is not a btsnoop or mitherm JSON Lines capture: "
        r"first bytes d4 c3 b2 a1",
    ):
        read_capture(junk)
    with pytest.raises(CaptureError, match="cannot open capture"):
        read_capture(tmp_path / "missing.log")


# ------------------------------------------------------------------ the fast JSON Lines paths

any_text = st.text(max_size=12)  # quotes, backslashes, control characters, non-ASCII, lone surrogates
json_floats = st.floats(allow_nan=False) | st.integers(0, 4_102_444_800_000_000).map(lambda us: us / 1_000_000)


@st.composite
def any_advertisements(draw) -> Advertisement:
    """Field values of every kind a source may hand over, not only what mitherm's own sources make."""
    return Advertisement(
        mac=draw(macs | macs.map(str.lower)),
        time=draw(json_floats),
        service_data=draw(st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=24), max_size=3)),
        rssi=draw(st.none() | st.integers(-128, 127) | st.integers(-(10**6), 10**6)),
        name=draw(st.none() | any_text),
        address_type=draw(st.sampled_from([None, "public", "random"])),
        manufacturer_data=draw(st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=12), max_size=2)),
        source=draw(any_text),
    )


class NamedStringIO(io.StringIO):
    name = "cap.jsonl"


def validating(text: str, **kw) -> list[Advertisement]:
    """A text stream takes the validating path only (json per line)."""
    return list(read_jsonl(NamedStringIO(text), **kw))


def fast(text: str, **kw) -> list[Advertisement]:
    f = io.BytesIO(text.encode("utf-8", errors="surrogatepass"))
    f.name = "cap.jsonl"
    return list(read_jsonl(f, **kw))


def same(a: list[Advertisement], b: list[Advertisement]) -> bool:
    return [repr(x) for x in a] == [repr(x) for x in b]  # repr: -0.0 vs 0.0 and the float's exact digits


def surrogate_free(adv: Advertisement) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in (adv.name or "") + adv.source)


@settings(max_examples=300)
@given(advs=st.lists(any_advertisements().filter(surrogate_free), min_size=1, max_size=6))
def test_fast_reader_equals_the_validating_path(advs: list[Advertisement]) -> None:
    lines = [write_jsonl_line(a) for a in advs]
    text = "".join(line + "\n" for line in lines * 2)  # the second sighting takes the cached pieces
    expected = [_adv_from_json(json.loads(line), None) for line in lines] * 2
    assert same(validating(text), expected)
    assert same(fast(text), expected)
    assert same(fast(text, source="over"), validating(text, source="over"))
    assert same(fast(text, default_source="dflt"), validating(text, default_source="dflt"))


def test_fast_reader_takes_the_fast_path(monkeypatch) -> None:
    lines = [
        write_jsonl_line(Advertisement(MAC, 1718000000.0 + i / 64, {0xFE95: bytes([i]) * 12}, -60 - i, "LYWSD03MMC"))
        for i in range(50)
    ]
    lines[1::2] = [line.replace(MAC, "A4:C1:38:00:00:01") for line in lines[1::2]]
    expected = validating("\n".join(lines))
    decoded = []
    real = captures_module._RAW_DECODE
    monkeypatch.setattr(captures_module, "_RAW_DECODE", lambda text: decoded.append(text) or real(text))
    assert same(fast("".join(line + "\n" for line in lines)), expected)
    assert len(decoded) <= 2  # the first line of each device teaches the pieces; the rest go without json


@settings(max_examples=300)
@given(
    head=st.integers(0, 10**16 - 1) | st.integers(0, 10),
    frac=st.text(alphabet="0123456789", min_size=1, max_size=19),
)
def test_fast_reader_time_is_the_json_float(head: int, frac: str) -> None:
    line = write_jsonl_line(Advertisement(MAC, 1.5, {0x181A: b"\x01"}, -1)).replace(
        '"time":1.5', f'"time":{head}.{frac}'
    )
    (a, b) = fast(line + "\n" + line + "\n")
    assert repr(a.time) == repr(b.time) == repr(json.loads(line)["time"])


NON_CANONICAL = [
    '{"time": 1718000000.5, "mac": "A4:C1:38:12:34:56", "service_data": {"fe95": "3058"}}',  # spaces
    '{"mac":"A4:C1:38:12:34:56","time":1718000000.5,"service_data":{"fe95":"3058"}}',  # key order
    '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":"a\\"b\\\\c\\u00e9",'
    '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"hci0"}',  # escapes in the name
    '{"time":1718000000,"mac":"a4c138123456","address_type":null,"rssi":null,"name":null,'
    '"service_data":{"0xFE95":"30 58","181a":""},"manufacturer_data":{"0x038f":"01","76":"02"},"source":null}',
    '{"time":1.5e-05,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
    '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s","extra":1}',
    '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
    '"service_data":{"fe95":"01","181a":"02","FE95":"03","fe95":"04"},"manufacturer_data":{},"source":"s"}',
    '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":"x",'
    '"service_data":{},"manufacturer_data":{"911":"0102"},"source":"s"}',
]


@pytest.mark.parametrize("odd", NON_CANONICAL)
def test_non_canonical_line_in_the_middle_of_a_file(odd: str, monkeypatch) -> None:
    monkeypatch.setattr(captures_module, "_CHUNK", 97)  # many chunks, lines across their boundaries
    good = [
        write_jsonl_line(Advertisement(MAC, 1718000000.25 + i, {0xFE95: b"\x30\x58"}, -70, source="p"))
        for i in range(6)
    ]
    # twice in the middle (the second time from cached pieces), and last with CRLF
    text = "\n".join([*good[:3], odd, *good[3:5], odd, good[5], odd]) + "\r\n"
    advs = fast(text)
    assert len(advs) == 9
    assert same(advs, validating(text))
    assert same([advs[3], advs[6], advs[8]], [_adv_from_json(json.loads(odd), None)] * 3)


@pytest.mark.parametrize(
    "bad",
    [
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:5G","address_type":"public","rssi":-60,"name":null,'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"static","rssi":-60,"name":null,'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
        '"service_data":{"fe95":"305"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
        '"service_data":{"12345":"3058"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-6.5,"name":null,'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{"70000":"01"},"source":"s"}',
        '{"time":01718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":"\x01",'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s"}',
        '{"time":1718000000.5,"mac":"A4:C1:38:12:34:56","address_type":"public","rssi":-60,"name":null,'
        '"service_data":{"fe95":"3058"},"manufacturer_data":{},"source":"s"} x',
        '{"time":' + "9" * 400 + ',"mac":"A4:C1:38:12:34:56"}',  # was an OverflowError traceback
        "{not json",
    ],
)
def test_bad_line_error_names_file_and_line(bad: str, monkeypatch) -> None:
    monkeypatch.setattr(captures_module, "_CHUNK", 128)
    good = write_jsonl_line(Advertisement(MAC, 1718000000.5, {0xFE95: b"\x30\x58"}, -60, source="s"))
    text = "\n".join([good] * 5 + ["", bad, good, bad]) + "\n"
    with pytest.raises(CaptureError) as fast_error:
        fast(text)
    with pytest.raises(CaptureError) as slow_error:
        validating(text)
    assert str(fast_error.value) == str(slow_error.value)
    assert str(fast_error.value).startswith("cap.jsonl:7: not a mitherm capture record: ")
    assert type(fast_error.value.__cause__) is type(slow_error.value.__cause__)
    assert same(fast(text, errors="skip"), validating(text, errors="skip"))
    assert len(fast(text, errors="skip")) == 6


def test_bad_utf8_is_reported_like_before(tmp_path) -> None:
    good = write_jsonl_line(Advertisement(MAC, 1.5, {0xFE95: b"\x30"}, -60, "ATC", source="s")).encode()
    p = tmp_path / "u.jsonl"
    p.write_bytes(b"\n".join([good, good, good.replace(b"ATC", b"AT\xff"), good]) + b"\n")
    with pytest.raises(CaptureError, match=r"u\.jsonl:3: not a mitherm capture record: 'utf-8' codec"):
        list(read_capture(p))


def test_reader_from_a_trickling_stream() -> None:
    """A pipe (``capture:-``) hands over what it has: lines arrive in pieces, one may be longer than a chunk."""
    advs = [
        Advertisement(MAC, 1718000000.5 + i, {0xFE95: bytes(range(i % 7))}, -50, "n" * (i * 40), source="s")
        for i in range(40)
    ]
    data = "".join(write_jsonl_line(a) + "\n" for a in advs).encode()

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            n = min(len(b), 1 + self.pos % 53, len(data) - self.pos)
            b[:n] = data[self.pos : self.pos + n]
            self.pos += n
            return n

    assert list(read_jsonl(io.BufferedReader(Pipe(), buffer_size=64))) == advs


def test_default_source_names_the_records_without_one(tmp_path) -> None:
    p = tmp_path / "c.jsonl"
    own = Advertisement(MAC, 1.5, {0xFE95: b"\x30"}, -60, source="proxy0")
    none = Advertisement(MAC, 2.5, {0xFE95: b"\x30"}, -60, source="")
    lines = [write_jsonl_line(a) for a in (own, none, own, none)]
    lines.append(json.dumps({"time": 3.5, "mac": MAC, "source": None}))
    lines.append(json.dumps({"time": 4.5, "mac": MAC}))
    p.write_text("\n".join(lines) + "\n")
    assert [a.source for a in read_capture(p, default_source="capture:c.jsonl")] == [
        "proxy0",
        "capture:c.jsonl",
        "proxy0",
        "capture:c.jsonl",
        "capture:c.jsonl",
        "capture:c.jsonl",
    ]
    assert [a.source for a in read_capture(p)] == ["proxy0", "", "proxy0", "", "", ""]
    assert {a.source for a in read_capture(p, source="o", default_source="d")} == {"o"}
    snoop = tmp_path / "s.log"
    write_btsnoop(snoop, [own])
    assert [a.source for a in read_capture(snoop, default_source="d")] == ["s.log"]


async def test_capture_source_keeps_receivers_and_names_the_rest(tmp_path) -> None:
    p = tmp_path / "c.jsonl"
    advs = [Advertisement(MAC, 1.5 + i, {0xFE95: b"\x30"}, -60, source="proxy0" if i % 3 else "") for i in range(4500)]
    p.write_text("".join(write_jsonl_line(a) + "\n" for a in advs))
    got: list[Advertisement] = []
    await CaptureSource(str(p)).run(got.append)
    assert [a.source for a in got] == [a.source or "capture:c.jsonl" for a in advs]
    assert [a.time for a in got] == [a.time for a in advs]


# ------------------------------------------------------------------ the fast JSON Lines writer


class Color(int):
    pass


odd_values = st.sampled_from([True, False, 1.0, Color(3), "x", None, b"\x01", bytearray(b"\x02"), memoryview(b"\x03")])


@st.composite
def odd_advertisements(draw) -> Advertisement:
    """Mostly ordinary records, with here and there a value of another type than annotated."""
    adv = draw(any_advertisements())
    fields = {f: getattr(adv, f) for f in adv.__slots__}
    if draw(st.booleans()):
        fields["time"] = draw(st.floats() | st.integers(-(10**20), 10**20) | odd_values)
    if draw(st.booleans()):
        field = draw(st.sampled_from(["mac", "rssi", "name", "address_type", "source"]))
        fields[field] = draw(odd_values | any_text)
    if draw(st.booleans()):
        key = draw(st.integers(0, 0xFFFF) | odd_values.filter(lambda v: v.__hash__ is not None))
        which = draw(st.sampled_from(["service_data", "manufacturer_data"]))
        fields[which] = {**fields[which], key: draw(odd_values | st.binary(max_size=4))}
    return Advertisement(**fields)


def outcome(fn, adv: Advertisement) -> object:
    try:
        return fn(adv)
    except Exception as e:  # the same error too
        return type(e), str(e)


@settings(max_examples=500)
@given(adv=any_advertisements() | odd_advertisements())
def test_writer_is_byte_identical_to_json_dumps(adv: Advertisement) -> None:
    assert outcome(write_jsonl_line, adv) == outcome(_write_jsonl_line_json, adv)
    assert outcome(write_jsonl_line, adv) == outcome(_write_jsonl_line_json, adv)  # from the cached pieces


@pytest.mark.parametrize("t", [float("nan"), float("inf"), float("-inf"), -0.0, 1e16, 1e-7, 1718000000.0, 5])
def test_writer_special_times(t: float) -> None:
    adv = Advertisement(MAC, t, {0xFE95: b"\x30"}, -60, 'q"\\\n\x00é\u2028', source="s")
    assert write_jsonl_line(adv) == write_jsonl_line(adv) == _write_jsonl_line_json(adv)


# ------------------------------------------------------------------ btsnoop: the one-report path


def reference_btsnoop(raw: bytes, datalink: int, source: str) -> list[Advertisement]:
    """The btsnoop layout read record by record, each event through parse_hci_event."""
    out = []
    pos = 16
    while pos + 24 <= len(raw):
        _orig, incl, flags, _drops, ts = struct.unpack_from(">IIIIq", raw, pos)
        data = raw[pos + 24 : pos + 24 + incl]
        if len(data) < incl:
            break
        pos += 24 + incl
        if datalink == 1002:
            if not data or data[0] != 4:
                continue
            data = data[1:]
        elif (datalink == 2001 and flags & 0xFFFF != 3) or (datalink == 1001 and flags & 3 != 3):
            continue
        out.extend(parse_hci_event(data, (ts - 0x00DCDDB30F2F8000) / 1_000_000, source))
    return out


@settings(max_examples=300)
@given(
    advs=st.lists(advertisements(), min_size=1, max_size=4),
    datalink=st.sampled_from([1001, 1002, 2001]),
    edits=st.lists(st.tuples(st.integers(16, 10**6), st.integers(0, 255), st.booleans()), max_size=3),
    cut=st.integers(0, 40),
)
def test_btsnoop_reader_equals_parse_hci_event(advs, datalink, edits, cut) -> None:
    buf = io.BytesIO()
    write_btsnoop(buf, advs, datalink=datalink)
    raw = bytearray(buf.getvalue())
    for at, value, delete in edits:  # damaged bytes: lengths, counts, subevents …
        at = 16 + at % (len(raw) - 16)
        if delete:
            del raw[at]
        else:
            raw[at] = value
    raw = bytes(raw[: len(raw) - cut])
    assert list(read_btsnoop(io.BytesIO(raw), source="x")) == reference_btsnoop(raw, datalink, "x")


SHORT_PARAMS = bytes([LEGACY[0], LEGACY[1] - 1]) + LEGACY[2:]  # claims one byte less: the rssi is outside
LONG_PARAMS = bytes([LEGACY[0], LEGACY[1] + 1]) + LEGACY[2:]  # claims one byte more than the record has
LONG_DATA = LEGACY[:12] + bytes([LEGACY[12] + 1]) + LEGACY[13:]  # data length reaching over the rssi


@pytest.mark.parametrize(
    "event",
    [LEGACY, SHORT_PARAMS, LONG_PARAMS, LONG_DATA, LEGACY[:13], LEGACY[:12], LEGACY + b"\x00\x00", EXTENDED],
)
@pytest.mark.parametrize("datalink", [1001, 1002, 2001])
def test_btsnoop_malformed_events_like_parse_hci_event(event: bytes, datalink: int) -> None:
    data = b"\x04" + event if datalink == 1002 else event
    raw = btsnoop(datalink, [(3, Y2K_US, data), (3, Y2K_US + 1, b"\x04" + LEGACY if datalink == 1002 else LEGACY)])
    assert list(read_btsnoop(io.BytesIO(raw), source="x")) == reference_btsnoop(raw, datalink, "x")
    assert len(reference_btsnoop(raw, datalink, "x")) == 1 + (event in (LEGACY, LEGACY + b"\x00\x00", EXTENDED))

"""The key doctor: every verdict, the order they are decided in, real frames, and the CLI.

Frame sequences are built with mitherm's own encoders by the small builders below: a stock
LYWSD03MMC (idle MiBeacon frames between encrypted readings), a re-keyed sensor, pvvx / atc1441 /
BTHome custom firmware, a legacy v3 device with a 12-byte key, and noisy reception."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from mitherm import captures
from mitherm.bindkey import parse_bindkey
from mitherm.cli import main
from mitherm.doctor import Diagnosis, Verdict, diagnose
from mitherm.formats import atc1441, bthome, mibeacon, pvvx
from mitherm.framecache import Frame, FrameCache
from mitherm.mac import mac_to_le
from mitherm.model import Advertisement
from vectors import Vector, load_vectors

T0 = 1_700_000_000.0
STEP = 10.0  # seconds between two frames of one device

KEY_A = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
KEY_B = "b7e3c0a1d5f24e6a8c9b0d1e2f3a4b5c"
KEY_C = "5a5a5a5a00112233445566778899aabb"  # nobody's key
KEY12 = "a1b2c3d4e5f6a7b8c9d0e1f2"  # a legacy v2/v3 key (12 bytes)
KEY12_OTHER = "0badc0ffee0badc0ffee0bad"

MAC = "A4:C1:38:11:22:33"
MAC2 = "A4:C1:38:44:55:66"
MAC3 = "A4:C1:38:77:88:99"

DOCUMENTED_KEYS = {"mac", "verdict", "format", "model", "frames", "last_data_frame_time", "advice"}
FRAME_KEYS = {"total", "with_data", "decrypted", "failed"}

MIBEACON = 0xFE95
ENV_SENSING = 0x181A
BTHOME = 0xFCD2


# --------------------------------------------------------------------------------------------------
# builders


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _auth_mode_2(payload: bytes) -> bytes:
    """Set frame-control bit 11 (auth mode 2) as stock firmware does: 0x5830 idle, 0x5858 data frames.
    Neither the v5 nonce nor the AAD covers the frame control, so this is safe after encryption."""
    return bytes([payload[0], payload[1] | 0x08]) + payload[2:]


def stock_idle(mac: str, counter: int, product_id: int = 0x055B) -> bytes:
    """A stock idle frame: MiBeacon v5 with MAC and capability byte 0x08, no objects."""
    return _auth_mode_2(
        mibeacon.encode(mac_le=mac_to_le(mac), product_id=product_id, frame_counter=counter & 0xFF, capability=0x08)
    )


def _flip_ciphertext(payload: bytes, index: int) -> bytes:
    b = bytearray(payload)
    b[index] ^= 0x5A
    return bytes(b)


# stock firmware: temperature, humidity, battery objects in turn
_STOCK_OBJECTS = ((0x1004, 23.4), (0x1006, 45.6), (0x100A, 87))


def stock_lywsd03mmc(
    mac: str,
    keys: Sequence[str],
    *,
    idle_per_data: int = 3,
    start: float = T0,
    corrupt: Iterable[int] = (),
    product_id: int = 0x055B,
    name: str | None = "LYWSD03MMC",
) -> list[Frame]:
    """A stock sensor: ``idle_per_data`` idle frames (MiBeacon v5 with MAC, no objects), then one
    encrypted reading, repeated once per key in ``keys`` (the key that reading is encrypted with).
    ``corrupt`` lists data-frame indexes whose first ciphertext byte is flipped (bad reception)."""
    le = mac_to_le(mac)
    bad = set(corrupt)
    frames: list[Frame] = []
    t = start
    counter = 0x40
    for i, key in enumerate(keys):
        for _ in range(idle_per_data):
            payload = stock_idle(mac, counter, product_id)
            frames.append(Frame(t, mac, MIBEACON, payload, -71, name))
            t += STEP
            counter += 1
        oid, value = _STOCK_OBJECTS[i % 3]
        payload = _auth_mode_2(
            mibeacon.encode(
                mac_le=le,
                product_id=product_id,
                frame_counter=counter & 0xFF,
                objects=[mibeacon.encode_object(oid, value)],
                version=5,
                key=parse_bindkey(key),
                ext_counter=0x26 + i,
            )
        )
        if i in bad:
            payload = _flip_ciphertext(payload, 11)  # 11 = 5-byte header + 6-byte MAC
        frames.append(Frame(t, mac, MIBEACON, payload, -71, name))
        t += STEP
        counter += 1
    return frames


def idle_only(mac: str, count: int, start: float = T0) -> list[Frame]:
    """A stock LYWSD03MMC that has not sent an encrypted reading yet."""
    return [
        Frame(
            start + i * STEP,
            mac,
            MIBEACON,
            stock_idle(mac, i),
            -65,
            "LYWSD03MMC",
        )
        for i in range(count)
    ]


def legacy_v3(mac: str, key12: str, count: int, start: float = T0, product_id: int = 0x0387) -> list[Frame]:
    """MiBeacon v3 frames encrypted with a 12-byte legacy key."""
    le = mac_to_le(mac)
    k = parse_bindkey(key12)
    return [
        Frame(
            start + i * STEP,
            mac,
            MIBEACON,
            mibeacon.encode(
                mac_le=le,
                product_id=product_id,
                frame_counter=i,
                objects=[mibeacon.encode_object(0x1004, 21.0 + i / 10)],
                version=3,
                key=k,
                ext_counter=i,
            ),
            -60,
        )
        for i in range(count)
    ]


def pvvx_enc(mac: str, key: str, count: int, start: float = T0) -> list[Frame]:
    le = mac_to_le(mac)
    k = parse_bindkey(key)
    name = "ATC_" + mac.replace(":", "")[-6:]
    return [
        Frame(start + i * STEP, mac, ENV_SENSING, pvvx.encode_encrypted(le, k, 22.5 + i / 10, 48.0, 90, i), -58, name)
        for i in range(count)
    ]


def atc1441_enc(mac: str, key: str, count: int, start: float = T0) -> list[Frame]:
    le = mac_to_le(mac)
    k = parse_bindkey(key)
    return [
        Frame(start + i * STEP, mac, ENV_SENSING, atc1441.encode_encrypted(le, k, 22.5, 48.0, 90, i), -58, None)
        for i in range(count)
    ]


def pvvx_plain(mac: str, count: int, start: float = T0) -> list[Frame]:
    le = mac_to_le(mac)
    return [
        Frame(start + i * STEP, mac, ENV_SENSING, pvvx.encode_plain(le, 22.5, 48.0, 90, 2.95, i), -58, None)
        for i in range(count)
    ]


def atc1441_plain(mac: str, count: int, start: float = T0) -> list[Frame]:
    le = mac_to_le(mac)
    name = "ATC_" + mac.replace(":", "")[-6:]
    return [
        Frame(start + i * STEP, mac, ENV_SENSING, atc1441.encode_plain(le, 22.5, 48.0, 90, 2.95, i), -58, name)
        for i in range(count)
    ]


def bthome_v2_enc(mac: str, key: str, count: int, start: float = T0) -> list[Frame]:
    le = mac_to_le(mac)
    k = parse_bindkey(key)
    frames = []
    for i in range(count):
        objects = [bthome.encode_object(0x01, 90), bthome.encode_object(0x02, 22.5), bthome.encode_object(0x03, 48.0)]
        frames.append(
            Frame(
                start + i * STEP,
                mac,
                BTHOME,
                bthome.encode_v2(objects, mac_le=le, key=k, counter=i),
                -62,
                "BTHome sensor",
            )
        )
    return frames


def cache_of(*devices: Iterable[Frame]) -> FrameCache:
    """All frames of all devices, added in time order (interleaved as a receiver hears them)."""
    cache = FrameCache()
    for f in sorted((f for d in devices for f in d), key=lambda f: f.time):
        cache.add(f)
    return cache


def data_times(frames: Sequence[Frame], idle_per_data: int = 3) -> list[float]:
    return [f.time for f in frames[idle_per_data :: idle_per_data + 1]]


def counts(dx: Diagnosis) -> tuple[int, int, int, int]:
    f = dx.frames
    return f.total, f.with_data, f.decrypted, f.failed


def check_json(dx: Diagnosis) -> dict:
    d = json.loads(json.dumps(dx.to_json()))
    assert d.keys() >= DOCUMENTED_KEYS
    assert set(d["frames"]) == FRAME_KEYS
    assert d["verdict"] == dx.verdict.value
    assert d["mac"] == dx.mac
    return d


def test_builder_shapes_the_stock_sequence() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 4)
    assert len(frames) == 16
    assert [f.time for f in frames] == [T0 + i * STEP for i in range(16)]
    # idle frames carry no objects: frame control 0x5830 (v5, auth 2, capability, MAC);
    # data frames 0x5858 (v5, auth 2, objects, MAC, encrypted), like real stock frames
    assert {f.payload[:2] for f in frames[0::4]} == {bytes.fromhex("3058")}
    assert {f.payload[:2] for f in frames[3::4]} == {bytes.fromhex("5858")}


# --------------------------------------------------------------------------------------------------
# ok


def test_ok_stock_lywsd03mmc() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 6)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.OK and dx.ok
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (24, 6, 6, 0)
    assert dx.last_data_frame_time == frames[-1].time
    assert "6 of 6" in dx.advice
    assert "noisy" not in dx.advice
    d = check_json(dx)
    assert d["last_data_frame_time"] == _iso(frames[-1].time)
    assert d["frames"] == {"total": 24, "with_data": 6, "decrypted": 6, "failed": 0}


def test_ok_with_key_in_other_spellings() -> None:
    cache = cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 3))
    spaced = " ".join(KEY_A[i : i + 2] for i in range(0, 32, 2)).upper()
    for key in ("0x" + KEY_A, KEY_A.upper(), spaced, f"  {KEY_A}\n"):
        assert diagnose(cache, MAC, key).verdict is Verdict.OK, key


@pytest.mark.parametrize("mac", ["a4c138112233", "A4-C1-38-11-22-33", "a4:c1:38:11:22:33", "a4c1.3811.2233"])
def test_mac_spellings(mac: str) -> None:
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 3)), mac, KEY_A)
    assert dx.verdict is Verdict.OK
    assert dx.mac == MAC


@pytest.mark.parametrize("corrupt", [(7, 19), (12, 19), (3, 15)], ids=["old+newest", "recent+newest", "no-newest"])
def test_noisy_reception_is_still_ok(corrupt: tuple[int, int]) -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 20, idle_per_data=2, corrupt=corrupt)
    assert len(frames) == 60  # fits the cache's 64 frames per device
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.OK
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (60, 20, 18, 2)
    assert "noisy" in dx.advice
    assert "18 of 20" in dx.advice


def test_corrupted_frames_really_fail() -> None:
    """The corruption the noisy tests rely on: the flipped frame fails, its neighbours decrypt."""
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 3, corrupt=[1])
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert counts(dx) == (12, 3, 2, 1)


def test_ok_new_key_on_rekeyed_device() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 6 + [KEY_B] * 4)
    dx = diagnose(cache_of(frames), MAC, KEY_B)
    assert dx.verdict is Verdict.OK  # it decrypts the newest data frame
    assert counts(dx) == (40, 10, 4, 6)


def test_new_key_on_rekeyed_device_is_not_called_noisy() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 6 + [KEY_B] * 4)
    dx = diagnose(cache_of(frames), MAC, KEY_B)
    assert dx.verdict is Verdict.OK
    assert "noisy" not in dx.advice


def test_ok_pvvx_bthome_atc1441_encrypted() -> None:
    for frames, fmt in (
        (pvvx_enc(MAC, KEY_A, 5), "pvvx_enc"),
        (bthome_v2_enc(MAC, KEY_A, 5), "bthome_v2_enc"),
        (atc1441_enc(MAC, KEY_A, 5), "atc1441_enc"),
    ):
        dx = diagnose(cache_of(frames), MAC, KEY_A)
        assert (dx.verdict, dx.format, counts(dx)) == (Verdict.OK, fmt, (5, 5, 5, 0)), fmt


# --------------------------------------------------------------------------------------------------
# key_outdated


def test_key_outdated() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 5 + [KEY_B] * 5)
    first_new = data_times(frames)[5]
    assert frames[-1].time - first_new == 160.0
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.KEY_OUTDATED
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (40, 10, 5, 5)
    assert dx.new_key_since == first_new
    assert _iso(first_new) in dx.advice
    assert "3 min ago" in dx.advice
    assert "5 newest" in dx.advice
    d = check_json(dx)
    assert d["new_key_since"] == _iso(first_new)
    assert d["last_data_frame_time"] == _iso(frames[-1].time)


def test_key_outdated_needs_three_failures_after_the_last_success() -> None:
    # two newer frames fail, but 8 of the last ten decrypt: ok, not key_outdated
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 10 + [KEY_B] * 2)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.OK
    assert counts(dx) == (48, 12, 10, 2)


def test_key_outdated_exactly_three_new_frames_few_old() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 3 + [KEY_B] * 3)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.KEY_OUTDATED
    assert dx.new_key_since == data_times(frames)[3]


def test_two_failures_after_the_last_success_are_not_key_outdated() -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] + [KEY_B] * 2)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.WRONG_KEY
    assert counts(dx) == (12, 3, 1, 2)


def test_wrong_key_advice_does_not_claim_every_frame_failed_when_one_decrypted() -> None:
    """BUG: with 1 of 3 frames decrypted the advice says 'fails the integrity check on all 3 data frame(s)'."""
    frames = stock_lywsd03mmc(MAC, [KEY_A] + [KEY_B] * 2)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.WRONG_KEY
    assert "on all 3" not in dx.advice


@pytest.mark.parametrize(("old", "new"), [(10, 3), (6, 4)])
def test_key_outdated_few_new_frames_after_many_old(old: int, new: int) -> None:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * old + [KEY_B] * new, idle_per_data=2)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.KEY_OUTDATED


# --------------------------------------------------------------------------------------------------
# key_of_other_device / wrong_key


def test_key_of_other_device() -> None:
    mine = stock_lywsd03mmc(MAC, [KEY_A] * 5)
    other = stock_lywsd03mmc(MAC2, [KEY_B] * 5, start=T0 + 3)
    dx = diagnose(cache_of(mine, other), MAC, KEY_B)
    assert dx.verdict is Verdict.KEY_OF_OTHER_DEVICE
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (20, 5, 0, 5)
    assert dx.other_device == MAC2
    assert MAC2 in dx.advice
    assert "LYWSD03MMC" in dx.advice
    assert check_json(dx)["other_device"] == MAC2


def test_key_of_other_device_across_formats() -> None:
    mine = stock_lywsd03mmc(MAC, [KEY_A] * 4)
    other = pvvx_enc(MAC3, KEY_B, 4, start=T0 + 1)
    dx = diagnose(cache_of(mine, other), MAC, KEY_B)
    assert dx.verdict is Verdict.KEY_OF_OTHER_DEVICE
    assert dx.other_device == MAC3
    assert MAC3 in dx.advice


def test_wrong_key_stock() -> None:
    mine = stock_lywsd03mmc(MAC, [KEY_A] * 5)
    other = stock_lywsd03mmc(MAC2, [KEY_B] * 5, start=T0 + 3)
    dx = diagnose(cache_of(mine, other), MAC, KEY_C)
    assert dx.verdict is Verdict.WRONG_KEY
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (20, 5, 0, 5)
    assert dx.other_device is None
    assert "5 data frame" in dx.advice
    assert "0x18" not in dx.advice
    assert "custom firmware" not in dx.advice
    assert "other_device" not in check_json(dx)


@pytest.mark.parametrize(
    ("build", "fmt", "model"),
    [(pvvx_enc, "pvvx_enc", "ATC"), (atc1441_enc, "atc1441_enc", "ATC"), (bthome_v2_enc, "bthome_v2_enc", "BTHome")],
)
def test_wrong_key_custom_firmware(build, fmt: str, model: str) -> None:
    dx = diagnose(cache_of(build(MAC, KEY_A, 4)), MAC, KEY_C)
    assert dx.verdict is Verdict.WRONG_KEY
    assert dx.format == fmt
    assert dx.model == model
    assert counts(dx) == (4, 4, 0, 4)
    assert "0x18" in dx.advice
    assert "custom firmware" in dx.advice


# --------------------------------------------------------------------------------------------------
# looks_like_token, legacy keys, placeholders


def test_looks_like_token_on_v5_device() -> None:
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 3)), MAC, KEY12)
    assert dx.verdict is Verdict.LOOKS_LIKE_TOKEN
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (12, 3, 0, 0)  # not tried
    assert "token" in dx.advice.lower() and "32" in dx.advice


def test_looks_like_token_on_pvvx_device() -> None:
    dx = diagnose(cache_of(pvvx_enc(MAC, KEY_A, 3)), MAC, KEY12)
    assert dx.verdict is Verdict.LOOKS_LIKE_TOKEN
    assert dx.format == "pvvx_enc"


def test_legacy_v3_key_of_24_digits_is_tried() -> None:
    frames = legacy_v3(MAC, KEY12, 5)
    dx = diagnose(cache_of(frames), MAC, KEY12)
    assert dx.verdict is Verdict.OK
    assert dx.format == "mibeacon_v3_enc"
    assert dx.model == "MHO-C401"
    assert counts(dx) == (5, 5, 5, 0)

    dx = diagnose(cache_of(frames), MAC, KEY12_OTHER)
    assert dx.verdict is Verdict.WRONG_KEY
    assert dx.format == "mibeacon_v3_enc"
    assert counts(dx) == (5, 5, 0, 5)


def test_legacy_key_padded_with_ffffffff_is_not_a_placeholder() -> None:
    padded = KEY12 + "ffffffff"
    dx = diagnose(cache_of(legacy_v3(MAC, KEY12, 4)), MAC, padded)
    assert dx.verdict is Verdict.OK
    assert counts(dx) == (4, 4, 4, 0)
    # on a v5 device the padded key is tried too (and fails): not placeholder_key
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 3)), MAC, padded)
    assert dx.verdict is Verdict.WRONG_KEY
    assert counts(dx) == (12, 3, 0, 3)


@pytest.mark.parametrize("key", ["f" * 32, "F" * 32, "0" * 32, "f" * 24, "0" * 24])
def test_placeholder_key(key: str) -> None:
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 3)), MAC, key)
    assert dx.verdict is Verdict.PLACEHOLDER_KEY
    assert dx.format == "mibeacon_v5_enc"
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (12, 3, 0, 0)
    assert "placeholder" in dx.advice
    assert "Xiaomi Home" in dx.advice


# --------------------------------------------------------------------------------------------------
# not_encrypted / no_encrypted_frames


@pytest.mark.parametrize(("build", "fmt"), [(atc1441_plain, "atc1441"), (pvvx_plain, "pvvx")])
def test_not_encrypted(build, fmt: str) -> None:
    dx = diagnose(cache_of(build(MAC, 6)), MAC, KEY_A)
    assert dx.verdict is Verdict.NOT_ENCRYPTED
    assert dx.format == fmt
    assert dx.model == "ATC"
    assert counts(dx) == (6, 6, 0, 0)
    assert "no key is needed" in dx.advice


def test_not_encrypted_plain_mibeacon() -> None:
    le = mac_to_le(MAC)
    frames = [
        Frame(
            T0 + i,
            MAC,
            MIBEACON,
            mibeacon.encode(
                mac_le=le, product_id=0x055B, frame_counter=i, objects=[mibeacon.encode_object(0x1004, 20.0)]
            ),
        )
        for i in range(3)
    ]
    dx = diagnose(cache_of(frames + idle_only(MAC, 2, start=T0 + 10)), MAC, KEY_A)
    assert dx.verdict is Verdict.NOT_ENCRYPTED
    assert dx.format == "mibeacon_v5"
    assert counts(dx) == (5, 3, 0, 0)


def test_no_encrypted_frames() -> None:
    frames = idle_only(MAC, 12)  # 110 s of idle frames
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.NO_ENCRYPTED_FRAMES
    assert dx.format in (None, "mibeacon_v5")
    assert dx.model == "LYWSD03MMC"
    assert counts(dx) == (12, 0, 0, 0)
    assert dx.last_data_frame_time is None
    assert "12 frame(s)" in dx.advice
    assert "2 min" in dx.advice
    assert check_json(dx)["last_data_frame_time"] is None


def test_no_encrypted_frames_uses_now() -> None:
    dx = diagnose(cache_of(idle_only(MAC, 3)), MAC, KEY_A, now=T0 + 3 * 3600)
    assert dx.verdict is Verdict.NO_ENCRYPTED_FRAMES
    assert "3 frame(s)" in dx.advice and "3.0 h" in dx.advice


# --------------------------------------------------------------------------------------------------
# device_not_seen / invalid_key


def test_device_not_seen_lists_seen_devices() -> None:
    cache = cache_of(stock_lywsd03mmc(MAC2, [KEY_A] * 2), pvvx_enc(MAC3, KEY_B, 2))
    dx = diagnose(cache, MAC, KEY_A)
    assert dx.verdict is Verdict.DEVICE_NOT_SEEN
    assert dx.format is None and dx.model is None
    assert counts(dx) == (0, 0, 0, 0)
    assert MAC2 in dx.advice and MAC3 in dx.advice
    assert "LYWSD03MMC" in dx.advice
    d = check_json(dx)
    assert {s["mac"] for s in d["seen_devices"]} == {MAC2, MAC3}


def test_device_not_seen_empty_capture() -> None:
    dx = diagnose(FrameCache(), MAC, KEY_A)
    assert dx.verdict is Verdict.DEVICE_NOT_SEEN
    assert "No Xiaomi-family device was seen" in dx.advice


@pytest.mark.parametrize(
    "key",
    ["", "not a key", "g" * 32, "0123456789abcdef0123", KEY_A[:30], KEY_A + "00", KEY12 + "0"],
    ids=["empty", "words", "non-hex", "20-digits", "30-digits", "34-digits", "25-digits"],
)
def test_invalid_key(key: str) -> None:
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 2)), MAC, key)
    assert dx.verdict is Verdict.INVALID_KEY
    assert "32 hex digits" in dx.advice
    check_json(dx)


# --------------------------------------------------------------------------------------------------
# the order of the decisions


def test_order_invalid_key_before_device_not_seen() -> None:
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC2, [KEY_A] * 2)), MAC, "0123456789abcdef0123")
    assert dx.verdict is Verdict.INVALID_KEY


def test_order_device_not_seen_before_placeholder() -> None:
    dx = diagnose(cache_of(stock_lywsd03mmc(MAC2, [KEY_A] * 2)), MAC, "f" * 32)
    assert dx.verdict is Verdict.DEVICE_NOT_SEEN


def test_order_placeholder_before_not_encrypted() -> None:
    dx = diagnose(cache_of(atc1441_plain(MAC, 4)), MAC, "F" * 32)
    assert dx.verdict is Verdict.PLACEHOLDER_KEY
    assert dx.format == "atc1441"


def test_order_placeholder_before_no_encrypted_frames() -> None:
    dx = diagnose(cache_of(idle_only(MAC, 4)), MAC, "0" * 32)
    assert dx.verdict is Verdict.PLACEHOLDER_KEY


def test_order_not_encrypted_before_looks_like_token() -> None:
    dx = diagnose(cache_of(pvvx_plain(MAC, 4)), MAC, KEY12)
    assert dx.verdict is Verdict.NOT_ENCRYPTED


def test_order_no_encrypted_frames_before_looks_like_token() -> None:
    dx = diagnose(cache_of(idle_only(MAC, 4)), MAC, KEY12)
    assert dx.verdict is Verdict.NO_ENCRYPTED_FRAMES


def test_order_looks_like_token_before_key_of_other_device() -> None:
    # the 24-digit key does decrypt another (legacy) device, but this one needs 16 bytes
    cache = cache_of(stock_lywsd03mmc(MAC, [KEY_A] * 2), legacy_v3(MAC2, KEY12, 3, start=T0 + 1))
    dx = diagnose(cache, MAC, KEY12)
    assert dx.verdict is Verdict.LOOKS_LIKE_TOKEN


def test_order_key_outdated_before_key_of_other_device() -> None:
    # KEY_A decrypted the old frames of MAC and also decrypts MAC2: key_outdated wins
    mine = stock_lywsd03mmc(MAC, [KEY_A] * 4 + [KEY_B] * 4)
    other = stock_lywsd03mmc(MAC2, [KEY_A] * 3, start=T0 + 1)
    dx = diagnose(cache_of(mine, other), MAC, KEY_A)
    assert dx.verdict is Verdict.KEY_OUTDATED


def test_idle_frames_of_the_encrypted_device_do_not_count_as_plain_data() -> None:
    # stock: many idle frames and one encrypted reading → the key is tried, not not_encrypted
    frames = idle_only(MAC, 10) + stock_lywsd03mmc(MAC, [KEY_A], idle_per_data=0, start=T0 + 200)
    dx = diagnose(cache_of(frames), MAC, KEY_A)
    assert dx.verdict is Verdict.OK
    assert counts(dx) == (11, 1, 1, 0)


# --------------------------------------------------------------------------------------------------
# real frames from the shared vectors


VECTORS = load_vectors()


def _vector(test_name: str, contains: str = "") -> Vector:
    found = [v for v in VECTORS if v.test_name == test_name and contains in v.source]
    assert found, test_name
    return found[0]


def _vector_frames(vs: Iterable[Vector], start: float = T0) -> list[Frame]:
    return [Frame(start + i * STEP, v.mac, v.service_uuid, v.payload, -70) for i, v in enumerate(vs)]


def test_vector_lywsd03mmc_encrypted_ok_and_wrong() -> None:
    v = _vector("test_Xiaomi_LYWSD03MMC_encrypted")
    assert v.bindkey and v.format == "mibeacon_v5_enc"
    # idle frames before the real encrypted frame, as the sensor sends them
    idle = [Frame(T0 + i * STEP, v.mac, MIBEACON, stock_idle(v.mac, 0x4C + i)) for i in range(4)]
    frames = [*idle, Frame(T0 + 4 * STEP, v.mac, v.service_uuid, v.payload, -70)]
    cache = cache_of(frames)

    dx = diagnose(cache, v.mac, v.bindkey)
    assert dx.verdict is Verdict.OK
    assert (dx.format, dx.model) == ("mibeacon_v5_enc", "LYWSD03MMC")
    assert counts(dx) == (5, 1, 1, 0)

    wrong = _vector("test_bindkey_wrong", "xiaomi-ble").bindkey
    assert wrong
    dx = diagnose(cache, v.mac, wrong)
    assert dx.verdict is Verdict.WRONG_KEY
    assert counts(dx) == (5, 1, 0, 1)


def test_vector_wrong_key_negatives() -> None:
    for v in (_vector("test_bindkey_wrong", "xiaomi-ble"), _vector("test_Xiaomi_RTCGQ02LM", "ble_monitor")):
        dx = diagnose(cache_of(_vector_frames([v])), v.mac, v.bindkey)
        assert dx.verdict is Verdict.WRONG_KEY, v.source
        assert dx.format == "mibeacon_v5_enc"
        assert dx.model in (None, "RTCGQ02LM")  # a motion sensor: not in the thermometer catalogue
        assert counts(dx) == (1, 1, 0, 1)


def test_vector_key_of_other_device() -> None:
    mine = _vector("test_bindkey_wrong", "xiaomi-ble")  # RTCGQ02LM 54:EF:44:E0:C4:0F
    other = _vector("test_Xiaomi_LYWSD03MMC_encrypted")  # A4:C1:38:02:83:F4
    cache = cache_of(_vector_frames([mine]), _vector_frames([other], start=T0 + 1))
    dx = diagnose(cache, mine.mac, other.bindkey)
    assert dx.verdict is Verdict.KEY_OF_OTHER_DEVICE
    assert dx.other_device == "A4:C1:38:02:83:F4"
    assert "A4:C1:38:02:83:F4 (LYWSD03MMC)" in dx.advice


def test_vector_needs_key_with_random_key() -> None:
    v = next(v for v in VECTORS if v.category == "needs_key")
    dx = diagnose(cache_of(_vector_frames([v])), v.mac, KEY_C)
    assert dx.verdict is Verdict.WRONG_KEY
    assert (dx.format, dx.model) == ("mibeacon_v5_enc", "LYWSD03MMC")
    assert counts(dx) == (1, 1, 0, 1)


def test_vector_pvvx_mi_like_encrypted_sequence() -> None:
    vs = [v for v in VECTORS if "mi_like_enc" in v.source]
    assert len(vs) == 3 and {v.bindkey for v in vs} == {"a" * 32}
    cache = cache_of(_vector_frames(vs))
    dx = diagnose(cache, vs[0].mac, "a" * 32)
    assert dx.verdict is Verdict.OK
    assert counts(dx) == (3, 3, 3, 0)
    dx = diagnose(cache, vs[0].mac, KEY_C)
    assert dx.verdict is Verdict.WRONG_KEY
    assert counts(dx) == (3, 3, 0, 3)


def test_vector_bthome_v2_encrypted() -> None:
    vs = [v for v in VECTORS if "bt_home_v2_enc" in v.source]
    assert vs
    cache = cache_of(_vector_frames(vs))
    dx = diagnose(cache, vs[0].mac, "a" * 32)
    assert dx.verdict is Verdict.OK
    assert dx.format == "bthome_v2_enc"
    wrong = _vector("test_bindkey_wrong", "test_parser_v2.py")
    dx = diagnose(cache_of(_vector_frames([wrong])), wrong.mac, wrong.bindkey)
    assert dx.verdict is Verdict.WRONG_KEY
    assert dx.format == "bthome_v2_enc"
    assert "0x18" in dx.advice


# --------------------------------------------------------------------------------------------------
# CLI


def _advertisements(frames: Iterable[Frame]) -> list[Advertisement]:
    return [
        Advertisement(
            mac=f.mac,
            time=f.time,
            service_data={f.service_uuid: f.payload},
            rssi=f.rssi,
            name=f.name,
            address_type="public",
            source="test",
        )
        for f in sorted(frames, key=lambda f: f.time)
    ]


def write_jsonl(path: Path, frames: Iterable[Frame]) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for adv in _advertisements(frames):
            out.write(captures.write_jsonl_line(adv) + "\n")
    return path


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(d))
    monkeypatch.setenv("MITHERM_DATA_DIR", str(tmp_path / "data"))
    return d


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 4) + stock_lywsd03mmc(MAC2, [KEY_B] * 4, start=T0 + 5)
    return write_jsonl(tmp_path / "capture.jsonl", frames)


def run(*args: str):
    return CliRunner().invoke(main, ["doctor", *args])


def _json_out(result) -> dict:
    d = json.loads(result.stdout)
    assert d.keys() >= DOCUMENTED_KEYS
    assert set(d["frames"]) == FRAME_KEYS
    return d


def test_cli_ok_json(capture: Path, config_dir: Path) -> None:
    result = run("--capture", str(capture), "--mac", "a4c138112233", "--key", KEY_A, "--json")
    assert result.exit_code == 0, result.output
    d = _json_out(result)
    assert d["verdict"] == "ok"
    assert d["mac"] == MAC
    assert d["format"] == "mibeacon_v5_enc"
    assert d["model"] == "LYWSD03MMC"
    assert d["frames"] == {"total": 16, "with_data": 4, "decrypted": 4, "failed": 0}
    assert d["last_data_frame_time"] == _iso(T0 + 15 * STEP)
    assert isinstance(d["advice"], str) and d["advice"]


@pytest.mark.parametrize(
    ("key", "verdict"),
    [
        (KEY_C, "wrong_key"),
        (KEY_B, "key_of_other_device"),
        ("f" * 32, "placeholder_key"),
        (KEY12, "looks_like_token"),
        ("abc", "invalid_key"),
    ],
)
def test_cli_failing_verdicts_exit_non_zero_with_json(capture: Path, config_dir: Path, key: str, verdict: str) -> None:
    result = run("--capture", str(capture), "--mac", MAC, "--key", key, "--json")
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert _json_out(result)["verdict"] == verdict


def test_cli_device_not_seen(capture: Path, config_dir: Path) -> None:
    result = run("--capture", str(capture), "--mac", MAC3, "--key", KEY_A, "--json")
    assert result.exit_code != 0
    d = _json_out(result)
    assert d["verdict"] == "device_not_seen"
    assert {s["mac"] for s in d["seen_devices"]} == {MAC, MAC2}


@pytest.mark.parametrize("mac", ["A4-C1-38-11-22-33", "a4c138112233", "a4:c1:38:11:22:33", "A4C1.3811.2233"])
def test_cli_mac_spellings(capture: Path, config_dir: Path, mac: str) -> None:
    result = run("--capture", str(capture), "--mac", mac, "--key", KEY_A, "--json")
    assert result.exit_code == 0, result.output
    assert _json_out(result)["mac"] == MAC


def test_cli_invalid_mac(capture: Path, config_dir: Path) -> None:
    result = run("--capture", str(capture), "--mac", "A4:C1:38", "--key", KEY_A, "--json")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "not a Bluetooth address" in result.output


def test_cli_btsnoop_capture(tmp_path: Path, config_dir: Path) -> None:
    if not hasattr(captures, "write_btsnoop"):
        pytest.skip("mitherm.captures.write_btsnoop is not written yet")
    frames = stock_lywsd03mmc(MAC, [KEY_A] * 3 + [KEY_B] * 3)
    path = tmp_path / "hci.btsnoop"
    assert captures.write_btsnoop(path, _advertisements(frames)) == 24
    result = run("--capture", str(path), "--mac", "A4-C1-38-11-22-33", "--key", KEY_A, "--json")
    assert result.exit_code == 1
    d = _json_out(result)
    assert d["verdict"] == "key_outdated"
    assert d["frames"] == {"total": 24, "with_data": 6, "decrypted": 3, "failed": 3}
    assert d["new_key_since"] == _iso(data_times(frames)[3])

    result = run("--capture", str(path), "--mac", MAC, "--key", KEY_B, "--json")
    assert result.exit_code == 0
    assert _json_out(result)["verdict"] == "ok"


def test_cli_key_from_keystore(capture: Path, config_dir: Path) -> None:
    doc = {"version": 1, "devices": {MAC: {"bindkey": KEY_A, "name": "living room"}}}
    (config_dir / "keys.json").write_text(json.dumps(doc), encoding="utf-8")
    result = run("--capture", str(capture), "--mac", "a4c138112233", "--json")
    assert result.exit_code == 0, result.output
    assert _json_out(result)["verdict"] == "ok"

    # the keystore's key for another device is not used for this one
    result = run("--capture", str(capture), "--mac", MAC2, "--json")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "no --key" in result.output


def test_cli_keystore_any_mac_spelling(capture: Path, config_dir: Path) -> None:
    doc = {"version": 1, "devices": {"a4-c1-38-11-22-33": {"bindkey": KEY_A.upper()}}}
    path = config_dir / "keys.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    path.chmod(0o600)
    result = run("--capture", str(capture), "--mac", "A4C138112233", "--json")
    assert result.exit_code == 0, result.output
    assert _json_out(result)["verdict"] == "ok"


def test_cli_keystore_key_that_is_wrong(capture: Path, config_dir: Path) -> None:
    doc = {"version": 1, "devices": {MAC: {"bindkey": KEY_B}}}
    (config_dir / "keys.json").write_text(json.dumps(doc), encoding="utf-8")
    result = run("--capture", str(capture), "--mac", MAC, "--json")
    assert result.exit_code == 1
    assert _json_out(result)["verdict"] == "key_of_other_device"


def test_cli_no_key_and_empty_keystore(capture: Path, config_dir: Path) -> None:
    result = run("--capture", str(capture), "--mac", MAC)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "no --key" in result.output


def test_cli_missing_capture(tmp_path: Path, config_dir: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = run("--capture", str(missing), "--mac", MAC, "--key", KEY_A, "--json")
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "nope.jsonl" in result.output


def test_cli_garbage_capture(tmp_path: Path, config_dir: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x01\x02 this is not a capture at all, nothing like one" * 3)
    result = run("--capture", str(bad), "--mac", MAC, "--key", KEY_A, "--json")
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "not a btsnoop or mitherm JSON Lines capture" in result.output


def test_cli_human_output(capture: Path, config_dir: Path) -> None:
    result = run("--capture", str(capture), "--mac", MAC, "--key", KEY_C)
    assert result.exit_code == 1
    assert "wrong_key" in result.output
    assert MAC in result.output

"""Gateway pipeline, unit level: Advertisements built from the sim devices / the format encoders, no radio.

dedupe (best RSSI and its receiver), stock frame merging, replay protection (and its persistence),
keystore changes, key failures (one log line, the doctor's verdict), corrupted and idle frames, --print."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from mitherm.bindkey import parse_bindkey
from mitherm.formats import bthome
from mitherm.gateway import Gateway, GatewayOptions, PrintSink
from mitherm.mac import mac_to_le
from mitherm.model import Advertisement, Reading
from mitherm.sim.devices import BTHomeDevice, Device, Frame, PvvxDevice, StockDevice
from mitherm.state import DeviceState, KeyStatus
from mitherm.uuids import BTHOME_V2

T0 = 1_718_000_000.0
OTHER_KEY = "00112233445566778899aabbccddeeff"

#: format -> tolerance of (temperature_c, humidity_pct, battery_pct, voltage_v) against the sensor truth
TOLERANCE = {
    "mibeacon": (0.05, 0.05, 0, 0.001),
    "atc1441": (0.05, 0.5, 0, 0.001),
    "atc1441_enc": (0.25, 0.25, 0, 0.001),
    "pvvx": (0.005, 0.005, 0, 0.001),
    "bthome": (0.005, 0.005, 0, 0.001),
}


def tolerance(fmt: str) -> dict[str, float]:
    key = fmt if fmt in TOLERANCE else fmt.removesuffix("_enc").split("_v")[0]
    t, h, b, v = TOLERANCE[key]
    return {"temperature_c": t, "humidity_pct": h, "battery_pct": b, "voltage_v": v}


def assert_matches_truth(values: dict, truth: dict, fmt: str) -> None:
    tol = tolerance(fmt)
    measured = {k: v for k, v in values.items() if k in tol}
    assert measured, f"{fmt}: no measurement in {values}"
    for k, v in measured.items():
        assert abs(v - truth[k]) <= tol[k] + 1e-6, f"{fmt} {k}: {v} vs truth {truth[k]}"


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []

    def publish(self, state: DeviceState, reading: Reading) -> None:
        self.published.append((state.mac, dict(reading.values)))


def gateway(keys: dict[str, str] | None = None, **kw) -> tuple[Gateway, Recorder]:
    gw = Gateway(keys or {}, **kw)
    rec = Recorder()
    gw.sinks.append(rec)
    return gw, rec


def adv_of(dev: Device, f: Frame, *, rssi: int = -70, source: str = "r1", dt: float = 0.0) -> Advertisement:
    return Advertisement(dev.address, T0 + f.t + dt, {f.service_uuid: f.payload}, rssi=rssi, source=source)


def advs(dev: Device, until: float, **kw) -> Iterator[tuple[Advertisement, Frame]]:
    for f in dev.frames(until):
        yield adv_of(dev, f, **kw), f


def data_frames(dev: Device, n: int) -> list[Frame]:
    """The first ``n`` data frames with distinct payloads (pvvx repeats a measurement in several adverts)."""
    out: list[Frame] = []
    seen: set[bytes] = set()
    t = dev.now
    while len(out) < n:
        t += 600.0
        for f in dev.frames(t):
            if f.has_data and f.payload not in seen:
                seen.add(f.payload)
                out.append(f)
    return out[:n]


def feed(gw: Gateway, dev: Device, until: float) -> None:
    for a, _ in advs(dev, until):
        gw.handle(a)


# --- dedupe ---------------------------------------------------------------------------------------


def test_dedupe_across_receivers_keeps_best_rssi_and_its_receiver() -> None:
    dev = BTHomeDevice(2, encrypted=True, seed="dd")
    gw, rec = gateway({dev.address: dev.bindkey})
    f = next(iter(data_frames(dev, 1)))
    first = gw.handle(adv_of(dev, f, rssi=-80, source="kitchen"))
    assert len(first) == 1
    assert gw.handle(adv_of(dev, f, rssi=-55, source="hall", dt=0.03)) == []
    assert gw.handle(adv_of(dev, f, rssi=-90, source="garage", dt=0.06)) == []
    st = gw.devices[dev.address]
    assert (st.rssi, st.receiver) == (-55, "hall")
    assert gw.stats.duplicates == 2
    assert gw.stats.decoded == 1
    assert gw.stats.replayed == 0  # a frame heard twice is not a replay
    assert len(rec.published) == 1


def test_same_frame_outside_the_window_is_not_a_duplicate() -> None:
    dev = PvvxDevice("pvvx", seed="win")
    gw, rec = gateway(options=GatewayOptions(dedupe_window=10.0))
    f = next(iter(data_frames(dev, 1)))
    gw.handle(adv_of(dev, f))
    gw.handle(adv_of(dev, f, dt=9.5))  # inside: duplicate
    assert gw.stats.duplicates == 1
    gw.handle(adv_of(dev, f, dt=10.5))  # outside: a new frame (plain: no counter check)
    assert gw.stats.duplicates == 1
    assert gw.stats.decoded == 2
    assert len(rec.published) == 2


def test_dedupe_is_per_address() -> None:
    a, b = PvvxDevice("pvvx", seed="a1"), PvvxDevice("pvvx", seed="a1", address="A4:C1:38:00:00:02")
    f = next(iter(data_frames(a, 1)))
    gw, _rec = gateway()
    gw.handle(adv_of(a, f))
    gw.handle(Advertisement(b.address, T0 + f.t, {f.service_uuid: f.payload}, rssi=-60, source="r1"))
    assert gw.stats.duplicates == 0


# --- merging stock frames ------------------------------------------------------------------------------


def test_stock_temperature_humidity_battery_frames_merge_into_one_state() -> None:
    dev = StockDevice("LYWSD03MMC", seed="merge", data_interval=60.0)
    gw, rec = gateway({dev.address: dev.bindkey})
    frames = data_frames(dev, 3)  # temperature, humidity, battery in turn
    for f in frames:
        out = gw.handle(adv_of(dev, f))
        assert len(out) == 1
    st = gw.devices[dev.address]
    assert set(st.values) == {"temperature_c", "humidity_pct", "battery_pct"}
    for f, quantity in zip(frames, ("temperature_c", "humidity_pct", "battery_pct"), strict=True):
        truth = dev.truth_at(f.t).as_dict()
        assert_matches_truth({quantity: st.values[quantity]}, truth, "mibeacon")
        assert st.updated[quantity] == T0 + f.t
    assert st.format == "mibeacon_v5_enc"
    assert st.model == "LYWSD03MMC"
    assert st.key_status == KeyStatus.VERIFIED
    assert [len(v) for _, v in rec.published] == [1, 1, 1]  # each publish carries its own frame's value


def test_idle_frames_produce_nothing() -> None:
    dev = StockDevice("LYWSD03MMC", seed="idle")
    gw, rec = gateway({dev.address: dev.bindkey})
    idle = [f for f in dev.frames(500.0) if not f.has_data][:40]
    assert len(idle) == 40
    for f in idle:
        assert gw.handle(adv_of(dev, f)) == []
    st = gw.devices[dev.address]
    assert st.values == {}
    assert rec.published == []
    assert st.key_status == KeyStatus.UNKNOWN
    assert gw.stats.decoded == 0 and gw.stats.failed == 0


def test_idle_fast_path_gives_the_same_states_as_decoding_every_frame() -> None:
    """Repeated idle MiBeacon headers skip the decoder; the states must be exactly those of the slow path,
    including devices whose idle header changes (another product id, a MAC that does not match the sender,
    a capability byte) and a truncated idle frame."""
    devs: list[Device] = [StockDevice(model, seed=f"fast-{model}") for model in ("LYWSD03MMC", "CGG1", "MHO-C401")]
    devs += [PvvxDevice("mi", seed="fast-pvvx-mi"), BTHomeDevice(2, seed="fast-bthome")]
    advs: list[Advertisement] = []
    for d in devs:
        for i, f in enumerate(d.frames(900.0)):
            advs.append(Advertisement(d.address, T0 + f.t, {f.service_uuid: f.payload}, rssi=-50 - i % 30,
                                      name=d.label, source=f"r{i % 3}"))  # fmt: skip
    stock = devs[0]
    p = next(
        a.service_data[0xFE95]
        for a in advs
        if a.mac == stock.address and 0xFE95 in a.service_data and not a.service_data[0xFE95][0] & 0x40
    )
    odd = [
        p[:2] + bytes([p[2] ^ 1]) + p[3:],  # another product id
        p[:5] + bytes([p[5] ^ 0xFF]) + p[6:],  # a MAC that is not the sender's
        p[:4],  # shorter than the header
        p + b"\x00",  # one byte more
    ]
    for j, payload in enumerate(odd * 3):
        advs.append(Advertisement(stock.address, T0 + 1000 + j, {0xFE95: payload}, rssi=-40, source="odd"))
    advs.sort(key=lambda a: a.time)
    keys = {d.address: d.bindkey for d in devs if d.bindkey}
    fast, slow = Gateway(keys), Gateway(keys)
    slow.idle_fast_path = False
    for a in advs:
        assert [(s.mac, r.values) for s, r in fast.handle(a)] == [(s.mac, r.values) for s, r in slow.handle(a)]
    assert fast._idle, "the fast path was never taken"
    assert {m: st.to_json() for m, st in fast.devices.items()} == {m: st.to_json() for m, st in slow.devices.items()}
    assert fast.stats == slow.stats


# --- replay protection ------------------------------------------------------------------------------------


def test_replayed_encrypted_frames_are_rejected() -> None:
    dev = BTHomeDevice(2, encrypted=True, seed="replay")
    gw, rec = gateway({dev.address: dev.bindkey})
    f1, f2, f3 = data_frames(dev, 3)
    gw.handle(adv_of(dev, f1))
    gw.handle(adv_of(dev, f2))
    assert gw.stats.decoded == 2
    # the same payload again, after the dedupe window: a replay, not a duplicate
    assert gw.handle(adv_of(dev, f2, dt=60.0)) == []
    # an older counter
    assert gw.handle(adv_of(dev, f1, dt=61.0)) == []
    assert gw.stats.replayed == 2
    assert len(rec.published) == 2
    assert gw.handle(adv_of(dev, f3)) != []


def test_replayed_mibeacon_frame_with_older_counter_is_rejected() -> None:
    dev = StockDevice("LYWSD03MMC", seed="replay-mi", data_interval=30.0)
    gw, rec = gateway({dev.address: dev.bindkey})
    frames = data_frames(dev, 4)
    for f in frames[1:]:
        gw.handle(adv_of(dev, f))
    gw.handle(adv_of(dev, frames[0], dt=1000.0))
    assert gw.stats.replayed == 1
    assert len(rec.published) == 3


def test_counters_survive_a_restart() -> None:
    devs = [
        BTHomeDevice(2, encrypted=True, seed="c1"),
        BTHomeDevice(1, encrypted=True, seed="c2"),
        StockDevice("LYWSD03MMC", seed="c3", data_interval=30.0),
        PvvxDevice("mi", encrypted=True, seed="c4"),
    ]
    keys = {d.address: d.bindkey for d in devs}
    frames = {d.address: data_frames(d, 6) for d in devs}
    gw1, _ = gateway(keys)
    for d in devs:
        for f in frames[d.address][:5]:
            gw1.handle(adv_of(d, f))
    assert gw1.stats.decoded == 20
    saved = json.loads(json.dumps(gw1.counters))  # as the service persists them

    gw2, rec = gateway(keys, counters=saved)
    for d in devs:
        for f in frames[d.address][:5]:
            gw2.handle(adv_of(d, f, dt=3600.0))
    assert gw2.stats.decoded == 0
    assert gw2.stats.replayed == 20
    assert rec.published == []
    for d in devs:  # the next genuine frame goes through
        assert gw2.handle(adv_of(d, frames[d.address][5], dt=3600.0)) != []
    assert gw2.stats.decoded == 4


def _bthome_enc(mac: str, key: str, counter: int, temperature: float) -> bytes:
    obj = bthome.encode_object(0x02, temperature)
    return bthome.encode_v2([obj], mac_le=mac_to_le(mac), key=parse_bindkey(key), counter=counter)


def test_rebooted_device_counter_back_near_zero_is_accepted() -> None:
    mac = "C8:11:22:33:44:55"
    gw, _rec = gateway({mac: OTHER_KEY}, counters={mac: 100_000})
    for i, c in enumerate((3, 4, 5)):
        payload = _bthome_enc(mac, OTHER_KEY, c, 20.0 + i)
        assert gw.handle(Advertisement(mac, T0 + i, {BTHOME_V2: payload}, rssi=-60)) != []
    assert gw.stats.replayed == 0
    assert gw.devices[mac].values["temperature_c"] == 22.0
    assert gw.counters[mac] == 5


# --- keys ---------------------------------------------------------------------------------------------------


def test_set_keys_reverifies_at_once_against_cached_frames() -> None:
    dev = StockDevice("LYWSD03MMC", seed="setkeys", data_interval=20.0)
    gw, rec = gateway({dev.address: OTHER_KEY})
    feed(gw, dev, 200.0)
    st = gw.devices[dev.address]
    assert st.key_status == KeyStatus.FAILED
    assert st.key_verdict == "wrong_key"
    assert st.values == {}

    changed = gw.set_keys({dev.address: dev.bindkey})  # the keystore was fixed: no new frame needed
    assert changed == [dev.address]
    assert st.key_status == KeyStatus.VERIFIED
    assert st.key_verdict is None
    feed(gw, dev, 300.0)
    assert st.values and rec.published

    gw.set_keys({dev.address: OTHER_KEY})  # and back to a wrong key
    assert st.key_status == KeyStatus.FAILED
    assert st.key_verdict == "wrong_key"


def test_set_keys_adds_a_missing_key_and_names() -> None:
    dev = BTHomeDevice(2, encrypted=True, seed="missing")
    gw, _rec = gateway()
    feed(gw, dev, 60.0)
    st = gw.devices[dev.address]
    assert st.key_status == KeyStatus.MISSING
    assert not st.known
    gw.set_keys({dev.address: dev.bindkey}, names={dev.address: "Fridge"})
    assert st.key_status == KeyStatus.VERIFIED
    assert st.name == "Fridge" and st.known


def test_wrong_key_one_log_line_and_key_failed_verdict(caplog: pytest.LogCaptureFixture) -> None:
    dev = BTHomeDevice(2, encrypted=True, seed="wrong")
    gw, rec = gateway({dev.address: OTHER_KEY})
    caplog.set_level(logging.WARNING, logger="mitherm.gateway")
    for a, _ in advs(dev, 10_000.0):
        gw.handle(a)
        if gw.stats.failed >= 50:
            break
    assert gw.stats.failed == 50
    st = gw.devices[dev.address]
    assert st.key_status == KeyStatus.FAILED
    assert st.key_verdict == "wrong_key"
    lines = [r for r in caplog.records if r.name == "mitherm.gateway" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert dev.address in lines[0].getMessage() and "wrong_key" in lines[0].getMessage()
    assert rec.published == []


def test_rekeyed_device_is_reported_key_outdated() -> None:
    """A young device (frame cache not full yet): re-paired, its frames fail with the old key."""
    dev = BTHomeDevice(2, encrypted=True, seed="rekey-young")
    gw, _rec = gateway({dev.address: dev.bindkey})
    feed(gw, dev, 100.0)  # 20 frames
    old = dev.bindkey
    dev.rekey()
    feed(gw, dev, 200.0)  # 20 more, all failing
    assert gw.verify_key(dev.address, old).verdict.value == "key_outdated"
    st = gw.devices[dev.address]
    assert st.key_status == KeyStatus.FAILED
    assert st.key_verdict == "key_outdated"


@pytest.mark.parametrize(
    "make",
    [
        lambda: BTHomeDevice(2, encrypted=True, seed="rekey-old"),
        lambda: PvvxDevice("pvvx", encrypted=True, seed="rekey-old"),
        lambda: StockDevice("LYWSD03MMC", seed="rekey-old", data_interval=10.0),
    ],
    ids=["bthome_v2_enc", "pvvx_enc", "stock"],
)
def test_rekey_of_a_long_running_device_turns_key_failed(make) -> None:
    """Regression: once the device's frame cache was full, the doctor was re-run only when the cached frame
    count grew by 8 -- never again -- so the state stayed ``verified`` while every frame failed."""
    dev = make()
    gw, _rec = gateway({dev.address: dev.bindkey})
    feed(gw, dev, 2000.0)
    st = gw.devices[dev.address]
    assert st.key_status == KeyStatus.VERIFIED
    dev.rekey()
    feed(gw, dev, 4000.0)
    assert gw.stats.failed >= 100
    assert st.key_status == KeyStatus.FAILED, f"{gw.stats.failed} failing frames and still {st.key_status}"
    assert st.key_verdict in ("key_outdated", "wrong_key")


def test_stock_rekey_with_default_intervals_is_key_outdated() -> None:
    """A stock sensor sends an idle frame every 2 s and one data frame every 10 min: the frame cache must keep
    enough data frames (not just the last 64 frames of any kind) for the doctor to see old-key successes
    followed by new-key failures, or a re-paired stock sensor is called ``wrong_key`` (issue #4.5)."""
    dev = StockDevice("LYWSD03MMC", seed="rekey-stock")
    gw, _rec = gateway({dev.address: dev.bindkey})
    feed(gw, dev, 3 * 3600.0)
    old = dev.bindkey
    dev.rekey()
    feed(gw, dev, 3 * 3600.0 + 3000.0)  # about five data frames under the new key
    st = gw.devices[dev.address]
    assert st.key_status == KeyStatus.FAILED
    assert st.key_verdict == "key_outdated"
    assert gw.verify_key(dev.address, old).verdict.value == "key_outdated"


# --- corrupted frames -----------------------------------------------------------------------------------------

ALL_KINDS = [
    ("stock", lambda s: StockDevice("LYWSD03MMC", seed=s, data_interval=20.0)),
    ("stock_plain_v3", lambda s: StockDevice("LYWSD03MMC", encrypted=False, seed=s, data_interval=20.0)),
    ("pvvx_atc1441", lambda s: PvvxDevice("atc1441", seed=s)),
    ("pvvx_atc1441_enc", lambda s: PvvxDevice("atc1441", encrypted=True, seed=s)),
    ("pvvx_pvvx", lambda s: PvvxDevice("pvvx", seed=s)),
    ("pvvx_pvvx_enc", lambda s: PvvxDevice("pvvx", encrypted=True, seed=s)),
    ("pvvx_mi", lambda s: PvvxDevice("mi", seed=s)),
    ("pvvx_mi_enc", lambda s: PvvxDevice("mi", encrypted=True, seed=s)),
    ("pvvx_bthome", lambda s: PvvxDevice("bthome", seed=s)),
    ("pvvx_bthome_enc", lambda s: PvvxDevice("bthome", encrypted=True, seed=s)),
    ("bthome_v1", lambda s: BTHomeDevice(1, seed=s)),
    ("bthome_v1_enc", lambda s: BTHomeDevice(1, encrypted=True, seed=s)),
    ("bthome_v2", lambda s: BTHomeDevice(2, seed=s)),
    ("bthome_v2_enc", lambda s: BTHomeDevice(2, encrypted=True, seed=s, include_mac=True)),
]


@pytest.mark.parametrize("make", [m for _, m in ALL_KINDS], ids=[k for k, _ in ALL_KINDS])
def test_every_kind_decodes_to_the_truth(make) -> None:
    dev = make("truth")
    gw, _rec = gateway({dev.address: dev.bindkey} if dev.bindkey else {})
    n = 0
    for a, f in advs(dev, 600.0):
        for _st, reading in gw.handle(a):
            assert reading.error is None
            assert_matches_truth(reading.values, dev.truth_at(f.t).as_dict(), reading.format or "")
            n += 1
    assert n >= 5
    st = gw.devices[dev.address]
    assert st.format == dev.format
    assert st.key_status == (KeyStatus.VERIFIED if dev.encrypted else KeyStatus.NOT_NEEDED)


@pytest.mark.parametrize("make", [m for _, m in ALL_KINDS], ids=[k for k, _ in ALL_KINDS])
def test_corrupted_frames_never_produce_values(make) -> None:
    dev = make("corrupt")
    dev.corrupt(1.0)
    gw, rec = gateway({dev.address: dev.bindkey} if dev.bindkey else {})
    sent = 0
    for a, f in advs(dev, 600.0):
        sent += f.corrupted
        gw.handle(a)
    assert sent >= 5
    assert rec.published == []
    assert gw.stats.decoded == 0
    st = gw.devices.get(dev.address)
    assert st is None or st.values == {}


# --- --print ---------------------------------------------------------------------------------------------------


def test_print_sink_writes_one_json_line_per_update() -> None:
    dev = PvvxDevice("pvvx", seed="print")
    out = io.StringIO()
    gw = Gateway(names={dev.address: "Bedroom"})
    gw.sinks.append(PrintSink(out.write))
    frames = data_frames(dev, 3)
    for f in frames:
        gw.handle(adv_of(dev, f))
        gw.handle(adv_of(dev, f, source="r2", dt=0.1))  # duplicates print nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for line, f in zip(lines, frames, strict=True):
        obj = json.loads(line)
        assert obj["mac"] == dev.address
        assert obj["name"] == "Bedroom"
        assert obj["format"] == "pvvx"
        assert obj["time"] == T0 + f.t
        assert obj["key_status"] == "not_needed"
        assert_matches_truth(obj["values"], dev.truth_at(f.t).as_dict(), "pvvx")

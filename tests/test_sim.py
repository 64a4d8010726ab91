"""The simulator's device model: every demo device decodes to its truth, cadences, faults, houses."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from collections import Counter, defaultdict

import pytest

from mitherm.decoder import Decoder
from mitherm.model import ErrorCode
from mitherm.sim import (
    BTHomeDevice,
    Device,
    HouseError,
    PvvxDevice,
    Simulator,
    StockDevice,
    builtin_house,
    load_house,
)
from mitherm.sim.devices import V_EMPTY, V_FULL, battery_pct_for

HOUR = 3600.0

# --- a tiny AD parser (independent of mitherm.captures) -------------------------------------------


def parse_ad(ad: bytes) -> list[tuple[int, bytes]]:
    assert len(ad) <= 31, f"legacy advert of {len(ad)} bytes"
    out = []
    i = 0
    while i < len(ad):
        ln = ad[i]
        assert ln >= 1 and i + 1 + ln <= len(ad), f"bad AD structure at {i} in {ad.hex()}"
        out.append((ad[i + 1], ad[i + 2 : i + 1 + ln]))
        i += 1 + ln
    return out


def service_data(ad: bytes) -> tuple[int, bytes]:
    sd = [v for t, v in parse_ad(ad) if t == 0x16]
    assert len(sd) == 1
    return int.from_bytes(sd[0][:2], "little"), sd[0][2:]


def decode(decoder: Decoder, device: Device, ad: bytes):
    uuid, payload = service_data(ad)
    return decoder.decode(device.address, uuid, payload)


# Resolution of each value in each wire format (decoded must equal truth within half of it).
_T01 = {"temperature_c": 0.1, "humidity_pct": 0.1, "battery_pct": 1}
_FINE = {"temperature_c": 0.01, "humidity_pct": 0.01, "battery_pct": 1, "voltage_v": 0.001}
RESOLUTION = {
    "mibeacon_v5_enc": _T01,
    "mibeacon_v5": _T01,
    "mibeacon_v3": _T01,
    "atc1441": {"temperature_c": 0.1, "humidity_pct": 1, "battery_pct": 1, "voltage_v": 0.001},
    "atc1441_enc": {"temperature_c": 0.5, "humidity_pct": 0.5, "battery_pct": 1},
    "pvvx": _FINE,
    "pvvx_enc": {"temperature_c": 0.01, "humidity_pct": 0.01, "battery_pct": 1},
    "bthome_v1": _FINE,
    "bthome_v1_enc": _FINE,
    "bthome_v2": _FINE,
    "bthome_v2_enc": _FINE,
}


def assert_matches_truth(device: Device, t: float, values: dict) -> set[str]:
    truth = device.truth_at(t).as_dict()
    res = RESOLUTION[device.format]
    checked = set()
    for name, step in res.items():
        if name in values:
            assert abs(values[name] - truth[name]) <= step / 2 + 1e-6, (device, t, name, values, truth)
            checked.add(name)
    assert checked, f"{device!r}: data frame without any measured value: {values}"
    return checked


@pytest.fixture(scope="module")
def demo_hour():
    """One simulated hour of the demo house (adverts at most every 20 s)."""
    house = builtin_house("demo", min_interval=20.0)
    events = list(Simulator(house).events(HOUR))
    return house, events


def test_demo_house_covers_every_device_type():
    house = builtin_house()
    kinds = {(d.kind, d.model, d.format) for d in house}
    stock = {(m, f) for k, m, f in kinds if k == "stock"}
    assert {m for m, _ in stock} == {"LYWSD03MMC", "MHO-C401", "CGG1", "CGDK2"}
    assert ("CGG1", "mibeacon_v5") in stock and ("CGG1", "mibeacon_v5_enc") in stock
    pvvx_formats = {d.format for d in house if d.kind == "pvvx"}
    assert pvvx_formats == {f + s for f in ("atc1441", "pvvx", "mibeacon_v5", "bthome_v2") for s in ("", "_enc")}
    bthome_formats = {d.format for d in house if d.kind == "bthome"}
    assert bthome_formats == {"bthome_v1", "bthome_v1_enc", "bthome_v2", "bthome_v2_enc"}
    assert any(d.kind == "bthome" and d.include_mac and d.trigger_based for d in house)
    assert sum(d.demo_wrong_key for d in house) == 1
    assert len({d.address for d in house}) == len(house)
    for d in house:
        assert (d.bindkey is not None) == d.encrypted
        assert d.label


def test_every_demo_device_decodes_to_its_truth(demo_hour):
    house, events = demo_hour
    decoder = Decoder(house.keys())
    seen: dict[str, set[str]] = defaultdict(set)
    counts = Counter()
    last_t = -1.0
    for t, device, ad in events:
        assert t >= last_t  # time order
        last_t = t
        types = [ty for ty, _ in parse_ad(ad)]
        assert types[0] == 0x01 and parse_ad(ad)[0][1] == b"\x06"
        names = [v for ty, v in parse_ad(ad) if ty == 0x09]
        assert names in ([], [device.name.encode()])
        r = decode(decoder, device, ad)
        assert r.ok, (device, r.error)
        if r.values:
            assert r.format == device.format  # (stock idle frames carry no encryption bit)
            counts[device.address] += 1
            seen[device.address] |= assert_matches_truth(device, t, r.values)
    for d in house:
        assert counts[d.address] >= 5, d
        wanted = {"temperature_c", "humidity_pct", "battery_pct"}
        assert wanted <= seen[d.address], (d, seen[d.address])
        if d.format in ("atc1441", "pvvx") or d.format.startswith("bthome"):
            assert "voltage_v" in seen[d.address]


def test_stock_devices_idle_mostly_and_read_every_ten_minutes():
    house = builtin_house("demo", min_interval=0.0)  # the real advertising interval
    stock = [d for d in house if d.kind == "stock"]
    decoder = Decoder(house.keys())
    by_dev: dict[str, list] = defaultdict(list)
    for t, d, ad in Simulator(stock).events(HOUR):
        by_dev[d.address].append((t, service_data(ad)[1], decode(decoder, d, ad)))
    for d in stock:
        frames = by_dev[d.address]
        data = [(t, p, r) for t, p, r in frames if r.has_data]
        idle = [(t, p, r) for t, p, r in frames if not r.has_data]
        assert len(data) == 6, d  # one reading per 10 minutes
        assert len(idle) > 100 * len(data)
        gaps = {round(b[0] - a[0], 6) for a, b in itertools.pairwise(data)}
        assert gaps == {600.0}
        fc_idle = idle[0][1][:2]
        assert fc_idle == bytes.fromhex("3058")  # 0x5830: v5, MAC, capability, no objects
        assert all(r.ok and r.mac_in_frame == d.address for _, _, r in frames)
        counters = [r.frame_counter for _, _, r in frames]
        assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(counters))
        if d.encrypted:
            assert all(p[:2] == bytes.fromhex("5858") for _, p, _ in data)
            ext = [r.ext_counter for _, _, r in data]
            assert all(b == a + 1 for a, b in itertools.pairwise(ext))
            oids = [r.objects[0][0] for _, _, r in data]
            assert oids == [0x1004, 0x1006, 0x100A] * 2 or sorted(Counter(oids).values()) == [2, 2, 2]
        else:
            assert {r.objects[0][0] for _, _, r in data} == {0x100D, 0x100A}
        assert all(r.product_id == d.product_id for _, _, r in frames)


def test_stock_product_ids_and_cgg1_v3():
    assert StockDevice("LYWSD03MMC").product_id == 0x055B
    assert StockDevice("MHO-C401").product_id == 0x0387
    assert StockDevice("CGG1").product_id == 0x0347 and not StockDevice("CGG1").encrypted
    assert StockDevice("CGG1", encrypted=True).product_id == 0x0B48
    assert StockDevice("CGDK2").product_id == 0x066F
    d = StockDevice("CGG1", version=3, seed=5)
    frames = [f for f in d.frames(1300) if f.has_data]
    assert frames and all(f.payload[:2] == bytes.fromhex("5030") for f in frames)
    r = Decoder().decode(d.address, 0xFE95, frames[0].payload)
    assert r.format == "mibeacon_v3" and r.ok
    assert_matches_truth(d, frames[0].t, r.values)
    with pytest.raises(ValueError):
        StockDevice("MHO-C401", encrypted=False)


def test_pvvx_cadence_counter_and_bthome_alternation():
    d = PvvxDevice("pvvx", seed=3)
    frames = list(d.frames(100.0))
    assert len(frames) in (39, 40)  # every 2.5 s
    assert all(abs(b.t - a.t - 2.5) < 0.011 for a, b in itertools.pairwise(frames))
    counters = [f.payload[13] for f in frames]
    assert max(Counter(counters).values()) <= 4 and len(set(counters)) >= 9  # new measurement every 10 s
    assert d.name == "ATC_" + d.address.replace(":", "")[-6:]

    b = PvvxDevice("bthome", encrypted=True, seed=4)
    dec = Decoder({b.address: b.bindkey})
    objs = [tuple(oid for oid, _ in dec.decode(b.address, f.service_uuid, f.payload).objects) for f in b.frames(30)]
    assert (
        objs[0] != objs[1] and objs[0::2] == [objs[0]] * len(objs[0::2]) and objs[1::2] == [objs[1]] * len(objs[1::2])
    )
    assert {objs[0], objs[1]} == {(0x00, 0x01, 0x02, 0x03), (0x00, 0x0C, 0x10)}


def test_trigger_based_bthome_sends_bursts():
    d = BTHomeDevice(2, encrypted=True, include_mac=True, trigger_based=True, seed=9)
    frames = list(d.frames(600))
    assert all(f.payload[0] == 0x47 for f in frames)  # v2 | trigger | MAC | encrypted
    bursts = Counter(d.measurement_index(f.t) for f in frames)
    assert set(bursts.values()) == {2} and len(bursts) >= 19
    dec = Decoder({d.address: d.bindkey})
    for f in frames:
        r = dec.decode(d.address, 0xFCD2, f.payload)
        assert r.ok and r.mac_in_frame == d.address
        assert_matches_truth(d, f.t, r.values)


ENCRYPTED_FACTORIES = {
    "stock": lambda: StockDevice("LYWSD03MMC", seed=11, data_interval=60.0),
    "atc1441_enc": lambda: PvvxDevice("atc1441", encrypted=True, seed=12),
    "pvvx_enc": lambda: PvvxDevice("pvvx", encrypted=True, seed=13),
    "mi_enc": lambda: PvvxDevice("mi", encrypted=True, seed=14),
    "pvvx_bthome_enc": lambda: PvvxDevice("bthome", encrypted=True, seed=15),
    "bthome_v1_enc": lambda: BTHomeDevice(1, encrypted=True, seed=16),
    "bthome_v2_enc": lambda: BTHomeDevice(2, encrypted=True, include_mac=True, seed=17),
}


@pytest.mark.parametrize("which", list(ENCRYPTED_FACTORIES))
def test_rekey_old_key_fails_new_key_works(which):
    d = ENCRYPTED_FACTORIES[which]()
    old = d.bindkey
    before = [f for f in d.frames(300) if f.has_data]
    assert all(Decoder({d.address: old}).decode(d.address, f.service_uuid, f.payload).ok for f in before)
    new = d.rekey()
    assert re.fullmatch(r"[0-9a-f]{32}", new) and new != old and d.bindkey == new
    after = [f for f in d.frames(600) if f.has_data]
    assert after
    for f in after:
        r_old = Decoder({d.address: old}).decode(d.address, f.service_uuid, f.payload)
        assert r_old.error is not None and r_old.error.code == ErrorCode.WRONG_KEY and not r_old.values
        r_new = Decoder({d.address: new}).decode(d.address, f.service_uuid, f.payload)
        assert r_new.ok
        assert_matches_truth(d, f.t, r_new.values)
    assert d.rekey("00112233445566778899AABBCCDDEEFF") == "00112233445566778899aabbccddeeff"
    with pytest.raises(ValueError):
        StockDevice("CGG1").rekey()


def test_rekey_is_seeded_and_house_keys_follow():
    a, b = builtin_house(), builtin_house()
    assert a.device("Living room").rekey() == b.device("Living room").rekey()
    assert a.keys()[a.device("Living room").address] == a.device("Living room").bindkey


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_corrupted_frames_never_yield_values(seed):
    house = builtin_house("demo", seed=seed, min_interval=5.0)
    decoder = Decoder(house.keys())
    for d in house:
        d.corrupt(1.0)
    damaged = Counter()
    for t, d, ad in Simulator(house).events(1500):
        r = decode(decoder, d, ad)
        _uuid, payload = service_data(ad)
        if d.kind == "stock" and not (payload[0] & 0x40):  # idle frames are left alone
            continue
        damaged[d.format] += 1
        assert not r.values, (d, t, ad.hex(), r.values)
        if d.encrypted:
            assert r.error is not None and r.error.code == ErrorCode.WRONG_KEY, (d, r.error)
    assert set(damaged) == {d.format for d in house}


def test_corrupt_probability_mixes_good_and_bad_frames():
    d = PvvxDevice("pvvx", seed=21)
    d.corrupt(0.3)
    dec = Decoder()
    frames = list(d.frames(2000))
    bad = [f for f in frames if f.corrupted]
    assert 0.15 * len(frames) < len(bad) < 0.45 * len(frames)
    for f in frames:
        r = dec.decode(d.address, f.service_uuid, f.payload)
        assert bool(r.values) != f.corrupted
    d.corrupt(0.0)
    assert not any(f.corrupted for f in d.frames(2100))
    with pytest.raises(ValueError):
        d.corrupt(1.5)


def test_drop_out_and_come_back():
    house = builtin_house("demo", min_interval=10.0)
    sim = Simulator(house)
    target = house.device("Nursery")
    shed = house.device("Shed")
    sim.call_at(1000.0, lambda: target.drop_out(300.0))
    sim.call_at(1000.0, lambda: shed.drop_out())  # until come_back
    sim.call_at(1500.0, lambda: shed.come_back())
    times: dict[str, list[float]] = defaultdict(list)
    for t, d, _ in sim.events(2500):
        times[d.label].append(t)
    assert not [t for t in times["Nursery"] if 1000 <= t < 1300]
    assert any(990 <= t < 1000 for t in times["Nursery"]) and any(1300 <= t < 1311 for t in times["Nursery"])
    assert not [t for t in times["Shed"] if 1000 <= t < 1500] and any(t >= 1500 for t in times["Shed"])
    assert any(1000 <= t < 1300 for t in times["Bathroom"])  # the others keep going


def test_same_seed_same_bytes_other_seed_other_bytes():
    def stream(seed):
        house = builtin_house("demo", seed=seed, min_interval=30.0)
        return house.keys(), [(t, d.address, ad) for t, d, ad in Simulator(house).events(1200)]

    assert stream(7) == stream(7)
    k7, s7 = stream(7)
    k8, s8 = stream(8)
    assert s7 != s8 and set(k7) != set(k8) and set(k7.values()).isdisjoint(k8.values())


def test_truth_curves_are_plausible():
    d = StockDevice("LYWSD03MMC", seed=99)
    day = [d.truth_at(t) for t in range(0, 86400, 300)]
    temps = [x.temperature_c for x in day]
    hums = [x.humidity_pct for x in day]
    swing = d.climate.temperature_swing_c
    assert 1.6 * swing < max(temps) - min(temps) < 2 * swing + 1.5
    assert min(temps) > 15 and max(temps) < 30 and all(0 <= h <= 100 for h in hums)
    mt, mh = sum(temps) / len(temps), sum(hums) / len(hums)
    cov = sum((a - mt) * (b - mh) for a, b in zip(temps, hums, strict=True))
    corr = cov / math.sqrt(sum((a - mt) ** 2 for a in temps) * sum((b - mh) ** 2 for b in hums))
    assert corr < -0.8  # humidity falls when the room warms up
    month = [d.truth_at(t * 86400.0) for t in range(0, 120, 10)]
    assert month[-1].voltage_v < month[0].voltage_v - 0.1
    for x in month:
        assert x.battery_pct == battery_pct_for(x.voltage_v)
    assert battery_pct_for(V_FULL) == 100 and battery_pct_for(V_EMPTY) == 0
    assert d.truth_at(1234.5) == StockDevice("LYWSD03MMC", seed=99).truth_at(1234.5)


# --- house files ------------------------------------------------------------------------------------

EXAMPLE = """
seed = 42
time_factor = 60.0   # 1 real second = 60 simulated seconds
[[device]]
kind = "stock"
model = "LYWSD03MMC"
name = "Living room"
address = "A4:C1:38:00:00:01"
bindkey = "e9ea895fac7cca6d30532432a516f3a8"
[[device]]
kind = "pvvx"
adv_type = "bthome"
encrypted = true
"""


def test_example_house_loads():
    house = load_house(EXAMPLE)
    assert house.seed == 42 and house.time_factor == 60.0 and len(house.devices) == 2
    living, pvvx = house.devices
    assert living.address == "A4:C1:38:00:00:01" and living.label == "Living room"
    assert house.keys()[living.address] == "e9ea895fac7cca6d30532432a516f3a8"
    assert pvvx.bindkey and pvvx.format == "bthome_v2_enc" and pvvx.address.startswith("A4:C1:38:")


def test_house_file_path_and_toml_round_trip(tmp_path):
    house = builtin_house("demo")
    text = house.to_toml()
    path = tmp_path / "house.toml"
    path.write_text(text)
    again = load_house(path)
    assert again.to_toml() == text
    assert again.keys() == house.keys() and [d.spec() for d in again] == [d.spec() for d in house]
    a = [(t, d.address, ad) for t, d, ad in Simulator(house).events(1800)]
    b = [(t, d.address, ad) for t, d, ad in Simulator(again).events(1800)]
    assert a == b
    assert load_house(str(path)).keys() == house.keys()


def test_demo_keys_give_one_wrong_key():
    house = builtin_house()
    keys, demo = house.keys(), house.demo_keys()
    differ = [mac for mac in keys if keys[mac] != demo[mac]]
    garage = house.device("Garage")
    assert differ == [garage.address] and re.fullmatch(r"[0-9a-f]{32}", demo[garage.address])
    decoder = Decoder(demo)
    results = [decode(decoder, garage, f.ad) for f in garage.frames(1300) if f.has_data]
    assert results and all(r.error.code == ErrorCode.WRONG_KEY for r in results)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('kind = "stock"\nmodel = "LYWSD03MMC"\ncolour = "red"', "device[1].colour"),
        ('kind = "toaster"', "device[1].kind"),
        ('model = "LYWSD03MMC"', "device[1].kind"),
        ('kind = "stock"', "device[1].model"),
        ('kind = "stock"\nmodel = "LYWSD99"', "device[1].model"),
        ('kind = "stock"\nmodel = "MHO-C401"\nencrypted = false', "device[1].encrypted"),
        ('kind = "stock"\nmodel = "LYWSD03MMC"\nversion = 3', "device[1].version"),
        ('kind = "stock"\nmodel = "LYWSD03MMC"\nbindkey = "xyz"', "device[1].bindkey"),
        ('kind = "stock"\nmodel = "LYWSD03MMC"\nbindkey = "b853075158487ca39a5b5ea9"', "device[1].bindkey"),
        ('kind = "stock"\nmodel = "CGG1"\nbindkey = "e9ea895fac7cca6d30532432a516f3a8"', "device[1].bindkey"),
        ('kind = "stock"\nmodel = "LYWSD03MMC"\naddress = "A4:C1:38:00:00"', "device[1].address"),
        ('kind = "stock"\nmodel = "LYWSD03MMC"\naddress = "a4c138000001"', "device[1].address"),  # duplicate
        ('kind = "pvvx"\nadv_type = "zigbee"', "device[1].adv_type"),
        ('kind = "pvvx"\nmodel = "LYWSD02"', "device[1].model"),
        ('kind = "pvvx"\nmeasure_count = 1', "device[1].measure_count"),
        ('kind = "pvvx"\nadv_interval = "fast"', "device[1].adv_interval"),
        ('kind = "pvvx"\nadv_interval = -1', "device[1].adv_interval"),
        ('kind = "pvvx"\nencrypted = 1', "device[1].encrypted"),
        ('kind = "pvvx"\ninclude_mac = true', "device[1].include_mac"),
        ('kind = "bthome"\nversion = 1\ninclude_mac = true', "device[1].include_mac"),
        ('kind = "bthome"\nversion = 3', "device[1].version"),
        ('kind = "bthome"\nhumidity_pct = 120', "device[1].humidity_pct"),
    ],
)
def test_house_validation_names_device_and_field(body, where):
    text = f'[[device]]\nkind = "stock"\nmodel = "LYWSD03MMC"\naddress = "A4:C1:38:00:00:01"\n\n[[device]]\n{body}\n'
    with pytest.raises(HouseError) as e:
        load_house(text)
    assert str(e.value).startswith(where + ":"), str(e.value)
    assert e.value.index == 1 and e.value.field == where.split(".")[1]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("seed = 1\n", "device"),
        ('time_factor = 0\n[[device]]\nkind = "pvvx"\n', "time_factor"),
        ('time_factor = "fast"\n[[device]]\nkind = "pvvx"\n', "time_factor"),
        ('rooms = 3\n[[device]]\nkind = "pvvx"\n', "rooms"),
        ('min_interval = -5\n[[device]]\nkind = "pvvx"\n', "min_interval"),
    ],
)
def test_house_top_level_errors(text, field):
    with pytest.raises(HouseError) as e:
        load_house(text)
    assert e.value.field == field and e.value.index is None


def test_house_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(HouseError, match="not valid TOML"):
        load_house("seed = = 1\n")
    with pytest.raises(HouseError, match="cannot read"):
        load_house(tmp_path / "nope.toml")
    with pytest.raises(KeyError):
        builtin_house("castle")


# --- the runner -------------------------------------------------------------------------------------


async def test_run_virtual_time_matches_events():
    expected = [(t, d.address, ad) for t, d, ad in Simulator(builtin_house("minimal", min_interval=5.0)).events(900)]
    got = []

    async def sink(device, ad):
        got.append((device.address, ad))

    sim = Simulator(builtin_house("minimal", min_interval=5.0))
    n = await sim.run(sink, duration=900, realtime=False)
    assert n == len(expected) == len(got) and got == [(a, ad) for _, a, ad in expected]
    assert sim.now == 900


async def test_run_realtime_paces_frames_and_applies_faults():
    house = builtin_house("minimal", min_interval=5.0)
    sim = Simulator(house, time_factor=3000.0)  # 300 simulated seconds in 0.1 s
    pvvx = house.device("Bedroom")
    sim.call_at(100.0, lambda: pvvx.drop_out())
    got = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def sink(device, ad):
        got.append((sim.now, device.label, loop.time() - start))

    await sim.run(sink, duration=300.0)
    elapsed = loop.time() - start
    assert 0.09 <= elapsed < 1.0
    assert got and all(w >= t / 3000.0 - 0.005 for t, _, w in got)
    assert not [t for t, label, _ in got if label == "Bedroom" and t >= 100.0]
    assert [t for t, label, _ in got if label == "Bedroom" and t < 100.0]


async def test_run_stop():
    sim = Simulator(builtin_house("minimal", min_interval=5.0))
    got = []

    async def sink(device, ad):
        got.append(ad)
        if len(got) == 10:
            sim.stop()

    assert await sim.run(sink, realtime=False) == 10

"""Device settings: the stock settings service and the pvvx command channel (codecs, sans-IO machines),
their simulated device sides, and the async/CLI layer over the virtual radio."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as hs

from mitherm.cli import main
from mitherm.commands import settings as S
from mitherm.decoder import Decoder
from mitherm.keystore import Keystore
from mitherm.protocols import pvvx as pv
from mitherm.protocols import stock as st
from mitherm.radio.virtual import VirtualRadio
from mitherm.sim.devices import PvvxDevice, StockDevice
from mitherm.sim.gatt import pvvx as sim_pvvx
from mitherm.sim.gatt import serve_gatt
from mitherm.sim.gatt import stock as sim_stock

# --- pvvx config: bytes from the reference (firmware.md §1.4, §4) ------------------------------------------

V51_B16 = bytes.fromhex("87100a06280" + "4a9313104b4")  # LYWSD03MMC B1.6, v5.1 (pvvx/ZigbeeTLc#173)
V57_C401N = bytes.fromhex("00000a065006b431c80800")  # MHO-C401N, v5.7 (#806)
V55_2025 = bytes.fromhex("80000a065006b431c80e0000")  # v5.5, trailing extra byte (#743)


def test_config_v51_example():
    c = pv.decode_config(0x51, V51_B16)
    assert c.layout.name == "v5.1"
    assert (c.advertising_type, c.comfort_smiley, c.lp_measures, c.fahrenheit) == ("bthome", True, True, False)
    assert c.adv_flags and not c.encrypted
    assert (c.adv_delay, c.event_adv_cnt) == (10, 6)
    assert (c.adv_interval_ms, c.measure_interval, c.measure_period_s) == (2500.0, 4, 10.0)
    assert (c.tx_power, c.tx_power_dbm, c.connect_interval_ms, c.lcd_step_ms) == (0xA9, 0.04, 1000, 2450)
    assert (c.hw_id, c.hw_name, c.averaging, c.history_step_s) == (4, "LYWSD03MMC B1.6", 180, 1800.0)
    assert c.to_bytes() == V51_B16


def test_config_v57_mho_c401n():
    c = pv.decode_config(0x57, V57_C401N)
    assert (c.advertising_type, c.adv_interval_ms, c.measure_interval) == ("atc1441", 5000.0, 6)
    assert (c.hw_id, c.hw_name, c.averaging, c.lcd_step_ms) == (8, "MHO-C401N (2022)", 0, 10000)


def test_config_notification_with_trailing_byte():
    reply = pv.parse_reply(bytes([0x55, 0x55]) + V55_2025)
    assert isinstance(reply, pv.ConfigReply)
    assert reply.config.hw_id == 14 and reply.config.extra == b"\x00"
    assert reply.config.to_bytes() == V55_2025[:11]


def test_config_meaning_depends_on_version():
    # atc-mi-interface reads this v5.x config as offsets (firmware.md §4): the version byte decides
    old = pv.decode_config(0x46, V51_B16)
    assert (old.temp_offset, old.humi_offset, old.flg3, old.adv_delay) == (1.0, 0.6, None, None)
    assert old.hw_id == 4  # low nibble
    v47 = pv.decode_config(0x47, V51_B16)
    assert (v47.temp_offset, v47.flg3, v47.event_adv_cnt, v47.adv_delay) == (None, 10, 6, None)
    v1 = pv.decode_config(0x12, V51_B16[:9])
    assert (v1.layout.size, v1.hw_ver, v1.averaging, v1.hw_id) == (9, None, None, None)
    assert v1.to_bytes() == V51_B16[:9]
    bits = pv.decode_config(0x30, V51_B16[:9] + bytes([0b1111_0101, 0]))
    assert bits.hw_id == 5  # hwver:3
    extended = pv.decode_config(0x40, V51_B16[:8] + bytes([17, 0x8F, 0]))
    assert extended.hw_id == 17  # nibble 15 = extended: byte 8 carries 16+id
    with pytest.raises(pv.PvvxError):
        pv.decode_config(0x58, V51_B16[:10])


@pytest.mark.parametrize("layout", pv.LAYOUTS, ids=lambda layout: layout.name)
@given(data=hs.data())
def test_config_round_trip_every_version(layout: pv.ConfigLayout, data: hs.DataObject):
    upper = next((x.min_version for x in pv.LAYOUTS if x.min_version > layout.min_version), 0x100)
    version = data.draw(hs.integers(layout.min_version, upper - 1))
    raw = data.draw(hs.binary(min_size=layout.size, max_size=layout.size))
    extra = data.draw(hs.binary(max_size=2))
    cfg = pv.decode_config(version, raw + extra)
    assert cfg.layout == layout
    assert cfg.to_bytes() == raw
    assert cfg.extra == extra
    assert pv.decode_config(version, cfg.to_bytes()) == cfg
    assert pv.parse_reply(pv.config_request(cfg)[:1] + bytes([version]) + cfg.to_bytes()) == pv.ConfigReply(0x55, cfg)


# --- clamps (test_config()) -------------------------------------------------------------------------------------


def _clamped(**changes):
    cfg = replace(pv.decode_config(0x58, V51_B16), **changes)
    new, notes = pv.clamp_config(cfg)
    return new, {n.field: n for n in notes}


@pytest.mark.parametrize(
    ("changes", "field", "applied"),
    [
        ({"adv_interval": 0}, "adv_interval", 1),
        ({"adv_interval": 200}, "adv_interval", 160),
        ({"measure_interval": 1}, "measure_interval", 2),
        ({"adv_interval": 160, "measure_interval": 100}, "measure_interval", 24),  # 250 s cap
        ({"tx_power": 0x80}, "tx_power", 130),
        ({"tx_power": 0xFF}, "tx_power", 191),
        ({"tx_power": 10}, "tx_power", 23),
        ({"tx_power": 0x7F}, "tx_power", 63),
        ({"longrange": True}, "bt5phy", True),
        ({"lcd_step": 3}, "lcd_step", 10),
        ({"event_adv_cnt": 2}, "event_adv_cnt", 6),
    ],
)
def test_clamps(changes, field, applied):
    new, notes = _clamped(**changes)
    assert getattr(new, field) == applied
    assert notes[field].applied == applied
    assert ("test_config" if field != "event_adv_cnt" else "firmware.md") in notes[field].reason


def test_clamps_leave_valid_values_and_low_battery_latency():
    cfg = pv.decode_config(0x58, V51_B16)
    assert pv.clamp_config(cfg) == (cfg, [])
    new, notes = pv.clamp_config(replace(cfg, connect_latency=99), low_battery=True)
    assert new.connect_latency == 49 and notes[0].field == "connect_latency"
    assert pv.clamp_config(replace(cfg, connect_latency=99))[0].connect_latency == 99
    # 10 s interval × 24 = 240 s is allowed, × 25 = 250 s is not
    assert pv.clamp_config(replace(cfg, adv_interval=160, measure_interval=24))[1] == []


# --- requests and replies ---------------------------------------------------------------------------------------


def test_requests():
    key = bytes(range(16))
    assert pv.bindkey_request() == b"\x18"
    assert pv.bindkey_request(key) == b"\x18" + key == pv.bindkey_request(key.hex())
    with pytest.raises(ValueError):
        pv.bindkey_request(b"short")
    assert pv.time_request(0x01020304) == bytes.fromhex("2304030201")
    assert pv.history_request(50) == bytes.fromhex("3532000000")
    assert pv.history_request(100, 10) == bytes.fromhex("3564000a00")
    assert pv.comfort_request(21, 26, 30, 60) == bytes.fromhex("203408280ab80b7017")
    assert (pv.reboot_request(), pv.default_config_request(), pv.config_request()) == (b"\x72", b"\x56", b"\x55")
    assert pv.config_request(pv.decode_config(0x51, V51_B16)) == b"\x55" + V51_B16


def test_replies():
    key = bytes(range(16))
    assert pv.parse_reply(b"\x18\xff") == pv.BindkeyReply(None)
    assert pv.parse_reply(b"\x18" + key).hex == key.hex()
    assert pv.parse_reply(b"\x5a\xff") == pv.Unsupported(0x5A)  # 0x5A left the parser in 2023
    assert pv.parse_reply(b"\x33\xff") == pv.RawReply(0x33, b"\xff")  # 0xFF = "stream forever"
    assert pv.parse_reply(bytes.fromhex("23" + "10203040" + "01000000")) == pv.TimeReply(0x40302010, 1)
    assert pv.parse_reply(bytes.fromhex("2310203040")) == pv.TimeReply(0x40302010, None)
    assert pv.parse_reply(bytes.fromhex("203408280ab80b7017")) == pv.ComfortReply(21.0, 26.0, 30.0, 60.0)
    dev = pv.parse_reply(bytes.fromhex("0000040058000200ff000100"))
    assert isinstance(dev, pv.DeviceIdReply) and dev.version_text == "v5.8" and dev.hw_version == 4
    assert pv.parse_reply(b"\x72\x00") == pv.RebootReply(0)
    assert pv.parse_reply(b"\x35\x00\x00") == pv.HistoryEnd()
    with pytest.raises(pv.PvvxError):
        pv.parse_reply(b"")
    with pytest.raises(pv.PvvxError):
        pv.parse_reply(b"\x23\x01")


def test_local_epoch_is_local_time_as_utc():
    now = 1_700_000_000.0
    assert pv.local_epoch(now) - int(now) == time.localtime(now).tm_gmtoff


def test_pvvx_history_download_machine():
    m = pv.PvvxHistoryDownload(count=3)
    assert m.start() == bytes.fromhex("3503000000")
    recs = [st.HistoryRecord(i, 1000 * i, 21.5 + i, 40.25, voltage_v=2.95) for i in (1, 2)]
    assert m.receive(b"\x33\x01") == []  # another command's notification
    events = m.receive(pv.encode_history_record(recs[0]))
    assert events == [recs[0], st.HistoryProgress(1, None)]
    m.receive(pv.encode_history_record(recs[1]))
    assert m.receive(pv.HISTORY_END) == [st.HistoryProgress(2, 2, done=True)]
    assert m.done and m.records == recs
    assert m.receive(pv.encode_history_record(recs[0])) == []
    full = pv.PvvxHistoryDownload(count=1)
    assert full.receive(pv.encode_history_record(recs[0]))[-1].done
    bad = pv.PvvxHistoryDownload()
    with pytest.raises(pv.PvvxError):
        bad.receive(b"\x35\xff")


def test_atc1441_commands():
    assert pv.atc1441_request("display_fahrenheit") == b"\xff"
    assert pv.atc1441_request("advertise_mi") == b"\xaf"
    assert pv.atc1441_request("temp_offset", -5) == b"\xfa\xfb"
    assert pv.atc1441_request("adv_interval", 3) == b"\xfe\x03"
    with pytest.raises(ValueError):
        pv.atc1441_request("temp_offset")
    with pytest.raises(ValueError):
        pv.atc1441_request("nope")


# --- stock codecs (keys.md §4.1) ---------------------------------------------------------------------------------


def test_stock_codecs():
    assert st.encode_unit("F") == b"\x01" and st.encode_unit("°c") == b"\x00"
    assert st.decode_unit(b"\x01") == "F" and st.decode_unit(b"\x00") == "C" and st.decode_unit(b"\xff") == "C"
    with pytest.raises(st.StockError):
        st.encode_unit("K")
    assert st.encode_clock(st.ClockValue(0x01020304, -5)) == bytes.fromhex("04030201fb")
    assert st.decode_clock(bytes.fromhex("04030201fb")) == st.ClockValue(0x01020304, -5)
    assert st.decode_clock(bytes.fromhex("04030201")) == st.ClockValue(0x01020304, None)
    assert st.decode_live(bytes.fromhex("3a0832c40b")) == st.LiveData(21.06, 50.0, 3.012)
    assert st.decode_live(bytes.fromhex("3a0832")).voltage_v is None  # MHO-C401: 3 bytes
    assert st.encode_live(21.06, 50.2, 3.012) == bytes.fromhex("3a0832c40b")
    comfort = st.decode_comfort(bytes.fromhex("8c0a6c075514"))  # the MHO-C401 sample
    assert comfort == st.Comfort(27.0, 19.0, 85, 20)
    assert st.encode_comfort(comfort) == bytes.fromhex("8c0a6c075514")
    assert st.host_clock(1_700_000_000.0).tz_hours == round(time.localtime(1_700_000_000).tm_gmtoff / 3600)


@given(
    index=hs.integers(0, 2**32 - 1),
    ts=hs.integers(0, 2**32 - 1),
    t=hs.integers(-400, 600),
    dt=hs.integers(0, 100),
    h=hs.integers(0, 100),
    dh=hs.integers(0, 100),
)
def test_stock_history_record_round_trip(index, ts, t, dt, h, dh):
    rec = st.HistoryRecord(
        index,
        ts,
        temperature_min_c=t / 10,
        temperature_max_c=(t + dt) / 10,
        humidity_min_pct=float(min(h, 100 - dh)),
        humidity_max_pct=float(min(h + dh, 100)),
    )
    assert st.decode_history_record(st.encode_history_record(rec)) == rec


def test_stock_history_download_machine():
    counters = st.HistoryCounters(last_index=3, next_index=4)
    m = st.StockHistoryDownload(st.encode_history_counters(counters))
    assert (m.start(), m.total, m.done) == (b"\x00\x00\x00\x00", 4, False)
    recs = [
        st.HistoryRecord(
            i, 3600 * i, temperature_min_c=20.0, temperature_max_c=21.5, humidity_min_pct=40.0, humidity_max_pct=45.0
        )
        for i in range(4)
    ]
    events = m.receive(st.encode_history_record(recs[0]))
    assert events == [recs[0], st.HistoryProgress(1, 4)]
    for r in recs[1:]:
        m.receive(st.encode_history_record(r))
    assert m.done and m.records == recs
    assert m.receive(st.encode_history_record(recs[0])) == []
    assert st.StockHistoryDownload(st.HistoryCounters(0, 0)).done  # nothing stored
    late = st.StockHistoryDownload(counters, start_index=2)
    assert late.receive(st.encode_history_record(recs[1])) == []  # stale record before the start
    assert late.total == 2 and late.start() == b"\x02\x00\x00\x00"
    with pytest.raises(st.StockError):
        st.decode_history_record(b"\x00" * 13)


# --- pvvx settings parsing -----------------------------------------------------------------------------------------


def test_apply_pvvx_settings():
    cfg = pv.decode_config(0x58, V51_B16)
    new, clamps, limits = S.apply_pvvx_settings(
        cfg,
        {
            "advertising": "custom",
            "interval": "1s",
            "measure": "10s",
            "unit": "F",
            "encrypted": "on",
            "comfort": "20-25.5/35-65",
            "tx": "0xBF",
            "latency": "500ms",
        },
    )
    assert (new.advertising_type, new.adv_interval, new.measure_interval) == ("pvvx", 16, 10)
    assert (new.fahrenheit, new.encrypted, new.tx_power, new.connect_latency) == (True, True, 0xBF, 24)
    assert clamps == [] and limits == (20.0, 25.5, 35.0, 65.0)
    new, clamps, _ = S.apply_pvvx_settings(cfg, {"interval": "20000ms"})
    assert new.adv_interval == 160 and clamps[0].field == "adv_interval"
    for bad in (
        {"advertising": "zigbee"},
        {"encrypted": "maybe"},
        {"tx": "300"},
        {"bogus": "1"},
        {"comfort": "26-21/30-60"},
    ):
        with pytest.raises(S.SettingsError):
            S.apply_pvvx_settings(cfg, bad)


def test_cli_rejects_bad_input_before_connecting():
    runner = CliRunner()
    result = runner.invoke(main, ["set", "A4:C1:38:00:00:01", "unit", "K"])
    assert result.exit_code == 1 and "unit must be C or F" in result.output
    result = runner.invoke(main, ["pvvx", "A4:C1:38:00:00:01", "set", "bogus=1"])
    assert result.exit_code == 1 and "unknown setting" in result.output
    result = runner.invoke(main, ["pvvx", "A4:C1:38:00:00:01", "set", "novalue"])
    assert result.exit_code == 2
    result = runner.invoke(main, ["read", "not-a-mac"])
    assert result.exit_code == 1


def test_diff_table_marks_changes():
    from rich.console import Console

    before = pv.decode_config(0x58, V51_B16)
    after = replace(before, advertising_type="pvvx")
    console = Console(record=True, width=120)
    S._print_set_result(console, "A4:C1:38:00:00:01", {"before": before, "after": after, "clamps": []})
    text = console.export_text()
    assert "advertising" in text and "bthome" in text and "pvvx" in text


# --- over the virtual radio ----------------------------------------------------------------------------------------


@pytest.fixture
async def radio():
    async with VirtualRadio() as radio:
        yield radio


async def _serve(radio: VirtualRadio, device):
    adv = await radio.add_advertiser(device.address, interval_ms=20)
    await adv.set_data(device.next_frame().ad)
    await serve_gatt(adv, device)
    return adv


async def _wait(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_stock_unit_clock_live(radio):
    dev = StockDevice("LYWSD03MMC", seed=11)
    await _serve(radio, dev)
    assert await S.set_unit(dev.address, "F", radio=radio) == ("C", "F")
    assert sim_stock.state_of(dev).unit == 1
    assert await S.set_unit(dev.address, "C", radio=radio) == ("F", "C")
    result = await S.set_clock(dev.address, radio=radio, now=1_700_000_000.0)
    assert result["written"] == result["after"] == 1_700_000_000
    assert sim_stock.state_of(dev).tz_hours == st.host_clock(1_700_000_000.0).tz_hours
    live = await S.read_live(dev.address, radio=radio)
    truth = dev.truth_at(dev.now)
    assert live.firmware == "stock"
    assert (live.temperature_c, live.humidity_pct, live.voltage_v) == (
        truth.temperature_c,
        round(truth.humidity_pct),
        truth.voltage_v,
    )


async def test_stock_history_download(radio):
    dev = StockDevice("LYWSD03MMC", seed=12)
    await _serve(radio, dev)
    progress: list[st.HistoryProgress] = []
    records = await S.download_device_history(dev.address, radio=radio, progress=progress.append)
    state = sim_stock.state_of(dev)
    counters = state.counters()
    assert len(records) == counters.next_index == 24
    assert records == [state.record(i) for i in range(counters.next_index)]
    assert progress[-1] == st.HistoryProgress(24, 24, done=True)
    assert all(r.temperature_min_c <= r.temperature_max_c for r in records)


async def test_pvvx_config_changes_adverts(radio):
    dev = PvvxDevice("pvvx", seed=21)
    await _serve(radio, dev)
    cfg = await S.pvvx_config(dev.address, radio=radio)
    assert (cfg.version, cfg.advertising_type, cfg.adv_interval_ms, cfg.encrypted) == (0x58, "pvvx", 2500.0, False)
    decoder = Decoder()
    frame = dev.next_frame()
    assert decoder.decode(dev.address, frame.service_uuid, frame.payload).format == "pvvx"

    result = await S.pvvx_set(dev.address, {"advertising": "bthome", "interval": "1000ms"}, radio=radio)
    assert (result["before"].advertising_type, result["after"].advertising_type) == ("pvvx", "bthome")
    assert (dev.adv_type, dev.adv_interval) == ("bthome", 1.0)
    frame = dev.next_frame()
    reading = decoder.decode(dev.address, frame.service_uuid, frame.payload)
    assert reading.format == "bthome_v2" and reading.error is None

    # the firmware clamps: the device echoes what it applied
    result = await S.pvvx_set(dev.address, {"interval": "20s"}, radio=radio)
    assert result["after"].adv_interval == 160 and dev.adv_interval == 10.0


async def test_pvvx_bindkey_encrypts_adverts(radio, tmp_path):
    dev = PvvxDevice("bthome", seed=22)
    adv = await _serve(radio, dev)
    assert (await S.pvvx_bindkey(dev.address, radio=radio))["key"] is None  # 18 FF: none stored
    store = Keystore(tmp_path / "keys.json")
    result = await S.pvvx_bindkey(dev.address, new=True, keystore=store, radio=radio)
    key = result["key"]
    assert result["changed"] and result["stored"] and not result["encrypted"]
    entry = Keystore(tmp_path / "keys.json").get(dev.address)
    assert entry is not None and (entry.bindkey, entry.source) == (key, "pvvx")
    assert sim_pvvx.state_of(dev).bindkey == bytes.fromhex(key)

    await S.pvvx_set(dev.address, {"encrypted": "on"}, radio=radio)
    assert dev.encrypted and dev.bindkey == key
    frame = dev.next_frame()
    assert Decoder({dev.address: key}).decode(dev.address, frame.service_uuid, frame.payload).values

    # the doctor confirms it on the adverts
    stop = asyncio.Event()

    async def pump() -> None:
        while not stop.is_set():
            f = dev.next_frame()
            if f is not None:
                await adv.set_data(f.ad)
            await asyncio.sleep(0.03)

    task = asyncio.create_task(pump())
    try:
        dx = await S.verify_bindkey(dev.address, key, radio=radio, timeout=10)
    finally:
        stop.set()
        await task
    assert dx.ok, dx.advice

    # a second key replaces it while encrypted: the device re-keys at once
    other = "00112233445566778899aabbccddeeff"
    await S.pvvx_bindkey(dev.address, other, keystore=store, radio=radio)
    assert dev.bindkey == other


async def test_pvvx_time_reboot_history_unsupported(radio):
    dev = PvvxDevice("bthome", seed=23)
    await _serve(radio, dev)
    result = await S.pvvx_time(dev.address, radio=radio)
    assert result["after"] == result["written"]
    state = sim_pvvx.state_of(dev)
    await S.pvvx_reboot(dev.address, radio=radio)
    await _wait(lambda: state.reboots == 1)

    progress: list[st.HistoryProgress] = []
    records = await S.download_device_history(dev.address, radio=radio, progress=progress.append)
    assert len(records) == state.history_count() > 0
    assert [r.index for r in records[:3]] == [1, 2, 3]
    assert records[0] == state.history_record(1) and records[0].timestamp > records[1].timestamp
    assert progress[-1].done and progress[-1].received == len(records)

    live = await S.read_live(dev.address, radio=radio)
    truth = dev.truth_at(dev.now)
    assert (live.temperature_c, live.humidity_pct, live.voltage_v) == (
        truth.temperature_c,
        truth.humidity_pct,
        truth.voltage_v,
    )

    async with S._connected(dev.address, radio) as link:
        channel = await S._pvvx(link)
        with pytest.raises(S.PvvxUnsupported):
            await channel.command(b"\x5a")
        reply = await channel.command(b"\x00")
        assert isinstance(reply, pv.DeviceIdReply) and reply.version_text == "v5.8"


async def test_pvvx_defaults_restore_config(radio):
    dev = PvvxDevice("mi", seed=24)
    await _serve(radio, dev)
    async with S._connected(dev.address, radio) as link:
        channel = await S._pvvx(link)
        reply = await channel.command(pv.default_config_request())
        assert isinstance(reply, pv.ConfigReply) and reply.config.advertising_type == "bthome"
        assert reply.config.extra == b"\x00"  # one byte more than cfg_t, as the firmware sends
        partial = await channel.command(b"\x55\x81")  # a prefix write: only flg changes
        assert partial.config.advertising_type == "pvvx" and partial.config.adv_interval == 40
    assert dev.adv_type == "pvvx"


async def test_fault_device_never_answers(radio):
    for dev in (StockDevice("LYWSD03MMC", seed=31), PvvxDevice("bthome", seed=32)):
        await _serve(radio, dev)
        (sim_stock if dev.kind == "stock" else sim_pvvx).state_of(dev).mute = True
        started = time.monotonic()
        with pytest.raises(S.SettingsError, match="did not answer"):
            await S.download_device_history(dev.address, radio=radio, reply_timeout=0.3)
        assert time.monotonic() - started < 5


async def test_fault_disconnect_mid_download(radio):
    for dev in (StockDevice("LYWSD03MMC", seed=33), PvvxDevice("bthome", seed=34)):
        await _serve(radio, dev)
        (sim_stock if dev.kind == "stock" else sim_pvvx).state_of(dev).drop_history_after = 3
        seen: list[st.HistoryProgress] = []
        with pytest.raises(S.SettingsError, match="disconnected"):
            await S.download_device_history(dev.address, radio=radio, progress=seen.append, reply_timeout=3)
        assert len(seen) == 3


async def test_pvvx_commands_refuse_stock_device(radio):
    dev = StockDevice("LYWSD03MMC", seed=35)
    await _serve(radio, dev)
    with pytest.raises(S.SettingsError, match="stock firmware"):
        await S.pvvx_config(dev.address, radio=radio)


def test_history_record_values():
    rec = st.HistoryRecord(1, 2, temperature_c=20.5, voltage_v=3.0)
    assert rec.values() == {"temperature_c": 20.5, "voltage_v": 3.0}
    assert rec.to_json() == {"index": 1, "timestamp": 2, "temperature_c": 20.5, "voltage_v": 3.0}
    assert struct.calcsize("<IIhBhB") == 14


async def test_download_with_progress_bar(radio):
    from rich.console import Console

    dev = StockDevice("MHO-C401", seed=36)
    await _serve(radio, dev)
    console = Console(record=True, force_terminal=False)
    records = await S.download_with_progress(dev.address, radio=radio, console=console)
    assert len(records) == 24
    live = await S.read_live(dev.address, radio=radio)
    assert live.voltage_v is None  # the MHO-C401 sends 3 bytes


# --- the CLI on a virtual house (--sim) ------------------------------------------------------------------------

STOCK_MAC = "A4:C1:38:00:00:01"
PVVX_MAC = "A4:C1:38:00:00:02"
SIM_HOUSE = f"""time_factor = 4.0

[[device]]
kind = "stock"
model = "LYWSD03MMC"
address = "{STOCK_MAC}"

[[device]]
kind = "pvvx"
adv_type = "pvvx"
encrypted = true
address = "{PVVX_MAC}"
"""


@pytest.fixture
def house_file(tmp_path):
    path = tmp_path / "house.toml"
    path.write_text(SIM_HOUSE)
    return str(path)


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_read_and_set_on_sim(house_file):
    out = _cli("read", STOCK_MAC, "--sim", house_file, "--json")
    assert out.exit_code == 0, out.output
    live = json.loads(out.output)
    assert live["firmware"] == "stock" and 0 < live["humidity_pct"] <= 100 and -30 < live["temperature_c"] < 50
    out = _cli("read", PVVX_MAC, "--sim", house_file)
    assert out.exit_code == 0, out.output
    assert "°C" in out.output and "(pvvx)" in out.output

    out = _cli("set", STOCK_MAC, "unit", "F", "--sim", house_file)
    assert out.exit_code == 0, out.output
    assert "unit: C -> F" in out.output
    out = _cli("set", PVVX_MAC, "unit", "F", "--sim", house_file, "--timeout", "5")
    assert out.exit_code == 0, out.output
    assert "unit: C -> F" in out.output


def test_cli_pvvx_config_and_set_on_sim(house_file):
    out = _cli("pvvx", PVVX_MAC, "--sim", house_file, "config", "--json")
    assert out.exit_code == 0, out.output
    cfg = json.loads(out.output)
    assert (cfg["advertising_type"], cfg["encrypted"], cfg["version_text"]) == ("pvvx", True, "v5.8")
    # the connection options also work after the subcommand
    out = _cli("pvvx", PVVX_MAC, "config", "--sim", house_file, "--timeout", "5")
    assert out.exit_code == 0, out.output
    assert f"{PVVX_MAC} config" in out.output and "v5.8" in out.output

    out = _cli("pvvx", PVVX_MAC, "--sim", house_file, "set", "advertising=bthome")
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if "advertising" in line)
    assert row.index("pvvx") < row.index("bthome")  # before -> after

    out = _cli("pvvx", PVVX_MAC, "--sim", house_file, "time")
    assert out.exit_code == 0 and "device time" in out.output, out.output
    out = _cli("pvvx", STOCK_MAC, "--sim", house_file, "config")
    assert out.exit_code == 1 and "stock firmware" in out.output


def test_cli_pvvx_bindkey_on_sim_stores_and_verifies(house_file, tmp_path):
    keys = tmp_path / "keys.json"
    args = ("pvvx", PVVX_MAC, "--sim", house_file, "bindkey", "--new", "--keystore", str(keys))
    out = _cli(*args, "--verify-timeout", "10")
    assert out.exit_code == 0, out.output
    entry = Keystore(keys).get(PVVX_MAC)
    assert entry is not None and entry.source == "pvvx"
    assert f"{entry.bindkey[:4]}…{entry.bindkey[-4:]}" in out.output and entry.bindkey not in out.output
    # the check listened on the same virtual house, where the device encrypts with the new key
    assert "check on the next advert: ok" in out.output


def test_cli_connection_option_errors(house_file):
    for args in (
        ("read", STOCK_MAC, "--sim", house_file, "--source", "bumble:usb:0"),
        ("set", STOCK_MAC, "unit", "C", "--source", "bleak:", "--sim", house_file),
        ("pvvx", PVVX_MAC, "--sim", house_file, "config", "--source", "bumble:usb:0"),
        ("pvvx", PVVX_MAC, "--source", "bumble:usb:0", "--sim", house_file, "bindkey"),
    ):
        out = _cli(*args)
        assert out.exit_code == 1 and "give --source or --sim, not both" in out.output, (args, out.output)
    out = _cli("read", STOCK_MAC, "--sim", house_file, "--transport", "usb:0")  # the old, hidden spelling
    assert out.exit_code == 1 and "give --transport or --sim, not both" in out.output
    out = _cli("read", STOCK_MAC, "--source", "serial:x")
    assert out.exit_code == 1 and "cannot connect through" in out.output
    out = _cli("read", STOCK_MAC, "--sim", str(house_file) + ".missing")
    assert out.exit_code == 1 and "does not exist" in out.output
    out = _cli("pvvx", PVVX_MAC, "--timeout")
    assert out.exit_code == 2 and "requires an argument" in out.output
    assert "--transport" not in _cli("read", "--help").output

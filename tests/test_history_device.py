"""``mitherm history MAC --from-device``: the history stored on a device, its times converted from the device
clock to host time, printed and saved into the history database."""

from __future__ import annotations

import itertools
import json
import os
import time

import pytest
from click.testing import CliRunner

from mitherm.commands import history as H
from mitherm.commands import settings as S
from mitherm.history import History
from mitherm.protocols import pvvx as pv
from mitherm.protocols.stock import HistoryRecord
from mitherm.radio.virtual import VirtualRadio
from mitherm.sim.devices import PvvxDevice, StockDevice
from mitherm.sim.gatt import pvvx as sim_pvvx
from mitherm.sim.gatt import serve_gatt
from mitherm.sim.gatt import stock as sim_stock
from mitherm.sim.house import builtin_house

TOLERANCE_S = 3.0


@pytest.fixture
async def radio():
    async with VirtualRadio() as radio:
        yield radio


@pytest.fixture
def tz_plus2():
    """The host in UTC+2 (a POSIX TZ string: no zoneinfo needed)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ-2"
    time.tzset()
    yield 7200
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


async def _serve(radio: VirtualRadio, device):
    adv = await radio.add_advertiser(device.address, interval_ms=20)
    await adv.set_data(device.next_frame().ad)
    await serve_gatt(adv, device)
    return adv


def _host_time(device, sim_t: float, host_now: float) -> float:
    """Host time of simulated time ``sim_t``: the device's time axis stands still at ``device.now`` (nothing
    advances it over the bare radio), which is ``host_now``."""
    return host_now + (sim_t - device.now)


# --- over the virtual radio --------------------------------------------------------------------------------


async def test_stock_unset_clock_converted_to_host_time(radio):
    dev = StockDevice("LYWSD03MMC", seed=41)
    await _serve(radio, dev)
    state = sim_stock.state_of(dev)
    host_now = time.time()
    dh = await H.fetch_device_history(dev.address, radio=radio)
    assert (dh.firmware, dh.clock, len(dh.records)) == ("stock", "unset", 24)
    assert "not set" in dh.correction and "power-up" in dh.correction
    for rec, ts in zip(dh.records, dh.times, strict=True):
        hour_start = (rec.index - state.uptime_hours) * 3600.0  # the record's hour on the simulated axis
        assert abs(ts - _host_time(dev, hour_start, host_now)) < TOLERANCE_S
        assert rec == state.record(rec.index)  # values untouched
    rows = dh.rows()
    assert {r.quantity for r in rows} == {
        "temperature_min_c",
        "temperature_max_c",
        "humidity_min_pct",
        "humidity_max_pct",
    }
    assert rows == sorted(rows, key=lambda r: r.ts)


async def test_stock_set_clock_is_utc(radio):
    dev = StockDevice("MHO-C401", seed=42)
    await _serve(radio, dev)
    await S.set_clock(dev.address, radio=radio, now=time.time() - 30)  # a clock 30 s slow
    host_now = time.time()
    dh = await H.fetch_device_history(dev.address, radio=radio)
    assert dh.clock == "utc" and 28 <= dh.offset <= 32
    assert "UTC" in dh.correction
    state = sim_stock.state_of(dev)
    for rec, ts in zip(dh.records, dh.times, strict=True):
        assert abs(ts - _host_time(dev, (rec.index - state.uptime_hours) * 3600.0, host_now)) < TOLERANCE_S


async def test_pvvx_unset_clock(radio):
    dev = PvvxDevice("bthome", seed=43)
    await _serve(radio, dev)
    state = sim_pvvx.state_of(dev)
    host_now = time.time()
    dh = await H.fetch_device_history(dev.address, radio=radio)
    assert dh.firmware == "pvvx" and dh.clock == "unset" and "boot" in dh.correction
    assert len(dh.records) == state.history_count() > 0
    step = state.history_step
    newest_end = (dev.now + state.uptime_s) // step * step - state.uptime_s
    for rec, ts in zip(dh.records, dh.times, strict=True):
        end = newest_end - (rec.index - 1) * step  # the end of the record's averaging period
        assert abs(ts - _host_time(dev, end, host_now)) < TOLERANCE_S
    assert {r.quantity for r in dh.rows()} == {"temperature_c", "humidity_pct", "voltage_v"}


async def test_pvvx_local_time_clock(radio, tz_plus2):
    dev = PvvxDevice("pvvx", seed=44)
    await _serve(radio, dev)
    state = sim_pvvx.state_of(dev)
    result = await S.pvvx_time(dev.address, radio=radio)  # what the official tools write: local time as UTC
    assert abs(result["written"] - pv.local_epoch()) < 3 and abs(result["written"] - time.time() - tz_plus2) < 3
    host_now = time.time()
    dh = await H.fetch_device_history(dev.address, radio=radio)
    assert dh.clock == "local" and dh.tz_offset == tz_plus2
    assert abs(dh.offset + tz_plus2) <= 2
    assert "local time" in dh.correction and "UTC+02:00" in dh.correction
    step = state.history_step
    newest_end = (dev.now + state.uptime_s) // step * step - state.uptime_s
    for rec, ts in zip(dh.records, dh.times, strict=True):
        assert abs(ts - _host_time(dev, newest_end - (rec.index - 1) * step, host_now)) < TOLERANCE_S


async def test_save_skips_stored_records(radio, tmp_path):
    dev = StockDevice("LYWSD03MMC", seed=45)
    await _serve(radio, dev)
    db = History(tmp_path / "h.sqlite3")
    with db:
        dh = await H.fetch_device_history(dev.address, radio=radio)
        assert H.save_device_history(db, dh) == (96, 0)
        again = await H.fetch_device_history(dev.address, radio=radio)
        assert H.save_device_history(db, again) == (0, 96)
        stored = db.readings(dh.mac)
        assert len(stored) == 96 and {r.ts for r in stored} == set(dh.times)
        assert db.device(dh.mac) is not None
        assert {h.quantity for h in db.hourly(dh.mac)} >= {"temperature_min_c", "humidity_max_pct"}


async def test_device_that_never_answers(radio):
    for dev in (StockDevice("LYWSD03MMC", seed=46), PvvxDevice("bthome", seed=47)):
        await _serve(radio, dev)
        (sim_stock if dev.kind == "stock" else sim_pvvx).state_of(dev).mute = True
        started = time.monotonic()
        with pytest.raises(S.SettingsError, match="did not answer"):
            await H.fetch_device_history(dev.address, radio=radio, reply_timeout=0.3)
        assert time.monotonic() - started < 5


# --- the conversion alone --------------------------------------------------------------------------------------


def test_convert_stock_records_from_before_the_clock_was_set():
    now = 1_800_000_000
    records = [HistoryRecord(i, 3600 * i, temperature_min_c=20.0) for i in range(3)]  # power-up count
    records += [HistoryRecord(i, now - 3600 * (5 - i)) for i in range(3, 5)]  # after the clock was set
    sample = H.ClockSample(now, now + 10.5)
    dh = H.convert_device_history("A4:C1:38:00:00:01", "stock", records, sample, sample, tz_offset=0)
    assert dh.clock == "utc" and dh.offset == 10 and dh.estimated == 3
    assert dh.times == [float(now - 3600 * (5 - i) + 10) for i in range(5)]
    assert "estimated from their index" in dh.correction
    pvvx = H.convert_device_history("A4:C1:38:00:00:01", "pvvx", records, sample, sample, tz_offset=0)
    assert pvvx.dropped == 3 and len(pvvx.records) == 2


def test_convert_far_off_clock_and_filter():
    recs = [HistoryRecord(1, 1_700_000_000, temperature_c=21.5), HistoryRecord(2, 1_699_998_200, temperature_c=21.0)]
    sample = H.ClockSample(1_700_000_100, 1_700_086_500.5)  # a day behind
    dh = H.convert_device_history("A4:C1:38:00:00:02", "pvvx", recs, sample, sample, tz_offset=3600)
    assert dh.clock == "off" and dh.offset == 86400 and "24.0 h behind" in dh.correction
    assert [r.ts for r in dh.rows()] == [1_700_084_600.0, 1_700_086_400.0]  # oldest first
    assert [r.ts for r in dh.rows(since=1_700_085_000)] == [1_700_086_400.0]


# --- the command (--sim minimal) ---------------------------------------------------------------------------


def _minimal(kind: str) -> str:
    return next(d.address for d in builtin_house("minimal").devices if d.kind == kind)


def test_cli_from_device_json_and_save(tmp_path):
    from mitherm.cli import main

    db = tmp_path / "h.sqlite3"
    runner = CliRunner()
    mac = _minimal("stock")
    args = ["history", mac, "--from-device", "--sim", "minimal", "--db", str(db)]
    result = runner.invoke(main, [*args, "--json", "--save"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 24 and {"time", "ts", "temperature_min_c", "humidity_max_pct"} <= set(lines[0])
    now = time.time()
    assert all(b["ts"] - a["ts"] == 3600 for a, b in itertools.pairwise(lines))
    assert now - 2 * 3600 <= lines[-1]["ts"] <= now  # the newest complete hour
    assert "device clock not set" in result.stderr and "saved 96 values" in result.stderr

    again = runner.invoke(main, [*args, "--csv", "--save", "--since", "3h"])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[0].startswith("time,temperature_min_c")
    assert "saved 0 values" in again.stderr

    stored = runner.invoke(main, ["history", mac, "--db", str(db), "--since", "2d", "--json"])
    assert stored.exit_code == 0 and len(stored.stdout.splitlines()) == 24

    table = runner.invoke(main, ["history", _minimal("pvvx"), "--from-device", "--sim", "minimal"])
    assert table.exit_code == 0, table.output
    assert "device records (pvvx)" in table.stdout and "counts from boot" in table.stdout


def test_cli_errors(tmp_path):
    from mitherm.cli import main

    runner = CliRunner()
    unknown = runner.invoke(
        main, ["history", "A4:C1:38:00:00:99", "--from-device", "--sim", "minimal", "--timeout", "1"]
    )
    assert unknown.exit_code == 1 and "Error:" in unknown.output and unknown.exception.__class__ is SystemExit
    usage = runner.invoke(main, ["history", "A4:C1:38:00:00:99", "--save", "--db", str(tmp_path / "x")])
    assert usage.exit_code == 2 and "--from-device" in usage.output
    both = runner.invoke(main, ["history", "A4:C1:38:00:00:99", "--from-device", "--sim", "minimal", "--hourly"])
    assert both.exit_code == 2

"""SQLite history: round trip, hourly aggregates, prune, crash safety, CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from mitherm.commands.history import history as history_cmd
from mitherm.commands.history import parse_time
from mitherm.history import SCHEMA_VERSION, History, HistoryError

MAC = "A4:C1:38:12:34:56"
H0 = 1_700_000_000 // 3600 * 3600  # an hour boundary


@pytest.fixture
def db(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    yield h
    h.close()


def test_schema_and_pragmas(tmp_path):
    path = tmp_path / "sub" / "h.sqlite3"
    History(path).close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"devices", "quantities", "qsets", "raw_chunks", "hourly", "state"} <= tables
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(HistoryError, match="schema version 99"):
        History(path)


def test_values_round_trip(db):
    assert (
        db.add(
            "a4c138123456",
            H0 + 1.5,
            {"temperature_c": 21.5, "humidity_pct": 45, "note": "x", "low": True, "nan": float("nan")},
        )
        == 3
    )
    db.add(MAC, H0 + 2.5, {"temperature_c": -3.25})
    assert db.pending == 4
    assert db.flush() == 4
    assert db.pending == 0
    rows = db.readings(MAC)
    assert [(r.ts, r.quantity, r.value) for r in rows] == [
        (H0 + 1.5, "temperature_c", 21.5),
        (H0 + 1.5, "humidity_pct", 45.0),
        (H0 + 1.5, "low", 1.0),
        (H0 + 2.5, "temperature_c", -3.25),
    ]
    assert [r.value for r in db.readings(MAC, quantity="temperature_c")] == [21.5, -3.25]
    assert [r.value for r in db.readings(MAC, since=H0 + 2)] == [-3.25]
    assert [r.value for r in db.readings(MAC, until=H0 + 2, quantity=["humidity_pct", "low"])] == [45.0, 1.0]
    assert db.readings("A4:C1:38:00:00:00") == []
    # queries see buffered values without an explicit flush
    db.add(MAC, H0 + 3, {"temperature_c": 1.0})
    assert len(db.readings(MAC, quantity="temperature_c")) == 3


def test_hourly_aggregates_are_incremental(db):
    temps = [20.0, 22.0, 18.5, 21.0]
    for i, t in enumerate(temps[:2]):
        db.add(MAC, H0 + 60 * i, {"temperature_c": t, "battery_pct": 90})
    db.flush()
    for i, t in enumerate(temps[2:], start=2):
        db.add(MAC, H0 + 60 * i, {"temperature_c": t})
    db.add(MAC, H0 + 3600 + 5, {"temperature_c": 30.0})  # next hour
    db.flush()
    rows = {(r.hour, r.quantity): r for r in db.hourly(MAC)}
    t = rows[(H0, "temperature_c")]
    assert (t.min, t.max, t.count) == (18.5, 22.0, 4)
    assert t.mean == pytest.approx(sum(temps) / 4)
    assert rows[(H0, "battery_pct")][2:] == (90.0, 90.0, 90.0, 2)
    assert rows[(H0 + 3600, "temperature_c")][2:] == (30.0, 30.0, 30.0, 1)
    assert [r.hour for r in db.hourly(MAC, since=H0 + 1800, quantity="temperature_c")] == [H0, H0 + 3600]
    assert [r.hour for r in db.hourly(MAC, since=H0 + 3600)] == [H0 + 3600]
    assert [r.hour for r in db.hourly(MAC, until=H0 + 3600)] == [H0, H0]


def test_prune_keeps_hourly(db):
    now = time.time()
    db.add(MAC, now - 10 * 86400, {"temperature_c": 1.0})
    db.add(MAC, now - 3 * 86400, {"temperature_c": 2.0})
    db.add(MAC, now - 60, {"temperature_c": 3.0})
    assert db.prune(raw_days=7) == 1
    assert [r.value for r in db.readings(MAC)] == [2.0, 3.0]
    assert db.prune(raw_days=0.5) == 1
    assert [r.value for r in db.readings(MAC)] == [3.0]
    assert sum(r.count for r in db.hourly(MAC)) == 3  # aggregates stay


def test_devices(db):
    db.add(MAC, 1000.0, {"temperature_c": 1.0})
    db.add(MAC, 2000.0, {"temperature_c": 1.0})
    db.upsert_device(MAC, model="LYWSD03MMC", format="pvvx", ts=1500.0)
    (d,) = db.devices()
    assert (d.mac, d.name, d.model, d.format, d.first_seen, d.last_seen) == (
        MAC,
        None,
        "LYWSD03MMC",
        "pvvx",
        1000.0,
        2000.0,
    )
    db.upsert_device(MAC, name="Kitchen", ts=3000.0)
    db.upsert_device(MAC, format=None, ts=500.0)
    d = db.device(MAC)
    assert (d.name, d.model, d.format, d.first_seen, d.last_seen) == ("Kitchen", "LYWSD03MMC", "pvvx", 500.0, 3000.0)
    db.rename("a4-c1-38-12-34-56", "Bedroom")
    assert db.device(MAC).name == "Bedroom"
    db.rename("A4:C1:38:00:00:01", "New")
    assert [d.mac for d in db.devices()] == ["A4:C1:38:00:00:01", MAC]
    db.delete_device(MAC)
    assert db.device(MAC) is None
    assert db.readings(MAC) == [] and db.hourly(MAC) == []


def test_state_survives_reopen(tmp_path):
    path = tmp_path / "h.sqlite3"
    with History(path) as h:
        assert h.get_state("replay/A4:C1:38:12:34:56") is None
        assert h.get_state("missing", default=0) == 0
        h.set_state("replay/A4:C1:38:12:34:56", {"counter": 1234, "ext": [1, 2]})
        h.set_state("plain", "text")
        h.set_states({"a": 1, "b": None})
    with History(path) as h:
        assert h.get_state("replay/A4:C1:38:12:34:56") == {"counter": 1234, "ext": [1, 2]}
        assert h.get_state("plain") == "text"
        assert h.get_state("b", default="d") is None
        assert h.state_keys("replay/") == ["replay/A4:C1:38:12:34:56"]
        h.delete_state("a")
        assert h.get_state("a") is None


async def test_run_flusher(db):
    task = asyncio.create_task(db.run_flusher(interval=0.05))
    db.add(MAC, 1.0, {"temperature_c": 1.0})
    await asyncio.sleep(0.2)
    assert db.pending == 0
    db.add(MAC, 2.0, {"temperature_c": 2.0})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.pending == 0  # flushed once more on cancel
    assert len(db.readings(MAC)) == 2


def test_write_throughput(db):
    n = 100_000
    values = {"temperature_c": 21.5, "humidity_pct": 45.0, "battery_pct": 90, "voltage_v": 2.9}
    macs = [f"A4:C1:38:00:00:{i:02X}" for i in range(20)]
    t0 = time.perf_counter()
    for i in range(n // 4):
        db.add(macs[i % 20], H0 + i, values)
        if i % 5000 == 4999:
            db.flush()
    db.flush()
    rate = n / (time.perf_counter() - t0)
    assert rate > 50_000, f"{rate:.0f} values/s"


CRASH_WRITER = textwrap.dedent(
    """
    import sys, time
    from mitherm.history import History
    h = History(sys.argv[1])
    i = total = 0
    while True:
        for _ in range(500):
            h.add("A4:C1:38:12:34:56", 1_700_000_000 + i * 0.01, {"temperature_c": i % 50, "humidity_pct": 40})
            i += 1
        total += h.flush()
        h.set_state("counter", total)
        print(total, flush=True)
        for _ in range(100):  # buffered, never flushed: may be lost, must not corrupt
            h.add("A4:C1:38:12:34:56", 1_700_000_000 + i * 0.01, {"temperature_c": 1})
            i += 1
    """
)


def test_kill_9_loses_nothing_flushed(tmp_path):
    path = tmp_path / "crash.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        last = 0
        for _ in range(30):
            line = proc.stdout.readline()
            assert line, "writer died"
            last = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with History(path) as h:
        assert h.integrity_check() == "ok"
        n = len(h.readings(MAC))
        assert n >= last
        # whole flushes only: a multiple of 1000 values, plus the 200 of each flushed buffer remainder
        assert h.get_state("counter") >= last
        assert n == h.get_state("counter")
        hourly = sum(r.count for r in h.hourly(MAC))
        assert hourly == n  # aggregates were written in the same transactions


# -- CLI ------------------------------------------------------------------------------------------------


@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "cli.sqlite3"
    now = time.time()
    with History(path) as h:
        h.add(MAC, now - 7200, {"temperature_c": 20.5, "humidity_pct": 40, "battery_pct": 99})
        h.add(MAC, now - 60, {"temperature_c": 21.25, "humidity_pct": 41.5, "voltage_v": 2.95, "moisture_pct": 3})
        h.add(MAC, now - 3 * 86400, {"temperature_c": 1.0})
    return path, now


def test_cli_csv(filled):
    path, _ = filled
    r = CliRunner().invoke(history_cmd, [MAC, "--since", "1d", "--csv", "--db", str(path)])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.output)))
    assert rows[0] == ["time", "temperature_c", "humidity_pct", "battery_pct", "voltage_v", "moisture_pct"]
    assert rows[1][1:] == ["20.5", "40", "99", "", ""]
    assert rows[2][1:] == ["21.25", "41.5", "", "2.95", "3"]
    assert len(rows) == 3
    r = CliRunner().invoke(history_cmd, ["a4c138123456", "--since", "1h", "--csv", "--db", str(path)])
    assert len(list(csv.reader(io.StringIO(r.output)))) == 2


def test_cli_json_and_table(filled):
    path, now = filled
    r = CliRunner().invoke(history_cmd, [MAC, "--since", "1w", "--until", "3h", "--json", "--db", str(path)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert len(lines) == 1 and lines[0]["temperature_c"] == 1 and lines[0]["ts"] == pytest.approx(now - 3 * 86400)
    r = CliRunner().invoke(history_cmd, [MAC, "--since", "1w", "--json", "--hourly", "--db", str(path)])
    hourly = [json.loads(x) for x in r.output.splitlines()]
    assert {h["quantity"] for h in hourly} >= {"temperature_c", "humidity_pct"}
    assert sum(h["count"] for h in hourly if h["quantity"] == "temperature_c") == 3
    r = CliRunner().invoke(history_cmd, [MAC, "--db", str(path)])
    assert r.exit_code == 0 and "°C" in r.output and "21.25" in r.output and "moisture_pct" not in r.output


def test_cli_errors(tmp_path, filled):
    path, _ = filled
    r = CliRunner().invoke(history_cmd, ["not-a-mac", "--db", str(path)])
    assert r.exit_code == 1 and "not a Bluetooth address" in r.output
    r = CliRunner().invoke(history_cmd, [MAC, "--db", str(tmp_path / "nope.sqlite3")])
    assert r.exit_code == 1 and "no history database" in r.output
    assert not (tmp_path / "nope.sqlite3").exists()
    r = CliRunner().invoke(history_cmd, ["A4:C1:38:00:00:00", "--db", str(path)])
    assert r.exit_code == 1 and "not in the history database" in r.output
    r = CliRunner().invoke(history_cmd, [MAC, "--since", "yesterday", "--db", str(path)])
    assert r.exit_code == 1 and "30m, 2h" in r.output


def test_parse_time():
    now = 1_700_000_000.0
    assert parse_time("2h", now) == now - 7200
    assert parse_time("30m", now) == now - 1800
    assert parse_time("1.5d", now) == now - 1.5 * 86400
    assert parse_time("now", now) == now
    assert parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20+00:00", now) == 1_700_000_000.0
    assert parse_time("1700000000", now) == 1_700_000_000.0

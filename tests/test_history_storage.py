"""History schema 2: migration from schema 1, packed raw chunks, quantity ids, values with the same time,
failed flushes, the buffer without a lock, and the HistorySink fast path."""

from __future__ import annotations

import math
import sqlite3
import threading
import time

import pytest

import mitherm.history as history_mod
from mitherm.history import CHUNK_BYTES, CHUNK_SPAN, SCHEMA_VERSION, History, HistoryError
from mitherm.model import Reading
from mitherm.service import HistorySink
from mitherm.state import DeviceState

MAC = "A4:C1:38:12:34:56"
MAC2 = "A4:C1:38:AB:CD:EF"
H0 = 1_700_000_000 // 3600 * 3600


@pytest.fixture
def db(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    yield h
    h.close()


def _values(h: History, mac: str, **kw) -> list[tuple[float, str, float]]:
    return [(r.ts, r.quantity, r.value) for r in h.readings(mac, **kw)]


# -- migration from schema 1 --------------------------------------------------------------------------

# The schema 1 tables exactly as mitherm wrote them.
SCHEMA_V1 = """
CREATE TABLE devices (mac TEXT PRIMARY KEY, name TEXT, model TEXT, format TEXT, first_seen REAL, last_seen REAL);
CREATE TABLE readings (mac TEXT NOT NULL, ts REAL NOT NULL, quantity TEXT NOT NULL, value REAL NOT NULL);
CREATE INDEX readings_mac_ts ON readings (mac, ts);
CREATE TABLE hourly (
    mac TEXT NOT NULL, hour INTEGER NOT NULL, quantity TEXT NOT NULL, min REAL NOT NULL, mean REAL NOT NULL,
    max REAL NOT NULL, count INTEGER NOT NULL, sum REAL NOT NULL, PRIMARY KEY (mac, hour, quantity)
) WITHOUT ROWID;
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);
PRAGMA user_version = 1;
"""

# (mac, ts, quantity, value) in rowid order: readings of two devices interleaved, two values of MAC with the
# same time and quantity (two adds), a device without a devices row, values far apart in time
V1_READINGS = [
    (MAC, H0 + 1.5, "temperature_c", 21.5),
    (MAC, H0 + 1.5, "humidity_pct", 45.0),
    (MAC2, H0 + 2.0, "temperature_c", -3.25),
    (MAC, H0 + 60.0, "temperature_c", 22.0),
    (MAC, H0 + 60.0, "temperature_c", 22.5),
    (MAC, H0 + 3 * 86400.0, "battery_pct", 90.0),
    (MAC2, H0 + 1.0, "humidity_pct", 50.0),
    ("A4:C1:38:00:00:09", H0, "voltage_v", 2.95),
] + [(MAC, H0 + 7200.0 + i, "temperature_c", 20.0 + i / 100) for i in range(600)]


def _v1_hourly(rows):
    agg: dict[tuple[str, int, str], list[float]] = {}
    for mac, ts, q, v in rows:
        agg.setdefault((mac, int(ts // 3600) * 3600, q), []).append(v)
    return [(m, h, q, min(v), sum(v) / len(v), max(v), len(v), sum(v)) for (m, h, q), v in agg.items()]


def _make_v1(path) -> None:
    con = sqlite3.connect(path)
    con.executescript(SCHEMA_V1)
    con.executemany(
        "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?)",
        [(MAC, "Kitchen", "LYWSD03MMC", "pvvx", H0 - 5, H0 + 3 * 86400.0), (MAC2, None, "MHO-C401", None, H0, H0 + 2)],
    )
    con.executemany("INSERT INTO readings VALUES (?, ?, ?, ?)", V1_READINGS)
    con.executemany("INSERT INTO hourly VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _v1_hourly(V1_READINGS))
    con.executemany("INSERT INTO state VALUES (?, ?, ?)", [("counters", '{"a":1}', 1.0), ("web.names", "{}", 2.0)])
    con.commit()
    con.close()


def test_v1_database_is_migrated_without_loss(tmp_path):
    path = tmp_path / "v1.sqlite3"
    _make_v1(path)
    with History(path) as h:
        assert h.integrity_check() == "ok"
        for mac in (MAC, MAC2, "A4:C1:38:00:00:09"):
            want = sorted(((ts, q, v) for m, ts, q, v in V1_READINGS if m == mac), key=lambda r: r[0])
            assert _values(h, mac) == want  # same time: in the order they were stored
        assert _values(h, MAC, since=H0 + 60, until=H0 + 61) == [
            (H0 + 60.0, "temperature_c", 22.0),
            (H0 + 60.0, "temperature_c", 22.5),
        ]
        for m, hour, q, mn, mean, mx, count, _ in _v1_hourly(V1_READINGS):
            (row,) = h.hourly(m, since=hour, until=hour + 1, quantity=q)
            assert (row.hour, row.min, row.max, row.count) == (hour, mn, mx, count)
            assert row.mean == pytest.approx(mean, rel=1e-15)
        d = h.device(MAC)
        assert (d.name, d.model, d.format, d.first_seen, d.last_seen) == (
            "Kitchen",
            "LYWSD03MMC",
            "pvvx",
            H0 - 5,
            H0 + 3 * 86400.0,
        )
        assert h.device(MAC2).model == "MHO-C401"
        assert h.device("A4:C1:38:00:00:09") is not None  # its values kept their device
        assert h.get_state("counters") == {"a": 1} and h.state_keys() == ["counters", "web.names"]
        assert sorted(h.quantities(MAC)) == ["battery_pct", "humidity_pct", "temperature_c"]
        # and it keeps working: a new value, the hour of old ones updated
        h.add(MAC, H0 + 61.0, {"temperature_c": 10.0})
        assert [r.count for r in h.hourly(MAC, since=H0, until=H0 + 1, quantity="temperature_c")] == [4]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {t for t in tables if t.startswith("v1_")} and "readings" not in tables
    con.close()


def test_failed_migration_leaves_the_v1_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "v1.sqlite3"
    _make_v1(path)

    def boom(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(history_mod, "_chunk_row", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        History(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM readings").fetchone()[0] == len(V1_READINGS)
    assert con.execute("SELECT count(*) FROM devices").fetchone()[0] == 2
    con.close()
    monkeypatch.undo()
    with History(path) as h:
        assert len(h.readings(MAC)) == sum(1 for r in V1_READINGS if r[0] == MAC)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite3"
    History(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(HistoryError, match=f"schema version {SCHEMA_VERSION + 1}.*understands up to {SCHEMA_VERSION}"):
        History(path)


# -- values, ids, chunks -------------------------------------------------------------------------------


def test_values_with_the_same_time_are_all_kept(db):
    """Two values of the same device and quantity at the same time (two receivers, a coarse clock) are two
    values, as in schema 1: both stored, in the order added, both in the hourly count."""
    db.add(MAC, H0 + 5, {"temperature_c": 20.0, "humidity_pct": 40.0})
    db.add(MAC, H0 + 5, {"temperature_c": 21.0})
    db.flush()
    db.add(MAC, H0 + 5, {"temperature_c": 22.0, "humidity_pct": 41.0})
    assert _values(db, MAC) == [
        (H0 + 5, "temperature_c", 20.0),
        (H0 + 5, "humidity_pct", 40.0),
        (H0 + 5, "temperature_c", 21.0),
        (H0 + 5, "temperature_c", 22.0),
        (H0 + 5, "humidity_pct", 41.0),
    ]
    (t,) = db.hourly(MAC, quantity="temperature_c")
    assert (t.count, t.min, t.max, t.mean) == (3, 20.0, 22.0, 21.0)


def test_out_of_order_readings_are_sorted_and_aggregated(db):
    times = [H0 + 7300, H0 + 10, H0 + 3700, H0 + 5, H0 + 7200]
    for i, t in enumerate(times):
        db.add(MAC, t, {"temperature_c": float(i)})
    db.flush()
    db.add(MAC, H0 + 1, {"temperature_c": 9.0})  # older than everything flushed
    assert [r.ts for r in db.readings(MAC)] == sorted([*times, H0 + 1])
    assert [(r.hour, r.count, r.min, r.max) for r in db.hourly(MAC)] == [
        (H0, 3, 1.0, 9.0),
        (H0 + 3600, 1, 2.0, 2.0),
        (H0 + 7200, 2, 0.0, 4.0),
    ]


def test_quantity_sets_and_ids(db):
    db.add(MAC, H0, {"temperature_c": 1.0, "humidity_pct": 2.0})
    db.add(MAC, H0 + 1, {"humidity_pct": 3.0, "temperature_c": 4.0})  # the same quantities, another order
    db.add(MAC2, H0, {"battery_pct": 90, "temperature_c": 5.5})
    db.flush()
    con = db._db
    names = dict(con.execute("SELECT id, name FROM quantities"))
    assert sorted(names.values()) == ["battery_pct", "humidity_pct", "temperature_c"]
    sets = [[names[int(i)] for i in text.split(",")] for (text,) in con.execute("SELECT quantities FROM qsets")]
    assert ["temperature_c", "humidity_pct"] in sets and ["battery_pct", "temperature_c"] in sets
    assert sorted(r[0] for r in con.execute("SELECT id FROM devices")) == [1, 2]
    # (a reading's values may come in the order of an earlier reading with the same quantities)
    assert sorted(_values(db, MAC)) == sorted(
        [
            (H0, "temperature_c", 1.0),
            (H0, "humidity_pct", 2.0),
            (H0 + 1, "humidity_pct", 3.0),
            (H0 + 1, "temperature_c", 4.0),
        ]
    )
    assert _values(db, MAC2) == [(H0, "battery_pct", 90.0), (H0, "temperature_c", 5.5)]
    assert [r.quantity for r in db.hourly(MAC2)] == ["battery_pct", "temperature_c"]  # by hour, then name


def test_two_connections_share_ids(tmp_path):
    """Another process (``mitherm history --save``) adding quantities and devices meanwhile."""
    path = tmp_path / "h.sqlite3"
    a, b = History(path), History(path)
    try:
        a.add(MAC, H0, {"temperature_c": 1.0})
        a.flush()
        b.add(MAC, H0 + 1, {"co2_ppm": 400, "temperature_c": 2.0})
        b.add(MAC2, H0 + 1, {"pressure_hpa": 1013.25})
        b.flush()
        a.add(MAC, H0 + 2, {"co2_ppm": 410, "temperature_c": 3.0})  # ids a has not cached
        a.add(MAC2, H0 + 2, {"pressure_hpa": 1000.0})
        a.flush()
        for h in (a, b):
            assert _values(h, MAC) == [
                (H0, "temperature_c", 1.0),
                (H0 + 1, "co2_ppm", 400.0),
                (H0 + 1, "temperature_c", 2.0),
                (H0 + 2, "co2_ppm", 410.0),
                (H0 + 2, "temperature_c", 3.0),
            ]
            assert [r.value for r in h.readings(MAC2)] == [1013.25, 1000.0]
            assert [(r.quantity, r.count) for r in h.hourly(MAC)] == [("co2_ppm", 2), ("temperature_c", 3)]
    finally:
        a.close()
        b.close()


def test_chunks_split_by_size_and_span_and_queries_at_their_edges(db):
    n = 3 * CHUNK_BYTES // 20  # 20 bytes a reading: three chunks' worth
    for i in range(n):
        db.add(MAC, H0 + i, {"temperature_c": i / 4})
    db.add(MAC, H0 + 3 * CHUNK_SPAN, {"temperature_c": -1.0})  # far later: its own chunk
    db.flush()
    chunks = db._db.execute("SELECT t0, t1, n FROM raw_chunks ORDER BY id").fetchall()
    assert len(chunks) >= 4 and sum(c[2] for c in chunks) == n + 1
    assert all(12 * c[2] + 8 * c[2] <= CHUNK_BYTES and c[1] - c[0] <= CHUNK_SPAN for c in chunks)
    cut = chunks[1][0]  # the first time of the second chunk
    assert [r.ts for r in db.readings(MAC, since=cut - 1, until=cut + 2)] == [cut - 1, cut, cut + 1]
    assert len(db.readings(MAC, until=cut)) == chunks[0][2]
    assert [r.value for r in db.readings(MAC, since=H0 + CHUNK_SPAN)] == [-1.0]
    assert len(db.readings(MAC)) == n + 1


def test_a_reading_larger_than_a_chunk(db):
    values = {f"q{i:03d}": float(i) for i in range(CHUNK_BYTES // 8 + 10)}
    assert db.add(MAC, H0, values) == len(values)
    db.add(MAC, H0 + 1, {"q000": -1.0})
    assert [r.value for r in db.readings(MAC, quantity="q000")] == [0.0, -1.0]
    assert len(db.readings(MAC)) == len(values) + 1


def test_small_flushes_append_to_the_last_chunk(db):
    now = time.time()
    for i in range(50):  # a gateway flushing every second
        db.add(MAC, now - 1000 + 10 * i, {"temperature_c": float(i), "humidity_pct": 50.0})
        db.flush()
    assert db._db.execute("SELECT count(*), sum(n) FROM raw_chunks").fetchone() == (1, 50)
    # another writer cuts that chunk (prunes): it is not appended to, a new one starts
    with History(db.path) as other:
        assert other.prune(raw_days=755 / 86400) == 2 * 25  # the readings older than now - 755 s
    db.add(MAC, now, {"temperature_c": 50.0})
    db.flush()
    assert db._db.execute("SELECT count(*), sum(n) FROM raw_chunks").fetchone() == (2, 26)
    assert [r.value for r in db.readings(MAC, quantity="temperature_c")] == [float(i) for i in range(25, 51)]
    assert sum(r.count for r in db.hourly(MAC, quantity="temperature_c")) == 51  # aggregates are kept


def test_prune_cuts_a_chunk_that_straddles_the_cutoff(db):
    now = time.time()
    for i in range(10):
        db.add(MAC, now - 10 * 3600 + i * 3600, {"temperature_c": float(i), "humidity_pct": 1.0})
    db.flush()
    assert db._db.execute("SELECT count(*) FROM raw_chunks").fetchone()[0] == 1
    assert db.prune(raw_days=(4.5 * 3600) / 86400) == 12  # 6 readings of 2 values
    assert [r.value for r in db.readings(MAC, quantity="temperature_c")] == [6.0, 7.0, 8.0, 9.0]
    assert sum(r.count for r in db.hourly(MAC, quantity="temperature_c")) == 10
    db.add(MAC, now, {"temperature_c": 10.0})  # the cut chunk is not appended to blindly
    assert [r.value for r in db.readings(MAC, quantity="temperature_c")] == [6.0, 7.0, 8.0, 9.0, 10.0]


def test_add_validates_and_counts(db):
    big = 2**60  # beyond 2**53: converted to a float when added
    values = {"a": 1, "b": big, "c": True, "d": "x", "e": math.inf, "f": -math.nan, "g": 2.5}
    assert db.add(MAC, H0, values) == 4
    assert db.add_measurements(MAC, H0 + 1, {"a": True, "packet_id": 7, "c": 1.0}, frozenset({"packet_id"})) == 1
    assert db.add_measurements(MAC, H0 + 1, {"packet_id": 8}, frozenset({"packet_id"})) == 0
    assert db.add(MAC, H0 + 2, {}) == 0 and db.add(MAC, H0 + 2, {"s": "text"}) == 0
    with pytest.raises(ValueError, match="not finite"):
        db.add(MAC, math.nan, {"a": 1.0})
    with pytest.raises(OverflowError):
        db.add(MAC, H0, {"a": 10**400})
    assert db.add("a4-c1-38-12-34-56", H0 + 3, {"a": 3}) == 1  # any spelling of the address
    assert db.pending == 6
    assert _values(db, MAC) == [
        (H0, "a", 1.0),
        (H0, "b", float(big)),
        (H0, "c", 1.0),
        (H0, "g", 2.5),
        (H0 + 1, "c", 1.0),
        (H0 + 3, "a", 3.0),
    ]
    assert all(type(r.value) is float for r in db.readings(MAC))
    (b,) = db.hourly(MAC, quantity="b")
    assert (b.min, b.max, b.mean, type(b.min)) == (float(big), float(big), float(big), float)
    (a,) = db.hourly(MAC, quantity="a")
    assert (a.min, a.max, a.count, type(a.min), type(a.mean)) == (1.0, 3.0, 2, float, float)


def test_hourly_aggregates_are_exact_over_flushes(db):
    values = [0.1 * i for i in range(1, 400)] + [7, -3]
    for i, v in enumerate(values):
        db.add(MAC, H0 + i, {"x": v})
        if i % 97 == 0:
            db.flush()
    (row,) = db.hourly(MAC)
    assert (row.min, row.max, row.count) == (-3, max(values), len(values))
    assert row.mean == pytest.approx(math.fsum(values) / len(values), rel=1e-12)


# -- flushing ------------------------------------------------------------------------------------------


class _Failing:
    """The connection, failing the next ``n`` statements that write hourly aggregates."""

    def __init__(self, db, n: int) -> None:
        self._db, self.n = db, n

    def executemany(self, sql, rows):
        if "hourly" in sql and self.n:
            self.n -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.executemany(sql, rows)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_a_failed_flush_loses_nothing(db):
    db.add(MAC, H0, {"temperature_c": 1.0, "new_quantity": 5.0})
    real = db._db
    db._db = _Failing(real, 1)
    with pytest.raises(sqlite3.OperationalError):
        db.flush()
    assert db.pending == 2 and not real.in_transaction
    assert real.execute("SELECT count(*) FROM raw_chunks").fetchone()[0] == 0  # rolled back
    db.add(MAC, H0 + 1, {"new_quantity": 6.0})
    db._db = real
    assert db.flush() == 3
    assert _values(db, MAC) == [(H0, "temperature_c", 1.0), (H0, "new_quantity", 5.0), (H0 + 1, "new_quantity", 6.0)]
    assert [(r.quantity, r.count) for r in db.hourly(MAC)] == [("new_quantity", 2), ("temperature_c", 1)]


def test_the_buffer_is_bounded_while_flushes_fail(db, monkeypatch, caplog):
    monkeypatch.setattr(history_mod, "MAX_BUFFER", 100)
    real = db._db
    db._db = _Failing(real, 1000)
    for i in range(80):
        db.add(MAC, H0 + i, {"a": float(i), "b": 0.0})
        db.add(MAC2, H0 + i, {"a": float(i)})
    with pytest.raises(sqlite3.OperationalError):
        db.flush()
    assert db.pending <= 100 and "dropped the" in caplog.text
    db._db = real
    kept = db.readings(MAC, quantity="a")
    assert kept and kept[-1].value == 79.0 and kept[0].value > 0  # the oldest went


def test_add_while_flushing_in_another_thread(db):
    stop = threading.Event()
    flushed = []

    def flusher():
        while not stop.is_set():
            flushed.append(db.flush())

    t = threading.Thread(target=flusher)
    t.start()
    try:
        for i in range(20_000):
            db.add(MAC if i % 2 else MAC2, H0 + i, {"a": float(i), "b": 1.0})
    finally:
        stop.set()
        t.join()
    flushed.append(db.flush())
    assert sum(flushed) == 40_000
    assert len(db.readings(MAC)) + len(db.readings(MAC2)) == 40_000
    assert sum(r.count for m in (MAC, MAC2) for r in db.hourly(m)) == 40_000


# -- the gateway's sink --------------------------------------------------------------------------------


def test_history_sink_stores_numeric_values_and_flushes_when_far_behind(db, monkeypatch):
    import mitherm.service as service

    monkeypatch.setattr(service, "MAX_PENDING_VALUES", 40)
    sink = HistorySink(db)
    st = DeviceState(MAC, name="Kitchen", model="LYWSD03MMC", format="pvvx")
    for i in range(30):
        st.last_seen = H0 + i
        values = {"temperature_c": 20.0 + i, "battery_pct": 90, "packet_id": i, "flags": 3, "low": False, "fw": "x"}
        sink.publish(st, Reading(MAC, 0x181A, values=values))
        assert db.pending <= 40 + 40 // 4 + 2
    assert db.device(MAC).name == "Kitchen"
    db.flush()
    assert {r.quantity for r in db.readings(MAC)} == {"temperature_c", "battery_pct"}
    assert len(db.readings(MAC)) == 60


def test_random_workload_matches_a_model(db):
    """Random readings (mixed quantity sets, out of order, ints, flushes anywhere) against a plain model."""
    import random

    rng = random.Random(5)
    names = ["temperature_c", "humidity_pct", "battery_pct", "voltage_v", "rssi"]
    model: dict[str, list[tuple[float, str, float]]] = {MAC: [], MAC2: []}
    for i in range(3000):
        mac = rng.choice((MAC, MAC2))
        ts = H0 + rng.uniform(0, 6 * 3600) if rng.random() < 0.1 else H0 + i * 7.0
        qs = rng.sample(names, rng.choice((1, 2, 2, 2, 3, 5)))
        values = {q: rng.randrange(-50, 100) if q == "rssi" else round(rng.uniform(-20, 40), 2) for q in qs}
        assert db.add(mac, ts, values) == len(values)
        model[mac] += [(ts, q, float(v)) for q, v in values.items()]
        if rng.random() < 0.01:
            db.flush()
    for mac, rows in model.items():
        got = _values(db, mac)
        assert sorted(got) == sorted(rows)
        assert [r[0] for r in got] == sorted(r[0] for r in rows)
        cells: dict[tuple[int, str], list[float]] = {}
        for ts, q, v in rows:
            cells.setdefault((int(ts // 3600) * 3600, q), []).append(v)
        hourly = {(r.hour, r.quantity): r for r in db.hourly(mac)}
        assert set(hourly) == set(cells)
        for key, vs in cells.items():
            r = hourly[key]
            assert (r.min, r.max, r.count) == (min(vs), max(vs), len(vs))
            assert r.mean == pytest.approx(math.fsum(vs) / len(vs), rel=1e-12, abs=1e-12)
        assert db.quantities(mac) == sorted({q for _, q, _ in rows})

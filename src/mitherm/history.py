"""SQLite history of readings: raw values for N days, hourly min/mean/max forever, gateway state.

Writes are buffered in memory by :meth:`History.add` and written by :meth:`History.flush` in one
transaction (the owner flushes at least once a second, e.g. with :meth:`History.run_flusher`). The
database runs in WAL mode with ``synchronous=NORMAL``: a killed process loses at most the unflushed
buffer and never corrupts the file (a power cut may additionally lose the last commits). A flush that
fails puts its values back in front of the buffer (the next flush retries them); while flushes keep
failing, the buffer is bounded by :data:`MAX_BUFFER` values, the oldest of every device dropped first.

Hourly aggregates are maintained incrementally at flush time (``count`` and ``sum`` are stored so the
mean stays exact), which is why pruning raw readings never touches them.

Storage (schema version 2; a version 1 file is converted when opened). Devices and quantities are
numbered (``devices.id``, ``quantities.id``); ``qsets`` numbers the quantity lists readings carry
(``"1,2"``: temperature, humidity). Raw readings are packed per device into ``raw_chunks`` rows: one
B-tree row for dozens of readings instead of one indexed row per value, which made the history the
gateway's biggest CPU cost. ``data`` holds, little-endian, the ``n`` reading times (float64), their ``n``
quantity-set ids (uint32), then the ``nv`` values (float64), each reading's in the order of its set. A chunk
spans at most :data:`CHUNK_SPAN` seconds (``t0``..``t1``), so a time range is served by the chunks with
``t0`` in ``[since - CHUNK_SPAN, until)`` (index ``(dev, t0)``). ``hourly`` has a row per device, hour and
quantity (ids; the mean is ``sum / count``). Every value added is kept, also several of one device and
quantity with the same time (they are separate readings, as in schema 1)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from functools import partial
from itertools import chain, islice
from math import fsum
from operator import gt, itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from .mac import normalize_mac

__all__ = ["SCHEMA_VERSION", "DeviceRow", "History", "HistoryError", "HourlyRow", "ReadingRow"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: Values kept in memory at most while flushes fail (a full disk, a locked database).
MAX_BUFFER = 1_000_000
#: A raw chunk holds at most this many bytes (12 per reading + 8 per value): it stays within one database
#: page, and a query decodes little it does not need. A single larger reading gets a chunk of its own.
CHUNK_BYTES = 3800
#: Seconds a raw chunk spans at most (``t1 - t0``).
CHUNK_SPAN = 86400.0
#: A flush appends a device's readings to its last chunk when there are at most this many (a gateway flushing
#: every second); more make a chunk of their own (appending costs a read and a rewrite of the chunk).
_APPEND_MAX = 8

#: ints added as they are (exact as floats; min/max bound as SQLite integers); larger ones are converted
_INT_MAX = 2**53
_INT_MIN = -_INT_MAX

_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    mac TEXT NOT NULL UNIQUE,
    name TEXT,
    model TEXT,
    format TEXT,
    first_seen REAL,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS quantities (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS qsets (
    id INTEGER PRIMARY KEY,
    quantities TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS raw_chunks (
    id INTEGER PRIMARY KEY,
    dev INTEGER NOT NULL,
    t0 REAL NOT NULL,
    t1 REAL NOT NULL,
    n INTEGER NOT NULL,
    nv INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS raw_chunks_dev_t0 ON raw_chunks (dev, t0);
CREATE TABLE IF NOT EXISTS hourly (
    dev INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    q INTEGER NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    PRIMARY KEY (dev, hour, q)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated REAL NOT NULL
);
"""

_INSERT_CHUNK = "INSERT INTO raw_chunks (id, dev, t0, t1, n, nv, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
_UPSERT_HOURLY = """
INSERT INTO hourly (dev, hour, q, min, max, count, sum) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (dev, hour, q) DO UPDATE SET
    min = min(hourly.min, excluded.min),
    max = max(hourly.max, excluded.max),
    count = hourly.count + excluded.count,
    sum = hourly.sum + excluded.sum
"""
_UPSERT_DEVICE = """
INSERT INTO devices (mac, name, model, format, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (mac) DO UPDATE SET
    name = coalesce(excluded.name, devices.name),
    model = coalesce(excluded.model, devices.model),
    format = coalesce(excluded.format, devices.format),
    first_seen = min(coalesce(devices.first_seen, excluded.first_seen),
                     coalesce(excluded.first_seen, devices.first_seen)),
    last_seen = max(coalesce(devices.last_seen, excluded.last_seen),
                    coalesce(excluded.last_seen, devices.last_seen))
"""
# _UPSERT_DEVICE with name/model/format None (binding None is slow in the sqlite3 module)
_UPSERT_SEEN = """
INSERT INTO devices (mac, first_seen, last_seen) VALUES (?, ?, ?)
ON CONFLICT (mac) DO UPDATE SET
    first_seen = min(coalesce(devices.first_seen, excluded.first_seen), excluded.first_seen),
    last_seen = max(coalesce(devices.last_seen, excluded.last_seen), excluded.last_seen)
"""
_DEVICE_ID = "SELECT id FROM devices WHERE mac = ?"
#: SQLite builds before 3.32 allow 999 parameters per statement
_MAX_PARAMS = 500


class HistoryError(Exception):
    """The database cannot be opened or has a schema this version does not understand."""


class ReadingRow(NamedTuple):
    ts: float
    quantity: str
    value: float


class HourlyRow(NamedTuple):
    hour: int  # Unix time of the start of the hour (UTC-aligned)
    quantity: str
    min: float
    mean: float
    max: float
    count: int


class DeviceRow(NamedTuple):
    mac: str
    name: str | None
    model: str | None
    format: str | None
    first_seen: float | None
    last_seen: float | None


def _numeric(value: object) -> float | None:
    """The float stored for a reading value; None for strings and non-finite numbers (not stored)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


#: A buffered reading: (time, {quantity: value}), the dict a copy owned by the buffer. Values are finite
#: floats, or ints within +-2**53 (exact as floats).
_Buffered = tuple[float, dict[str, float]]
_TS, _VALUES = itemgetter(0), itemgetter(1)
_FIRST = _TS
_new_reading = partial(tuple.__new__, ReadingRow)  # ReadingRow from a tuple, without a Python call
_HOUR_QUANTITY = itemgetter(0, 1)
_Tail = tuple[int, float, float, int, int]  # (chunk id, t0, t1, n, nv)


def _pack(ts: list[float], qs: list[int], vals: Iterable[float], nv: int) -> bytes:
    """A chunk's data: ``n`` times (float64), ``n`` quantity-set ids (uint32), ``nv`` values (float64)."""
    return struct.pack(f"<{len(ts)}d{len(qs)}I{nv}d", *ts, *qs, *vals)


def _unpack(n: int, data: bytes) -> tuple[tuple[float, ...], tuple[int, ...], tuple[float, ...]]:
    """(times, quantity-set ids, values) of a chunk of ``n`` readings."""
    t = struct.unpack(f"<{n}d{n}I{(len(data) - 12 * n) // 8}d", data)
    return t[:n], t[n : 2 * n], t[2 * n :]


def _chunk_bytes(n: int, nv: int) -> int:
    return 12 * n + 8 * nv


class History:
    """The history database. Thread-safe: ``add`` is cheap and may be called from the event loop while
    ``flush`` runs in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # the connection, the caches below, taking rows out of the buffers
        # The readings buffered per device (normalized MAC). add() only appends to a device's list (atomic
        # under the GIL, so add takes no lock); flush copies a list and deletes that many rows from its front.
        self._buffers: dict[str, list[_Buffered]] = {}
        self._spellings: dict[str, list[_Buffered]] = {}  # MAC as given to add() -> its device's buffer
        # Committed ids (quantities and quantity sets are never deleted, so these stay valid):
        self._qid: dict[str, int] = {}  # quantity name -> id
        self._qset: dict[tuple[str, ...], int] = {}  # quantity names -> quantity set id
        self._qset_names: dict[int, tuple[str, ...]] = {}  # quantity set id -> quantity names
        self._qset_qids: dict[int, tuple[int, ...]] = {}  # quantity set id -> quantity ids
        self._qname: dict[int, str] = {}  # quantity id -> name
        # dev id -> the chunk this process wrote last for the device: a later flush with a few readings
        # appends to it while it has room (checked against the row, so other writers are harmless)
        self._tails: dict[int, _Tail] = {}
        self._closed = False
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA cache_size=-4096")  # 4 MiB: bounded memory on a Pi; chunks keep writes local
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise HistoryError(f"cannot open history database {self.path}: {e}") from e

    # -- schema ------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} has schema version {version}; this mitherm understands up to "
                f"{SCHEMA_VERSION} (upgrade mitherm)"
            )
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have been first
            if version == 1:
                log.warning("history: converting %s to schema version %d", self.path, SCHEMA_VERSION)
                self._migrate_v1()
            elif version == 0:
                for stmt in _statements(_SCHEMA_V2):
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _migrate_v1(self) -> None:
        """v1 (TEXT mac/quantity per value row, rowid table + (mac, ts) index) to v2, in the caller's
        transaction. Readings are rebuilt from consecutive values of a device with the same time."""
        db = self._db
        for table in ("devices", "readings", "hourly"):
            db.execute(f"ALTER TABLE {table} RENAME TO v1_{table}")
        for stmt in _statements(_SCHEMA_V2):
            db.execute(stmt)
        db.execute(
            "INSERT INTO devices (mac, name, model, format, first_seen, last_seen) "
            "SELECT mac, name, model, format, first_seen, last_seen FROM v1_devices ORDER BY mac"
        )
        for table in ("v1_hourly", "v1_readings"):  # values of devices that have no row (not written by mitherm)
            db.execute(f"INSERT OR IGNORE INTO devices (mac) SELECT DISTINCT mac FROM {table}")
        db.execute("INSERT OR IGNORE INTO quantities (name) SELECT DISTINCT quantity FROM v1_hourly ORDER BY 1")
        db.execute(
            "INSERT INTO hourly (dev, hour, q, min, max, count, sum) "
            "SELECT d.id, h.hour, q.id, h.min, h.max, h.count, h.sum FROM v1_hourly h "
            "JOIN devices d ON d.mac = h.mac JOIN quantities q ON q.name = h.quantity"
        )
        qid: dict[str, int] = {}
        qset: dict[tuple[str, ...], int] = {}
        next_id = 1
        for dev, mac in db.execute("SELECT id, mac FROM devices ORDER BY id").fetchall():
            cur = db.execute("SELECT ts, quantity, value FROM v1_readings WHERE mac = ? ORDER BY ts, rowid", (mac,))
            rows = []
            for ts, keys, vals in _v1_readings(cur):
                s = qset.get(keys)
                if s is None:
                    s = qset[keys] = self._new_qset(keys, qid, {})[0]
                rows.append((ts, s, vals))
            chunks = []
            for part in _split(rows):
                chunks.append(_chunk_row(next_id, dev, part))
                next_id += 1
            db.executemany(_INSERT_CHUNK, chunks)
        for table in ("readings", "hourly", "devices"):
            db.execute(f"DROP TABLE v1_{table}")

    def _new_qset(
        self, keys: tuple[str, ...], qid: dict[str, int], new_q: dict[str, int]
    ) -> tuple[int, tuple[int, ...]]:
        """The id and quantity ids of the quantity set ``keys``, created when needed (in the caller's
        transaction). ``qid`` holds known quantity ids; quantities created here go to ``qid`` and ``new_q``."""
        db = self._db
        ids = []
        for name in keys:
            i = qid.get(name)
            if i is None:
                db.execute("INSERT OR IGNORE INTO quantities (name) VALUES (?)", (name,))
                i = db.execute("SELECT id FROM quantities WHERE name = ?", (name,)).fetchone()[0]
                qid[name] = new_q[name] = i
            ids.append(i)
        text = ",".join(map(str, ids))
        db.execute("INSERT OR IGNORE INTO qsets (quantities) VALUES (?)", (text,))
        return db.execute("SELECT id FROM qsets WHERE quantities = ?", (text,)).fetchone()[0], tuple(ids)

    # -- writing -----------------------------------------------------------------------------------

    def add(self, mac: str, ts: float, values: Mapping[str, float | int | bool | str]) -> int:
        """Buffer the numeric values of one reading (booleans as 0/1; strings, NaN and infinities are
        skipped).

        Returns the number of values buffered. Nothing is written until :meth:`flush`."""
        buf = self._spellings.get(mac)
        if buf is None:
            buf = self._buffer_of(mac)
        if type(ts) is not float or ts - ts:
            ts = _finite_time(ts)
        for v in values.values():  # the common case: finite floats and ints only
            if type(v) is float:
                if v - v:  # NaN or an infinity
                    break
            elif type(v) is not int or not _INT_MIN < v < _INT_MAX:
                break
        else:
            if values:
                buf.append((ts, dict(values)))
            return len(values)
        return self._add_filtered(buf, ts, values, frozenset(), True)

    def add_measurements(
        self, mac: str, ts: float, values: Mapping[str, Any], skip: AbstractSet[str] = frozenset()
    ) -> int:
        """:meth:`add` for the values of a decoded frame: booleans (states, not measurements) and the
        quantities in ``skip`` (say the frame's packet id) are not stored either."""
        buf = self._spellings.get(mac)
        if buf is None:
            buf = self._buffer_of(mac)
        if type(ts) is not float or ts - ts:
            ts = _finite_time(ts)
        for v in values.values():
            if type(v) is float:
                if v - v:
                    break
            elif type(v) is not int or not _INT_MIN < v < _INT_MAX:
                break
        else:
            if not skip or skip.isdisjoint(values):
                if values:
                    buf.append((ts, dict(values)))
                return len(values)
            d = dict(values)
            for k in skip:
                d.pop(k, None)
            if d:
                buf.append((ts, d))
            return len(d)
        return self._add_filtered(buf, ts, values, skip, False)

    def _buffer_of(self, mac: str) -> list[_Buffered]:
        norm = normalize_mac(mac)
        buf = self._buffers.setdefault(norm, [])
        if len(self._spellings) >= 4096:
            self._spellings.clear()
        self._spellings[mac] = buf
        return buf

    def _add_filtered(
        self,
        buf: list[_Buffered],
        ts: float,
        values: Mapping[str, Any],
        skip: AbstractSet[str],
        bools: bool,
    ) -> int:
        kept: dict[str, float] = {}
        for k, v in values.items():
            if skip and k in skip:
                continue
            t = type(v)
            if t is float:
                if v - v:
                    continue
            elif t is bool:
                if not bools:
                    continue
                v = 1.0 if v else 0.0
            else:
                v = _numeric(v)  # ints (OverflowError when out of the float range, as ever), subclasses
                if v is None:
                    continue
            kept[k] = v
        if kept:
            buf.append((ts, kept))
        return len(kept)

    @property
    def pending(self) -> int:
        """Values buffered and not yet flushed (counted: proportional to the number of buffered readings)."""
        return sum(map(len, map(_VALUES, chain.from_iterable(list(self._buffers.values())))))

    def flush(self) -> int:
        """Write the buffered values in one transaction, update hourly aggregates and device
        first/last seen. Returns the number of values written."""
        with self._lock:
            taken = []
            for mac, buf in list(self._buffers.items()):
                if buf:
                    rows = buf[:]
                    del buf[: len(rows)]  # what add() appended meanwhile stays
                    taken.append((mac, rows))
            if not taken:
                return 0
            try:
                return self._write(taken)
            except BaseException:
                # Put the rows back in front of anything added meanwhile: a transient error (disk full,
                # database locked) must not lose data. They are retried on the next flush.
                for mac, rows in taken:
                    self._buffers[mac][:0] = rows
                self._bound_buffers()
                raise

    def _bound_buffers(self) -> None:
        """While the database stays unwritable: bound the memory, drop the oldest readings of every device
        (under _lock)."""
        total = self.pending
        if total <= MAX_BUFFER:
            return
        share = (total - MAX_BUFFER) / total
        dropped = 0
        for buf in list(self._buffers.values()):
            k = math.ceil(len(buf) * share)
            dropped += sum(map(len, map(_VALUES, buf[:k])))
            del buf[:k]
        log.error("history: database unwritable, dropped the %d oldest buffered values", dropped)

    def _write(self, taken: list[tuple[str, list[_Buffered]]]) -> int:
        """One transaction: device first/last seen, new quantities, raw chunks, hourly aggregates, from the
        buffered readings of each device. Returns the number of values."""
        db = self._db
        new_q: dict[str, int] = {}
        new_qsets: dict[tuple[str, ...], tuple[int, tuple[int, ...]]] = {}
        new_tails: dict[int, _Tail | None] = {}
        total = 0
        devices = []  # (mac, rows, times)
        for mac, rows in taken:
            ts = list(map(_TS, rows))
            if any(map(gt, ts, islice(ts, 1, None))):  # not in time order (usually they are)
                rows = sorted(rows, key=_TS)
                ts = list(map(_TS, rows))
            devices.append((mac, rows, ts))
        db.execute("BEGIN IMMEDIATE")
        try:
            _executemany(db, _UPSERT_SEEN, _UPSERT_SEEN_MANY, [(mac, ts[0], ts[-1]) for mac, _, ts in devices])
            dev_id = self._device_ids([d[0] for d in devices])
            next_id = db.execute("SELECT coalesce(max(id), 0) + 1 FROM raw_chunks").fetchone()[0]
            inserts = []
            hourly: list[tuple[Any, ...]] = []
            for mac, rows, ts in devices:
                dev = dev_id[mac]
                qs, vl = self._readings(dev, rows, hourly, new_q, new_qsets)
                n = len(ts)
                nv = sum(map(len, vl))
                total += nv
                lo, hi = ts[0], ts[-1]
                if _chunk_bytes(n, nv) <= CHUNK_BYTES and hi - lo <= CHUNK_SPAN:
                    tail = self._tails.get(dev)
                    if tail is None or n > _APPEND_MAX or not self._append(dev, tail, ts, qs, vl, nv, new_tails):
                        data = _pack(ts, qs, chain.from_iterable(vl), nv)
                        inserts.append((next_id, dev, lo, hi, n, nv, data))
                        new_tails[dev] = (next_id, lo, hi, n, nv)
                        next_id += 1
                else:  # too much for one chunk, or spread over too long: cut
                    for part in _split(list(zip(ts, qs, vl, strict=True))):
                        inserts.append(row := _chunk_row(next_id, dev, part))
                        new_tails[dev] = (next_id, *row[2:6])
                        next_id += 1
            db.executemany(_INSERT_CHUNK, inserts)
            _executemany(db, _UPSERT_HOURLY, _UPSERT_HOURLY_MANY, hourly)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # committed: remember the new ids
        self._qid.update(new_q)
        for keys, (i, qids) in new_qsets.items():
            self._qset[keys] = i
            self._qset_names[i] = keys
            self._qset_qids[i] = qids
        for dev, tail in new_tails.items():
            if tail is None:
                self._tails.pop(dev, None)
            else:
                self._tails[dev] = tail
        return total

    def _readings(
        self,
        dev: int,
        rows: list[_Buffered],
        hourly: list[tuple[Any, ...]],
        new_q: dict[str, int],
        new_qsets: dict[tuple[str, ...], tuple[int, tuple[int, ...]]],
    ) -> tuple[list[int], list[tuple[float, ...]]]:
        """One pass over a device's readings in time order: their quantity sets (created when new, in the
        flush's transaction) and values in that order, and the hourly aggregate rows (dev, hour, quantity id,
        min, max, count, sum) appended to ``hourly``."""
        qset_get, qset_qids = self._qset.get, self._qset_qids
        qs: list[int] = []
        vl: list[tuple[float, ...]] = []
        last: Any = None  # the quantities of the previous reading (a set-like view)
        q, qids, getter, single = 0, (), itemgetter(0), True
        end, hour = -math.inf, 0
        groups: dict[int, list[tuple[float, ...]]] = {}
        for t, d in rows:
            kv = d.keys()
            if kv != last:  # another set of quantities than the previous reading's (then in its order)
                keys = tuple(d)
                got = qset_get(keys)
                if got is None:
                    got2 = new_qsets.get(keys)
                    if got2 is None:
                        got2 = new_qsets[keys] = self._new_qset(keys, {**self._qid, **new_q}, new_q)
                    q, qids = got2
                    qset_qids = {**qset_qids, q: qids}
                else:
                    q = got
                getter, single = itemgetter(*keys), len(keys) == 1
                last = kv
            vals = (getter(d),) if single else getter(d)
            qs.append(q)
            vl.append(vals)
            if t >= end:  # a new hour
                if groups:
                    _close_hour(hourly, dev, hour, groups, qset_qids)
                h = t // 3600.0
                hour = int(h) * 3600
                end = (h + 1.0) * 3600.0
                groups = {}
            g = groups.get(q)
            if g is None:
                groups[q] = [vals]
            else:
                g.append(vals)
        if groups:
            _close_hour(hourly, dev, hour, groups, qset_qids)
        return qs, vl

    def _append(
        self,
        dev: int,
        tail: _Tail,
        ts: list[float],
        qs: list[int],
        vl: list[tuple[float, ...]],
        nv: int,
        new_tails: dict[int, _Tail | None],
    ) -> bool:
        """Append time-ordered readings to the device's last chunk when it has room and they are not older."""
        cid, t0, t1, n0, nv0 = tail
        k = len(ts)
        lo, hi = ts[0], ts[-1]
        if lo < t1 or hi - t0 > CHUNK_SPAN or _chunk_bytes(n0 + k, nv0 + nv) > CHUNK_BYTES:
            return False
        row = self._db.execute(
            "SELECT data FROM raw_chunks WHERE id = ? AND dev = ? AND n = ? AND nv = ? AND t1 = ?",
            (cid, dev, n0, nv0, t1),
        ).fetchone()
        if row is None:  # changed by someone else (pruned, deleted): start a new chunk
            new_tails[dev] = None
            return False
        old = memoryview(row[0])
        new = memoryview(_pack(ts, qs, chain.from_iterable(vl), nv))
        data = b"".join(
            (old[: 8 * n0], new[: 8 * k], old[8 * n0 : 12 * n0], new[8 * k : 12 * k], old[12 * n0 :], new[12 * k :])
        )
        n, nv = n0 + k, nv0 + nv
        self._db.execute("UPDATE raw_chunks SET t1 = ?, n = ?, nv = ?, data = ? WHERE id = ?", (hi, n, nv, data, cid))
        new_tails[dev] = (cid, t0, hi, n, nv)
        return True

    def _device_ids(self, macs: list[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        for i in range(0, len(macs), _MAX_PARAMS):
            part = macs[i : i + _MAX_PARAMS]
            sql = f"SELECT mac, id FROM devices WHERE mac IN ({','.join('?' * len(part))})"
            ids.update(self._db.execute(sql, part))
        return ids

    async def run_flusher(self, interval: float = 1.0) -> None:
        """Flush every ``interval`` seconds in a worker thread until cancelled (then flush once more)."""
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    await asyncio.to_thread(self.flush)
                except sqlite3.Error as e:
                    log.warning("history: flush failed (%s); retrying in %.0f s", e, interval)
        finally:
            if not self._closed:
                try:
                    self.flush()
                except sqlite3.Error as e:
                    log.error("history: final flush failed: %s", e)

    def prune(self, raw_days: float) -> int:
        """Delete raw readings older than ``raw_days`` days (hourly aggregates are kept). Returns the
        number of values deleted."""
        cutoff = time.time() - raw_days * 86400.0
        self.flush()
        with self._lock:
            db = self._db
            deleted = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for (dev,) in db.execute("SELECT id FROM devices").fetchall():
                    # per device, so the (dev, t0) index serves the range
                    args = (dev, cutoff, cutoff)
                    old = "FROM raw_chunks WHERE dev = ? AND t0 < ? AND t1 < ?"
                    deleted += db.execute(f"SELECT coalesce(sum(nv), 0) {old}", args).fetchone()[0]
                    db.execute(f"DELETE {old}", args)
                    straddling = db.execute(
                        "SELECT id, n, nv, data FROM raw_chunks WHERE dev = ? AND t0 >= ? AND t0 < ?",
                        (dev, cutoff - CHUNK_SPAN, cutoff),
                    ).fetchall()
                    for cid, n, nv, data in straddling:
                        deleted += self._cut_chunk(cid, n, nv, data, cutoff)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._tails.clear()
        return deleted

    def _cut_chunk(self, cid: int, n: int, nv: int, data: bytes, cutoff: float) -> int:
        """Drop the readings before ``cutoff`` from a chunk. Returns the number of values dropped."""
        ts, qs, vals = _unpack(n, data)
        names = self._qset_lookup(set(qs))
        kept = []
        pos = 0
        for t, q in zip(ts, qs, strict=True):
            k = len(names[q])
            if t >= cutoff:
                kept.append((t, q, vals[pos : pos + k]))
            pos += k
        if not kept:
            self._db.execute("DELETE FROM raw_chunks WHERE id = ?", (cid,))
            return nv
        row = _chunk_row(cid, 0, kept)
        if row[4] < n:
            self._db.execute(
                "UPDATE raw_chunks SET t0 = ?, t1 = ?, n = ?, nv = ?, data = ? WHERE id = ?", (*row[2:], cid)
            )
        return nv - row[5]

    # -- devices -----------------------------------------------------------------------------------

    def upsert_device(
        self,
        mac: str,
        name: str | None = None,
        model: str | None = None,
        format: str | None = None,
        ts: float | None = None,
    ) -> None:
        """Create or update a device; ``None`` fields keep their stored value. ``ts`` (default now)
        widens first_seen/last_seen."""
        mac = normalize_mac(mac)
        ts = time.time() if ts is None else float(ts)
        with self._lock:
            self._db.execute(_UPSERT_DEVICE, (mac, name, model, format, ts, ts))

    def rename(self, mac: str, name: str | None) -> None:
        """Set (or with ``None`` clear) a device's name, creating the row when needed."""
        mac = normalize_mac(mac)
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (mac, name) VALUES (?, ?) ON CONFLICT (mac) DO UPDATE SET name = excluded.name",
                (mac, name),
            )

    def delete_device(self, mac: str) -> None:
        """Forget a device: its row, raw readings and hourly aggregates (buffered values included)."""
        mac = normalize_mac(mac)
        self.flush()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(_DEVICE_ID, (mac,)).fetchone()
                if row is not None:
                    for table in ("raw_chunks", "hourly"):
                        db.execute(f"DELETE FROM {table} WHERE dev = ?", row)
                    db.execute("DELETE FROM devices WHERE id = ?", row)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if row is not None:
                self._tails.pop(row[0], None)

    def devices(self) -> list[DeviceRow]:
        self.flush()
        with self._lock:
            rows = self._db.execute(
                "SELECT mac, name, model, format, first_seen, last_seen FROM devices ORDER BY mac"
            ).fetchall()
        return [DeviceRow(*r) for r in rows]

    def device(self, mac: str) -> DeviceRow | None:
        mac = normalize_mac(mac)
        self.flush()
        with self._lock:
            row = self._db.execute(
                "SELECT mac, name, model, format, first_seen, last_seen FROM devices WHERE mac = ?", (mac,)
            ).fetchone()
        return DeviceRow(*row) if row else None

    # -- queries -----------------------------------------------------------------------------------

    def readings(
        self,
        mac: str,
        since: float | None = None,
        until: float | None = None,
        quantity: str | Iterable[str] | None = None,
    ) -> list[ReadingRow]:
        """Raw readings of a device, oldest first, with ``since <= ts < until`` (values with the same
        time in the order they were added; a reading's own values may come in the order of an earlier
        reading with the same quantities). Buffered values are flushed first so the answer includes
        everything added so far."""
        mac = normalize_mac(mac)
        wanted = None if quantity is None else {quantity} if isinstance(quantity, str) else set(quantity)
        if wanted is not None and not wanted:
            return []
        lo = -math.inf if since is None else float(since)
        hi = math.inf if until is None else float(until)
        self.flush()
        with self._lock:
            row = self._db.execute(_DEVICE_ID, (mac,)).fetchone()
            if row is None:
                return []
            chunks = self._db.execute(
                "SELECT n, data FROM raw_chunks WHERE dev = ? AND t0 >= ? AND t0 < ? AND t1 >= ? ORDER BY id",
                (row[0], lo - CHUNK_SPAN, hi, lo),
            ).fetchall()
            decoded = [_unpack(n, data) for n, data in chunks]
            names = self._qset_lookup(set(chain.from_iterable(d[1] for d in decoded)))
        out: list[ReadingRow] = []
        new = _new_reading
        for ts, qs, vals in decoded:
            pos = 0
            whole = wanted is None and min(ts) >= lo and max(ts) < hi
            for t, q in zip(ts, qs, strict=True):
                keys = names[q]
                k = len(keys)
                if whole or lo <= t < hi:
                    for j in range(k):
                        if wanted is None or keys[j] in wanted:
                            out.append(new((t, keys[j], vals[pos + j])))
                pos += k
        out.sort(key=_FIRST)  # stable: values with the same time stay in the order they were added
        return out

    def _qset_lookup(self, ids: set[int]) -> dict[int, tuple[str, ...]]:
        """Quantity names of quantity sets (cached; loaded from the database when a set is new to us)."""
        names = self._qset_names
        if not ids.issubset(names):
            qnames = dict(self._db.execute("SELECT id, name FROM quantities"))
            for i, text in self._db.execute("SELECT id, quantities FROM qsets"):
                if i not in names:
                    names[i] = tuple(qnames[int(q)] for q in text.split(","))
        return names

    def hourly(
        self,
        mac: str,
        since: float | None = None,
        until: float | None = None,
        quantity: str | Iterable[str] | None = None,
    ) -> list[HourlyRow]:
        """Hourly aggregates of a device whose hour starts in ``[since, until)`` (``since`` is rounded
        down to its hour, so the hour containing ``since`` is included)."""
        mac = normalize_mac(mac)
        self.flush()
        lo = -(2**62) if since is None else int(since // 3600) * 3600
        hi = 2**62 if until is None else math.ceil(until)
        with self._lock:
            row = self._db.execute(_DEVICE_ID, (mac,)).fetchone()
            if row is None:
                return []
            sql = "SELECT hour, q, min, sum / count, max, count FROM hourly WHERE dev = ? AND hour >= ? AND hour < ?"
            args: list[Any] = [row[0], lo, hi]
            if quantity is not None:
                qids = self._quantity_ids([quantity] if isinstance(quantity, str) else quantity)
                if not qids:
                    return []
                sql += f" AND q IN ({','.join('?' * len(qids))})"
                args += qids
            rows = self._db.execute(sql, args).fetchall()
            names = self._quantity_names({r[1] for r in rows})
        out = [HourlyRow(h, names[q], mn, mean, mx, n) for h, q, mn, mean, mx, n in rows]
        out.sort(key=_HOUR_QUANTITY)  # the table's order is (hour, quantity id)
        return out

    def _quantity_names(self, ids: set[int]) -> dict[int, str]:
        """Names of quantity ids (cached; loaded from the database when new to us)."""
        names = self._qname
        if not ids.issubset(names):
            names.update(self._db.execute("SELECT id, name FROM quantities"))
        return names

    def _quantity_ids(self, quantities: Iterable[str]) -> list[int]:
        """The ids of the quantities that exist (under _lock)."""
        qs = list(quantities)
        if not qs:
            return []
        sql = f"SELECT id FROM quantities WHERE name IN ({','.join('?' * len(qs))})"
        return [r[0] for r in self._db.execute(sql, qs)]

    def quantities(self, mac: str) -> list[str]:
        """The quantities ever recorded for a device (from the hourly table, so pruning keeps them), by name."""
        mac = normalize_mac(mac)
        self.flush()
        with self._lock:
            ids = {
                r[0]
                for r in self._db.execute(
                    "SELECT DISTINCT q FROM hourly WHERE dev = (SELECT id FROM devices WHERE mac = ?)", (mac,)
                )
            }
            names = self._quantity_names(ids)
        return sorted(names[i] for i in ids)

    # -- gateway state -----------------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        """The value stored by :meth:`set_state` (decoded from JSON), or ``default``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_state(self, key: str, value_json: Any) -> None:
        """Store any JSON-serialisable value under ``key``, committed immediately (survives a kill;
        ``get_state`` returns an equal value). ``None`` is stored as JSON null; use :meth:`delete_state`
        to remove a key."""
        self.set_states({key: value_json})

    def set_states(self, items: Mapping[str, Any]) -> None:
        """Several :meth:`set_state` in one transaction."""
        now = time.time()
        rows = [(k, json.dumps(v, separators=(",", ":")), now) for k, v in items.items()]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO state (key, value, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete_state(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM state WHERE key = ?", (key,))

    def state_keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [
                r[0]
                for r in self._db.execute(
                    "SELECT key FROM state WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
                )
            ]

    # -- lifecycle ---------------------------------------------------------------------------------

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            with self._lock:
                try:
                    self._db.execute("PRAGMA optimize")
                except sqlite3.Error:
                    pass
                self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _many(sql: str, k: int) -> str:
    """``sql`` (an INSERT of one VALUES row of ?) inserting ``k`` rows."""
    one = sql[sql.index("(?") : sql.index("?)") + 2]
    return sql.replace(one, ", ".join([one] * k), 1)


_ROWS_PER_STATEMENT = 40  # 7 * 40 parameters: within the 999 of old SQLite builds
_UPSERT_HOURLY_MANY = _many(_UPSERT_HOURLY, _ROWS_PER_STATEMENT)
_UPSERT_SEEN_MANY = _many(_UPSERT_SEEN, _ROWS_PER_STATEMENT)


def _executemany(db: sqlite3.Connection, sql: str, sql_many: str, rows: list[tuple[Any, ...]]) -> None:
    """``db.executemany(sql, rows)``, by statements of _ROWS_PER_STATEMENT rows (each row costs less)."""
    k = _ROWS_PER_STATEMENT
    full = len(rows) - len(rows) % k
    if full:
        db.executemany(sql_many, [tuple(chain.from_iterable(rows[i : i + k])) for i in range(0, full, k)])
    if full < len(rows):
        db.executemany(sql, rows[full:])


def _close_hour(
    out: list[tuple[Any, ...]],
    dev: int,
    hour: int,
    groups: dict[int, list[tuple[float, ...]]],
    qset_qids: Mapping[int, tuple[int, ...]],
) -> None:
    """Append the hourly rows (dev, hour, quantity id, min, max, count, sum) of a device's readings in one hour,
    grouped by quantity set: a column of values per quantity (zip), aggregated C-level (sorted, fsum)."""
    if len(groups) == 1:
        ((q, vl),) = groups.items()
        if len(vl) == 1:
            for qid, v in zip(qset_qids[q], vl[0]):  # noqa: B905 (a keyword makes every zip() call slow)
                out.append((dev, hour, qid, v, v, 1, v))
            return
        cols: Iterable[tuple[int, Sequence[float]]] = zip(qset_qids[q], zip(*vl))  # noqa: B905
    else:
        acc: dict[int, list[float]] = {}
        for q, vl in groups.items():
            for qid, col in zip(qset_qids[q], zip(*vl)):  # noqa: B905
                c = acc.get(qid)
                if c is None:
                    acc[qid] = list(col)
                else:
                    c.extend(col)
        cols = acc.items()
    for qid, col in cols:
        s = sorted(col)  # min and max in one call
        out.append((dev, hour, qid, s[0], s[-1], len(s), fsum(s)))


def _finite_time(ts: object) -> float:
    t = float(ts)  # type: ignore[arg-type]
    if not math.isfinite(t):
        raise ValueError(f"reading time {ts!r} is not finite")
    return t


def _statements(script: str) -> Iterator[str]:
    """The statements of a schema script (no semicolons inside them)."""
    return (s.strip() for s in script.split(";") if s.strip())


def _v1_readings(cur: Iterable[tuple[float, str, float]]) -> Iterator[tuple[float, tuple[str, ...], tuple[float, ...]]]:
    """Readings (time, quantities, values) from v1 value rows of one device in (ts, rowid) order: consecutive
    values with the same time, a reading ending where a quantity repeats."""
    ts: float | None = None
    keys: list[str] = []
    vals: list[float] = []
    for t, q, v in cur:
        if t != ts or q in keys:
            if keys:
                yield ts, tuple(keys), tuple(vals)  # type: ignore[misc]
            ts, keys, vals = t, [], []
        keys.append(q)
        vals.append(v)
    if keys:
        yield ts, tuple(keys), tuple(vals)  # type: ignore[misc]


def _split(rows: list[tuple[float, int, tuple[float, ...]]]) -> Iterator[list[tuple[float, int, tuple[float, ...]]]]:
    """Cut (time, quantity set, values) readings in time order into runs that fit a chunk."""
    part: list[tuple[float, int, tuple[float, ...]]] = []
    size = 0
    start = 0.0
    for r in rows:
        b = 12 + 8 * len(r[2])
        if part and (size + b > CHUNK_BYTES or r[0] - start > CHUNK_SPAN):
            yield part
            part, size = [], 0
        if not part:
            start = r[0]
        part.append(r)
        size += b
    if part:
        yield part


def _chunk_row(cid: int, dev: int, part: list[tuple[float, int, tuple[float, ...]]]) -> tuple[Any, ...]:
    """The raw_chunks row of (time, quantity set, values) readings."""
    ts = [r[0] for r in part]
    nv = sum(len(r[2]) for r in part)
    data = _pack(ts, [r[1] for r in part], chain.from_iterable(r[2] for r in part), nv)
    return (cid, dev, min(ts), max(ts), len(ts), nv, data)

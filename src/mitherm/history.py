"""SQLite history of readings: raw values for N days, hourly min/mean/max forever, gateway state.

Writes are buffered in memory by :meth:`History.add` and written by :meth:`History.flush` in one
transaction (the owner flushes at least once a second, e.g. with :meth:`History.run_flusher`). The
database runs in WAL mode with ``synchronous=NORMAL``: a killed process loses at most the unflushed
buffer and never corrupts the file (a power cut may additionally lose the last commits).

Hourly aggregates are maintained incrementally at flush time (``count`` and ``sum`` are stored so the
mean stays exact), which is why pruning raw readings never touches them."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .mac import normalize_mac

__all__ = ["SCHEMA_VERSION", "DeviceRow", "History", "HistoryError", "HourlyRow", "ReadingRow"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Values kept in memory at most while flushes fail (a full disk, a locked database).
MAX_BUFFER = 1_000_000

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS devices (
    mac TEXT PRIMARY KEY,
    name TEXT,
    model TEXT,
    format TEXT,
    first_seen REAL,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS readings (
    mac TEXT NOT NULL,
    ts REAL NOT NULL,
    quantity TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_mac_ts ON readings (mac, ts);
CREATE TABLE IF NOT EXISTS hourly (
    mac TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity TEXT NOT NULL,
    min REAL NOT NULL,
    mean REAL NOT NULL,
    max REAL NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    PRIMARY KEY (mac, hour, quantity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated REAL NOT NULL
);
"""

_INSERT_READING = "INSERT INTO readings (mac, ts, quantity, value) VALUES (?, ?, ?, ?)"
_UPSERT_HOURLY = """
INSERT INTO hourly (mac, hour, quantity, min, mean, max, count, sum) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (mac, hour, quantity) DO UPDATE SET
    min = min(hourly.min, excluded.min),
    max = max(hourly.max, excluded.max),
    count = hourly.count + excluded.count,
    sum = hourly.sum + excluded.sum,
    mean = (hourly.sum + excluded.sum) / (hourly.count + excluded.count)
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


class History:
    """The history database. Thread-safe: ``add`` is cheap and may be called from the event loop while
    ``flush`` runs in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise HistoryError(f"cannot open history database {self.path}: {e}") from e
        self._lock = threading.RLock()  # the connection
        self._buf_lock = threading.Lock()  # the buffer
        self._buffer: list[tuple[str, float, str, float]] = []
        self._closed = False

    # -- schema ------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} has schema version {version}; this mitherm understands up to "
                f"{SCHEMA_VERSION} (upgrade mitherm)"
            )
        if version < 1:
            try:
                self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA_V1} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- writing -----------------------------------------------------------------------------------

    def add(self, mac: str, ts: float, values: Mapping[str, float | int | bool | str]) -> int:
        """Buffer the numeric values of one reading (booleans as 0/1; strings are skipped).

        Returns the number of values buffered. Nothing is written until :meth:`flush`."""
        mac = normalize_mac(mac)
        ts = float(ts)
        rows = []
        for quantity, value in values.items():
            f = _numeric(value)
            if f is not None:
                rows.append((mac, ts, quantity, f))
        if rows:
            with self._buf_lock:
                self._buffer.extend(rows)
        return len(rows)

    @property
    def pending(self) -> int:
        """Values buffered and not yet flushed."""
        return len(self._buffer)

    def flush(self) -> int:
        """Write the buffered values in one transaction, update hourly aggregates and device
        first/last seen. Returns the number of values written."""
        with self._buf_lock:
            rows, self._buffer = self._buffer, []
        if not rows:
            return 0
        hourly: dict[tuple[str, int, str], list[float]] = {}
        seen: dict[str, list[float]] = {}
        for mac, ts, quantity, value in rows:
            key = (mac, int(ts // 3600) * 3600, quantity)
            agg = hourly.get(key)
            if agg is None:
                hourly[key] = [value, value, value, 1.0]  # min, max, sum, count
            else:
                if value < agg[0]:
                    agg[0] = value
                if value > agg[1]:
                    agg[1] = value
                agg[2] += value
                agg[3] += 1
            s = seen.get(mac)
            if s is None:
                seen[mac] = [ts, ts]
            elif ts < s[0]:
                s[0] = ts
            elif ts > s[1]:
                s[1] = ts
        hourly_rows = [
            (mac, hour, q, mn, total / count, mx, int(count), total)
            for (mac, hour, q), (mn, mx, total, count) in hourly.items()
        ]
        device_rows = [(mac, None, None, None, first, last) for mac, (first, last) in seen.items()]
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN")
                try:
                    db.executemany(_INSERT_READING, rows)
                    db.executemany(_UPSERT_HOURLY, hourly_rows)
                    db.executemany(_UPSERT_DEVICE, device_rows)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except BaseException:
            # Put the rows back in front of anything added meanwhile: a transient error (disk full,
            # database locked) must not lose data. They are retried on the next flush.
            with self._buf_lock:
                self._buffer[:0] = rows
                excess = len(self._buffer) - MAX_BUFFER
                if excess > 0:  # the database stays unwritable: bound the memory, drop the oldest
                    del self._buffer[:excess]
                    log.error("history: database unwritable, dropped the %d oldest buffered values", excess)
            raise
        return len(rows)

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
        number of rows deleted."""
        cutoff = time.time() - raw_days * 86400.0
        self.flush()
        with self._lock:
            macs = [r[0] for r in self._db.execute("SELECT mac FROM devices")]
            deleted = 0
            self._db.execute("BEGIN")
            try:
                for mac in macs:  # per device, so the (mac, ts) index serves the range delete
                    cur = self._db.execute("DELETE FROM readings WHERE mac = ? AND ts < ?", (mac, cutoff))
                    deleted += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return deleted

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
            self._db.execute("BEGIN")
            try:
                for table in ("readings", "hourly", "devices"):
                    self._db.execute(f"DELETE FROM {table} WHERE mac = ?", (mac,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
        """Raw readings of a device, oldest first, with ``since <= ts < until``. Buffered values are
        flushed first so the answer includes everything added so far."""
        mac = normalize_mac(mac)
        self.flush()
        sql = "SELECT ts, quantity, value FROM readings WHERE mac = ? AND ts >= ? AND ts < ?"
        args: list[Any] = [mac, -math.inf if since is None else since, math.inf if until is None else until]
        sql, args = _quantity_filter(sql, args, quantity)
        sql += " ORDER BY ts, rowid"
        with self._lock:
            return [ReadingRow(*r) for r in self._db.execute(sql, args)]

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
        sql = "SELECT hour, quantity, min, mean, max, count FROM hourly WHERE mac = ? AND hour >= ? AND hour < ?"
        sql, args = _quantity_filter(sql, [mac, lo, hi], quantity)
        sql += " ORDER BY hour, quantity"
        with self._lock:
            return [HourlyRow(*r) for r in self._db.execute(sql, args)]

    def quantities(self, mac: str) -> list[str]:
        """The quantities ever recorded for a device (from the hourly table, so pruning keeps them)."""
        mac = normalize_mac(mac)
        self.flush()
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT quantity FROM hourly WHERE mac = ?", (mac,))]

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


def _quantity_filter(sql: str, args: list[Any], quantity: str | Iterable[str] | None) -> tuple[str, list[Any]]:
    if quantity is None:
        return sql, args
    if isinstance(quantity, str):
        return sql + " AND quantity = ?", [*args, quantity]
    qs = list(quantity)
    if not qs:
        return sql + " AND 0", args
    return sql + f" AND quantity IN ({','.join('?' * len(qs))})", [*args, *qs]

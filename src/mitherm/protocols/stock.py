"""The stock Xiaomi settings service ``ebe0ccb0-7a0a-4b0c-8a1a-6ff2997da3a6`` (LYWSD03MMC, MHO-C401), sans-IO.

Reference: shared/reference/keys.md §4.1. Every characteristic is ``ebe0ccXX-7a0a-4b0c-8a1a-6ff2997da3a6``;
all integers are little-endian:

======  ==========  ================================================================================
char    props       content
======  ==========  ================================================================================
ccbe    read/write  temperature unit: ``00`` °C, ``01`` °F
ccb7    read/write  clock: u32 seconds + optional s8 time zone hours (counts from power-up until set)
ccc1    read/notify live data: s16 temperature ×0.01 °C, u8 RH %, u16 battery mV (MHO-C401: 3 bytes)
ccb9    read        history counters: u32 last index, u32 next index
ccba    read/write  history start index (u32); writing it starts the dump on ccbc
ccbc    notify      history records: u32 index, u32 time, s16 max ×0.1 °C, u8 max RH, s16 min, u8 min RH
ccbb    read        the last hourly record (same layout)
ccd7    read/write  comfort limits (MHO-C401): s16 t_hi, s16 t_lo ×0.01 °C, u8 RH hi, u8 RH lo
======  ==========  ================================================================================

Codecs are plain functions; :class:`StockHistoryDownload` is the download state machine (feed it the
counters read from ccb9, write what ``start()`` returns to ccba, feed it every ccbc notification).
:class:`HistoryRecord` is shared with the pvvx history (one row per record, either kind).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

__all__ = [
    "BATTERY_UUID",
    "CLOCK_UUID",
    "COMFORT_UUID",
    "HISTORY_COUNTERS_UUID",
    "HISTORY_INDEX_UUID",
    "HISTORY_LAST_UUID",
    "HISTORY_RECORDS_UUID",
    "LIVE_UUID",
    "SERVICE_UUID",
    "SPEED_UUID",
    "UNIT_UUID",
    "ClockValue",
    "Comfort",
    "HistoryCounters",
    "HistoryProgress",
    "HistoryRecord",
    "LiveData",
    "StockError",
    "StockHistoryDownload",
    "decode_clock",
    "decode_comfort",
    "decode_history_counters",
    "decode_history_record",
    "decode_live",
    "decode_unit",
    "encode_clock",
    "encode_comfort",
    "encode_history_counters",
    "encode_history_record",
    "encode_history_start",
    "encode_live",
    "encode_unit",
    "host_clock",
]


def _uuid(short: str) -> str:
    return f"ebe0{short}-7a0a-4b0c-8a1a-6ff2997da3a6"


SERVICE_UUID = _uuid("ccb0")
CLOCK_UUID = _uuid("ccb7")
HISTORY_COUNTERS_UUID = _uuid("ccb9")
HISTORY_INDEX_UUID = _uuid("ccba")
HISTORY_LAST_UUID = _uuid("ccbb")
HISTORY_RECORDS_UUID = _uuid("ccbc")
UNIT_UUID = _uuid("ccbe")
LIVE_UUID = _uuid("ccc1")
BATTERY_UUID = _uuid("ccc4")
COMFORT_UUID = _uuid("ccd7")
SPEED_UUID = _uuid("ccd8")


class StockError(ValueError):
    """Bytes that do not fit the characteristic's layout."""


# --- unit --------------------------------------------------------------------------------------------------

UNITS = {"C": 0x00, "F": 0x01}


def encode_unit(unit: str) -> bytes:
    u = unit.strip().upper().lstrip("°")
    if u not in UNITS:
        raise StockError(f"unit must be C or F, not {unit!r}")
    return bytes([UNITS[u]])


def decode_unit(data: bytes) -> str:
    """``00`` °C, ``01`` °F (LYWSD02's ``FF`` = °C is accepted too)."""
    if len(data) < 1:
        raise StockError("empty unit value")
    return "F" if data[0] == 0x01 else "C"


# --- clock -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClockValue:
    seconds: int  # unix time once set; seconds since power-up before (keys.md §4.1, an inference)
    tz_hours: int | None = None


def host_clock(now: float | None = None) -> ClockValue:
    """The host's clock: UTC unix seconds and the local UTC offset in whole hours (DST included)."""
    t = time.time() if now is None else now
    offset = time.localtime(t).tm_gmtoff or 0
    return ClockValue(int(t), round(offset / 3600))


def encode_clock(value: ClockValue) -> bytes:
    """u32 seconds, then the time zone as s8 hours when given (5 bytes, the LYWSD02 layout)."""
    out = struct.pack("<I", value.seconds & 0xFFFFFFFF)
    if value.tz_hours is not None:
        if not -12 <= value.tz_hours <= 14:
            raise StockError("time zone must be -12..+14 hours")
        out += struct.pack("<b", value.tz_hours)
    return out


def decode_clock(data: bytes) -> ClockValue:
    if len(data) < 4:
        raise StockError(f"clock value of {len(data)} bytes (needs at least 4)")
    (seconds,) = struct.unpack_from("<I", data)
    tz = struct.unpack_from("<b", data, 4)[0] if len(data) >= 5 else None
    return ClockValue(seconds, tz)


# --- live data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveData:
    temperature_c: float
    humidity_pct: float
    voltage_v: float | None = None  # MHO-C401 sends 3 bytes: no battery

    def to_json(self) -> dict[str, float | None]:
        return {"temperature_c": self.temperature_c, "humidity_pct": self.humidity_pct, "voltage_v": self.voltage_v}


def decode_live(data: bytes) -> LiveData:
    if len(data) < 3:
        raise StockError(f"live data of {len(data)} bytes (needs 3 or 5)")
    temp, rh = struct.unpack_from("<hB", data)
    volts = struct.unpack_from("<H", data, 3)[0] / 1000 if len(data) >= 5 else None
    return LiveData(temp / 100, float(rh), volts)


def encode_live(temperature_c: float, humidity_pct: float, voltage_v: float | None = None) -> bytes:
    out = struct.pack("<hB", round(temperature_c * 100), max(0, min(100, round(humidity_pct))))
    if voltage_v is not None:
        out += struct.pack("<H", round(voltage_v * 1000))
    return out


# --- comfort limits (MHO-C401 ccd7) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comfort:
    temp_hi: float
    temp_lo: float
    humi_hi: int
    humi_lo: int


_COMFORT = struct.Struct("<hhBB")


def decode_comfort(data: bytes) -> Comfort:
    """Interpretation of the sample ``8c0a 6c07 55 14`` = 27.00/19.00 °C, 85/20 % (keys.md §4.1)."""
    if len(data) < _COMFORT.size:
        raise StockError(f"comfort value of {len(data)} bytes (needs 6)")
    t_hi, t_lo, h_hi, h_lo = _COMFORT.unpack_from(data)
    return Comfort(t_hi / 100, t_lo / 100, h_hi, h_lo)


def encode_comfort(c: Comfort) -> bytes:
    if c.temp_lo > c.temp_hi or c.humi_lo > c.humi_hi:
        raise StockError("comfort limits: low must not exceed high")
    return _COMFORT.pack(round(c.temp_hi * 100), round(c.temp_lo * 100), c.humi_hi, c.humi_lo)


# --- history ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One stored history record. Stock firmware: hourly min/max; pvvx: one averaged reading with the
    battery voltage. ``timestamp`` is the device clock (unix time once the clock was set)."""

    index: int
    timestamp: int
    temperature_c: float | None = None
    humidity_pct: float | None = None
    voltage_v: float | None = None
    temperature_min_c: float | None = None
    temperature_max_c: float | None = None
    humidity_min_pct: float | None = None
    humidity_max_pct: float | None = None

    def values(self) -> dict[str, float]:
        """The quantities the record carries (what ``History.add`` takes)."""
        names = (
            "temperature_c",
            "humidity_pct",
            "voltage_v",
            "temperature_min_c",
            "temperature_max_c",
            "humidity_min_pct",
            "humidity_max_pct",
        )
        return {n: v for n in names if (v := getattr(self, n)) is not None}

    def to_json(self) -> dict[str, float | int]:
        return {"index": self.index, "timestamp": self.timestamp, **self.values()}


@dataclass(frozen=True, slots=True)
class HistoryProgress:
    received: int
    total: int | None
    done: bool = False


@dataclass(frozen=True, slots=True)
class HistoryCounters:
    last_index: int  # index of the newest stored record
    next_index: int  # index the next record will get


_COUNTERS = struct.Struct("<II")
_STOCK_RECORD = struct.Struct("<IIhBhB")  # index, time, max ×0.1 °C, max RH, min ×0.1 °C, min RH


def decode_history_counters(data: bytes) -> HistoryCounters:
    if len(data) < _COUNTERS.size:
        raise StockError(f"history counters of {len(data)} bytes (needs 8)")
    return HistoryCounters(*_COUNTERS.unpack_from(data))


def encode_history_counters(c: HistoryCounters) -> bytes:
    return _COUNTERS.pack(c.last_index, c.next_index)


def encode_history_start(index: int) -> bytes:
    return struct.pack("<I", index & 0xFFFFFFFF)


def decode_history_record(data: bytes) -> HistoryRecord:
    if len(data) < _STOCK_RECORD.size:
        raise StockError(f"history record of {len(data)} bytes (needs 14)")
    idx, ts, t_max, h_max, t_min, h_min = _STOCK_RECORD.unpack_from(data)
    return HistoryRecord(
        index=idx,
        timestamp=ts,
        temperature_min_c=t_min / 10,
        temperature_max_c=t_max / 10,
        humidity_min_pct=float(h_min),
        humidity_max_pct=float(h_max),
    )


def encode_history_record(rec: HistoryRecord) -> bytes:
    return _STOCK_RECORD.pack(
        rec.index,
        rec.timestamp,
        round((rec.temperature_max_c or 0.0) * 10),
        round(rec.humidity_max_pct or 0.0),
        round((rec.temperature_min_c or 0.0) * 10),
        round(rec.humidity_min_pct or 0.0),
    )


class StockHistoryDownload:
    """Dump the hourly history. Feed the counters read from ccb9 to the constructor, write ``start()``
    to ccba (with notifications on ccbc enabled first), pass every ccbc notification to ``receive()``.
    Events: :class:`HistoryRecord`, :class:`HistoryProgress`; ``done`` turns true when the record with
    the last index arrived (at once when the device holds no record).

    ``start_index``: the first index to fetch (default: the oldest, ``next - capacity``)."""

    def __init__(self, counters: HistoryCounters | bytes, start_index: int | None = None, capacity: int = 0) -> None:
        if isinstance(counters, bytes | bytearray):
            counters = decode_history_counters(bytes(counters))
        self.counters = counters
        last = counters.last_index
        first = 0 if not capacity else max(0, counters.next_index - capacity)
        self.start_index = max(first, start_index if start_index is not None else first)
        self.empty = counters.next_index == 0 or self.start_index > last
        self.total = 0 if self.empty else last - self.start_index + 1
        self.records: list[HistoryRecord] = []
        self.done = self.empty

    def start(self) -> bytes:
        return encode_history_start(self.start_index)

    def receive(self, data: bytes) -> list[HistoryRecord | HistoryProgress]:
        if self.done:
            return []
        rec = decode_history_record(data)
        if rec.index < self.start_index:
            return []  # a stale record from an earlier request
        self.records.append(rec)
        self.done = rec.index >= self.counters.last_index
        return [rec, HistoryProgress(len(self.records), self.total, done=self.done)]

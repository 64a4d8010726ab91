"""``mitherm history``: print the recorded readings of one device.

``--from-device`` downloads the history stored on the device itself instead (stock LYWSD03MMC/MHO-C401:
hourly min/max records of the ``ebe0ccb0`` service; pvvx firmware: the 0x35 log). Record times are the
*device's* clock, which the stock firmware counts from power-up until someone sets it and the pvvx
firmware keeps as local time written as if it were UTC. :func:`fetch_device_history` therefore reads the
device clock right before and after the download, in the same connection, and shifts every record by
``host time - device time`` (:func:`convert_device_history`, sans-IO). ``--save`` puts the converted
records into the history database (:func:`save_device_history`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import csv
import json
import math
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from mitherm.history import History, HistoryError, HourlyRow, ReadingRow
from mitherm.mac import InvalidMac, normalize_mac
from mitherm.paths import default_db
from mitherm.protocols.stock import HistoryProgress, HistoryRecord

__all__ = [
    "ClockSample",
    "DeviceHistory",
    "convert_device_history",
    "fetch_device_history",
    "history",
    "parse_time",
    "save_device_history",
]

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|min|m|h|d|w)", re.IGNORECASE)
#: Column order of the pivoted table: the usual quantities first, then the others alphabetically.
_PREFERRED = (
    "temperature_c",
    "humidity_pct",
    "battery_pct",
    "voltage_v",
    "temperature_min_c",
    "temperature_max_c",
    "humidity_min_pct",
    "humidity_max_pct",
)
#: Short headers for the terminal table (CSV and JSON keep the quantity names).
_LABELS = {
    "temperature_c": "°C",
    "humidity_pct": "RH %",
    "battery_pct": "battery %",
    "voltage_v": "V",
    "moisture_pct": "moisture %",
    "rssi": "dBm",
    "temperature_min_c": "min °C",
    "temperature_max_c": "max °C",
    "humidity_min_pct": "min RH %",
    "humidity_max_pct": "max RH %",
}
#: A device clock reading below this (2010-01-01) was never set: it counts from power-up.
CLOCK_SET_MIN = 1_262_304_000
#: How far the device clock may be off the host's (or, on pvvx, off local time) and still count as set.
CLOCK_TOLERANCE_S = 900
#: ``--save``: a stored reading of the same quantity this close counts as the record already being stored
#: (every download measures the clock offset anew, to the second, and device clocks drift).
SAVE_MATCH_WINDOW_S = 60.0
STOCK_RECORD_STEP_S = 3600


def parse_time(text: str, now: float | None = None) -> float:
    """Unix time from ``2h``/``30m``/``1d``/``1w`` (that long ago), ``now``, a Unix timestamp, or an ISO
    date/datetime (local time unless it carries an offset). Raises ValueError with a helpful message."""
    now = time.time() if now is None else now
    s = text.strip()
    if s.lower() == "now":
        return now
    m = _RELATIVE.fullmatch(s)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2).lower()]
    if re.fullmatch(r"\d{9,}(?:\.\d+)?", s):
        return float(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use a duration ago such as 30m, 2h, 1d, 1w, an ISO date such as "
            "2024-05-01 or 2024-05-01T12:00, or a Unix timestamp"
        ) from None
    return dt.timestamp()  # naive datetimes are local time


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _columns(quantities: set[str]) -> list[str]:
    return [q for q in _PREFERRED if q in quantities] + sorted(quantities - set(_PREFERRED))


def _pivot(rows: list[ReadingRow]) -> tuple[list[str], list[tuple[float, dict[str, float]]]]:
    """Readings grouped by timestamp (the values of one frame share it)."""
    out: list[tuple[float, dict[str, float]]] = []
    for ts, quantity, value in rows:
        if not out or out[-1][0] != ts:
            out.append((ts, {}))
        out[-1][1][quantity] = value
    return _columns({r.quantity for r in rows}), out


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if abs(value) < 1e-3 else str(round(value, 4))


def _json_value(value: float) -> float | int:
    return int(value) if value == int(value) and abs(value) < 1e15 else value


# --- the history stored on the device (--from-device) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClockSample:
    """The device clock (whole seconds) and the host's Unix time at the moment it was read."""

    device: int
    host: float


@dataclass(slots=True)
class DeviceHistory:
    """Records downloaded from a device, with their times converted to host Unix time.

    ``offset`` was added to every device timestamp; ``clock`` says what the device clock was:
    ``"unset"`` (counts from power-up), ``"utc"``, ``"local"`` (pvvx: local time written as UTC) or
    ``"off"`` (set, but far from the host clock). ``times[i]`` is the host time of ``records[i]``."""

    mac: str
    firmware: str
    records: list[HistoryRecord]
    times: list[float]
    offset: int
    clock: str
    device_now: int
    tz_offset: int  # the host's UTC offset (s) when the clock was read
    estimated: int = 0  # stock records older than the clock setting: times derived from their index
    dropped: int = 0  # pvvx records older than the clock setting: left out (their time is unknown)
    notes: list[str] = field(default_factory=list)

    @property
    def correction(self) -> str:
        """One line saying which correction was applied (the output header)."""
        shift = f"times shifted by {self.offset:+d} s"
        if self.clock == "unset":
            since = "boot" if self.firmware == "pvvx" else "power-up"
            text = f"device clock not set (counts from {since}, {_duration(self.device_now)} ago): {shift}"
        elif self.clock == "local":
            drift = -(self.offset + self.tz_offset)
            text = (
                f"device clock keeps local time as UTC (pvvx convention, UTC{_utc_offset(self.tz_offset)}), "
                f"{drift:+d} s off the host clock: {shift}"
            )
        elif self.clock == "utc":
            text = f"device clock is UTC, {-self.offset:+d} s off the host clock: {shift}"
        else:
            where = "behind" if self.offset > 0 else "ahead of"
            text = f"device clock is {_duration(abs(self.offset))} {where} the host clock: {shift}"
        return "; ".join([text, *self.notes])

    def rows(self, since: float | None = None, until: float | None = None) -> list[ReadingRow]:
        """The records as readings (oldest first), ``since <= ts < until``."""
        out: list[ReadingRow] = []
        for ts, rec in sorted(zip(self.times, self.records, strict=True), key=lambda p: (p[0], p[1].index)):
            if (since is not None and ts < since) or (until is not None and ts >= until):
                continue
            out.extend(ReadingRow(ts, q, v) for q, v in rec.values().items())
        return out


def _duration(seconds: float) -> str:
    s = abs(int(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 120:
        return f"{sign}{s} s"
    if s < 2 * 3600:
        return f"{sign}{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{sign}{s / 3600:.1f} h"
    if s < 2 * 365 * 86400:
        return f"{sign}{s / 86400:.1f} d"
    return f"{sign}{s / (365.25 * 86400):.1f} years"


def _utc_offset(seconds: int) -> str:
    sign = "+" if seconds >= 0 else "-"
    h, m = divmod(abs(seconds) // 60, 60)
    return f"{sign}{h:02d}:{m:02d}"


def _host_tz_offset(now: float) -> int:
    return int(time.localtime(now).tm_gmtoff or 0)


def convert_device_history(
    mac: str,
    firmware: str,
    records: list[HistoryRecord],
    before: ClockSample,
    after: ClockSample,
    tz_offset: int | None = None,
) -> DeviceHistory:
    """Convert device timestamps to host Unix time with the clock read ``before`` and ``after`` the
    download: ``offset = host - device`` (the device's whole seconds taken as their middle), the mean
    of both samples, rounded to the second. ``tz_offset``: the host's UTC offset in seconds (default:
    the local one at ``after.host``), which tells a pvvx clock on local time from one on UTC.

    Stock records written before the clock was set carry the power-up count: when the clock is set now,
    their times are derived from their index (records are hourly). pvvx records of that kind are left out."""
    tz = _host_tz_offset(after.host) if tz_offset is None else tz_offset
    offset = round(sum(s.host - (s.device + 0.5) for s in (before, after)) / 2)
    device_now = after.device
    if device_now < CLOCK_SET_MIN:
        clock = "unset"
    elif firmware == "pvvx" and tz != 0 and abs(offset + tz) <= CLOCK_TOLERANCE_S:
        clock = "local"
    elif abs(offset) <= CLOCK_TOLERANCE_S:
        clock = "utc"
    else:
        clock = "off"
    kept: list[HistoryRecord] = []
    times: list[float] = []
    estimated = dropped = 0
    stale = clock != "unset"  # records with a power-up count on a set clock predate the setting
    anchor = max((r for r in records if r.timestamp >= CLOCK_SET_MIN), key=lambda r: r.index, default=None)
    newest = max((r.index for r in records), default=0)
    for rec in records:
        device_ts = rec.timestamp
        if stale and device_ts < CLOCK_SET_MIN:
            if firmware != "stock":
                dropped += 1
                continue
            estimated += 1
            if anchor is not None:
                device_ts = anchor.timestamp - (anchor.index - rec.index) * STOCK_RECORD_STEP_S
            else:  # the newest complete hour began one to two hours ago
                device_ts = device_now - (newest - rec.index + 2) * STOCK_RECORD_STEP_S
        kept.append(rec)
        times.append(float(device_ts + offset))
    notes = []
    if estimated:
        notes.append(f"{estimated} records from before the clock was set: times estimated from their index (±1 h)")
    if dropped:
        notes.append(f"{dropped} records from before the clock was set left out (their times are unknown)")
    return DeviceHistory(
        mac=mac,
        firmware=firmware,
        records=kept,
        times=times,
        offset=offset,
        clock=clock,
        device_now=device_now,
        tz_offset=tz,
        estimated=estimated,
        dropped=dropped,
        notes=notes,
    )


async def _sample(read: Callable[[], Any]) -> ClockSample:
    t0 = time.time()
    device = await read()
    return ClockSample(int(device), (t0 + time.time()) / 2)


async def fetch_device_history(
    address: str,
    *,
    radio: Any = None,
    transport: str | None = None,
    progress: Callable[[HistoryProgress], None] | None = None,
    timeout: float = 20.0,
    reply_timeout: float = 5.0,
) -> DeviceHistory:
    """Connect, read the device clock, download the stored history, read the clock again, and convert
    the record times to host time (:func:`convert_device_history`). Raises
    :class:`~mitherm.commands.settings.SettingsError` (a ``click.ClickException``)."""
    from mitherm.protocols import pvvx as pv

    from .settings import PvvxChannel, SettingsError, StockSettings, _connected, _pvvx, detect_firmware

    async with _connected(address, radio, transport, timeout) as link:
        firmware = await detect_firmware(link)
        if firmware == "atc1441":
            raise SettingsError("the atc1441 firmware keeps no history")
        if firmware == "stock":
            stock = StockSettings(link, reply_timeout)

            async def read_clock() -> int:
                return (await stock.clock()).seconds

            download: Callable[[], Any] = lambda: stock.history(progress)  # noqa: E731
        else:
            channel: PvvxChannel = await _pvvx(link, reply_timeout)

            async def read_clock() -> int:
                reply = await channel.command(pv.time_request())
                assert isinstance(reply, pv.TimeReply)
                return reply.now

            download = lambda: channel.history(progress)  # noqa: E731
        before = await _sample(read_clock)
        records = await download()
        after = await _sample(read_clock)
        mac = link.address
    return convert_device_history(normalize_mac(mac), firmware, records, before, after)


def save_device_history(
    db: History, dh: DeviceHistory, since: float | None = None, until: float | None = None
) -> tuple[int, int]:
    """Add the converted records to the history database as readings (then flush). A value is skipped
    when the database holds the same quantity of the device within :data:`SAVE_MATCH_WINDOW_S`
    seconds (an earlier download, or the gateway's own reading). Returns ``(added, skipped)`` values."""
    rows = dh.rows(since, until)
    if not rows:
        return 0, 0
    w = SAVE_MATCH_WINDOW_S
    quantities = sorted({r.quantity for r in rows})
    stored: dict[str, list[float]] = {}
    for r in db.readings(dh.mac, rows[0].ts - w, rows[-1].ts + w + 1, quantity=quantities):
        stored.setdefault(r.quantity, []).append(r.ts)
    for times in stored.values():
        times.sort()
    batches: dict[float, dict[str, float]] = {}
    skipped = 0
    for ts, quantity, value in rows:
        times = stored.get(quantity, [])
        i = bisect.bisect_left(times, ts - w)
        if i < len(times) and times[i] <= ts + w:
            skipped += 1
            continue
        batches.setdefault(ts, {})[quantity] = value
    added = sum(db.add(dh.mac, ts, values) for ts, values in batches.items())
    db.flush()
    return added, skipped


@contextlib.contextmanager
def _progress_bar(address: str) -> Iterator[Callable[[HistoryProgress], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"history from {address}", total=None)

        def update(p: HistoryProgress) -> None:
            bar.update(task, completed=p.received, total=p.total)

        yield update


def _download(mac: str, source: str | None, sim_house: str | None, timeout: float) -> DeviceHistory:
    from .device import DeviceCommandError, _target, sim_radio

    async def go() -> DeviceHistory:
        with _progress_bar(mac) as progress:
            if sim_house:
                async with sim_radio(sim_house) as radio:
                    return await fetch_device_history(mac, radio=radio, progress=progress, timeout=timeout)
            return await fetch_device_history(mac, transport=_target(source), progress=progress, timeout=timeout)

    try:
        return asyncio.run(go())
    except DeviceCommandError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.Abort() from None


@click.command("history")
@click.argument("mac")
@click.option(
    "--since",
    default=None,
    help="Start: 30m, 2h, 1d, 1w ago, or an ISO date/time (default: 1d; with --from-device: everything).",
)
@click.option("--until", default=None, help="End (exclusive), same forms as --since (default: now).")
@click.option("--hourly", is_flag=True, help="Hourly min/mean/max/count instead of raw readings.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV output.")
@click.option("--json", "fmt", flag_value="json", help="JSON lines output.")
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="MITHERM_DB",
    default=None,
    help="History database (default: history.sqlite3 in the mitherm data directory; env MITHERM_DB).",
)
@click.option(
    "--from-device",
    is_flag=True,
    help="Download the history stored on the device over GATT (stock hourly min/max, pvvx log); "
    "times are converted from the device clock to host time.",
)
@click.option(
    "--source",
    help="With --from-device: bleak: (the local adapter, default) or bumble:TRANSPORT (e.g. bumble:usb:0).",
)
@click.option(
    "--sim",
    "sim_house",
    metavar="HOUSE",
    help="With --from-device: a virtual device ('minimal', 'demo', a house file).",
)
@click.option("--timeout", type=float, default=20.0, show_default=True, help="With --from-device: seconds to connect.")
@click.option("--save", is_flag=True, help="With --from-device: add the records to the history database.")
def history(
    mac: str,
    since: str | None,
    until: str | None,
    hourly: bool,
    fmt: str | None,
    db_path: Path | None,
    from_device: bool,
    source: str | None,
    sim_house: str | None,
    timeout: float,
    save: bool,
) -> None:
    """Print the recorded readings of the device MAC (--from-device: the history stored on it)."""
    try:
        mac = normalize_mac(mac)
    except InvalidMac as e:
        raise click.ClickException(str(e)) from None
    if not from_device:
        for flag, given in (("--source", source), ("--sim", sim_house), ("--save", save)):
            if given:
                raise click.UsageError(f"{flag} goes with --from-device")
    elif hourly:
        raise click.UsageError("--hourly reads the database; the stock device records are hourly already")
    elif source and sim_house:
        raise click.UsageError("give --source or --sim, not both")
    now = time.time()
    try:
        t0 = parse_time(since, now) if since else (None if from_device else now - 86400)
        t1 = parse_time(until, now) if until else None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    path = db_path or default_db()
    if from_device:
        _from_device(mac, t0, t1, fmt, path, source, sim_house, timeout, save)
        return
    if not path.is_file():
        raise click.ClickException(
            f"no history database at {path} (the gateway creates it; pass --db PATH or set MITHERM_DB)"
        )
    try:
        db = History(path)
    except HistoryError as e:
        raise click.ClickException(str(e)) from None
    with db:
        if db.device(mac) is None:
            raise click.ClickException(f"{mac} is not in the history database {path}")
        if hourly:
            _print_hourly(db.hourly(mac, t0, t1), mac, fmt)
        else:
            _print_raw(db.readings(mac, t0 if t0 is not None else now - 86400, t1), mac, fmt)


def _from_device(
    mac: str,
    t0: float | None,
    t1: float | None,
    fmt: str | None,
    path: Path,
    source: str | None,
    sim_house: str | None,
    timeout: float,
    save: bool,
) -> None:
    dh = _download(mac, source, sim_house, timeout)
    rows = dh.rows(t0, t1)
    count = len({r.ts for r in rows})
    title = f"{mac}: {count} of {len(dh.records)} device records ({dh.firmware})"
    if fmt:  # keep stdout machine-readable: the header goes to stderr
        click.echo(f"{title}\n{dh.correction}", err=True)
    _print_raw(rows, mac, fmt, title=title, caption=dh.correction, empty="no device records in this time range")
    if save:
        try:
            with History(path) as db:
                added, skipped = save_device_history(db, dh, t0, t1)
        except (HistoryError, OSError, sqlite3.Error) as e:
            raise click.ClickException(f"could not save to {path}: {e}") from None
        click.echo(f"saved {added} values to {path} ({skipped} already stored)", err=True)


def _print_raw(
    rows: list[ReadingRow],
    mac: str,
    fmt: str | None,
    *,
    title: str | None = None,
    caption: str | None = None,
    empty: str | None = None,
) -> None:
    columns, pivoted = _pivot(rows)
    out = sys.stdout
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["time", *columns])
        for ts, values in pivoted:
            w.writerow([_iso(ts), *(_fmt(values.get(c)) for c in columns)])
    elif fmt == "json":
        for ts, values in pivoted:
            obj: dict[str, Any] = {"time": _iso(ts), "ts": ts}
            obj.update((c, _json_value(values[c])) for c in columns if c in values)
            out.write(json.dumps(obj) + "\n")
    else:
        header = ["time", *(_LABELS.get(c, c) for c in columns)]
        table = _table(None if title else f"{mac}: {len(pivoted)} readings", header)
        for ts, values in pivoted:
            table.add_row(_local(ts), *(_fmt(values.get(c)) for c in columns))
        _show(table, bool(pivoted), empty, [line for line in (title, caption) if line])


def _print_hourly(rows: list[HourlyRow], mac: str, fmt: str | None) -> None:
    out = sys.stdout
    header = ["hour", "quantity", "min", "mean", "max", "count"]
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow([_iso(r.hour), r.quantity, _fmt(r.min), _fmt(r.mean), _fmt(r.max), r.count])
    elif fmt == "json":
        for r in rows:
            obj = {
                "hour": _iso(r.hour),
                "ts": r.hour,
                "quantity": r.quantity,
                "min": _json_value(r.min),
                "mean": _json_value(r.mean),
                "max": _json_value(r.max),
                "count": r.count,
            }
            out.write(json.dumps(obj) + "\n")
    else:
        table = _table(f"{mac}: hourly aggregates", header)
        for r in rows:
            table.add_row(_local(r.hour), r.quantity, _fmt(r.min), _fmt(r.mean), _fmt(r.max), str(r.count))
        _show(table, bool(rows))


def _table(title: str | None, header: list[str]):
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 or h == "quantity" else "right")
    return table


def _show(table: Any, any_rows: bool, empty: str | None = None, header: list[str] | None = None) -> None:
    """The table, after ``header`` lines (not wrapped to the table's width)."""
    from rich.console import Console

    console = Console(file=sys.stdout, soft_wrap=False)
    for line in header or ():
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    if not any_rows:
        console.print(empty or "no readings in this time range (try --since 1w)")
        return
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(history())

"""``mitherm history``: print the recorded readings of one device."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from mitherm.history import History, HistoryError, HourlyRow, ReadingRow
from mitherm.mac import InvalidMac, normalize_mac
from mitherm.paths import default_db

__all__ = ["history", "parse_time"]

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|min|m|h|d|w)", re.IGNORECASE)
#: Column order of the pivoted table: the usual quantities first, then the others alphabetically.
_PREFERRED = ("temperature_c", "humidity_pct", "battery_pct", "voltage_v")
#: Short headers for the terminal table (CSV and JSON keep the quantity names).
_LABELS = {
    "temperature_c": "°C",
    "humidity_pct": "RH %",
    "battery_pct": "battery %",
    "voltage_v": "V",
    "moisture_pct": "moisture %",
    "rssi": "dBm",
}


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


@click.command("history")
@click.argument("mac")
@click.option("--since", default=None, help="Start: 30m, 2h, 1d, 1w ago, or an ISO date/time (default: 1d).")
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
def history(
    mac: str, since: str | None, until: str | None, hourly: bool, fmt: str | None, db_path: Path | None
) -> None:
    """Print the recorded readings of the device MAC."""
    try:
        mac = normalize_mac(mac)
    except InvalidMac as e:
        raise click.ClickException(str(e)) from None
    now = time.time()
    try:
        t0 = parse_time(since, now) if since else now - 86400
        t1 = parse_time(until, now) if until else None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    path = db_path or default_db()
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
            _print_raw(db.readings(mac, t0, t1), mac, fmt)


def _print_raw(rows: list[ReadingRow], mac: str, fmt: str | None) -> None:
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
        table = _table(f"{mac}: {len(pivoted)} readings", ["time", *(_LABELS.get(c, c) for c in columns)])
        for ts, values in pivoted:
            table.add_row(_local(ts), *(_fmt(values.get(c)) for c in columns))
        _show(table, bool(pivoted))


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


def _table(title: str, header: list[str]):
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 or h == "quantity" else "right")
    return table


def _show(table: Any, any_rows: bool) -> None:
    from rich.console import Console

    console = Console(file=sys.stdout, soft_wrap=False)
    if not any_rows:
        console.print("no readings in this time range (try --since 1w)")
        return
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(history())

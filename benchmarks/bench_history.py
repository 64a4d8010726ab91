"""SQLite history benchmark: the CPU cost of ``History.add`` + ``flush`` per reading and per value, the file
size, and the time of the queries the dashboard makes (so a faster write path does not cost reads).

    .venv/bin/python benchmarks/bench_history.py [--repeats 7] [--profile]
    git show HEAD:src/mitherm/history.py > /tmp/history_head.py
    .venv/bin/python benchmarks/bench_history.py --baseline /tmp/history_head.py   # before/after, interleaved

The synthetic workload resembles the gateway replay benchmark (``bench_gateway.py``: 1,000,000 adverts,
500 devices, 152,000 decoded readings with 328,000 values): ``--readings`` calls of ``History.add`` with 2-5
numeric values each (2.2 on average), devices in random order, time advancing ``--step`` seconds per reading,
a ``flush()`` every ``--flush-every`` adds and one at the end. Each run writes a new database file; CPU is
process time (``time.process_time``: user + system, so the SQLite file writes count too), which is what a
Raspberry Pi pays. ``sink`` is the same readings through ``HistorySink.publish``, as the gateway calls it
(with the frame's ``packet_id`` or ``flags`` among the values of 3 readings in 4; the sink's inline flush when
too many values are pending, no other flushes).

The machine this runs on may be shared: the runs of the implementations alternate, and the best, median and
worst run are printed. Queries run on the last database of each: ``readings()`` of one device over 24 h
(the dashboard's day plot and CSV), the same for four quantities, ``hourly()`` over a week, ``quantities()``."""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import mitherm.history
from mitherm.model import Reading
from mitherm.service import HistorySink
from mitherm.state import DeviceState

T0 = 1_718_000_000.0
QUANTITIES = ("temperature_c", "humidity_pct", "battery_pct", "voltage_v", "rssi_dbm")
#: (number of values, probability): 2.2 values per reading on average, as in the gateway benchmark
SIZES = ((2, 0.88), (3, 0.08), (4, 0.02), (5, 0.02))

Work = list[tuple[str, float, dict[str, float | int]]]


def make_work(n: int, devices: int, step: float, seed: int = 1) -> Work:
    rng = random.Random(seed)
    macs = ["A4:C1:38:" + ":".join(f"{rng.randrange(256):02X}" for _ in range(3)) for _ in range(devices)]
    sizes = [s for s, _ in SIZES]
    weights = [w for _, w in SIZES]
    work: Work = []
    for i in range(n):
        k = rng.choices(sizes, weights)[0]
        values: dict[str, float | int] = {}
        for q in QUANTITIES[:k]:
            if q == "temperature_c":
                values[q] = round(rng.uniform(15, 30), 2)
            elif q == "humidity_pct":
                values[q] = round(rng.uniform(30, 70), 1)
            elif q == "battery_pct":
                values[q] = rng.randrange(50, 101)  # an int, as the decoders give it
            elif q == "voltage_v":
                values[q] = round(rng.uniform(2.6, 3.1), 3)
            else:
                values[q] = -rng.randrange(40, 95)
        work.append((rng.choice(macs), round(T0 + i * step + rng.random() * step, 3), values))
    return work


def load_module(path: str) -> ModuleType:
    """Another history.py (e.g. ``git show HEAD:src/mitherm/history.py``), imported as part of mitherm."""
    spec = importlib.util.spec_from_file_location("mitherm._history_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_add(mod: ModuleType, path: Path, work: Work, flush_every: int) -> tuple[float, float]:
    """Returns (CPU s, wall s) of the adds and flushes; opening and closing the database are not counted."""
    h = mod.History(path)
    try:
        add, flush = h.add, h.flush
        batches = [work[i : i + flush_every] for i in range(0, len(work), flush_every)]
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        for batch in batches:
            for mac, ts, values in batch:
                add(mac, ts, values)
            flush()
        return time.process_time() - c0, time.perf_counter() - w0
    finally:
        h.close()


def sink_inputs(work: Work) -> list[tuple[DeviceState, Reading]]:
    """The workload as the gateway hands it to the sink: one DeviceState per device (its last_seen set before
    each publish), a Reading whose values also hold the frame's packet_id or flags (as the decoders give them)."""
    states: dict[str, DeviceState] = {}
    out = []
    for i, (mac, ts, values) in enumerate(work):
        st = states.get(mac)
        if st is None:
            st = states[mac] = DeviceState(mac, model="LYWSD03MMC", format="pvvx", first_seen=ts)
        extra: dict[str, object] = {"packet_id": i % 256} if i % 2 else {"flags": 5} if i % 4 else {}
        out.append((st, Reading(mac, 0x181A, format="pvvx", values={**extra, **values})))
    return out


class _SchemaOneSink:
    """HistorySink as it was with schema 1 (no History.add_measurements): for a baseline module."""

    def __init__(self, history: Any) -> None:
        self.history = history
        self._known: set[str] = set()

    def publish(self, state: DeviceState, reading: Reading) -> None:
        if state.mac not in self._known:
            self._known.add(state.mac)
            self.history.upsert_device(
                state.mac, name=state.name, model=state.model, format=state.format, ts=state.last_seen
            )
        values = {
            k: v
            for k, v in reading.values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("packet_id", "flags")
        }
        if values:
            self.history.add(state.mac, state.last_seen, values)
            if self.history.pending > 20_000:
                self.history.flush()


def run_sink(mod: ModuleType, path: Path, work: Work, inputs: list[tuple[DeviceState, Reading]]) -> tuple[float, float]:
    h = mod.History(path)
    try:
        sink = HistorySink(h) if hasattr(h, "add_measurements") else _SchemaOneSink(h)
        publish = sink.publish
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        for (st, reading), (_, ts, _) in zip(inputs, work, strict=True):
            st.last_seen = ts
            publish(st, reading)
        h.flush()
        return time.process_time() - c0, time.perf_counter() - w0
    finally:
        h.close()


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def best_us(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``fn`` in µs."""
    best = float("inf")
    for _ in range(repeats):
        c0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - c0)
    return best * 1e6


def spread(xs: list[float]) -> str:
    return f"best {min(xs):6.2f}  median {statistics.median(xs):6.2f}  worst {max(xs):6.2f}"


def queries(mod: ModuleType, path: Path, work: Work) -> list[tuple[str, str]]:
    out = []
    with mod.History(path) as h:
        rng = random.Random(2)
        macs = sorted({m for m, _, _ in work})
        end = work[-1][1]
        since = end - 86400.0
        q_macs = rng.sample(macs, min(20, len(macs)))
        rows = [len(h.readings(m, since, end)) for m in q_macs]  # warms the cache
        qs = ("temperature_c", "humidity_pct", "battery_pct", "voltage_v")
        for label, fn in (
            (
                f"readings() 24 h of one device ({statistics.mean(rows):.0f} values)",
                lambda m: h.readings(m, since, end),
            ),
            ("readings() 24 h, 4 quantities", lambda m: h.readings(m, since, end, quantity=qs)),
            ("hourly() 7 days of one device", lambda m: h.hourly(m, end - 7 * 86400, end)),
            ("quantities() of one device", h.quantities),
        ):
            us = best_us(lambda fn=fn: [fn(m) for m in q_macs], 20) / len(q_macs)
            out.append((label, f"{us:8.0f} µs"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=152_000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--step", type=float, default=1.0, help="seconds between readings (default: 1, ~42 h)")
    ap.add_argument("--flush-every", type=int, default=20_000, help="adds between flushes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", metavar="HISTORY_PY", help="also run this history.py, alternating with ours")
    ap.add_argument("--no-sink", action="store_true", help="skip the HistorySink.publish workload")
    ap.add_argument("--profile", action="store_true", help="cProfile one run of the add workload")
    ap.add_argument("--dir", help="where the database files go (default: a temporary directory)")
    args = ap.parse_args()

    work = make_work(args.readings, args.devices, args.step)
    n_values = sum(len(v) for _, _, v in work)
    inputs = None if args.no_sink else sink_inputs(work)
    impls: dict[str, ModuleType] = {}
    if args.baseline:
        impls["baseline"] = load_module(args.baseline)
    impls["current"] = mitherm.history
    print(
        f"workload: {len(work):,} readings, {n_values:,} values ({n_values / len(work):.2f} per reading), "
        f"{args.devices} devices, {(work[-1][1] - work[0][1]) / 3600:.1f} h, flush every {args.flush_every:,} adds"
    )
    with tempfile.TemporaryDirectory(prefix="mitherm-bench-history-", dir=args.dir) as tmp:
        base = Path(tmp)
        if args.profile:
            pr = cProfile.Profile()
            pr.enable()
            run_add(mitherm.history, base / "profile.sqlite3", work, args.flush_every)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(20)
        cpu: dict[tuple[str, str], list[float]] = {}
        wall: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, mod in impls.items():
                for p in base.glob(f"{name}-*"):
                    p.unlink()
                c, w = run_add(mod, base / f"{name}-add.sqlite3", work, args.flush_every)
                cpu.setdefault((name, "add"), []).append(c)
                wall.setdefault(name, []).append(w)
                if inputs is not None:
                    c, _ = run_sink(mod, base / f"{name}-sink.sqlite3", work, inputs)
                    cpu.setdefault((name, "sink"), []).append(c)
        for unit, n in (("reading", len(work)), ("value", n_values)):
            print(f"CPU per {unit}, µs ({args.repeats} runs each, alternating):")
            for (name, kind), cs in cpu.items():
                print(f"  {name:8s} {kind:4s}  {spread([c / n * 1e6 for c in cs])}")
        for name in impls:
            path = base / f"{name}-add.sqlite3"
            size = file_size(path)
            print(f"{name}: wall per reading (add) best {min(wall[name]) / len(work) * 1e6:.2f} µs, file size "
                  f"{size / 2**20:.1f} MiB ({size / n_values:.1f} bytes per value)")  # fmt: skip
            for label, value in queries(impls[name], path, work):
                print(f"  {label:45s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

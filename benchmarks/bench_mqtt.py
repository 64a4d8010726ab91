"""MQTT publisher benchmark: ``MqttPublisher`` against a real Mosquitto, driven as a fast capture replay drives it.

    .venv/bin/python benchmarks/bench_mqtt.py                       # 500 devices, 150,000 publish_state calls
    .venv/bin/python benchmarks/bench_mqtt.py --impl /tmp/mqtt_orig.py   # another mqtt.py, for before/after
    .venv/bin/python benchmarks/bench_mqtt.py --repeats 1 --profile

Each device is one ``DeviceState`` mutated in place (as ``Gateway`` does) and handed to ``publish_state``
round-robin; the publisher runs on a capture-style clock that advances ``--step`` (20 ms) per call, with
``min_interval`` 30 s, and the loop yields to the event loop every ``--yield-every`` calls (the capture source
yields every 2,000 adverts, about 300 ``publish_state`` calls). After the last call the clock moves past every
held-back state and the benchmark waits until the publisher is idle. Two cases:

* ``connected``: the broker connection is up before the first call;
* ``outbox``: ``run()`` starts only after ``--connect-after`` calls (50,000), so the publisher queues (and
  persists) everything until then, as a replay that starts before the broker connection is up.

Reported per case (best of ``--repeats``): CPU µs per ``publish_state`` call (``time.process_time`` over the
calls and the drain, minus the loop's own cost measured without a publisher), of which in the drain, messages
published (and before the drain), outbox transactions and rows written / deleted, wall time. Every run checks
that the broker's retained state of each device equals the device's final state."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.util
import io
import json
import math
import pstats
import random
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # mqtt_broker helper

import aiomqtt  # noqa: E402

from mitherm.state import DeviceState, KeyStatus  # noqa: E402
from mqtt_broker import start_mosquitto, stop_mosquitto  # noqa: E402

T0 = 1_718_000_000.0


def load_impl(path: str | None) -> types.ModuleType:
    """``mitherm.mqtt``, or the mqtt.py at ``path`` loaded as a module of the ``mitherm`` package."""
    if path is None:
        import mitherm.mqtt

        return mitherm.mqtt
    spec = importlib.util.spec_from_file_location("mitherm._bench_mqtt_impl", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# -- synthetic devices -----------------------------------------------------------------------------------------


def make_states(n: int, seed: int) -> list[DeviceState]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        st = DeviceState(
            mac=":".join(f"{b:02X}" for b in (0xA4, 0xC1, 0x38, i >> 16 & 0xFF, i >> 8 & 0xFF, i & 0xFF)),
            name=f"dev-{i}",
            model=("LYWSD03MMC", "LYWSD03MMC", "SBTH-TH")[kind],
            product_id=0x055B if kind == 0 else None,
            format=("mibeacon-v5", "pvvx", "bthome-v2")[kind],
            rssi=-60,
            receiver="proxy0",
            first_seen=T0,
            key_status=KeyStatus.VERIFIED if kind != 1 else KeyStatus.NOT_NEEDED,
            known=True,
        )
        st.values["temperature_c"] = round(rng.uniform(15, 25), 1)
        st.values["humidity_pct"] = round(rng.uniform(30, 60), 1)
        st.values["battery_pct"] = rng.randrange(50, 100)
        if kind == 1:
            st.values["voltage_v"] = round(rng.uniform(2.7, 3.1), 3)
        out.append(st)
    return out


def make_steps(calls: int, seed: int = 1) -> list[tuple[str | None, float, int, str, float]]:
    """What each reading changes, drawn up front so that the timed loop is cheap: (value name or None, delta,
    rssi, receiver, gap seconds)."""
    rng = random.Random(seed)
    receivers = ("proxy0", "proxy1", "proxy2")
    out = []
    for _ in range(calls):
        r = rng.random()
        name = "temperature_c" if r < 0.4 else "humidity_pct" if r < 0.7 else "voltage_v" if r < 0.72 else None
        delta = -0.001 if name == "voltage_v" else rng.choice((-0.1, 0.1))
        out.append((name, delta, -50 - rng.randrange(40), receivers[rng.randrange(3)], 9.0 + rng.random() * 2.0))
    return out


def step_state(st: DeviceState, step: tuple[str | None, float, int, str, float], now: float) -> None:
    """One decoded reading: a value moves (or not), a new RSSI / receiver / last_seen, the interval estimate."""
    name, delta, rssi, receiver, gap = step
    v = st.values
    if name is not None and name in v:
        v[name] = round(v[name] + delta, 3)  # type: ignore[operator]
    st.rssi = rssi
    st.receiver = receiver
    st.data_interval = gap if st.data_interval is None else 0.8 * st.data_interval + 0.2 * gap
    st.updated["temperature_c"] = now
    st.last_seen = now


# -- one run ---------------------------------------------------------------------------------------------------


class _Null:
    """Stands in for the publisher to measure the benchmark loop's own cost."""

    def publish_state(self, state: DeviceState) -> None:
        pass


async def drive(pub, states, steps, clock, args, start_run=None) -> tuple[float, float, int]:
    """The replay loop; returns CPU seconds of the calls and of the drain, messages published during the calls."""
    n = len(states)
    step = args.step
    every = args.yield_every
    connect_after = args.connect_after if start_run is not None else -1
    c0 = time.process_time()
    for i in range(args.calls):
        now = clock[0] = clock[0] + step
        st = states[i % n]
        step_state(st, steps[i], now)
        pub.publish_state(st)
        if i + 1 == connect_after:
            start_run()
        if (i + 1) % every == 0:
            await asyncio.sleep(0)
    c1 = time.process_time()
    during = getattr(pub, "published", 0)
    if not isinstance(pub, _Null):
        clock[0] += 3 * args.min_interval + 3600  # every held-back state is due now
        await pub.wait_idle(300)
    return c1 - c0, time.process_time() - c1, during


async def retained_states(port: int, base: str, expect: int) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-check-{uuid.uuid4().hex[:6]}") as c:
        await c.subscribe(f"{base}/+/state", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                async for m in c.messages:
                    got[str(m.topic)] = bytes(m.payload)
                    if len(got) >= expect:
                        break
    return got


async def one_run(mod, port: int, work: Path, args, steps, outbox_case: bool, profiler=None) -> dict:
    tag = uuid.uuid4().hex[:8]
    settings = mod.MqttSettings(
        host="127.0.0.1",
        port=port,
        base_topic=f"bench{tag}",
        discovery_prefix=f"ha{tag}",
        gateway_id="bench",
        min_interval=args.min_interval,
        outbox_path=work / f"outbox-{tag}.sqlite3",
        reconnect_initial=0.05,
        reconnect_max=0.5,
    )
    clock = [T0]
    pub = mod.MqttPublisher(settings, clock=lambda: clock[0])
    # outbox transactions: writes (rows) and deletes of delivered rows (one per message before, batched now)
    counts = {"tx": 0, "rows": 0, "del_tx": 0, "del_rows": 0}
    names = ("put", "delete", "delete_topics")
    patched = {name: getattr(mod._Outbox, name) for name in names if hasattr(mod._Outbox, name)}

    def counting(name, fn):
        def wrapper(self, arg):
            n = len(arg) if isinstance(arg, list) else 1
            if n:
                counts["tx" if name == "put" else "del_tx"] += 1
                counts["rows" if name == "put" else "del_rows"] += n
            return fn(self, arg)

        return wrapper

    for name, fn in patched.items():
        setattr(mod._Outbox, name, counting(name, fn))
    tasks: list[asyncio.Task] = []

    def start_run() -> None:
        tasks.append(asyncio.create_task(pub.run()))

    states = make_states(args.devices, seed=7)
    try:
        if not outbox_case:
            start_run()
            await pub.wait_connected(10)
        w0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        cpu_calls, cpu_drain, during = await drive(pub, states, steps, clock, args, start_run if outbox_case else None)
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - w0
        published = pub.published
    finally:
        await pub.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name, fn in patched.items():
            setattr(mod._Outbox, name, fn)
    got = await retained_states(port, settings.base_topic, len(states))
    bad = [st.mac for st in states if got.get(settings.device_topic(st.mac, "state")) != mod.state_payload(st)]
    if bad:
        raise SystemExit(f"retained state differs from the final state for {len(bad)} device(s), e.g. {bad[0]}")
    return {
        "cpu_calls": cpu_calls,
        "cpu_drain": cpu_drain,
        "wall": wall,
        "published": published,
        "during": during,
        "outbox_tx": counts["tx"],
        "outbox_rows": counts["rows"],
        "outbox_del_tx": counts["del_tx"],
        "outbox_del_rows": counts["del_rows"],
    }


async def main_async(args) -> int:
    mod = load_impl(args.impl)
    with tempfile.TemporaryDirectory(prefix="mitherm-bench-mqtt-") as tmp:
        work = Path(tmp)
        proc, port = start_mosquitto(work / "broker")
        try:
            steps = make_steps(args.calls)
            base = math.inf
            for _ in range(args.repeats):
                states = make_states(args.devices, seed=7)
                c, _d, _p = await drive(_Null(), states, steps, [T0], args)
                base = min(base, c)
            per = 1e6 / args.calls
            print(f"implementation: {args.impl or mod.__file__}")
            print(
                f"{args.calls:,} publish_state calls, {args.devices} devices, clock +{args.step * 1000:.0f} ms/call, "
                f"min_interval {args.min_interval:g} s, yield every {args.yield_every} calls, best of {args.repeats}"
            )
            print(f"loop without a publisher: {base * per:.2f} µs per call (subtracted below)\n")
            results = {}
            for case in ("connected", "outbox"):
                runs = []
                for r in range(args.repeats):
                    prof = cProfile.Profile() if args.profile and r == 0 else None
                    runs.append(await one_run(mod, port, work, args, steps, case == "outbox", prof))
                    if prof is not None:
                        out = io.StringIO()
                        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
                        print(f"--- cProfile, {case} ---\n{out.getvalue()}")
                b = min(runs, key=lambda x: x["cpu_calls"] + x["cpu_drain"])
                res = {
                    "us_per_call": round((b["cpu_calls"] + b["cpu_drain"] - base) * per, 2),
                    "drain_us_per_call": round(b["cpu_drain"] * per, 2),
                    **{k: b[k] for k in ("published", "during")},
                    **{k: b[k] for k in b if k.startswith("outbox")},
                    "wall_s": round(b["wall"], 2),
                }
                results[case] = res
                label = "connected" if case == "connected" else f"outbox (connects after {args.connect_after:,} calls)"
                print(f"[{label}]")
                print(
                    f"  CPU per publish_state call  {res['us_per_call']:9.2f} µs (drain: {res['drain_us_per_call']} µs)"
                )
                print(f"  messages published          {b['published']:9,}    ({b['during']:,} before the drain)")
                print(f"  outbox writes: tx / rows    {b['outbox_tx']:9,} / {b['outbox_rows']:,}")
                print(f"  outbox deletes: tx / rows   {b['outbox_del_tx']:9,} / {b['outbox_del_rows']:,}")
                print(f"  wall time                   {b['wall']:9.2f} s")
            print(json.dumps(results))
        finally:
            stop_mosquitto(proc)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=150_000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--step", type=float, default=0.02, help="capture clock seconds per call")
    ap.add_argument("--min-interval", type=float, default=30.0)
    ap.add_argument("--yield-every", type=int, default=300)
    ap.add_argument("--connect-after", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impl", help="path of an mqtt.py to measure instead of mitherm.mqtt")
    ap.add_argument("--profile", action="store_true", help="cProfile the first run of each case")
    args = ap.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

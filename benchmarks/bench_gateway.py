"""Gateway benchmark (#5.7): a capture of many devices replayed as fast as possible through ``Service``:
capture parsing, decode, dedupe, device state, SQLite history and MQTT to a real Mosquitto.

    .venv/bin/python benchmarks/bench_gateway.py                      # 500 devices, 1,000,000 frames
    .venv/bin/python benchmarks/bench_gateway.py --frames 200000 --no-mqtt --profile

The capture (mitherm JSON Lines; stock encrypted MiBeacon with its idle frames, pvvx in all four
advertising formats, BTHome v1/v2 plain and encrypted; each advert heard by 1-3 receivers) is generated
once from the simulator's devices and cached under /tmp. Reports frames/s (wall and per CPU second of the
process), peak RSS, RSS after 20 % of the frames vs at the end, and the pure ``Gateway.handle`` rate
without I/O. ``--profile`` adds cProfile tables of both."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import heapq
import importlib
import io
import json
import os
import pstats
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # mqtt_broker helper

from mitherm.captures import parse_ad_structures, read_capture, write_jsonl_line  # noqa: E402
from mitherm.gateway import Gateway  # noqa: E402
from mitherm.keystore import Keystore  # noqa: E402
from mitherm.model import Advertisement  # noqa: E402
from mitherm.service import RunConfig, Service  # noqa: E402
from mitherm.sim.devices import BTHomeDevice, Device, PvvxDevice, StockDevice  # noqa: E402

TARGET = 50_000
T0 = 1_718_000_000.0  # fixed: the cached capture does not depend on when it was made
GEN_VERSION = 1


# --- the capture --------------------------------------------------------------------------------------------


def make_devices(n: int, seed: int = 7) -> list[Device]:
    """40 % stock (encrypted MiBeacon, idle frames), 30 % pvvx (all formats), 30 % BTHome devices."""
    rng = random.Random(seed)
    out: list[Device] = []
    for i in range(n):
        s = f"bench:{seed}:{i}"
        r = rng.random()
        if r < 0.4:
            out.append(StockDevice("LYWSD03MMC", seed=s))
        elif r < 0.7:
            adv_type = ("atc1441", "pvvx", "mi", "bthome")[i % 4]
            out.append(PvvxDevice(adv_type, encrypted=rng.random() < 0.5, seed=s))
        else:
            out.append(BTHomeDevice(1 + (i % 2), encrypted=rng.random() < 0.5, seed=s))
    return out


def capture_path(frames: int, devices: int) -> Path:
    return Path(tempfile.gettempdir()) / f"mitherm-bench-v{GEN_VERSION}-{devices}dev-{frames}fr.jsonl"


def generate(path: Path, frames: int, devs: list[Device]) -> None:
    """``frames`` adverts in time order; each transmission heard by 1-3 receivers (different RSSI, a few ms
    apart), as several receivers would report it."""
    rng = random.Random(1)
    tmp = path.with_suffix(".part")
    queue = [(d.peek(), i) for i, d in enumerate(devs)]
    heapq.heapify(queue)
    written = 0
    start = time.monotonic()
    with tmp.open("w", encoding="utf-8") as out:
        while written < frames:
            _, i = queue[0]
            d = devs[i]
            f = d.next_frame()
            heapq.heapreplace(queue, (d.peek(), i))
            if f is None:
                continue
            name = parse_ad_structures(f.ad)[2]
            heard = rng.choice((1, 2, 2, 3))
            for r in range(min(heard, frames - written)):
                adv = Advertisement(
                    d.address,
                    round(T0 + f.t + 0.004 * r, 6),
                    {f.service_uuid: f.payload},
                    rssi=-55 - rng.randrange(40),
                    name=name,
                    address_type=d.address_type,
                    source=f"proxy{r}",
                )
                out.write(write_jsonl_line(adv) + "\n")
                written += 1
            if written % 100_000 < heard:
                print(f"  generated {written:,} frames ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    tmp.replace(path)


def setup_files(work: Path, devs: list[Device]) -> tuple[Path, dict[str, str]]:
    keys = Keystore(work / "keys.json")
    for d in devs:
        if d.bindkey:
            keys.add(d.address, d.bindkey, name=d.label)
    keys.save()
    names = {d.address: f"{d.kind}-{i}" for i, d in enumerate(devs)}  # every device "known": published to MQTT
    return work / "keys.json", names


# --- measuring ----------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


async def run_service(cfg: RunConfig, frames: int, rss_at: int) -> dict:
    svc = Service(cfg, out=io.StringIO())
    marks: dict[str, float] = {}

    series: list[tuple[int, float]] = []  # (adverts so far, RSS MiB) at every tenth of the capture

    async def sampler() -> None:
        step = max(1, frames // 10)
        while True:
            gw = svc.gateway
            if gw is not None:
                n = gw.stats.adverts
                if "rss_early" not in marks and n >= rss_at:
                    marks["rss_early"] = rss_mb()
                    marks["devices_early"] = len(gw.devices)
                if n >= (len(series) + 1) * step:
                    series.append((n, rss_mb()))
            await asyncio.sleep(0.01)

    s = asyncio.create_task(sampler())
    gc.collect()
    w0, c0 = time.perf_counter(), cpu_s()
    gw = await svc.run()
    wall, cpu = time.perf_counter() - w0, cpu_s() - c0
    s.cancel()
    marks["rss_end"] = rss_mb()
    marks["peak"] = peak_rss_mb()
    published = getattr(svc.publisher, "stats", None)
    return {"gw": gw, "wall": wall, "cpu": cpu, "marks": marks, "published": published, "series": series}


def load_adverts(path: Path, n: int) -> tuple[list[Advertisement], float]:
    t = time.perf_counter()
    out = []
    for adv in read_capture(str(path)):
        out.append(adv)
        if len(out) >= n:
            break
    return out, time.perf_counter() - t


def pure_handle(advs: list[Advertisement], keys: dict[str, str], names: dict[str, str]) -> tuple[float, Gateway]:
    gw = Gateway(keys, names=names)
    gc.collect()
    t = time.perf_counter()
    for a in advs:
        gw.handle(a)
    return time.perf_counter() - t, gw


def profile(fn, title: str, top: int = 22) -> None:
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    print(f"\n--- cProfile: {title} (top {top} by own time) ---")
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(top)


# --- main -----------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--no-mqtt", action="store_true", help="without the MQTT sink and broker")
    ap.add_argument("--profile", action="store_true", help="cProfile Gateway.handle and the service run")
    ap.add_argument("--pure", type=int, default=200_000, help="adverts for the pure Gateway.handle rate")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--no-profile-below", action="store_true", help="no cProfile tables when below the target")
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole measurement in N fresh processes; print each and a summary",
    )
    args = ap.parse_args()
    if args.runs > 1:
        return repeat(args.runs)

    for module in ("mitherm.history", "mitherm.mqtt", "aiomqtt"):
        importlib.import_module(module)  # the service imports these lazily: start-up, not frame work; not timed
    devs = make_devices(args.devices)
    cap = capture_path(args.frames, args.devices)
    if args.regenerate or not cap.exists():
        print(f"generating {cap} ({args.frames:,} frames, {args.devices} devices) ...", file=sys.stderr)
        t = time.perf_counter()
        generate(cap, args.frames, devs)
        print(f"  done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size_mb = cap.stat().st_size / 2**20

    with tempfile.TemporaryDirectory(prefix="mitherm-bench-") as tmp:
        work = Path(tmp)
        os.environ["MITHERM_DATA_DIR"] = str(work / "data")  # the recent-frame snapshot, default paths
        os.environ["MITHERM_CONFIG_DIR"] = str(work / "config")
        keys_path, names = setup_files(work, devs)
        keys = {d.address: d.bindkey for d in devs if d.bindkey}
        broker = None
        mqtt_url = None
        if not args.no_mqtt:
            from mqtt_broker import start_mosquitto

            broker, port = start_mosquitto(work / "broker")
            mqtt_url = f"mqtt://127.0.0.1:{port}"
        try:
            cfg = RunConfig(
                sources=[f"capture:{cap}"],
                db=str(work / "history.sqlite3"),
                keys=str(keys_path),
                mqtt=mqtt_url,
                web=False,
                names=names,
            )
            res = asyncio.run(run_service(cfg, args.frames, rss_at=args.frames // 5))
            gw = res["gw"]
            from mitherm.history import History

            with History(work / "history.sqlite3") as h:
                tables = {r[0] for r in h._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                sql = (  # schema 2 packs raw values into chunks; schema 1 had one row per value
                    "SELECT coalesce(sum(nv), 0) FROM raw_chunks" if "raw_chunks" in tables
                    else "SELECT count(*) FROM readings"
                )  # fmt: skip
                rows = h._db.execute(sql).fetchone()[0]
        finally:
            if broker is not None:
                from mqtt_broker import stop_mosquitto

                stop_mosquitto(broker)

        advs, parse_s = load_adverts(cap, args.pure)
        handle_s, _pgw = pure_handle(advs, keys, names)

        s = gw.stats
        m = res["marks"]
        n = s.adverts
        rows_out = [
            ("capture", f"{cap.name} ({size_mb:.0f} MiB, {args.devices} devices)"),
            ("adverts / frames", f"{s.adverts:,} / {s.frames:,}"),
            (
                "duplicates / decoded / replayed / failed",
                f"{s.duplicates:,} / {s.decoded:,} / {s.replayed:,} / {s.failed:,}",
            ),
            ("devices in state", f"{len(gw.devices)}"),
            ("history values stored", f"{rows:,}"),
            ("MQTT", mqtt_url or "off"),
            ("service wall time", f"{res['wall']:.1f} s"),
            ("service CPU time (process)", f"{res['cpu']:.1f} s"),
            ("service frames/s (wall)", f"{n / res['wall']:,.0f}"),
            ("service frames/s per CPU second", f"{n / res['cpu']:,.0f}"),
            (
                f"RSS after {args.frames // 5:,} frames",
                f"{m.get('rss_early', float('nan')):.1f} MiB ({m.get('devices_early', 0)} devices)",
            ),
            (f"RSS after {n:,} frames", f"{m['rss_end']:.1f} MiB ({len(gw.devices)} devices)"),
            ("peak RSS of the service run (ru_maxrss)", f"{m['peak']:.1f} MiB"),
            ("RSS every tenth of the run (MiB)", " ".join(f"{r:.0f}" for _, r in res["series"])),
            (f"capture parsing only ({len(advs):,} adverts)", f"{len(advs) / parse_s:,.0f} adverts/s"),
            ("pure Gateway.handle (no I/O, no sinks)", f"{len(advs) / handle_s:,.0f} adverts/s"),
            ("target", f"{TARGET:,} frames/s on one core"),
        ]
        width = max(len(k) for k, _ in rows_out)
        print()
        for k, v in rows_out:
            print(f"{k:<{width}}  {v}")
        rate = n / res["cpu"]
        print(f"\n{'MEETS' if rate >= TARGET else 'BELOW'} the target: {rate:,.0f} frames per CPU second")
        print(json.dumps({
            "frames": n, "wall_s": round(res["wall"], 2), "cpu_s": round(res["cpu"], 2),
            "fps_wall": round(n / res["wall"]), "fps_cpu": round(rate),
            "pure_handle_fps": round(len(advs) / handle_s), "parse_fps": round(len(advs) / parse_s),
            "rss_early_mb": round(m.get("rss_early", 0), 1), "rss_end_mb": round(m["rss_end"], 1),
            "peak_rss_mb": round(m["peak"], 1), "rss_series_mb": [round(r, 1) for _, r in res["series"]],
        }))  # fmt: skip

        if args.profile or (rate < TARGET and not args.no_profile_below):
            profile(lambda: pure_handle(advs, keys, names), f"Gateway.handle over {len(advs):,} adverts")
            small = min(args.frames, 200_000)

            def service_run() -> None:
                cfg2 = RunConfig(
                    sources=[f"capture:{cap}"],
                    db=str(work / "p.sqlite3"),
                    keys=str(keys_path),
                    web=False,
                    names=names,
                )
                asyncio.run(_limited(cfg2, small))

            profile(service_run, f"Service over the first {small:,} adverts (no MQTT)")
    return 0


def repeat(runs: int) -> int:
    """This benchmark in ``runs`` fresh processes (RSS per run stays meaningful); the machine's speed varies
    between runs, so print every run and the spread."""
    import subprocess

    argv = [a for a in sys.argv[1:] if not a.startswith("--runs")]
    if "--runs" in sys.argv[1:]:
        i = sys.argv[1:].index("--runs")
        del argv[i : i + 1]  # its value (the option itself is already gone)
    results = []
    for i in range(runs):
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--runs", "1", "--no-profile-below"], capture_output=True, text=True
        )
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout + proc.stderr)
            return proc.returncode or 1
        r = json.loads(line)
        results.append(r)
        print(f"run {i + 1}: {line}")
    fps = sorted(r["fps_cpu"] for r in results)
    each = ", ".join(f"{r['fps_cpu']:,}" for r in results)
    rss = ", ".join(f"{r['peak_rss_mb']:.0f} MiB" for r in results)
    print(
        f"\nframes per CPU second over {runs} runs: {each}"
        f"  (worst {fps[0]:,}, median {fps[len(fps) // 2]:,}, best {fps[-1]:,}; target {TARGET:,})"
    )
    print(f"peak RSS per run: {rss}")
    return 0


async def _limited(cfg: RunConfig, n: int) -> None:
    svc = Service(cfg, out=io.StringIO())
    task = asyncio.create_task(svc.run())
    while not task.done():
        await asyncio.sleep(0.01)
        if svc.gateway is not None and svc.gateway.stats.adverts >= n:
            task.cancel()
            break
    await asyncio.gather(task, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main())

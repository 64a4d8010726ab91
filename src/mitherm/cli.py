"""The ``mitherm`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, TextIO

import click

from . import __version__


class LazyGroup(click.Group):
    """Subcommands that live in their own modules are imported only when used (fast start-up)."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "keys": ("mitherm.commands.keys", "keys"),
        "history": ("mitherm.commands.history", "history"),
        "cloud": ("mitherm.commands.cloud", "cloud"),
        "info": ("mitherm.commands.device", "info"),
        "activate": ("mitherm.commands.device", "activate"),
        "login": ("mitherm.commands.device", "login"),
        "set": ("mitherm.commands.settings", "set_"),
        "read": ("mitherm.commands.settings", "read"),
        "pvvx": ("mitherm.commands.settings", "pvvx"),
        "flash": ("mitherm.commands.flash", "flash"),
        "firmware": ("mitherm.commands.flash", "firmware"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        import importlib.util

        present = [n for n, (m, _) in self.lazy.items() if importlib.util.find_spec(m) is not None]
        return sorted([*super().list_commands(ctx), *present])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as e:  # pragma: no cover - a broken install
                raise click.ClickException(f"the {name!r} command is unavailable: {e}") from e
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="mitherm")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Decode, verify keys for, and collect readings from Xiaomi-family BLE thermometers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- decode -----------------------------------------------------------------------------------------


def _load_keys_file(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    from .keystore import Keystore, KeystoreError

    p = Path(path)
    if not p.exists():
        raise click.ClickException(f"keys file {path} does not exist")
    try:
        if p.suffix == ".json":
            ks = Keystore(p)
            ks.load()
            return ks.keys()
    except (KeystoreError, ValueError, OSError) as e:
        raise click.ClickException(f"cannot read keys file {path}: {e}") from e
    # "MAC KEY" per line
    keys: dict[str, str] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").replace("=", " ").split()
        if len(parts) != 2:
            raise click.ClickException(f"{path} line {n}: expected 'MAC KEY'")
        keys[parts[0]] = parts[1]
    return keys


def _decode_line(decoder: Any, line: str, n: int) -> dict[str, Any]:
    from .model import DecodeError, ErrorCode, Reading

    def fail(mac: Any, message: str) -> dict[str, Any]:
        r = Reading(
            mac=str(mac) if mac is not None else None,
            service_uuid=-1,  # type: ignore[arg-type]
            error=DecodeError(ErrorCode.MALFORMED, f"line {n}: {message}"),
        )
        return r.to_json()

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return fail(None, f"not JSON ({e.msg})")
    if not isinstance(obj, dict):
        return fail(None, "expected a JSON object with mac, service_uuid and data_hex")
    mac, uuid, data_hex = obj.get("mac"), obj.get("service_uuid"), obj.get("data_hex")
    if not isinstance(mac, str) or uuid is None or not isinstance(data_hex, str):
        return fail(mac, "mac, service_uuid and data_hex are required")
    try:
        payload = bytes.fromhex(data_hex)
    except ValueError:
        return fail(mac, "data_hex is not hexadecimal")
    key = obj.get("bindkey")
    return decoder.decode(mac, uuid, payload, key=key if isinstance(key, str) else None).to_json()


@main.command()
@click.argument("file", type=click.File("r"), default="-")
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False), help="Keys: a keystore JSON or 'MAC KEY' lines.")
def decode(file: TextIO, keys_file: str | None) -> None:
    """Decode JSON lines {"mac", "service_uuid", "data_hex", "bindkey"?} from FILE (or stdin).

    Prints one JSON object per input line, in order. Blank lines are skipped."""
    from .decoder import Decoder

    decoder = Decoder(_load_keys_file(keys_file))
    out = sys.stdout
    for n, line in enumerate(file, 1):
        if not line.strip():
            continue
        out.write(json.dumps(_decode_line(decoder, line, n), ensure_ascii=False) + "\n")
    out.flush()


# --- doctor ------------------------------------------------------------------------------------------


def _stored_key(mac: str) -> str | None:
    from .keystore import Keystore

    try:
        ks = Keystore()
        ks.load()
        entry = ks.get(mac)
    except Exception:
        return None
    return entry.bindkey if entry else None


def _print_diagnosis(dx: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(dx.to_json(), ensure_ascii=False))
        return
    from rich.console import Console
    from rich.panel import Panel

    colour = "green" if dx.ok else "yellow" if dx.verdict.value in ("no_encrypted_frames",) else "red"
    f = dx.frames
    body = (
        f"[bold]{dx.verdict.value}[/bold]  {dx.mac}  {dx.model or ''} {('(' + dx.format + ')') if dx.format else ''}\n"
        f"frames: {f.total} seen, {f.with_data} with data, {f.decrypted} decrypted, {f.failed} failed\n\n"
        f"{dx.advice}"
    )
    Console().print(Panel(body, title="mitherm doctor", border_style=colour))


@main.command()
@click.option("--mac", required=True, help="The sensor's address (any spelling: A4:C1:38:…, a4c138…, A4-C1-…).")
@click.option("--key", help="The bindkey to check (default: the keystore's key for this MAC).")
@click.option(
    "--capture",
    "capture_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A btsnoop (Android HCI snoop log, btmon -w) or mitherm JSON Lines capture.",
)
@click.option("--live", is_flag=True, help="Listen until a verdict is possible.")
@click.option("--source", "sources", multiple=True, help="Live source(s) (default bleak:).")
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Live: give up after N seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(
    mac: str,
    key: str | None,
    capture_file: str | None,
    live: bool,
    sources: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:
    """Say whether KEY decrypts the sensor's frames and, if not, exactly why.

    Without --capture or --live it checks the recent frames of a running `mitherm run` (written to the user
    data dir every 10 seconds)."""
    from .doctor import diagnose
    from .framecache import FrameCache
    from .mac import InvalidMac, normalize_mac

    try:
        mac = normalize_mac(mac)
    except InvalidMac as e:
        raise click.ClickException(str(e)) from e
    if key is None:
        key = _stored_key(mac)
        if key is None:
            raise click.ClickException(
                f"no --key given and the keystore has no key for {mac}; "
                f"pass --key or add one with `mitherm keys add {mac} KEY`"
            )
    if not capture_file and not live:
        from .paths import default_frames_snapshot

        snapshot = default_frames_snapshot()
        if not snapshot.exists():
            raise click.ClickException(
                "give --capture FILE or --live (no running gateway has left recent frames in "
                f"{snapshot} to check the key against)"
            )
        capture_file = str(snapshot)
    cache = FrameCache()
    if capture_file:
        from .captures import CaptureError, read_capture

        try:
            cache.extend(read_capture(capture_file))
        except (CaptureError, OSError) as e:
            raise click.ClickException(str(e)) from e
        dx = diagnose(cache, mac, key, now=time.time() if live else None)
    if live:
        dx = asyncio.run(_doctor_live(cache, mac, key, list(sources) or ["bleak:"], timeout, as_json))
    _print_diagnosis(dx, as_json)
    sys.exit(0 if dx.ok else 1)


async def _doctor_live(cache: Any, mac: str, key: str, sources: list[str], timeout: float, quiet: bool) -> Any:
    from rich.console import Console
    from rich.live import Live

    from .doctor import UNDECIDED, diagnose
    from .sources import SourceError, open_source

    changed = asyncio.Event()

    def emit(adv: Any) -> None:
        cache.add_advertisement(adv)
        if adv.mac == mac:
            changed.set()

    try:
        srcs = [open_source(s) for s in sources]
    except SourceError as e:
        raise click.ClickException(str(e)) from e
    tasks = [asyncio.create_task(s.run(emit)) for s in srcs]
    start = time.monotonic()
    dx = diagnose(cache, mac, key, now=time.time())
    console = Console(stderr=True)
    try:
        with Live(console=console, transient=True, refresh_per_second=4, auto_refresh=not quiet) as live:
            while True:
                failed = [t for t in tasks if t.done() and t.exception()]
                if failed:
                    exc = failed[0].exception()
                    raise click.ClickException(str(exc))
                dx = diagnose(cache, mac, key, now=time.time())
                waited = time.monotonic() - start
                if dx.verdict not in UNDECIDED and (
                    dx.ok
                    or dx.frames.failed >= 2
                    or dx.verdict.value in ("invalid_key", "placeholder_key", "not_encrypted", "looks_like_token")
                ):
                    break
                if waited > timeout:
                    break
                live.update(
                    f"listening for {mac}: {dx.frames.total} frames, {dx.frames.with_data} with data, "
                    f"waited {waited:.0f} s of {timeout:.0f} s — {dx.verdict.value}"
                )
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), timeout=1.0)
                except TimeoutError:
                    pass
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return dx


# --- capture -------------------------------------------------------------------------------------------


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, writable=True), default="-")
@click.option("--source", "sources", multiple=True, help="Source(s) (default bleak:).")
@click.option("--seconds", type=float, help="Stop after N seconds (default: until Ctrl-C).")
@click.option("--all", "all_devices", is_flag=True, help="Keep every advert, not just thermometer formats.")
def capture(output: str, sources: tuple[str, ...], seconds: float | None, all_devices: bool) -> None:
    """Write adverts as mitherm JSON Lines (for `mitherm doctor --capture` and replays)."""
    from .captures import write_jsonl_line
    from .decoder import SUPPORTED_UUIDS
    from .sources import SourceError, open_source

    out: TextIO = sys.stdout if output == "-" else open(output, "a", encoding="utf-8")  # noqa: SIM115
    count = 0

    def emit(adv: Any) -> None:
        nonlocal count
        if not all_devices and not (adv.service_data.keys() & SUPPORTED_UUIDS):
            return
        out.write(write_jsonl_line(adv) + "\n")
        out.flush()
        count += 1

    async def go() -> None:
        try:
            srcs = [open_source(s) for s in (sources or ("bleak:",))]
        except SourceError as e:
            raise click.ClickException(str(e)) from e
        tasks = [asyncio.create_task(s.run(emit)) for s in srcs]
        try:
            done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception():
                    raise click.ClickException(str(t.exception()))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    finally:
        if out is not sys.stdout:
            out.close()
    click.echo(f"captured {count} advert(s)", err=True)


# --- run ---------------------------------------------------------------------------------------------


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with the options below.")
@click.option(
    "--source",
    "sources",
    multiple=True,
    help="bleak: | bleak:hci1 | bumble:usb:0 | capture:PATH | sim:demo | sim:HOUSE.toml (repeatable).",
)
@click.option("--mqtt", help="mqtt://[USER:PASS@]HOST:PORT or mqtts://… (Home Assistant discovery included).")
@click.option("--db", help="SQLite history file (default: the user data dir).")
@click.option("--keys", "keys_path", help="Keystore file (default: the user config dir).")
@click.option("--no-web", is_flag=True, help="Do not serve the dashboard.")
@click.option("--web-bind", help="Dashboard address (default 127.0.0.1:8086; elsewhere a password is required).")
@click.option("--print", "print_", is_flag=True, help="One JSON line per device update on stdout.")
@click.option("--replay-speed", default=None, help="Captures: 'max' (default) or a factor (1 = recorded pace).")
@click.option("--follow", is_flag=True, help="Keep running after a capture ends.")
@click.option("--passive", is_flag=True, help="Passive scanning (BlueZ >= 5.56 with --experimental).")
@click.option("--publish-unknown", is_flag=True, help="Publish devices that are not in the keystore too.")
@click.option("--min-interval", type=float, default=None, help="MQTT: at most one state per device every N s.")
def run(
    config_file: str | None,
    sources: tuple[str, ...],
    mqtt: str | None,
    db: str | None,
    keys_path: str | None,
    no_web: bool,
    web_bind: str | None,
    print_: bool,
    replay_speed: str | None,
    follow: bool,
    passive: bool,
    publish_unknown: bool,
    min_interval: float | None,
) -> None:
    """Run the gateway: receive adverts, decode them with your keys, keep history, publish to MQTT."""
    from .service import ConfigError, RunConfig, Service

    try:
        cfg = RunConfig.from_toml(config_file) if config_file else RunConfig()
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    if sources:
        cfg.sources = list(sources)
    for attr, value in (
        ("mqtt", mqtt),
        ("db", db),
        ("keys", keys_path),
        ("replay_speed", replay_speed),
        ("min_interval", min_interval),
        ("web_bind", web_bind),
    ):
        if value is not None:
            setattr(cfg, attr, value)
    cfg.web = cfg.web and not no_web
    cfg.print = cfg.print or print_
    cfg.follow = cfg.follow or follow
    cfg.passive = cfg.passive or passive
    cfg.publish_unknown = cfg.publish_unknown or publish_unknown
    service = Service(cfg)
    try:
        gw = asyncio.run(service.run())
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:
        return
    s = gw.stats
    click.echo(
        f"{s.adverts} adverts, {s.frames} frames, {s.decoded} decoded, {s.duplicates} duplicates, "
        f"{s.replayed} replays rejected, {len(gw.devices)} devices",
        err=True,
    )


# --- scan --------------------------------------------------------------------------------------------


def _scan_rows(gw: Any) -> list[dict[str, Any]]:
    rows = []
    for st in sorted(gw.devices.values(), key=lambda s: (s.rssi is None, -(s.rssi or 0))):
        d = st.to_json()
        d["encrypted"] = bool(st.format and st.format.endswith("_enc"))
        rows.append(d)
    return rows


_UNITS = (
    ("temperature_c", "{:.1f}°C"),
    ("humidity_pct", "{:.0f}%"),
    ("battery_pct", "🔋{}%"),
    ("voltage_v", "{:.2f}V"),
)


def _short_values(values: dict[str, Any]) -> str:
    parts = [fmt.format(values[k]) for k, fmt in _UNITS if isinstance(values.get(k), (int, float))]
    return " ".join(parts)


def _scan_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="nearby Xiaomi-family and BTHome devices", expand=False)
    t.add_column("address", no_wrap=True)
    for col in ("name", "model", "format", "key", "rssi", "receiver"):
        t.add_column(col, overflow="fold")
    t.add_column("values", no_wrap=True)
    status_style = {"verified": "green", "not_needed": "green", "key_failed": "red", "missing": "yellow"}
    for r in rows:
        key = r["key_status"] if r["key_status"] != "key_failed" else f"{r['key_verdict']}"
        t.add_row(
            r["mac"],
            r["name"] or "",
            r["model"] or "",
            r["format"] or "",
            f"[{status_style.get(r['key_status'], 'white')}]{key}[/]",
            str(r["rssi"] or ""),
            r["receiver"] or "",
            _short_values(r["values"]),
        )
    return t


@main.command()
@click.option("--source", "sources", multiple=True, help="Source(s) (default bleak:).")
@click.option("--seconds", type=float, default=30.0, show_default=True, help="How long to listen.")
@click.option("--keys", "keys_path", help="Keystore file (default: the user config dir).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list at the end instead of a live table.")
def scan(sources: tuple[str, ...], seconds: float, keys_path: str | None, as_json: bool) -> None:
    """List nearby thermometers: model, format, encryption, key status, RSSI and last values."""
    from rich.console import Console
    from rich.live import Live

    from .gateway import Gateway
    from .keystore import Keystore
    from .paths import default_keystore
    from .sources import SourceError, open_source

    ks = Keystore(keys_path or default_keystore())
    keys = {e.mac: e.bindkey for e in ks.entries() if e.bindkey}
    names = {e.mac: e.name for e in ks.entries() if e.name}
    gw = Gateway(keys, names=names)

    async def go() -> None:
        try:
            srcs = [open_source(s) for s in (sources or ("bleak:",))]
        except SourceError as e:
            raise click.ClickException(str(e)) from e
        tasks = [asyncio.create_task(s.run(gw.handle)) for s in srcs]
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        try:
            with (
                Live(_scan_table([]), console=Console(), refresh_per_second=2, transient=False)
                if not as_json
                else contextlib.nullcontext() as live
            ):
                while loop.time() < end:
                    if all(t.done() for t in tasks):
                        break
                    for t in tasks:
                        if t.done() and t.exception():
                            raise click.ClickException(str(t.exception()))
                    if live is not None:
                        live.update(_scan_table(_scan_rows(gw)))
                    await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
                if live is not None:
                    live.update(_scan_table(_scan_rows(gw)))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    if as_json:
        click.echo(json.dumps(_scan_rows(gw), ensure_ascii=False))


# --- sim and demo ------------------------------------------------------------------------------------


def _house_table(house: Any, keys: dict[str, str], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in ("address", "name", "kind", "model", "format", "bindkey"):
        t.add_column(col)
    for d in house.devices:
        key = keys.get(d.address) or ""
        if getattr(d, "demo_wrong_key", False):
            key = f"[red]{key}[/] (deliberately wrong: ask the doctor)"
        t.add_row(d.address, d.label or "", d.kind, d.model, d.format, key)
    return t


@main.command()
@click.option(
    "--house",
    "house_spec",
    default="demo",
    show_default=True,
    help="A house TOML file, or 'demo' / 'minimal' for a built-in one.",
)
@click.option("--time-factor", type=float, help="Simulated seconds per real second (default: the house's).")
@click.option("--tcp", "tcp_port", type=int, help="Also serve the virtual radio as a Bumble HCI TCP server on PORT.")
@click.option("--seconds", type=float, help="Stop after N seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the devices and their keys as JSON, then run.")
@click.option(
    "--gatt/--no-gatt",
    default=True,
    show_default=True,
    help="Serve each device's GATT services (Mi auth, settings, pvvx commands, OTA) for connections.",
)
def sim(
    house_spec: str, time_factor: float | None, tcp_port: int | None, seconds: float | None, as_json: bool, gatt: bool
) -> None:
    """Run virtual devices on a virtual radio (for other tools to scan, e.g. over --tcp)."""
    from rich.console import Console

    from .sources import SourceError
    from .sources.sim_source import SimSource

    try:
        src = SimSource(house_spec, time_factor=time_factor, gatt=gatt)
    except SourceError as e:
        raise click.ClickException(str(e)) from e
    house = src.house
    if as_json:
        click.echo(json.dumps([{**d.spec(), "address": d.address, "bindkey": d.bindkey} for d in house.devices]))
    else:
        Console().print(_house_table(house, house.keys(), f"virtual house ({len(house.devices)} devices)"))

    async def go() -> None:
        from .radio.virtual import VirtualRadio

        async with VirtualRadio() as radio:
            src.radio = radio
            if tcp_port is not None:
                port = await radio.serve_tcp("127.0.0.1", tcp_port)
                click.echo(
                    f"virtual radio on tcp-server 127.0.0.1:{port}: scan it with "
                    f"`mitherm scan --source bumble:tcp-client:127.0.0.1:{port}`",
                    err=True,
                )
            task = asyncio.create_task(src._advertise(radio))
            try:
                await asyncio.wait_for(task, timeout=seconds) if seconds else await task
            except TimeoutError:
                pass

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())


@main.command()
@click.option("--seconds", type=float, help="Stop after N seconds (default: until Ctrl-C).")
@click.option("--dir", "demo_dir", type=click.Path(file_okay=False), help="Where the demo keeps its files.")
@click.option("--mqtt", help="Also publish to this MQTT broker (mqtt://HOST:PORT).")
@click.option("--print", "print_", is_flag=True, help="JSON lines instead of the live table.")
def demo(seconds: float | None, demo_dir: str | None, mqtt: str | None, print_: bool) -> None:
    """See mitherm work with no hardware: a virtual house, the gateway, history and the doctor."""
    from rich.console import Console
    from rich.live import Live

    from .keystore import Keystore
    from .paths import data_dir
    from .service import RunConfig, Service
    from .sources.sim_source import SimSource

    base = Path(demo_dir) if demo_dir else data_dir() / "demo"
    base.mkdir(parents=True, exist_ok=True)
    src = SimSource("demo")
    house = src.house
    keys = house.demo_keys()
    ks = Keystore(base / "keys.json")
    for d in house.devices:
        if ks.get(d.address):
            ks.remove(d.address)
        if d.address in keys:
            ks.add(d.address, keys[d.address], name=d.label, source="manual")
    ks.save()
    console = Console(stderr=print_)
    console.print(_house_table(house, keys, "mitherm demo: a virtual house on a virtual Bluetooth radio"))
    wrong = next((d for d in house.devices if getattr(d, "demo_wrong_key", False)), None)
    capture = base / "capture.jsonl"
    if capture.exists():
        capture.unlink()
    console.print(f"keystore: {base / 'keys.json'}   history: {base / 'history.sqlite3'}   capture: {capture}")
    if wrong is not None:
        console.print(
            f"[yellow]{wrong.label} ({wrong.address}) is given a wrong key on purpose.[/] Watch its key status, "
            f"then ask the doctor:\n  mitherm doctor --capture {capture} --mac {wrong.address} "
            f"--key {keys[wrong.address]}"
        )
    cfg = RunConfig(
        sources=["sim:demo"],
        db=str(base / "history.sqlite3"),
        keys=str(base / "keys.json"),
        mqtt=mqtt,
        print=print_,
        web=True,
        publish_unknown=True,
        min_interval=5.0,
    )
    service = Service(cfg, sim_source=src, capture_path=str(capture))
    service.web_any_port = True

    async def go() -> None:
        task = asyncio.create_task(service.run())
        try:
            if print_:
                await asyncio.wait_for(task, timeout=seconds) if seconds else await task
                return
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds if seconds else None
            for _ in range(100):
                if service.web_url or task.done():
                    break
                await asyncio.sleep(0.05)
            if service.web_url:
                console.print(f"[bold]dashboard:[/] {service.web_url}")
            with Live(_scan_table([]), console=console, refresh_per_second=2) as live:
                while not task.done() and (end is None or loop.time() < end):
                    await asyncio.sleep(0.5)
                    if service.gateway is not None:
                        live.update(_scan_table(_scan_rows(service.gateway)))
            if task.done():
                task.result()
        except TimeoutError:
            pass
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())

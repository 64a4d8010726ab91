"""``mitherm info``, ``mitherm activate``, ``mitherm login``: one thermometer over GATT.

* ``info MAC``: which firmware it runs (stock / pvvx / atc1441), its version strings and what to do next;
* ``activate MAC``: Mi activation (keys.md §1.4): mitherm becomes the device's owner; the new token,
  bindkey and DID go to the keystore, then the key is checked on the device's next encrypted advert;
* ``login MAC``: proves the stored (or given) token (keys.md §1.6).

The work is done by ``info_async`` / ``activate_async`` / ``login_async``, which take ``radio=`` (a
:class:`~mitherm.radio.virtual.VirtualRadio`) or ``transport=`` (a Bumble transport) for tests and
demos; the click commands add confirmation, progress display and error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mitherm.device import REFUSES_ACTIVATION, DeviceIdentity, identify, run_protocol
from mitherm.keystore import Keystore, KeystoreError, mask_key
from mitherm.mac import InvalidMac, normalize_mac
from mitherm.protocols.miauth import (
    DEFAULT_STEP_TIMEOUT,
    Event,
    Failed,
    LoggedIn,
    LoginClient,
    Progress,
    RegisterClient,
    Registered,
    did_text,
    parse_token,
)

__all__ = [
    "ActivationResult",
    "DeviceCommandError",
    "activate",
    "activate_async",
    "info",
    "info_async",
    "login",
    "login_async",
    "sim_radio",
    "wait_for_key",
]

#: how long `activate` listens for the first encrypted advert (stock sensors send one about every 10 min)
DEFAULT_VERIFY_MINUTES = 15.0

XIAOMI_HOME_WARNING = (
    "Activation makes mitherm the owner of {mac} and gives it a new bindkey. Xiaomi Home will no longer "
    "accept the device until you remove it there and add it again (which makes yet another key), and the "
    "key Home Assistant or the cloud holds for it stops working."
)


class DeviceCommandError(Exception):
    """A failure with a message for the user (click turns it into an error line, no traceback)."""


@dataclass(slots=True)
class ActivationResult:
    identity: DeviceIdentity
    registered: Registered
    keystore_status: str
    diagnosis: Any = None  # mitherm.doctor.Diagnosis when verified

    @property
    def bindkey(self) -> str:
        return self.registered.bindkey.hex()

    @property
    def token(self) -> str:
        return self.registered.token.hex()

    @property
    def did(self) -> str:
        return did_text(self.registered.did)


# --- connecting ----------------------------------------------------------------------------------------


def _mac(text: str) -> str:
    try:
        return normalize_mac(text)
    except InvalidMac as e:
        raise DeviceCommandError(str(e)) from None


async def _connect(mac: str, radio: Any, transport: str | None, timeout: float) -> Any:
    from mitherm.gatt.link import GattError, connect

    try:
        return await connect(mac, radio=radio, transport=transport, timeout=timeout)
    except GattError as e:
        raise DeviceCommandError(str(e)) from None


@contextlib.asynccontextmanager
async def _link(mac: str, radio: Any, transport: str | None, timeout: float) -> AsyncIterator[Any]:
    link = await _connect(mac, radio, transport, timeout)
    try:
        yield link
    finally:
        # Xiaomi sensors do not advertise while connected (keys.md §2 #2): always let go explicitly
        await link.disconnect()


def _check_failed(event: Event) -> Event:
    if isinstance(event, Failed):
        raise DeviceCommandError(event.message)
    return event


# --- info --------------------------------------------------------------------------------------------


async def info_async(
    mac: str, *, radio: Any = None, transport: str | None = None, timeout: float = 20.0
) -> DeviceIdentity:
    async with _link(_mac(mac), radio, transport, timeout) as link:
        return await identify(link)


# --- activate ----------------------------------------------------------------------------------------


def _require_activation_possible(ident: DeviceIdentity, force: bool) -> None:
    if ident.firmware_kind in ("pvvx", "atc1441"):
        raise DeviceCommandError(
            f"{ident.address} runs {ident.firmware_kind} custom firmware, which has no Mi activation: its "
            "encrypted beacons use the firmware's own bindkey (`mitherm pvvx`)."
        )
    if not ident.has_mi_auth:
        raise DeviceCommandError(f"{ident.address} has no Mi auth service (FE95 0x0010/0x0019): cannot activate it.")
    if ident.firmware in REFUSES_ACTIVATION and not force:
        raise DeviceCommandError(
            f"{ident.address} runs {REFUSES_ACTIVATION[ident.firmware]}, which refuses BLE activation (the "
            "device never answers the key exchange). Keep it in Xiaomi Home, fetch its token and bindkey with "
            f"`mitherm cloud keys`, then `mitherm login {ident.address}`. (--force tries anyway.)"
        )


async def activate_async(
    mac: str,
    *,
    keystore: Keystore,
    radio: Any = None,
    transport: str | None = None,
    listen_source: Any = None,
    verify: bool = True,
    verify_timeout: float = DEFAULT_VERIFY_MINUTES * 60,
    force: bool = False,
    timeout: float = 20.0,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    name: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    on_wait: Callable[[Any, float], None] | None = None,
) -> ActivationResult:
    """Register, store token/bindkey/DID (source "activation"), then (``verify``) listen on
    ``listen_source`` (default: the radio connected through) until an advert decrypts with the new key."""
    mac = _mac(mac)
    async with _link(mac, radio, transport, timeout) as link:
        ident = await identify(link)
        _require_activation_possible(ident, force)
        event = await run_protocol(link, RegisterClient(step_timeout=step_timeout), on_event=on_event)
    registered = _check_failed(event)
    assert isinstance(registered, Registered)
    try:
        status = keystore.add(
            mac,
            registered.bindkey.hex(),
            name=name,
            token=registered.token.hex(),
            source="activation",
            overwrite=True,
            model=ident.model,
            did=did_text(registered.did),
        )
        keystore.save()
    except (KeystoreError, OSError) as e:
        # the device has a new owner now: the keys must not be lost, so say them in the error
        raise DeviceCommandError(
            f"{mac} was activated but the keys could not be stored ({e}). Write them down now: bindkey "
            f"{registered.bindkey.hex()} token {registered.token.hex()} did {did_text(registered.did)}"
        ) from None
    result = ActivationResult(ident, registered, status)
    if verify:
        source = listen_source if listen_source is not None else _default_listen_source(radio, transport)
        result.diagnosis = await wait_for_key(mac, registered.bindkey.hex(), source, verify_timeout, on_wait=on_wait)
    return result


def _default_listen_source(radio: Any, transport: str | None) -> Any:
    from mitherm.sources import open_source
    from mitherm.sources.bleak_source import BleakSource

    if radio is not None:
        return BleakSource(bumble_radio=radio, name="verify", silence=3600)
    return open_source(f"bumble:{transport}" if transport else "bleak:")


async def wait_for_key(
    mac: str,
    bindkey: str,
    source: Any,
    timeout: float,
    *,
    on_wait: Callable[[Any, float], None] | None = None,
) -> Any:
    """Listen on ``source`` until an encrypted advert from ``mac`` decrypts with ``bindkey`` (doctor
    verdict ok), the doctor rules the key out, or ``timeout`` seconds pass. Returns the Diagnosis.
    Only adverts heard from now on count: older ones were sent under the previous key."""
    from mitherm.doctor import UNDECIDED, Verdict, diagnose
    from mitherm.framecache import FrameCache

    cache = FrameCache()
    changed = asyncio.Event()

    def emit(adv: Any) -> None:
        if adv.mac == mac:
            cache.add_advertisement(adv)
            changed.set()

    task = asyncio.create_task(source.run(emit))
    start = time.monotonic()
    try:
        while True:
            dx = diagnose(cache, mac, bindkey, now=time.time())
            waited = time.monotonic() - start
            if dx.ok or waited >= timeout:
                return dx
            if dx.verdict not in UNDECIDED and dx.verdict is not Verdict.OK and dx.frames.failed >= 3:
                return dx
            if task.done():
                exc = task.exception()
                if exc is not None:
                    raise DeviceCommandError(f"listening for adverts failed: {exc}")
                return dx
            if on_wait is not None:
                on_wait(dx, waited)
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(1.0, max(0.01, timeout - waited)))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- login -------------------------------------------------------------------------------------------


async def login_async(
    mac: str,
    *,
    token: str | bytes | None = None,
    keystore: Keystore | None = None,
    radio: Any = None,
    transport: str | None = None,
    timeout: float = 20.0,
    step_timeout: float = DEFAULT_STEP_TIMEOUT,
    on_event: Callable[[Event], None] | None = None,
) -> LoggedIn:
    """Log in with ``token`` (default: the keystore's token for ``mac``)."""
    mac = _mac(mac)
    if token is None:
        entry = keystore.get(mac) if keystore is not None else None
        if entry is None or not entry.token:
            raise DeviceCommandError(
                f"no token stored for {mac}: activate the device (`mitherm activate {mac}`), import the cloud "
                "keys (`mitherm cloud keys`), or give it with --token"
            )
        token = entry.token
    try:
        raw = parse_token(token)
    except ValueError as e:
        raise DeviceCommandError(f"bad token: {e}") from None
    async with _link(mac, radio, transport, timeout) as link:
        if not (link.has_characteristic("0010") and link.has_characteristic("0019")):
            raise DeviceCommandError(
                f"{mac} has no Mi auth service (FE95 0x0010/0x0019): custom firmware needs no login"
            )
        event = await run_protocol(link, LoginClient(raw, step_timeout=step_timeout), on_event=on_event)
    result = _check_failed(event)
    assert isinstance(result, LoggedIn)
    return result


# --- the virtual house (--sim) -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sim_radio(house: Any, *, time_factor: float | None = None) -> AsyncIterator[Any]:
    """A virtual radio with the house's devices advertising and serving GATT (for ``--sim``, demos and
    tests). ``house``: a house file path, ``demo`` / ``minimal``, or a :class:`~mitherm.sim.house.House`."""
    from mitherm.radio.virtual import VirtualRadio
    from mitherm.sim.gatt import serve_gatt
    from mitherm.sources import SourceError
    from mitherm.sources.sim_source import SimSource

    try:
        src = SimSource(house, time_factor=time_factor) if isinstance(house, str) else SimSource(house=house)
    except SourceError as e:
        raise DeviceCommandError(str(e)) from None
    async with VirtualRadio() as radio:
        src.radio = radio
        task = asyncio.create_task(src._advertise(radio))
        try:
            for _ in range(500):
                if len(src.advertisers) == len(src.house.devices) or task.done():
                    break
                await asyncio.sleep(0.01)
            if task.done():
                task.result()
            for device in src.house.devices:
                await serve_gatt(src.advertisers[device.address], device)
            yield radio
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- click ---------------------------------------------------------------------------------------------


def _target(source: str | None) -> str | None:
    """The Bumble transport for ``--source bumble:…``; None for the local adapter."""
    if source is None or source.lower() in ("bleak", "bleak:"):
        return None
    scheme, _, rest = source.partition(":")
    if scheme.lower() == "bumble" and rest:
        return rest
    if scheme.lower() == "bleak":
        raise click.ClickException(
            "connections go through the system's default adapter: use --source bleak: (choosing an adapter "
            "is not supported for connections yet)"
        )
    raise click.ClickException(f"cannot connect through {source!r}: use bleak: (default), bumble:usb:0 or --sim HOUSE")


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", type=float, default=20.0, show_default=True, help="Seconds to find and connect.")(f)
    f = click.option(
        "--sim",
        "sim_house",
        metavar="HOUSE",
        help="Talk to a virtual device instead: a house TOML file or 'demo' / 'minimal'.",
    )(f)
    f = click.option(
        "--source",
        help="Where to connect: bleak: (the local adapter, default) or bumble:TRANSPORT (e.g. bumble:usb:0).",
    )(f)
    return f


def _run(coro_factory: Callable[[Any, str | None], Any], source: str | None, sim_house: str | None) -> Any:
    """Run ``coro_factory(radio, transport)`` on the chosen radio, errors as ClickException."""

    async def go() -> Any:
        if sim_house:
            if source:
                raise click.ClickException("give --source or --sim, not both")
            async with sim_radio(sim_house) as radio:
                return await coro_factory(radio, None)
        return await coro_factory(None, _target(source))

    try:
        return asyncio.run(go())
    except DeviceCommandError as e:
        raise click.ClickException(str(e)) from None


def _keystore(path: Path | None) -> Keystore:
    try:
        return Keystore(path)
    except KeystoreError as e:
        raise click.ClickException(str(e)) from None


def _keystore_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--keystore",
        "keystore_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="MITHERM_KEYSTORE",
        help="Keystore file (default: keys.json in the mitherm config directory; env MITHERM_KEYSTORE).",
    )(f)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _show(secret: str, show: bool) -> str:
    return secret if show else mask_key(secret)


@click.command("info")
@click.argument("mac")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(mac: str, source: str | None, sim_house: str | None, timeout: float, as_json: bool) -> None:
    """Identify the thermometer MAC: firmware (stock / pvvx / atc1441), versions, what to do next."""
    ident: DeviceIdentity = _run(
        lambda radio, tr: info_async(mac, radio=radio, transport=tr, timeout=timeout), source, sim_house
    )
    if as_json:
        click.echo(json.dumps(ident.to_json(), ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("firmware", {"stock": "stock (Xiaomi)", "unknown": "unknown"}.get(ident.firmware_kind, ident.firmware_kind)),
        ("model", ident.model),
        ("firmware rev", ident.firmware),
        ("hardware rev", ident.hardware),
        ("software rev", ident.software),
        ("manufacturer", ident.manufacturer),
        ("pvvx version", ident.pvvx_version),
        ("hardware id", f"{ident.hw_id} ({ident.hw_name})" if ident.hw_id is not None else None),
        ("advertising", ident.advertising_format),
    ]
    if ident.firmware_kind == "stock":
        rows.append(("activation", "accepted" if ident.accepts_activation else "refused by this firmware (login only)"))
    for k, v in rows:
        if v is not None:
            table.add_row(k, str(v))
    console = Console(highlight=False)
    console.print(f"[bold]{ident.address}[/bold]")
    console.print(table)
    for note in ident.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if ident.next_steps:
        console.print("\n[bold]next steps[/bold]")
        for step in ident.next_steps:
            console.print(f"  • {step}")


@click.command("activate")
@click.argument("mac")
@connection_options
@_keystore_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--no-verify", is_flag=True, help="Do not wait for an advert that decrypts with the new key.")
@click.option(
    "--verify-minutes",
    type=float,
    default=DEFAULT_VERIFY_MINUTES,
    show_default=True,
    help="How long to wait for that advert (stock sensors send one about every 10 minutes).",
)
@click.option("--name", help="A name for the device in the keystore (e.g. the room).")
@click.option("--force", is_flag=True, help="Try even on firmware known to refuse activation (2.1.1_0159).")
@click.option("--show-keys", is_flag=True, help="Print the new bindkey and token in full.")
@click.option("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT, hidden=True)
def activate(
    mac: str,
    source: str | None,
    sim_house: str | None,
    timeout: float,
    keystore_path: Path | None,
    yes: bool,
    no_verify: bool,
    verify_minutes: float,
    name: str | None,
    force: bool,
    show_keys: bool,
    step_timeout: float,
) -> None:
    """Register mitherm as the owner of MAC (Mi activation) and store its new bindkey and token."""
    try:
        mac = _mac(mac)
    except DeviceCommandError as e:
        raise click.ClickException(str(e)) from None
    store = _keystore(keystore_path)
    console = _console()
    console.print(f"[yellow]warning:[/yellow] {XIAOMI_HOME_WARNING.format(mac=mac)}")
    if not yes and not click.confirm("Activate it now?", default=False, err=True):
        raise click.ClickException("not activated")

    from rich.progress import Progress as Bar
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    with Bar(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(f"connecting to {mac}", total=None)

        def on_event(event: Event) -> None:
            if isinstance(event, Progress):
                bar.update(task, description=event.step)

        def on_wait(dx: Any, waited: float) -> None:
            bar.update(
                task,
                description=(
                    f"waiting for an encrypted advert from {mac} to check the new key "
                    f"({dx.frames.total} adverts heard, up to {verify_minutes:g} min)"
                ),
            )

        result: ActivationResult = _run(
            lambda radio, tr: activate_async(
                mac,
                keystore=store,
                radio=radio,
                transport=tr,
                verify=not no_verify,
                verify_timeout=verify_minutes * 60,
                force=force,
                timeout=timeout,
                step_timeout=step_timeout,
                name=name,
                on_event=on_event,
                on_wait=on_wait,
            ),
            source,
            sim_house,
        )
    ident = result.identity
    click.echo(f"Activated {mac} ({ident.model or 'unknown model'}, firmware {ident.firmware or '?'})")
    click.echo(f"  bindkey  {_show(result.bindkey, show_keys)}")
    click.echo(f"  token    {_show(result.token, show_keys)}")
    click.echo(f"  did      {result.did}")
    click.echo(f"  stored in {store.path} (source activation, {result.keystore_status})")
    dx = result.diagnosis
    if dx is None:
        click.echo(f"Not verified (--no-verify): check later with `mitherm doctor --mac {mac} --live`.")
    elif dx.ok:
        click.echo("Verified: an advert sent after the activation decrypts with the new key.")
    else:
        click.echo(f"Not verified yet ({dx.verdict.value}): {dx.advice}")
        click.echo(f"The key is stored; check again with `mitherm doctor --mac {mac} --live`.")
    if not show_keys:
        click.echo("Show the full keys with `mitherm keys list --show-keys`.")


@click.command("login")
@click.argument("mac")
@connection_options
@_keystore_option
@click.option("--token", help="The Mi token (24 hex digits); default: the keystore's token for MAC.")
@click.option("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT, hidden=True)
def login(
    mac: str,
    source: str | None,
    sim_house: str | None,
    timeout: float,
    keystore_path: Path | None,
    token: str | None,
    step_timeout: float,
) -> None:
    """Log in to the stock firmware of MAC with its token (proves the token; needed before flashing)."""
    store = _keystore(keystore_path) if token is None else None
    result: LoggedIn = _run(
        lambda radio, tr: login_async(
            mac, token=token, keystore=store, radio=radio, transport=tr, timeout=timeout, step_timeout=step_timeout
        ),
        source,
        sim_house,
    )
    note = " (the device reports it was already logged in)" if result.session is None else ""
    click.echo(f"Logged in to {normalize_mac(mac)}: the token is valid{note}.")

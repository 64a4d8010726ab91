"""``mitherm flash`` and ``mitherm firmware``: Telink OTA for pvvx / stock thermometers.

* ``flash MAC IMAGE``: check the image (structure, size limit, image type vs the device's HW id, battery,
  the MHO-C401 question) **before anything is sent**, log in first on stock firmware, send it over legacy or
  extended OTA with a progress bar, wait for the reboot and identify the device again;
* ``flash MAC --stock IMAGE``: back to the stock firmware (with the notes on the Mi keys);
* ``firmware list MAC``: which images fit the device; ``firmware inspect IMAGE``: check a file offline.

``flash_async`` / ``firmware_list_async`` do the work and take ``radio=`` (a VirtualRadio) or
``transport=`` (a Bumble transport) for tests; the click commands add questions, display and exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mitherm.commands.device import DeviceCommandError, _keystore, _keystore_option, connection_options
from mitherm.commands.device import _run as _device_run
from mitherm.device import DeviceIdentity, identify, run_protocol
from mitherm.firmware import (
    FirmwareImage,
    FlashPlan,
    FlashRefused,
    TargetDevice,
    firmware_index,
    parse_image,
    plan_flash,
)
from mitherm.keystore import Keystore
from mitherm.mac import InvalidMac, normalize_mac
from mitherm.protocols import ota

__all__ = [
    "FlashFailed",
    "FlashReport",
    "firmware",
    "firmware_list_async",
    "flash",
    "flash_async",
    "stock_notes",
    "target_from_identity",
]

BATTERY_LEVEL_UUID = "2a19"
STOCK_SPEED_UUID = "ebe0ccd8-7a0a-4b0c-8a1a-6ff2997da3a6"  # "1E 00 00" before OTA (TelinkMiFlasher updateBegin)
PVVX_MEASURE = 0x33

NO_TOKEN_HELP = (
    "stock firmware accepts OTA only after a Mi login with the device's token, and mitherm has none for {mac}:\n"
    "  • stock 1.0.0_xxxx: `mitherm activate {mac}` registers mitherm as owner and stores a token (Xiaomi Home "
    "then needs the device removed and re-added);\n"
    "  • stock 2.1.1_0159 (LYWSD03MMC sold since ~2023) refuses activation: keep it in Xiaomi Home, fetch token "
    "and bindkey from the cloud (`mitherm cloud keys` or Xiaomi-cloud-tokens-extractor + `mitherm keys import`), "
    "then `mitherm flash {mac} --stock Original_OTA_Xiaomi_LYWSD03MMC_v2.1.1_0159c.bin` (the signed "
    "intermediate image), and after its reboot flash ATC_vNN.bin (mitherm logs in again each time);\n"
    "  • or give the token with --token."
)


def stock_notes() -> list[str]:
    """What to know before going back to stock (firmware.md §2.8)."""
    return [
        "pvvx firmware keeps the Xiaomi keys (flash 0x78000): the stock firmware comes back still bound to its "
        "old owner and bindkey; re-adding it to Xiaomi Home can take several attempts (pvvx commands 0x15/0x16/0x17 "
        "dump, restore or erase those keys before you flash).",
        "stock images larger than 128 KiB (MJWSD05MMC 2.0.0_0026) go through extended OTA only.",
        "a LYWSD03MMC that shipped with stock 2.1.1_0159 may not come back to it (pvvx#602); firmware.json lists "
        "Original_OTA_Xiaomi_LYWSD03MMC_v2.1.1_0159_B1.6.bin for the 2025 boards.",
    ]


class FlashFailed(DeviceCommandError):
    """The OTA was started and failed. ``code``: the device's error code (None: link failure)."""

    def __init__(self, message: str, *, code: int | None, state: str, advice: str, failure: Any = None) -> None:
        super().__init__(f"{message}\ndevice state: {state}\nwhat to do: {advice}")
        self.code = code
        self.state = state
        self.advice = advice
        self.failure = failure


@dataclass(slots=True)
class FlashReport:
    address: str
    image: FirmwareImage
    plan: FlashPlan
    before: DeviceIdentity
    after: DeviceIdentity | None
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def new_version(self) -> str | None:
        if self.after is None:
            return None
        return self.after.pvvx_version if self.after.firmware_kind == "pvvx" else self.after.firmware

    @property
    def bytes_per_second(self) -> float:
        return len(self.image.payload) / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "image": self.image.describe(),
            "method": self.plan.method,
            "seconds": round(self.seconds, 2),
            "bytes_per_second": round(self.bytes_per_second),
            "before": self.before.to_json(),
            "after": self.after.to_json() if self.after else None,
            "new_version": self.new_version,
            "warnings": self.warnings,
        }


# --- talking to the device --------------------------------------------------------------------------


def _mac(text: str) -> str:
    try:
        return normalize_mac(text)
    except InvalidMac as e:
        raise DeviceCommandError(str(e)) from None


async def _connect(mac: str, radio: Any, transport: str | None, timeout: float, attempts: int = 3) -> Any:
    from mitherm.gatt.link import GattError, connect

    try:
        return await connect(mac, radio=radio, transport=transport, timeout=timeout, attempts=attempts)
    except GattError as e:
        raise DeviceCommandError(str(e)) from None


def _firmware_version_text(ident: DeviceIdentity) -> str:
    if ident.firmware_kind == "pvvx":
        return f"pvvx {ident.pvvx_version or '?'}"
    if ident.firmware_kind == "stock":
        return f"stock {ident.firmware or '?'}"
    return ident.firmware_kind


async def _battery_pct(link: Any, ident: DeviceIdentity) -> int | None:
    """Battery level: 0x2A19 when the device has it, else (pvvx) the voltage from one 0x33 measurement."""
    from mitherm.gatt.link import GattError

    if link.has_characteristic(BATTERY_LEVEL_UUID):
        with contextlib.suppress(GattError):
            raw = await link.read(BATTERY_LEVEL_UUID)
            if raw:
                return raw[0]
    if ident.firmware_kind != "pvvx" or not link.has_characteristic(ota.PVVX_CMD_CHAR):
        return None
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_data(data: bytes) -> None:
        if len(data) >= 3 and data[0] == PVVX_MEASURE and not got.done():
            got.set_result(data)

    try:
        await link.subscribe(ota.PVVX_CMD_CHAR, on_data)
        await link.write(ota.PVVX_CMD_CHAR, bytes([PVVX_MEASURE, 1]), response=False)
        data = await asyncio.wait_for(got, 3.0)
    except (GattError, TimeoutError):
        return None
    finally:
        with contextlib.suppress(GattError):
            await link.unsubscribe(ota.PVVX_CMD_CHAR)
    millivolts = int.from_bytes(data[1:3], "little")
    # a CR2032 under load: 3.1 V full, 2.2 V empty (linear; pvvx shows a similar curve)
    return max(0, min(100, round((millivolts - 2200) / 9)))


def target_from_identity(ident: DeviceIdentity, battery_pct: int | None = None) -> TargetDevice:
    pvvx_bcd = None
    if ident.pvvx_version:
        with contextlib.suppress(ValueError):
            major, _, minor = ident.pvvx_version.partition(".")
            pvvx_bcd = (int(major) << 4) | int(minor or 0)
    version = ident.pvvx_version if ident.firmware_kind == "pvvx" else ident.firmware
    return TargetDevice(
        model=ident.model,
        firmware=ident.firmware_kind,
        version=version,
        pvvx_version=pvvx_bcd,
        hw_id=ident.hw_id,
        hw_revision=ident.hardware,
        battery_pct=battery_pct,
    )


async def _mi_login(link: Any, mac: str, token: str | bytes | None, keystore: Keystore | None) -> None:
    from mitherm.protocols.miauth import Failed, LoginClient, parse_token

    if token is None and keystore is not None:
        entry = keystore.get(mac)
        token = entry.token if entry is not None else None
    if not token:
        raise FlashRefused("no-token", NO_TOKEN_HELP.format(mac=mac))
    try:
        raw = parse_token(token)
    except ValueError as e:
        raise FlashRefused("no-token", f"bad token for {mac}: {e}") from None
    event = await run_protocol(link, LoginClient(raw))
    if isinstance(event, Failed):
        raise FlashRefused(
            "login",
            f"Mi login failed: {event.message}",
            "the stored token does not match the device (re-paired in Xiaomi Home?): fetch it again with "
            "`mitherm cloud keys`",
        )


def _advice(code: int | None, extended: bool) -> tuple[str, str]:
    """(device state, what to do) after a failed transfer."""
    if extended:
        state = (
            "extended OTA wrote to the area at 0x40000 only; the running firmware stays until a complete, "
            "checked image replaces it"
        )
    else:
        state = (
            "the old firmware is still running: legacy OTA writes the other bank and switches only after the "
            "image CRC passed (the device reboots after an OTA error)"
        )
    advice = {
        1: "blocks were lost on air: move the device closer, close other BLE apps, then run the same command again",
        2: "a block arrived damaged: radio interference; run the same command again",
        3: "the device could not write its flash: check the battery (> 40 %) and retry; if it repeats, the "
        "image may not fit this device",
        4: "the last blocks were lost: run the same command again",
        5: "the transfer stalled for 16 s: keep the connection latency at 1 s or less and retry",
        6: "the device rejected the image CRC: download the image again and retry",
    }.get(code or -1, "the link dropped: wait until the device advertises again (about 10 s), then retry")
    return state, advice


async def _wait_disconnect(link: Any, seconds: float) -> bool:
    dropped = asyncio.Event()
    link.on_disconnect(dropped.set)
    try:
        await asyncio.wait_for(dropped.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _identify_again(
    mac: str, radio: Any, transport: str | None, timeout: float, attempts: int = 5
) -> DeviceIdentity | None:
    for attempt in range(attempts):
        try:
            link = await _connect(mac, radio, transport, timeout, attempts=1)
        except DeviceCommandError:
            await asyncio.sleep(0.5 * (attempt + 1))
            continue
        try:
            return await identify(link)
        finally:
            await link.disconnect()
    return None


Confirm = Callable[[str], bool]


async def flash_async(
    mac: str,
    image_data: bytes,
    *,
    image_name: str | None = None,
    to_stock: bool = False,
    force_low_battery: bool = False,
    confirm: Confirm | None = None,
    token: str | bytes | None = None,
    keystore: Keystore | None = None,
    radio: Any = None,
    transport: str | None = None,
    timeout: float = 20.0,
    reboot_timeout: float = 30.0,
    on_event: Callable[[ota.Event], Any] | None = None,
    on_status: Callable[[str], None] | None = None,
    on_plan: Callable[[FlashPlan], None] | None = None,
) -> FlashReport:
    """Check, send and verify. Raises :class:`FlashRefused` (nothing was sent), :class:`FlashFailed`
    (the OTA started and failed) or :class:`DeviceCommandError` (could not talk to the device)."""
    mac = _mac(mac)
    say = on_status or (lambda _msg: None)
    image = parse_image(image_data, image_name)  # refusals that need no device come first
    link = await _connect(mac, radio, transport, timeout)
    try:
        before = await identify(link)
        if not link.has_characteristic(ota.OTA_CHAR):
            raise FlashRefused("no-ota", f"{mac} has no Telink OTA characteristic ({ota.OTA_CHAR})")
        battery = await _battery_pct(link, before)
        plan = plan_flash(
            image, target_from_identity(before, battery), force_low_battery=force_low_battery, to_stock=to_stock
        )
        if on_plan is not None:
            on_plan(plan)
        for question in plan.confirm:
            if confirm is None or not confirm(question):
                raise FlashRefused(
                    "not-confirmed", question, "nothing was sent; answer the question (or pass --yes) to go on"
                )
        if before.firmware_kind == "stock":
            say("Mi login")
            await _mi_login(link, mac, token, keystore)
            if link.has_characteristic(STOCK_SPEED_UUID):
                from mitherm.gatt.link import GattError

                with contextlib.suppress(GattError):
                    await link.write(STOCK_SPEED_UUID, b"\x1e\x00\x00", response=True)
        say(f"sending {len(image.payload)} bytes by {plan.method}")
        client = ota.OtaClient(image.payload, extended=plan.extended)
        started = time.monotonic()
        try:
            await ota.run_ota(link, client, on_event)
        except ota.OtaError as e:
            state, advice = _advice(e.failure.code, plan.extended)
            await _wait_disconnect(link, 3.0)
            await link.disconnect()
            back = await _identify_again(mac, radio, transport, timeout, attempts=3)
            if back is not None:
                state += f"; it is back and runs {_firmware_version_text(back)}"
            else:
                state += (
                    "; it does not answer yet (give it a minute; if it stays silent, take the battery out for 10 s)"
                )
            raise FlashFailed(
                str(e.failure), code=e.failure.code, state=state, advice=advice, failure=e.failure
            ) from None
        seconds = time.monotonic() - started
        say("waiting for the reboot")
        if not await _wait_disconnect(link, reboot_timeout):
            await link.disconnect()
            raise FlashFailed(
                "the device did not reboot after the last block",
                code=None,
                state="unknown: the stock firmware may have ignored the data (no Mi login?) or the image was refused",
                advice="identify it with `mitherm info MAC`; if it still runs the old firmware, retry",
            )
    finally:
        await link.disconnect()
    say("identifying the device again")
    after = await _identify_again(mac, radio, transport, timeout)
    report = FlashReport(mac, image, plan, before, after, seconds, warnings=list(plan.warnings))
    if after is None:
        report.warnings.append("the device did not come back yet: it may still be booting; check with `mitherm info`")
    elif image.test_tag is not None and report.new_version not in (None, image.test_tag.version):
        raise FlashFailed(
            f"the device came back with {_firmware_version_text(after)}, not {image.test_tag.version}",
            code=None,
            state="the old image is running: the new one did not pass the device's checks",
            advice="retry; if it repeats, the image does not suit this device",
        )
    return report


# --- firmware list ------------------------------------------------------------------------------------------


def describe_fit(ident: DeviceIdentity) -> dict[str, Any]:
    index = firmware_index()
    match = index.match(ident.model, ident.hw_id, ident.hardware)
    notes: list[str] = []
    if match.ambiguous:
        notes.append(
            "stock firmware cannot tell the old MHO-C401 from the 2022.11 one (MHO-C401N, extra symbol on the "
            "screen): pick the image by looking at the device; the wrong one leaves the display frozen"
        )
    for hw in match.candidates:
        if hw.note and hw.note not in notes and len(match.candidates) == 1:
            notes.append(hw.note)
    if ident.firmware_kind == "stock" and (ident.firmware or "").startswith(index.stock_0159_version):
        notes.append(
            f"stock {ident.firmware} takes only signed images: Mi login with the cloud token, flash "
            f"{index.stock_0159_signed} (--stock), log in again, then the custom image"
        )
    if not match.candidates:
        notes.append("this model is not in mitherm's firmware index")
    return {
        "address": ident.address,
        "model": ident.model,
        "firmware": ident.firmware_kind,
        "version": ident.pvvx_version if ident.firmware_kind == "pvvx" else ident.firmware,
        "hardware_revision": ident.hardware,
        "hw_id": ident.hw_id,
        "advertising_format": ident.advertising_format,
        "pvvx_version_in_index": index.pvvx_version,
        "images": match.as_dict(index),
        "notes": notes,
    }


async def firmware_list_async(
    mac: str, *, radio: Any = None, transport: str | None = None, timeout: float = 20.0
) -> dict[str, Any]:
    link = await _connect(_mac(mac), radio, transport, timeout)
    try:
        ident = await identify(link)
    finally:
        await link.disconnect()
    return describe_fit(ident)


# --- click -------------------------------------------------------------------------------------------------------


def _run(coro_factory: Callable[[Any, str | None], Any], source: str | None, sim_house: str | None) -> Any:
    """:func:`mitherm.commands.device._run`, with a refused check reported as such."""

    async def refusing(radio: Any, transport: str | None) -> Any:
        try:
            return await coro_factory(radio, transport)
        except FlashRefused as e:
            raise click.ClickException(f"refused ({e.check}), nothing was sent: {e}") from None

    return _device_run(refusing, source, sim_house)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@click.command("flash")
@click.argument("mac")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--stock", "to_stock", is_flag=True, help="IMAGE is a stock (Original_OTA_…) image: go back to stock.")
@click.option("--force-low-battery", is_flag=True, help="Flash even with the battery below 40 %.")
@click.option("--yes", is_flag=True, help="Answer yes to the questions (MHO-C401 variant, extended OTA).")
@click.option("--token", help="Mi token (hex) for the login stock firmware needs (default: from the keystore).")
@_keystore_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@connection_options
def flash(
    mac: str,
    image: Path,
    to_stock: bool,
    force_low_battery: bool,
    yes: bool,
    token: str | None,
    keystore_path: Path | None,
    as_json: bool,
    source: str | None,
    sim_house: str | None,
    timeout: float,
) -> None:
    """Flash IMAGE (a Telink .bin, or a Zigbee OTA file) onto the thermometer MAC over BLE OTA.

    Every check runs before anything is sent: image structure and CRC, size (> 128 KiB needs extended OTA on
    pvvx 4.6+), image type vs the device's hardware id, battery >= 40 %, stock vs custom image."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = _console(stderr=as_json)
    data = image.read_bytes()
    keystore = _keystore(keystore_path)
    if to_stock:
        console.print("[bold]Going back to stock[/bold]")
        for note in stock_notes():
            console.print(f"  • {note}")

    def confirm(question: str) -> bool:
        if yes:
            console.print(f"[yellow]?[/yellow] {question} [dim](--yes)[/dim]")
            return True
        return click.confirm(question, default=False, err=as_json)

    def show_plan(plan: FlashPlan) -> None:
        console.print(f"image: {plan.image.variant()}, {len(plan.image.payload)} bytes, {plan.method}")
        for w in plan.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def on_event(event: ota.Event) -> None:
        if isinstance(event, ota.Progress):
            if "send" not in tasks:
                tasks["send"] = progress.add_task("flashing", total=event.total)
            progress.update(tasks["send"], completed=event.sent)
        elif isinstance(event, ota.EraseProgress):
            if "erase" not in tasks:
                tasks["erase"] = progress.add_task("erasing", total=event.sectors * ota.EXT_SECTOR)
            progress.update(tasks["erase"], completed=event.erased * ota.EXT_SECTOR)

    async def work(radio: Any, transport: str | None) -> FlashReport:
        with progress:
            return await flash_async(
                mac,
                data,
                image_name=image.name,
                to_stock=to_stock,
                force_low_battery=force_low_battery,
                confirm=confirm,
                token=token,
                keystore=keystore,
                radio=radio,
                transport=transport,
                timeout=timeout,
                on_event=on_event,
                on_status=lambda msg: console.print(f"[dim]{msg}[/dim]"),
                on_plan=show_plan,
            )

    report: FlashReport = _run(work, source, sim_house)
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False))
        return
    console.print(
        f"[green]done[/green]: {len(report.image.payload)} bytes in {report.seconds:.1f} s "
        f"({report.bytes_per_second:.0f} B/s)"
    )
    if report.after is not None:
        fmt = report.after.advertising_format or ("mibeacon" if report.after.firmware_kind == "stock" else "?")
        console.print(f"{report.address} now runs {_firmware_version_text(report.after)}, advertising {fmt}")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")


@click.group("firmware")
def firmware() -> None:
    """Which firmware image fits a thermometer; check image files."""


@firmware.command("list")
@click.argument("mac")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@connection_options
def list_cmd(mac: str, as_json: bool, source: str | None, sim_house: str | None, timeout: float) -> None:
    """Connect to MAC and say which images fit it (model, hardware revision and id, current firmware)."""
    fit = _run(
        lambda radio, tr: firmware_list_async(mac, radio=radio, transport=tr, timeout=timeout), source, sim_house
    )
    if as_json:
        click.echo(json.dumps(fit, ensure_ascii=False))
        return
    print_fit(fit, _console())


def print_fit(fit: dict[str, Any], console: Any) -> None:
    running = fit["firmware"] + (f" {fit['version']}" if fit["version"] else "")
    if fit["advertising_format"]:
        running += f" (advertising {fit['advertising_format']})"
    console.print(f"[bold]{fit['address']}[/bold]  {fit['model'] or 'unknown model'}")
    console.print(f"  running: {running}")
    if fit["hardware_revision"] or fit["hw_id"] is not None:
        hw = fit["hardware_revision"] or ""
        if fit["hw_id"] is not None:
            hw += f" (HW id {fit['hw_id']})"
        console.print(f"  hardware: {hw.strip()}")
    console.print(f"  images (pvvx v{fit['pvvx_version_in_index']}):")
    for img in fit["images"]:
        console.print(f"  [bold]HW id {img['hw_id']}[/bold]  {img['model']} {img['revision'] or ''}".rstrip())
        console.print(f"    custom        {img['custom']}  (build {img['build']}, image type {img['image_type']})")
        if img["original"]:
            console.print(f"    back to stock {img['original']}")
        if img["signed"]:
            console.print(f"    signed (0159) {img['signed']}")
        if img["note"]:
            console.print(f"    [dim]{img['note']}[/dim]")
    for note in fit["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


@firmware.command("inspect")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(image: Path, as_json: bool) -> None:
    """Check an image file offline (marker, header size, CRC-32, wrapper, signature, image type)."""
    try:
        info = parse_image(image.read_bytes(), image.name)
    except FlashRefused as e:
        raise click.ClickException(f"{image.name}: {e}") from None
    desc = info.describe()
    if as_json:
        click.echo(json.dumps(desc, ensure_ascii=False))
        return
    console = _console()
    for key, value in desc.items():
        if value not in (None, [], False):
            console.print(f"[bold]{key:>13}[/bold]  {value}")

"""``mitherm set`` / ``mitherm read`` / ``mitherm pvvx``: device settings over GATT, and the history download.

Stock firmware is driven through the settings service ``ebe0ccb0-…`` (:mod:`mitherm.protocols.stock`),
pvvx firmware through its command channel 0x1F10/0x1F1F (:mod:`mitherm.protocols.pvvx`). The protocol
modules are sans-IO; the small drivers here (:class:`StockSettings`, :class:`PvvxChannel`) run them over
a :class:`~mitherm.gatt.link.GattLink`.

Every command has an async counterpart taking ``radio=`` (a :class:`~mitherm.radio.virtual.VirtualRadio`)
or ``transport=`` (a Bumble transport); tests call those. Failures raise :class:`SettingsError`, a
``click.ClickException``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from ..protocols import pvvx as pv
from ..protocols import stock as st
from ..protocols.stock import HistoryProgress, HistoryRecord
from .device import DeviceCommandError, _keystore_option, _target, connection_options, sim_radio

__all__ = [
    "LiveReading",
    "PvvxChannel",
    "SettingsError",
    "StockSettings",
    "apply_pvvx_settings",
    "detect_firmware",
    "download_device_history",
    "download_with_progress",
    "pvvx",
    "pvvx_bindkey",
    "pvvx_config",
    "pvvx_reboot",
    "pvvx_set",
    "pvvx_time",
    "read",
    "read_live",
    "set_",
    "set_clock",
    "set_unit",
    "verify_bindkey",
]

DEFAULT_TIMEOUT = 20.0  # connection
REPLY_TIMEOUT = 5.0  # one command's reply / one history notification
FIRMWARE_REV_UUID = "2a26"

Progress = Callable[[HistoryProgress], None]


class SettingsError(click.ClickException):
    """A settings operation failed; the message says why (and what to try)."""


# --- connecting -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connected(
    address: str, radio: Any = None, transport: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[Any]:
    from ..gatt.link import GattError, connect
    from ..mac import InvalidMac, normalize_mac

    try:
        address = normalize_mac(address)
    except InvalidMac as e:
        raise SettingsError(str(e)) from None
    try:
        link = await connect(address, radio=radio, transport=transport, timeout=timeout)
    except GattError as e:
        raise SettingsError(str(e)) from None
    try:
        yield link
    except GattError as e:
        raise SettingsError(str(e)) from None
    finally:
        await link.disconnect()


async def detect_firmware(link: Any) -> str:
    """``"pvvx"``, ``"atc1441"`` (0x1F10 without pvvx's DIS fingerprint) or ``"stock"``."""
    if link.has_characteristic(pv.CHAR_UUID):
        if link.has_characteristic(FIRMWARE_REV_UUID):
            with contextlib.suppress(Exception):
                rev = (await link.read(FIRMWARE_REV_UUID)).decode(errors="replace")
                if "pvvx" not in rev.lower():
                    return "atc1441"
        return "pvvx"
    if link.has_characteristic(st.UNIT_UUID):
        return "stock"
    raise SettingsError(
        f"{link.address} has neither the stock settings service ({st.SERVICE_UUID}) nor the custom "
        "firmware's command channel (0x1F10/0x1F1F): is it a supported thermometer?"
    )


# --- drivers -----------------------------------------------------------------------------------------------


class _Notifications:
    """Notifications of one characteristic in a queue; the link dropping wakes the reader."""

    def __init__(self, link: Any, uuid: str) -> None:
        self.link = link
        self.uuid = uuid
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False
        link.on_disconnect(self._on_disconnect)

    def _on_disconnect(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)

    async def open(self) -> None:
        await self.link.subscribe(self.uuid, self.queue.put_nowait)

    async def next(self, timeout: float, what: str) -> bytes:
        if self.closed and self.queue.empty():
            raise SettingsError(f"{self.link.address} disconnected while waiting for {what}")
        try:
            data = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise SettingsError(f"{self.link.address} did not answer {what} within {timeout:g} s") from None
        if data is None:
            raise SettingsError(f"{self.link.address} disconnected while waiting for {what}")
        return data


class StockSettings:
    """The stock settings service over a link."""

    def __init__(self, link: Any, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.link = link
        self.reply_timeout = reply_timeout

    async def unit(self) -> str:
        return st.decode_unit(await self.link.read(st.UNIT_UUID))

    async def set_unit(self, unit: str) -> None:
        await self.link.write(st.UNIT_UUID, st.encode_unit(unit), response=True)

    async def clock(self) -> st.ClockValue:
        return st.decode_clock(await self.link.read(st.CLOCK_UUID))

    async def set_clock(self, value: st.ClockValue) -> None:
        await self.link.write(st.CLOCK_UUID, st.encode_clock(value), response=True)

    async def live(self) -> st.LiveData:
        return st.decode_live(await self.link.read(st.LIVE_UUID))

    async def history(self, progress: Progress | None = None) -> list[HistoryRecord]:
        counters = st.decode_history_counters(await self.link.read(st.HISTORY_COUNTERS_UUID))
        machine = st.StockHistoryDownload(counters)
        if machine.done:
            return []
        notes = _Notifications(self.link, st.HISTORY_RECORDS_UUID)
        await notes.open()
        await self.link.write(st.HISTORY_INDEX_UUID, machine.start(), response=True)
        while not machine.done:
            what = f"history record {len(machine.records) + 1} of {machine.total}"
            for event in machine.receive(await notes.next(self.reply_timeout, what)):
                if isinstance(event, HistoryProgress) and progress is not None:
                    progress(event)
        with contextlib.suppress(Exception):
            await self.link.unsubscribe(st.HISTORY_RECORDS_UUID)
        return machine.records


class PvvxUnsupported(SettingsError):
    def __init__(self, cmd: int) -> None:
        super().__init__(f"the device's firmware does not support command 0x{cmd:02X} (it answered [{cmd:02X} FF])")
        self.cmd = cmd


class PvvxChannel:
    """The pvvx command channel over a link: ``await open()``, then ``command(request)``."""

    def __init__(self, link: Any, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.link = link
        self.reply_timeout = reply_timeout
        self.notes = _Notifications(link, pv.CHAR_UUID)

    async def open(self) -> PvvxChannel:
        await self.notes.open()
        return self

    async def send(self, request: bytes) -> None:
        await self.link.write(pv.CHAR_UUID, request, response=False)

    async def wait(self, accept: Callable[[bytes], bool], what: str, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.reply_timeout)
        while True:
            left = max(0.0, deadline - time.monotonic())
            data = await self.notes.next(left, what)
            if accept(data):
                return data

    async def command(self, request: bytes, timeout: float | None = None) -> pv.Reply:
        cmd = request[0]
        answers = {cmd, pv.REPLY_COMMAND.get(cmd, cmd)}
        await self.send(request)
        data = await self.wait(lambda d: bool(d) and d[0] in answers, f"command 0x{cmd:02X}", timeout)
        try:
            reply = pv.parse_reply(data)
        except pv.PvvxError as e:
            raise SettingsError(f"bad reply to command 0x{cmd:02X}: {e}") from None
        if isinstance(reply, pv.Unsupported):
            raise PvvxUnsupported(cmd)
        return reply

    async def config(self, timeout: float | None = None) -> pv.PvvxConfig:
        reply = await self.command(pv.config_request(), timeout)
        assert isinstance(reply, pv.ConfigReply)
        return reply.config

    async def set_config(self, cfg: pv.PvvxConfig) -> pv.PvvxConfig:
        reply = await self.command(pv.config_request(cfg))
        assert isinstance(reply, pv.ConfigReply)
        return reply.config

    async def comfort(self, limits: tuple[float, float, float, float] | None = None) -> pv.ComfortReply:
        reply = await self.command(pv.comfort_request(*limits) if limits else pv.comfort_request())
        assert isinstance(reply, pv.ComfortReply)
        return reply

    async def measurement(self) -> LiveReading:
        """One measurement with command 0x33 (``33 01`` echoes ``33 01``, then the values)."""
        await self.send(bytes([pv.CMD_MEASURE, 1]))
        data = await self.wait(lambda d: len(d) >= 9 and d[0] == pv.CMD_MEASURE, "a measurement (0x33)")
        vbat, temp, humi = (int.from_bytes(data[i : i + 2], "little", signed=i == 3) for i in (1, 3, 5))
        with contextlib.suppress(Exception):
            await self.send(bytes([pv.CMD_MEASURE, 0]))
        return LiveReading(temp / 100, humi / 100, vbat / 1000, "pvvx")

    async def history(self, progress: Progress | None = None) -> list[HistoryRecord]:
        machine = pv.PvvxHistoryDownload()
        await self.send(machine.start())
        while not machine.done:
            data = await self.wait(
                lambda d: bool(d) and d[0] == pv.CMD_HISTORY, f"history record {len(machine.records) + 1}"
            )
            try:
                events = machine.receive(data)
            except pv.PvvxError as e:
                raise SettingsError(str(e)) from None
            for event in events:
                if isinstance(event, HistoryProgress) and progress is not None:
                    progress(event)
        return machine.records


async def _pvvx(link: Any, reply_timeout: float = REPLY_TIMEOUT) -> PvvxChannel:
    firmware = await detect_firmware(link)
    if firmware == "stock":
        raise SettingsError(f"{link.address} runs the stock firmware: `mitherm pvvx` needs the pvvx custom firmware")
    if firmware == "atc1441":
        raise SettingsError(
            f"{link.address} runs the atc1441 firmware (single-byte commands, no replies): "
            "flash the pvvx firmware to use `mitherm pvvx`"
        )
    return await PvvxChannel(link, reply_timeout).open()


# --- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveReading:
    temperature_c: float
    humidity_pct: float
    voltage_v: float | None
    firmware: str

    def to_json(self) -> dict[str, Any]:
        return {
            "temperature_c": self.temperature_c,
            "humidity_pct": self.humidity_pct,
            "voltage_v": self.voltage_v,
            "firmware": self.firmware,
        }


# --- async API ----------------------------------------------------------------------------------------------


async def read_live(
    address: str, *, radio: Any = None, transport: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> LiveReading:
    """Live temperature/humidity/battery: stock ccc1, pvvx command 0x33."""
    async with _connected(address, radio, transport, timeout) as link:
        firmware = await detect_firmware(link)
        if firmware == "stock":
            live = await StockSettings(link).live()
            return LiveReading(live.temperature_c, live.humidity_pct, live.voltage_v, "stock")
        if firmware == "atc1441":
            raise SettingsError("the atc1441 firmware has no live-data command; read its adverts (`mitherm scan`)")
        return await (await _pvvx(link)).measurement()


async def set_unit(
    address: str, unit: str, *, radio: Any = None, transport: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str, str]:
    """Set the display unit (``"C"``/``"F"``); returns ``(before, after)`` as read back from the device."""
    try:
        st.encode_unit(unit)
    except st.StockError as e:
        raise SettingsError(str(e)) from None
    unit = unit.strip().upper().lstrip("°")
    async with _connected(address, radio, transport, timeout) as link:
        firmware = await detect_firmware(link)
        if firmware == "stock":
            s = StockSettings(link)
            before = await s.unit()
            await s.set_unit(unit)
            return before, await s.unit()
        if firmware == "atc1441":
            command = pv.atc1441_request(f"display_{'fahrenheit' if unit == 'F' else 'celsius'}")
            await link.write(pv.CHAR_UUID, command, response=False)
            await link.write(pv.CHAR_UUID, pv.atc1441_request("save"), response=False)
            return "?", unit
        channel = await _pvvx(link)
        cfg = await channel.config()
        after = await channel.set_config(replace(cfg, fahrenheit=unit == "F"))
        return ("F" if cfg.fahrenheit else "C"), ("F" if after.fahrenheit else "C")


async def set_clock(
    address: str,
    *,
    radio: Any = None,
    transport: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    now: float | None = None,
) -> dict[str, Any]:
    """Set the device clock from the host clock (stock: UTC seconds + time zone hours on ccb7; pvvx: local
    time as epoch with 0x23, as the official tools do). Returns what was written and read back."""
    async with _connected(address, radio, transport, timeout) as link:
        firmware = await detect_firmware(link)
        if firmware == "stock":
            s = StockSettings(link)
            before = await s.clock()
            value = st.host_clock(now)
            await s.set_clock(value)
            after = await s.clock()
            return {
                "firmware": "stock",
                "before": before.seconds,
                "written": value.seconds,
                "tz_hours": value.tz_hours,
                "after": after.seconds,
            }
        if firmware == "atc1441":
            raise SettingsError("the atc1441 firmware has no clock")
        return await _pvvx_time(await _pvvx(link), now)


async def _pvvx_time(channel: PvvxChannel, now: float | None = None) -> dict[str, Any]:
    before = await channel.command(pv.time_request())
    value = pv.local_epoch(now)
    after = await channel.command(pv.time_request(value))
    assert isinstance(before, pv.TimeReply) and isinstance(after, pv.TimeReply)
    return {"firmware": "pvvx", "before": before.now, "written": value, "after": after.now}


async def pvvx_config(
    address: str, *, radio: Any = None, transport: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> pv.PvvxConfig:
    async with _connected(address, radio, transport, timeout) as link:
        channel = await _pvvx(link)
        return await channel.config()


async def pvvx_time(
    address: str, *, radio: Any = None, transport: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    async with _connected(address, radio, transport, timeout) as link:
        return await _pvvx_time(await _pvvx(link))


async def pvvx_reboot(
    address: str, *, radio: Any = None, transport: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Command 0x72 ("reboot on disconnect"); the device restarts when this disconnects."""
    async with _connected(address, radio, transport, timeout) as link:
        await (await _pvvx(link)).command(pv.reboot_request())


# pvvx settings: name -> (PvvxConfig field, parser(text, config) -> value, help)
def _onoff(text: str, _cfg: pv.PvvxConfig) -> bool:
    t = text.strip().lower()
    if t in ("on", "yes", "true", "1"):
        return True
    if t in ("off", "no", "false", "0"):
        return False
    raise ValueError("use on or off")


def _ms(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", text.lower())
    if not m:
        raise ValueError("give a duration such as 2500ms or 2.5s")
    value = float(m.group(1))
    return value * 1000 if m.group(2) == "s" else value


def _byte(text: str, lo: int = 0, hi: int = 255) -> int:
    try:
        v = int(text.strip(), 0)
    except ValueError:
        raise ValueError("give a whole number") from None
    if not lo <= v <= hi:
        raise ValueError(f"must be {lo}..{hi}")
    return v


_ADV_ALIASES = {"custom": "pvvx", "bthome2": "bthome", "bthome_v2": "bthome", "mibeacon": "mi", "atc": "atc1441"}


def _advertising(text: str, _cfg: pv.PvvxConfig) -> str:
    t = _ADV_ALIASES.get(text.strip().lower(), text.strip().lower())
    if t not in pv.ADV_TYPES:
        raise ValueError(f"use one of {', '.join(pv.ADV_TYPES)}")
    return t


def _interval(text: str, _cfg: pv.PvvxConfig) -> int:
    # one byte on the wire; clamp_config then shows the firmware's 10 s limit
    return min(255, round(_ms(text) / 62.5))


def _measure(text: str, cfg: pv.PvvxConfig) -> int:
    if re.search(r"[a-z]", text.lower()):
        return _byte(str(round(_ms(text) / cfg.adv_interval_ms)), 0, 255)
    return _byte(text)


def _unit(text: str, _cfg: pv.PvvxConfig) -> bool:
    u = text.strip().upper().lstrip("°")
    if u not in ("C", "F"):
        raise ValueError("use C or F")
    return u == "F"


def _latency(text: str, _cfg: pv.PvvxConfig) -> int:
    return _byte(str(max(0, round(_ms(text) / 20) - 1)))


def _lcd(text: str, _cfg: pv.PvvxConfig) -> int:
    return _byte(str(round(_ms(text) / 50)))


PVVX_SETTINGS: dict[str, tuple[str, Callable[[str, pv.PvvxConfig], Any], str]] = {
    "advertising": ("advertising_type", _advertising, "bthome | pvvx | atc1441 | mi"),
    "interval": ("adv_interval", _interval, "advertising interval, e.g. 2500ms (62.5 ms steps, max 10 s)"),
    "measure": ("measure_interval", _measure, "measure every N adverts, or a duration such as 10s"),
    "tx": ("tx_power", lambda t, c: _byte(t), "RF TX power code (0xA9 = +0.04 dBm; 130..191 or 23..63)"),
    "unit": ("fahrenheit", _unit, "C | F (display)"),
    "encrypted": ("encrypted", _onoff, "on | off (encrypted beacons with the 0x18 bindkey)"),
    "comfort": ("comfort_smiley", _onoff, "on | off, or limits t_lo-t_hi/h_lo-h_hi such as 21-26/30-60"),
    "smiley": ("smiley", lambda t, c: _byte(t, 0, 7), "0..7"),
    "battery": ("show_battery", _onoff, "on | off (battery on the display)"),
    "flags": ("adv_flags", _onoff, "on | off (the flags AD in adverts)"),
    "latency": ("connect_latency", _latency, "connection latency, e.g. 1000ms (20 ms steps)"),
    "lcd": ("lcd_step", _lcd, "minimum LCD update step, e.g. 2450ms"),
    "averaging": ("averaging", lambda t, c: _byte(t), "history step in measurements (0 = logging off)"),
    "lowpower": ("lp_measures", _onoff, "on | off (low-power sensor mode)"),
    "longrange": ("longrange", _onoff, "on | off (LE coded PHY; reboots on disconnect)"),
    "bt5phy": ("bt5phy", _onoff, "on | off (reboots on disconnect)"),
}
_COMFORT_LIMITS = re.compile(
    r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*"
)


def apply_pvvx_settings(
    cfg: pv.PvvxConfig, changes: Mapping[str, str]
) -> tuple[pv.PvvxConfig, list[pv.Clamp], tuple[float, float, float, float] | None]:
    """Apply ``KEY=VALUE`` changes to a config read from the device (read-modify-write). Returns the new
    config after the firmware's clamps, the clamps, and comfort limits to send with 0x20 (or None).
    Raises SettingsError for an unknown key or a bad value."""
    new = cfg
    limits = None
    order = sorted(changes, key=lambda k: k != "interval")  # "measure=10s" uses the new interval
    for key in order:
        text = changes[key]
        name = key.strip().lower()
        if name not in PVVX_SETTINGS:
            raise SettingsError(f"unknown setting {key!r}; known: {', '.join(PVVX_SETTINGS)}")
        if name == "comfort" and (m := _COMFORT_LIMITS.fullmatch(text)):
            t_lo, t_hi, h_lo, h_hi = (float(x) for x in m.groups())
            if t_lo > t_hi or h_lo > h_hi or not 0 <= h_lo <= 100 or not 0 <= h_hi <= 100:
                raise SettingsError("comfort limits: low must not exceed high, humidity within 0..100 %")
            limits = (t_lo, t_hi, h_lo, h_hi)
            continue
        field_name, parse, help_text = PVVX_SETTINGS[name]
        try:
            value = parse(text, new)
        except ValueError as e:
            raise SettingsError(f"{key}={text}: {e} ({help_text})") from None
        if field_name == "encrypted" and new.version < 0x22:
            raise SettingsError(f"firmware {new.version_text} has no encrypted beacons")
        new = replace(new, **{field_name: value})
    clamped, notes = pv.clamp_config(new)
    # say what the user asked for ("interval=20s"), not the intermediate byte
    asked = {PVVX_SETTINGS[k.strip().lower()][0]: f"{k}={v}" for k, v in changes.items()}
    notes = [replace(n, requested=asked.get(n.field, n.requested)) for n in notes]
    return clamped, notes, limits


async def pvvx_set(
    address: str,
    changes: Mapping[str, str],
    *,
    radio: Any = None,
    transport: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Read-modify-write the pvvx config. Returns ``before``/``after`` configs (after = the device's echo),
    the firmware ``clamps``, and the comfort limits before/after when they were changed."""
    unknown = [k for k in changes if k.strip().lower() not in PVVX_SETTINGS]
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r}; known: {', '.join(PVVX_SETTINGS)}")
    async with _connected(address, radio, transport, timeout) as link:
        channel = await _pvvx(link)
        before = await channel.config()
        wanted, clamps, limits = apply_pvvx_settings(before, changes)
        after = await channel.set_config(wanted) if wanted != before else before
        result: dict[str, Any] = {"before": before, "after": after, "clamps": clamps}
        if limits is not None:
            result["comfort_before"] = await channel.comfort()
            result["comfort_after"] = await channel.comfort(limits)
        return result


async def pvvx_bindkey(
    address: str,
    key: str | None = None,
    *,
    new: bool = False,
    keystore: Any = None,
    radio: Any = None,
    transport: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Read the beacon bindkey (0x18), or set ``key`` / a fresh random one (``new=True``) and store it in
    the keystore with source ``"pvvx"``. Returns ``{"key", "changed", "encrypted", "stored"}``."""
    from ..keystore import KeystoreError, normalize_bindkey

    if key is not None and new:
        raise SettingsError("give a KEY or --new, not both")
    if key is not None:
        try:
            key = normalize_bindkey(key)
        except KeystoreError as e:
            raise SettingsError(str(e)) from None
        if len(key) != 32:
            raise SettingsError("the pvvx beacon bindkey is 16 bytes (32 hex digits)")
    elif new:
        key = secrets.token_bytes(16).hex()
    async with _connected(address, radio, transport, timeout) as link:
        channel = await _pvvx(link)
        cfg = await channel.config()
        reply = await channel.command(pv.bindkey_request(key))
        assert isinstance(reply, pv.BindkeyReply)
        if key is not None and reply.hex != key:
            raise SettingsError("the device did not take the new bindkey (it echoed another one)")
        address = link.address
    stored = False
    if key is not None:
        store = keystore
        if store is None:
            from ..keystore import Keystore

            store = Keystore()
        store.add(address, key, source="pvvx", overwrite=True, model=None)
        try:
            store.save()
        except OSError as e:
            raise SettingsError(f"the device has the new key, but the keystore could not be written: {e}") from None
        stored = True
    return {"key": reply.hex, "changed": key is not None, "encrypted": cfg.encrypted, "stored": stored}


async def verify_bindkey(
    address: str, key: str, *, radio: Any = None, transport: str | None = None, timeout: float = 60.0
) -> Any:
    """Listen to the device's adverts until the key doctor can judge ``key``; returns the Diagnosis."""
    from ..doctor import UNDECIDED, diagnose
    from ..framecache import FrameCache
    from ..mac import normalize_mac
    from ..sources.bleak_source import BleakSource

    mac = normalize_mac(address)
    cache = FrameCache()
    changed = asyncio.Event()

    def emit(adv: Any) -> None:
        cache.add_advertisement(adv)
        if adv.mac == mac:
            changed.set()

    source = BleakSource(bumble_radio=radio) if radio is not None else BleakSource(bumble_transport=transport)
    task = asyncio.create_task(source.run(emit))
    deadline = time.monotonic() + timeout
    try:
        while True:
            dx = diagnose(cache, mac, key, now=time.time())
            if dx.verdict not in UNDECIDED and (dx.ok or dx.frames.failed >= 2 or dx.verdict.value != "wrong_key"):
                return dx
            left = deadline - time.monotonic()
            if left <= 0 or task.done():
                return dx
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, 1.0))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def download_device_history(
    address: str,
    *,
    radio: Any = None,
    transport: str | None = None,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    reply_timeout: float = REPLY_TIMEOUT,
) -> list[HistoryRecord]:
    """Download the history stored on the device: stock hourly min/max records (ccb9/ccba/ccbc) or the
    pvvx log (0x35). ``progress(HistoryProgress)`` is called per record. Raises SettingsError."""
    async with _connected(address, radio, transport, timeout) as link:
        firmware = await detect_firmware(link)
        if firmware == "stock":
            return await StockSettings(link, reply_timeout).history(progress)
        if firmware == "atc1441":
            raise SettingsError("the atc1441 firmware keeps no history")
        return await (await _pvvx(link, reply_timeout)).history(progress)


async def download_with_progress(
    address: str,
    *,
    radio: Any = None,
    transport: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    console: Any = None,
) -> list[HistoryRecord]:
    """:func:`download_device_history` with a rich progress bar on stderr (for ``history --from-device``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"history from {address}", total=None)

        def on_progress(p: HistoryProgress) -> None:
            bar.update(task, completed=p.received, total=p.total)

        return await download_device_history(
            address, radio=radio, transport=transport, progress=on_progress, timeout=timeout
        )


# --- rendering ----------------------------------------------------------------------------------------------

_CONFIG_ROWS: tuple[tuple[str, Callable[[pv.PvvxConfig], Any]], ...] = (
    ("firmware", lambda c: f"{c.version_text} (layout {c.layout.name})"),
    ("hardware", lambda c: c.hw_name or "-"),
    ("advertising", lambda c: c.advertising_type),
    ("encrypted", lambda c: "on" if c.encrypted else "off"),
    ("interval", lambda c: f"{c.adv_interval_ms:g} ms"),
    ("measure", lambda c: f"×{c.measure_interval} = {c.measure_period_s:g} s"),
    ("tx", lambda c: f"0x{c.tx_power:02X}" + (f" ({c.tx_power_dbm:+.2f} dBm)" if c.tx_power_dbm is not None else "")),
    ("unit", lambda c: "F" if c.fahrenheit else "C"),
    ("comfort", lambda c: "on" if c.comfort_smiley else "off"),
    ("smiley", lambda c: c.smiley),
    ("battery", lambda c: "on" if c.show_battery else "off"),
    ("flags", lambda c: "on" if c.adv_flags else "off"),
    ("latency", lambda c: f"{c.connect_interval_ms} ms"),
    ("lcd", lambda c: f"{c.lcd_step_ms} ms"),
    ("averaging", lambda c: "-" if c.averaging is None else f"×{c.averaging} = {c.history_step_s:g} s"),
    ("lowpower", lambda c: "on" if c.lp_measures else "off"),
    ("bt5phy", lambda c: "on" if c.bt5phy else "off"),
    ("longrange", lambda c: "on" if c.longrange else "off"),
    ("adv delay", lambda c: "-" if c.adv_delay is None else c.adv_delay),
    ("beacons/event", lambda c: "-" if c.event_adv_cnt is None else c.event_adv_cnt),
    ("offsets", lambda c: "-" if c.temp_offset is None else f"{c.temp_offset:+.1f} °C, {c.humi_offset:+.1f} %"),
)


def _console() -> Any:
    from rich.console import Console

    return Console()


def _config_table(cfg: pv.PvvxConfig, title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("setting")
    table.add_column("value")
    for name, get in _CONFIG_ROWS:
        table.add_row(name, str(get(cfg)))
    return table


def _diff_table(before: pv.PvvxConfig, after: pv.PvvxConfig, title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("setting")
    table.add_column("before")
    table.add_column("after")
    for name, get in _CONFIG_ROWS:
        b, a = str(get(before)), str(get(after))
        table.add_row(name, b, f"[bold yellow]{a}[/]" if a != b else a)
    return table


# --- connection options (the same as `mitherm info` / `activate` / `flash`) ---------------------------------


@dataclass(frozen=True, slots=True)
class _Connection:
    """Where a command connects: ``--source``, ``--sim HOUSE``, ``--timeout`` (and the hidden ``--transport``,
    the old spelling of ``--source bumble:TRANSPORT``)."""

    source: str | None = None
    sim_house: str | None = None
    transport: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def run(self, work: Callable[[dict[str, Any]], Awaitable[Any]]) -> Any:
        """Run ``work(conn)`` with ``conn = {"radio", "transport", "timeout"}`` (keyword arguments of the
        async functions) on the chosen radio: a virtual house for ``--sim``, the Bumble transport of
        ``--source bumble:…``, else the local adapter. Errors as ClickException."""
        source = self.source
        if self.transport:
            if source:
                raise click.ClickException("give --source or --transport, not both")
            source = f"bumble:{self.transport}"
        if self.sim_house and source:
            flag = "--transport" if self.transport else "--source"
            raise click.ClickException(f"give {flag} or --sim, not both")
        target = None if self.sim_house else _target(source)

        async def go() -> Any:
            if self.sim_house:
                async with sim_radio(self.sim_house) as radio:
                    return await work({"radio": radio, "transport": None, "timeout": self.timeout})
            return await work({"radio": None, "transport": target, "timeout": self.timeout})

        try:
            return asyncio.run(go())
        except DeviceCommandError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None


_CONNECTION_PARAMS = ("source", "sim_house", "transport", "timeout")


def _connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--source``, ``--sim HOUSE``, ``--timeout`` as on the device commands, plus the hidden ``--transport``."""
    f = click.option("--transport", hidden=True, help="Same as --source bumble:TRANSPORT (old spelling).")(f)
    return connection_options(f)


def _connection(params: Mapping[str, Any]) -> _Connection:
    return _Connection(**{k: params[k] for k in _CONNECTION_PARAMS})


def _pvvx_connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The connection options on a ``pvvx`` subcommand too (``mitherm pvvx MAC config --sim HOUSE``): the
    ones given there replace the group's."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        given = {k: kwargs.pop(k) for k in _CONNECTION_PARAMS}
        for name, value in given.items():
            if ctx.get_parameter_source(name) not in (None, click.ParameterSource.DEFAULT):
                ctx.obj["conn"] = replace(ctx.obj["conn"], **{name: value})
        return f(*args, **kwargs)

    return _connection_options(wrapper)


# --- click commands -----------------------------------------------------------------------------------------


@click.command("set")
@click.argument("mac")
@click.argument("setting")
@click.argument("values", nargs=-1)
@_connection_options
def set_(mac: str, setting: str, values: tuple[str, ...], **conn: Any) -> None:
    """Change a setting: `unit C|F`, `clock` (from the host clock, with time zone). On pvvx firmware
    KEY=VALUE settings of `mitherm pvvx MAC set` are accepted too."""
    name = setting.lower()
    connection = _connection(conn)
    console = _console()
    if name == "unit":
        if len(values) != 1:
            raise click.UsageError("usage: mitherm set MAC unit C|F")
        before, after = connection.run(lambda kw: set_unit(mac, values[0], **kw))
        console.print(f"unit: {before} -> {after}")
    elif name == "clock":
        result = connection.run(lambda kw: set_clock(mac, **kw))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(result["after"]))
        console.print(f"clock set ({result['firmware']}): device now reads {result['after']} ({when})")
    elif "=" in setting:
        changes = _parse_pairs((setting, *values))
        result = connection.run(lambda kw: pvvx_set(mac, changes, **kw))
        _print_set_result(console, mac, result)
    else:
        raise click.UsageError(f"unknown setting {setting!r}: use unit, clock, or KEY=VALUE on pvvx firmware")


@click.command("read")
@click.argument("mac")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_connection_options
def read(mac: str, as_json: bool, **conn: Any) -> None:
    """Read the live temperature, humidity and battery voltage over GATT."""
    live: LiveReading = _connection(conn).run(lambda kw: read_live(mac, **kw))
    if as_json:
        click.echo(json.dumps(live.to_json()))
        return
    volts = "-" if live.voltage_v is None else f"{live.voltage_v:.3f} V"
    _console().print(f"{live.temperature_c:.2f} °C  {live.humidity_pct:g} %  battery {volts}  ({live.firmware})")


class _PvvxGroup(click.Group):
    """Accepts the group's options after MAC (`mitherm pvvx MAC --sim HOUSE config`): click stops parsing a
    group's options at its first positional argument, so MAC is moved behind them first."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-"):
            mac, rest = args[0], list(args[1:])
            # a dry run of the parser on the rest (+ a stand-in for MAC) tells where the options end
            stand_in = "\0mac"
            opts, left, _ = self.make_parser(ctx).parse_args(args=[*rest, stand_in])
            if stand_in not in left and opts.get("mac") != stand_in:
                # an option without its value took the stand-in: let click say so
                self.make_parser(ctx).parse_args(args=list(rest))
            n_options = len(rest) - len(left)
            args = [*rest[:n_options], mac, *rest[n_options:]]
        return super().parse_args(ctx, args)


@click.group("pvvx", cls=_PvvxGroup)
@click.argument("mac")
@_connection_options
@click.pass_context
def pvvx(ctx: click.Context, mac: str, **conn: Any) -> None:
    """Configure a device running the pvvx custom firmware. The connection options (--source, --sim,
    --timeout) go before or after the subcommand: `mitherm pvvx MAC --sim HOUSE config`."""
    ctx.obj = {"mac": mac, "conn": _connection(conn)}


def _run(ctx: click.Context, work: Callable[[dict[str, Any]], Awaitable[Any]]) -> Any:
    connection: _Connection = ctx.obj["conn"]
    return connection.run(work)


@pvvx.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_pvvx_connection_options
@click.pass_context
def pvvx_config_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show the device config."""
    cfg: pv.PvvxConfig = _run(ctx, lambda kw: pvvx_config(ctx.obj["mac"], **kw))
    if as_json:
        click.echo(json.dumps(cfg.to_json()))
    else:
        _console().print(_config_table(cfg, f"{ctx.obj['mac']} config"))


def _parse_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    changes: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise click.UsageError(f"{pair!r}: settings are KEY=VALUE ({', '.join(PVVX_SETTINGS)})")
        changes[key.strip().lower()] = value
    return changes


def _print_set_result(console: Any, mac: str, result: dict[str, Any]) -> None:
    console.print(_diff_table(result["before"], result["after"], f"{mac} config"))
    for clamp in result["clamps"]:
        console.print(f"[yellow]adjusted as the firmware does:[/] {clamp}")
    if "comfort_after" in result:
        b, a = result["comfort_before"], result["comfort_after"]
        console.print(
            f"comfort limits: {b.t_lo:g}-{b.t_hi:g} °C, {b.h_lo:g}-{b.h_hi:g} % -> "
            f"{a.t_lo:g}-{a.t_hi:g} °C, {a.h_lo:g}-{a.h_hi:g} %"
        )
    if result["before"].bt5phy != result["after"].bt5phy or result["before"].longrange != result["after"].longrange:
        console.print("the PHY change takes effect when the device reboots (it does so on disconnect)")


@pvvx.command("set", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("settings", nargs=-1, required=True)
@_pvvx_connection_options
@click.pass_context
def pvvx_set_cmd(ctx: click.Context, settings: tuple[str, ...]) -> None:
    """Change settings, KEY=VALUE: advertising=bthome|pvvx|atc1441|mi, interval=2500ms, measure=4|10s,
    tx=0xA9, unit=C|F, encrypted=on|off, comfort=on|off|21-26/30-60, smiley, battery, flags, latency,
    lcd, averaging, lowpower, longrange, bt5phy."""
    changes = _parse_pairs(settings)
    result = _run(ctx, lambda kw: pvvx_set(ctx.obj["mac"], changes, **kw))
    _print_set_result(_console(), ctx.obj["mac"], result)


@pvvx.command("bindkey")
@click.argument("key", required=False)
@click.option("--new", "new", is_flag=True, help="Generate a new random key.")
@click.option("--show-key", is_flag=True, help="Print the key in full (it is a secret).")
@click.option("--no-verify", is_flag=True, help="Do not wait for an advert to check the key.")
@click.option("--verify-timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for an advert.")
@_keystore_option
@_pvvx_connection_options
@click.pass_context
def pvvx_bindkey_cmd(
    ctx: click.Context,
    key: str | None,
    new: bool,
    show_key: bool,
    no_verify: bool,
    verify_timeout: float,
    keystore_path: Path | None,
) -> None:
    """Show the beacon bindkey, or set KEY / a --new one, store it in the keystore and check it on the next advert."""
    from ..keystore import Keystore, KeystoreError, mask_key

    mac = ctx.obj["mac"]
    try:
        store = Keystore(keystore_path) if key is not None or new else None
    except KeystoreError as e:
        raise click.ClickException(str(e)) from None
    console = _console()

    async def work(kw: dict[str, Any]) -> Any:
        # one connection context for both steps: with --sim the check listens on the same virtual house
        result = await pvvx_bindkey(mac, key, new=new, keystore=store, **kw)
        shown = result["key"] if show_key else mask_key(result["key"])
        if not result["changed"]:
            console.print(f"beacon bindkey: {shown if result['key'] else 'none stored'}")
            return None
        console.print(f"beacon bindkey set to {shown} and stored in the keystore (source pvvx)")
        if not result["encrypted"]:
            console.print(f"encrypted beacons are off: turn them on with `mitherm pvvx {mac} set encrypted=on`")
            return None
        if no_verify:
            return None
        return await verify_bindkey(
            mac, result["key"], radio=kw["radio"], transport=kw["transport"], timeout=verify_timeout
        )

    dx = _run(ctx, work)
    if dx is None:
        return
    console.print(f"check on the next advert: {dx.verdict.value}" + ("" if dx.ok else f" — {dx.advice}"))
    if not dx.ok and dx.verdict.value not in ("device_not_seen", "no_encrypted_frames"):
        raise click.ClickException("the new key does not decrypt the device's adverts")


@pvvx.command("time")
@_pvvx_connection_options
@click.pass_context
def pvvx_time_cmd(ctx: click.Context) -> None:
    """Set the device clock to the host's local time (as the official tools do)."""
    result = _run(ctx, lambda kw: pvvx_time(ctx.obj["mac"], **kw))
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(result["after"]))
    _console().print(f"device time {result['before']} -> {result['after']} ({when} local)")


@pvvx.command("reboot")
@_pvvx_connection_options
@click.pass_context
def pvvx_reboot_cmd(ctx: click.Context) -> None:
    """Reboot the device (it restarts when mitherm disconnects)."""
    _run(ctx, lambda kw: pvvx_reboot(ctx.obj["mac"], **kw))
    _console().print("the device reboots now (on disconnect)")

"""Talking to one thermometer over GATT: what it is (:func:`identify`) and a thin driver that runs a
sans-IO protocol machine over a :class:`~mitherm.gatt.link.GattLink` (:func:`run_protocol`).

Identification (firmware.md §1.1, §1.6, §2.6; keys.md §1.8, §4.1):

* pvvx firmware: Device Information firmware revision ``github.com/pvvx``, software ``V5.8``; its
  0x1F10 service answers a read of 0x1F1F with ``55 VERSION cfg…``;
* atc1441 firmware: the 0x1F10 service without pvvx's DIS strings or ``55`` reply;
* stock firmware: the Mi auth characteristics (0xFE95: 0x0010, 0x0019) and no 0x1F10; the firmware
  revision (``1.0.0_0130``, ``2.1.1_0159`` …) decides between activation and login.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .protocols.miauth import CONTROL_UUID, DATA_UUID, FINAL_EVENTS, Event, Failed, Write
from .protocols.pvvx import HW_IDS  # the one hardware-id table (firmware.md §3.4)

if TYPE_CHECKING:
    from .gatt.link import GattLink

log = logging.getLogger(__name__)

__all__ = [
    "REFUSES_ACTIVATION",
    "DeviceIdentity",
    "FirmwareKind",
    "identify",
    "parse_pvvx_config",
    "run_protocol",
]

FirmwareKind = Literal["stock", "pvvx", "atc1441", "unknown"]

_BASE = "-0000-1000-8000-00805f9b34fb"
DIS_SERVICE = "0000180a" + _BASE
PVVX_SERVICE = "00001f10" + _BASE
PVVX_CHAR = "00001f1f" + _BASE
#: Device Information characteristics read by identify()
DIS_FIELDS: dict[str, str] = {
    "model": "00002a24" + _BASE,
    "firmware": "00002a26" + _BASE,
    "hardware": "00002a27" + _BASE,
    "software": "00002a28" + _BASE,
    "manufacturer": "00002a29" + _BASE,
}
PVVX_FIRMWARE_STRING = "github.com/pvvx"
#: stock firmware that refuses a new registration and accepts login only (keys.md §1.8, firmware.md §2.5)
REFUSES_ACTIVATION: dict[str, str] = {
    "2.1.1_0159": "LYWSD03MMC stock 2.1.1_0159",
    "2.1.1_0009": "MJWSD06MMC stock 2.1.1_0009",
}
#: pvvx config byte 0 bits 0-1 (firmware.md §1.4), named as the decoder names the formats
PVVX_ADV_FORMATS = ("atc1441", "pvvx", "mibeacon_v5", "bthome_v2")


@dataclass(slots=True)
class DeviceIdentity:
    address: str
    firmware_kind: FirmwareKind
    model: str | None = None
    firmware: str | None = None
    hardware: str | None = None
    software: str | None = None
    manufacturer: str | None = None
    has_mi_auth: bool = False
    #: stock: whether a BLE activation is possible (None: not stock)
    accepts_activation: bool | None = None
    pvvx_version: str | None = None  # "5.8"
    hw_id: int | None = None  # pvvx hardware id (config byte 9, v4.8+)
    advertising_format: str | None = None
    notes: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    @property
    def hw_name(self) -> str | None:
        return None if self.hw_id is None else HW_IDS.get(self.hw_id, f"id {self.hw_id}")

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "firmware_kind": self.firmware_kind,
            "model": self.model,
            "firmware": self.firmware,
            "hardware": self.hardware,
            "software": self.software,
            "manufacturer": self.manufacturer,
            "has_mi_auth": self.has_mi_auth,
            "accepts_activation": self.accepts_activation,
            "pvvx_version": self.pvvx_version,
            "hw_id": self.hw_id,
            "hw_name": self.hw_name,
            "advertising_format": self.advertising_format,
            "notes": list(self.notes),
            "next_steps": list(self.next_steps),
        }


@dataclass(frozen=True, slots=True)
class PvvxConfig:
    """The part of the 0x1F1F ``55`` reply identify() needs (full decoding lives with the pvvx commands)."""

    version: int
    hw_id: int | None
    advertising_format: str | None

    @property
    def version_text(self) -> str:
        return f"{self.version >> 4}.{self.version & 0x0F}"


def parse_pvvx_config(data: bytes) -> PvvxConfig | None:
    """``55 VERSION cfg…`` (firmware.md §1.4) → version, HW id, advertising format; None if not that."""
    if len(data) < 2 or data[0] != 0x55:
        return None
    version, cfg = data[1], data[2:]
    hw_id: int | None = None
    if len(cfg) > 9:
        if version >= 0x48:  # v4.8+: a full byte
            hw_id = cfg[9]
        elif version >= 0x36 and cfg[9] & 0x0F != 0x0F:  # v3.6-4.7: low nibble, 15 = "extended"
            hw_id = cfg[9] & 0x0F
    fmt: str | None = None
    if len(cfg) >= 2:
        fmt = PVVX_ADV_FORMATS[cfg[0] & 0x03] + ("_enc" if cfg[1] & 0x08 else "")
    return PvvxConfig(version, hw_id, fmt)


def _text(raw: bytes) -> str | None:
    text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
    return text or None


async def identify(link: GattLink) -> DeviceIdentity:
    """Read Device Information (and pvvx's 0x1F1F) and say which firmware runs and what to do next."""
    from .gatt.link import GattError

    ident = DeviceIdentity(address=link.address, firmware_kind="unknown")
    for name, uuid in DIS_FIELDS.items():
        if link.has_characteristic(uuid):
            try:
                setattr(ident, name, _text(await link.read(uuid)))
            except GattError as e:
                ident.notes.append(f"cannot read {name} revision: {e}")
    ident.has_mi_auth = link.has_characteristic(CONTROL_UUID) and link.has_characteristic(DATA_UUID)
    has_1f10 = PVVX_SERVICE in link.services() or link.has_characteristic(PVVX_CHAR)
    config: PvvxConfig | None = None
    if has_1f10 and link.has_characteristic(PVVX_CHAR):
        try:
            config = parse_pvvx_config(await link.read(PVVX_CHAR))
        except GattError as e:
            ident.notes.append(f"0x1F1F is not readable ({e}): a PIN code may be set (pvvx), pair first")

    if ident.firmware == PVVX_FIRMWARE_STRING or config is not None:
        ident.firmware_kind = "pvvx"
    elif has_1f10:
        ident.firmware_kind = "atc1441"
    elif ident.has_mi_auth:
        ident.firmware_kind = "stock"

    if ident.firmware_kind == "pvvx":
        if config is not None:
            ident.pvvx_version = config.version_text
            ident.hw_id = config.hw_id
            ident.advertising_format = config.advertising_format
        elif ident.software and ident.software.upper().startswith("V"):
            ident.pvvx_version = ident.software[1:]
    elif ident.firmware_kind == "stock":
        ident.accepts_activation = (ident.firmware or "") not in REFUSES_ACTIVATION
    ident.next_steps = next_steps(ident)
    return ident


def next_steps(ident: DeviceIdentity) -> list[str]:
    mac = ident.address
    if ident.firmware_kind == "stock":
        if not ident.accepts_activation:
            which = REFUSES_ACTIVATION.get(ident.firmware or "", f"stock {ident.firmware}")
            return [
                f"{which} refuses BLE activation: keep the device in Xiaomi Home and fetch its token and bindkey "
                "from the cloud: `mitherm cloud keys`",
                f"then prove the token with `mitherm login {mac}` (stock firmware needs it before flashing)",
            ]
        return [
            f"`mitherm activate {mac}` makes mitherm the owner and stores a new bindkey (Xiaomi Home then no "
            "longer accepts the device until it is removed and re-added there)",
            "or keep Xiaomi Home as the owner and fetch the key from the cloud: `mitherm cloud keys`",
            f"with a stored token, `mitherm login {mac}` checks that it is still valid",
        ]
    if ident.firmware_kind == "pvvx":
        steps = [f"`mitherm pvvx … {mac}` reads and changes the settings (no Mi key is involved)"]
        if ident.advertising_format and ident.advertising_format.endswith("_enc"):
            steps.append("encrypted beacons use pvvx's own bindkey (command 0x18), not a Mi key")
        return steps
    if ident.firmware_kind == "atc1441":
        return [
            "atc1441 firmware takes single-byte commands on 0x1F1F and sends no replies; "
            "flashing pvvx firmware gives readable settings (`mitherm flash`)",
        ]
    return ["no Mi auth, pvvx or atc1441 service found: this is not a supported thermometer firmware"]


# --- the driver --------------------------------------------------------------------------------------


async def run_protocol(
    link: GattLink,
    machine: Any,
    *,
    on_event: Callable[[Event], None] | None = None,
    step_timeout: float | None = None,
) -> Event:
    """Drive a sans-IO Mi auth machine over ``link``: subscribe to 0x0010 and 0x0019 first, perform its
    writes in order, feed it the notifications, tell it about timeouts (``machine.timeout_s`` per step
    unless ``step_timeout``) and a dropped link. Returns the final event (Registered, LoggedIn or
    Failed); every event, Progress included, also goes to ``on_event``."""
    from .gatt.link import GattError

    queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
    link.on_disconnect(lambda: queue.put_nowait(None))
    subscribed: list[str] = []
    try:
        for uuid in (CONTROL_UUID, DATA_UUID):
            await link.subscribe(uuid, lambda data, uuid=uuid: queue.put_nowait((uuid, data)))
            subscribed.append(uuid)
    except GattError as e:
        return _failed(machine, link, e, on_event)

    timeout = step_timeout if step_timeout is not None else machine.timeout_s
    outputs = machine.start()
    try:
        while True:
            for out in outputs:
                if isinstance(out, Write):
                    try:
                        await link.write(out.char_uuid, out.data, response=True)
                    except GattError as e:
                        return _failed(machine, link, e, on_event)
                    continue
                if on_event is not None:
                    on_event(out)
                if isinstance(out, FINAL_EVENTS):
                    return out
            if machine.done:
                return machine.result or Failed("protocol_error", "the protocol ended without a result")
            try:
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                outputs = machine.timeout()
                continue
            outputs = machine.disconnected() if item is None else machine.receive(*item)
    finally:
        if link.is_connected:
            for uuid in subscribed:
                with contextlib.suppress(GattError):
                    await link.unsubscribe(uuid)


def _failed(machine: Any, link: GattLink, error: Exception, on_event: Callable[[Event], None] | None) -> Event:
    if not link.is_connected:
        events = machine.disconnected() if machine.result is None else []
        final = next((e for e in events if isinstance(e, Failed)), None)
    else:
        final = None
    if final is None:
        final = Failed("gatt_error", f"GATT operation failed: {error}")
    if on_event is not None:
        on_event(final)
    return final

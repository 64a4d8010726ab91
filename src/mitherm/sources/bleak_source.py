"""The local adapter (or a Bumble-driven dongle / the virtual radio) through bleak's BleakScanner."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from ..model import Advertisement
from ..uuids import BASE_SUFFIX, KNOWN
from . import Emit, SourceError

log = logging.getLogger(__name__)

_UUID16: dict[str, int | None] = {}


def uuid16_of(uuid: str) -> int | None:
    """0xFE95 for '0000fe95-0000-1000-8000-00805f9b34fb'; None for a non-base 128-bit UUID."""
    v = _UUID16.get(uuid)
    if v is None and uuid not in _UUID16:
        u = uuid.lower()
        v = int(u[4:8], 16) if len(u) == 36 and u.startswith("0000") and u.endswith(BASE_SUFFIX) else None
        _UUID16[uuid] = v
    return v


def advertisement_from_bleak(device: Any, adv: Any, source: str) -> Advertisement:
    service_data = {}
    for uuid, data in adv.service_data.items():
        u16 = uuid16_of(uuid)
        if u16 is not None:
            service_data[u16] = bytes(data)
    details = getattr(device, "details", None)
    address_type = None
    if isinstance(details, dict):
        props = details.get("props") or {}
        address_type = props.get("AddressType") or details.get("address_type")
    return Advertisement(
        mac=device.address.upper(),
        time=time.time(),
        service_data=service_data,
        rssi=adv.rssi,
        name=adv.local_name,
        address_type=address_type,
        manufacturer_data={k: bytes(v) for k, v in adv.manufacturer_data.items()},
        source=source,
    )


def _or_patterns() -> list[Any]:
    from bleak.args.bluez import OrPattern
    from bleak.assigned_numbers import AdvertisementDataType

    # One pattern per service-data UUID at the start of an AD 0x16 structure: matching on FLAGS would miss
    # adverts without (or with other) flags — habluetooth #615.
    return [OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, u.to_bytes(2, "little")) for u in KNOWN]


class BleakSource:
    """Continuous scanning; restarts the scanner with a visible error when it dies."""

    def __init__(
        self,
        adapter: str | None = None,
        *,
        passive: bool = False,
        bumble_transport: str | None = None,
        bumble_radio: Any = None,
        name: str | None = None,
        restart_delay: float = 5.0,
        silence: float = 120.0,
    ) -> None:
        self.silence = silence
        self.adapter = adapter
        self.passive = passive
        self.bumble_transport = bumble_transport
        self.bumble_radio = bumble_radio
        self.restart_delay = restart_delay
        if name:
            self.name = name
        elif bumble_radio is not None:
            self.name = "sim"
        elif bumble_transport:
            self.name = f"bumble:{bumble_transport}"
        else:
            self.name = adapter or "local"

    def _scanner_kwargs(self, passive: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.bumble_radio is not None or self.bumble_transport:
            from ..radio.bleak_backend import BumbleScanner

            kwargs["backend"] = BumbleScanner
            if self.bumble_radio is not None:
                kwargs["bumble_radio"] = self.bumble_radio
            else:
                kwargs["bumble_transport"] = self.bumble_transport
            kwargs["scanning_mode"] = "passive" if passive else "active"
            return kwargs
        bluez: dict[str, Any] = {}
        if self.adapter:
            bluez["adapter"] = self.adapter
        if passive and sys.platform.startswith("linux"):
            bluez["or_patterns"] = _or_patterns()
            kwargs["scanning_mode"] = "passive"
        if bluez:
            kwargs["bluez"] = bluez
        return kwargs

    async def run(self, emit: Emit) -> None:
        from bleak import BleakScanner
        from bleak.exc import BleakError

        name = self.name

        last = [0.0]

        def callback(device: Any, adv: Any) -> None:
            last[0] = time.monotonic()
            emit(advertisement_from_bleak(device, adv, name))

        passive = self.passive
        failures = 0
        while True:
            try:
                scanner = BleakScanner(callback, **self._scanner_kwargs(passive))
                await scanner.start()
            except (BleakError, OSError, ValueError) as e:
                if passive:
                    log.warning(
                        "passive scanning is not available (%s); falling back to active scanning. "
                        "Passive scanning needs BlueZ >= 5.56 started with --experimental.",
                        e,
                    )
                    passive = False
                    continue
                if failures == 0 and _no_adapter(e):
                    raise SourceError(
                        f"no Bluetooth adapter could be used ({e}). On a machine without Bluetooth, try "
                        "`mitherm demo` to see mitherm work with virtual sensors."
                    ) from e
                failures += 1
                log.error("scanner on %s failed to start: %s; retrying in %.0f s", name, e, self.restart_delay)
                await asyncio.sleep(self.restart_delay)
                continue
            failures = 0
            started = time.monotonic()
            try:
                # Watchdog: a scanner that heard adverts and then nothing for `silence` seconds has died
                # (adapter reset, BlueZ restart); restart it instead of waiting forever.
                while True:
                    await asyncio.sleep(min(self.silence, 30))
                    quiet_since = max(last[0], started)
                    if last[0] and time.monotonic() - quiet_since > self.silence:
                        log.error("scanner on %s heard nothing for %.0f s: restarting it", name, self.silence)
                        break
            finally:
                try:
                    await scanner.stop()
                except Exception as e:
                    log.debug("scanner stop failed: %s", e)


def _no_adapter(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("no bluetooth adapters", "not found", "dbus", "no such file", "org.bluez"))

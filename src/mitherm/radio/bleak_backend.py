"""A bleak scanner backend running the Bumble host stack, so that mitherm scans through bleak's
``BleakScanner`` whether the radio is a real controller (a USB dongle, a serial HCI board, a remote
HCI over TCP) or the :class:`~mitherm.radio.virtual.VirtualRadio` used by the simulator and tests.

bleak (>= 0.18) accepts a custom backend class: ``BleakScanner(..., backend=BumbleScanner, **kwargs)``
instantiates ``BumbleScanner(detection_callback, service_uuids, scanning_mode, bluez=..., cb=...,
**kwargs)``, so the Bumble specific keyword arguments below go straight through ``BleakScanner``::

    async with BleakScanner(callback, backend=BumbleScanner, bumble_transport="usb:0"):
        ...
    async with BleakScanner(callback, backend=BumbleScanner, bumble_radio=radio):
        ...

Keyword arguments (exactly one of the first two):

``bumble_transport``
    A Bumble transport name, opened with :func:`bumble.transport.open_transport` on every
    ``start()`` and closed on ``stop()``: ``"usb:0"``, ``"usb:2fe3:000b"``, ``"serial:/dev/ttyUSB0"``,
    ``"tcp-client:127.0.0.1:1234"``, ``"hci-socket:0"``... An already open Bumble ``Transport`` object
    is accepted too; it is then left open on ``stop()`` (its owner closes it).
``bumble_radio``
    A started :class:`~mitherm.radio.virtual.VirtualRadio`; each ``start()`` attaches a new scanning
    controller to its link and ``stop()`` removes it.
``bumble_address``
    Optional random static address of the scanning host (a fresh one is generated otherwise).

What callbacks receive:

* every advertising report (duplicate filtering is off), merged with its scan response in active
  mode, as bleak's ``AdvertisementData``: ``service_data`` keys are 128-bit UUID strings,
  ``manufacturer_data`` keys are company ids, ``local_name`` is the complete (else shortened) name,
  ``tx_power`` comes from the TX Power Level AD field, ``rssi`` from the controller;
* ``service_uuids`` lists the advertised service UUIDs followed by the UUIDs of service data fields
  (this is what BlueZ reports on Linux, so filters written for BlueZ behave the same);
* the ``service_uuids`` filter keeps adverts with any of the given UUIDs in that list;
* ``BLEDevice.address`` is ``AA:BB:CC:DD:EE:FF``; ``BLEDevice.details`` and
  ``AdvertisementData.platform_data[0]`` are the Bumble ``Advertisement`` (address type, connectable
  flag, raw report); ``BLEDevice.name`` keeps the last name seen for the address.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any, Literal

from bleak import BleakScanner
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.exc import BleakError
from bleak.uuids import normalize_uuid_16, normalize_uuid_32
from bumble import hci
from bumble.core import AdvertisingData
from bumble.device import Advertisement, Device
from bumble.host import Host
from bumble.transport import open_transport
from bumble.transport.common import Transport

from mitherm.radio.virtual import VirtualRadio

logger = logging.getLogger(__name__)

ScanningMode = Literal["active", "passive"]

_T = AdvertisingData.Type
_UUID_LISTS = {
    _T.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS: 2,
    _T.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS: 2,
    _T.INCOMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS: 4,
    _T.COMPLETE_LIST_OF_32_BIT_SERVICE_CLASS_UUIDS: 4,
    _T.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS: 16,
    _T.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS: 16,
}
_SERVICE_DATA = {
    _T.SERVICE_DATA_16_BIT_UUID: 2,
    _T.SERVICE_DATA_32_BIT_UUID: 4,
    _T.SERVICE_DATA_128_BIT_UUID: 16,
}


def _uuid_str(raw: bytes) -> str:
    """A little-endian UUID field of 2, 4 or 16 bytes as a lower-case 128-bit UUID string."""
    if len(raw) == 2:
        return normalize_uuid_16(int.from_bytes(raw, "little"))
    if len(raw) == 4:
        return normalize_uuid_32(int.from_bytes(raw, "little"))
    return str(uuid.UUID(bytes=bytes(reversed(raw))))


def advertisement_data_from_ad(
    ad_structures: Iterable[tuple[int, bytes]], rssi: int, platform_data: tuple[Any, ...] = ()
) -> AdvertisementData:
    """Build bleak's ``AdvertisementData`` from AD structures (type, value). Malformed fields are skipped."""
    complete_name: str | None = None
    short_name: str | None = None
    manufacturer_data: dict[int, bytes] = {}
    service_data: dict[str, bytes] = {}
    service_uuids: list[str] = []
    tx_power: int | None = None

    def add_uuid(value: str) -> None:
        if value not in service_uuids:
            service_uuids.append(value)

    data_uuids: list[str] = []
    for ad_type, value in ad_structures:
        value = bytes(value)
        if ad_type == _T.COMPLETE_LOCAL_NAME:
            complete_name = value.decode("utf-8", errors="replace")
        elif ad_type == _T.SHORTENED_LOCAL_NAME:
            short_name = value.decode("utf-8", errors="replace")
        elif ad_type == _T.MANUFACTURER_SPECIFIC_DATA:
            if len(value) >= 2:
                manufacturer_data[int.from_bytes(value[:2], "little")] = value[2:]
        elif ad_type == _T.TX_POWER_LEVEL:
            if len(value) == 1:
                tx_power = int.from_bytes(value, "little", signed=True)
        elif ad_type in _SERVICE_DATA:
            size = _SERVICE_DATA[ad_type]
            if len(value) >= size:
                key = _uuid_str(value[:size])
                service_data[key] = value[size:]
                data_uuids.append(key)
        elif ad_type in _UUID_LISTS:
            size = _UUID_LISTS[ad_type]
            for i in range(0, len(value) - size + 1, size):
                add_uuid(_uuid_str(value[i : i + size]))
    for key in data_uuids:
        add_uuid(key)

    return AdvertisementData(
        local_name=complete_name if complete_name is not None else short_name,
        manufacturer_data=manufacturer_data,
        service_data=service_data,
        service_uuids=service_uuids,
        tx_power=tx_power,
        rssi=rssi,
        platform_data=platform_data,
    )


async def open_bumble_transport(radio: VirtualRadio | None, spec: str | Transport | None) -> tuple[Transport, bool]:
    """Open the HCI transport for ``bumble_radio=`` (*radio*) or ``bumble_transport=`` (*spec*).

    Returns the transport and whether the caller owns it (and so must close it): a new controller
    on a started ``VirtualRadio`` or a transport opened from a name is owned, an already open
    ``Transport`` object is not. Failures are raised as ``BleakError``.
    """
    if radio is not None:
        if not radio.running:
            raise BleakError("the VirtualRadio is not started")
        return radio.open_hci_transport(), True
    if isinstance(spec, Transport):
        return spec, False
    assert isinstance(spec, str)
    try:
        transport = await open_transport(spec)
    except Exception as exc:
        raise BleakError(f"cannot open Bumble transport {spec!r}: {exc}") from exc
    return transport, True


class BumbleScanner(BaseBleakScanner):
    """bleak scanner backend over a Bumble host stack. See the module documentation."""

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: ScanningMode = "active",
        *,
        bumble_transport: str | Transport | None = None,
        bumble_radio: VirtualRadio | None = None,
        bumble_address: str | None = None,
        **kwargs: Any,  # bluez=, cb= and other backends' arguments: ignored
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        if scanning_mode not in ("active", "passive"):
            raise BleakError(f"invalid scanning_mode {scanning_mode!r}, expected 'active' or 'passive'")
        if (bumble_transport is None) == (bumble_radio is None):
            raise BleakError("BumbleScanner needs exactly one of bumble_transport= or bumble_radio=")
        self._scanning_mode: ScanningMode = scanning_mode
        self._transport_spec = bumble_transport
        self._radio = bumble_radio
        self._host_address = (
            hci.Address(bumble_address.upper(), hci.Address.RANDOM_DEVICE_ADDRESS) if bumble_address else None
        )
        self._transport: Transport | None = None
        self._owns_transport = False
        self._device: Device | None = None

    @property
    def device(self) -> Device | None:
        """The Bumble host ``Device`` while scanning (None otherwise)."""
        return self._device

    @property
    def is_scanning(self) -> bool:
        return self._device is not None

    async def _open_transport(self) -> Transport:
        transport, self._owns_transport = await open_bumble_transport(self._radio, self._transport_spec)
        return transport

    async def start(self) -> None:
        if self._device is not None:
            raise BleakError("scanner already started")
        self.seen_devices = {}
        transport = await self._open_transport()
        self._transport = transport
        try:
            device = Device(
                name="mitherm",
                address=self._host_address,
                host=Host(transport.source, transport.sink),
            )
            await device.power_on()
            device.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
            self._device = device
            await device.start_scanning(active=self._scanning_mode == "active", filter_duplicates=False)
        except BaseException:
            self._device = None
            await self._close_transport()
            raise

    async def stop(self) -> None:
        device, self._device = self._device, None
        if device is None:
            return
        device.remove_listener(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
        try:
            if device.is_scanning:
                await device.stop_scanning()
            await device.power_off()
        except Exception as exc:  # a vanished USB dongle or TCP peer must not prevent cleanup
            logger.warning("bumble scanner: error while stopping: %s", exc)
        finally:
            await self._close_transport()

    async def _close_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None and self._owns_transport:
            await transport.close()

    def _on_advertisement(self, advertisement: Advertisement) -> None:
        address = advertisement.address.to_string(False)
        adv = advertisement_data_from_ad(
            advertisement.data.ad_structures, advertisement.rssi, platform_data=(advertisement,)
        )
        if not self.is_allowed_uuid(adv.service_uuids):
            return
        name = adv.local_name
        if name is None and address in self.seen_devices:
            name = self.seen_devices[address][0].name
        device = self.create_or_update_device(address, address, name, advertisement, adv)
        self.call_detection_callbacks(device, adv)


async def open_scanner(
    detection_callback: AdvertisementDataCallback,
    *,
    radio: VirtualRadio | None = None,
    transport: str | Transport | None = None,
    scanning_mode: ScanningMode = "active",
    service_uuids: list[str] | None = None,
) -> BleakScanner:
    """Create and start a ``BleakScanner`` on the Bumble backend (a ``VirtualRadio`` or a Bumble
    transport name such as ``"usb:0"``). The caller stops it (``await scanner.stop()``)."""
    scanner = BleakScanner(
        detection_callback,
        service_uuids,
        scanning_mode,
        backend=BumbleScanner,
        bumble_radio=radio,
        bumble_transport=transport,
    )
    await scanner.start()
    return scanner

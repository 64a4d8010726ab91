"""A bleak client backend running the Bumble host stack, the GATT counterpart of
:class:`mitherm.radio.bleak_backend.BumbleScanner`.

With it, mitherm's GATT code uses bleak's ``BleakClient`` for every radio: the platform backend for
the system adapter, and this backend for a simulated device on a
:class:`~mitherm.radio.virtual.VirtualRadio` or a controller driven by Bumble (USB dongle, serial
HCI board, HCI over TCP)::

    async with BleakClient(address, backend=BumbleClient, bumble_radio=radio) as client:
        data = await client.read_gatt_char("00002a26-0000-1000-8000-00805f9b34fb")

    BleakClient(address, backend=BumbleClient, bumble_transport="usb:0")

``BleakClient`` passes its extra keyword arguments to the backend. Keyword arguments (exactly one of
the first two):

``bumble_radio``
    A started ``VirtualRadio``. Each ``connect()`` attaches a new central controller to the link,
    and ``disconnect()`` removes it.
``bumble_transport``
    A Bumble transport name (``"usb:0"``, ``"serial:/dev/ttyUSB0"``, ``"tcp-client:HOST:PORT"``...),
    opened on ``connect()`` and closed on ``disconnect()``. Only one process can use a dongle at a time,
    so the controller cannot scan (``BumbleScanner``) and connect at once from two processes.
``bumble_address_type``
    ``"public"`` or ``"random"``: the peer's address type. If it is not given and the peer was not
    given as a ``BLEDevice`` from ``BumbleScanner``, ``connect()`` first scans for the peer's
    advertisement (within the connect timeout) and takes the address type from it. If nothing is
    seen, ``connect()`` raises ``BleakDeviceNotFoundError``.
``bumble_mtu``
    If set, the ATT MTU is exchanged right after connecting. Otherwise ``mtu_size`` is 23, the default.
``bumble_address``
    Optional random static address of the central (a fresh one for every connection otherwise).

Behaviour:

* ``connect()`` discovers all services, characteristics and descriptors, as the other backends do.
* The disconnected callback runs on every disconnection, including one requested with
  ``disconnect()``. That is also what BlueZ does.
* Notifications are delivered in order and synchronously, as they arrive.
* ``pair()`` and ``unpair()`` raise ``NotImplementedError``: Xiaomi thermometers use no BLE pairing
  (Mi auth is application-level).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from bleak.backends.characteristic import BleakGATTCharacteristic, GattCharacteristicsFlags
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bleak.uuids import normalize_uuid_str
from bumble import att, core, hci
from bumble.core import PhysicalTransport
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt_client import CharacteristicProxy, DescriptorProxy
from bumble.host import Host
from bumble.transport.common import Transport

from mitherm.radio.bleak_backend import open_bumble_transport
from mitherm.radio.virtual import VirtualRadio

logger = logging.getLogger(__name__)

AddressType = Literal["public", "random"]

#: ATT MTU before any exchange (Core spec Vol 3 Part F 3.2.8).
DEFAULT_ATT_MTU = 23


def _uuid_str(uuid: core.UUID) -> str:
    return normalize_uuid_str(uuid.to_hex_str("-"))


def _properties(flags: int) -> list[Any]:
    return [flag.name.replace("_", "-") for flag in GattCharacteristicsFlags if flags & flag.value]


class BumbleClient(BaseBleakClient):
    """bleak client backend over a Bumble host stack. See the module documentation."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 10.0,
        services: set[str] | None = None,
        bumble_radio: VirtualRadio | None = None,
        bumble_transport: str | Transport | None = None,
        bumble_address_type: AddressType | None = None,
        bumble_mtu: int | None = None,
        bumble_address: str | None = None,
        **kwargs: Any,  # bluez=, winrt= and other backends' arguments: ignored
    ) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout)
        if (bumble_transport is None) == (bumble_radio is None):
            raise BleakError("BumbleClient needs exactly one of bumble_transport= or bumble_radio=")
        if bumble_address_type not in (None, "public", "random"):
            raise BleakError(f"bumble_address_type must be 'public' or 'random', not {bumble_address_type!r}")
        self.address = self.address.upper()
        self._radio = bumble_radio
        self._transport_spec = bumble_transport
        self._address_type: AddressType | None = bumble_address_type
        if self._address_type is None and isinstance(address_or_ble_device, BLEDevice):
            details = address_or_ble_device.details
            if isinstance(details, Advertisement):
                self._address_type = "public" if details.address.is_public else "random"
        self._requested_mtu = bumble_mtu
        self._host_address = (
            hci.Address(bumble_address.upper(), hci.Address.RANDOM_DEVICE_ADDRESS) if bumble_address else None
        )
        self._service_filter = services
        self._transport: Transport | None = None
        self._owns_transport = False
        self._device: Device | None = None
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._name: str | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}
        self._cleanup_task: asyncio.Task[None] | None = None

    # -- properties ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name or self.address.replace(":", "-")

    @property
    def mtu_size(self) -> int:
        peer = self._peer
        return peer.gatt_client.mtu if peer is not None else DEFAULT_ATT_MTU

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    @property
    def device(self) -> Device | None:
        """The Bumble host ``Device`` while connected (None otherwise)."""
        return self._device

    # -- connection ----------------------------------------------------------------------------------
    async def _open_transport(self) -> Transport:
        transport, self._owns_transport = await open_bumble_transport(self._radio, self._transport_spec)
        return transport

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if pair:
            logger.info("bumble client: pairing before connecting is not supported, ignored")
        if self._connection is not None:
            return
        if self._cleanup_task is not None:
            await self._cleanup_task
        timeout = float(kwargs.get("timeout", self._timeout))
        deadline = time.monotonic() + timeout
        self._transport = await self._open_transport()
        try:
            device = Device(
                name="mitherm",
                address=self._host_address or hci.Address.generate_static_address(),
                host=Host(self._transport.source, self._transport.sink),
            )
            self._device = device
            await asyncio.wait_for(device.power_on(), max(0.1, deadline - time.monotonic()))
            address_type = self._address_type or await self._find_address_type(device, deadline)
            kind = hci.Address.PUBLIC_DEVICE_ADDRESS if address_type == "public" else hci.Address.RANDOM_DEVICE_ADDRESS
            peer_address = hci.Address(self.address, kind)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                connection = await asyncio.wait_for(
                    device.connect(peer_address, transport=PhysicalTransport.LE, timeout=remaining),
                    remaining + 2.0,
                )
            except core.TimeoutError as exc:
                raise TimeoutError from exc
            except core.BaseBumbleError as exc:
                raise BleakError(f"connection to {self.address} failed: {exc}") from exc
            self._connection = connection
            connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
            peer = Peer(connection)
            self._peer = peer
            remaining = max(0.5, deadline - time.monotonic())
            if self._requested_mtu:
                await self._guard(asyncio.wait_for(peer.request_mtu(int(self._requested_mtu)), remaining))
            self.services = await self._guard(
                asyncio.wait_for(self._discover(peer), max(0.5, deadline - time.monotonic()))
            )
        except TimeoutError as exc:
            await self._teardown(disconnect=True)
            raise TimeoutError(f"connecting to {self.address} timed out after {timeout:g} s") from exc
        except BaseException:
            await self._teardown(disconnect=True)
            raise

    async def _find_address_type(self, device: Device, deadline: float) -> AddressType:
        """Scan until ``self.address`` advertises; return its address type."""
        loop = asyncio.get_running_loop()
        found: asyncio.Future[Advertisement] = loop.create_future()
        wanted = self.address

        def on_advertisement(advertisement: Advertisement) -> None:
            if not found.done() and advertisement.address.to_string(False) == wanted:
                found.set_result(advertisement)

        device.on(Device.EVENT_ADVERTISEMENT, on_advertisement)
        try:
            await device.start_scanning(active=False, filter_duplicates=False)
            try:
                advertisement = await asyncio.wait_for(found, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BleakDeviceNotFoundError(
                    self.address, f"device {self.address} not found: no advertisement seen"
                ) from None
            finally:
                with contextlib.suppress(Exception):
                    await device.stop_scanning()
        finally:
            device.remove_listener(Device.EVENT_ADVERTISEMENT, on_advertisement)
        if not advertisement.is_connectable:
            raise BleakError(f"device {self.address} is advertising but not connectable")
        return "public" if advertisement.address.is_public else "random"

    async def _discover(self, peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        await peer.discover_services()
        for service_proxy in peer.services:
            service_uuid = _uuid_str(service_proxy.uuid)
            if self._service_filter and service_uuid not in self._service_filter:
                continue
            service = BleakGATTService(service_proxy, service_proxy.handle, service_uuid)
            collection.add_service(service)
            await service_proxy.discover_characteristics()
            for char_proxy in service_proxy.characteristics:
                await char_proxy.discover_descriptors()
                char = BleakGATTCharacteristic(
                    char_proxy,
                    char_proxy.handle,
                    _uuid_str(char_proxy.uuid),
                    _properties(int(char_proxy.properties)),
                    lambda: self.mtu_size - 3,
                    service,
                )
                collection.add_characteristic(char)  # also adds it to the service
                for desc_proxy in char_proxy.descriptors:
                    descriptor = BleakGATTDescriptor(desc_proxy, desc_proxy.handle, _uuid_str(desc_proxy.type), char)
                    collection.add_descriptor(descriptor)  # also adds it to the characteristic
        with contextlib.suppress(Exception):
            for proxy in peer.get_characteristics_by_uuid(core.UUID.from_16_bits(0x2A00)):
                self._name = bytes(await proxy.read_value()).decode("utf-8", errors="replace") or None
                break
        return collection

    def _on_disconnection(self, reason: int) -> None:
        logger.debug("bumble client: %s disconnected (reason %#x)", self.address, reason)
        if self._connection is None:
            return
        self._connection = None
        self._subscribers.clear()
        self._cleanup_task = asyncio.ensure_future(self._teardown(disconnect=False))
        callback = self._disconnected_callback
        if callback is not None:
            try:
                callback()
            except Exception:
                logger.exception("bumble client: error in disconnected callback")

    async def _teardown(self, *, disconnect: bool) -> None:
        connection, self._connection = self._connection, None
        device, self._device = self._device, None
        self._peer = None
        self._subscribers.clear()
        if connection is not None and disconnect:
            connection.remove_listener(connection.EVENT_DISCONNECTION, self._on_disconnection)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.disconnect(), 2.0)
        if device is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(device.power_off(), 2.0)
        transport, self._transport = self._transport, None
        if transport is not None and self._owns_transport:
            with contextlib.suppress(Exception):
                await transport.close()

    async def disconnect(self) -> None:
        connection = self._connection
        if connection is None:
            if self._cleanup_task is not None:
                await self._cleanup_task
            return
        await self._teardown(disconnect=True)
        callback = self._disconnected_callback
        if callback is not None:
            try:
                callback()
            except Exception:
                logger.exception("bumble client: error in disconnected callback")

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "BumbleClient does not support BLE pairing (Xiaomi thermometers authenticate at the application level)"
        )

    async def unpair(self) -> None:
        raise NotImplementedError("BumbleClient does not support BLE pairing, so there is nothing to unpair")

    # -- I/O -----------------------------------------------------------------------------------------
    async def _guard(self, awaitable: Any) -> Any:
        """Await a Bumble GATT operation, translating its errors to bleak's."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._connection is None and (task is None or not task.cancelling()):
                # Bumble cancels the pending ATT request when the link drops.
                raise BleakError(f"{self.address} disconnected") from None
            raise
        except att.ATT_Error as exc:
            raise BleakGATTProtocolError(exc.error_code) from exc
        except core.TimeoutError as exc:
            raise TimeoutError(f"GATT operation on {self.address} timed out") from exc
        except (core.BaseBumbleError, core.InvalidStateError) as exc:
            raise BleakError(f"GATT operation on {self.address} failed: {exc}") from exc

    def _require_peer(self) -> Peer:
        if self._peer is None or self._connection is None:
            raise BleakError(f"not connected to {self.address}")
        return self._peer

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        peer = self._require_peer()
        proxy: CharacteristicProxy = characteristic.obj
        if use_cached and proxy.handle in peer.gatt_client.cached_values:
            return bytearray(peer.gatt_client.cached_values[proxy.handle][1])
        return bytearray(await self._guard(proxy.read_value()))

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        self._require_peer()
        proxy: DescriptorProxy = descriptor.obj
        return bytearray(await self._guard(proxy.read_value()))

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any, response: bool) -> None:
        peer = self._require_peer()
        await self._guard(peer.gatt_client.write_value(characteristic.handle, bytes(data), with_response=response))

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        peer = self._require_peer()
        await self._guard(peer.gatt_client.write_value(descriptor.handle, bytes(data), with_response=True))

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        peer = self._require_peer()
        proxy: CharacteristicProxy = characteristic.obj
        old = self._subscribers.pop(proxy.handle, None)
        if old is not None:
            await self._guard(peer.gatt_client.unsubscribe(proxy, old))

        def subscriber(value: bytes) -> None:
            callback(bytearray(value))

        self._subscribers[proxy.handle] = subscriber
        try:
            await self._guard(peer.gatt_client.subscribe(proxy, subscriber, prefer_notify=True))
        except BaseException:
            self._subscribers.pop(proxy.handle, None)
            raise

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        peer = self._require_peer()
        proxy: CharacteristicProxy = characteristic.obj
        subscriber = self._subscribers.pop(proxy.handle, None)
        await self._guard(peer.gatt_client.unsubscribe(proxy, subscriber, force=subscriber is None))

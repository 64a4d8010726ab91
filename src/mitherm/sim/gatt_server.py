"""GATT services for simulated devices on the :class:`~mitherm.radio.virtual.VirtualRadio`.

A :class:`GattServer` puts GATT services on a virtual advertiser's Bumble ``Device``. It also makes the
advertiser connectable (``ADV_IND``), so that a central on the same radio, such as
:func:`mitherm.gatt.link.connect` with ``radio=`` or ``BleakClient`` with the ``BumbleClient`` backend,
can connect to it::

    adv = await radio.add_advertiser("A4:C1:38:12:34:56", interval_ms=50)
    server = GattServer(adv)
    server.add_service("1f10", [CharSpec("1f1f", {"read", "write", "notify"}, on_write=handle)])
    await server.start()
    ...
    await server.notify("1f1f", b"\\x55\\x01")

Like a real Xiaomi thermometer, the device stops advertising while a central is connected
(``stop_advertising_when_connected=True``) and advertises again once the link drops.

Write callbacks run in the order in which the writes arrive. This holds for coroutine callbacks too,
which run one at a time per characteristic. The ATT write response is sent once the callback has
returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bumble import gatt, hci
from bumble.device import Connection

from mitherm.gatt.link import normalize_uuid
from mitherm.radio.virtual import VirtualAdvertiser

logger = logging.getLogger(__name__)

_PROPERTIES = {
    "read": gatt.Characteristic.Properties.READ,
    "write": gatt.Characteristic.Properties.WRITE,
    "write_without_response": gatt.Characteristic.Properties.WRITE_WITHOUT_RESPONSE,
    "notify": gatt.Characteristic.Properties.NOTIFY,
    "indicate": gatt.Characteristic.Properties.INDICATE,
}


@dataclasses.dataclass
class CharSpec:
    """One characteristic of a simulated GATT service.

    ``properties`` is a subset of ``{"read", "write", "write_without_response", "notify", "indicate"}``.
    Reads return ``on_read()`` if it is given, and ``value`` otherwise. Writes store ``value`` and
    then call ``on_write(data)``, which may be a coroutine function. :meth:`GattServer.notify` also
    updates ``value``.
    """

    uuid: str
    properties: set[str]
    on_read: Callable[[], bytes] | None = None
    on_write: Callable[[bytes], Awaitable[None] | None] | None = None
    value: bytes = b""


class GattServer:
    """GATT services for one :class:`~mitherm.radio.virtual.VirtualAdvertiser`. See the module docs."""

    def __init__(self, advertiser: VirtualAdvertiser, *, stop_advertising_when_connected: bool = True) -> None:
        self.advertiser = advertiser
        self.device = advertiser.device
        self.stop_advertising_when_connected = stop_advertising_when_connected
        #: Called with no argument when a central connects / when the link drops.
        self.on_connect: Callable[[], None] | None = None
        self.on_disconnect: Callable[[], None] | None = None
        self._chars: dict[str, tuple[CharSpec, gatt.Characteristic]] = {}
        self._pending: list[gatt.Service] = []
        self._connections: list[Connection] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.device.on(self.device.EVENT_CONNECTION, self._on_connection)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return bool(self._connections)

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections)

    # -- services ------------------------------------------------------------------------------------
    def add_service(self, service_uuid: str, characteristics: list[CharSpec]) -> None:
        """Add a primary service. Services added after :meth:`start` are registered at once. Centrals
        that already discovered the services do not see them."""
        chars = [self._make_characteristic(spec) for spec in characteristics]
        service = gatt.Service(normalize_uuid(service_uuid), chars)
        if self._started:
            self.device.add_services([service])
        else:
            self._pending.append(service)

    def _make_characteristic(self, spec: CharSpec) -> gatt.Characteristic:
        unknown = set(spec.properties) - set(_PROPERTIES)
        if unknown:
            raise ValueError(f"unknown characteristic properties {sorted(unknown)}; use {sorted(_PROPERTIES)}")
        key = normalize_uuid(spec.uuid)
        properties = gatt.Characteristic.Properties(0)
        for name in spec.properties:
            properties |= _PROPERTIES[name]
        permissions = gatt.Characteristic.Permissions(0)
        if "read" in spec.properties:
            permissions |= gatt.Characteristic.READABLE
        if spec.properties & {"write", "write_without_response"}:
            permissions |= gatt.Characteristic.WRITEABLE

        def read(_connection: Connection | None) -> bytes:
            return bytes(spec.on_read()) if spec.on_read is not None else bytes(spec.value)

        lock = self._locks.setdefault(key, asyncio.Lock())
        coroutine_callback = inspect.iscoroutinefunction(spec.on_write)

        async def write_in_order(data: bytes) -> None:
            async with lock:
                await self._call_on_write(spec, data)

        def write(_connection: Connection | None, value: bytes) -> Awaitable[None] | None:
            data = bytes(value)
            spec.value = data
            if spec.on_write is None:
                return None
            if coroutine_callback or lock.locked():
                return write_in_order(data)
            result = spec.on_write(data)
            if inspect.isawaitable(result):
                return self._await(result)
            return None

        characteristic = gatt.Characteristic(
            key, properties, permissions, gatt.CharacteristicValue(read=read, write=write)
        )
        if key in self._chars:
            logger.warning("gatt server: characteristic %s defined twice, notify() uses the first", key)
        else:
            self._chars[key] = (spec, characteristic)
        return characteristic

    @staticmethod
    async def _await(result: Awaitable[None]) -> None:
        await result

    async def _call_on_write(self, spec: CharSpec, data: bytes) -> None:
        assert spec.on_write is not None
        result = spec.on_write(data)
        if inspect.isawaitable(result):
            await result

    def characteristic(self, char_uuid: str) -> gatt.Characteristic:
        """The Bumble characteristic object for ``char_uuid``."""
        try:
            return self._chars[normalize_uuid(char_uuid)][1]
        except KeyError:
            raise KeyError(f"no characteristic {char_uuid} on this GATT server") from None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Register the services with the Bumble device and advertise connectable (``ADV_IND``)."""
        if self._pending:
            self.device.add_services(self._pending)
            self._pending = []
        self._started = True
        if not self.advertiser.connectable:
            self.advertiser.connectable = True
            if self.advertiser.is_advertising:
                await self.advertiser.start()  # restart as ADV_IND

    async def notify(self, char_uuid: str, data: bytes) -> None:
        """Update the characteristic value and notify (or indicate) the centrals that subscribed."""
        spec, characteristic = self._chars[normalize_uuid(char_uuid)] if self._has(char_uuid) else (None, None)
        if spec is None or characteristic is None:
            raise KeyError(f"no characteristic {char_uuid} on this GATT server")
        data = bytes(data)
        spec.value = data
        if not self._connections:
            return
        if "notify" in spec.properties or "indicate" not in spec.properties:
            await self.device.notify_subscribers(characteristic, data)
        else:
            await self.device.indicate_subscribers(characteristic, data)

    def _has(self, char_uuid: str) -> bool:
        try:
            return normalize_uuid(char_uuid) in self._chars
        except ValueError:
            return False

    async def disconnect(self) -> None:
        """Drop every connection from the device side (e.g. the device reboots or goes out of range)."""
        for connection in list(self._connections):
            with contextlib.suppress(Exception):
                await connection.disconnect(hci.HCI_REMOTE_USER_TERMINATED_CONNECTION_ERROR)

    # -- events --------------------------------------------------------------------------------------
    def _on_connection(self, connection: Connection) -> None:
        if connection.role != hci.Role.PERIPHERAL:
            return
        self._connections.append(connection)
        connection.on(connection.EVENT_DISCONNECTION, lambda _reason: self._on_disconnection(connection))
        logger.debug("gatt server %s: central %s connected", self.advertiser.address, connection.peer_address)
        # The controller stops legacy advertising when a connection is set up (as real devices do).
        if not self.stop_advertising_when_connected:
            self._spawn(self._resume_advertising())
        self._fire(self.on_connect)

    def _on_disconnection(self, connection: Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        logger.debug("gatt server %s: central %s disconnected", self.advertiser.address, connection.peer_address)
        self._spawn(self._resume_advertising())
        self._fire(self.on_disconnect)

    async def _resume_advertising(self) -> None:
        adv = self.advertiser
        if not adv.is_advertising or not adv.device.powered_on:
            return  # stopped on purpose (or closed): stay quiet
        try:
            await adv.start()
        except Exception as exc:
            logger.debug("gatt server %s: cannot resume advertising: %s", adv.address, exc)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _fire(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            logger.exception("gatt server: error in connection callback")

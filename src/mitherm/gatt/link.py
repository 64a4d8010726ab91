"""The GATT transport used by mitherm's device-management protocol cores (Mi auth, stock settings,
pvvx commands, Telink OTA).

:class:`GattLink` wraps a connected bleak :class:`~bleak.BleakClient` behind a handful of coroutines
taking characteristic UUIDs. The same code talks to a real thermometer (bleak's platform backend,
BlueZ / CoreBluetooth / WinRT, connected with ``bleak_retry_connector``) and to a simulated one on a
:class:`~mitherm.radio.virtual.VirtualRadio` (bleak with the
:class:`~mitherm.radio.bleak_client.BumbleClient` backend)::

    link = await connect("A4:C1:38:12:34:56")                 # real adapter
    link = await connect("A4:C1:38:12:34:56", radio=radio)    # virtual radio
    link = await connect("A4:C1:38:12:34:56", transport="usb:0")  # a Bumble-driven dongle
    try:
        fw = await link.read("2a26")
        await link.subscribe("1f1f", on_data)
        await link.write("1f1f", b"\\x55", response=False)
    finally:
        await link.disconnect()

UUIDs: 16-bit UUIDs may be given as ``"0x1f1f"``, ``"1f1f"`` or ``0x1F1F`` and are expanded with the
Bluetooth base UUID; 32-bit likewise; 128-bit UUIDs are used as given (any case). Every failure
(device not found, timeout, link dropped, ATT error, unknown characteristic) raises :class:`GattError`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import BleakError

if TYPE_CHECKING:
    from mitherm.radio.virtual import VirtualRadio

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"

#: Default time limit of a single GATT operation (read, write, subscribe...).
DEFAULT_OP_TIMEOUT = 10.0


class GattError(Exception):
    """Any failure of a GATT link: connection, timeout, disconnection, ATT error, missing UUID."""


def normalize_uuid(value: str | int | uuid_mod.UUID) -> str:
    """A characteristic/service UUID as a lower-case 128-bit string.

    ``0x1F1F``, ``"0x1f1f"`` and ``"1f1f"`` give ``"00001f1f-0000-1000-8000-00805f9b34fb"``; 32-bit
    values are expanded the same way; 128-bit UUIDs (with or without dashes) are returned lower-case.
    """
    if isinstance(value, uuid_mod.UUID):
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"invalid UUID {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"invalid 16/32-bit UUID {value:#x}")
        return f"{value:08x}{_BASE_UUID_SUFFIX}"
    text = str(value).strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if len(text) in (4, 8):
        try:
            return f"{int(text, 16):08x}{_BASE_UUID_SUFFIX}"
        except ValueError:
            raise ValueError(f"invalid UUID {value!r}") from None
    try:
        return str(uuid_mod.UUID(text))
    except ValueError:
        raise ValueError(f"invalid UUID {value!r}") from None


class GattLink:
    """A connected GATT link (wraps a connected bleak ``BleakClient``). Create it with :func:`connect`.

    Operations are bounded by ``op_timeout`` seconds and fail fast with :class:`GattError` once the
    link is down (whichever side dropped it).
    """

    def __init__(self, client: BleakClient, *, op_timeout: float = DEFAULT_OP_TIMEOUT) -> None:
        self.client = client
        self.address: str = client.address
        self.op_timeout = op_timeout
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._closed = asyncio.Event()
        self._closing = False
        self._subscriptions: dict[str, BleakGATTCharacteristic] = {}
        self._chars: dict[str, BleakGATTCharacteristic] = {}
        self._service_uuids: list[str] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        try:
            services = client.services
        except BleakError:
            services = None
        if services is not None:
            for service in services:
                if service.uuid not in self._service_uuids:
                    self._service_uuids.append(service.uuid)
                for char in service.characteristics:
                    # The first characteristic with a UUID wins, as in bleak's lookup by UUID.
                    self._chars.setdefault(char.uuid.lower(), char)

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "disconnected"
        return f"<GattLink {self.address} {state}>"

    # -- state ---------------------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        if self._closed.is_set():
            return False
        try:
            return bool(self.client.is_connected)
        except Exception:
            return False

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (once) when the link goes down, whichever side dropped it, including a
        local :meth:`disconnect`. Called at once if the link is already down."""
        if self._closed.is_set():
            callback()
        else:
            self._disconnect_callbacks.append(callback)

    def _handle_disconnected(self) -> None:
        """Called by the bleak client's disconnected callback (and by :meth:`disconnect`)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._subscriptions.clear()
        logger.debug("gatt: %s disconnected", self.address)
        callbacks, self._disconnect_callbacks = self._disconnect_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("gatt: error in disconnect callback for %s", self.address)

    # -- discovery -----------------------------------------------------------------------------------
    def services(self) -> list[str]:
        """UUIDs (128-bit, lower-case) of the services discovered at connection time."""
        return list(self._service_uuids)

    def has_characteristic(self, uuid: str | int) -> bool:
        try:
            return normalize_uuid(uuid) in self._chars
        except ValueError:
            return False

    def _char(self, uuid: str | int) -> BleakGATTCharacteristic:
        try:
            key = normalize_uuid(uuid)
        except ValueError as exc:
            raise GattError(str(exc)) from None
        char = self._chars.get(key)
        if char is None:
            raise GattError(f"{self.address} has no characteristic {key}")
        return char

    # -- operations ----------------------------------------------------------------------------------
    async def _run(self, what: str, coro: Awaitable[_T]) -> _T:
        """Run one bleak operation, bounded by ``op_timeout`` and cancelled if the link drops."""
        if not self.is_connected:
            if inspect.iscoroutine(coro):
                coro.close()
            raise GattError(f"{what}: {self.address} is not connected")
        op = asyncio.ensure_future(coro)
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            done, _ = await asyncio.wait({op, closed}, timeout=self.op_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            op.cancel()
            raise
        finally:
            closed.cancel()
        if op in done:
            try:
                return op.result()
            except GattError:
                raise
            except (TimeoutError, BleakError, EOFError, OSError, AttributeError, ValueError) as exc:
                if not self.is_connected:
                    raise GattError(f"{what}: {self.address} disconnected") from exc
                raise GattError(f"{what} on {self.address} failed: {exc or type(exc).__name__}") from exc
        op.cancel()
        if closed in done or not self.is_connected:
            raise GattError(f"{what}: {self.address} disconnected during the operation")
        raise GattError(f"{what} on {self.address} timed out after {self.op_timeout:g} s")

    async def _run_inline(self, what: str, coro: Awaitable[_T]) -> _T:
        """Like :meth:`_run` without a separate task, for quick operations that do not wait for the
        peer (writes without response): much cheaper when thousands are sent (OTA)."""
        if not self.is_connected:
            if inspect.iscoroutine(coro):
                coro.close()
            raise GattError(f"{what}: {self.address} is not connected")
        try:
            async with asyncio.timeout(self.op_timeout):
                return await coro
        except GattError:
            raise
        except TimeoutError as exc:
            if not self.is_connected:
                raise GattError(f"{what}: {self.address} disconnected during the operation") from exc
            raise GattError(f"{what} on {self.address} timed out after {self.op_timeout:g} s") from exc
        except (BleakError, EOFError, OSError, AttributeError, ValueError) as exc:
            if not self.is_connected:
                raise GattError(f"{what}: {self.address} disconnected") from exc
            raise GattError(f"{what} on {self.address} failed: {exc or type(exc).__name__}") from exc

    async def read(self, uuid: str | int) -> bytes:
        char = self._char(uuid)
        data = await self._run(f"read {char.uuid}", self.client.read_gatt_char(char))
        return bytes(data)

    async def write(self, uuid: str | int, data: bytes, response: bool = True) -> None:
        char = self._char(uuid)
        run = self._run if response else self._run_inline
        await run(f"write {char.uuid}", self.client.write_gatt_char(char, bytes(data), response=response))

    async def subscribe(self, uuid: str | int, callback: Callable[[bytes], Any]) -> None:
        """Enable notifications (or indications) and call ``callback(data)`` for each one, in order.
        A coroutine function is accepted too (each call is then run as a task)."""
        char = self._char(uuid)

        def on_notify(_sender: BleakGATTCharacteristic, data: bytearray) -> None:
            result = callback(bytes(data))
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        await self._run(f"subscribe {char.uuid}", self.client.start_notify(char, on_notify))
        self._subscriptions[char.uuid] = char

    async def unsubscribe(self, uuid: str | int) -> None:
        char = self._char(uuid)
        if self._subscriptions.pop(char.uuid, None) is None:
            return
        await self._run(f"unsubscribe {char.uuid}", self.client.stop_notify(char))

    async def disconnect(self) -> None:
        """Close the link (idempotent). ``on_disconnect`` callbacks run."""
        if self._closing:
            return
        self._closing = True
        try:
            if not self._closed.is_set():
                await asyncio.wait_for(self.client.disconnect(), self.op_timeout)
        except (TimeoutError, BleakError, EOFError, OSError) as exc:
            logger.debug("gatt: error disconnecting %s: %s", self.address, exc)
        finally:
            self._handle_disconnected()

    async def __aenter__(self) -> GattLink:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()


def _not_found(address: str) -> GattError:
    return GattError(
        f"device {address} not found: is it in range and advertising? "
        "close the Xiaomi Home app / flasher page, which keep it connected"
    )


async def connect(
    address: str,
    *,
    radio: VirtualRadio | None = None,
    transport: str | None = None,
    timeout: float = 20.0,
    attempts: int = 3,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
) -> GattLink:
    """Connect to ``address`` and discover its services.

    * ``radio=``: a started :class:`~mitherm.radio.virtual.VirtualRadio` (simulated devices), through
      bleak with the :class:`~mitherm.radio.bleak_client.BumbleClient` backend;
    * ``transport=``: a Bumble transport (``"usb:0"``, ``"tcp-client:HOST:PORT"``...), same backend;
    * neither: the platform's bleak backend, found with ``BleakScanner.find_device_by_address`` and
      connected with ``bleak_retry_connector.establish_connection``.

    ``timeout`` bounds each connection attempt (and the scan for a real device); ``attempts`` is the
    number of connection attempts. Raises :class:`GattError`.
    """
    if radio is not None and transport is not None:
        raise GattError("give at most one of radio= and transport=")
    address = address.strip().upper()
    relay: list[GattLink] = []

    def on_disconnected(_client: BleakClient) -> None:
        if relay:
            relay[0]._handle_disconnected()

    attempts = max(1, int(attempts))
    if radio is None and transport is None:
        client = await _connect_platform(address, timeout, attempts, on_disconnected)
    else:
        client = await _connect_bumble(address, radio, transport, timeout, attempts, on_disconnected)
    link = GattLink(client, op_timeout=op_timeout)
    relay.append(link)
    if not client.is_connected:
        link._handle_disconnected()
        raise GattError(f"{address} disconnected right after connecting")
    return link


async def _connect_platform(
    address: str, timeout: float, attempts: int, on_disconnected: Callable[[BleakClient], None]
) -> BleakClient:
    from bleak_retry_connector import establish_connection

    try:
        device = await BleakScanner.find_device_by_address(address, timeout=timeout)
    except (BleakError, OSError) as exc:
        raise GattError(f"cannot scan for {address}: {exc}") from exc
    if device is None:
        raise _not_found(address)
    try:
        return await establish_connection(
            BleakClient,
            device,
            address,
            disconnected_callback=on_disconnected,
            max_attempts=attempts,
            timeout=timeout,
        )
    except (TimeoutError, BleakError, EOFError, OSError) as exc:
        raise GattError(f"cannot connect to {address}: {exc or type(exc).__name__}") from exc


async def _connect_bumble(
    address: str,
    radio: VirtualRadio | None,
    transport: str | None,
    timeout: float,
    attempts: int,
    on_disconnected: Callable[[BleakClient], None],
) -> BleakClient:
    from mitherm.radio.bleak_client import BumbleClient

    kwargs: dict[str, Any] = {"bumble_radio": radio} if radio is not None else {"bumble_transport": transport}
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        client = BleakClient(
            address, disconnected_callback=on_disconnected, timeout=timeout, backend=BumbleClient, **kwargs
        )
        try:
            await client.connect()
            return client
        except (TimeoutError, BleakError, EOFError, OSError) as exc:
            last = exc
            logger.debug("gatt: connection attempt %d/%d to %s failed: %s", attempt, attempts, address, exc)
            try:
                await client.disconnect()
            except Exception:
                pass
            if "not found" in str(exc):
                break  # nothing advertised at that address during the whole timeout: don't wait again
            if attempt < attempts:
                await asyncio.sleep(0.1 * attempt)
    if last is not None and "not found" in str(last):
        raise _not_found(address) from last
    raise GattError(f"cannot connect to {address} after {attempts} attempt(s): {last or 'unknown error'}") from last

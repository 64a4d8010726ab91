"""A virtual BLE radio: Bumble controllers sharing one in-process ``LocalLink``.

Every virtual advertiser is a full Bumble :class:`~bumble.device.Device` (host stack) driving its own
controller through HCI, so a GATT server can later be added to ``adv.device``. Scanners attach another
controller to the same link, either in-process (:meth:`VirtualRadio.open_hci_transport`, used by
:class:`mitherm.radio.bleak_backend.BumbleScanner`) or from another process over TCP
(:meth:`VirtualRadio.serve_tcp`, reachable with the Bumble transport ``tcp-client:HOST:PORT``).

Bumble's stock controller only relays connectable ``ADV_IND`` legacy advertising on a local link,
always answers with a fake scan response (even to a passive scanner) and ignores the advertising
interval unit. The controllers used here replace that part so that the link behaves like air:

* ``ADV_IND``, ``ADV_SCAN_IND`` and ``ADV_NONCONN_IND`` are all delivered, with the right report type;
* a scan response is reported only to active scanners, and only for scannable advertising;
* the advertising interval is honoured (HCI units of 0.625 ms);
* the scanner's ``filter_duplicates`` flag is honoured (off: every advertising event is reported);
* the RSSI seen by scanners is configurable per advertiser.

Connections (for GATT) also needed two fixes of the stock local link: ACL data is sent from the
connection's own address (the stock link uses the controller's random address, so a peripheral
advertising with its public address never got its replies to the central), and LE Create Connection
Cancel completes the pending connection attempt (the stock controller left it pending forever, so a
timed-out ``Device.connect`` hung).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from types import TracebackType
from typing import Literal, Self

from bumble import hci, ll
from bumble.controller import Controller, LegacyAdvertiser
from bumble.core import PhysicalTransport
from bumble.device import AdvertisingType, Device
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink, StreamPacketSource, Transport

logger = logging.getLogger(__name__)

AddressType = Literal["public", "random"]

#: Largest legacy advertising / scan response payload.
MAX_LEGACY_AD_LEN = 31
#: Shortest advertising interval accepted (the BLE minimum for legacy advertising is 20 ms; the virtual
#: link accepts faster intervals so that tests run quickly).
MIN_INTERVAL_MS = 5.0

_AdvType = hci.HCI_LE_Set_Advertising_Parameters_Command.AdvertisingType
_ReportType = hci.HCI_LE_Advertising_Report_Event.EventType
_ExtReport = hci.HCI_LE_Extended_Advertising_Report_Event
_ExtType = _ExtReport.EventType

# Legacy advertising types that carry data, with their legacy report type.
_LEGACY_REPORT_TYPE = {
    _AdvType.ADV_IND: _ReportType.ADV_IND,
    _AdvType.ADV_SCAN_IND: _ReportType.ADV_SCAN_IND,
    _AdvType.ADV_NONCONN_IND: _ReportType.ADV_NONCONN_IND,
}
# The same types as extended report event types (legacy PDU bit set), Core spec Vol 4 Part E 7.7.65.13.
_EXT_REPORT_TYPE = {
    _AdvType.ADV_IND: _ExtType.LEGACY_ADVERTISING_PDU_USED
    | _ExtType.SCANNABLE_ADVERTISING
    | _ExtType.CONNECTABLE_ADVERTISING,
    _AdvType.ADV_SCAN_IND: _ExtType.LEGACY_ADVERTISING_PDU_USED | _ExtType.SCANNABLE_ADVERTISING,
    _AdvType.ADV_NONCONN_IND: _ExtType.LEGACY_ADVERTISING_PDU_USED,
}
_SCANNABLE = (_AdvType.ADV_IND, _AdvType.ADV_SCAN_IND)


def _parse_address(address: str | hci.Address, address_type: AddressType) -> hci.Address:
    if address_type not in ("public", "random"):
        raise ValueError(f"address_type must be 'public' or 'random', not {address_type!r}")
    kind = hci.Address.PUBLIC_DEVICE_ADDRESS if address_type == "public" else hci.Address.RANDOM_DEVICE_ADDRESS
    text = address.to_string(False) if isinstance(address, hci.Address) else str(address).strip()
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid Bluetooth address {address!r} (expected AA:BB:CC:DD:EE:FF)")
    try:
        return hci.Address(text.upper(), kind)
    except ValueError as exc:
        raise ValueError(f"invalid Bluetooth address {address!r}") from exc


def _check_ad(data: bytes, what: str) -> bytes:
    data = bytes(data)
    if len(data) > MAX_LEGACY_AD_LEN:
        raise ValueError(f"{what} is {len(data)} bytes, legacy advertising allows {MAX_LEGACY_AD_LEN}")
    return data


# ---------------------------------------------------------------------------------------------------
# Link-level pieces (the "air")
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _LegacyAdvPdu(ll.AdvInd):
    """One legacy advertising event on the virtual link. Subclasses ``AdvInd`` so that Bumble's
    controller dispatch delivers it; ``adv_type`` says what kind of advertising it really is."""

    adv_type: int = _AdvType.ADV_IND
    scan_response_data: bytes = b""
    rssi: int = -50


@dataclasses.dataclass
class _LinkLegacyAdvertiser(LegacyAdvertiser):
    """Legacy advertiser sending every undirected advertising type, at the configured interval."""

    def _on_timer_fired(self) -> None:
        self.send_advertising_data()
        interval_s = max(self.advertising_interval_min * 0.625, MIN_INTERVAL_MS) / 1000.0
        self.timer_handle = asyncio.get_running_loop().call_later(interval_s, self._on_timer_fired)

    def send_advertising_data(self) -> None:
        if not self.enabled or self.advertising_type not in _LEGACY_REPORT_TYPE:
            return
        controller = self.controller
        assert isinstance(controller, _LinkController)
        controller.send_advertising_pdu(
            _LegacyAdvPdu(
                advertiser_address=self.address,
                data=bytes(self.advertising_data),
                adv_type=self.advertising_type,
                scan_response_data=bytes(self.scan_response_data),
                rssi=controller.tx_rssi,
            )
        )


class _Link(LocalLink):
    """``LocalLink`` whose LE ACL data carries the address the sender uses on that connection."""

    def send_acl_data(self, sender_controller, destination_address, transport, data) -> None:
        if transport == PhysicalTransport.LE:
            connection = sender_controller.le_connections.get(destination_address)
            destination = self.find_le_controller(destination_address)
            if connection is not None and destination is not None:
                source = connection.self_address
                asyncio.get_running_loop().call_soon(destination.on_link_acl_data, source, transport, data)
                return
        super().send_acl_data(sender_controller, destination_address, transport, data)


class _LinkController(Controller):
    """Bumble controller with air-like legacy advertising and scanning on a ``LocalLink``."""

    def __init__(
        self,
        name: str,
        *,
        link: LocalLink,
        public_address: hci.Address,
        extended: bool = True,
        host_source=None,
        host_sink=None,
    ) -> None:
        super().__init__(name, host_source=host_source, host_sink=host_sink, link=link, public_address=public_address)
        self.le_legacy_advertiser = _LinkLegacyAdvertiser(self)
        #: RSSI reported by scanners for the frames this controller sends.
        self.tx_rssi = -50
        self._reported: set[tuple[bytes, int, int, bytes]] = set()
        if not extended:
            # A BLE 4.x style controller: the host then uses the legacy advertising/scanning commands.
            self.le_features = Controller.le_features & ~(
                hci.LeFeatureMask.LE_EXTENDED_ADVERTISING | hci.LeFeatureMask.LE_PERIODIC_ADVERTISING
            )

    # -- scanning side -------------------------------------------------------------------------------
    def on_hci_le_set_extended_scan_parameters_command(self, command):
        result = super().on_hci_le_set_extended_scan_parameters_command(command)
        if command.scan_types and not self.le_scan_enable:
            self.le_scan_type = command.scan_types[0]
        return result

    def on_hci_le_set_scan_enable_command(self, command):
        self._reported.clear()
        return super().on_hci_le_set_scan_enable_command(command)

    def on_hci_le_set_extended_scan_enable_command(self, command):
        self._reported.clear()
        return super().on_hci_le_set_extended_scan_enable_command(command)

    def on_advertising_pdu(self, pdu) -> None:
        if not isinstance(pdu, _LegacyAdvPdu):
            super().on_advertising_pdu(pdu)
            return
        if self.le_scan_enable:
            self._report(pdu)
        pending = self.pending_le_connection
        if pending is not None and pending.peer_address == pdu.advertiser_address and pdu.adv_type == _AdvType.ADV_IND:
            self.create_le_connection(pdu.advertiser_address)

    def on_hci_le_create_connection_cancel_command(self, command):
        # Core spec Vol 4 Part E 7.8.13: cancelling a pending connection attempt ends it with an LE
        # Connection Complete event (status Unknown Connection Identifier), after the command complete.
        pending = self.pending_le_connection
        result = super().on_hci_le_create_connection_cancel_command(command)
        if pending is None:
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        event = hci.HCI_LE_Connection_Complete_Event(
            status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=pending.peer_address.address_type,
            peer_address=pending.peer_address,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        asyncio.get_running_loop().call_soon(self.send_hci_packet, event)
        return result

    def _report(self, pdu: _LegacyAdvPdu) -> None:
        active = self.le_scan_type == hci.HCI_LE_Set_Scan_Parameters_Command.ACTIVE_SCANNING
        scan_response = active and pdu.adv_type in _SCANNABLE
        if self.filter_duplicates:
            key = (bytes(pdu.advertiser_address), pdu.advertiser_address.address_type, pdu.adv_type, pdu.data)
            if key in self._reported:
                return
            self._reported.add(key)
        address = pdu.advertiser_address
        if self.le_features & hci.LeFeatureMask.LE_EXTENDED_ADVERTISING:
            kinds = [(_EXT_REPORT_TYPE[pdu.adv_type], pdu.data)]
            if scan_response:
                kinds.append((_EXT_REPORT_TYPE[pdu.adv_type] | _ExtType.SCAN_RESPONSE, pdu.scan_response_data))
            for event_type, data in kinds:
                report = _ExtReport.Report(
                    event_type=event_type,
                    address_type=address.address_type,
                    address=address,
                    primary_phy=hci.Phy.LE_1M,
                    secondary_phy=0,
                    advertising_sid=0xFF,
                    tx_power=_ExtReport.TX_POWER_INFORMATION_NOT_AVAILABLE,
                    rssi=pdu.rssi,
                    periodic_advertising_interval=0,
                    direct_address_type=0,
                    direct_address=hci.Address.ANY,
                    data=data,
                )
                self.send_hci_packet(_ExtReport([report]))
        else:
            kinds = [(_LEGACY_REPORT_TYPE[pdu.adv_type], pdu.data)]
            if scan_response:
                kinds.append((_ReportType.SCAN_RSP, pdu.scan_response_data))
            for event_type, data in kinds:
                report = hci.HCI_LE_Advertising_Report_Event.Report(
                    event_type=event_type,
                    address_type=address.address_type,
                    address=address,
                    data=data,
                    rssi=pdu.rssi,
                )
                self.send_hci_packet(hci.HCI_LE_Advertising_Report_Event([report]))

    # -- lifecycle -----------------------------------------------------------------------------------
    def detach(self) -> None:
        """Switch the radio off and leave the link."""
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.le_scan_enable = False
        self.set_packet_sink(None)
        self.link.controllers.discard(self)


class _ControllerTransport(Transport):
    """An in-process HCI transport to a controller on the virtual link. Closing it removes the
    controller from the link."""

    def __init__(self, controller: _LinkController, radio: VirtualRadio) -> None:
        super().__init__(source=controller, sink=AsyncPipeSink(controller))
        self.controller = controller
        self._radio = radio

    async def close(self) -> None:
        self.controller.detach()
        self._radio._transports.discard(self)


class _TcpHciSink:
    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def on_packet(self, packet: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(packet)


class _HciServerProtocol(asyncio.Protocol):
    """One TCP client = one H4 HCI host driving its own controller on the virtual link."""

    def __init__(self, radio: VirtualRadio) -> None:
        self.radio = radio
        self.source = StreamPacketSource()
        self.controller: _LinkController | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        peer = transport.get_extra_info("peername")
        self.controller = self.radio._new_controller(
            f"tcp-{peer}", host_source=self.source, host_sink=_TcpHciSink(transport)
        )
        self.radio._tcp_controllers.add(self.controller)
        logger.debug("virtual radio: HCI client %s connected", peer)

    def data_received(self, data: bytes) -> None:
        self.source.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.controller is not None:
            self.controller.detach()
            self.radio._tcp_controllers.discard(self.controller)
            self.controller = None


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
class VirtualAdvertiser:
    """One simulated BLE peripheral on a :class:`VirtualRadio`: a Bumble ``Device`` with its own
    controller. Create it with :meth:`VirtualRadio.add_advertiser`."""

    def __init__(
        self,
        radio: VirtualRadio,
        device: Device,
        controller: _LinkController,
        address: hci.Address,
        *,
        interval_ms: float,
        connectable: bool,
    ) -> None:
        self.radio = radio
        #: The Bumble device (host stack). Add GATT services to it before advertising connectable.
        self.device = device
        self.controller = controller
        self._address = address
        self.interval_ms = float(interval_ms)
        self.connectable = connectable
        self._data = b""
        self._scan_response = b""
        self._advertising = False
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "advertising" if self._advertising else "stopped"
        return f"<VirtualAdvertiser {self.address} ({self.address_type}) {state}>"

    @property
    def address(self) -> str:
        """The advertiser address, ``AA:BB:CC:DD:EE:FF``."""
        return self._address.to_string(False)

    @property
    def address_type(self) -> AddressType:
        return "public" if self._address.is_public else "random"

    @property
    def data(self) -> bytes:
        """The current advertising payload (raw AD structures)."""
        return self._data

    @property
    def scan_response(self) -> bytes:
        return self._scan_response

    @property
    def is_advertising(self) -> bool:
        return self._advertising

    @property
    def rssi(self) -> int:
        """The RSSI (dBm) scanners report for this advertiser's frames."""
        return self.controller.tx_rssi

    @rssi.setter
    def rssi(self, value: int) -> None:
        if not -127 <= int(value) <= 20:
            raise ValueError("rssi must be in -127..20 dBm")
        self.controller.tx_rssi = int(value)

    @property
    def _advertising_type(self) -> AdvertisingType:
        if self.connectable:
            return AdvertisingType.UNDIRECTED_CONNECTABLE_SCANNABLE
        if self._scan_response:
            return AdvertisingType.UNDIRECTED_SCANNABLE
        return AdvertisingType.UNDIRECTED

    async def set_data(self, ad_bytes: bytes) -> None:
        """Replace the advertising payload (raw AD structures, at most 31 bytes). Takes effect from
        the next advertising event; may be called while advertising."""
        data = _check_ad(ad_bytes, "advertising data")
        async with self._lock:
            self._data = data
            self.device.advertising_data = data
            await self.device.send_sync_command(hci.HCI_LE_Set_Advertising_Data_Command(advertising_data=data))

    async def set_scan_response(self, ad_bytes: bytes) -> None:
        """Set the scan response payload (sent to active scanners only). Switching between an empty
        and a non-empty scan response restarts advertising as scannable / non-scannable."""
        data = _check_ad(ad_bytes, "scan response data")
        async with self._lock:
            was_scannable = self._advertising_type.is_scannable
            self._scan_response = data
            self.device.scan_response_data = data
            await self.device.send_sync_command(hci.HCI_LE_Set_Scan_Response_Data_Command(scan_response_data=data))
            if self._advertising and was_scannable != self._advertising_type.is_scannable:
                await self._start_locked()

    async def start(self) -> None:
        """Start (or restart) advertising."""
        async with self._lock:
            await self._start_locked()

    async def _start_locked(self) -> None:
        own_address_type = hci.OwnAddressType.PUBLIC if self._address.is_public else hci.OwnAddressType.RANDOM
        await self.device.start_advertising(
            advertising_type=self._advertising_type,
            own_address_type=own_address_type,
            advertising_data=self._data,
            scan_response_data=self._scan_response,
            advertising_interval_min=self.interval_ms,
            advertising_interval_max=self.interval_ms,
        )
        self._advertising = True

    async def stop(self) -> None:
        """Stop advertising (the device "drops out"). No frame is sent after this returns; frames
        already on the link may still be delivered during the next few event loop iterations."""
        async with self._lock:
            if self._advertising:
                self._advertising = False
                await self.device.stop_advertising()

    async def close(self) -> None:
        """Stop advertising and remove the device from the radio."""
        try:
            if self.device.powered_on:
                await self.stop()
                await self.device.power_off()
        finally:
            self.controller.detach()
            self.radio._advertisers.pop(self._address, None)


class VirtualRadio:
    """A shared virtual radio medium (Bumble ``LocalLink``) with virtual advertisers and scanners.

    ::

        async with VirtualRadio() as radio:
            adv = await radio.add_advertiser("A4:C1:38:00:00:01", interval_ms=100)
            await adv.set_data(ad_bytes)
            async with BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio):
                ...
    """

    def __init__(self) -> None:
        self.link: LocalLink | None = None
        self._advertisers: dict[hci.Address, VirtualAdvertiser] = {}
        self._transports: set[_ControllerTransport] = set()
        self._tcp_controllers: set[_LinkController] = set()
        self._servers: list[asyncio.Server] = []
        self._serial = itertools.count(1)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self.link is not None

    @property
    def advertisers(self) -> list[VirtualAdvertiser]:
        return list(self._advertisers.values())

    async def start(self) -> None:
        if self.link is None:
            self.link = _Link()

    async def stop(self) -> None:
        """Close TCP servers, scanners' controllers and all advertisers."""
        if self.link is None:
            return
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except TimeoutError:
                logger.warning("virtual radio: TCP server did not close in time")
        self._servers.clear()
        for controller in list(self._tcp_controllers):
            controller.detach()
        self._tcp_controllers.clear()
        for transport in list(self._transports):
            await transport.close()
        self._transports.clear()
        for advertiser in list(self._advertisers.values()):
            try:
                await advertiser.close()
            except Exception:
                logger.exception("virtual radio: error closing %s", advertiser)
        self._advertisers.clear()
        self.link = None

    def _require_link(self) -> LocalLink:
        if self.link is None:
            raise RuntimeError("VirtualRadio is not started (await radio.start() first)")
        return self.link

    def _synthetic_public_address(self) -> hci.Address:
        # Controllers that are not advertisers still need distinct public addresses on the link.
        n = next(self._serial)
        return hci.Address(f"00:1B:DC:F0:{(n >> 8) & 0xFF:02X}:{n & 0xFF:02X}", hci.Address.PUBLIC_DEVICE_ADDRESS)

    def _new_controller(
        self,
        name: str,
        *,
        public_address: hci.Address | None = None,
        extended: bool = True,
        host_source=None,
        host_sink=None,
    ) -> _LinkController:
        return _LinkController(
            name,
            link=self._require_link(),
            public_address=public_address or self._synthetic_public_address(),
            extended=extended,
            host_source=host_source,
            host_sink=host_sink,
        )

    async def add_advertiser(
        self,
        address: str,
        address_type: AddressType = "public",
        interval_ms: float = 100,
        *,
        connectable: bool = False,
        data: bytes = b"",
        scan_response: bytes = b"",
        rssi: int = -50,
        start: bool = True,
    ) -> VirtualAdvertiser:
        """Add a virtual peripheral advertising as ``address``. Non-connectable (``ADV_NONCONN_IND``)
        by default; ``connectable=True`` gives ``ADV_IND``. Advertising starts at once unless
        ``start=False`` (even with empty data, like a real device)."""
        link_address = _parse_address(address, address_type)
        if link_address in self._advertisers:
            raise ValueError(f"an advertiser with address {address} already exists on this radio")
        if interval_ms < MIN_INTERVAL_MS:
            raise ValueError(f"interval_ms must be >= {MIN_INTERVAL_MS}")
        is_public = address_type == "public"
        controller = self._new_controller(
            f"adv-{link_address.to_string(False)}",
            public_address=link_address if is_public else None,
            extended=False,
        )
        device = Device(
            name=f"mitherm-sim-{link_address.to_string(False)}",
            address=None if is_public else link_address,
            host=Host(controller, AsyncPipeSink(controller)),
        )
        advertiser = VirtualAdvertiser(
            self, device, controller, link_address, interval_ms=interval_ms, connectable=connectable
        )
        self._advertisers[link_address] = advertiser
        try:
            await device.power_on()
            advertiser.rssi = rssi
            if data:
                await advertiser.set_data(data)
            if scan_response:
                await advertiser.set_scan_response(scan_response)
            if start:
                await advertiser.start()
        except BaseException:
            await advertiser.close()
            raise
        return advertiser

    def get_advertiser(self, address: str, address_type: AddressType = "public") -> VirtualAdvertiser | None:
        return self._advertisers.get(_parse_address(address, address_type))

    def open_hci_transport(self, *, extended: bool = True) -> Transport:
        """A new controller on the link, as a Bumble ``Transport`` for an in-process host
        (``Host(transport.source, transport.sink)``). ``extended=False`` gives a BLE 4.x controller
        (legacy HCI scanning). ``await transport.close()`` removes the controller from the link."""
        controller = self._new_controller(f"hci-{next(self._serial)}", extended=extended)
        transport = _ControllerTransport(controller, self)
        self._transports.add(transport)
        return transport

    #: Alias matching the wording of the original design note.
    hci_transport_for_scanner = open_hci_transport

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the link as a Bumble ``tcp-server`` HCI transport: every TCP client gets its own
        controller on the link and speaks H4 HCI to it (Bumble transport ``tcp-client:HOST:PORT``).
        ``port=0`` picks a free port. Returns the bound port."""
        self._require_link()
        server = await asyncio.get_running_loop().create_server(lambda: _HciServerProtocol(self), host=host, port=port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        logger.info("virtual radio: HCI over TCP on %s:%d", host, bound)
        return int(bound)

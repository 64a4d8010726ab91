"""Device side of Telink OTA (service ``…1912``, characteristic ``…2b12``) for virtual pvvx and stock devices.

:class:`OtaTarget` is the sans-IO device half of :mod:`mitherm.protocols.ota` (firmware.md §2.1, §2.3,
§2.4, §6), on an explicit clock (``now`` arguments):

* ``00 FF`` / ``01 FF`` start a transfer (a new start restarts from block 0);
* data frames: CRC-16/MODBUS checked (error 2), index must be the next one (a repeated index is ignored as
  the Telink SDK does, a gap is error 1), writes beyond the bank are error 3 (128 KiB for legacy OTA: on a
  real device an image that large overwrites the running bank, §2.3), any write restarts the 16 s
  inactivity timer (error 5);
* ``02 FF idx ~idx``: ``idx`` must be the last block received (error 4), then the image CRC-32 from the
  header size field is checked (error 6); on success the device reboots into the new image;
* a read returns the error code byte (0 while all is well);
* after any error the device reboots into the **old** image (legacy OTA writes the other bank);
* extended OTA (``73 addr size_kB`` on 0x1F1F, pvvx v4.6+): ``73 02`` busy, ``73 04 addr 0`` per erased
  4 KiB sector, ``73 03 addr size`` ready; ``73 01`` while an OTA runs, ``73 FE`` for a bad address/size.
* stock firmware ignores the OTA characteristic until a Mi login succeeded on this connection.

``install(server, device)`` adds the OTA service and, on pvvx devices, the 0x73 command on 0x1F1F. A
reboot drops the link; the device then advertises on and reports the new version: ``device.firmware_version``
(pvvx, BCD int: DIS 0x2A28 reads it, and this module rewrites the version in 0x1F1F reads and the ``55``/``00``
replies) or ``device.firmware`` (stock, DIS 0x2A26). The simulator keeps the device's kind: a stock image on
a virtual pvvx device (or the reverse) is received and checked, but the device keeps its firmware.

Fault injection (``state_of(device)``): ``lose_blocks`` (block numbers that never arrive),
``corrupt_blocks`` (arrive with a flipped byte), ``disconnect_at_block`` (the device drops the link when
that block arrives), ``timeout`` (the inactivity timer, default 16 s), ``reboot_delay``, ``erase_delay``,
``ext_supported``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from ...firmware.image import OFF_SIZE, crc32_telink, pvvx_version_bcd, read_test_tag
from ...gatt.link import normalize_uuid
from ...protocols import ota as proto

log = logging.getLogger(__name__)

__all__ = ["OtaState", "OtaTarget", "install", "state_of"]

INACTIVITY_TIMEOUT = 16.0
BANK_SIZE = 0x20000
EXT_MIN_KB, EXT_MAX_KB = 4, 208

_STATES: weakref.WeakKeyDictionary[Any, OtaState] = weakref.WeakKeyDictionary()


class OtaTarget:
    """The device's OTA state machine. ``reboot`` becomes ``"new"`` or ``"old"`` when the device wants to
    restart (into the received image or the running one); ``image`` holds the received bytes."""

    def __init__(self, *, timeout: float = INACTIVITY_TIMEOUT, bank_size: int = BANK_SIZE) -> None:
        self.timeout = timeout
        self.bank_size = bank_size
        self.limit = bank_size
        self.extended = False
        self.state = "idle"  # idle | receiving | error | done
        self.error = 0
        self.buffer = bytearray()
        self.last_index = -1
        self.last_write = 0.0
        self.reboot: str | None = None
        self.blocks = 0  # frames accepted

    @property
    def image(self) -> bytes:
        return bytes(self.buffer)

    def _fail(self, code: int) -> None:
        if self.state in ("error", "done"):
            return
        self.state, self.error, self.reboot = "error", code, "old"
        log.info("virtual OTA: error %d (%s)", code, proto.OTA_ERRORS.get(code))

    def write(self, data: bytes, now: float) -> None:
        data = bytes(data)
        if self.state in ("error", "done") or len(data) < 2:
            return
        self.tick(now)
        if self.state == "error":
            return
        index = struct.unpack_from("<H", data)[0]
        if index == proto.CMD_OTA_FW_VERSION:
            self.last_write = now
            return
        if index == proto.CMD_OTA_START:
            self.state, self.error, self.buffer, self.last_index, self.blocks = "receiving", 0, bytearray(), -1, 0
            self.last_write = now
            return
        if self.state != "receiving":
            return  # data or END without a start: ignored
        self.last_write = now
        if index == proto.CMD_OTA_END:
            self._end(data)
            return
        if index > proto.MAX_BLOCK_INDEX:
            return  # other commands (0xFF03…) are not used by these tools
        try:
            index, chunk, crc_ok = proto.decode_block(data)
        except ValueError:
            crc_ok, chunk = False, b""
        if not crc_ok:
            self._fail(2)
            return
        if index <= self.last_index:
            return  # a repeated frame: the SDK ignores it
        if index != self.last_index + 1:
            self._fail(1)
            return
        if (index + 1) * proto.BLOCK_DATA > self.limit:
            if not self.extended:
                log.warning("virtual OTA: legacy image beyond 128 KiB; a real device would overwrite its running bank")
            self._fail(3)
            return
        self.buffer += chunk
        self.last_index = index
        self.blocks += 1

    def _end(self, data: bytes) -> None:
        if len(data) < 6:
            self._fail(4)
            return
        last, inverted = struct.unpack_from("<HH", data, 2)
        if last ^ inverted != 0xFFFF or last != self.last_index:
            self._fail(4)
            return
        image = self.buffer
        if len(image) < OFF_SIZE + 4:
            self._fail(6)
            return
        size = struct.unpack_from("<I", image, OFF_SIZE)[0]
        if size < OFF_SIZE + 4 or size > len(image):
            self._fail(6)
            return
        stored = struct.unpack_from("<I", image, size - 4)[0]
        if image[8:12] != b"KNLT" or stored != crc32_telink(bytes(image[: size - 4])):
            self._fail(6)
            return
        self.state, self.reboot = "done", "new"

    def read(self, now: float) -> bytes:
        self.tick(now)
        return bytes([self.error])

    def tick(self, now: float) -> None:
        if self.state == "receiving" and now - self.last_write > self.timeout:
            self._fail(5)

    def link_lost(self) -> None:
        """The central went away mid-transfer: the SDK gives up and the old image keeps running."""
        if self.state == "receiving":
            self.state, self.error, self.reboot = "error", 0, "old"

    def ext_request(self, body: bytes) -> list[bytes]:
        """``73 addr size_kB``: the notifications (busy, one per erased sector, ready) or a refusal."""
        if self.state == "receiving":
            return [bytes([proto.CMD_EXT_OTA, proto.EXT_RUNNING])]
        if len(body) < 8:
            return [bytes([proto.CMD_EXT_OTA, proto.EXT_BAD_PARAM])]
        address, size_kb = struct.unpack_from("<II", body)
        if address % proto.EXT_SECTOR or not EXT_MIN_KB <= size_kb < EXT_MAX_KB:
            return [bytes([proto.CMD_EXT_OTA, proto.EXT_BAD_PARAM]) + struct.pack("<II", address, size_kb)]
        self.extended = True
        self.limit = size_kb * 1024
        out = [bytes([proto.CMD_EXT_OTA, proto.EXT_BUSY]) + struct.pack("<II", address, size_kb)]
        for sector in range(-(-self.limit // proto.EXT_SECTOR)):
            out.append(bytes([proto.CMD_EXT_OTA, proto.EXT_ERASE]) + struct.pack("<II", address + sector * 4096, 0))
        out.append(bytes([proto.CMD_EXT_OTA, proto.EXT_READY]) + struct.pack("<II", address, size_kb))
        return out


@dataclass
class OtaState:
    """The virtual device's OTA side: the current target, faults, and what it runs."""

    device: Any
    timeout: float = INACTIVITY_TIMEOUT
    reboot_delay: float = 0.3
    erase_delay: float = 0.001
    ext_supported: bool = True
    lose_blocks: set[int] = field(default_factory=set)
    corrupt_blocks: set[int] = field(default_factory=set)
    disconnect_at_block: int | None = None
    authenticated: bool = False
    target: OtaTarget = field(default_factory=OtaTarget)
    flashes: list[bytes] = field(default_factory=list)  # images the device rebooted into
    reboots: int = 0
    frames: int = 0  # data frames seen on this connection
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def new_target(self) -> None:
        self.target = OtaTarget(timeout=self.timeout)
        self.frames = 0

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def state_of(device: Any) -> OtaState:
    return _STATES[device]


def _running_pvvx_version(device: Any) -> int | None:
    version = getattr(device, "firmware_version", None)
    return version if isinstance(version, int) else None


def _boot(device: Any, image: bytes) -> None:
    """Switch the virtual device to ``image``: its test tag says what it is (other images: version unchanged)."""
    tag = read_test_tag(image)
    if tag is None:
        log.info("virtual %s: booted an image without a test tag; version unchanged", device.address)
        return
    if tag.kind != device.kind:
        log.warning(
            "virtual %s: a %s image on a %s device; the simulator keeps the device kind",
            device.address,
            tag.kind,
            device.kind,
        )
        return
    if tag.kind == "pvvx":
        device.firmware_version = pvvx_version_bcd(tag.version)  # what DIS 0x2A28 and 0x1F1F report
    else:
        device.firmware = tag.version  # DIS 0x2A26 of stock firmware


def _patch_version(device: Any, data: bytes) -> bytes:
    """pvvx replies carrying the firmware version, rewritten for the image the device now runs."""
    version = _running_pvvx_version(device)
    if version is None or not data:
        return data
    if data[0] in (0x55, 0x56) and len(data) >= 2:
        return data[:1] + bytes([version]) + data[2:]
    if data[0] == 0x00 and len(data) >= 6:  # 00 rev hw_version(u16) sw_version(u16) …
        return data[:4] + struct.pack("<H", version) + data[6:]
    return data


def install(server: Any, device: Any) -> None:
    kind = getattr(device, "kind", None)
    if kind not in ("pvvx", "stock"):
        return
    from ..gatt_server import CharSpec

    state = _STATES.get(device) or OtaState(device)
    state.device = device
    state.new_target()
    _STATES[device] = state
    needs_login = kind == "stock"

    def now() -> float:
        return time.monotonic()

    def check_reboot() -> None:
        target = state.target
        if target.reboot is not None and not getattr(target, "_scheduled", False):
            target._scheduled = True  # type: ignore[attr-defined]
            state.spawn(reboot(target))

    async def reboot(target: OtaTarget) -> None:
        await asyncio.sleep(state.reboot_delay)
        if target.reboot == "new":
            state.flashes.append(target.image)
            _boot(device, target.image)
            log.info("virtual %s: rebooting into the new image", device.address)
        else:
            log.info("virtual %s: rebooting into the old image after OTA error %d", device.address, target.error)
        state.reboots += 1
        await server.disconnect()
        state.new_target()

    async def watchdog(target: OtaTarget) -> None:
        while target is state.target and target.state == "receiving":
            await asyncio.sleep(min(0.5, target.timeout / 4))
            target.tick(now())
        check_reboot()

    async def on_write(data: bytes) -> None:
        if needs_login and not (state.authenticated or getattr(device, "mi_logged_in", False)):
            return  # stock firmware: the OTA service does nothing before a Mi login
        data = bytes(data)
        target = state.target
        was_receiving = target.state == "receiving"
        if len(data) == proto.BLOCK_FRAME and struct.unpack_from("<H", data)[0] <= proto.MAX_BLOCK_INDEX:
            index = struct.unpack_from("<H", data)[0]
            state.frames += 1
            if state.disconnect_at_block is not None and index == state.disconnect_at_block:
                state.disconnect_at_block = None
                target.link_lost()
                await server.disconnect()
                return
            if index in state.lose_blocks:
                state.lose_blocks.discard(index)
                return  # lost on air
            if index in state.corrupt_blocks:
                state.corrupt_blocks.discard(index)
                data = data[:5] + bytes([data[5] ^ 0x5A]) + data[6:]
        target.write(data, now())
        if target.state == "receiving" and not was_receiving:
            state.spawn(watchdog(target))
        check_reboot()

    def on_read() -> bytes:
        if needs_login and not (state.authenticated or getattr(device, "mi_logged_in", False)):
            return b""
        value = state.target.read(now())
        check_reboot()
        return value

    server.add_service(
        proto.OTA_SERVICE,
        [CharSpec(proto.OTA_CHAR, {"read", "write_without_response"}, on_read=on_read, on_write=on_write)],
    )

    previous_disconnect = server.on_disconnect
    previous_connect = server.on_connect

    def on_disconnect() -> None:
        state.target.link_lost()
        if state.target.reboot is None or state.target.reboot == "old":
            state.new_target()
        state.authenticated = False
        if previous_disconnect is not None:
            previous_disconnect()

    def on_connect() -> None:
        state.authenticated = False
        if previous_connect is not None:
            previous_connect()

    server.on_disconnect = on_disconnect
    server.on_connect = on_connect

    original_notify = server.notify
    pvvx_char = normalize_uuid(proto.PVVX_CMD_CHAR)
    if needs_login:
        from ...protocols.miauth import CONTROL_UUID

        control = normalize_uuid(CONTROL_UUID)
        logged_in = bytes.fromhex("21000000")

        async def notify_watching_login(char_uuid: str, data: bytes) -> None:
            # the login succeeded when the device says so on 0x0010 (keys.md §1.9)
            if normalize_uuid(char_uuid) == control and bytes(data) == logged_in:
                state.authenticated = True
            await original_notify(char_uuid, data)

        server.notify = notify_watching_login
        return

    async def notify_with_version(char_uuid: str, data: bytes) -> None:
        if normalize_uuid(char_uuid) == pvvx_char:
            data = _patch_version(device, bytes(data))
        await original_notify(char_uuid, data)

    server.notify = notify_with_version
    _wrap_pvvx_channel(server, device, state)


def _wrap_pvvx_channel(server: Any, device: Any, state: OtaState) -> None:
    """Add 0x73 (extended OTA) to the pvvx command characteristic and keep its reads on the new version."""
    from bumble.att import AttributeValue

    try:
        characteristic = server.characteristic(proto.PVVX_CMD_CHAR)
    except KeyError:
        return
    inner = characteristic.value

    def read(connection: Any) -> Any:
        value = inner.read(connection)
        return _patch_version(device, bytes(value)) if isinstance(value, bytes | bytearray) else value

    def write(connection: Any, value: bytes) -> Any:
        data = bytes(value)
        if data[:1] == bytes([proto.CMD_EXT_OTA]):
            state.spawn(ext_ota(data[1:]))
            return None
        return inner.write(connection, value)

    async def ext_ota(body: bytes) -> None:
        if not state.ext_supported:
            replies = [bytes([proto.CMD_EXT_OTA, proto.EXT_UNSUPPORTED])]
        else:
            replies = state.target.ext_request(body)
        for reply in replies:
            if not server.connected:
                return
            await server.notify(proto.PVVX_CMD_CHAR, reply)
            await asyncio.sleep(state.erase_delay)

    characteristic.value = AttributeValue(read=read, write=write)

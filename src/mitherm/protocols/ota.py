"""Telink BLE OTA (legacy dual-bank OTA and pvvx extended OTA), client side, without I/O.

Protocol (shared/reference/firmware.md §2.1, §2.4). Everything is written, without response, to the OTA
characteristic ``00010203-0405-0607-0809-0a0b0c0d2b12``:

1. ``00 FF`` (CMD_OTA_FW_VERSION), ``01 FF`` (CMD_OTA_START), then ~300 ms pause;
2. blocks ``idx(u16) data[16] crc(u16)``: the image in 16-byte pieces (the last padded with 0xFF), CRC-16/MODBUS
   over idx + data; after every 8 blocks the client **reads** the characteristic: a non-zero first byte is
   the device's error code (:data:`OTA_ERRORS`) and the transfer stops;
3. ``02 FF last_idx ~last_idx`` (CMD_OTA_END). The device checks the image CRC-32, switches banks and
   reboots; a failed legacy OTA leaves the old image running (the new one goes to the other bank).

There is no resume: the device only accepts the next index (a repeated index is ignored, a gap is error 1
"lost packet") and reboots after any error, so a failed transfer is restarted from block 0 on a new
connection.

Extended OTA (pvvx v4.6+, images > 128 KiB): before step 1 the client writes ``73 addr(u32) size_kB(u32)``
(address 0x40000) to the pvvx command characteristic 0x1F1F and waits for its notifications:
``73 02 …`` busy/erasing, ``73 04 addr 0`` per erased sector, ``73 03 addr size_k`` ready (then the legacy
transfer runs into that area), ``73 01`` OTA already running, ``73 FE`` bad parameter, ``73 FF`` unsupported.

:class:`OtaClient` is the state machine: ask it for the next :class:`Action`, perform it, feed back what
happened (:meth:`~OtaClient.receive_read`, :meth:`~OtaClient.receive_notification`,
:meth:`~OtaClient.receive_timeout`, :meth:`~OtaClient.receive_disconnect`) and collect events
(:meth:`~OtaClient.events`). :func:`run_ota` is the thin driver for a :class:`~mitherm.gatt.link.GattLink`."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CMD_OTA_END",
    "CMD_OTA_FW_VERSION",
    "CMD_OTA_START",
    "EXT_OTA_ADDRESS",
    "EXT_STATUS",
    "OTA_CHAR",
    "OTA_ERRORS",
    "OTA_SERVICE",
    "PVVX_CMD_CHAR",
    "Action",
    "EraseProgress",
    "Event",
    "ExtOtaReady",
    "OtaClient",
    "OtaFailed",
    "OtaFinished",
    "Progress",
    "Read",
    "Sleep",
    "Subscribe",
    "WaitNotification",
    "Write",
    "crc16_modbus",
    "decode_block",
    "encode_block",
    "encode_end",
    "run_ota",
]

OTA_SERVICE = "00010203-0405-0607-0809-0a0b0c0d1912"
OTA_CHAR = "00010203-0405-0607-0809-0a0b0c0d2b12"
PVVX_CMD_CHAR = "00001f1f-0000-1000-8000-00805f9b34fb"

CMD_OTA_FW_VERSION = 0xFF00
CMD_OTA_START = 0xFF01
CMD_OTA_END = 0xFF02
MAX_BLOCK_INDEX = 0xFEFF  # indexes from 0xFF00 are commands
BLOCK_DATA = 16
BLOCK_FRAME = 20
STATUS_EVERY = 8
START_DELAY = 0.3  # TelinkMiFlasher waits ~300 ms after CMD_OTA_START

#: Device error codes (SDK ble_ll_ota.h, TelinkMiFlasher tab_ota_errors)
OTA_ERRORS: dict[int, str] = {
    0: "ok",
    1: "lost packet(s)",
    2: "data CRC error",
    3: "flash write error",
    4: "lost last packet(s)",
    5: "timeout (no data for 16 s)",
    6: "firmware CRC check failed",
}

CMD_EXT_OTA = 0x73
EXT_OTA_ADDRESS = 0x40000
EXT_OK, EXT_RUNNING, EXT_BUSY, EXT_READY, EXT_ERASE, EXT_BAD_PARAM, EXT_UNSUPPORTED = 0, 1, 2, 3, 4, 0xFE, 0xFF
EXT_STATUS: dict[int, str] = {
    EXT_OK: "ok",
    EXT_RUNNING: "an OTA is already running",
    EXT_BUSY: "busy (erasing)",
    EXT_READY: "ready",
    EXT_ERASE: "sector erased",
    EXT_BAD_PARAM: "bad parameter (address or size)",
    EXT_UNSUPPORTED: "command not supported by this firmware",
}
EXT_SECTOR = 0x1000


# --- codec -------------------------------------------------------------------------------------------


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS: reflected poly 0xA001, init 0xFFFF, no final xor."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def encode_block(index: int, chunk: bytes) -> bytes:
    """One 20-byte data frame; ``chunk`` (≤ 16 bytes) is padded with 0xFF."""
    if not 0 <= index <= MAX_BLOCK_INDEX:
        raise ValueError(f"block index {index} out of range (images are at most {MAX_BLOCK_INDEX + 1} blocks)")
    head = struct.pack("<H", index) + bytes(chunk).ljust(BLOCK_DATA, b"\xff")
    return head + struct.pack("<H", crc16_modbus(head))


def decode_block(frame: bytes) -> tuple[int, bytes, bool]:
    """``(index, data, crc_ok)`` of a 20-byte data frame."""
    if len(frame) != BLOCK_FRAME:
        raise ValueError(f"a data frame is {BLOCK_FRAME} bytes, not {len(frame)}")
    index = struct.unpack_from("<H", frame)[0]
    crc = struct.unpack_from("<H", frame, 18)[0]
    return index, bytes(frame[2:18]), crc == crc16_modbus(frame[:18])


def encode_command(cmd: int) -> bytes:
    return struct.pack("<H", cmd)


def encode_end(last_index: int) -> bytes:
    return struct.pack("<HHH", CMD_OTA_END, last_index, ~last_index & 0xFFFF)


def encode_ext_ota(size: int, address: int = EXT_OTA_ADDRESS) -> bytes:
    size_kb = -(-size // 1024)
    return struct.pack("<BII", CMD_EXT_OTA, address, size_kb)


def decode_ext_reply(data: bytes) -> tuple[int, int | None, int | None]:
    """``(status, address, size_k)`` of a ``73 …`` notification (address/size None when absent)."""
    status = data[1] if len(data) > 1 else EXT_UNSUPPORTED
    address = struct.unpack_from("<I", data, 2)[0] if len(data) >= 6 else None
    size = struct.unpack_from("<I", data, 6)[0] if len(data) >= 10 else None
    return status, address, size


# --- actions and events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``data`` to ``uuid`` without response."""

    uuid: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Read:
    """Read ``uuid`` and feed the value to :meth:`OtaClient.receive_read`. ``final``: the read after
    CMD_OTA_END, which may fail because the device is already rebooting (then call receive_disconnect)."""

    uuid: str
    final: bool = False


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Enable notifications on ``uuid`` and feed them to :meth:`OtaClient.receive_notification`."""

    uuid: str


@dataclass(frozen=True, slots=True)
class WaitNotification:
    """Wait up to ``timeout`` seconds for a notification; on timeout call :meth:`OtaClient.receive_timeout`."""

    timeout: float


Action = Write | Read | Sleep | Subscribe | WaitNotification


@dataclass(frozen=True, slots=True)
class Progress:
    sent: int  # image bytes sent and confirmed by the last status read (or just sent)
    total: int
    block: int
    blocks: int


@dataclass(frozen=True, slots=True)
class EraseProgress:
    address: int
    erased: int  # sectors so far
    sectors: int


@dataclass(frozen=True, slots=True)
class ExtOtaReady:
    address: int
    size_kb: int


@dataclass(frozen=True, slots=True)
class OtaFinished:
    """CMD_OTA_END sent. ``status``: the code read back (0 = ok), None when the device was already rebooting."""

    status: int | None


@dataclass(frozen=True, slots=True)
class OtaFailed:
    """The transfer stopped. ``code``: the device's error code (OTA_ERRORS) or ext-OTA status, None for a
    link failure; ``block``: blocks sent when it happened; ``old_image_running``: legacy OTA guarantees it."""

    phase: str  # "prepare" (ext OTA), "transfer", "end"
    code: int | None
    message: str
    block: int
    old_image_running: bool

    def __str__(self) -> str:
        code = f" (device error {self.code})" if self.code is not None else ""
        return f"{self.message}{code}"


Event = Progress | EraseProgress | ExtOtaReady | OtaFinished | OtaFailed


class OtaError(Exception):
    """Raised by :func:`run_ota` with the :class:`OtaFailed` event."""

    def __init__(self, failure: OtaFailed) -> None:
        super().__init__(str(failure))
        self.failure = failure


# --- the client state machine ----------------------------------------------------------------------------


class OtaClient:
    """Sans-IO Telink OTA client for one image (``payload`` as checked by ``mitherm.firmware.parse_image``).

    States: ``ext_prepare`` → ``ext_wait`` (extended only) → ``start`` → ``send`` → ``end`` → ``done`` |
    ``failed``. ``next_action()`` returns None once done or failed."""

    def __init__(
        self,
        payload: bytes,
        *,
        extended: bool = False,
        status_every: int = STATUS_EVERY,
        start_delay: float = START_DELAY,
        erase_timeout: float = 10.0,
        ota_char: str = OTA_CHAR,
        cmd_char: str = PVVX_CMD_CHAR,
    ) -> None:
        self.payload = bytes(payload)
        self.blocks = -(-len(self.payload) // BLOCK_DATA)
        if self.blocks == 0:
            raise ValueError("empty image")
        if self.blocks > MAX_BLOCK_INDEX + 1:
            raise ValueError("image too large for Telink OTA block indexes")
        self.extended = extended
        self.status_every = status_every
        self.start_delay = start_delay
        self.erase_timeout = erase_timeout
        self.ota_char = ota_char
        self.cmd_char = cmd_char
        self.state = "ext_prepare" if extended else "start"
        self.next_block = 0
        self._queue: list[Action] = []
        self._events: list[Event] = []
        self._pending_read = False
        self._erased = 0
        self._sectors = -(-len(self.payload) // EXT_SECTOR)
        self.failure: OtaFailed | None = None
        self.finished: OtaFinished | None = None

    # results ----------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state in ("done", "failed")

    def events(self) -> list[Event]:
        """Events since the last call (progress, erase progress, finished, failed)."""
        out, self._events = self._events, []
        return out

    def _fail(self, phase: str, code: int | None, message: str) -> None:
        self.state = "failed"
        self._queue.clear()
        self.failure = OtaFailed(phase, code, message, self.next_block, old_image_running=True)
        self._events.append(self.failure)

    # the action loop ----------------------------------------------------------------------------------

    def next_action(self) -> Action | None:
        if self._queue:
            return self._queue.pop(0)
        if self._pending_read or self.done:
            return None
        if self.state == "ext_prepare":
            self.state = "ext_wait"
            self._queue += [
                Subscribe(self.cmd_char),
                Write(self.cmd_char, encode_ext_ota(len(self.payload))),
            ]
            return self._queue.pop(0)
        if self.state == "ext_wait":
            return WaitNotification(self.erase_timeout)
        if self.state == "start":
            self.state = "send"
            self._queue += [
                Write(self.ota_char, encode_command(CMD_OTA_FW_VERSION)),
                Write(self.ota_char, encode_command(CMD_OTA_START)),
                Sleep(self.start_delay),
            ]
            return self._queue.pop(0)
        if self.state == "send":
            if self.next_block >= self.blocks:
                self.state = "end"
                self._pending_read = True
                self._queue += [Write(self.ota_char, encode_end(self.blocks - 1)), Read(self.ota_char, final=True)]
                return self._queue.pop(0)
            i = self.next_block
            self.next_block += 1
            frame = encode_block(i, self.payload[i * BLOCK_DATA : (i + 1) * BLOCK_DATA])
            if self.next_block % self.status_every == 0:
                # flow control and error check every 8 blocks (TelinkMiFlasher sendOTAblock)
                self._pending_read = True
                self._queue.append(Read(self.ota_char))
            else:
                self._progress()
            return Write(self.ota_char, frame)
        return None

    def _progress(self) -> None:
        sent = min(self.next_block * BLOCK_DATA, len(self.payload))
        self._events.append(Progress(sent, len(self.payload), self.next_block, self.blocks))

    # feeding results -------------------------------------------------------------------------------------

    def receive_read(self, data: bytes) -> None:
        """The value of a status read. Empty or a zero first byte: fine; otherwise an error code."""
        if not self._pending_read:
            return
        self._pending_read = False
        code = data[0] if data else 0
        if self.state == "end":
            if code:
                self._fail("end", code, f"device reported {OTA_ERRORS.get(code, f'error {code}')} after the last block")
                return
            self.state = "done"
            self.finished = OtaFinished(code)
            self._events.append(self.finished)
            return
        if code:
            self._fail("transfer", code, f"device reported {OTA_ERRORS.get(code, f'error {code}')}")
            return
        self._progress()

    def receive_notification(self, data: bytes) -> None:
        """A notification on the pvvx command characteristic (extended OTA preparation)."""
        if self.state != "ext_wait" or not data or data[0] != CMD_EXT_OTA:
            return
        status, address, size = decode_ext_reply(data)
        if status == EXT_ERASE:
            self._erased += 1
            self._events.append(EraseProgress(address or 0, self._erased, self._sectors))
        elif status == EXT_READY:
            self._events.append(ExtOtaReady(address or EXT_OTA_ADDRESS, size or 0))
            self.state = "start"
        elif status in (EXT_BUSY, EXT_OK):
            pass
        else:
            self._fail("prepare", status, f"extended OTA refused: {EXT_STATUS.get(status, f'status {status}')}")

    def receive_timeout(self) -> None:
        """No notification within the WaitNotification timeout."""
        if self.state == "ext_wait":
            self._fail("prepare", None, "extended OTA: the device did not report the erase as done")

    def receive_disconnect(self) -> None:
        """The link dropped (or a read/write failed because of it)."""
        if self.done:
            return
        if self.state == "end" and self._pending_read:
            # the device verified the image and is rebooting: the outcome shows after reconnecting
            self._pending_read = False
            self._queue.clear()
            self.state = "done"
            self.finished = OtaFinished(None)
            self._events.append(self.finished)
            return
        phase = {"ext_prepare": "prepare", "ext_wait": "prepare"}.get(self.state, "transfer")
        self._fail(phase, None, f"link lost at block {max(0, self.next_block - 1)} of {self.blocks}")


# --- the driver ---------------------------------------------------------------------------------------------


ProgressCallback = Callable[[Event], Any]


async def run_ota(
    link: Any,
    client: OtaClient,
    on_event: ProgressCallback | None = None,
) -> OtaFinished:
    """Drive ``client`` over a connected :class:`~mitherm.gatt.link.GattLink`. Returns the OtaFinished
    event or raises :class:`OtaError`. ``on_event`` may be a coroutine function (it is awaited)."""
    from mitherm.gatt.link import GattError

    notifications: asyncio.Queue[bytes] = asyncio.Queue()

    async def emit() -> None:
        for event in client.events():
            if on_event is not None:
                result = on_event(event)
                if isinstance(result, Awaitable):
                    await result

    while (action := client.next_action()) is not None:
        try:
            if isinstance(action, Write):
                await link.write(action.uuid, action.data, response=False)
            elif isinstance(action, Read):
                client.receive_read(await link.read(action.uuid))
            elif isinstance(action, Sleep):
                await asyncio.sleep(action.seconds)
            elif isinstance(action, Subscribe):
                await link.subscribe(action.uuid, notifications.put_nowait)
            elif isinstance(action, WaitNotification):
                try:
                    client.receive_notification(await asyncio.wait_for(notifications.get(), action.timeout))
                except TimeoutError:
                    client.receive_timeout()
        except GattError:
            client.receive_disconnect()
        await emit()
    await emit()
    if client.failure is not None:
        raise OtaError(client.failure)
    assert client.finished is not None
    return client.finished

"""Mi "standard auth" (BLE activation and login), sans-IO, after shared/reference/keys.md §1.

Nothing here touches a radio. A machine is fed the notifications the device sends and answers with
what to write; a driver (:func:`mitherm.device.run_protocol`) moves the bytes over a GATT link, and the
simulator (:mod:`mitherm.sim.gatt.miauth`) runs the device side of the same framing::

    client = RegisterClient()
    out = client.start()                    # [Write(0x0010, a2000000)]
    out = client.receive(DATA_UUID, data)   # more writes, then Registered(...) or Failed(...)
    out = client.timeout()                  # no notification within client.timeout_s
    out = client.disconnected()             # the link dropped

Outputs are :class:`Write` (perform in order) and events: :class:`Progress`, :class:`Registered`,
:class:`LoggedIn`, :class:`Failed`. After a Registered / LoggedIn / Failed the machine is ``done``.

GATT layout (§1.1): service 0xFE95, 0x0010 ("UPNP", 4-byte commands and status codes), 0x0019
("AVDTP", framed transfers). Framing on 0x0019 (§1.2): a transfer is an announcement ``00 00 00 TT NN NN``
(payload type TT, NN data frames, u16 LE), answered by ready ``00 00 01 01``; then data frames ``index
(u16 LE, from 1) | up to 18 bytes``, answered by received-ok ``00 00 01 00``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import string
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "ACTIVATION_ADVICE",
    "CONTROL_UUID",
    "DATA_UUID",
    "DEFAULT_STEP_TIMEOUT",
    "FRAME_PAYLOAD",
    "MI_SERVICE_UUID",
    "RCV_ERROR",
    "RCV_OK",
    "RCV_RDY",
    "STATUS",
    "Abort",
    "Endpoint",
    "Event",
    "Failed",
    "LoggedIn",
    "LoginClient",
    "Notification",
    "PayloadType",
    "Progress",
    "RegisterClient",
    "Registered",
    "Script",
    "SessionKeys",
    "SetupKeys",
    "Status",
    "Write",
    "app_proof",
    "decrypt_did",
    "derive_login_keys",
    "derive_setup_keys",
    "device_proof",
    "did_text",
    "encrypt_did",
    "frames_for",
    "make_did",
    "parse_token",
    "private_key_from_rng",
    "public_key_bytes",
    "public_key_from_bytes",
    "status_message",
]

_BASE = "-0000-1000-8000-00805f9b34fb"
MI_SERVICE_UUID = "0000fe95" + _BASE
CONTROL_UUID = "00000010" + _BASE  # "UPNP": commands app -> device, status codes device -> app
DATA_UUID = "00000019" + _BASE  # "AVDTP": framed transfers, both directions

#: payload bytes per data frame at the default ATT MTU (23 - 3 ATT - 2 index)
FRAME_PAYLOAD = 18
#: seconds a client waits for each notification (miauth waits 3 s; a little slack for slow adapters)
DEFAULT_STEP_TIMEOUT = 5.0

# --- 0x0019 control frames (§1.2) --------------------------------------------------------------------

RCV_RDY = bytes.fromhex("00000101")
RCV_OK = bytes.fromhex("00000100")
RCV_TIMEOUT = bytes.fromhex("000001050100")
RCV_ERROR = bytes.fromhex("000001050300")
#: TelinkMiFlasher's ack of an inline transfer (``00 00 02 TT payload`` in a single notification)
INLINE_ACK = bytes.fromhex("00000300")
_ANNOUNCE = b"\x00\x00\x00"
_INLINE = b"\x00\x00\x02"
#: stock 2.1.1 "MTU check" (``00 00 04 xx …``), echoed with 05 in place of 04 (§1.6)
_MTU_CHECK = b"\x00\x00\x04"


class PayloadType(IntEnum):
    """The TT byte of an announcement (§1.2 table)."""

    DEVICE_INFO = 0x00  # device -> app: info (+ DID); app -> device: the encrypted DID
    PUBLIC_KEY = 0x03  # ECDH P-256, raw X || Y
    APP_PROOF = 0x0A
    APP_RANDOM = 0x0B
    DEVICE_PROOF = 0x0C
    DEVICE_RANDOM = 0x0D


# --- 0x0010 commands and status codes (§1.3) -----------------------------------------------------------

CMD_GET_INFO = bytes.fromhex("a2000000")  # starts a registration
CMD_SET_KEY = bytes.fromhex("15000000")  # starts the key exchange
CMD_AUTH = bytes.fromhex("13000000")  # "check the encrypted DID and finish"
CMD_LOGIN = bytes.fromhex("24000000")
COMMANDS = {CMD_GET_INFO[0]: "get info", CMD_SET_KEY[0]: "set key", CMD_AUTH[0]: "auth", CMD_LOGIN[0]: "login"}

_RESET_BINDING = (
    "reset its binding first (models with a button: long-press it; CGG1-M: hold it 2 s until the Bluetooth icon blinks)"
)
#: what to tell the user when a device does not take part in an activation
ACTIVATION_ADVICE = (
    "Stock firmware 2.1.1_0159 (LYWSD03MMC sold since about 2023) and MJWSD06MMC 2.1.1_0009 do not accept "
    "activation at all: keep the device in Xiaomi Home, fetch its token and bindkey with `mitherm cloud keys` "
    f"and prove the token with `mitherm login`. Other firmware: {_RESET_BINDING}, then run `mitherm activate` "
    "again right away; close Xiaomi Home and any flasher page, which keep the device connected."
)
_LINK_ADVICE = "A notification was lost or the device went out of range: move closer and try again."


@dataclass(frozen=True, slots=True)
class Status:
    """A status code the device notifies on 0x0010 (first byte; the other three are zero)."""

    code: int
    name: str  # Failed.code when it ends a run
    message: str
    ok: bool = False


STATUS: dict[int, Status] = {
    s.code: s
    for s in (
        Status(0x11, "registered", "Registration accepted (status 11).", ok=True),
        Status(
            0x12,
            "registration_failed",
            "The device rejected the registration (status 12): it could not verify the encrypted device id. "
            f"Run `mitherm activate` again; if it keeps failing, {_RESET_BINDING}.",
        ),
        Status(0x13, "registration_verified", "Registration verified (status 13).", ok=True),
        Status(
            0x14,
            "registration_verify_failed",
            "The device could not verify the registration (status 14). "
            f"Run `mitherm activate` again; if it keeps failing, {_RESET_BINDING}.",
        ),
        Status(0x21, "logged_in", "Login accepted (status 21).", ok=True),
        Status(
            0x22,
            "invalid_token",
            "Login failed (status 22): the device says the token (LTMK) is not its token. The token is from an "
            "earlier pairing or of another device: fetch the current one (`mitherm cloud keys`) or use the one the "
            "last `mitherm activate` stored.",
        ),
        Status(
            0x23,
            "login_failed",
            "Login failed (status 23): the device did not accept the login proof, i.e. the token does not match. "
            "Check that it is this device's current token (24 hex digits, not the 32-digit bindkey).",
        ),
        Status(
            0xE0,
            "not_registered",
            "The device is not registered (status e0): it has no owner, so no token can log in. Activate it "
            "(`mitherm activate`) or add it in Xiaomi Home and fetch its keys (`mitherm cloud keys`).",
        ),
        Status(
            0xE1,
            "already_registered",
            "The device is already registered (status e1) to Xiaomi Home or an earlier activation and refuses a "
            f"new owner. To activate it anyway, {_RESET_BINDING} and run `mitherm activate` again. To keep the "
            "existing binding, fetch its keys (`mitherm cloud keys`) and use `mitherm login`.",
        ),
        Status(0xE2, "repeated_login", "Already logged in on this connection (status e2)."),
        Status(
            0xE3,
            "invalid_oob",
            "The device rejected the request (status e3, invalid OOB): it expects out-of-band pairing data "
            "(a code or a button press) that mitherm cannot supply.",
        ),
    )
}


def status_message(code: int) -> str:
    s = STATUS.get(code)
    return s.message if s else f"The device answered with an unknown status code {code:02x}."


# --- outputs and events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``data`` to the characteristic ``char_uuid`` (128-bit, lower case)."""

    char_uuid: str
    data: bytes

    def __repr__(self) -> str:
        return f"Write({self.char_uuid[4:8]}, {self.data.hex()})"


class Event:
    """Something the machine has to say (not bytes to send)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Progress(Event):
    """A step started (for progress displays)."""

    step: str


@dataclass(frozen=True, slots=True)
class Registered(Event):
    """Registration done: the secrets the device now holds (keys.md §1.7: save all three)."""

    token: bytes = field(repr=False)  # 12 bytes, the long-term login secret ("Mi token", LTMK)
    bindkey: bytes = field(repr=False)  # 16 bytes, the MiBeacon key
    did: bytes = field(repr=False)  # 20 bytes: 0x00 + 19 ASCII characters ("blt.3.…")
    reused_did: bool = False  # the device was bound and reported its DID


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The login session (keys.md §1.6). Thermometers need none of it after login; scooters encrypt with it."""

    dev_key: bytes = field(repr=False)
    app_key: bytes = field(repr=False)
    dev_iv: bytes = field(repr=False)
    app_iv: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoggedIn(Event):
    """The device accepted the token. ``session`` is None after status e2 (already logged in)."""

    session: SessionKeys | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Failed(Event):
    """The run ended without success. ``code``: a :data:`STATUS` name, ``timeout``, ``disconnected``,
    ``protocol_error``, ``invalid_token``, ``cancelled``."""

    code: str
    message: str


FINAL_EVENTS = (Registered, LoggedIn, Failed)

# --- crypto (keys.md §1.5, §1.6) ------------------------------------------------------------------------

Rng = Callable[[int], bytes]
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_DID_NONCE = bytes(range(0x10, 0x1C))
_DID_AAD = b"devID"
SETUP_INFO = b"mible-setup-info"
LOGIN_INFO = b"mible-login-info"


@dataclass(frozen=True, slots=True)
class SetupKeys:
    token: bytes = field(repr=False)  # OKM[0:12]
    bindkey: bytes = field(repr=False)  # OKM[12:28]
    did_key: bytes = field(repr=False)  # OKM[28:44], "A": encrypts the DID once


def private_key_from_rng(rng: Rng) -> ec.EllipticCurvePrivateKey:
    """A P-256 key from ``rng`` (deterministic for a seeded rng, which tests use)."""
    scalar = int.from_bytes(rng(40), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def public_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Raw X || Y (64 bytes): the wire form, without the 0x04 prefix."""
    n = key.public_key().public_numbers()
    return n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")


def public_key_from_bytes(raw: bytes) -> ec.EllipticCurvePublicKey:
    """ValueError unless ``raw`` is 64 bytes forming a point on P-256."""
    if len(raw) != 64:
        raise ValueError(f"a public key is 64 bytes, got {len(raw)}")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=info).derive(ikm)


def derive_setup_keys(shared_secret: bytes) -> SetupKeys:
    okm = _hkdf(shared_secret, None, SETUP_INFO)
    return SetupKeys(token=okm[0:12], bindkey=okm[12:28], did_key=okm[28:44])


def encrypt_did(did_key: bytes, did: bytes) -> bytes:
    """AES-128-CCM, nonce 10..1b, AAD "devID", 4-byte tag: 20 bytes in, 24 out."""
    return AESCCM(did_key, tag_length=4).encrypt(_DID_NONCE, did, _DID_AAD)


def decrypt_did(did_key: bytes, blob: bytes) -> bytes | None:
    """The DID, or None when the tag does not match (wrong key or damaged data)."""
    try:
        return AESCCM(did_key, tag_length=4).decrypt(_DID_NONCE, blob, _DID_AAD)
    except (InvalidTag, ValueError):
        return None


def derive_login_keys(token: bytes, app_random: bytes, dev_random: bytes) -> SessionKeys:
    okm = _hkdf(token, app_random + dev_random, LOGIN_INFO)
    return SessionKeys(dev_key=okm[0:16], app_key=okm[16:32], dev_iv=okm[32:36], app_iv=okm[36:40])


def device_proof(keys: SessionKeys, app_random: bytes, dev_random: bytes) -> bytes:
    return hmac.new(keys.dev_key, dev_random + app_random, hashlib.sha256).digest()


def app_proof(keys: SessionKeys, app_random: bytes, dev_random: bytes) -> bytes:
    return hmac.new(keys.app_key, app_random + dev_random, hashlib.sha256).digest()


_DID_ALPHABET = string.ascii_lowercase + string.digits


def make_did(rng: Rng = os.urandom) -> bytes:
    """A fresh 20-byte DID for an unbound device: 0x00 + "blt.3." + 13 random [a-z0-9] (the shape Mi
    DIDs have; keys.md §1.4 step 7 – the device only checks that it decrypts)."""
    tail = "".join(_DID_ALPHABET[b % len(_DID_ALPHABET)] for b in rng(13))
    return b"\x00" + f"blt.3.{tail}".encode()


def did_text(did: bytes) -> str:
    """``blt.3.…`` from the 20-byte DID field (NUL bytes stripped)."""
    return did.strip(b"\x00").decode("ascii", "replace")


def parse_token(token: bytes | str) -> bytes:
    """A 12-byte token from bytes or hex text; ValueError with a useful message otherwise."""
    if isinstance(token, bytes | bytearray):
        raw = bytes(token)
    else:
        text = token.strip().lower().replace(":", "").replace(" ", "").removeprefix("0x")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError("the token must be 24 hex digits") from None
    if len(raw) == 16:
        raise ValueError("that is 32 hex digits, the length of a bindkey: the Mi token is 24 hex digits (12 bytes)")
    if len(raw) != 12:
        raise ValueError(f"the token must be 12 bytes (24 hex digits), got {len(raw)} bytes")
    return raw


def frames_for(payload: bytes, frame_size: int = FRAME_PAYLOAD) -> list[bytes]:
    """The data frames of a transfer: u16 LE index from 1, then up to ``frame_size`` bytes each."""
    if frame_size < 1:
        raise ValueError("frame_size must be positive")
    chunks = [payload[i : i + frame_size] for i in range(0, len(payload), frame_size)] or [b""]
    return [i.to_bytes(2, "little") + c for i, c in enumerate(chunks, 1)]


def announcement(ptype: int, count: int) -> bytes:
    return _ANNOUNCE + bytes([ptype]) + count.to_bytes(2, "little")


def _uuid(value: str | int) -> str:
    if isinstance(value, int):
        return f"{value:08x}{_BASE}"
    text = value.strip().lower().removeprefix("0x")
    if len(text) in (4, 8):
        return f"{int(text, 16):08x}{_BASE}"
    return text


# --- the machine core -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    char: str
    data: bytes


class Abort(Exception):
    """Raised inside a script: end the run with Failed(code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Stop(Exception):
    """End the run with ``event`` (a success reached outside the main line, e.g. status e2)."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


Script = Generator[str, Notification, None]


class Endpoint:
    """One side of the 0x0019 framing, run as a generator script (shared by the clients here and the
    simulated device). The script yields a description of what it waits for and is sent each input.

    Subclasses set ``peer`` (who is on the other end, for messages), implement ``_out(char, data)``,
    ``_script()`` and may override ``_on_control``."""

    peer = "device"

    def __init__(self, *, frame_size: int = FRAME_PAYLOAD, step_timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        self.frame_size = frame_size
        self.timeout_s = step_timeout
        self.done = False
        self.result: Event | None = None
        self._pending: list = []
        self._gen: Script | None = None
        self._waiting = ""
        self._advice = ""

    # driver API ----------------------------------------------------------------------------------------

    @property
    def waiting_for(self) -> str:
        """What the machine waits for now (for messages and progress)."""
        return self._waiting

    def start(self) -> list:
        if self._gen is not None:
            raise RuntimeError("start() was already called")
        self._gen = self._script()
        self._step(None)
        return self._flush()

    def receive(self, char_uuid: str | int, data: bytes) -> list:
        """Feed one notification (client) or one write (device)."""
        if self.done or self._gen is None:
            return []
        self._step(Notification(_uuid(char_uuid), bytes(data)))
        return self._flush()

    def timeout(self) -> list:
        """Nothing arrived within ``timeout_s`` while waiting."""
        if self.done or self._gen is None:
            return []
        what = self._waiting or "an answer"
        message = f"No answer from the {self.peer} while waiting for {what} ({self.timeout_s:g} s)."
        self._end(Failed("timeout", f"{message} {self._advice or _LINK_ADVICE}"))
        return self._flush()

    def disconnected(self) -> list:
        if self.done:
            return []
        what = f" while waiting for {self._waiting}" if self._waiting else ""
        self._end(
            Failed(
                "disconnected",
                f"The {self.peer} dropped the connection{what}. Move closer, check the battery, close Xiaomi Home "
                "and flasher pages, and try again.",
            )
        )
        return self._flush()

    # plumbing --------------------------------------------------------------------------------------------

    def _step(self, item: Notification | None) -> None:
        assert self._gen is not None
        try:
            self._waiting = self._gen.send(item)  # type: ignore[arg-type]
        except StopIteration:
            self.done = True
            self._waiting = ""
        except Abort as f:
            self._end(Failed(f.code, f.message))
        except _Stop as s:
            self._end(s.event)

    def _end(self, event: Event) -> None:
        if self._gen is not None:
            self._gen.close()
        self._pending.append(event)
        self.result = event
        self.done = True
        self._waiting = ""

    def _flush(self) -> list:
        out, self._pending = self._pending, []
        return out

    def _emit(self, event: Event) -> None:
        self._pending.append(event)

    def _out(self, char: str, data: bytes) -> None:
        raise NotImplementedError

    def _script(self) -> Script:
        raise NotImplementedError

    def _on_control(self, data: bytes) -> None:
        """A notification/write on 0x0010 arrived while the script waited for 0x0019."""
        raise Abort("protocol_error", f"unexpected 0x0010 message {data.hex()} from the {self.peer}")

    # framing (§1.2) ----------------------------------------------------------------------------------------

    def _next(self, what: str, advice: str = "") -> Generator[str, Notification, Notification]:
        self._advice = advice
        item = yield what
        return item

    def _next_data(self, what: str, advice: str = "") -> Generator[str, Notification, bytes]:
        """The next 0x0019 message; 0x0010 messages go to ``_on_control``, peer errors end the run."""
        while True:
            n = yield from self._next(what, advice)
            if n.char == CONTROL_UUID:
                self._on_control(n.data)
                continue
            if n.char != DATA_UUID:
                continue
            data = n.data
            if data[:3] == _MTU_CHECK:
                self._on_mtu_check(data)
                continue
            if data == RCV_TIMEOUT:
                raise Abort("protocol_error", f"The {self.peer} reported a transfer timeout while we sent {what}.")
            if data == RCV_ERROR:
                raise Abort("protocol_error", f"The {self.peer} reported a transfer error (waiting for {what}).")
            return data

    def _on_mtu_check(self, data: bytes) -> None:
        pass

    def _send_payload(self, ptype: PayloadType, payload: bytes, what: str, advice: str = "") -> Script:
        frames = frames_for(payload, self.frame_size)
        self._out(DATA_UUID, announcement(ptype, len(frames)))
        reply = yield from self._next_data(f"the {self.peer}'s ready-to-receive for the {what}", advice)
        if reply != RCV_RDY:
            raise Abort(
                "protocol_error",
                f"expected ready-to-receive ({RCV_RDY.hex()}) for the {what}, the {self.peer} sent {reply.hex()}",
            )
        for frame in frames:
            self._out(DATA_UUID, frame)
        reply = yield from self._next_data(f"the {self.peer}'s receipt for the {what}", advice)
        if reply != RCV_OK:
            raise Abort(
                "protocol_error",
                f"expected received-ok ({RCV_OK.hex()}) for the {what}, the {self.peer} sent {reply.hex()}",
            )

    def _recv_payload(
        self, ptype: PayloadType, what: str, advice: str = "", *, size: int | None = None
    ) -> Generator[str, Notification, bytes]:
        """Receive one transfer of type ``ptype``; frames may carry any number of bytes (large MTU)."""
        data = yield from self._next_data(f"the {what}", advice)
        if data[:3] == _INLINE and len(data) >= 4:
            self._check_type(data[3], ptype, what)
            self._out(DATA_UUID, INLINE_ACK)
            payload = data[4:]
        elif data[:3] == _ANNOUNCE and len(data) >= 6:
            self._check_type(data[3], ptype, what)
            count = int.from_bytes(data[4:6], "little")
            if count == 0:
                raise Abort("protocol_error", f"the {self.peer} announced the {what} with zero frames")
            self._out(DATA_UUID, RCV_RDY)
            parts = []
            for index in range(1, count + 1):
                frame = yield from self._next_data(f"frame {index} of {count} of the {what}", _LINK_ADVICE)
                got = int.from_bytes(frame[:2], "little") if len(frame) >= 2 else 0
                if got != index:
                    self._out(DATA_UUID, RCV_ERROR)
                    shown = f"frame {got}" if got else f"message {frame.hex()}"
                    raise Abort(
                        "protocol_error",
                        f"{shown} of the {what} arrived where frame {index} of {count} was expected "
                        "(out of order, or a frame was lost): try again",
                    )
                parts.append(frame[2:])
            self._out(DATA_UUID, RCV_OK)
            payload = b"".join(parts)
        else:
            raise Abort("protocol_error", f"expected the announcement of the {what}, the {self.peer} sent {data.hex()}")
        if size is not None and len(payload) != size:
            raise Abort("protocol_error", f"the {what} is {len(payload)} bytes, expected {size}")
        return payload

    def _check_type(self, got: int, expected: PayloadType, what: str) -> None:
        if got != expected:
            self._out(DATA_UUID, RCV_ERROR)
            raise Abort(
                "protocol_error",
                f"expected the {what} (payload type {expected:02x}), the {self.peer} announced type {got:02x}",
            )


class _Client(Endpoint):
    """The app side: writes go to the device; 0x0010 notifications are status codes."""

    peer = "device"
    #: status codes that end the run successfully wherever they arrive
    _success_anywhere: ClassVar[dict[int, Callable[[], Event]]] = {}

    def __init__(self, *, rng: Rng = os.urandom, **kw: float | int) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._rng = rng

    def _out(self, char: str, data: bytes) -> None:
        self._pending.append(Write(char, data))

    def _progress(self, step: str) -> None:
        self._emit(Progress(step))

    def _on_mtu_check(self, data: bytes) -> None:
        self._out(DATA_UUID, data[:2] + b"\x05" + data[3:])

    def _on_control(self, data: bytes) -> None:
        status = self._status(data)
        raise Abort("protocol_error", f"unexpected status {status.code:02x} from the device: {status.message}")

    def _status(self, data: bytes) -> Status:
        code = data[0] if data else -1
        if code in self._success_anywhere:
            raise _Stop(self._success_anywhere[code]())
        status = STATUS.get(code)
        if status is None:
            raise Abort("protocol_error", f"unknown status {data.hex()} from the device on 0x0010")
        if not status.ok:
            raise Abort(status.name, status.message)
        return status

    def _expect_status(self, ok: Iterable[int], what: str) -> Script:
        ok = set(ok)
        while True:
            n = yield from self._next(what)
            if n.char == DATA_UUID and n.data[:3] == _MTU_CHECK:
                self._on_mtu_check(n.data)
                continue
            if n.char != CONTROL_UUID:
                raise Abort("protocol_error", f"expected {what} on 0x0010, the device sent {n.data.hex()} on 0x0019")
            status = self._status(n.data)
            if status.code in ok:
                return
            raise Abort("protocol_error", f"status {status.code:02x} ({status.message}) where {what} was expected")


class RegisterClient(_Client):
    """Activation: register as the device's new owner (keys.md §1.4). Ends with :class:`Registered`.

    ``did_generator(rng) -> 20 bytes`` invents the DID for an unbound device (default :func:`make_did`);
    a bound device's own DID is reused. ``rng(n) -> n bytes`` supplies all randomness."""

    def __init__(
        self,
        *,
        did_generator: Callable[[Rng], bytes] = make_did,
        rng: Rng = os.urandom,
        frame_size: int = FRAME_PAYLOAD,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        super().__init__(rng=rng, frame_size=frame_size, step_timeout=step_timeout)
        self._did_generator = did_generator

    def _script(self) -> Script:
        self._progress("asking the device for its registration info")
        self._out(CONTROL_UUID, CMD_GET_INFO)
        info = yield from self._recv_payload(PayloadType.DEVICE_INFO, "device info", ACTIVATION_ADVICE)
        if len(info) < 4:
            raise Abort("protocol_error", f"the device info is {len(info)} bytes, expected 4 or 24")
        reused = len(info) >= 24
        did = info[4:24] if reused else self._did_generator(self._rng)
        if len(did) != 20:
            raise Abort("protocol_error", f"the device id must be 20 bytes, got {len(did)}")

        self._progress("exchanging keys")
        self._out(CONTROL_UUID, CMD_SET_KEY)
        private = private_key_from_rng(self._rng)
        yield from self._send_payload(
            PayloadType.PUBLIC_KEY, public_key_bytes(private), "app public key", ACTIVATION_ADVICE
        )
        raw = yield from self._recv_payload(PayloadType.PUBLIC_KEY, "device public key", size=64)
        try:
            device_key = public_key_from_bytes(raw)
        except ValueError:
            raise Abort("protocol_error", "the device's public key is not a point on P-256") from None
        keys = derive_setup_keys(private.exchange(ec.ECDH(), device_key))

        self._progress("sending the encrypted device id")
        yield from self._send_payload(PayloadType.DEVICE_INFO, encrypt_did(keys.did_key, did), "encrypted device id")
        self._out(CONTROL_UUID, CMD_AUTH)
        yield from self._expect_status({0x11, 0x13}, "the registration result")
        raise _Stop(Registered(token=keys.token, bindkey=keys.bindkey, did=did, reused_did=reused))


class LoginClient(_Client):
    """Login with a known token (keys.md §1.6): proves the token; stock firmware unlocks OTA after it.
    Ends with :class:`LoggedIn`, or Failed("invalid_token") when the device's proof does not match."""

    _success_anywhere: ClassVar[dict[int, Callable[[], Event]]] = {0xE2: lambda: LoggedIn(None)}

    def __init__(
        self,
        token: bytes | str,
        *,
        rng: Rng = os.urandom,
        frame_size: int = FRAME_PAYLOAD,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        super().__init__(rng=rng, frame_size=frame_size, step_timeout=step_timeout)
        self._token = parse_token(token)

    def _script(self) -> Script:
        self._progress("logging in")
        self._out(CONTROL_UUID, CMD_LOGIN)
        app_random = self._rng(16)
        yield from self._send_payload(PayloadType.APP_RANDOM, app_random, "app random")
        dev_random = yield from self._recv_payload(PayloadType.DEVICE_RANDOM, "device random", size=16)
        keys = derive_login_keys(self._token, app_random, dev_random)
        proof = yield from self._recv_payload(PayloadType.DEVICE_PROOF, "device proof", size=32)
        if not hmac.compare_digest(proof, device_proof(keys, app_random, dev_random)):
            raise Abort(
                "invalid_token",
                "The device's login proof does not match this token: the token is wrong, outdated (the device was "
                "re-paired or re-activated since) or belongs to another device. Fetch the current token "
                "(`mitherm cloud keys`) or use the one the last `mitherm activate` stored.",
            )
        yield from self._send_payload(PayloadType.APP_PROOF, app_proof(keys, app_random, dev_random), "app proof")
        yield from self._expect_status({0x21}, "the login result")
        raise _Stop(LoggedIn(keys))

"""The device side of Mi standard auth (keys.md §1.9) for virtual stock thermometers.

:class:`MiAuthDevice` is the sans-IO device half of :mod:`mitherm.protocols.miauth`: fed the app's
writes (``receive(char_uuid, data)``), it returns :class:`Notify` outputs and, when something happened,
the same events the client ends with (:class:`Registered`, :class:`LoggedIn`, :class:`Failed`). It
serves command after command and never finishes.

What the device checks:

* commands on 0x0010: ``a2`` info, ``15`` key exchange, ``13`` finish registration, ``24`` login;
  a new command aborts a transfer in progress (as a reconnecting app restarts);
* every transfer: the announced payload type, frame indexes in order from 1, the payload size
  (64-byte key, 24-byte encrypted DID, 16-byte random, 32-byte proof) – otherwise ``00 00 01 05 03 00``;
* the app's public key is a point on P-256;
* ``13``: the encrypted DID decrypts and authenticates under the derived key, otherwise status ``12``
  (also when no key exchange preceded it);
* login: status ``e0`` when not registered; the app's HMAC proof under the stored token, ``21`` or ``23``.

Fault injection (``device.miauth_faults``, a dict read on every connection):

* ``never_answer``: ignore everything (the client times out);
* ``already_registered``: answer ``a2`` and ``15`` with status ``e1``;
* ``refuse_activation``: ignore ``15`` like stock 2.1.1_0159, which accepts login only (also on when
  ``device.firmware`` is a firmware that refuses activation);
* ``transfer_error``: answer the app's first announcement with a transfer error;
* ``wrong_proof``: send a damaged login proof;
* ``repeated_login``: answer ``24`` with status ``e2``;
* ``disconnect_after``: n – drop the connection after n notifications.

``install(server, device)`` adds service 0xFE95 with 0x0010 and 0x0019 to stock devices. On a successful
registration the device ``rekey``s to the new bindkey, so its next encrypted advert uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ...protocols.miauth import (
    CMD_AUTH,
    CMD_GET_INFO,
    CMD_LOGIN,
    CMD_SET_KEY,
    CONTROL_UUID,
    DATA_UUID,
    MI_SERVICE_UUID,
    RCV_ERROR,
    Abort,
    Endpoint,
    Failed,
    LoggedIn,
    Notification,
    PayloadType,
    Registered,
    Rng,
    Script,
    app_proof,
    decrypt_did,
    derive_login_keys,
    derive_setup_keys,
    device_proof,
    make_did,
    private_key_from_rng,
    public_key_bytes,
    public_key_from_bytes,
)
from ..devices import seeded_rng

log = logging.getLogger(__name__)

__all__ = ["REFUSES_ACTIVATION", "MiAuthDevice", "MiAuthState", "Notify", "install", "state_for"]

#: stock firmware that no longer accepts a new registration, only login (keys.md §1.8)
REFUSES_ACTIVATION = frozenset({"2.1.1_0159", "2.1.1_0009"})

STATUS_REGISTERED = bytes.fromhex("11000000")
STATUS_REGISTRATION_FAILED = bytes.fromhex("12000000")
STATUS_LOGGED_IN = bytes.fromhex("21000000")
STATUS_LOGIN_FAILED = bytes.fromhex("23000000")
STATUS_NOT_REGISTERED = bytes.fromhex("e0000000")
STATUS_ALREADY_REGISTERED = bytes.fromhex("e1000000")
STATUS_REPEATED_LOGIN = bytes.fromhex("e2000000")


@dataclass(frozen=True, slots=True)
class Notify:
    """Notify ``data`` on ``char_uuid``."""

    char_uuid: str
    data: bytes

    def __repr__(self) -> str:
        return f"Notify({self.char_uuid[4:8]}, {self.data.hex()})"


@dataclass(slots=True)
class MiAuthState:
    """What the device keeps in flash (keys.md §1.7). ``bound``: it has an owner."""

    bound: bool = False
    did: bytes = field(default=b"", repr=False)
    token: bytes = field(default=b"", repr=False)
    bindkey: bytes = field(default=b"", repr=False)


class _Interrupt(Exception):
    """A new command arrived in the middle of a flow: abandon it and serve the command."""

    def __init__(self, command: bytes) -> None:
        super().__init__()
        self.command = command


class MiAuthDevice(Endpoint):
    """The device side. ``state`` is shared with the virtual device and changed on registration."""

    peer = "app"

    def __init__(
        self,
        state: MiAuthState,
        *,
        rng: Rng,
        faults: dict[str, Any] | None = None,
        refuse_activation: bool = False,
        frame_size: int = 18,
    ) -> None:
        super().__init__(frame_size=frame_size)
        self.state = state
        self._rng = rng
        self.faults = dict(faults or {})
        self.refuse_activation = refuse_activation or bool(self.faults.get("refuse_activation"))
        self._pending_registration: tuple[bytes, bytes, bytes, bytes] | None = None  # token, bindkey, did_key, blob
        self._transfer_error_sent = False

    def receive(self, char_uuid: str | int, data: bytes) -> list:
        if self.faults.get("never_answer"):
            return []
        return super().receive(char_uuid, data)

    def _out(self, char: str, data: bytes) -> None:
        self._pending.append(Notify(char, data))

    def _on_control(self, data: bytes) -> None:
        raise _Interrupt(data)

    def _script(self) -> Script:
        command: bytes | None = None
        while True:
            if command is None:
                n: Notification = yield "a command"
                if n.char != CONTROL_UUID:
                    continue  # stray 0x0019 traffic outside a flow: ignored, as after an aborted transfer
                command = n.data
            try:
                yield from self._serve(command)
            except _Interrupt as i:
                command = i.command
                continue
            except Abort as f:
                if not self._pending or self._pending[-1] != Notify(DATA_UUID, RCV_ERROR):
                    self._out(DATA_UUID, RCV_ERROR)
                self._emit(Failed(f.code, f.message))
            command = None

    def _serve(self, command: bytes) -> Script:
        head = command[:1]
        if head == CMD_GET_INFO[:1]:
            yield from self._get_info()
        elif head == CMD_SET_KEY[:1]:
            yield from self._key_exchange()
        elif head == CMD_AUTH[:1]:
            self._finish_registration()
        elif head == CMD_LOGIN[:1]:
            yield from self._login()
        # anything else: ignored, as stock firmware does with unknown commands

    def _recv_checked(self, ptype: PayloadType, what: str, size: int) -> Script:
        if self.faults.get("transfer_error") and not self._transfer_error_sent:
            self._transfer_error_sent = True
            yield from self._next_data(f"the {what}")
            raise Abort("protocol_error", "fault injection: transfer error")
        payload = yield from self._recv_payload(ptype, what, size=size)
        return payload

    # registration ------------------------------------------------------------------------------------

    def _get_info(self) -> Script:
        if self.faults.get("already_registered"):
            self._out(CONTROL_UUID, STATUS_ALREADY_REGISTERED)
            return
        info = b"\x02\x00\x00\x00" + self.state.did if self.state.bound else b"\x01\x00\x00\x00"
        yield from self._send_payload(PayloadType.DEVICE_INFO, info, "device info")

    def _key_exchange(self) -> Script:
        if self.faults.get("already_registered"):
            self._out(CONTROL_UUID, STATUS_ALREADY_REGISTERED)
            return
        if self.refuse_activation:
            return  # 2.1.1_0159: no answer at all (users see "Activating now…" forever)
        raw = yield from self._recv_checked(PayloadType.PUBLIC_KEY, "app public key", 64)
        try:
            app_key = public_key_from_bytes(raw)
        except ValueError:
            raise Abort("protocol_error", "the app's public key is not a point on P-256") from None
        private = private_key_from_rng(self._rng)
        yield from self._send_payload(PayloadType.PUBLIC_KEY, public_key_bytes(private), "device public key")
        keys = derive_setup_keys(private.exchange(ec.ECDH(), app_key))
        blob = yield from self._recv_checked(PayloadType.DEVICE_INFO, "encrypted device id", 24)
        self._pending_registration = (keys.token, keys.bindkey, keys.did_key, blob)

    def _finish_registration(self) -> None:
        pending, self._pending_registration = self._pending_registration, None
        did = decrypt_did(pending[2], pending[3]) if pending else None
        if pending is None or did is None:
            self._out(CONTROL_UUID, STATUS_REGISTRATION_FAILED)
            self._emit(Failed("registration_failed", "the encrypted device id did not decrypt"))
            return
        token, bindkey, _, _ = pending
        self.state.bound, self.state.did, self.state.token, self.state.bindkey = True, did, token, bindkey
        self._emit(Registered(token=token, bindkey=bindkey, did=did))
        self._out(CONTROL_UUID, STATUS_REGISTERED)

    # login -----------------------------------------------------------------------------------------

    def _login(self) -> Script:
        if self.faults.get("repeated_login"):
            self._out(CONTROL_UUID, STATUS_REPEATED_LOGIN)
            return
        if not self.state.bound:
            self._out(CONTROL_UUID, STATUS_NOT_REGISTERED)
            return
        app_random = yield from self._recv_checked(PayloadType.APP_RANDOM, "app random", 16)
        dev_random = self._rng(16)
        yield from self._send_payload(PayloadType.DEVICE_RANDOM, dev_random, "device random")
        keys = derive_login_keys(self.state.token, app_random, dev_random)
        proof = device_proof(keys, app_random, dev_random)
        if self.faults.get("wrong_proof"):
            proof = bytes([proof[0] ^ 0xFF]) + proof[1:]
        yield from self._send_payload(PayloadType.DEVICE_PROOF, proof, "device proof")
        theirs = yield from self._recv_checked(PayloadType.APP_PROOF, "app proof", 32)
        if theirs == app_proof(keys, app_random, dev_random):
            self._emit(LoggedIn(keys))
            self._out(CONTROL_UUID, STATUS_LOGGED_IN)
        else:
            self._emit(Failed("login_failed", "the app's login proof did not match the stored token"))
            self._out(CONTROL_UUID, STATUS_LOGIN_FAILED)


# --- the virtual device ------------------------------------------------------------------------------------


def state_for(device: Any) -> MiAuthState:
    """The device's Mi auth state, created on first use: a stock device that sends encrypted frames is
    bound (as after pairing in Xiaomi Home) with a token and DID drawn from its seed and its bindkey."""
    state = getattr(device, "miauth_state", None)
    if state is None:
        rng = seeded_rng(device.seed, "miauth")
        if device.bindkey:
            state = MiAuthState(
                bound=True, did=make_did(rng.randbytes), token=rng.randbytes(12), bindkey=bytes.fromhex(device.bindkey)
            )
        else:
            state = MiAuthState()
        device.miauth_state = state
    return state


def _refuses_activation(device: Any) -> bool:
    return str(getattr(device, "firmware", "") or "") in REFUSES_ACTIVATION


def _become_bound(device: Any, bindkey_hex: str) -> None:
    """Switch the virtual device to the new key. A stock device that sent plain frames starts sending
    encrypted MiBeacon v5, as stock firmware does once it has an owner (keys.md §1.9)."""
    if not device.encrypted:
        spec = getattr(device, "stock", None)
        if spec is None or spec.encrypted_as is None:
            log.warning("%r cannot switch to encrypted frames", device)
            return
        from ..devices import product_id_for

        device.encrypted = True
        device.version = 5
        device.product_id = product_id_for(spec.encrypted_as)
        device.objects = spec.encrypted_objects
    device.rekey(bindkey_hex)


def install(server: Any, device: Any) -> None:
    """Add FE95 (0x0010, 0x0019) to a stock device's GATT server."""
    if getattr(device, "kind", "") != "stock":
        return
    from ..gatt_server import CharSpec

    rng = seeded_rng(device.seed, "miauth-session")
    session: dict[str, Any] = {"machine": None, "sent": 0}

    def new_machine() -> MiAuthDevice:
        faults = dict(getattr(device, "miauth_faults", None) or {})
        machine = MiAuthDevice(
            state_for(device), rng=rng.randbytes, faults=faults, refuse_activation=_refuses_activation(device)
        )
        machine.start()
        session["machine"], session["sent"] = machine, 0
        return machine

    async def handle(char: str, data: bytes) -> None:
        machine = session["machine"] or new_machine()
        for out in machine.receive(char, data):
            if isinstance(out, Notify):
                limit = machine.faults.get("disconnect_after")
                if limit is not None and session["sent"] >= int(limit):
                    await server.disconnect()
                    return
                session["sent"] += 1
                await server.notify(out.char_uuid, out.data)
            elif isinstance(out, Registered):
                _become_bound(device, out.bindkey.hex())
                log.info("virtual %s registered a new owner (did %s)", device.address, out.did.strip(b"\0").decode())

    def on_write(char: str) -> Callable[[bytes], Any]:
        async def write(data: bytes) -> None:
            await handle(char, data)

        return write

    def chain(previous: Callable[[], None] | None, mine: Callable[[], None]) -> Callable[[], None]:
        def both() -> None:
            mine()
            if previous is not None:
                previous()

        return both

    def reset() -> None:
        session["machine"] = None

    server.on_connect = chain(server.on_connect, reset)
    server.on_disconnect = chain(server.on_disconnect, reset)
    props = {"write", "write_without_response", "notify"}
    server.add_service(
        MI_SERVICE_UUID,
        [
            CharSpec(CONTROL_UUID, set(props), on_write=on_write(CONTROL_UUID)),
            CharSpec(DATA_UUID, set(props), on_write=on_write(DATA_UUID)),
        ],
    )

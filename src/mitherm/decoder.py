"""``Decoder``: service-data payload + sender address (+ the device's bindkey) -> ``Reading``.

Hot path: per-address and per-key state is computed once (address bytes, parsed key, AES-CCM object);
a frame costs one dict lookup, the format's struct unpacks and, when encrypted, one AES-CCM call."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .bindkey import Bindkey, InvalidKey, parse_bindkey
from .formats import atc1441, bthome, mibeacon, pvvx
from .mac import InvalidMac, mac_to_le, normalize_mac
from .model import Advertisement, DecodeError, ErrorCode, Reading
from .uuids import BTHOME_V1, BTHOME_V1_ENC, BTHOME_V2, CUSTOM_181A, MIBEACON, InvalidUuid, parse_service_uuid

KeySlot = tuple[Bindkey | None, str | None]  # (key, why the configured key is unusable)
_NO_KEY: KeySlot = (None, None)


def _b_parasite(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, err: str | None) -> Reading:
    return Reading(
        mac=mac,
        service_uuid=CUSTOM_181A,
        format="b_parasite",
        model="b-parasite",
        error=DecodeError(ErrorCode.UNSUPPORTED, "b-parasite plant sensor payload on 0x181A: not a thermometer format"),
    )


def _plain(fn: Callable[[bytes, str, bytes], Reading]) -> Callable[..., Reading]:
    return lambda payload, mac, mac_le, key, err: fn(payload, mac, mac_le)


# UUID 0x181A carries several formats told apart by payload length (formats.md §3).
CUSTOM_BY_LENGTH: dict[int, Callable[..., Reading]] = {
    atc1441.PLAIN_LEN: _plain(atc1441.decode_plain),
    pvvx.PLAIN_LEN: _plain(pvvx.decode_plain),
    pvvx.PLAIN_NOFLAGS_LEN: _plain(pvvx.decode_plain),
    pvvx.ENC_LEN: pvvx.decode_encrypted,
    atc1441.ENC_LEN: atc1441.decode_encrypted,
    16: _b_parasite,
    18: _b_parasite,
}


def _custom(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, err: str | None) -> Reading:
    fn = CUSTOM_BY_LENGTH.get(len(payload))
    if fn is None:
        return Reading(
            mac=mac,
            service_uuid=CUSTOM_181A,
            error=DecodeError(
                ErrorCode.UNSUPPORTED,
                f"{len(payload)}-byte payload on 0x181A matches no known format "
                "(atc1441 13/8 bytes, pvvx 15/14/11 bytes)",
            ),
        )
    return fn(payload, mac, mac_le, key, err)


def _bthome_v1(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, err: str | None) -> Reading:
    return bthome.decode_v1(payload, mac, mac_le, key, err, BTHOME_V1)


def _bthome_v1_enc(payload: bytes, mac: str, mac_le: bytes, key: Bindkey | None, err: str | None) -> Reading:
    return bthome.decode_v1(payload, mac, mac_le, key, err, BTHOME_V1_ENC)


BY_UUID: dict[int, Callable[[bytes, str, bytes, Bindkey | None, str | None], Reading]] = {
    MIBEACON: mibeacon.decode,
    CUSTOM_181A: _custom,
    BTHOME_V1: _bthome_v1,
    BTHOME_V1_ENC: _bthome_v1_enc,
    BTHOME_V2: bthome.decode_v2,
}
SUPPORTED_UUIDS = frozenset(BY_UUID)


def key_slot(key_text: str | None) -> KeySlot:
    if key_text is None:
        return _NO_KEY
    try:
        return (parse_bindkey(key_text), None)
    except InvalidKey as e:
        return (None, f"the configured key for this device is unusable: {e}")


class Decoder:
    """Decode advertisements of every supported format.

    ``keys`` maps a Bluetooth address (any spelling) to a hex bindkey. Keys can be changed at any time
    with ``set_key`` / ``remove_key`` / ``set_keys``; a bad key is reported per frame as ``bad_key``."""

    __slots__ = ("_keys", "_macs")

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self._keys: dict[str, KeySlot] = {}
        self._macs: dict[str, tuple[str, bytes]] = {}
        if keys:
            self.set_keys(keys)

    def set_key(self, mac: str, key: str | None) -> None:
        m = normalize_mac(mac)
        if key is None:
            self._keys.pop(m, None)
        else:
            self._keys[m] = key_slot(key)

    def remove_key(self, mac: str) -> None:
        self._keys.pop(normalize_mac(mac), None)

    def set_keys(self, keys: Mapping[str, str]) -> None:
        """Replace all keys."""
        self._keys = {normalize_mac(m): key_slot(k) for m, k in keys.items()}

    def has_key(self, mac: str) -> bool:
        return normalize_mac(mac) in self._keys

    def _address(self, mac: str) -> tuple[str, bytes] | None:
        a = self._macs.get(mac)
        if a is None:
            try:
                display = normalize_mac(mac)
            except (InvalidMac, AttributeError, TypeError):
                return None
            a = (display, mac_to_le(display))
            if len(self._macs) > 100_000:
                self._macs.clear()
            self._macs[mac] = a
        return a

    def decode(
        self, mac: str, service_uuid: int | str, payload: bytes | bytearray | memoryview, key: str | None = None
    ) -> Reading:
        """Decode one service-data payload (the bytes after the UUID) sent by ``mac``.

        ``key`` overrides the stored key for this one call. Never raises for bad input: problems are
        returned as ``Reading.error``."""
        addr = self._macs.get(mac)  # the hot path: a known address
        if addr is None:
            addr = self._address(mac)
        if addr is None:
            return Reading(
                mac=str(mac),
                service_uuid=-1,
                error=DecodeError(
                    ErrorCode.MALFORMED, f"{mac!r} is not a Bluetooth address (expected AA:BB:CC:DD:EE:FF)"
                ),
            )
        display, mac_le = addr
        if type(service_uuid) is not int:
            try:
                service_uuid = parse_service_uuid(service_uuid)
            except (InvalidUuid, AttributeError, TypeError) as e:
                return Reading(mac=display, service_uuid=-1, error=DecodeError(ErrorCode.UNSUPPORTED, str(e)))
        fn = BY_UUID.get(service_uuid)  # type: ignore[arg-type]
        if fn is None:
            return Reading(
                mac=display,
                service_uuid=service_uuid,  # type: ignore[arg-type]
                error=DecodeError(
                    ErrorCode.UNSUPPORTED,
                    f"service UUID 0x{service_uuid:04X} is not a thermometer format mitherm knows",
                ),
            )
        if type(payload) is not bytes:
            try:
                payload = bytes(payload)
            except (TypeError, ValueError):
                return Reading(
                    mac=display,
                    service_uuid=service_uuid,  # type: ignore[arg-type]
                    error=DecodeError(ErrorCode.MALFORMED, "payload is not bytes"),
                )
        k, kerr = self._keys.get(display, _NO_KEY) if key is None else key_slot(key)
        return fn(payload, display, mac_le, k, kerr)

    def decode_advertisement(self, adv: Advertisement) -> list[Reading]:
        """Readings for every supported service-data entry of one advertisement."""
        return [self.decode(adv.mac, uuid, data) for uuid, data in adv.service_data.items() if uuid in BY_UUID]

"""The AES-CCM wrapper shared by the pvvx and atc1441 encrypted beacons (formats.md §3.3).

Payload ``counter (1) | ciphertext | MIC (4)``; nonce = reversed MAC (6) | AD header (size byte, 0x16,
UUID 1A 18) | counter: the AD header is part of the nonce, so a payload-only receiver rebuilds it."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from ..bindkey import Bindkey
from ..mac import mac_from_le
from ..model import DecodeError, ErrorCode, Reading

AAD = b"\x11"
_HEADERS = {n: bytes([n + 3, 0x16, 0x1A, 0x18]) for n in range(0, 32)}


def open_sealed(payload: bytes, mac_le: bytes, key: Bindkey) -> bytes | None:
    """Plaintext, or None when the MIC does not match."""
    nonce = mac_le + _HEADERS[len(payload)] + payload[0:1]
    try:
        return key.ccm4().decrypt(nonce, payload[1:], AAD)
    except InvalidTag:
        return None


def seal(plain: bytes, counter: int, mac_le: bytes, key: Bindkey) -> bytes:
    n = 1 + len(plain) + 4
    c = bytes([counter & 0xFF])
    return c + key.ccm4().encrypt(mac_le + _HEADERS[n] + c, plain, AAD)


def check_frame_mac(r: Reading, frame_mac_le: bytes, mac_le: bytes) -> bool:
    """Compare the MAC a plain frame carries (*frame_mac_le*, over-the-air order) with the sender's.

    Sets ``r.mac_in_frame``; on a mismatch also sets ``r.error`` and returns False (not decoded)."""
    if frame_mac_le != mac_le:
        r.mac_in_frame = mac_from_le(frame_mac_le)
        r.error = DecodeError(
            ErrorCode.MAC_MISMATCH, f"the frame carries MAC {r.mac_in_frame} but was sent by {r.mac}: not decoded"
        )
        return False
    r.mac_in_frame = r.mac
    return True


def open_encrypted(
    r: Reading, payload: bytes, mac_le: bytes, key: Bindkey | None, key_error: str | None, name: str
) -> bytes | None:
    """Set ``r.frame_counter`` and open an encrypted custom-firmware beacon.

    Returns the plaintext, or None with ``r.error`` set (missing or bad key, MIC mismatch); *name*
    is the firmware named in the wrong-key message."""
    r.frame_counter = payload[0]
    err = key_problem(key, key_error, r.mac)
    if err:
        r.error = err
        return None
    plain = open_sealed(payload, mac_le, key)  # type: ignore[arg-type]
    if plain is None:
        r.error = DecodeError(ErrorCode.WRONG_KEY, f"MIC check failed: wrong bindkey for this {name} encrypted beacon")
    return plain


def key_problem(key: Bindkey | None, key_error: str | None, mac: str) -> DecodeError | None:
    if key is None:
        if key_error:
            return DecodeError(ErrorCode.BAD_KEY, key_error)
        return DecodeError(
            ErrorCode.NO_KEY, f"encrypted custom-firmware beacon: the firmware's bindkey for {mac} is needed"
        )
    if len(key.raw) != 16:
        return DecodeError(ErrorCode.BAD_KEY, "custom firmware beacons need a 32-hex-digit bindkey")
    return None

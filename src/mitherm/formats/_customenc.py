"""The AES-CCM wrapper shared by the pvvx and atc1441 encrypted beacons (formats.md §3.3).

Payload ``counter (1) | ciphertext | MIC (4)``; nonce = reversed MAC (6) | AD header (size byte, 0x16,
UUID 1A 18) | counter: the AD header is part of the nonce, so a payload-only receiver rebuilds it."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from ..bindkey import Bindkey

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

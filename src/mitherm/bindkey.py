"""Bindkeys: parsing, the legacy 12→16-byte expansion, and cached cipher objects.

One ``Bindkey`` per distinct key; it keeps its ``AESCCM`` objects so that the hot decode path never
builds a cipher per frame."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

# xiaomi-ble set_bindkey / ble_monitor: insert these 4 bytes after the 6th byte of a 12-byte key.
LEGACY_KEY_FILL = bytes.fromhex("8d3d3c97")
_CLEAN = re.compile(r"[\s:\-]|^0x", re.IGNORECASE)


class InvalidKey(ValueError):
    pass


def clean_key_text(text: str) -> str:
    return _CLEAN.sub("", text.strip()).lower()


@dataclass(slots=True, eq=False)
class Bindkey:
    raw: bytes
    _ccm4: AESCCM | None = field(default=None, repr=False)
    _ccm16_legacy: AESCCM | None = field(default=None, repr=False)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def is_placeholder(self) -> bool:
        """All F or all 0: what the Xiaomi cloud returns when it has no key."""
        return self.raw in (b"\xff" * len(self.raw), b"\x00" * len(self.raw))

    def ccm4(self) -> AESCCM:
        """AES-CCM with a 4-byte tag (MiBeacon v4/v5, pvvx/atc1441 encrypted, BTHome)."""
        c = self._ccm4
        if c is None:
            if len(self.raw) != 16:
                raise InvalidKey("a 16-byte key is needed")
            c = self._ccm4 = AESCCM(self.raw, tag_length=4)
        return c

    def legacy_key16(self) -> bytes:
        """The AES key for MiBeacon v2/v3 frames."""
        if len(self.raw) == 12:
            return self.raw[:6] + LEGACY_KEY_FILL + self.raw[6:]
        return self.raw

    def legacy_ccm16(self) -> AESCCM:
        c = self._ccm16_legacy
        if c is None:
            c = self._ccm16_legacy = AESCCM(self.legacy_key16(), tag_length=16)
        return c

    def legacy_ctr(self, nonce13: bytes, data: bytes) -> bytes:
        """CCM's CTR part (L=2) over ``data``, starting at counter 1: encrypts and decrypts."""
        ctr = Cipher(algorithms.AES(self.legacy_key16()), modes.CTR(b"\x01" + nonce13 + b"\x00\x01"))
        return ctr.encryptor().update(data)


@lru_cache(maxsize=1024)
def parse_bindkey(text: str) -> Bindkey:
    """A Bindkey from hex (spaces, colons, dashes and 0x tolerated). 24 or 32 hex digits.

    Cached: the same key text always gives the same object, with its ciphers."""
    s = clean_key_text(text)
    if not re.fullmatch(r"[0-9a-f]*", s):
        raise InvalidKey(f"the key is not hexadecimal (only 0-9 and a-f allowed, got {len(s)} characters)")
    if len(s) not in (24, 32):
        raise InvalidKey(
            f"the key has {len(s)} hex digits: a bindkey has 32 (MiBeacon v4/v5, pvvx, BTHome) "
            "or 24 (legacy MiBeacon v2/v3)"
        )
    return Bindkey(bytes.fromhex(s))

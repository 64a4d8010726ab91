"""Xiaomi cloud request signing and the "ENCRYPT-RC4" envelope, without any I/O (reference keys.md §3.5).

An encrypted API call, step by step:

* ``nonce`` = base64(8 random bytes ‖ u32 big-endian of ``unix_ms // 60000``);
* ``signed_nonce`` = base64(SHA-256(b64decode(ssecurity) ‖ b64decode(nonce)));
* ``rc4_hash__`` = base64(SHA-1("POST&<path>&k=v…&<signed_nonce>")) over the plain parameters;
* every parameter (``rc4_hash__`` included) becomes base64(RC4-drop1024(b64decode(signed_nonce), value));
* ``signature`` = the same SHA-1 string, now over the encrypted parameters;
* the answer is base64(RC4-drop1024(same key, JSON)).

``path`` is the API path without the ``/app`` prefix (``/v2/device/blt_get_beaconkey``).

RC4 is written out here rather than taken from ``cryptography``: it is a dozen lines, it is only a
compatibility layer (the security of these calls rests on TLS, not on RC4), and ``cryptography`` has
moved ARC4 to ``hazmat.decrepit`` with deprecation warnings on the old import path, so a hand-written
one keeps mitherm independent of that churn. The tests check it against ``cryptography``'s ARC4.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ACCOUNT_PREFIX",
    "CloudProtocolError",
    "api_path",
    "decrypt_response",
    "enc_signature",
    "encrypt_params",
    "encrypt_response",
    "make_nonce",
    "parse_account_json",
    "password_hash",
    "rc4",
    "rc4_drop1024",
    "signed_nonce",
]

#: Every JSON answer of account.xiaomi.com starts with this (a JSON-hijacking guard).
ACCOUNT_PREFIX = "&&&START&&&"


class CloudProtocolError(ValueError):
    """An answer that does not have the shape the protocol promises."""


def rc4(key: bytes, data: bytes, *, drop: int = 0) -> bytes:
    """RC4 of ``data`` under ``key``, discarding the first ``drop`` keystream bytes."""
    if not key:
        raise ValueError("RC4 needs a non-empty key")
    s = list(range(256))
    j = 0
    klen = len(key)
    for i in range(256):
        j = (j + s[i] + key[i % klen]) & 0xFF
        s[i], s[j] = s[j], s[i]
    i = j = 0
    out = bytearray(len(data))
    for n in range(drop + len(data)):
        i = (i + 1) & 0xFF
        j = (j + s[i]) & 0xFF
        s[i], s[j] = s[j], s[i]
        if n >= drop:
            out[n - drop] = data[n - drop] ^ s[(s[i] + s[j]) & 0xFF]
    return bytes(out)


def rc4_drop1024(key: bytes, data: bytes) -> bytes:
    """RC4 with the first 1024 keystream bytes dropped, as Xiaomi's ENCRYPT-RC4 mode uses it."""
    return rc4(key, data, drop=1024)


def password_hash(password: str) -> str:
    """What serviceLoginAuth2 expects in ``hash``: MD5 of the UTF-8 password, upper-case hex."""
    return hashlib.md5(password.encode("utf-8")).hexdigest().upper()


def make_nonce(now_ms: int | None = None, random_bytes: bytes | None = None) -> str:
    """base64(8 random bytes ‖ u32 BE minutes since the epoch)."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    rnd = os.urandom(8) if random_bytes is None else random_bytes
    if len(rnd) != 8:
        raise ValueError("the nonce takes exactly 8 random bytes")
    return base64.b64encode(rnd + (now_ms // 60000).to_bytes(4, "big")).decode("ascii")


def signed_nonce(ssecurity: str, nonce: str) -> str:
    """base64(SHA-256(b64decode(ssecurity) ‖ b64decode(nonce))): the per-call RC4 key, in base64."""
    digest = hashlib.sha256(base64.b64decode(ssecurity) + base64.b64decode(nonce)).digest()
    return base64.b64encode(digest).decode("ascii")


def api_path(url_or_path: str) -> str:
    """The path that is signed: the part after the API base, without ``/app``.

    ``https://de.api.io.mi.com/app/v2/homeroom/gethome`` and ``/v2/homeroom/gethome`` both give
    ``/v2/homeroom/gethome`` (the real clients take the text after "com" and drop ``/app``)."""
    path = urlsplit(url_or_path).path if "://" in url_or_path else url_or_path.split("?", 1)[0]
    marker = path.find("/app/")
    if marker >= 0:
        path = path[marker + len("/app") :]
    return path


def enc_signature(method: str, path: str, params: Mapping[str, str], signed_nonce_b64: str) -> str:
    """base64(SHA-1("METHOD&path&k=v&…&signed_nonce")), parameters in the given order."""
    parts = [method.upper(), path, *(f"{k}={v}" for k, v in params.items()), signed_nonce_b64]
    return base64.b64encode(hashlib.sha1("&".join(parts).encode("utf-8")).digest()).decode("ascii")


def _encrypt_text(key_b64: str, text: str) -> str:
    return base64.b64encode(rc4_drop1024(base64.b64decode(key_b64), text.encode("utf-8"))).decode("ascii")


def encrypt_params(
    path: str,
    params: Mapping[str, str],
    ssecurity: str,
    *,
    nonce: str | None = None,
    method: str = "POST",
) -> dict[str, str]:
    """The fields of one encrypted call: ``data``…, ``rc4_hash__``, ``signature``, ``ssecurity``, ``_nonce``."""
    nonce = nonce or make_nonce()
    key = signed_nonce(ssecurity, nonce)
    plain = dict(params)
    plain["rc4_hash__"] = enc_signature(method, path, plain, key)
    fields = {k: _encrypt_text(key, v) for k, v in plain.items()}
    fields["signature"] = enc_signature(method, path, fields, key)
    fields["ssecurity"] = ssecurity
    fields["_nonce"] = nonce
    return fields


def decrypt_response(ssecurity: str, nonce: str, body: str | bytes) -> dict[str, Any]:
    """Decode an encrypted API answer (base64 of RC4-drop1024 JSON) into its JSON envelope."""
    key = base64.b64decode(signed_nonce(ssecurity, nonce))
    try:
        raw = base64.b64decode(body.strip() if isinstance(body, (str, bytes)) else body, validate=False)
        doc = json.loads(rc4_drop1024(key, raw).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CloudProtocolError("the API answer does not decrypt to JSON (wrong ssecurity or nonce?)") from e
    if not isinstance(doc, dict):
        raise CloudProtocolError("the API answer is not a JSON object")
    return doc


def encrypt_response(ssecurity: str, nonce: str, doc: Mapping[str, Any]) -> str:
    """The inverse of :func:`decrypt_response` (for fakes and tests)."""
    key = signed_nonce(ssecurity, nonce)
    return _encrypt_text(key, json.dumps(doc, separators=(",", ":")))


def parse_account_json(text: str) -> dict[str, Any]:
    """An account.xiaomi.com JSON answer with its ``&&&START&&&`` prefix removed."""
    body = text.strip()
    if body.startswith(ACCOUNT_PREFIX):
        body = body[len(ACCOUNT_PREFIX) :]
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        raise CloudProtocolError(f"the account server answered with something that is not JSON: {text[:60]!r}") from e
    if not isinstance(doc, dict):
        raise CloudProtocolError("the account server's answer is not a JSON object")
    return doc

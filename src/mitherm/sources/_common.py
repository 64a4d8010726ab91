"""Helpers shared by the network sources (``esphome://``, ``hass://``, ``mqtt-raw://``): URL parsing, hex fields."""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from . import SourceError


def split_source_url(url: str, bad: str, example: str) -> tuple[SplitResult, int | None]:
    """``urlsplit(url)`` and its port; a malformed URL or port raises ``SourceError("{bad} (why); use {example}")``.

    *bad* names the source ("bad MQTT source"); leave the URL out of it when it may hold a secret."""
    try:
        parts = urlsplit(url)
        return parts, parts.port
    except ValueError as e:
        raise SourceError(f"{bad} ({e}); use {example}") from None


def source_options(parts: SplitResult, allowed: set[str], what: str, example: str) -> dict[str, list[str]]:
    """The URL's query options; one not in *allowed* raises ``SourceError`` naming it and the *what* source."""
    query = parse_qs(parts.query)
    unknown = set(query) - allowed
    if unknown:
        raise SourceError(f"unknown option(s) {', '.join(sorted(unknown))} in the {what} source; use {example}")
    return query


def hex_or_none(value: Any) -> bytes | None:
    """The bytes of a hex string field, or None when it is missing, not a string or not hex."""
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None

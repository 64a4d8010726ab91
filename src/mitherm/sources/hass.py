"""Home Assistant as a source: the advertisements HA itself receives (local adapters and every ESPHome
proxy it owns), over its websocket API command ``bluetooth/subscribe_advertisements``.

This leaves each proxy's single advertisement subscription with HA. It needs a long-lived access token of
an **admin** user (the command is admin-only). HA sends one ``add`` event per advertisement (after an
initial batch of everything it currently knows); each record is serialized by HA core
``homeassistant/components/bluetooth/websocket_api.py::serialize_service_info``::

    {"name", "address", "rssi", "manufacturer_data": {"<company id>": hex}, "service_data": {"<uuid128>": hex},
     "service_uuids", "source", "connectable", "time", "tx_power", "raw": hex | null}

``service_data``/``manufacturer_data`` are HA's aggregate over the device's recent adverts; ``raw`` (when the
scanner provides it) is the latest packet alone, so it is preferred.

URL forms: ``hass://HOST[:PORT][/api/websocket]?token=TOKEN`` (ws) and ``hasss://…`` (wss); without
``token=`` the token is read from the environment variable ``MITHERM_HASS_TOKEN``."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..captures import parse_ad_structures
from ..model import Advertisement
from . import Emit, SourceError
from ._common import hex_or_none, source_options, split_source_url
from .reconnect import ReconnectingSource, connected

log = logging.getLogger(__name__)

_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_BASE_TAIL = "-0000-1000-8000-00805f9b34fb"
SUBSCRIBE_ID = 1

TOKEN_HELP = "needs a long-lived access token of an admin user (Profile → Security → Long-lived access tokens)"


def uuid16_from_text(uuid: str) -> int | None:
    """0xFE95 for '0000fe95-0000-1000-8000-00805f9b34fb', 'fe95', '0xfe95' or '0x0000fe95'; None otherwise."""
    u = uuid.strip().lower()
    if len(u) == 36:
        if u.startswith("0000") and u.endswith(_BASE_TAIL):
            try:
                return int(u[4:8], 16)
            except ValueError:
                return None
        return None
    if u.startswith("0x"):
        u = u[2:]
    if len(u) in (4, 8):
        try:
            v = int(u, 16)
        except ValueError:
            return None
        return v if v <= 0xFFFF else None
    return None


def advertisement_from_hass(record: Mapping[str, Any]) -> Advertisement | None:
    """One ``add`` record -> Advertisement; None for records that are not a usable advert."""
    address = record.get("address")
    if not isinstance(address, str) or not _MAC_RE.match(address):
        return None
    name = record.get("name") or None
    raw = hex_or_none(record.get("raw"))
    service_data: dict[int, bytes] = {}
    manufacturer_data: dict[int, bytes] = {}
    if raw:
        service_data, manufacturer_data, raw_name = parse_ad_structures(raw)
        name = raw_name or name
    else:
        for uuid, data in (record.get("service_data") or {}).items():
            u16 = uuid16_from_text(str(uuid))
            payload = hex_or_none(data)
            if u16 is not None and payload is not None:
                service_data[u16] = payload
        for company, data in (record.get("manufacturer_data") or {}).items():
            payload = hex_or_none(data)
            try:
                cid = int(company)
            except (TypeError, ValueError):
                continue
            if payload is not None:
                manufacturer_data[cid] = payload
    if isinstance(name, str) and name.replace("-", ":").upper() == address.upper():
        name = None  # HA uses the address as the name of nameless devices
    t = record.get("time")
    rssi = record.get("rssi")
    return Advertisement(
        mac=address.upper(),
        time=float(t) if isinstance(t, int | float) else time.time(),
        service_data=service_data,
        rssi=int(rssi) if isinstance(rssi, int | float) else None,
        name=name if isinstance(name, str) else None,
        address_type=None,
        manufacturer_data=manufacturer_data,
        source=str(record.get("source") or ""),
    )


def websocket_url(url: str) -> str:
    """'ws://h:8123/api/websocket' unchanged; 'h:8123' / 'http://h:8123' -> 'ws://h:8123/api/websocket'."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise SourceError(
            f"not a Home Assistant address: {url!r}; use e.g. ws://homeassistant.local:8123/api/websocket"
        )
    path = parts.path if parts.path not in ("", "/") else "/api/websocket"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class HassSource(ReconnectingSource):
    """Advertisements from Home Assistant's Bluetooth stack over its websocket API, reconnecting forever."""

    _log = log

    def __init__(
        self,
        url: str,
        token: str,
        name: str | None = None,
        *,
        reconnect_initial: float = 1.0,
        reconnect_maximum: float = 60.0,
        heartbeat: float = 30.0,
    ) -> None:
        if not token:
            raise SourceError(f"Home Assistant source: no access token; it {TOKEN_HELP}")
        self.url = websocket_url(url)
        self.token = token
        host = urlsplit(self.url).netloc
        self.name = name or f"hass:{host}"
        self._label = f"hass {host}"
        self.reconnect_initial = reconnect_initial
        self.reconnect_maximum = reconnect_maximum
        self.heartbeat = heartbeat

    def _secrets(self) -> tuple[str, ...]:
        return (self.token,)

    async def _connect_once(self, emit: Emit) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.ws_connect(self.url, heartbeat=self.heartbeat, max_msg_size=0) as ws,
        ):
            await self._authenticate(ws)
            await ws.send_json({"id": SUBSCRIBE_ID, "type": "bluetooth/subscribe_advertisements"})
            subscribed = False
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if msg.type == aiohttp.WSMsgType.ERROR:
                        raise ConnectionError(f"websocket error: {ws.exception()}")
                    continue
                for m in _messages(msg.data):
                    if m.get("id") != SUBSCRIBE_ID:
                        continue
                    if m.get("type") == "result":
                        if not m.get("success"):
                            raise _subscribe_error(m.get("error") or {})
                        subscribed = True
                        connected()
                    elif m.get("type") == "event":
                        if not subscribed:  # HA sends the result first; be lenient anyway
                            subscribed = True
                            connected()
                        for record in (m.get("event") or {}).get("add") or ():
                            if isinstance(record, Mapping) and (adv := advertisement_from_hass(record)):
                                emit(adv)
            raise ConnectionError(f"Home Assistant closed the websocket (code {ws.close_code})")

    async def _authenticate(self, ws: Any) -> None:
        first = await ws.receive_json(timeout=15)
        if first.get("type") != "auth_required":
            raise SourceError(f"{self.url} did not greet like Home Assistant's websocket API: {first.get('type')!r}")
        await ws.send_json({"type": "auth", "access_token": self.token})
        reply = await ws.receive_json(timeout=15)
        kind = reply.get("type")
        if kind == "auth_ok":
            return
        if kind == "auth_invalid":
            raise SourceError(f"Home Assistant rejected the token: it {TOKEN_HELP}")
        raise ConnectionError(f"unexpected reply to auth: {kind!r}")


def _messages(text: str) -> Iterable[dict[str, Any]]:
    """HA sends one JSON object per frame, or an array of them when messages are coalesced."""
    try:
        data = json.loads(text)
    except ValueError:
        return ()
    if isinstance(data, dict):
        return (data,)
    if isinstance(data, list):
        return [m for m in data if isinstance(m, dict)]
    return ()


def _subscribe_error(error: Mapping[str, Any]) -> SourceError:
    code = error.get("code")
    message = error.get("message") or ""
    if code == "unauthorized":
        return SourceError(f"Home Assistant refused bluetooth/subscribe_advertisements: the token {TOKEN_HELP}")
    if code == "unknown_command":
        return SourceError(
            "this Home Assistant has no bluetooth/subscribe_advertisements: set up its Bluetooth integration "
            "or update Home Assistant"
        )
    return SourceError(f"Home Assistant refused bluetooth/subscribe_advertisements: {code} {message}".strip())


def hass_from_url(url: str, name: str | None = None) -> HassSource:
    """``hass://HOST[:PORT][/PATH]?token=TOKEN`` (ws) / ``hasss://…`` (wss); token also from MITHERM_HASS_TOKEN."""
    import os

    example = "hass://homeassistant.local:8123?token=LONG_LIVED_TOKEN (or hasss:// for wss)"
    parts, port = split_source_url(url, "bad Home Assistant source", example)
    port = port or 8123
    scheme = parts.scheme.lower()
    if scheme not in ("hass", "hasss") or not parts.hostname:
        raise SourceError(f"bad Home Assistant source; use {example}")
    query = source_options(parts, {"token", "name"}, "Home Assistant", example)
    token = (query.get("token") or [""])[-1] or os.environ.get("MITHERM_HASS_TOKEN", "")
    if not token:
        raise SourceError(
            f"the Home Assistant source needs ?token=… or MITHERM_HASS_TOKEN; it {TOKEN_HELP}. Example: {example}"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    ws_url = (
        f"{'wss' if scheme == 'hasss' else 'ws'}://{host}:{port}{parts.path if parts.path not in ('', '/') else ''}"
    )
    return HassSource(ws_url, token, name=(query.get("name") or [name])[-1])

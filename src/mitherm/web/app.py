"""The dashboard: an aiohttp app over a running :class:`~mitherm.service.Service`.

Pages (static HTML + JS, no build step): ``/`` devices, ``/device/{mac}`` one device (plots, CSV, rename, key,
delete), ``/add`` the add-a-sensor guide, ``/login``. JSON API under ``/api/`` and live updates as server-sent
events on ``/api/events`` (fed by :class:`WebSink`, a gateway sink).

Security model
--------------
* Listens on 127.0.0.1 by default. On a loopback address without a password, requests must carry a loopback
  ``Host`` header (a DNS-rebinding page cannot talk to it).
* Bound anywhere else, a password is required: the ``password`` argument, else ``$MITHERM_WEB_PASSWORD``, else a
  random token is generated and logged with a login URL (``/?token=…``). Browsers log in once and get an
  HttpOnly, SameSite=Strict session cookie; scripts may send ``Authorization: Bearer <password>``.
* Every state-changing request (POST/PUT/PATCH/DELETE) needs the ``X-CSRF-Token`` header, an HMAC of the
  ``mitherm_csrf`` cookie the page fetched from ``/api/session`` (double submit), and a same-host ``Origin``
  when the browser sends one. Bearer-authenticated requests carry no cookies and are exempt.
* Keys never leave the server in full: the API shows :func:`~mitherm.keystore.mask_key` only.
* A strict Content-Security-Policy (scripts from 'self' only), no framing, no referrer.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from ..keystore import SOURCES, KeystoreError, mask_key, normalize_bindkey
from ..mac import InvalidMac, normalize_mac
from ..state import DeviceState, KeyStatus

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "mitherm_session"
CSRF_COOKIE = "mitherm_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_LIFETIME = 30 * 86400.0
PASSWORD_ENV = "MITHERM_WEB_PASSWORD"
NAMES_STATE = "web.names"  # names given in the dashboard (devices without a keystore entry), in History state
ROWS_TTL = 30.0  # seconds the History device rows are cached for the device list
TICK = 2.0  # seconds between SSE updates when nothing was published (ages, key status changes)
COALESCE = 0.25  # seconds: updates published meanwhile go out together
RANGES = {"day": 86400.0, "week": 7 * 86400.0, "month": 31 * 86400.0, "year": 366 * 86400.0}
MAX_POINTS = 5000  # raw points per plot; more are averaged into buckets
QUANTITIES = ("temperature_c", "humidity_pct", "battery_pct", "voltage_v")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
PUBLIC_PATHS = frozenset({"/login", "/api/session", "/api/login", "/favicon.ico"})
_VOLATILE = ("last_seen", "rssi", "receiver")


class WebConfigError(ValueError):
    """The dashboard cannot be served as configured (bad bind address)."""


# --- live updates ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Subscriber:
    event: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # mac -> device JSON without volatile fields


class WebSink:
    """A gateway sink that wakes the dashboard's SSE streams when a device publishes a reading. Cheap: it
    only sets events; each stream sends what changed since it last sent, at most every ``COALESCE`` s."""

    def __init__(self) -> None:
        self._subs: set[_Subscriber] = set()
        self.closed = False

    def publish(self, state: DeviceState, reading: Any) -> None:
        self.wake()

    def wake(self) -> None:
        for sub in self._subs:
            sub.event.set()

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber()
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subs.discard(sub)

    def close(self) -> None:
        self.closed = True
        self.wake()

    @property
    def subscribers(self) -> int:
        return len(self._subs)


# --- security ----------------------------------------------------------------------------------------


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``, or just a port) -> (host, port)."""
    text = bind.strip()
    if text.isdigit():
        return "127.0.0.1", int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise WebConfigError(f"web bind address {bind!r} must be HOST:PORT, e.g. 127.0.0.1:8086")
    host = host.strip("[]") or "127.0.0.1"
    p = int(port)
    if not 0 <= p <= 65535:
        raise WebConfigError(f"web bind address {bind!r}: port out of range")
    return host, p


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Security:
    password: str | None  # None: no login (loopback only)
    loopback: bool = True
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    sessions: dict[str, float] = field(default_factory=dict)  # session id -> expiry (monotonic)

    @property
    def auth_required(self) -> bool:
        return self.password is not None

    def check_password(self, given: str | None) -> bool:
        if self.password is None or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8"), self.password.encode("utf-8"))

    def new_session(self) -> str:
        now = time.monotonic()
        for sid in [s for s, exp in self.sessions.items() if exp < now]:
            del self.sessions[sid]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = now + SESSION_LIFETIME
        return sid

    def session_ok(self, sid: str | None) -> bool:
        if not sid:
            return False
        exp = self.sessions.get(sid)
        return exp is not None and exp > time.monotonic()

    def csrf_token(self, cookie: str) -> str:
        return hmac.new(self.secret, cookie.encode("utf-8"), hashlib.sha256).hexdigest()

    def csrf_ok(self, cookie: str | None, header: str | None) -> bool:
        if not cookie or not header:
            return False
        return hmac.compare_digest(self.csrf_token(cookie), header)


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


# --- the app state -----------------------------------------------------------------------------------


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


FIRMWARE = {
    "mibeacon": ("stock", "Stock firmware (MiBeacon {v})"),
    "atc1441": ("custom", "Custom firmware, atc1441 format"),
    "pvvx": ("custom", "Custom firmware, pvvx format"),
    "bthome": ("bthome", "BTHome {v}"),
}


def firmware_info(fmt: str | None, model: str | None) -> dict[str, Any]:
    """What the wire format says about the firmware: ``kind`` stock | custom | bthome | unknown."""
    if not fmt:
        return {"kind": "unknown", "label": "Not known yet", "encrypted": None}
    enc = fmt.endswith("_enc")
    base = fmt.removesuffix("_enc")
    family, _, version = base.partition("_")
    kind, label = FIRMWARE.get(family, ("unknown", fmt))
    label = label.format(v=version)
    if family == "bthome" and model and model not in ("BTHome",):
        kind, label = "custom", f"Custom firmware, BTHome {version} format"
    if family == "mibeacon" and model == "ATC":
        kind, label = "custom", f"Custom firmware, Mi ({version}) format"
    return {"kind": kind, "label": label + (", encrypted" if enc else ""), "encrypted": enc}


class WebApp:
    """Everything the handlers share: the service, the security settings, the live-update hub."""

    def __init__(self, service: Any, security: Security) -> None:
        self.service = service
        self.security = security
        self.sink = WebSink()
        self.web_names: dict[str, str] = {}
        self._names_loaded = False
        self._sink_on: Any = None
        self.url: str | None = None  # set by serve()
        self._rows: dict[str, Any] = {}
        self._last_values: dict[str, dict[str, tuple[float, float]]] = {}
        self._rows_time = -math.inf

    def history_values(self, mac: str) -> dict[str, tuple[float, float]]:
        """The last recorded ``(time, value)`` of each quantity (looked up once per device): the dashboard
        shows them, marked stale, until the device sends again (a stock sensor may take ten minutes)."""
        cached = self._last_values.get(mac)
        if cached is not None:
            return cached
        vals: dict[str, tuple[float, float]] = {}
        row = self.history_row(mac)
        hist = self.service.history
        if hist is not None and row is not None and row.last_seen:
            try:
                for r in hist.readings(mac, since=row.last_seen - 86400.0, quantity=QUANTITIES):
                    vals[r.quantity] = (r.ts, r.value)
            except Exception as e:
                log.debug("history values of %s: %s", mac, e)
        self._last_values[mac] = vals
        return vals

    def _with_stale(self, d: dict[str, Any]) -> dict[str, Any]:
        stale: dict[str, float] = {}
        missing = [q for q in QUANTITIES if q not in d["values"]]
        if missing:
            hv = self.history_values(d["mac"])
            for q in missing:
                if q in hv:
                    stale[q] = hv[q][0]
                    d["values"][q] = _finite(hv[q][1])
        d["stale"] = stale
        return d

    def history_row(self, mac: str) -> Any:
        """The device's History row (model, format, first/last seen), cached for ``ROWS_TTL`` seconds: it fills in
        what the gateway does not know yet after a restart (the firmware before the first data frame)."""
        hist = self.service.history
        if hist is None:
            return None
        now = time.monotonic()
        if now - self._rows_time > ROWS_TTL:
            self._rows_time = now
            try:
                self._rows = {r.mac: r for r in hist.devices()}
            except Exception as e:  # a locked or closed database must not break the page
                log.debug("history rows: %s", e)
        return self._rows.get(mac)

    # the service's parts (the gateway exists once the service runs)
    @property
    def gateway(self) -> Any:
        gw = self.service.gateway
        if gw is not None and self._sink_on is not gw:
            if self.sink not in gw.sinks:
                gw.sinks.append(self.sink)
            self._sink_on = gw
            self._load_names()
        return gw

    def detach(self) -> None:
        gw = self._sink_on
        if gw is not None and self.sink in gw.sinks:
            gw.sinks.remove(self.sink)
        self._sink_on = None

    def _load_names(self) -> None:
        if self._names_loaded or self.service.history is None:
            return
        self._names_loaded = True
        stored = self.service.history.get_state(NAMES_STATE) or {}
        if isinstance(stored, dict):
            self.web_names = {k: v for k, v in stored.items() if isinstance(k, str) and isinstance(v, str)}
        if self.web_names:
            cfg_names = getattr(getattr(self.service, "cfg", None), "names", None)
            if isinstance(cfg_names, dict):
                for mac, name in self.web_names.items():
                    cfg_names.setdefault(mac, name)
            self._apply_keys()

    def _save_names(self) -> None:
        if self.service.history is not None:
            self.service.history.set_state(NAMES_STATE, self.web_names)

    def names(self) -> dict[str, str]:
        names: dict[str, str] = dict(self.web_names)
        cfg_names = getattr(getattr(self.service, "cfg", None), "names", None) or {}
        names.update(cfg_names)
        ks = self.service.keystore
        if ks is not None:
            for e in ks.entries():
                if e.name:
                    names.setdefault(e.mac, e.name)
        return names

    def _apply_keys(self) -> list[str]:
        """Hand the keystore's keys and all names to the gateway (it re-verifies changed keys at once)."""
        gw = self.service.gateway
        if gw is None:
            return []
        ks = self.service.keystore
        keys = ks.keys() if ks is not None else dict(gw.keys)
        changed = gw.set_keys(keys, self.names())
        self.sink.wake()
        return changed

    def known(self, mac: str, st: DeviceState | None) -> bool:
        ks = self.service.keystore
        return bool((st is not None and st.known) or mac in self.web_names or (ks is not None and mac in ks))

    # device JSON (keys masked)
    def device_json(self, st: DeviceState) -> dict[str, Any]:
        d = st.to_json()
        d["values"] = {k: _finite(v) for k, v in d["values"].items()}
        ks = self.service.keystore
        entry = ks.get(st.mac) if ks is not None else None
        d["known"] = self.known(st.mac, st)
        d["online"] = True
        d["key"] = mask_key(entry.bindkey) if entry is not None and entry.bindkey else None
        d["key_source"] = entry.source if entry is not None and entry.bindkey else None
        d["first_seen"] = st.first_seen
        d["data_interval"] = st.data_interval
        d["product_id"] = st.product_id
        fmt = st.format
        if fmt is None:
            row = self.history_row(st.mac)
            fmt = row.format if row is not None else None
        d["firmware"] = firmware_info(fmt, st.model)
        return self._with_stale(d)

    def offline_json(self, mac: str) -> dict[str, Any]:
        """A known device (keystore entry or dashboard name) not heard since the gateway started."""
        ks = self.service.keystore
        entry = ks.get(mac) if ks is not None else None
        row = self.history_row(mac)
        name = self.names().get(mac) or (row.name if row else None)
        fmt = row.format if row else None
        model = (row.model if row else None) or (entry.model if entry else None)
        return self._with_stale(
            {
                "mac": mac,
                "name": name,
                "model": model,
                "format": fmt,
                "values": {},
                "rssi": None,
                "receiver": None,
                "last_seen": (row.last_seen if row else None) or 0.0,
                "key_status": KeyStatus.UNKNOWN,
                "key_verdict": None,
                "known": True,
                "online": False,
                "key": mask_key(entry.bindkey) if entry is not None and entry.bindkey else None,
                "key_source": entry.source if entry is not None and entry.bindkey else None,
                "first_seen": row.first_seen if row else None,
                "data_interval": None,
                "product_id": None,
                "firmware": firmware_info(fmt, model),
            }
        )

    def all_devices(self) -> dict[str, dict[str, Any]]:
        gw = self.gateway
        out: dict[str, dict[str, Any]] = {}
        if gw is not None:
            for mac, st in gw.devices.items():
                out[mac] = self.device_json(st)
        ks = self.service.keystore
        extra = set(self.web_names)
        if ks is not None:
            extra |= {e.mac for e in ks.entries()}
        for mac in sorted(extra - set(out)):
            out[mac] = self.offline_json(mac)
        return out

    def clock(self) -> float:
        gw = self.service.gateway
        return (gw.clock if gw is not None and gw.clock else 0.0) or time.time()


WEB_KEY = web.AppKey("mitherm_web", WebApp)
if hasattr(web, "RequestKey"):  # aiohttp >= 3.13
    AUTHED: Any = web.RequestKey("mitherm_authed", bool)
    NEW_CSRF: Any = web.RequestKey("mitherm_csrf_cookie", str)
else:  # pragma: no cover
    AUTHED, NEW_CSRF = "mitherm_authed", "mitherm_csrf_cookie"


def _web(request: web.Request) -> WebApp:
    return request.app[WEB_KEY]


def _mac(request: web.Request) -> str:
    try:
        return normalize_mac(request.match_info["mac"])
    except InvalidMac as e:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(e)}), content_type="application/json") from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "expected a JSON object"}), content_type="application/json")
    return body


# --- middlewares ---------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        resp = e
        if resp.status >= 400 and _wants_json(request) and resp.content_type != "application/json":
            resp = _error(resp.status, resp.reason)
    if not resp.prepared:
        h = resp.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/api/"):
            h.setdefault("Cache-Control", "no-store")
        if not request.cookies.get(CSRF_COOKIE) and NEW_CSRF not in request:
            request[NEW_CSRF] = secrets.token_urlsafe(24)
        if NEW_CSRF in request:
            resp.set_cookie(CSRF_COOKIE, request[NEW_CSRF], httponly=True, samesite="Strict", path="/")
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


@web.middleware
async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = _web(request)
    sec = app.security
    # DNS rebinding: without a password, only answer requests addressed to a loopback name
    if sec.loopback and not sec.auth_required and _host_name(request.host) not in LOOPBACK_HOSTS:
        return _error(403, "this dashboard only answers requests for 127.0.0.1 / localhost")
    bearer = _bearer(request)
    authed = not sec.auth_required
    via_bearer = False
    if sec.auth_required:
        if bearer is not None and sec.check_password(bearer):
            authed = via_bearer = True
        elif sec.session_ok(request.cookies.get(SESSION_COOKIE)):
            authed = True
        elif request.method == "GET" and sec.check_password(request.query.get("token")):
            # the login link printed at start-up: trade the token for a session cookie
            raise _login_redirect(request, sec)
    request[AUTHED] = authed
    if request.method in UNSAFE_METHODS and not via_bearer:
        origin = request.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc.lower() != request.host.lower():
            return _error(403, "cross-origin request refused")
        if not sec.csrf_ok(request.cookies.get(CSRF_COOKIE), request.headers.get(CSRF_HEADER)):
            return _error(403, "missing or wrong CSRF token: reload the page")
    if not authed and not _public(request.path):
        if _wants_json(request):
            return _error(401, "log in first", login="/login")
        raise web.HTTPFound(f"/login?next={quote(request.path_qs, safe='/')}" if request.path != "/" else "/login")
    return await handler(request)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def _login_redirect(request: web.Request, sec: Security) -> web.HTTPFound:
    query = {k: v for k, v in request.query.items() if k != "token"}
    target = request.rel_url.with_query(query)
    resp = web.HTTPFound(str(target))
    resp.set_cookie(SESSION_COOKIE, sec.new_session(), httponly=True, samesite="Strict", path="/")
    return resp


# --- pages ---------------------------------------------------------------------------------------------


def _page(name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return handler


async def device_page(request: web.Request) -> web.StreamResponse:
    _mac(request)
    return web.FileResponse(STATIC / "device.html", headers={"Cache-Control": "no-cache"})


async def favicon(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


# --- session / login -----------------------------------------------------------------------------------


async def api_session(request: web.Request) -> web.Response:
    app = _web(request)
    cookie = request.cookies.get(CSRF_COOKIE) or request.get(NEW_CSRF)
    if not cookie:
        cookie = request[NEW_CSRF] = secrets.token_urlsafe(24)
    return web.json_response(
        {
            "auth_required": app.security.auth_required,
            "authenticated": bool(request.get(AUTHED)),
            "csrf": app.security.csrf_token(cookie),
        }
    )


async def api_login(request: web.Request) -> web.Response:
    sec = _web(request).security
    body = await _json_body(request)
    if not sec.auth_required:
        return web.json_response({"ok": True})
    if not sec.check_password(body.get("password") if isinstance(body.get("password"), str) else None):
        await asyncio.sleep(0.5)  # slow down guessing
        return _error(401, "wrong password")
    resp = web.json_response({"ok": True})
    resp.set_cookie(SESSION_COOKIE, sec.new_session(), httponly=True, samesite="Strict", path="/")
    return resp


async def api_logout(request: web.Request) -> web.Response:
    sec = _web(request).security
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        sec.sessions.pop(sid, None)
    resp = web.json_response({"ok": True})
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


# --- devices -------------------------------------------------------------------------------------------


async def api_devices(request: web.Request) -> web.Response:
    app = _web(request)
    devices = list(app.all_devices().values())
    return web.json_response({"clock": app.clock(), "devices": devices})


def _state(app: WebApp, mac: str) -> DeviceState | None:
    gw = app.gateway
    return gw.devices.get(mac) if gw is not None else None


async def api_device(request: web.Request) -> web.Response:
    app = _web(request)
    mac = _mac(request)
    st = _state(app, mac)
    d = app.device_json(st) if st is not None else None
    if d is None:
        if not app.known(mac, None) and not await _in_history(app, mac):
            return _error(404, f"{mac} is not a known device")
        d = app.offline_json(mac)
    gw = app.gateway
    diagnosis = None
    if gw is not None and st is not None and st.key_status == KeyStatus.FAILED and mac in gw.keys:
        diagnosis = gw.verify_key(mac, gw.keys[mac]).to_json()
    d["diagnosis"] = diagnosis
    d["catalogue"] = _catalogue(st.product_id if st is not None else None, d.get("model"))
    d["quantities"] = await _quantities(app, mac)
    return web.json_response({"clock": app.clock(), "device": d})


async def _in_history(app: WebApp, mac: str) -> bool:
    hist = app.service.history
    if hist is None:
        return False
    return await asyncio.to_thread(hist.device, mac) is not None


async def _quantities(app: WebApp, mac: str) -> list[str]:
    hist = app.service.history
    if hist is None:
        return []
    return await asyncio.to_thread(hist.quantities, mac)


def _catalogue(product_id: int | None, model: str | None) -> dict[str, Any] | None:
    from ..catalogue import catalogue

    info = None
    cat = catalogue()
    if product_id is not None:
        info = cat.get(product_id)
    if info is None and model:
        info = next((i for i in cat.values() if i.model == model), None)
    if info is None:
        return None
    return {
        "model": info.model,
        "name": info.name,
        "manufacturer": info.manufacturer,
        "stock_encrypted": info.stock_encrypted,
        "custom_firmware": info.custom_firmware,
        "notes": info.notes,
    }


async def api_rename(request: web.Request) -> web.Response:
    app = _web(request)
    mac = _mac(request)
    body = await _json_body(request)
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        return _error(400, "name must be a string")
    name = (name or "").strip()[:64] or None
    svc = app.service
    cfg_names = getattr(getattr(svc, "cfg", None), "names", None)
    if name:
        app.web_names[mac] = name
        if isinstance(cfg_names, dict):
            cfg_names[mac] = name
    else:
        app.web_names.pop(mac, None)
        if isinstance(cfg_names, dict):
            cfg_names.pop(mac, None)
    ks = svc.keystore
    entry = ks.get(mac) if ks is not None else None
    if entry is not None and entry.bindkey and name:
        ks.add(mac, entry.bindkey, name=name, source=entry.source, overwrite=True)
        await asyncio.to_thread(ks.save)
    if svc.history is not None:
        await asyncio.to_thread(svc.history.rename, mac, name)
        app._save_names()
    app._apply_keys()
    st = _state(app, mac)
    if st is not None:
        st.name = name or app.names().get(mac) or st.name
        st.known = app.known(mac, st) or bool(name)
    return web.json_response({"ok": True, "name": name})


def _diagnose(app: WebApp, mac: str, key: str) -> Any:
    gw = app.gateway
    if gw is None:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": "the gateway is not running yet"}), content_type="application/json"
        )
    return gw.verify_key(mac, key)


async def api_doctor(request: web.Request) -> web.Response:
    """The doctor's verdict on a key for a device, without saving anything."""
    app = _web(request)
    body = await _json_body(request)
    try:
        mac = normalize_mac(str(body.get("mac") or ""))
    except InvalidMac as e:
        return _error(400, str(e))
    key = body.get("key")
    if not isinstance(key, str):
        return _error(400, "key must be a string")
    dx = _diagnose(app, mac, key)
    return web.json_response({"diagnosis": dx.to_json()})


async def api_set_key(request: web.Request) -> web.Response:
    """Judge the key and save it when it works (or cannot be judged yet: device not seen, no encrypted frame
    yet). A key the doctor rejects is saved only with ``force``."""
    from ..doctor import UNDECIDED, Verdict

    app = _web(request)
    mac = _mac(request)
    body = await _json_body(request)
    key = body.get("key")
    if not isinstance(key, str):
        return _error(400, "key must be a string")
    source = body.get("source") or "manual"
    if source not in SOURCES:
        return _error(400, f"source must be one of {', '.join(SOURCES)}")
    force = body.get("force") is True
    dx = _diagnose(app, mac, key)
    saved = False
    status = None
    if dx.verdict not in (Verdict.INVALID_KEY, Verdict.PLACEHOLDER_KEY) and (dx.ok or dx.verdict in UNDECIDED or force):
        ks = app.service.keystore
        if ks is None:
            return _error(503, "no keystore")
        st = _state(app, mac)
        name = app.names().get(mac) or (st.name if st is not None and st.known else None)
        model = st.model if st is not None else None
        try:
            status = ks.add(mac, normalize_bindkey(key), name=name, source=source, overwrite=True, model=model)
        except KeystoreError as e:
            return _error(400, str(e))
        await asyncio.to_thread(ks.save)
        saved = True
        app._apply_keys()
        if st is not None:
            st.known = True
    st = _state(app, mac)
    return web.json_response(
        {
            "diagnosis": dx.to_json(),
            "saved": saved,
            "status": status,
            "device": app.device_json(st) if st is not None else app.offline_json(mac),
        }
    )


async def api_remove_key(request: web.Request) -> web.Response:
    app = _web(request)
    mac = _mac(request)
    ks = app.service.keystore
    entry = ks.get(mac) if ks is not None else None
    if entry is None:
        return _error(404, f"{mac} has no key")
    if entry.name and mac not in app.web_names:  # keep the name the entry carried
        app.web_names[mac] = entry.name
        app._save_names()
    ks.remove(mac)
    await asyncio.to_thread(ks.save)
    app._apply_keys()
    return web.json_response({"ok": True})


async def api_delete(request: web.Request) -> web.Response:
    """Forget a device: key, name, history. It comes back as an unknown nearby device if it still sends."""
    app = _web(request)
    mac = _mac(request)
    svc = app.service
    ks = svc.keystore
    if ks is not None and ks.remove(mac):
        await asyncio.to_thread(ks.save)
    app.web_names.pop(mac, None)
    cfg_names = getattr(getattr(svc, "cfg", None), "names", None)
    if isinstance(cfg_names, dict):
        cfg_names.pop(mac, None)
    if svc.history is not None:
        await asyncio.to_thread(svc.history.delete_device, mac)
        app._save_names()
    app._last_values.pop(mac, None)
    app._rows_time = -math.inf
    gw = app.gateway
    if gw is not None:
        gw.devices.pop(mac, None)
        gw.counters.pop(mac, None)
    app._apply_keys()
    return web.json_response({"ok": True})


# --- history -------------------------------------------------------------------------------------------


def _range(request: web.Request, app: WebApp, mac: str) -> tuple[str, float, float]:
    rng = request.query.get("range", "day")
    if rng not in RANGES:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"range must be one of {', '.join(RANGES)}"}), content_type="application/json"
        )
    until: float | None = None
    if "until" in request.query:
        try:
            until = float(request.query["until"])
        except ValueError:
            until = None
    if until is None:
        st = _state(app, mac)
        until = st.last_seen if st is not None and st.last_seen else None
    if until is None and app.service.history is not None:
        row = app.service.history.device(mac)
        until = row.last_seen if row is not None and row.last_seen else None
    until = (until or time.time()) + 1.0
    return rng, until - RANGES[rng], until


def _bucket(ts: list[float], cols: dict[str, list[float | None]], n: int) -> tuple[list[float], dict[str, list]]:
    """Average ``ts``-aligned columns into at most ``n`` equal time buckets (None ignored)."""
    if len(ts) <= n:
        return ts, cols
    lo, hi = ts[0], ts[-1]
    width = (hi - lo) / n or 1.0
    acc: dict[int, list[Any]] = {}
    for i, t in enumerate(ts):
        b = min(int((t - lo) / width), n - 1)
        slot = acc.setdefault(b, [0.0, 0, {q: [0.0, 0] for q in cols}])
        slot[0] += t
        slot[1] += 1
        for q, col in cols.items():
            v = col[i]
            if v is not None:
                slot[2][q][0] += v
                slot[2][q][1] += 1
    out_t: list[float] = []
    out: dict[str, list[float | None]] = {q: [] for q in cols}
    for b in sorted(acc):
        tsum, tn, qs = acc[b]
        out_t.append(tsum / tn)
        for q in cols:
            s, c = qs[q]
            out[q].append(round(s / c, 3) if c else None)
    return out_t, out


def _series(app: WebApp, mac: str, rng: str, since: float, until: float) -> dict[str, Any]:
    hist = app.service.history
    if hist is None:
        return {"kind": "none", "t": [], "series": {}}
    if rng == "day":
        rows = hist.readings(mac, since, until, quantity=QUANTITIES)
        if len(rows) >= 2:
            ts: list[float] = []
            cols: dict[str, list[float | None]] = {}
            index: dict[float, int] = {}
            for r in rows:
                i = index.get(r.ts)
                if i is None:
                    i = index[r.ts] = len(ts)
                    ts.append(r.ts)
                    for col in cols.values():
                        col.append(None)
                col = cols.get(r.quantity)
                if col is None:
                    col = cols[r.quantity] = [None] * len(ts)
                col[i] = r.value
            ts, cols = _bucket(ts, cols, MAX_POINTS)
            return {"kind": "raw", "t": ts, "series": {q: {"value": v} for q, v in cols.items()}}
    hourly = hist.hourly(mac, since, until, quantity=QUANTITIES)
    hours = sorted({r.hour for r in hourly})
    pos = {h: i for i, h in enumerate(hours)}
    series: dict[str, dict[str, list[float | None]]] = {}
    for r in hourly:
        s = series.setdefault(r.quantity, {k: [None] * len(hours) for k in ("value", "min", "max")})
        i = pos[r.hour]
        s["value"][i] = round(r.mean, 3)
        s["min"][i] = r.min
        s["max"][i] = r.max
    return {"kind": "hourly", "t": [h + 1800 for h in hours], "series": series}


async def api_history(request: web.Request) -> web.Response:
    app = _web(request)
    mac = _mac(request)
    rng, since, until = _range(request, app, mac)
    data = await asyncio.to_thread(_series, app, mac, rng, since, until)
    data.update(mac=mac, range=rng, since=since, until=until)
    return web.json_response(data)


def _csv_text(app: WebApp, mac: str, rng: str, since: float, until: float) -> str:
    from datetime import UTC, datetime

    hist = app.service.history
    buf = io.StringIO()
    w = csv.writer(buf)

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    if hist is None:
        return ""
    if rng == "day":
        rows = hist.readings(mac, since, until)
        quantities = sorted({r.quantity for r in rows})
        w.writerow(["time", "unix_time", *quantities])
        by_ts: dict[float, dict[str, float]] = {}
        for r in rows:
            by_ts.setdefault(r.ts, {})[r.quantity] = r.value
        for ts, vals in by_ts.items():
            w.writerow([iso(ts), f"{ts:.3f}", *(vals.get(q, "") for q in quantities)])
    else:
        hourly = hist.hourly(mac, since, until)
        quantities = sorted({r.quantity for r in hourly})
        w.writerow(["hour", "unix_time", *(f"{q}_{s}" for q in quantities for s in ("min", "mean", "max"))])
        by_hour: dict[int, dict[str, Any]] = {}
        for r in hourly:
            by_hour.setdefault(r.hour, {})[r.quantity] = r
        for hour, vals in by_hour.items():
            cells: list[Any] = []
            for q in quantities:
                r = vals.get(q)
                cells += [r.min, round(r.mean, 4), r.max] if r is not None else ["", "", ""]
            w.writerow([iso(hour), hour, *cells])
    return buf.getvalue()


async def api_csv(request: web.Request) -> web.Response:
    app = _web(request)
    mac = _mac(request)
    rng, since, until = _range(request, app, mac)
    text = await asyncio.to_thread(_csv_text, app, mac, rng, since, until)
    filename = f"mitherm-{mac.replace(':', '').lower()}-{rng}.csv"
    return web.Response(
        text=text,
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# --- live updates --------------------------------------------------------------------------------------


def _stable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _VOLATILE}


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``snapshot`` (every device) first, then ``update`` messages with the devices whose
    values, status or name changed, ``seen`` (last_seen/rssi/receiver of every device) and ``removed``."""
    app = _web(request)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    sink = app.sink
    sub = sink.subscribe()

    async def send(event: str, data: dict[str, Any]) -> None:
        await resp.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

    try:
        devices = app.all_devices()
        sub.sent = {mac: _stable(d) for mac, d in devices.items()}
        await send("snapshot", {"clock": app.clock(), "devices": list(devices.values())})
        while not sink.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.event.wait(), TICK)
            if sink.closed:
                break
            await asyncio.sleep(COALESCE)
            sub.event.clear()
            devices = app.all_devices()
            changed = []
            for mac, d in devices.items():
                s = _stable(d)
                if sub.sent.get(mac) != s:
                    sub.sent[mac] = s
                    changed.append(d)
            removed = [m for m in sub.sent if m not in devices]
            for m in removed:
                del sub.sent[m]
            seen = {m: [d["last_seen"], d["rssi"], d["receiver"]] for m, d in devices.items()}
            await send("update", {"clock": app.clock(), "devices": changed, "removed": removed, "seen": seen})
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        sink.unsubscribe(sub)
    return resp


# --- the app -------------------------------------------------------------------------------------------


def create_app(service: Any, *, password: str | None = None, loopback: bool = True) -> web.Application:
    """The dashboard app over ``service`` (its gateway may start later). ``password`` None with ``loopback``
    means no login; ``serve`` decides both from the bind address."""
    app = web.Application(middlewares=[headers_middleware, security_middleware], client_max_size=64 * 1024)
    state = WebApp(service, Security(password=password, loopback=loopback))
    app[WEB_KEY] = state
    r = app.router
    r.add_get("/", _page("devices.html"))
    r.add_get("/add", _page("add.html"))
    r.add_get("/login", _page("login.html"))
    r.add_get("/device/{mac}", device_page)
    r.add_get("/favicon.ico", favicon)
    r.add_get("/api/session", api_session)
    r.add_post("/api/login", api_login)
    r.add_post("/api/logout", api_logout)
    r.add_get("/api/devices", api_devices)
    r.add_get("/api/devices/{mac}", api_device)
    r.add_delete("/api/devices/{mac}", api_delete)
    r.add_post("/api/devices/{mac}/name", api_rename)
    r.add_post("/api/devices/{mac}/key", api_set_key)
    r.add_delete("/api/devices/{mac}/key", api_remove_key)
    r.add_get("/api/devices/{mac}/history", api_history)
    r.add_get("/api/devices/{mac}/history.csv", api_csv)
    r.add_post("/api/doctor", api_doctor)
    r.add_get("/api/events", api_events)
    r.add_static("/static", STATIC, append_version=False)

    async def on_startup(_: web.Application) -> None:
        _ = state.gateway  # registers the sink when the gateway already exists

    async def on_shutdown(_: web.Application) -> None:
        state.sink.close()

    async def on_cleanup(_: web.Application) -> None:
        state.detach()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(service: Any, bind: str = "127.0.0.1:8086", password: str | None = None) -> web.AppRunner:
    """Start the dashboard on ``bind``; returns the runner (``await runner.cleanup()`` to stop). The URL is
    ``runner.app[WEB_KEY].url`` (the real port when ``bind`` asks for port 0)."""
    host, port = parse_bind(bind)
    loopback = is_loopback(host)
    password = password or os.environ.get(PASSWORD_ENV) or None
    generated = False
    if not loopback and password is None:
        password = secrets.token_urlsafe(18)
        generated = True
    app = create_app(service, password=password, loopback=loopback)
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual = port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            actual = addr[1]
            break
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{actual}/"
    app[WEB_KEY].url = url
    if generated:
        log.warning(
            "dashboard on %s needs a login (not a loopback address): open %s?token=%s "
            "(set a password with %s to choose your own)",
            url,
            url,
            password,
            PASSWORD_ENV,
        )
    else:
        log.info("dashboard on %s%s", url, " (password required)" if password else "")
    return runner


def runner_url(runner: web.AppRunner) -> str:
    """The dashboard URL of a runner started by :func:`serve`."""
    return runner.app[WEB_KEY].url or ""


__all__ = ["WEB_KEY", "Security", "WebApp", "WebConfigError", "WebSink", "create_app", "runner_url", "serve"]

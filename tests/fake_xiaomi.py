"""A local fake of the Xiaomi account server, STS and mi.com API (reference keys.md §3.1-§3.6, §3.9).

Written from the reference, independently of :mod:`mitherm.cloud`: RC4 comes from ``cryptography``'s
ARC4 (the client has its own), signatures and nonces are recomputed here. One aiohttp app on a
loopback port serves everything:

* ``/pass/serviceLogin``, ``/pass/serviceLoginAuth2`` (MD5 hash, ``_sign`` issued by step 1, captcha
  with ``/pass/getCode`` + ``ick`` cookie, code 70016 wrong password, 70022 locked, notificationUrl);
* ``/identity/authStart|list|auth/send*Ticket|auth/verify*|result/check`` and
  ``/pass/serviceLoginAuth2/end`` (``extension-pragma`` header, optionally a "Tips" page first);
* ``/sts`` (one-time ticket -> ``serviceToken`` cookie);
* ``/{region}/app/v2/...`` (ENCRYPT-RC4: signature, rc4_hash__, nonce freshness and replay, cookies).

It runs in its own thread and event loop so that synchronous CliRunner tests can use it too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives.ciphers import Cipher

PREFIX = "&&&START&&&"
STS_CALLBACK = "https://sts.api.io.mi.com/sts"
REGIONS = ("cn", "de", "us", "ru", "tw", "sg", "in", "i2")


def _arc4_drop1024(key: bytes, data: bytes) -> bytes:
    enc = Cipher(ARC4(key), mode=None).encryptor()
    enc.update(bytes(1024))
    return enc.update(data)


def _sha1_b64(text: str) -> str:
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


@dataclass
class FakeDevice:
    did: str
    name: str
    model: str
    mac: str | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(12))
    beaconkey: str | None = None  # None: the cloud has no key (answers all-F)


@dataclass
class FakeHome:
    id: int
    name: str
    owner: int
    region: str
    devices: list[FakeDevice] = field(default_factory=list)
    shared_with: set[int] = field(default_factory=set)


@dataclass
class FakeAccount:
    username: str
    password: str
    user_id: int
    locked: bool = False
    captcha: bool = False
    two_factor: str | None = None  # "email" or "phone"


@dataclass
class _Login:
    account: FakeAccount
    ssecurity: str
    verified: bool = False
    tips_shown: bool = False


class FakeXiaomi:
    """Accounts, homes and devices in memory; ``url`` once started. Inspect ``rejected``, ``api_calls``,
    ``sent_codes`` and ``captcha_images`` in tests."""

    captcha_code = "w8kt3"
    verification_code = "424242"

    def __init__(self, *, tips_page: bool = True, nonce_window_min: int = 5) -> None:
        self.accounts: dict[str, FakeAccount] = {}
        self.homes: list[FakeHome] = []
        self.tips_page = tips_page
        self.nonce_window_min = nonce_window_min
        self.url = ""
        self.rejected: list[str] = []
        self.api_calls: list[tuple[str, str, dict[str, Any]]] = []
        self.sent_codes: list[str] = []
        self.captcha_images = 0
        self.login_posts: list[dict[str, str]] = []
        self._signs: set[str] = set()
        self._captchas: dict[str, str] = {}  # ick -> expected code
        self._contexts: dict[str, _Login] = {}  # 2FA context -> pending login
        self._tickets: dict[str, _Login] = {}  # STS ticket -> login
        self._tokens: dict[str, tuple[int, str]] = {}  # serviceToken -> (user id, ssecurity)
        self._seen_nonces: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ setup

    def add_account(self, username: str, password: str, user_id: int, **kw: Any) -> FakeAccount:
        acc = FakeAccount(username, password, user_id, **kw)
        self.accounts[username] = acc
        return acc

    def add_home(
        self, home_id: int, name: str, owner: int, region: str, devices: list[FakeDevice], **kw: Any
    ) -> FakeHome:
        home = FakeHome(home_id, name, owner, region, devices, **kw)
        self.homes.append(home)
        return home

    def revoke_tokens(self) -> None:
        self._tokens.clear()

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/pass/serviceLogin", self.service_login)
        r.add_post("/pass/serviceLoginAuth2", self.service_login_auth2)
        r.add_get("/pass/getCode", self.get_code)
        r.add_get("/pass/serviceLoginAuth2/end", self.auth2_end)
        r.add_get("/identity/authStart", self.auth_start)
        r.add_get("/identity/list", self.identity_list)
        r.add_post("/identity/auth/{action}", self.identity_action)
        r.add_get("/identity/result/check", self.result_check)
        r.add_get("/sts", self.sts)
        r.add_post("/{region}/app/{path:.*}", self.api)
        return app

    def start(self) -> str:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-xiaomi", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FakeXiaomi:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        return self.url + "/{region}/app"

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _account_json(doc: dict[str, Any], **kw: Any) -> web.Response:
        return web.Response(text=PREFIX + json.dumps(doc), content_type="application/json", **kw)

    @staticmethod
    async def _fields(request: web.Request) -> dict[str, str]:
        """Parameters from the query string and the form body (both styles exist, §3.9)."""
        fields = dict(request.query)
        if request.can_read_body:
            fields.update({k: str(v) for k, v in (await request.post()).items()})
        return fields

    def _reject(self, reason: str, status: int = 400) -> web.Response:
        self.rejected.append(reason)
        return web.Response(status=status, text=reason)

    def _new_login(self, account: FakeAccount) -> _Login:
        return _Login(account, base64.b64encode(secrets.token_bytes(16)).decode())

    def _sts_location(self, login: _Login) -> str:
        ticket = secrets.token_urlsafe(12)
        self._tickets[ticket] = login
        return f"{self.url}/sts?d={ticket}&nonce={secrets.randbelow(10**9)}"

    # ------------------------------------------------------------------ account: password login

    async def service_login(self, request: web.Request) -> web.Response:
        if request.query.get("sid") != "xiaomiio" or not request.cookies.get("deviceId"):
            return self._reject("serviceLogin: sid or deviceId cookie missing")
        sign = base64.b64encode(secrets.token_bytes(20)).decode()
        self._signs.add(sign)
        # what the real server answers when not logged in: code 70016 *and* a _sign
        return self._account_json(
            {
                "code": 70016,
                "_sign": sign,
                "sid": "xiaomiio",
                "qs": "%3Fsid%3Dxiaomiio%26_json%3Dtrue",
                "callback": STS_CALLBACK,
                "location": "",
                "desc": "登录验证失败",
            }
        )

    async def service_login_auth2(self, request: web.Request) -> web.Response:
        f = await self._fields(request)
        self.login_posts.append({k: v for k, v in f.items() if k != "hash"})
        if f.get("_sign") not in self._signs or f.get("sid") != "xiaomiio" or f.get("callback") != STS_CALLBACK:
            return self._reject("serviceLoginAuth2: unknown _sign, wrong sid or callback")
        acc = self.accounts.get(f.get("user", ""))
        if acc is not None and acc.captcha:
            code = f.get("captCode")
            ick = request.cookies.get("ick", "")
            if code is None or self._captchas.get(ick) != code:
                return self._account_json(
                    {
                        "code": 87001,
                        "captchaUrl": f"/pass/getCode?icodeType=login&{secrets.randbelow(10**6) / 10**6}",
                        "desc": "验证码输入错误",
                        "result": "error",
                    }
                )
        if acc is None or f.get("hash") != hashlib.md5(acc.password.encode()).hexdigest().upper():
            return self._account_json(
                {
                    "code": 70016,
                    "desc": "登录验证失败",
                    "description": "登录验证失败",
                    "captchaUrl": None,
                    "_sign": f.get("_sign"),
                    "location": "",
                    "result": "error",
                }
            )
        if acc.locked:
            return self._account_json({"code": 70022, "desc": "account locked", "result": "error"})
        login = self._new_login(acc)
        if acc.two_factor:
            context = secrets.token_urlsafe(16)
            self._contexts[context] = login
            return self._account_json(
                {
                    "code": 0,
                    "securityStatus": 16,
                    "location": "",
                    "notificationUrl": f"{self.url}/identity/authStart?sid=xiaomiio&context={context}&_locale=en_US",
                }
            )
        return self._account_json(
            {
                "code": 0,
                "result": "ok",
                "ssecurity": login.ssecurity,
                "userId": acc.user_id,
                "cUserId": f"c{acc.user_id}",
                "passToken": "pt-" + secrets.token_hex(8),
                "location": self._sts_location(login),
                "nonce": secrets.randbelow(10**9),
            }
        )

    async def get_code(self, request: web.Request) -> web.Response:
        ick = secrets.token_hex(8)
        self._captchas[ick] = self.captcha_code
        self.captcha_images += 1
        resp = web.Response(body=b"\xff\xd8\xff\xe0fake-jpeg " + self.captcha_code.encode(), content_type="image/jpeg")
        resp.set_cookie("ick", ick)
        return resp

    async def sts(self, request: web.Request) -> web.Response:
        login = self._tickets.pop(request.query.get("d", ""), None)
        if login is None:
            return self._reject("sts: unknown or used ticket", 401)
        token = base64.b64encode(secrets.token_bytes(48)).decode()
        self._tokens[token] = (login.account.user_id, login.ssecurity)
        resp = web.Response(text="ok")
        resp.set_cookie("serviceToken", token)
        resp.set_cookie("userId", str(login.account.user_id))
        return resp

    # ------------------------------------------------------------------ account: identity verification

    def _context(self, request: web.Request, fields: dict[str, str] | None = None) -> _Login | None:
        ctx = (fields or {}).get("context") or request.query.get("context", "")
        return self._contexts.get(ctx)

    async def auth_start(self, request: web.Request) -> web.Response:
        if self._context(request) is None:
            return self._reject("authStart: unknown context")
        return web.Response(text="<html>Xiaomi Account - verify your identity</html>", content_type="text/html")

    async def identity_list(self, request: web.Request) -> web.Response:
        login = self._context(request)
        if login is None:
            return self._reject("identity/list: unknown context")
        flag = 8 if login.account.two_factor == "email" else 4
        resp = self._account_json({"code": 0, "flag": flag, "options": [flag]})
        resp.set_cookie("ick", secrets.token_hex(8))
        return resp

    async def identity_action(self, request: web.Request) -> web.Response:
        f = await self._fields(request)
        login = self._context(request, f)
        if login is None:
            return self._reject("identity: unknown context")
        if not f.get("ick") or f.get("ick") != request.cookies.get("ick"):
            return self._reject("identity: ick form field does not match the ick cookie")
        action = request.match_info["action"]
        method = login.account.two_factor
        expected = {"email": ("sendEmailTicket", "verifyEmail", "8"), "phone": ("sendPhoneTicket", "verifyPhone", "4")}
        send, verify, flag = expected[method or "email"]
        if action == send:
            self.sent_codes.append(self.verification_code)
            return self._account_json({"code": 0})
        if action == verify:
            if f.get("_flag") != flag:
                return self._reject("identity: wrong _flag")
            if f.get("ticket") != self.verification_code:
                return self._account_json({"code": 70014, "desc": "验证码错误"})
            login.verified = True
            ctx = f.get("context") or request.query["context"]
            return self._account_json(
                {
                    "code": 0,
                    "location": f"{self.url}/identity/result/check?sid=xiaomiio&context={ctx}&_userIdNeedEncrypt=true",
                }
            )
        return self._reject(f"identity: unexpected action {action}", 404)

    async def result_check(self, request: web.Request) -> web.Response:
        login = self._context(request)
        if login is None or not login.verified:
            return self._reject("result/check: not verified")
        ctx = request.query["context"]
        raise web.HTTPFound(f"/pass/serviceLoginAuth2/end?_groupName=&context={ctx}")

    async def auth2_end(self, request: web.Request) -> web.Response:
        login = self._context(request)
        if login is None or not login.verified:
            return self._reject("serviceLoginAuth2/end: not verified")
        if self.tips_page and not login.tips_shown:
            login.tips_shown = True
            return web.Response(text="<html><title>Xiaomi Account - Tips</title></html>", content_type="text/html")
        del self._contexts[request.query["context"]]
        pragma = {"nonce": secrets.randbelow(10**9), "ssecurity": login.ssecurity, "psecurity": "ps"}
        resp = web.Response(
            status=302, headers={"Location": self._sts_location(login), "extension-pragma": json.dumps(pragma)}
        )
        resp.set_cookie("userId", str(login.account.user_id))
        resp.set_cookie("cUserId", f"c{login.account.user_id}")
        return resp

    # ------------------------------------------------------------------ API (ENCRYPT-RC4)

    def check_encrypted(self, path: str, fields: list[tuple[str, str]], ssecurity: str) -> dict[str, str] | str:
        """The decrypted parameters, or the reason the request is rejected."""
        d = dict(fields)
        for k in ("signature", "_nonce", "ssecurity", "rc4_hash__", "data"):
            if k not in d:
                return f"missing {k}"
        if d["ssecurity"] != ssecurity:
            return "ssecurity does not belong to this serviceToken"
        try:
            nonce = base64.b64decode(d["_nonce"], validate=True)
        except ValueError:
            return "bad nonce"
        if len(nonce) != 12:
            return "bad nonce length"
        minutes = int.from_bytes(nonce[8:], "big")
        if abs(minutes - int(time.time() // 60)) > self.nonce_window_min:
            return "stale nonce"
        if d["_nonce"] in self._seen_nonces:
            return "replayed nonce"
        key_raw = hashlib.sha256(base64.b64decode(ssecurity) + nonce).digest()
        key_b64 = base64.b64encode(key_raw).decode()
        enc = [(k, v) for k, v in fields if k not in ("signature", "_nonce", "ssecurity")]
        expected = _sha1_b64("&".join(["POST", path, *(f"{k}={v}" for k, v in enc), key_b64]))
        if d["signature"] != expected:
            return "invalid signature"
        plain: list[tuple[str, str]] = []
        for k, v in enc:
            try:
                plain.append((k, _arc4_drop1024(key_raw, base64.b64decode(v)).decode()))
            except (ValueError, UnicodeDecodeError):
                return f"{k} does not decrypt"
        p = dict(plain)
        others = [(k, v) for k, v in plain if k != "rc4_hash__"]
        if p["rc4_hash__"] != _sha1_b64("&".join(["POST", path, *(f"{k}={v}" for k, v in others), key_b64])):
            return "rc4_hash__ does not match the decrypted parameters"
        self._seen_nonces.add(d["_nonce"])
        return p

    async def api(self, request: web.Request) -> web.Response:
        region = request.match_info["region"]
        path = "/" + request.match_info["path"]
        if region not in REGIONS:
            return self._reject(f"unknown region {region}", 404)
        if request.headers.get("MIOT-ENCRYPT-ALGORITHM") != "ENCRYPT-RC4":
            return self._reject("missing MIOT-ENCRYPT-ALGORITHM: ENCRYPT-RC4")
        token = request.cookies.get("serviceToken", "")
        if token not in self._tokens or request.cookies.get("yetAnotherServiceToken") != token:
            return self._reject("unknown serviceToken", 401)
        user_id, ssecurity = self._tokens[token]
        if request.cookies.get("userId") != str(user_id):
            return self._reject("userId cookie does not match the serviceToken", 401)
        fields = list(request.query.items())
        if request.can_read_body:
            fields += [(k, str(v)) for k, v in (await request.post()).items()]
        checked = self.check_encrypted(path, fields, ssecurity)
        if isinstance(checked, str):
            return self._reject(checked, 403 if "ssecurity" in checked else 400)
        try:
            data = json.loads(checked["data"])
        except json.JSONDecodeError:
            return self._reject("data is not JSON")
        self.api_calls.append((region, path, data))
        handler = {
            "/v2/homeroom/gethome": self._gethome,
            "/v2/user/get_device_cnt": self._device_cnt,
            "/v2/home/home_device_list": self._home_devices,
            "/v2/device/blt_get_beaconkey": self._beaconkey,
        }.get(path)
        if handler is None:
            return self._reject(f"unknown API {path}", 404)
        envelope = handler(user_id, region, data)
        key_raw = hashlib.sha256(base64.b64decode(ssecurity) + base64.b64decode(dict(fields)["_nonce"])).digest()
        body = base64.b64encode(_arc4_drop1024(key_raw, json.dumps(envelope).encode())).decode()
        return web.Response(text=body)

    def _visible(self, user_id: int, region: str) -> list[FakeHome]:
        return [h for h in self.homes if h.region == region and (h.owner == user_id or user_id in h.shared_with)]

    def _gethome(self, user_id: int, region: str, data: dict[str, Any]) -> dict[str, Any]:
        own = [h for h in self._visible(user_id, region) if h.owner == user_id]
        homelist = [{"id": str(h.id), "name": h.name, "uid": h.owner, "roomlist": []} for h in own]
        return {"code": 0, "message": "ok", "result": {"homelist": homelist, "has_more": False}}

    def _device_cnt(self, user_id: int, region: str, data: dict[str, Any]) -> dict[str, Any]:
        shared = [h for h in self._visible(user_id, region) if h.owner != user_id]
        fam = [{"home_id": h.id, "home_owner": h.owner, "home_name": h.name} for h in shared]
        return {"code": 0, "message": "ok", "result": {"share": {"share_family": fam}, "own": {}}}

    def _home_devices(self, user_id: int, region: str, data: dict[str, Any]) -> dict[str, Any]:
        for h in self._visible(user_id, region):
            if str(h.id) == str(data.get("home_id")) and str(h.owner) == str(data.get("home_owner")):
                info = [
                    {"did": d.did, "name": d.name, "model": d.model, "mac": d.mac, "token": d.token, "localip": ""}
                    for d in h.devices
                ]
                return {"code": 0, "message": "ok", "result": {"device_info": info, "has_more": False}}
        return {"code": -2, "message": "no permission for this home"}

    def _beaconkey(self, user_id: int, region: str, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("pdid") != 1:
            return {"code": -1, "message": "pdid missing"}
        for h in self._visible(user_id, region):
            for d in h.devices:
                if d.did == data.get("did"):
                    return {"code": 0, "message": "ok", "result": {"beaconkey": d.beaconkey or "f" * 32, "pdid": 1}}
        return {"code": -6, "message": "device not found"}

"""An async client for the parts of the Xiaomi cloud that hand out BLE keys (reference keys.md §3).

Login (§3.1, §3.2)::

    GET  {account}/pass/serviceLogin?sid=xiaomiio&_json=true          -> _sign
    POST {account}/pass/serviceLoginAuth2 (hash = MD5(password))     -> ssecurity, userId, location
         | captchaUrl: fetch the image, ask, repeat with captCode
         | notificationUrl: e-mail / SMS verification (identity/*), ending in an extension-pragma header
    GET  location (the STS address the server named)                  -> serviceToken cookie

API (§3.5, §3.6): encrypted, signed POSTs to ``{api}/v2/...`` for homes, shared homes, the device list
of each home and the beacon key of each ``blt.`` device.

Only the account and API base addresses are configured; every other address (captcha image, identity
pages, STS) is taken from the server's answers, as the real app does. Nothing here logs a password,
token, ssecurity or key.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import string
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp

from mitherm.mac import InvalidMac, normalize_mac
from mitherm.paths import config_dir, write_private

from .crypto import CloudProtocolError, decrypt_response, encrypt_params, make_nonce, parse_account_json, password_hash

__all__ = [
    "DEFAULT_ACCOUNT_URL",
    "DEFAULT_API_URL",
    "SERVERS",
    "AccountLocked",
    "ApiError",
    "Captcha",
    "CaptchaRequired",
    "CloudDevice",
    "CloudError",
    "CloudReport",
    "CloudSession",
    "Home",
    "LoginError",
    "NetworkError",
    "NotLoggedIn",
    "SessionExpired",
    "TwoFactorRequired",
    "Verification",
    "WrongCaptcha",
    "WrongCredentials",
    "WrongVerificationCode",
    "XiaomiCloud",
    "api_base",
    "default_session_path",
]

log = logging.getLogger(__name__)

SERVERS = ("cn", "de", "us", "ru", "tw", "sg", "in", "i2")
DEFAULT_ACCOUNT_URL = "https://account.xiaomi.com"
#: ``cn`` has no prefix: https://api.io.mi.com/app (see :func:`api_base`).
DEFAULT_API_URL = "https://{region}.api.io.mi.com/app"
#: What the app sends as ``callback``; the server answers with the STS address to use.
STS_CALLBACK = "https://sts.api.io.mi.com/sts"
SID = "xiaomiio"
#: How long a cached session is trusted before asking for the password again. The server does not say;
#: a token it has revoked earlier shows up as HTTP 401/403 and is handled as SessionExpired.
SESSION_LIFETIME = 7 * 86400
SESSION_FILE = "cloud-session.json"
PLACEHOLDER_KEYS = frozenset({"f" * 32, "0" * 32, "f" * 24, "0" * 24})

# Account error codes (serviceLoginAuth2 / identity). 70016 is the well-documented "login
# verification failed" (wrong user or password); 87001 is a wrong or missing captcha.
CODE_WRONG_CREDENTIALS = 70016
CODE_WRONG_CAPTCHA = 87001
#: Lock codes are not documented publicly; the description is checked for lock words as well.
LOCKED_CODES = frozenset({70022})
_LOCK_WORDS = ("lock", "frozen", "freeze", "锁定", "冻结")
MAX_ATTEMPTS = 3

# identity/list flags -> (what, send-ticket endpoint, verify endpoint)
_VERIFY_METHODS: dict[int, tuple[str, str, str]] = {
    8: ("email", "sendEmailTicket", "verifyEmail"),
    4: ("phone", "sendPhoneTicket", "verifyPhone"),
}


# --------------------------------------------------------------------------------------------- errors


class CloudError(Exception):
    """Anything that stops a cloud operation; the message is meant for the user."""


class NetworkError(CloudError):
    """The server could not be reached (no network, DNS, proxy, TLS, timeout)."""


class LoginError(CloudError):
    """The account server refused the login."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class WrongCredentials(LoginError):
    pass


class AccountLocked(LoginError):
    pass


class CaptchaRequired(LoginError):
    """A captcha is needed but no captcha prompt was given."""

    def __init__(self, url: str) -> None:
        super().__init__(f"Xiaomi asks for a captcha ({url}); run the login interactively")
        self.url = url


class WrongCaptcha(LoginError):
    pass


class TwoFactorRequired(LoginError):
    """Identity verification is needed but no code prompt was given."""

    def __init__(self, url: str) -> None:
        super().__init__("Xiaomi asks for identity verification (a code by e-mail or SMS); run the login interactively")
        self.url = url


class WrongVerificationCode(LoginError):
    pass


class NotLoggedIn(CloudError):
    pass


class SessionExpired(CloudError):
    pass


class ApiError(CloudError):
    def __init__(self, message: str, *, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Captcha:
    """A captcha to show the user: the image address and the image itself."""

    url: str
    image: bytes
    content_type: str | None
    retry: bool  # the previous answer was wrong


@dataclass(frozen=True, slots=True)
class Verification:
    """A code Xiaomi has sent by ``method`` ("email" or "phone")."""

    method: str
    retry: bool


CaptchaPrompt = Callable[[Captcha], "str | Awaitable[str]"]
CodePrompt = Callable[[Verification], "str | Awaitable[str]"]


@dataclass(slots=True)
class CloudSession:
    """What later calls need instead of the password (cached 0600 in ``cloud-session.json``)."""

    user_id: str
    service_token: str
    ssecurity: str
    c_user_id: str | None = None
    username: str | None = None
    region: str | None = None  # the default region chosen at login (None: all)
    account_url: str = DEFAULT_ACCOUNT_URL
    api_url: str = DEFAULT_API_URL
    created: float = field(default_factory=time.time)
    expires: float = 0.0

    def __post_init__(self) -> None:
        if not self.expires:
            self.expires = self.created + SESSION_LIFETIME

    def __repr__(self) -> str:  # never show the secrets
        return f"CloudSession(user_id={self.user_id!r}, region={self.region!r}, expires={self.expires:.0f})"

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> CloudSession:
        try:
            return cls(
                user_id=str(doc["user_id"]),
                service_token=str(doc["service_token"]),
                ssecurity=str(doc["ssecurity"]),
                c_user_id=doc.get("c_user_id"),
                username=doc.get("username"),
                region=doc.get("region"),
                account_url=doc.get("account_url") or DEFAULT_ACCOUNT_URL,
                api_url=doc.get("api_url") or DEFAULT_API_URL,
                created=float(doc.get("created") or time.time()),
                expires=float(doc.get("expires") or 0.0),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise NotLoggedIn(f"the cached cloud session is damaged ({e}); log in again") from None

    def save(self, path: Path | None = None) -> Path:
        path = path or default_session_path()
        write_private(path, (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> CloudSession | None:
        """The cached session, or None if there is none. Expired sessions are returned too."""
        path = path or default_session_path()
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise NotLoggedIn(f"cannot read the cloud session {path} ({e}); log in again") from None
        if not isinstance(doc, dict):
            raise NotLoggedIn(f"the cloud session {path} is damaged; log in again")
        return cls.from_json(doc)


def default_session_path() -> Path:
    return config_dir() / SESSION_FILE


@dataclass(frozen=True, slots=True)
class Home:
    id: str
    name: str | None
    owner: str
    shared: bool


@dataclass(slots=True)
class CloudDevice:
    """One BLE device of the account. ``bindkey`` is None when the cloud has no key for it."""

    region: str
    home_id: str
    home_name: str | None
    shared: bool
    did: str
    mac: str | None
    model: str | None
    name: str | None
    token: str | None
    bindkey: str | None
    key_status: str  # "ok", "no_key_stored", "error"
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class CloudReport:
    devices: list[CloudDevice] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    homes: list[tuple[str, Home]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def api_base(template: str, region: str) -> str:
    """The API base for ``region``: ``{region}.`` is dropped for ``cn`` (https://api.io.mi.com/app)."""
    if region not in SERVERS:
        raise CloudError(f"unknown region {region!r}: use one of {', '.join(SERVERS)}")
    if region == "cn":
        template = template.replace("{region}.", "")
    return template.replace("{region}", region).rstrip("/")


def _random_letters(alphabet: str, n: int) -> str:
    return "".join(random.choice(alphabet) for _ in range(n))


def _user_agent() -> str:
    # the recent Mi Home form (keys.md §3.1): 18 lower-case letters, 13 of A-E
    device = f"{_random_letters(string.ascii_lowercase, 18)}-{_random_letters('ABCDE', 13)}"
    return f"{device} APP/com.xiaomi.mihome APPV/10.5.201"


async def _answer(prompt: Callable[[Any], Any], arg: Any) -> str:
    value = prompt(arg)
    if inspect.isawaitable(value):
        value = await value
    return str(value).strip()


def _is_redirect(status: int) -> bool:
    return status in (301, 302, 303, 307, 308)


# --------------------------------------------------------------------------------------------- client


@dataclass(slots=True)
class _Response:
    status: int
    headers: Any
    cookies: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class XiaomiCloud:
    """Log in to the Xiaomi cloud and list BLE devices with their keys.

    Use as an async context manager (it owns an aiohttp session unless one is passed). ``session``
    holds the login state after :meth:`login`, or pass a cached :class:`CloudSession`."""

    def __init__(
        self,
        *,
        account_url: str = DEFAULT_ACCOUNT_URL,
        api_url: str = DEFAULT_API_URL,
        session: CloudSession | None = None,
        http: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.account_url = account_url.rstrip("/")
        self.api_url = api_url
        self.session = session
        self._http = http
        self._owns_http = http is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._agent = _user_agent()
        self._device_id = _random_letters(string.ascii_lowercase, 6)

    async def __aenter__(self) -> XiaomiCloud:
        if self._http is None:
            # unsafe=True: keep cookies for IP-address hosts too (proxies, local test servers);
            # trust_env: honour HTTP(S)_PROXY like other command-line tools
            self._http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), trust_env=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None and self._owns_http:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ HTTP

    def _abs(self, url: str) -> str:
        """Server-given addresses may be relative to the account server."""
        return urljoin(self.account_url + "/", url)

    async def _request(self, method: str, url: str, **kw: Any) -> _Response:
        if self._http is None:
            await self.__aenter__()
        assert self._http is not None
        headers = {"User-Agent": self._agent, **kw.pop("headers", {})}
        host = urlsplit(url).netloc or url
        try:
            async with self._http.request(method, url, headers=headers, timeout=self._timeout, **kw) as resp:
                body = await resp.read()
                cookies = {k: m.value for k, m in resp.cookies.items()}
                return _Response(resp.status, resp.headers, cookies, body)
        except TimeoutError:
            raise NetworkError(f"no answer from {host} within {self._timeout.total:.0f} s") from None
        except aiohttp.ClientConnectorError as e:
            raise NetworkError(
                f"cannot reach {host}: {e.os_error.strerror or e.os_error} (check the network, DNS or proxy)"
            ) from None
        except aiohttp.ClientError as e:
            # not str(e): it can carry the request URL, whose query holds the signed parameters
            raise NetworkError(f"connection to {host} failed ({type(e).__name__})") from None

    def _jar_cookie(self, name: str) -> str | None:
        if self._http is None:
            return None
        for morsel in self._http.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None

    def _account_cookies(self, **extra: str) -> dict[str, str]:
        return {"sdkVersion": "accountsdk-18.8.15", "deviceId": self._device_id, **extra}

    async def _account_json(self, method: str, url: str, **kw: Any) -> tuple[dict[str, Any], _Response]:
        resp = await self._request(method, url, **kw)
        if resp.status >= 500:
            raise LoginError(f"the account server failed (HTTP {resp.status}); try again later")
        if resp.status == 403:
            raise LoginError("the account server refused the request (HTTP 403): too many attempts? wait and retry")
        try:
            return parse_account_json(resp.text), resp
        except CloudProtocolError as e:
            raise LoginError(f"{e} (HTTP {resp.status} from {urlsplit(url).path})") from None

    # ------------------------------------------------------------------ login

    async def login(
        self,
        username: str,
        password: str,
        *,
        captcha: CaptchaPrompt | None = None,
        verification: CodePrompt | None = None,
        region: str | None = None,
    ) -> CloudSession:
        """Password login. ``captcha`` and ``verification`` are asked when Xiaomi wants them; without
        them CaptchaRequired / TwoFactorRequired are raised."""
        step1, _ = await self._account_json(
            "GET",
            f"{self.account_url}/pass/serviceLogin",
            params={"sid": SID, "_json": "true"},
            cookies=self._account_cookies(userId=username),
        )
        if step1.get("ssecurity") and step1.get("location"):
            auth = step1  # a still-valid login cookie: no password needed
        else:
            sign = step1.get("_sign")
            if not sign:
                raise LoginError(_describe_failure(step1, "the account server gave no login signature (_sign)"))
            auth = await self._login_auth2(username, password, str(sign), captcha)

        user_id = str(auth.get("userId") or "")
        c_user_id = auth.get("cUserId")
        if auth.get("notificationUrl") and not auth.get("ssecurity"):
            if verification is None:
                raise TwoFactorRequired(self._abs(str(auth["notificationUrl"])))
            ssecurity, location, ids = await self._identity_flow(str(auth["notificationUrl"]), verification)
            user_id = ids.get("userId") or user_id
            c_user_id = ids.get("cUserId") or c_user_id
        else:
            ssecurity = str(auth.get("ssecurity") or "")
            location = str(auth.get("location") or "")
        if not ssecurity or not location:
            raise LoginError(_describe_failure(auth, "the login answer has no ssecurity / location"))

        service_token, ids = await self._fetch_service_token(location)
        user_id = ids.get("userId") or user_id
        c_user_id = ids.get("cUserId") or c_user_id
        if not user_id:
            raise LoginError("the login succeeded but no user id was returned")
        self.session = CloudSession(
            user_id=user_id,
            service_token=service_token,
            ssecurity=ssecurity,
            c_user_id=str(c_user_id) if c_user_id else None,
            username=username,
            region=region,
            account_url=self.account_url,
            api_url=self.api_url,
        )
        log.info("logged in to the Xiaomi cloud as user %s", user_id)
        return self.session

    async def _login_auth2(
        self, username: str, password: str, sign: str, captcha: CaptchaPrompt | None
    ) -> dict[str, Any]:
        fields = {
            "sid": SID,
            "hash": password_hash(password),
            "callback": STS_CALLBACK,
            "qs": "%3Fsid%3Dxiaomiio%26_json%3Dtrue",
            "user": username,
            "_sign": sign,
            "_json": "true",
        }
        cap_code: str | None = None
        captcha_url: str | None = None
        wrong = 0
        while True:
            params = dict(fields)
            if cap_code is not None:
                params["captCode"] = cap_code
            doc, _ = await self._account_json(
                "POST", f"{self.account_url}/pass/serviceLoginAuth2", params=params, cookies=self._account_cookies()
            )
            if len(str(doc.get("ssecurity") or "")) > 4 or doc.get("notificationUrl"):
                return doc
            code = doc.get("code")
            if doc.get("captchaUrl") or code == CODE_WRONG_CAPTCHA:
                if cap_code is not None:
                    wrong += 1
                    if wrong >= MAX_ATTEMPTS:
                        raise WrongCaptcha(f"the captcha was wrong {wrong} times; try again later", code)
                if doc.get("captchaUrl"):
                    captcha_url = self._abs(str(doc["captchaUrl"]))
                if not captcha_url:
                    raise LoginError(_describe_failure(doc, "the captcha answer has no captcha address"), code)
                if captcha is None:
                    raise CaptchaRequired(captcha_url)
                image = await self._request("GET", captcha_url, cookies=self._account_cookies())
                if image.status != 200:
                    raise LoginError(f"cannot load the captcha image (HTTP {image.status})")
                cap_code = await _answer(
                    captcha, Captcha(captcha_url, image.body, image.headers.get("Content-Type"), retry=wrong > 0)
                )
                continue
            raise _login_failure(doc)

    async def _identity_flow(self, notification_url: str, verification: CodePrompt) -> tuple[str, str, dict[str, str]]:
        """E-mail / SMS verification after notificationUrl (§3.2). Returns ssecurity, STS address, ids."""
        start = self._abs(notification_url)
        context = (parse_qs(urlsplit(start).query).get("context") or [""])[0]
        if not context:
            raise LoginError("the verification address has no context parameter; log in on account.xiaomi.com once")
        await self._request("GET", start, cookies=self._account_cookies())
        common = {"sid": SID, "context": context, "_locale": "en_US"}
        listing, _ = await self._account_json(
            "GET", f"{self.account_url}/identity/list", params=common, cookies=self._account_cookies()
        )
        offered = [int(f) for f in listing.get("options") or [listing.get("flag") or 8] if str(f).isdigit()]
        flag = next((f for f in (8, 4) if f in offered), None)
        if flag is None:
            raise LoginError(
                "Xiaomi offers no e-mail or SMS verification for this account; log in once on "
                "https://account.xiaomi.com in a browser and try again"
            )
        method, send_ep, verify_ep = _VERIFY_METHODS[flag]
        ick = self._jar_cookie("ick") or ""
        sent, _ = await self._account_json(
            "POST",
            f"{self.account_url}/identity/auth/{send_ep}",
            params={"_dc": str(int(time.time() * 1000)), "mask": "0", **common},
            data={"retry": "0", "icode": "", "_json": "true", "ick": ick},
            cookies=self._account_cookies(),
        )
        if sent.get("code") not in (0, None):
            raise LoginError(
                _describe_failure(sent, f"Xiaomi did not send the verification {method}"), sent.get("code")
            )

        location = ""
        for attempt in range(MAX_ATTEMPTS):
            code = await _answer(verification, Verification(method, retry=attempt > 0))
            doc, resp = await self._account_json(
                "POST",
                f"{self.account_url}/identity/auth/{verify_ep}",
                params={"_flag": str(flag), "_json": "true", "mask": "0", **common},
                data={"_flag": str(flag), "ticket": code, "trust": "false", "_json": "true", "ick": ick},
                cookies=self._account_cookies(),
                allow_redirects=False,
            )
            if doc.get("code") in (0, None):
                location = str(doc.get("location") or resp.headers.get("Location") or "")
                break
        else:
            raise WrongVerificationCode(f"the verification code was wrong {MAX_ATTEMPTS} times; log in again later")
        if not location:
            location = f"{self.account_url}/identity/result/check?sid={SID}&context={context}&_locale=en_US"

        # result/check -> serviceLoginAuth2/end (extension-pragma: ssecurity) -> STS
        ids: dict[str, str] = {}
        url = self._abs(location)
        for _ in range(8):
            resp = await self._request("GET", url, cookies=self._account_cookies(), allow_redirects=False)
            ids.update({k: v for k, v in resp.cookies.items() if k in ("userId", "cUserId")})
            pragma = resp.headers.get("extension-pragma")
            target = resp.headers.get("Location")
            if pragma:
                try:
                    ssecurity = str(json.loads(pragma).get("ssecurity") or "")
                except (json.JSONDecodeError, AttributeError):
                    ssecurity = ""
                if ssecurity and target:
                    return ssecurity, self._abs(target), ids
            if _is_redirect(resp.status) and target:
                url = self._abs(target)
            elif resp.status != 200:  # 200 without a header is the "Tips" page: ask again
                break
        raise LoginError("the verification succeeded but Xiaomi returned no session keys; try the login again")

    async def _fetch_service_token(self, location: str) -> tuple[str, dict[str, str]]:
        url = self._abs(location)
        ids: dict[str, str] = {}
        for _ in range(4):
            resp = await self._request("GET", url, allow_redirects=False)
            ids.update({k: v for k, v in resp.cookies.items() if k in ("userId", "cUserId")})
            token = resp.cookies.get("serviceToken")
            if token:
                return token, ids
            target = resp.headers.get("Location")
            if not (_is_redirect(resp.status) and target):
                break
            url = self._abs(target)
        raise LoginError(f"the STS server gave no serviceToken (HTTP {resp.status}); try the login again")

    # ------------------------------------------------------------------ API

    def region_url(self, region: str) -> str:
        return api_base(self.api_url, region)

    async def call(self, region: str, path: str, data: dict[str, Any]) -> Any:
        """One encrypted API call; returns ``result`` of the answer."""
        s = self.session
        if s is None:
            raise NotLoggedIn("not logged in to the Xiaomi cloud")
        nonce = make_nonce()
        fields = encrypt_params(path, {"data": json.dumps(data, separators=(",", ":"))}, s.ssecurity, nonce=nonce)
        headers = {
            "Accept-Encoding": "identity",
            "Content-Type": "application/x-www-form-urlencoded",
            "x-xiaomi-protocal-flag-cli": "PROTOCAL-HTTP2",
            "MIOT-ENCRYPT-ALGORITHM": "ENCRYPT-RC4",
        }
        cookies = {
            "userId": s.user_id,
            "serviceToken": s.service_token,
            "yetAnotherServiceToken": s.service_token,
            "locale": "en_GB",
            "timezone": "GMT+02:00",
            "is_daylight": "1",
            "dst_offset": "3600000",
            "channel": "MI_APP_STORE",
        }
        resp = await self._request(
            "POST", self.region_url(region) + path, params=fields, headers=headers, cookies=cookies
        )
        if resp.status in (401, 403):
            raise SessionExpired("the Xiaomi cloud session has expired or was revoked; log in again")
        if resp.status != 200:
            raise ApiError(f"{path} on region {region}: HTTP {resp.status}", status=resp.status)
        try:
            doc = decrypt_response(s.ssecurity, nonce, resp.body)
        except CloudProtocolError as e:
            raise ApiError(f"{path} on region {region}: {e}") from None
        code = doc.get("code")
        if code != 0:
            raise ApiError(
                f"{path} on region {region}: code {code}: {doc.get('message') or ''}".rstrip(": "), code=code
            )
        return doc.get("result")

    async def homes(self, region: str) -> list[Home]:
        """Own homes (gethome) and homes shared with this account (get_device_cnt)."""
        assert self.session is not None
        result = await self.call(
            region,
            "/v2/homeroom/gethome",
            {"fg": True, "fetch_share": True, "fetch_share_dev": True, "limit": 300, "app_ver": 7},
        )
        homes: dict[str, Home] = {}
        for h in (result or {}).get("homelist") or []:
            hid = str(h.get("id"))
            homes[hid] = Home(hid, h.get("name"), str(h.get("uid") or self.session.user_id), shared=False)
        counts = await self.call(region, "/v2/user/get_device_cnt", {"fetch_own": True, "fetch_share": True})
        for h in ((counts or {}).get("share") or {}).get("share_family") or []:
            hid = str(h.get("home_id"))
            if hid not in homes:
                homes[hid] = Home(hid, h.get("home_name"), str(h.get("home_owner")), shared=True)
        return list(homes.values())

    async def home_devices(self, region: str, home: Home) -> list[dict[str, Any]]:
        result = await self.call(
            region,
            "/v2/home/home_device_list",
            {
                "home_owner": _num(home.owner),
                "home_id": _num(home.id),
                "limit": 200,
                "get_split_device": True,
                "support_smart_home": True,
            },
        )
        return list((result or {}).get("device_info") or [])

    async def beaconkey(self, region: str, did: str) -> str | None:
        """The device's beacon key (bindkey) in lower-case hex, or None when the cloud stores none."""
        result = await self.call(region, "/v2/device/blt_get_beaconkey", {"did": did, "pdid": 1})
        key = str((result or {}).get("beaconkey") or "").strip().lower()
        if not key or key in PLACEHOLDER_KEYS or set(key) <= {"f"} or key.endswith("ffffffff"):
            return None
        return key

    async def ble_devices(self, regions: Iterable[str], *, mac: str | None = None) -> CloudReport:
        """Every BLE (``blt.``) device in own and shared homes of ``regions``, with its key."""
        want = normalize_mac(mac) if mac else None
        report = CloudReport()
        seen: set[str] = set()
        unreachable: list[NetworkError] = []
        regions = list(regions)
        for region in regions:
            report.regions.append(region)
            try:
                homes = await self.homes(region)
            except ApiError as e:
                report.warnings.append(f"region {region}: {e}")
                continue
            except NetworkError as e:  # one unreachable regional server must not hide the others
                unreachable.append(e)
                report.warnings.append(f"region {region}: {e}")
                continue
            for home in homes:
                report.homes.append((region, home))
                try:
                    devices = await self.home_devices(region, home)
                except ApiError as e:
                    report.warnings.append(f"home {home.id} ({region}): {e}")
                    continue
                for d in devices:
                    did = str(d.get("did") or "")
                    if not did.startswith("blt.") or did in seen:
                        continue
                    try:
                        dev_mac = normalize_mac(str(d.get("mac"))) if d.get("mac") else None
                    except InvalidMac:
                        dev_mac = None
                    if want and dev_mac != want:
                        continue
                    seen.add(did)
                    dev = CloudDevice(
                        region=region,
                        home_id=home.id,
                        home_name=home.name,
                        shared=home.shared,
                        did=did,
                        mac=dev_mac,
                        model=d.get("model"),
                        name=d.get("name"),
                        token=d.get("token") or None,
                        bindkey=None,
                        key_status="no_key_stored",
                    )
                    try:
                        dev.bindkey = await self.beaconkey(region, did)
                    except ApiError as e:
                        dev.key_status, dev.note = "error", str(e)
                    else:
                        if dev.bindkey:
                            dev.key_status = "ok"
                        else:
                            dev.note = "no key stored in the cloud: re-add the device in Mi Home"
                    report.devices.append(dev)
        if unreachable and len(unreachable) == len(regions):
            raise unreachable[0]
        return report


def _num(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _describe_failure(doc: dict[str, Any], what: str) -> str:
    code = doc.get("code")
    desc = doc.get("description") or doc.get("desc")
    return f"{what} (code {code}{': ' + str(desc) if desc else ''})" if code is not None else what


def _login_failure(doc: dict[str, Any]) -> LoginError:
    code = doc.get("code")
    desc = str(doc.get("description") or doc.get("desc") or "")
    if code in LOCKED_CODES or any(w in desc.lower() for w in _LOCK_WORDS):
        return AccountLocked(
            "the Xiaomi account is locked (too many attempts or a security hold): unlock it on "
            f"https://account.xiaomi.com in a browser, then try again (code {code})",
            code,
        )
    if code == CODE_WRONG_CREDENTIALS:
        return WrongCredentials(
            "wrong username or password (Xiaomi code 70016). Use the Mi Home / Xiaomi Home account "
            "(e-mail, phone with country code, or the numeric account ID), not a Roborock account",
            code,
        )
    return LoginError(_describe_failure(doc, "the Xiaomi account server refused the login"), code)

"""The dashboard's HTTP API (aiohttp test client): JSON endpoints, SSE, CSRF, masked keys, auth off loopback.

The gateway is fed by the simulator's demo house (non-realtime, a few simulated hours in well under a second);
the keystore holds the demo keys, so Garage has a wrong key and Attic none."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from mitherm.captures import parse_ad_structures
from mitherm.gateway import Gateway
from mitherm.history import History
from mitherm.keystore import Keystore
from mitherm.model import Advertisement
from mitherm.service import HistorySink, RunConfig, Service
from mitherm.sim.house import House, builtin_house
from mitherm.sim.runner import Simulator
from mitherm.web.app import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    WEB_KEY,
    WebSink,
    create_app,
    is_loopback,
    parse_bind,
    runner_url,
    serve,
)

UNNAMED = ("Balcony", "Freezer")  # plain devices left unknown: listed as nearby
NO_KEY = ("Attic",)  # an encrypted device without a key: nearby, key missing


def sim_adverts(house: House, seconds: float, start: float, sim: Simulator | None = None) -> list[Advertisement]:
    """The house's adverts over ``seconds`` simulated seconds, stamped from ``start`` (Unix time)."""
    sim = sim or Simulator(house, time_factor=1.0)
    out = []
    for t, dev, ad in sim.events(sim.now + seconds):
        sd, md, name = parse_ad_structures(ad)
        out.append(
            Advertisement(
                mac=dev.address,
                time=start + t,
                service_data=sd,
                manufacturer_data=md,
                name=name,
                rssi=-61,
                source="sim",
            )
        )
    return out


def write_keystore(house: House, path: Path) -> dict[str, str]:
    keys = house.demo_keys()
    ks = Keystore(path)
    for d in house.devices:
        if d.address in keys and d.label not in NO_KEY:
            ks.add(d.address, keys[d.address], name=d.label)
    ks.save()
    return keys


def plain_names(house: House) -> dict[str, str]:
    keys = house.keys()
    return {d.address: d.label for d in house.devices if d.address not in keys and d.label not in UNNAMED}


def by_label(house: House, label: str) -> str:
    return house.device(label).address


@functools.cache
def _demo_adverts() -> tuple[Advertisement, ...]:
    """Four simulated hours of the demo house from t=0 (made once: the simulator is deterministic)."""
    return tuple(sim_adverts(builtin_house("demo", min_interval=300.0), 4 * 3600, 0.0))


class Fed:
    """A Service whose parts are built by hand and fed from the simulator (no sources, no radio)."""

    def __init__(self, tmp: Path) -> None:
        self.house = builtin_house("demo", min_interval=300.0)  # an advert per device every 5 simulated minutes
        self.demo_keys = write_keystore(self.house, tmp / "keys.json")
        self.cfg = RunConfig(
            sources=["sim:demo"],
            db=str(tmp / "history.sqlite3"),
            keys=str(tmp / "keys.json"),
            web=True,
            web_bind="127.0.0.1:0",
            names=plain_names(self.house),
        )
        svc = self.service = Service(self.cfg)
        svc.keystore = Keystore(self.cfg.keys)
        svc.history = History(self.cfg.db)
        names = dict(self.cfg.names)
        for e in svc.keystore.entries():
            if e.name:
                names.setdefault(e.mac, e.name)
        gw = svc.gateway = Gateway(svc.keystore.keys(), names=names)
        gw.sinks.append(HistorySink(svc.history))
        self.start = time.time() - 4 * 3600
        self.fed_until = 0.0
        self.feed(3 * 3600)

    def feed(self, seconds: float) -> None:
        """The next ``seconds`` simulated seconds of adverts (at most 4 hours in all)."""
        lo, hi = self.fed_until, self.fed_until + seconds
        self.fed_until = hi
        self.service.gateway.handle_many(
            dataclasses.replace(a, time=a.time + self.start) for a in _demo_adverts() if lo <= a.time < hi
        )

    def mac(self, label: str) -> str:
        return by_label(self.house, label)


@pytest.fixture
def fed(tmp_path: Path) -> Any:
    f = Fed(tmp_path)
    yield f
    f.service.history.close()


@pytest.fixture
async def client(fed: Fed) -> Any:
    app = create_app(fed.service)
    async with TestClient(TestServer(app)) as c:
        yield c


async def csrf(client: TestClient) -> dict[str, str]:
    r = await client.get("/api/session")
    assert r.status == 200
    body = await r.json()
    assert client.session.cookie_jar.filter_cookies(client.make_url("/")).get(CSRF_COOKIE) is not None
    return {CSRF_HEADER: body["csrf"]}


def no_full_keys(text: str, fed: Fed) -> None:
    for key in {*fed.house.keys().values(), *fed.demo_keys.values()}:
        assert key not in text.lower()


# --- JSON endpoints --------------------------------------------------------------------------------------


async def test_devices_lists_known_and_nearby_with_masked_keys(client: TestClient, fed: Fed) -> None:
    r = await client.get("/api/devices")
    assert r.status == 200
    text = await r.text()
    no_full_keys(text, fed)
    data = json.loads(text)
    devices = {d["mac"]: d for d in data["devices"]}
    assert data["clock"] > 0
    assert len(devices) == len(fed.house.devices)
    living = devices[fed.mac("Living room")]
    assert living["known"] and living["name"] == "Living room"
    assert living["key_status"] == "verified"
    key = fed.house.keys()[fed.mac("Living room")]
    assert living["key"] == f"{key[:4]}…{key[-4:]}"
    assert isinstance(living["values"]["temperature_c"], float)
    assert living["firmware"] == {
        "kind": "stock",
        "label": "Stock firmware (MiBeacon v5), encrypted",
        "encrypted": True,
    }
    assert living["receiver"] == "sim" and living["rssi"] == -61
    garage = devices[fed.mac("Garage")]
    assert garage["key_status"] == "key_failed" and garage["key_verdict"] == "wrong_key"
    kitchen = devices[fed.mac("Kitchen")]
    assert kitchen["key_status"] == "not_needed" and kitchen["key"] is None
    nearby = {d["mac"] for d in data["devices"] if not d["known"]}
    assert nearby == {fed.mac(label) for label in (*UNNAMED, *NO_KEY)}
    assert devices[fed.mac("Attic")]["key_status"] == "missing"


async def test_device_detail_has_the_doctors_verdict(client: TestClient, fed: Fed) -> None:
    r = await client.get(f"/api/devices/{fed.mac('Garage')}")
    text = await r.text()
    no_full_keys(text, fed)
    d = json.loads(text)["device"]
    assert d["diagnosis"]["verdict"] == "wrong_key"
    assert "integrity check" in d["diagnosis"]["advice"]
    assert d["catalogue"]["model"] == "LYWSD03MMC"
    r = await client.get(f"/api/devices/{fed.mac('Living room').lower().replace(':', '-')}")
    d = (await r.json())["device"]
    assert d["diagnosis"] is None and {"temperature_c", "humidity_pct", "battery_pct"} <= set(d["quantities"])
    assert (await client.get("/api/devices/not-a-mac")).status == 400
    assert (await client.get("/api/devices/11:22:33:44:55:66")).status == 404


async def test_history_day_is_raw_and_week_is_hourly(client: TestClient, fed: Fed) -> None:
    mac = fed.mac("Bathroom")
    r = await client.get(f"/api/devices/{mac}/history?range=day")
    day = await r.json()
    assert day["kind"] == "raw" and day["range"] == "day"
    assert len(day["t"]) > 30
    temps = day["series"]["temperature_c"]["value"]
    assert len(temps) == len(day["t"]) and sum(v is not None for v in temps) > 30
    assert day["t"] == sorted(day["t"]) and day["since"] <= day["t"][0] <= day["t"][-1] <= day["until"]
    r = await client.get(f"/api/devices/{mac}/history?range=week")
    week = await r.json()
    assert week["kind"] == "hourly" and 3 <= len(week["t"]) <= 5
    s = week["series"]["humidity_pct"]
    assert all(lo <= m <= hi for lo, m, hi in zip(s["min"], s["value"], s["max"], strict=True))
    assert (await client.get(f"/api/devices/{mac}/history?range=decade")).status == 400


async def test_csv_download(client: TestClient, fed: Fed) -> None:
    mac = fed.mac("Kitchen")
    r = await client.get(f"/api/devices/{mac}/history.csv?range=day")
    assert r.status == 200 and r.content_type == "text/csv"
    assert "attachment" in r.headers["Content-Disposition"]
    lines = (await r.text()).strip().splitlines()
    assert lines[0].startswith("time,unix_time,") and "temperature_c" in lines[0]
    assert len(lines) > 10
    r = await client.get(f"/api/devices/{mac}/history.csv?range=month")
    lines = (await r.text()).strip().splitlines()
    assert "temperature_c_mean" in lines[0] and len(lines) >= 4


async def test_pages_and_static_files(client: TestClient, fed: Fed) -> None:
    for path in ("/", "/add", "/login", f"/device/{fed.mac('Kitchen')}"):
        r = await client.get(path)
        assert r.status == 200, path
        assert "text/html" in r.headers["Content-Type"]
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Frame-Options"] == "DENY"
    r = await client.get("/static/uPlot.iife.min.js")
    assert r.status == 200 and len(await r.read()) > 20_000
    assert "MIT License" in await (await client.get("/static/uPlot.LICENSE")).text()
    assert (await client.get("/favicon.ico")).status == 200


# --- changes and CSRF ----------------------------------------------------------------------------------


async def test_changes_need_the_csrf_token(client: TestClient, fed: Fed) -> None:
    url = f"/api/devices/{fed.mac('Kitchen')}/name"
    r = await client.post(url, json={"name": "Pantry"})
    assert r.status == 403 and "CSRF" in (await r.json())["error"]
    await csrf(client)
    r = await client.post(url, json={"name": "Pantry"}, headers={CSRF_HEADER: "0" * 64})
    assert r.status == 403
    for method, path in (("DELETE", f"/api/devices/{fed.mac('Kitchen')}"), ("POST", "/api/doctor")):
        r = await client.request(method, path, json={})
        assert r.status == 403, path
    headers = await csrf(client)
    r = await client.post(url, json={"name": "Pantry"}, headers={**headers, "Origin": "http://evil.example"})
    assert r.status == 403 and "cross-origin" in (await r.json())["error"]
    assert fed.service.gateway.devices[fed.mac("Kitchen")].name == "Kitchen"
    r = await client.post(url, json={"name": "Pantry"}, headers={**headers, "Origin": str(client.make_url(""))})
    assert r.status == 200


async def test_rename_makes_a_nearby_device_known_and_persists(client: TestClient, fed: Fed) -> None:
    headers = await csrf(client)
    mac = fed.mac("Balcony")
    r = await client.post(f"/api/devices/{mac}/name", json={"name": "  Balcony  "}, headers=headers)
    assert r.status == 200 and (await r.json())["name"] == "Balcony"
    d = {x["mac"]: x for x in (await (await client.get("/api/devices")).json())["devices"]}[mac]
    assert d["known"] and d["name"] == "Balcony"
    assert fed.service.history.device(mac).name == "Balcony"
    assert fed.service.history.get_state("web.names")[mac] == "Balcony"
    assert fed.cfg.names[mac] == "Balcony"  # survives a keystore reload (Service passes cfg.names)
    # a keystore device: the keystore entry is renamed too
    living = fed.mac("Living room")
    await client.post(f"/api/devices/{living}/name", json={"name": "Lounge"}, headers=headers)
    assert Keystore(fed.cfg.keys).get(living).name == "Lounge"


async def test_wrong_key_is_judged_and_not_saved_right_key_verifies(client: TestClient, fed: Fed) -> None:
    headers = await csrf(client)
    mac = fed.mac("Garage")
    wrong = fed.demo_keys[mac]
    right = fed.house.keys()[mac]
    other = fed.house.keys()[fed.mac("Bedroom")]
    r = await client.post(f"/api/devices/{mac}/key", json={"key": other}, headers=headers)
    body = await r.json()
    assert body["saved"] is False and body["diagnosis"]["verdict"] == "key_of_other_device"
    assert body["diagnosis"]["other_device"] == fed.mac("Bedroom")
    r = await client.post(f"/api/devices/{mac}/key", json={"key": "0" * 31}, headers=headers)
    assert (await r.json())["diagnosis"]["verdict"] == "invalid_key"
    assert Keystore(fed.cfg.keys).get(mac).bindkey == wrong
    r = await client.post(f"/api/devices/{mac}/key", json={"key": right.upper(), "source": "cloud"}, headers=headers)
    text = await r.text()
    no_full_keys(text, fed)
    body = json.loads(text)
    assert body["saved"] is True and body["diagnosis"]["verdict"] == "ok"
    assert body["device"]["key_status"] == "verified" and body["device"]["key"] == f"{right[:4]}…{right[-4:]}"
    entry = Keystore(fed.cfg.keys).get(mac)
    assert entry.bindkey == right and entry.source == "cloud" and entry.name == "Garage"
    assert fed.service.gateway.devices[mac].key_status == "verified"
    # force saves a key the doctor rejects
    r = await client.post(f"/api/devices/{mac}/key", json={"key": wrong, "force": True}, headers=headers)
    body = await r.json()
    assert body["saved"] is True and body["diagnosis"]["verdict"] == "wrong_key"
    assert body["device"]["key_status"] == "key_failed"
    r = await client.post(f"/api/devices/{mac}/key", json={"key": right, "source": "bogus"}, headers=headers)
    assert r.status == 400


async def test_add_a_missing_key_and_a_not_yet_seen_device(client: TestClient, fed: Fed) -> None:
    headers = await csrf(client)
    attic = fed.mac("Attic")
    key = fed.house.keys()[attic]
    r = await client.post("/api/doctor", json={"mac": attic, "key": key}, headers=headers)
    assert (await r.json())["diagnosis"]["verdict"] == "ok"
    assert attic not in Keystore(fed.cfg.keys)  # the doctor endpoint saves nothing
    r = await client.post(f"/api/devices/{attic}/key", json={"key": key, "source": "pvvx"}, headers=headers)
    assert (await r.json())["saved"] is True
    assert fed.service.gateway.devices[attic].key_status == "verified"
    assert fed.service.gateway.devices[attic].known
    # a device never heard: undecided, saved, listed as a known offline device
    ghost = "A4:C1:38:99:99:99"
    r = await client.post(f"/api/devices/{ghost}/key", json={"key": "ab" * 16}, headers=headers)
    body = await r.json()
    assert body["saved"] is True and body["diagnosis"]["verdict"] == "device_not_seen"
    devices = {d["mac"]: d for d in (await (await client.get("/api/devices")).json())["devices"]}
    assert devices[ghost]["known"] and devices[ghost]["online"] is False and devices[ghost]["key"] == "abab…abab"
    # plain device: not_encrypted, not saved
    r = await client.post("/api/doctor", json={"mac": fed.mac("Kitchen"), "key": key}, headers=headers)
    assert (await r.json())["diagnosis"]["verdict"] == "not_encrypted"
    r = await client.post("/api/doctor", json={"mac": "nope", "key": key}, headers=headers)
    assert r.status == 400


async def test_remove_key_and_delete_device(client: TestClient, fed: Fed) -> None:
    headers = await csrf(client)
    mac = fed.mac("Hallway")
    r = await client.delete(f"/api/devices/{mac}/key", headers=headers)
    assert r.status == 200
    assert mac not in Keystore(fed.cfg.keys)
    st = fed.service.gateway.devices[mac]
    assert st.name == "Hallway" and st.known  # the name is kept
    assert (await client.delete(f"/api/devices/{mac}/key", headers=headers)).status == 404
    kitchen = fed.mac("Kitchen")
    assert fed.service.history.readings(kitchen)
    r = await client.delete(f"/api/devices/{kitchen}", headers=headers)
    assert r.status == 200
    assert kitchen not in fed.service.gateway.devices
    assert fed.service.history.readings(kitchen) == [] and fed.service.history.device(kitchen) is None
    macs = {d["mac"] for d in (await (await client.get("/api/devices")).json())["devices"]}
    assert kitchen not in macs
    fed.feed(1200)  # it still sends: back, as an unknown device
    d = {x["mac"]: x for x in (await (await client.get("/api/devices")).json())["devices"]}[kitchen]
    assert d["known"] is False


# --- live updates --------------------------------------------------------------------------------------


async def _sse_event(resp: Any) -> tuple[str, dict[str, Any]]:
    event, data = "message", ""
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            return event, json.loads(data)


async def test_sse_snapshot_then_updates_from_the_sink(client: TestClient, fed: Fed) -> None:
    state = client.app[WEB_KEY]
    assert isinstance(state.sink, WebSink) and state.sink in fed.service.gateway.sinks
    resp = await client.get("/api/events")
    assert resp.headers["Content-Type"] == "text/event-stream"
    event, snap = await _sse_event(resp)
    assert event == "snapshot" and len(snap["devices"]) == len(fed.house.devices)
    no_full_keys(json.dumps(snap), fed)
    assert state.sink.subscribers == 1
    before = {d["mac"]: d["values"] for d in snap["devices"]}
    fed.feed(1800)  # half an hour of readings
    event, upd = await _sse_event(resp)
    assert event == "update"
    changed = {d["mac"]: d["values"] for d in upd["devices"]}
    assert changed and any(before.get(m) != v for m, v in changed.items())
    assert upd["removed"] == [] and set(upd["seen"]) == set(before)
    assert upd["clock"] > snap["clock"]
    resp.close()


# --- security off loopback -----------------------------------------------------------------------------


async def test_dns_rebinding_host_is_refused_on_loopback(client: TestClient) -> None:
    r = await client.get("/api/devices", headers={"Host": "attacker.example:8086"})
    assert r.status == 403
    r = await client.get("/api/devices", headers={"Host": "localhost:8086"})
    assert r.status == 200


async def test_password_required_when_not_loopback(fed: Fed) -> None:
    app = create_app(fed.service, password="s3cret pass", loopback=False)
    async with TestClient(TestServer(app)) as c:
        r = await c.get("/api/devices", headers={"Host": "192.168.1.5:8086"})
        assert r.status == 401
        r = await c.get("/", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"].startswith("/login")
        r = await c.get("/api/events")
        assert r.status == 401
        assert (await c.get("/login")).status == 200
        assert (await c.get("/static/app.css")).status == 200
        headers = await csrf(c)
        s = await (await c.get("/api/session")).json()
        assert s["auth_required"] and not s["authenticated"]
        r = await c.post("/api/login", json={"password": "guess"}, headers=headers)
        assert r.status == 401
        r = await c.post("/api/login", json={"password": "s3cret pass"})
        assert r.status == 403  # login needs the CSRF token too
        r = await c.post("/api/login", json={"password": "s3cret pass"}, headers=headers)
        assert r.status == 200
        assert c.session.cookie_jar.filter_cookies(c.make_url("/")).get(SESSION_COOKIE) is not None
        assert (await c.get("/api/devices")).status == 200
        assert (await (await c.get("/api/session")).json())["authenticated"]
        await c.post("/api/logout", json={}, headers=headers)
        assert (await c.get("/api/devices")).status == 401
    async with TestClient(TestServer(create_app(fed.service, password="tok", loopback=False))) as c:
        # scripts: a bearer token, no cookies, no CSRF token needed
        bearer = {"Authorization": "Bearer tok"}
        assert (await c.get("/api/devices", headers=bearer)).status == 200
        assert (await c.get("/api/devices", headers={"Authorization": "Bearer nope"})).status == 401
        r = await c.post(f"/api/devices/{fed.mac('Kitchen')}/name", json={"name": "K"}, headers=bearer)
        assert r.status == 200
        # the login link printed at start-up trades the token for a session cookie
        r = await c.get("/?token=tok", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/"
        assert SESSION_COOKIE in r.cookies
        assert (await c.get("/api/devices")).status == 200


async def test_serve_binds_loopback_and_requires_a_password_elsewhere(fed: Fed, monkeypatch: Any) -> None:
    assert parse_bind("127.0.0.1:8086") == ("127.0.0.1", 8086)
    assert parse_bind("[::1]:9000") == ("::1", 9000)
    assert parse_bind("8086") == ("127.0.0.1", 8086)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    runner = await serve(fed.service, "127.0.0.1:0")
    try:
        url = runner_url(runner)
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        assert not runner.app[WEB_KEY].security.auth_required
        async with ClientSession() as s, s.get(url + "api/devices") as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
    monkeypatch.delenv("MITHERM_WEB_PASSWORD", raising=False)
    runner = await serve(fed.service, "0.0.0.0:0")
    try:
        sec = runner.app[WEB_KEY].security
        assert sec.auth_required and sec.password and len(sec.password) >= 20
        port = runner_url(runner).rsplit(":", 1)[1].strip("/")
        async with ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/api/devices") as r:
                assert r.status == 401
            async with s.get(
                f"http://127.0.0.1:{port}/api/devices", headers={"Authorization": f"Bearer {sec.password}"}
            ) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    monkeypatch.setenv("MITHERM_WEB_PASSWORD", "from-env")
    runner = await serve(fed.service, "0.0.0.0:0")
    try:
        assert runner.app[WEB_KEY].security.password == "from-env"
    finally:
        await runner.cleanup()
    assert runner.app[WEB_KEY].sink not in fed.service.gateway.sinks  # detached on cleanup

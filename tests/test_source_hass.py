"""HassSource against a loopback fake of Home Assistant's websocket API (auth + bluetooth/subscribe_advertisements).

Event records follow HA core homeassistant/components/bluetooth/websocket_api.py (serialize_service_info)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import WSMsgType, web

from mitherm.sources import SourceError
from mitherm.sources.hass import HassSource, advertisement_from_hass, uuid16_from_text, websocket_url

TOKEN = "eyJhbGciOiJIUzI1NiJ9.secret-token-value"
MIBEACON = "5020aa01c9ccbbaa38c1a40d"


def record(**over: object) -> dict:
    r = {
        "name": "LYWSD03MMC",
        "address": "A4:C1:38:AA:BB:CC",
        "rssi": -67,
        "manufacturer_data": {},
        "service_data": {"0000fe95-0000-1000-8000-00805f9b34fb": MIBEACON},
        "service_uuids": ["0000fe95-0000-1000-8000-00805f9b34fb"],
        "source": "AA:BB:CC:00:11:22",
        "connectable": False,
        "time": 1_750_000_000.25,
        "tx_power": None,
        "raw": None,
    }
    r.update(over)
    return r


class FakeHass:
    def __init__(self, *, admin: bool = True, events: list[dict] | None = None) -> None:
        self.admin = admin
        self.events = events or []
        self.connections = 0
        self.subscribed = asyncio.Event()
        self.sockets: list[web.WebSocketResponse] = []
        self.port = 0

    async def handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        self.sockets.append(ws)
        await ws.send_json({"type": "auth_required", "ha_version": "2025.6.0"})
        auth = await ws.receive_json()
        if auth.get("type") != "auth" or auth.get("access_token") != TOKEN:
            await ws.send_json({"type": "auth_invalid", "message": "Invalid access token or password"})
            await ws.close()
            return ws
        await ws.send_json({"type": "auth_ok", "ha_version": "2025.6.0"})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            m = msg.json()
            if m.get("type") == "bluetooth/subscribe_advertisements":
                if not self.admin:
                    await ws.send_json(
                        {
                            "id": m["id"],
                            "type": "result",
                            "success": False,
                            "error": {"code": "unauthorized", "message": "Unauthorized"},
                        }
                    )
                    continue
                await ws.send_json({"id": m["id"], "type": "result", "success": True, "result": None})
                for ev in self.events:
                    await ws.send_json({"id": m["id"], "type": "event", "event": ev})
                self.subscribed.set()
        return ws

    async def __aenter__(self) -> FakeHass:
        app = web.Application()
        app.router.add_get("/api/websocket", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.sockets:
            await ws.close()
        await self.runner.cleanup()


def test_record_conversion_from_dicts() -> None:
    adv = advertisement_from_hass(record())
    assert adv is not None
    assert adv.mac == "A4:C1:38:AA:BB:CC" and adv.rssi == -67 and adv.name == "LYWSD03MMC"
    assert adv.service_data == {0xFE95: bytes.fromhex(MIBEACON)}
    assert adv.source == "AA:BB:CC:00:11:22" and adv.time == 1_750_000_000.25


def test_record_conversion_prefers_raw() -> None:
    # Aggregated dicts carry an older 0x181A payload too; raw is the latest packet only.
    raw = "020106" + "0f1695fe" + MIBEACON + "09094c59575344303341" + "07ff6909" + "01020304"
    adv = advertisement_from_hass(
        record(raw=raw, service_data={"0000181a-0000-1000-8000-00805f9b34fb": "00" * 13}, name="x")
    )
    assert adv is not None
    assert adv.service_data == {0xFE95: bytes.fromhex(MIBEACON)}
    assert adv.manufacturer_data == {0x0969: bytes.fromhex("01020304")}
    assert adv.name == "LYWSD03A"


def test_record_conversion_edge_cases() -> None:
    assert advertisement_from_hass(record(address="not-a-mac")) is None
    adv = advertisement_from_hass(
        record(
            name="A4-C1-38-AA-BB-CC",
            manufacturer_data={"76": "0215", "bad": "00"},
            service_data={"12345678-1234-1234-1234-123456789abc": "00", "0000fcd2-0000-1000-8000-00805f9b34fb": "zz"},
            time=None,
        )
    )
    assert adv is not None
    assert adv.name is None and adv.manufacturer_data == {76: b"\x02\x15"} and adv.service_data == {}
    assert uuid16_from_text("0xfe95") == uuid16_from_text("fe95") == uuid16_from_text("0x0000FE95") == 0xFE95
    assert uuid16_from_text("0x1234abcd") is None


def test_websocket_url_forms() -> None:
    assert websocket_url("ha.local:8123") == "ws://ha.local:8123/api/websocket"
    assert websocket_url("https://ha.example.org") == "wss://ha.example.org/api/websocket"
    assert websocket_url("ws://h:8123/api/websocket") == "ws://h:8123/api/websocket"
    with pytest.raises(SourceError):
        websocket_url("ftp://h")


async def test_adverts_from_home_assistant(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mitherm.sources")
    events = [
        {"add": [record(), record(address="A4:C1:38:00:00:01", rssi=-90, source="hci0")]},
        {"remove": [{"address": "A4:C1:38:00:00:02"}]},
        {"add": [record(rssi=-50)]},
    ]
    got: list = []
    done = asyncio.Event()

    def emit(adv: object) -> None:
        got.append(adv)
        if len(got) >= 3:
            done.set()

    async with FakeHass(events=events) as hass:
        source = HassSource(f"127.0.0.1:{hass.port}", TOKEN, reconnect_initial=0.05)
        task = asyncio.create_task(source.run(emit))
        try:
            async with asyncio.timeout(5):
                await done.wait()
            assert [a.rssi for a in got] == [-67, -90, -50]
            assert got[1].source == "hci0" and got[1].mac == "A4:C1:38:00:00:01"
            # HA restarts: the source reconnects and subscribes again.
            hass.subscribed.clear()
            for ws in hass.sockets:
                await ws.close()
            async with asyncio.timeout(5):
                await hass.subscribed.wait()
            assert hass.connections == 2
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert not any(TOKEN in r.getMessage() for r in caplog.records)
    assert sum("connection lost" in r.getMessage() for r in caplog.records) == 1


async def test_bad_token_is_a_clear_source_error() -> None:
    async with FakeHass() as hass:
        source = HassSource(f"ws://127.0.0.1:{hass.port}/api/websocket", "wrong-token", reconnect_initial=0.05)
        with pytest.raises(SourceError, match="Home Assistant rejected the token") as e:
            async with asyncio.timeout(5):
                await source.run(lambda adv: None)
        assert "admin" in str(e.value) and "long-lived access token" in str(e.value)
        assert hass.connections == 1  # not retried


async def test_non_admin_token_is_a_source_error() -> None:
    async with FakeHass(admin=False) as hass:
        source = HassSource(f"127.0.0.1:{hass.port}", TOKEN, reconnect_initial=0.05)
        with pytest.raises(SourceError, match="admin user"):
            async with asyncio.timeout(5):
                await source.run(lambda adv: None)


def test_token_required() -> None:
    with pytest.raises(SourceError, match="access token"):
        HassSource("h:8123", "")

"""MqttRawSource against a real throw-away Mosquitto, fed OpenMQTTGateway / Theengs Gateway advert JSON.

Payload shapes: OMG main/ZgatewayBT (id from NimBLEAddress::toString, mac_type, one message per service
data entry with servicedatauuid = NimBLEUUID::toString -> "0xfe95", manufacturerdata incl. company id);
Theengs Gateway ble_gateway.py (servicedatauuid = uuid[4:8] -> "fe95")."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import shutil
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from mitherm.sources import SourceError
from mitherm.sources.mqtt_raw import MqttRawSource, advertisement_from_json, receiver_from_topic
from mqtt_broker import find_mosquitto, free_port, start_mosquitto, stop_mosquitto, wait_port

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

MIBEACON = "5020aa01c9ccbbaa38c1a40d"
OMG = {
    "id": "a4:c1:38:aa:bb:cc",
    "mac_type": 0,
    "adv_type": 0,
    "name": "LYWSD03MMC",
    "rssi": -72,
    "servicedata": MIBEACON,
    "servicedatauuid": "0xfe95",
}
THEENGS = {
    "id": "A4:C1:38:11:22:33",
    "rssi": -80,
    "servicedatauuid": "181a",
    "servicedata": "a4c138112233" + "00e6" + "32" + "5a" + "0b8a" + "21",
    "manufacturerdata": "69090102",
}
DECODED_ONLY = {"id": "A4:C1:38:44:55:66", "rssi": -60, "brand": "Xiaomi", "model_id": "LYWSD03MMC", "tempc": 21.5}
NOT_ADVERTS = [
    {"bleconnect": True, "interval": 55555, "scnct": 12},  # OMG BT state
    {"id": "not-a-mac", "rssi": -1},
]


@pytest.fixture
def broker(tmp_path: Path):
    proc, port = start_mosquitto(tmp_path)
    try:
        yield port
    finally:
        stop_mosquitto(proc)


def test_json_conversion() -> None:
    adv = advertisement_from_json(OMG, "OMG_ESP32", now=5.0)
    assert adv is not None
    assert adv.mac == "A4:C1:38:AA:BB:CC" and adv.address_type == "public" and adv.time == 5.0
    assert adv.service_data == {0xFE95: bytes.fromhex(MIBEACON)} and adv.rssi == -72 and adv.source == "OMG_ESP32"
    adv = advertisement_from_json(THEENGS, "TheengsGateway")
    assert adv is not None
    assert set(adv.service_data) == {0x181A} and adv.manufacturer_data == {0x0969: b"\x01\x02"}
    assert adv.address_type is None
    adv = advertisement_from_json(
        {"id": "A4C138AABBCC", "servicedata": "00", "servicedatauuid": "0000fcd2-0000-1000-8000-00805f9b34fb"}, "g"
    )
    assert adv is not None and adv.mac == "A4:C1:38:AA:BB:CC" and adv.service_data == {0xFCD2: b"\x00"}
    assert advertisement_from_json({"id": "a4:c1:38:aa:bb:cc", "servicedata": "00"}, "g").service_data == {}
    for payload in NOT_ADVERTS:
        assert advertisement_from_json(payload, "g") is None


def test_receiver_from_topic() -> None:
    assert receiver_from_topic("home/OMG_ESP32/BTtoMQTT/A4C138AABBCC") == "OMG_ESP32"
    assert receiver_from_topic("home/TheengsGateway/BTtoMQTT/undecoded") == "TheengsGateway"
    assert receiver_from_topic("adverts/raw") == "adverts"


def test_bad_topic() -> None:
    with pytest.raises(SourceError, match="'#' may only be the last level"):
        MqttRawSource("h", 1883, "home/#/x")


async def test_adverts_from_broker(broker: int) -> None:
    got: list = []
    done = asyncio.Event()

    def emit(adv: object) -> None:
        got.append(adv)
        if len(got) >= 3:
            done.set()

    source = MqttRawSource("127.0.0.1", broker, "home/+/BTtoMQTT/#", reconnect_initial=0.05)
    task = asyncio.create_task(source.run(emit))
    try:
        async with aiomqtt.Client("127.0.0.1", broker) as pub:
            async with asyncio.timeout(5):
                # Publish until the source's subscription is live (it may start after us).
                while not got:
                    await pub.publish("home/OMG_ESP32/BTtoMQTT/A4C138AABBCC", json.dumps(OMG))
                    await asyncio.sleep(0.05)
            for payload in NOT_ADVERTS:
                await pub.publish("home/OMG_ESP32/BTtoMQTT", json.dumps(payload))
            await pub.publish("home/OMG_ESP32/BTtoMQTT/x", b"not json")
            await pub.publish("elsewhere/BTtoMQTT/A4C138112233", json.dumps(THEENGS))  # not subscribed
            await pub.publish("home/TheengsGateway/BTtoMQTT/A4C138112233", json.dumps(THEENGS))
            await pub.publish("home/OMG_ESP32/BTtoMQTT/A4C138445566", json.dumps(DECODED_ONLY))
            async with asyncio.timeout(5):
                await done.wait()
        omg = [a for a in got if a.source == "OMG_ESP32" and a.service_data]
        assert omg and omg[0].service_data == {0xFE95: bytes.fromhex(MIBEACON)}
        theengs = [a for a in got if a.source == "TheengsGateway"]
        assert len(theengs) == 1 and theengs[0].mac == "A4:C1:38:11:22:33" and 0x181A in theengs[0].service_data
        decoded = [a for a in got if a.mac == "A4:C1:38:44:55:66"]
        assert len(decoded) == 1 and decoded[0].service_data == {} and decoded[0].rssi == -60
        assert {a.mac for a in got} == {"A4:C1:38:AA:BB:CC", "A4:C1:38:11:22:33", "A4:C1:38:44:55:66"}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_reconnects_after_broker_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mitherm.sources")
    proc, port = start_mosquitto(tmp_path)
    got: list = []
    source = MqttRawSource("127.0.0.1", port, "home/+/BTtoMQTT/#", reconnect_initial=0.05, reconnect_maximum=0.2)
    task = asyncio.create_task(source.run(got.append))

    async def publish_until_received(n: int) -> None:
        async with aiomqtt.Client("127.0.0.1", port) as pub, asyncio.timeout(8):
            while len(got) < n:
                await pub.publish("home/OMG_ESP32/BTtoMQTT/A4C138AABBCC", json.dumps(OMG))
                await asyncio.sleep(0.05)

    try:
        await publish_until_received(1)
        stop_mosquitto(proc)
        await asyncio.sleep(0.3)
        proc, _ = start_mosquitto(tmp_path, port)
        count = len(got)
        await publish_until_received(count + 1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stop_mosquitto(proc)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection lost" in m for m in messages) == 1, messages
    assert any("connected again" in m for m in messages), messages


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
async def test_refused_login_is_a_source_error(tmp_path: Path) -> None:
    port = free_port()
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "gw", "right-password"], check=True, capture_output=True)
    conf = tmp_path / "auth.conf"
    # Run as the current user: mosquitto started as root would drop to "mosquitto", which cannot read tmp_path.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\npersistence false\n"
        f"user {getpass.getuser()}\n"
    )
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        source = MqttRawSource("127.0.0.1", port, "home/+/BTtoMQTT/#", "gw", "wrong-password", reconnect_initial=0.05)
        with pytest.raises(SourceError, match="refused the login") as e:
            async with asyncio.timeout(5):
                await source.run(lambda adv: None)
        assert "wrong-password" not in str(e.value)
    finally:
        stop_mosquitto(proc)

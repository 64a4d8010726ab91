"""MQTT publisher and HA discovery, against a real Mosquitto broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest

from mitherm.mqtt import (
    MqttPublisher,
    MqttSettings,
    discovery_messages,
    expire_after_for,
    state_payload,
)
from mitherm.state import DeviceState, KeyStatus
from mqtt_broker import find_mosquitto, free_port, self_signed_cert, start_mosquitto, stop_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

MAC = "A4:C1:38:12:34:56"


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    proc, port = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield port
    stop_mosquitto(proc)


def make_settings(port: int, tmp_path: Path, **kw) -> MqttSettings:
    tag = uuid.uuid4().hex[:8]  # retained messages of other tests never interfere
    base = {
        "host": "127.0.0.1",
        "port": port,
        "base_topic": f"mt{tag}",
        "discovery_prefix": f"ha{tag}",
        "gateway_id": "testgw",
        "min_interval": 0.0,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.3,
        "outbox_path": tmp_path / f"outbox-{tag}.sqlite3",
    }
    base.update(kw)
    return MqttSettings(**base)


def make_state(mac: str = MAC, known: bool = True, **kw) -> DeviceState:
    st = DeviceState(
        mac=mac,
        name="Kitchen",
        model="LYWSD03MMC",
        product_id=0x055B,
        format="pvvx",
        values={"temperature_c": 21.5, "humidity_pct": 45.2, "battery_pct": 87, "voltage_v": 2.981},
        rssi=-71,
        receiver="hci0",
        last_seen=1_700_000_000.0,
        first_seen=1_699_990_000.0,
        key_status=KeyStatus.NOT_NEEDED,
        data_interval=10.0,
        known=known,
    )
    for k, v in kw.items():
        setattr(st, k, v)
    return st


class Collector:
    """A second MQTT client that records what it receives."""

    def __init__(self, port: int, *topics: str) -> None:
        self.port = port
        self.topics = topics
        self.messages: list[tuple[str, bytes, bool]] = []
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 5)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"collector-{uuid.uuid4().hex[:6]}") as c:
            for t in self.topics:
                await c.subscribe(t, qos=1)
            self.client = c
            self._ready.set()
            async for m in c.messages:
                self.messages.append((str(m.topic), bytes(m.payload), m.retain))

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.messages if t == topic]

    def last(self, topic: str) -> bytes | None:
        got = self.on(topic)
        return got[-1] if got else None

    async def wait_for(self, pred, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received {self.messages}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(settings: MqttSettings):
    pub = MqttPublisher(settings)
    task = asyncio.create_task(pub.run())
    try:
        yield pub
    finally:
        await pub.stop()
        await asyncio.wait_for(task, 5)


# -- pure parts -----------------------------------------------------------------------------------------


def test_settings_from_url():
    s = MqttSettings.from_url("mqtt://broker.lan")
    assert (s.host, s.port, s.tls, s.username, s.password) == ("broker.lan", 1883, False, None, None)
    s = MqttSettings.from_url("mqtts://me:p%40ss@broker.lan?ca=/etc/ca.pem&insecure=1")
    assert (s.host, s.port, s.tls, s.username, s.password) == ("broker.lan", 8883, True, "me", "p@ss")
    assert (s.ca, s.insecure) == ("/etc/ca.pem", True)
    assert MqttSettings.from_url("mqtt://h?ca=/x.pem").port == 8883
    s = MqttSettings.from_url("mqtt://10.0.0.2:1884?publish_unknown=1&min_interval=5", gateway_id="Attic Pi")
    assert (s.port, s.publish_unknown, s.min_interval, s.gateway_id) == (1884, True, 5.0, "Attic_Pi")
    assert s.client_id.startswith("mitherm-Attic_Pi-") and len(s.client_id) == len("mitherm-Attic_Pi-") + 6
    assert MqttSettings.from_url("mqtt://h").client_id != MqttSettings.from_url("mqtt://h").client_id
    assert "p@ss" not in MqttSettings.from_url("mqtt://u:p%40ss@h").display()
    for bad in ("http://h", "mqtt://", "mqtt://h?bogus=1"):
        with pytest.raises(ValueError):
            MqttSettings.from_url(bad)


def test_discovery_exact_payload():
    s = MqttSettings(gateway_id="gw1", client_id="x")
    msgs = dict(discovery_messages(make_state(), s))
    assert list(msgs) == [
        "homeassistant/sensor/mitherm_a4c138123456/temperature_c/config",
        "homeassistant/sensor/mitherm_a4c138123456/humidity_pct/config",
        "homeassistant/sensor/mitherm_a4c138123456/battery_pct/config",
        "homeassistant/sensor/mitherm_a4c138123456/voltage_v/config",
        "homeassistant/sensor/mitherm_a4c138123456/rssi/config",
    ]
    expected = (
        '{"availability":[{"topic":"mitherm/gw1/status"},{"topic":"mitherm/a4c138123456/availability"}],'
        '"availability_mode":"all",'
        '"device":{"connections":[["bluetooth","A4:C1:38:12:34:56"]],"identifiers":["mitherm_a4c138123456"],'
        '"manufacturer":"Xiaomi","model":"LYWSD03MMC","name":"Kitchen","sw_version":"pvvx"},'
        '"device_class":"temperature","expire_after":300,"name":"Temperature",'
        '"origin":{"name":"mitherm","sw_version":"0.1.0"},"state_class":"measurement",'
        '"state_topic":"mitherm/a4c138123456/state","suggested_display_precision":1,'
        '"unique_id":"mitherm_a4c138123456_temperature_c","unit_of_measurement":"°C",'
        '"value_template":"{{ value_json.temperature_c }}"}'
    ).encode()
    assert msgs["homeassistant/sensor/mitherm_a4c138123456/temperature_c/config"] == expected
    rssi = json.loads(msgs["homeassistant/sensor/mitherm_a4c138123456/rssi/config"])
    assert (rssi["device_class"], rssi["unit_of_measurement"], rssi["entity_category"]) == (
        "signal_strength",
        "dBm",
        "diagnostic",
    )
    assert rssi["enabled_by_default"] is False
    volt = json.loads(msgs["homeassistant/sensor/mitherm_a4c138123456/voltage_v/config"])
    assert (volt["device_class"], volt["unit_of_measurement"], volt["entity_category"]) == (
        "voltage",
        "V",
        "diagnostic",
    )
    batt = json.loads(msgs["homeassistant/sensor/mitherm_a4c138123456/battery_pct/config"])
    assert "entity_category" not in batt and batt["device_class"] == "battery"


def test_discovery_is_stable_and_only_for_reported_quantities():
    a = MqttSettings(gateway_id="gw1")
    b = MqttSettings(gateway_id="gw1")
    assert a.client_id != b.client_id
    st = make_state()
    assert discovery_messages(st, a) == discovery_messages(st, b)
    # the frame-to-frame facts (values, rssi, last_seen, a jittering interval) do not change discovery
    st2 = make_state(
        values={**st.values, "temperature_c": 19.0}, rssi=-90, last_seen=1_800_000_000.0, data_interval=11.3
    )
    assert discovery_messages(st2, a) == discovery_messages(st, a)
    only_temp = make_state(values={"temperature_c": 20.0, "flags": 3, "trigger": True}, rssi=None)
    topics = [t for t, _ in discovery_messages(only_temp, a)]
    assert topics == ["homeassistant/sensor/mitherm_a4c138123456/temperature_c/config"]
    for _, payload in discovery_messages(st, a):
        text = payload.decode()
        assert "1700000000" not in text and "1699990000" not in text and a.client_id not in text


def test_expire_after_buckets_and_hysteresis():
    assert expire_after_for(None) == 1800
    assert expire_after_for(2.5) == 300
    assert expire_after_for(100) == 300
    assert expire_after_for(101) == 600
    assert expire_after_for(600) == 1800  # stock LYWSD03MMC: a reading every ~10 min
    assert expire_after_for(5000) == 28800
    assert expire_after_for(86400) == 3 * 86400
    # at a bucket boundary a jittering interval keeps the value in use
    assert expire_after_for(99, previous=600) == 600
    assert expire_after_for(101, previous=600) == 600
    assert expire_after_for(10, previous=1800) == 300  # much faster now: follow it
    assert expire_after_for(199, previous=1200) == 1200  # 3 x 199 = 597 is at the 600 boundary
    assert expire_after_for(201, previous=1200) == 1200
    assert expire_after_for(250, previous=600) == 1200  # no longer covered: grow


def test_state_payload():
    p = json.loads(state_payload(make_state(key_status=KeyStatus.FAILED, key_verdict="wrong key")))
    assert p == {
        "temperature_c": 21.5,
        "humidity_pct": 45.2,
        "battery_pct": 87,
        "voltage_v": 2.981,
        "rssi": -71,
        "receiver": "hci0",
        "last_seen": "2023-11-14T22:13:20Z",
        "key_status": "key_failed",
        "key_verdict": "wrong key",
    }


# -- against the broker ---------------------------------------------------------------------------------


async def test_state_discovery_and_availability_are_retained(broker, tmp_path):
    s = make_settings(broker, tmp_path)
    async with running(s) as pub:
        await pub.wait_connected(5)
        pub.publish_state(make_state())
        await pub.wait_idle(5)
        # a client arriving later gets everything from the broker's retained store
        async with Collector(broker, f"{s.base_topic}/#", f"{s.discovery_prefix}/#") as c:
            await c.wait_for(lambda: len(c.messages) >= 8)
            state_topic = f"{s.base_topic}/a4c138123456/state"
            assert json.loads(c.last(state_topic))["temperature_c"] == 21.5
            assert c.last(f"{s.base_topic}/a4c138123456/availability") == b"online"
            assert c.last(f"{s.base_topic}/testgw/status") == b"online"
            configs = [t for t, _, _ in c.messages if t.endswith("/config")]
            assert len(configs) == 5
            assert all(r for _, _, r in c.messages)  # all retained
            expected = dict(discovery_messages(make_state(), s))
            for topic, payload in expected.items():
                assert c.last(topic) == payload

            pub.set_available(MAC, False)
            await c.wait_for(lambda: c.last(f"{s.base_topic}/a4c138123456/availability") == b"offline")
            pub.publish_state(make_state(values={"temperature_c": 22.0}))
            await c.wait_for(lambda: c.last(f"{s.base_topic}/a4c138123456/availability") == b"online")
    # a clean stop says offline
    async with Collector(broker, f"{s.base_topic}/testgw/status") as c:
        await c.wait_for(lambda: c.last(f"{s.base_topic}/testgw/status") == b"offline")


async def test_two_instances_publish_identical_discovery(broker, tmp_path):
    s1 = make_settings(broker, tmp_path)
    s2 = replace(s1, client_id="", outbox_path=tmp_path / "other.sqlite3")
    assert s1.client_id != s2.client_id
    got = []
    for s in (s1, s2):
        async with running(s) as pub:
            pub.publish_state(make_state())
            await pub.wait_idle(5)
            async with Collector(broker, f"{s.discovery_prefix}/#") as c:
                await c.wait_for(lambda c=c: len(c.messages) >= 5)
                got.append(sorted(c.messages))
    assert got[0] == got[1]


async def test_last_will_on_unclean_disconnect(broker, tmp_path):
    s = make_settings(broker, tmp_path)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from mitherm.mqtt import MqttPublisher, MqttSettings
        async def main():
            s = MqttSettings(host="127.0.0.1", port={broker}, base_topic={s.base_topic!r},
                             discovery_prefix={s.discovery_prefix!r}, gateway_id="testgw",
                             outbox_path=Path({str(tmp_path / "child.sqlite3")!r}))
            pub = MqttPublisher(s)
            task = asyncio.create_task(pub.run())
            await pub.wait_connected(5)
            print("connected", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    topic = f"{s.base_topic}/testgw/status"
    async with Collector(broker, topic) as c:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
            assert line.strip() == "connected"
            await c.wait_for(lambda: c.last(topic) == b"online")
            os.kill(proc.pid, signal.SIGKILL)
            await c.wait_for(lambda: c.last(topic) == b"offline")
        finally:
            proc.kill()
            proc.wait()
    assert c.on(topic) == [b"online", b"offline"]


async def test_reannounce_when_home_assistant_comes_online(broker, tmp_path):
    s = make_settings(broker, tmp_path)
    async with running(s) as pub:
        pub.publish_state(make_state())
        await pub.wait_idle(5)
        async with Collector(broker, f"{s.discovery_prefix}/sensor/#", f"{s.base_topic}/+/availability") as c:
            await c.wait_for(lambda: len(c.messages) >= 6)
            assert all(r for _, _, r in c.messages)
            c.messages.clear()
            await c.client.publish(s.ha_status_topic, b"offline")
            await asyncio.sleep(0.1)
            assert c.messages == []
            await c.client.publish(s.ha_status_topic, b"online")
            await c.wait_for(lambda: len(c.messages) >= 6)
            assert {t for t, _, _ in c.messages} == {
                *(t for t, _ in discovery_messages(make_state(), s)),
                f"{s.base_topic}/a4c138123456/availability",
            }
            assert dict((t, p) for t, p, _ in c.messages if t.endswith("config")) == dict(
                discovery_messages(make_state(), s)
            )


async def test_rate_limit_holds_back_and_delivers_the_newest(broker, tmp_path):
    s = make_settings(broker, tmp_path, min_interval=0.6)
    topic = f"{s.base_topic}/a4c138123456/state"
    async with Collector(broker, topic) as c, running(s) as pub:
        await pub.wait_connected(5)
        t0 = time.monotonic()
        pub.publish_state(make_state(values={"temperature_c": 20.0}))
        await c.wait_for(lambda: len(c.on(topic)) == 1)
        for v in (20.1, 20.2, 20.3):
            pub.publish_state(make_state(values={"temperature_c": v}))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert len(c.on(topic)) == 1  # held back
        await c.wait_for(lambda: len(c.on(topic)) == 2)
        assert time.monotonic() - t0 >= 0.55
        assert [json.loads(p)["temperature_c"] for p in c.on(topic)] == [20.0, 20.3]
        await asyncio.sleep(0.8)
        assert len(c.on(topic)) == 2  # nothing more to send


async def test_held_back_state_is_sent_on_stop(broker, tmp_path):
    s = make_settings(broker, tmp_path, min_interval=30)
    topic = f"{s.base_topic}/a4c138123456/state"
    async with Collector(broker, topic) as c:
        async with running(s) as pub:
            await pub.wait_connected(5)
            pub.publish_state(make_state(values={"temperature_c": 25.0}))
            await c.wait_for(lambda: len(c.on(topic)) == 1)
            pub.publish_state(make_state(values={"temperature_c": 26.0}))
            await asyncio.sleep(0.1)
            assert len(c.on(topic)) == 1
        await c.wait_for(lambda: len(c.on(topic)) == 2)
        assert json.loads(c.on(topic)[-1])["temperature_c"] == 26.0


async def test_unchanged_state_is_not_republished_every_frame(broker, tmp_path):
    s = make_settings(broker, tmp_path, min_interval=0.2)
    topic = f"{s.base_topic}/a4c138123456/state"
    async with Collector(broker, topic) as c, running(s) as pub:
        await pub.wait_connected(5)
        for i in range(10):  # same values, new last_seen / rssi: waits for the refresh (expire/3)
            pub.publish_state(make_state(last_seen=1_700_000_000.0 + i, rssi=-70 - i))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)
        assert len(c.on(topic)) == 1
        pub.publish_state(make_state(values={"temperature_c": 1.0}))  # a change goes out
        await c.wait_for(lambda: len(c.on(topic)) == 2)


async def test_publish_unknown(broker, tmp_path):
    for publish_unknown in (False, True):
        s = make_settings(broker, tmp_path, publish_unknown=publish_unknown)
        async with Collector(broker, f"{s.base_topic}/#", f"{s.discovery_prefix}/#") as c:
            async with running(s) as pub:
                await pub.wait_connected(5)
                pub.publish_state(make_state(known=False, name=None))
                await pub.wait_idle(5)
                await asyncio.sleep(0.1)
            topics = {t for t, _, _ in c.messages}
            device_topics = {t for t in topics if "a4c138123456" in t}
            if publish_unknown:
                assert f"{s.base_topic}/a4c138123456/state" in device_topics
                assert len([t for t in device_topics if t.endswith("/config")]) == 5
                name = json.loads(c.last(next(t for t in device_topics if t.endswith("/config"))))["device"]["name"]
                assert name == "LYWSD03MMC 123456"
            else:
                assert device_topics == set()
                assert topics == {f"{s.base_topic}/testgw/status"}


async def test_broker_restart_delivers_newest_states_exactly_once(tmp_path):
    proc, port = start_mosquitto(tmp_path / "b1")
    macs = [f"A4:C1:38:00:00:{i:02X}" for i in range(5)]
    s = make_settings(port, tmp_path, min_interval=0.0)
    pub = MqttPublisher(s)
    task = asyncio.create_task(pub.run())
    try:
        await pub.wait_connected(5)
        for m in macs:
            pub.publish_state(make_state(mac=m, values={"temperature_c": 1.0}))
        await pub.wait_idle(5)
        stop_mosquitto(proc)
        await asyncio.sleep(0.2)
        assert not pub.connected
        for v in (2.0, 3.0, 4.0):  # while the broker is down
            for m in macs:
                pub.publish_state(make_state(mac=m, values={"temperature_c": v}))
            await asyncio.sleep(0.05)
        assert pub.backlog >= len(macs)
        proc, _ = start_mosquitto(tmp_path / "b2", port=port)
        async with Collector(port, f"{s.base_topic}/+/state") as c:
            await pub.wait_connected(10)
            await pub.wait_idle(5)
            await asyncio.sleep(0.3)
            for m in macs:
                topic = f"{s.base_topic}/{m.replace(':', '').lower()}/state"
                assert [json.loads(p)["temperature_c"] for p in c.on(topic)] == [4.0], c.messages
    finally:
        await pub.stop()
        await asyncio.wait_for(task, 5)
        stop_mosquitto(proc)


async def test_outbox_survives_a_gateway_restart_while_the_broker_is_down(broker, tmp_path):
    dead = free_port()  # nothing listens here
    s = make_settings(dead, tmp_path)
    async with running(s) as pub:
        pub.publish_state(make_state(values={"temperature_c": 7.5}))
        await asyncio.sleep(0.1)
        assert not pub.connected
    s2 = replace(s, port=broker)
    topic = f"{s.base_topic}/a4c138123456/state"
    async with Collector(broker, topic) as c:
        async with running(s2) as pub2:
            assert pub2.backlog >= 1
            await pub2.wait_connected(5)
            await pub2.wait_idle(5)
            await c.wait_for(lambda: len(c.on(topic)) == 1)
        assert json.loads(c.on(topic)[0])["temperature_c"] == 7.5
    async with running(replace(s, port=broker)) as pub3:  # and it is not sent twice
        assert pub3.backlog == 0


async def test_tls(tmp_path, caplog):
    certfile, keyfile = self_signed_cert(tmp_path)
    proc, port = start_mosquitto(tmp_path, extra_conf=f"certfile {certfile}\nkeyfile {keyfile}\n")
    try:
        for url in (f"mqtts://127.0.0.1:{port}?ca={certfile}", f"mqtts://localhost:{port}?insecure=1"):
            s = MqttSettings.from_url(
                url,
                **{
                    k: v
                    for k, v in vars_of(make_settings(port, tmp_path)).items()
                    if k not in ("host", "port", "tls", "ca", "insecure")
                },
            )
            async with running(s) as pub:
                await pub.wait_connected(5)
                pub.publish_state(make_state())
                await pub.wait_idle(5)
                assert pub.published >= 7
        # without the CA the self-signed certificate is refused, visibly
        s = make_settings(port, tmp_path, tls=True)
        with caplog.at_level(logging.WARNING, logger="mitherm.mqtt"):
            async with running(s) as pub:
                await asyncio.sleep(0.3)
                assert not pub.connected
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text and "unreachable" in caplog.text
    finally:
        stop_mosquitto(proc)


def vars_of(s: MqttSettings) -> dict:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


async def test_forget_device_clears_retained_topics(broker, tmp_path):
    s = make_settings(broker, tmp_path)
    async with running(s) as pub:
        pub.publish_state(make_state())
        await pub.wait_idle(5)
        pub.forget_device("a4c138123456")
        await pub.wait_idle(5)
        async with Collector(broker, f"{s.base_topic}/#", f"{s.discovery_prefix}/#") as c:
            await asyncio.sleep(0.2)
            assert {t for t, _, _ in c.messages} == {f"{s.base_topic}/testgw/status"}


# -- cheaper publishing: in-place held states, batched outbox, pipelined sending ----------------------------


async def until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_expire_after_fast_path_matches_expire_after_for(tmp_path):
    """publish_state skips expire_after_for when the value in use is kept: same values, same discovery."""

    async def main():
        s = make_settings(free_port(), tmp_path)  # never connected: nothing is sent
        pub = MqttPublisher(s)
        st = make_state()
        intervals = [None, 10.0, 99.9, 100.0, 100.1, 240.0, 250.0, 249.99, 1e9, float("inf"), float("nan")]
        intervals += [0.0, -5.0, None, 3.0, 101.0, 99.0, 600.0, 1000.0, 400.0, 86400.0 / 3, 86400.0 / 3 + 1e-6]
        expected = None
        for iv in intervals:
            st.data_interval = iv
            pub.publish_state(st)
            expected = expire_after_for(iv, expected)
            assert pub._devices[MAC].expire == expected, iv
            announced = pub._devices[MAC].discovery
            assert announced == dict(discovery_messages(st, s, expected)), iv
        await pub.stop()

    asyncio.run(main())


async def test_held_state_is_updated_in_place_and_keeps_the_earliest_due(broker, tmp_path):
    t = [1000.0]
    s = make_settings(broker, tmp_path, min_interval=30)
    topic = f"{s.base_topic}/a4c138123456/state"
    pub = MqttPublisher(s, clock=lambda: t[0])
    task = asyncio.create_task(pub.run())
    try:
        async with Collector(broker, topic) as c:
            await pub.wait_connected(5)
            pub.publish_state(make_state(values={"temperature_c": 20.0}))
            await c.wait_for(lambda: len(c.on(topic)) == 1)
            await pub.wait_idle(5)  # acknowledged
            t[0] = 1001.0  # unchanged values: refreshed after max(min_interval, expire_after / 3) = 100 s
            pub.publish_state(make_state(values={"temperature_c": 20.0}, rssi=-80))
            held = pub._due[topic]
            assert held.due == 1100.0
            t[0] = 1002.0  # a change: due after min_interval, earlier than the held one
            pub.publish_state(make_state(values={"temperature_c": 21.0}))
            assert pub._due[topic] is held and held.due == 1030.0
            t[0] = 1003.0  # unchanged again (own due 1100): never delays the one already scheduled
            pub.publish_state(make_state(values={"temperature_c": 20.0}, rssi=-60))
            assert pub._due[topic] is held and held.due == 1030.0
            assert pub.backlog == 1
            t[0] = 1029.0
            await asyncio.sleep(0.4)  # the sender looks at least every 0.25 s under a capture clock
            assert len(c.on(topic)) == 1
            t[0] = 1030.0
            await c.wait_for(lambda: len(c.on(topic)) == 2)
            second = json.loads(c.on(topic)[1])
            assert (second["temperature_c"], second["rssi"]) == (20.0, -60)  # the newest state
            await pub.wait_idle(5)
            # the next state after a publish is a new message again, rate-limited from the publish
            t[0] = 1031.0
            pub.publish_state(make_state(values={"temperature_c": 22.0}))
            assert pub._due[topic] is not held and pub._due[topic].due == 1060.0
    finally:
        await pub.stop()
        await asyncio.wait_for(task, 5)


async def test_a_state_queued_while_the_previous_is_in_flight_is_rate_limited(broker, tmp_path, monkeypatch):
    gate = asyncio.Event()
    publish = aiomqtt.Client.publish

    async def gated(self, topic, *args, **kwargs):
        if topic.endswith("/state"):
            await gate.wait()  # the broker has not acknowledged it yet
        return await publish(self, topic, *args, **kwargs)

    monkeypatch.setattr(aiomqtt.Client, "publish", gated)
    t = [1000.0]
    s = make_settings(broker, tmp_path, min_interval=30)
    topic = f"{s.base_topic}/a4c138123456/state"
    pub = MqttPublisher(s, clock=lambda: t[0])
    task = asyncio.create_task(pub.run())
    try:
        await pub.wait_connected(5)
        pub.publish_state(make_state(values={"temperature_c": 20.0}))
        first = pub._due[topic]
        await until(lambda: first.sending)
        t[0] = 1001.0  # unchanged: waits for the refresh, counted from the publish in flight
        pub.publish_state(make_state(values={"temperature_c": 20.0}, rssi=-80))
        second = pub._due[topic]
        assert second is not first and second.due == 1100.0
        pub.publish_state(make_state(values={"temperature_c": 21.0}))  # a change: min_interval after it
        assert pub._due[topic] is second and second.due == 1030.0
        published = pub.published
        gate.set()
        await until(lambda: pub.published > published and not first.sending)  # the first state: acknowledged
        assert pub.backlog == 1 and pub._due[topic] is second
    finally:
        gate.set()
        await pub.stop()
        await asyncio.wait_for(task, 5)


async def test_outbox_is_written_in_batches_and_delivered_by_the_next_run(broker, tmp_path, monkeypatch):
    from mitherm import mqtt as mqtt_module

    writes: list[int] = []
    put = mqtt_module._Outbox.put

    def counting_put(self, msgs):
        writes.append(len(msgs))
        return put(self, msgs)

    monkeypatch.setattr(mqtt_module._Outbox, "put", counting_put)
    macs = [f"A4:C1:38:00:01:{i:02X}" for i in range(40)]
    s = make_settings(free_port(), tmp_path)  # the broker is down
    async with running(s) as pub:
        for v in range(10):
            for m in macs:
                pub.publish_state(make_state(mac=m, values={"temperature_c": 10.0 + v, "humidity_pct": 50.0}))
            await asyncio.sleep(0)
        assert not pub.connected
        assert writes == []  # nothing written per message
    # stop() wrote every waiting topic once, in one transaction: discovery (2 + rssi), availability, state
    assert writes == [len(macs) * 5]
    s2 = replace(s, port=broker)
    async with Collector(broker, f"{s.base_topic}/#", f"{s.discovery_prefix}/#") as c:
        async with running(s2) as pub2:
            assert pub2.backlog == len(macs) * 5
            await pub2.wait_connected(5)
            await pub2.wait_idle(5)
        await c.wait_for(lambda: sum(t.endswith("/state") for t, _, _ in c.messages) >= len(macs))
        for m in macs:
            node = m.replace(":", "").lower()
            assert [json.loads(p)["temperature_c"] for p in c.on(f"{s.base_topic}/{node}/state")] == [19.0]
            assert c.on(f"{s.base_topic}/{node}/availability") == [b"online"]
            assert len(c.on(f"{s.discovery_prefix}/sensor/mitherm_{node}/temperature_c/config")) == 1
    async with running(s2) as pub3:  # delivered: the outbox is empty
        assert pub3.backlog == 0


async def test_outbox_is_on_disk_within_the_flush_interval(broker, tmp_path):
    """A kill -9 during an outage loses at most the updates of the last OUTBOX_FLUSH_INTERVAL seconds."""
    from mitherm.mqtt import OUTBOX_FLUSH_INTERVAL

    dead = free_port()
    s = make_settings(dead, tmp_path)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from mitherm.mqtt import MqttPublisher, MqttSettings, OUTBOX_FLUSH_INTERVAL
        from mitherm.state import DeviceState
        async def main():
            s = MqttSettings(host="127.0.0.1", port={dead}, base_topic={s.base_topic!r},
                             discovery_prefix={s.discovery_prefix!r}, gateway_id="testgw",
                             outbox_path=Path({str(s.outbox_path)!r}), reconnect_initial=0.05)
            pub = MqttPublisher(s)
            task = asyncio.create_task(pub.run())
            st = DeviceState("A4:C1:38:12:34:56", name="Kitchen", values={{"temperature_c": 7.5}}, known=True,
                             data_interval=10.0, last_seen=1_700_000_000.0)
            pub.publish_state(st)
            await asyncio.sleep(OUTBOX_FLUSH_INTERVAL + 0.3)
            print("queued", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15 + OUTBOX_FLUSH_INTERVAL)
        assert line.strip() == "queued"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    topic = f"{s.base_topic}/a4c138123456/state"
    async with Collector(broker, topic) as c:
        async with running(replace(s, port=broker)) as pub:
            assert pub.backlog >= 3  # state, availability, discovery
            await pub.wait_connected(5)
            await pub.wait_idle(5)
            await c.wait_for(lambda: len(c.on(topic)) == 1)
        assert json.loads(c.on(topic)[0])["temperature_c"] == 7.5


async def test_a_delivered_state_never_comes_back_from_the_outbox(tmp_path):
    """A held-back state written to the outbox during an outage, then replaced and delivered after it:
    its row is gone, so the next run does not re-publish the older value."""
    proc, port = start_mosquitto(tmp_path / "b1")
    t = [1000.0]
    s = make_settings(port, tmp_path, min_interval=30)
    topic = f"{s.base_topic}/a4c138123456/state"
    pub = MqttPublisher(s, clock=lambda: t[0])
    task = asyncio.create_task(pub.run())
    try:
        await pub.wait_connected(5)
        pub.publish_state(make_state(values={"temperature_c": 1.0}))
        await pub.wait_idle(5)
        t[0] = 1001.0
        pub.publish_state(make_state(values={"temperature_c": 2.0}))  # held back until 1030
        stop_mosquitto(proc)
        await until(lambda: not pub.connected)
        assert pub._due[topic].on_disk  # written when the connection dropped
        proc, _ = start_mosquitto(tmp_path / "b2", port=port)
        await pub.wait_connected(10)
        t[0] = 1002.0
        pub.publish_state(make_state(values={"temperature_c": 3.0}))  # replaces the held-back state
        t[0] = 1031.0
        async with Collector(port, topic) as c:
            await pub.wait_idle(5)
            await c.wait_for(lambda: c.last(topic) is not None and json.loads(c.last(topic))["temperature_c"] == 3.0)
        await pub.stop()
        await asyncio.wait_for(task, 5)
        pub2 = MqttPublisher(s)
        assert pub2.backlog == 0
        await pub2.stop()
    finally:
        await pub.stop()
        stop_mosquitto(proc)


async def test_pipelined_sending_keeps_priority_and_topic_order(broker, tmp_path, monkeypatch):
    from mitherm.mqtt import SEND_WINDOW

    in_flight = peak = 0
    publish = aiomqtt.Client.publish

    async def counting_publish(self, *args, **kwargs):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await publish(self, *args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(aiomqtt.Client, "publish", counting_publish)
    s = make_settings(broker, tmp_path)
    macs = [f"A4:C1:38:00:02:{i:02X}" for i in range(30)]
    async with Collector(broker, f"{s.base_topic}/#", f"{s.discovery_prefix}/#") as c, running(s) as pub:
        await pub.wait_connected(5)
        for m in macs:  # one batch: 30 devices x (5 discovery + availability + state)
            pub.publish_state(make_state(mac=m))
        await pub.wait_idle(10)
        await c.wait_for(lambda: sum(t.endswith("/state") for t, _, _ in c.messages) == len(macs))
        kinds = [
            0 if t.endswith("/config") else 1 if t.endswith("/availability") else 2
            for t, _, _ in c.messages
            if not t.endswith("/status")
        ]
        assert len(kinds) == len(macs) * 7
        assert kinds == sorted(kinds)  # discovery, then availability, then states
        assert 1 < peak <= SEND_WINDOW  # several publishes awaited together, never more than the window

        # per topic, values arrive oldest first and the newest last, whatever is coalesced in between
        topic = f"{s.base_topic}/a4c1380002{0:02x}/state"
        c.messages.clear()
        for v in range(1, 41):
            pub.publish_state(make_state(mac=macs[0], values={"temperature_c": float(v)}))
            await asyncio.sleep(0.002 if v % 3 else 0)
        await pub.wait_idle(10)
        await c.wait_for(lambda: c.last(topic) is not None and json.loads(c.last(topic))["temperature_c"] == 40.0)
        got = [json.loads(p)["temperature_c"] for p in c.on(topic)]
        assert got == sorted(set(got)) and got[-1] == 40.0
        assert len(got) > 1

"""open_source() URL parsing for the network sources: esphome://, hass:// / hasss://, mqtt-raw:// / mqtts-raw://."""

from __future__ import annotations

import base64

import pytest

from mitherm.sources import SourceError, open_source
from mitherm.sources.esphome import EsphomeSource
from mitherm.sources.hass import HassSource
from mitherm.sources.mqtt_raw import MqttRawSource

KEY = base64.b64encode(bytes(range(200, 232))).decode()  # contains '+' and '/'
assert "+" in KEY and "/" in KEY


def _enc(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


def test_esphome_urls() -> None:
    s = open_source(f"esphome://kitchen-proxy.local?key={_enc(KEY)}")
    assert isinstance(s, EsphomeSource)
    assert (s.host, s.port, s.noise_psk) == ("kitchen-proxy.local", 6053, KEY)
    assert s.name == "esphome:kitchen-proxy.local"
    # An unencoded '+' survives (base64 has no spaces); no key = plaintext API.
    s = open_source(f"esphome://10.0.0.5:6054?key={KEY.replace('/', '%2F')}&name=attic")
    assert (s.host, s.port, s.noise_psk, s._fixed_name) == ("10.0.0.5", 6054, KEY, "attic")
    assert open_source("ESPHOME://proxy").noise_psk is None


@pytest.mark.parametrize(
    "url, match",
    [
        ("esphome://", "esphome://kitchen-proxy.local"),
        ("esphome://proxy:notaport", "esphome://kitchen-proxy.local"),
        ("esphome://proxy/some/path", "esphome://kitchen-proxy.local"),
        ("esphome://proxy?key=short", "base64"),
        ("esphome://proxy?psk=abc", "unknown option"),
    ],
)
def test_bad_esphome_urls(url: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        open_source(url)


def test_hass_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MITHERM_HASS_TOKEN", raising=False)
    s = open_source("hass://homeassistant.local:8123?token=abc.def.ghi")
    assert isinstance(s, HassSource)
    assert s.url == "ws://homeassistant.local:8123/api/websocket" and s.token == "abc.def.ghi"
    s = open_source("hasss://ha.example.org:443/api/websocket?token=t0k")
    assert s.url == "wss://ha.example.org:443/api/websocket"
    assert open_source("hass://ha?token=x").url == "ws://ha:8123/api/websocket"
    monkeypatch.setenv("MITHERM_HASS_TOKEN", "from-env")
    assert open_source("hass://ha:8123").token == "from-env"


@pytest.mark.parametrize(
    "url, match",
    [
        ("hass://ha:8123", "needs \\?token="),
        ("hass://:8123?token=x", "hass://homeassistant.local:8123\\?token="),
        ("hass://ha:99999?token=x", "hass://homeassistant.local"),
        ("hass://ha?tok=x", "unknown option"),
    ],
)
def test_bad_hass_urls(url: str, match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MITHERM_HASS_TOKEN", raising=False)
    with pytest.raises(SourceError, match=match):
        open_source(url)


def test_mqtt_raw_urls() -> None:
    s = open_source("mqtt-raw://broker.local:1883/home/+/BTtoMQTT/#")
    assert isinstance(s, MqttRawSource)
    assert (s.host, s.port, s.topic, s.username, s.password, s.tls) == (
        "broker.local",
        1883,
        "home/+/BTtoMQTT/#",
        None,
        None,
        False,
    )
    s = open_source("mqtts-raw://gw:p%40ss%3Aword@broker/home%2F%2B%2FBTtoMQTT%2F%23")
    assert (s.port, s.topic, s.username, s.password, s.tls) == (8883, "home/+/BTtoMQTT/#", "gw", "p@ss:word", True)
    assert open_source("mqtt-raw://broker").topic == "home/+/BTtoMQTT/#"
    assert open_source("mqtt-raw://broker/home/TheengsGateway/BTtoMQTT/undecoded").topic == (
        "home/TheengsGateway/BTtoMQTT/undecoded"
    )
    assert "p@ss" not in open_source("mqtts-raw://gw:p%40ss@broker/x").name


@pytest.mark.parametrize(
    "url, match",
    [
        ("mqtt-raw:///home/#", "mqtt-raw://user:pass@broker.local"),
        ("mqtt-raw://broker:port/x", "mqtt-raw://user:pass@broker.local"),
        ("mqtt-raw://broker/home/#/x", "'#' may only be the last level"),
        ("mqtt-raw://broker/a?b=c", "mqtt-raw://user:pass@broker.local"),
    ],
)
def test_bad_mqtt_raw_urls(url: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        open_source(url)


def test_unknown_scheme_lists_the_network_sources() -> None:
    with pytest.raises(SourceError, match=r"esphome://.*hass://.*mqtt-raw://"):
        open_source("zigbee://x")

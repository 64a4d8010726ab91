"""OpenMQTTGateway / Theengs Gateway advert JSON over MQTT as a source.

Both gateways publish one JSON object per advertisement on ``home/<gateway>/BTtoMQTT/<MAC without colons>``
(or on ``…/BTtoMQTT/undecoded`` with OMG's external-decoder mode / Theengs' MQTTtoMQTT input):

* ``id``: the MAC ("a4:c1:38:aa:bb:cc" from OMG, upper case from Theengs);
* ``mac_type``: OMG / NimBLE address type (0 public, 1 random, 2/3 identity addresses);
* ``rssi``, ``name``, ``txpower``;
* ``servicedata``: hex of the service data payload *after* the UUID, with ``servicedatauuid`` naming the UUID:
  ``"0xfe95"`` (OMG, NimBLE's UUID text), ``"fe95"`` (Theengs Gateway, ``uuid[4:8]`` of the 128-bit form) or a
  full 128-bit UUID. OMG publishes one message per service-data entry of an advert;
* ``manufacturerdata``: hex of the manufacturer data *including* the little-endian company id;
* decoded fields (``tempc``, ``hum`` …) that mitherm ignores.

Messages without an ``id`` MAC (gateway state, commands, presence) are skipped; a decoded-only message
without ``servicedata`` still yields an Advertisement without service data. The receiver is the gateway
name taken from the topic (the level before ``BTtoMQTT``).

URL forms: ``mqtt-raw://[USER:PASS@]HOST[:PORT]/TOPIC`` and ``mqtts-raw://…`` (TLS); the topic is the URL
path, URL-decoded (``home/+/BTtoMQTT/#`` or ``home%2F%2B%2FBTtoMQTT%2F%23``)."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from ..model import Advertisement
from . import Emit, SourceError
from ._common import hex_or_none, split_source_url
from .hass import uuid16_from_text
from .reconnect import ReconnectingSource, connected

log = logging.getLogger(__name__)

_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}$")
_ADDRESS_TYPES = {0: "public", 1: "random", 2: "public", 3: "random"}
#: MQTT 3.1.1 CONNACK 4/5 and MQTT 5 reason codes 134/135/138/140: credentials or authorisation problems.
_AUTH_CODES = {4, 5, 134, 135, 138, 140}

DEFAULT_TOPIC = "home/+/BTtoMQTT/#"


def _mac(value: Any) -> str | None:
    if not isinstance(value, str) or not _MAC_RE.match(value):
        return None
    h = value.replace(":", "").replace("-", "").upper()
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def receiver_from_topic(topic: str) -> str:
    """'home/OMG_ESP32/BTtoMQTT/A4C138AABBCC' -> 'OMG_ESP32'; without a BTtoMQTT level, the topic's parent."""
    parts = topic.split("/")
    for i, p in enumerate(parts):
        if p.lower() == "bttomqtt" and i > 0:
            return parts[i - 1]
    return "/".join(parts[:-1]) or topic


def advertisement_from_json(
    payload: Mapping[str, Any], receiver: str, now: float | None = None
) -> Advertisement | None:
    """One OMG / Theengs advert JSON object -> Advertisement; None when it is not an advert."""
    mac = _mac(payload.get("id"))
    if mac is None:
        return None
    service_data: dict[int, bytes] = {}
    sd = hex_or_none(payload.get("servicedata"))
    if sd is not None:
        uuid = payload.get("servicedatauuid")
        u16 = uuid16_from_text(uuid) if isinstance(uuid, str) else None
        if u16 is not None:
            service_data[u16] = sd
    manufacturer_data: dict[int, bytes] = {}
    md = hex_or_none(payload.get("manufacturerdata"))
    if md is not None and len(md) >= 2:
        manufacturer_data[md[0] | (md[1] << 8)] = md[2:]
    rssi = payload.get("rssi")
    name = payload.get("name")
    mac_type = payload.get("mac_type")
    return Advertisement(
        mac=mac,
        time=time.time() if now is None else now,
        service_data=service_data,
        rssi=int(rssi) if isinstance(rssi, int | float) and not isinstance(rssi, bool) else None,
        name=name if isinstance(name, str) and name else None,
        address_type=_ADDRESS_TYPES.get(mac_type) if isinstance(mac_type, int) else None,
        manufacturer_data=manufacturer_data,
        source=receiver,
    )


class MqttRawSource(ReconnectingSource):
    """Subscribes to OMG / Theengs advert JSON on an MQTT broker, reconnecting forever."""

    _log = log

    def __init__(
        self,
        host: str,
        port: int = 1883,
        topic: str = DEFAULT_TOPIC,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        name: str | None = None,
        *,
        reconnect_initial: float = 1.0,
        reconnect_maximum: float = 60.0,
    ) -> None:
        if not host:
            raise SourceError("mqtt-raw: needs a broker host, e.g. mqtt-raw://broker.local:1883/home/+/BTtoMQTT/#")
        if not topic or "#" in topic[:-1] or (topic.endswith("#") and len(topic) > 1 and topic[-2] != "/"):
            raise SourceError(
                f"mqtt-raw: {topic!r} is not a valid subscription: '#' may only be the last level, "
                "e.g. home/+/BTtoMQTT/#"
            )
        self.host = host
        self.port = port
        self.topic = topic
        self.username = username or None
        self.password = password or None
        self.tls = tls
        self.name = name or f"mqtt-raw:{host}:{port}/{topic}"
        self._label = f"mqtt-raw {host}:{port}"
        self.reconnect_initial = reconnect_initial
        self.reconnect_maximum = reconnect_maximum

    def _secrets(self) -> tuple[str, ...]:
        return (self.password or "",)

    async def _connect_once(self, emit: Emit) -> None:
        import aiomqtt
        from aiomqtt.exceptions import MqttCodeError, MqttConnectError

        tls_params = aiomqtt.TLSParameters() if self.tls else None
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=f"mitherm-raw-{secrets.token_hex(4)}",
            tls_params=tls_params,
            keepalive=30,
            timeout=15,
        )
        try:
            async with client:
                try:
                    granted = await client.subscribe(self.topic, qos=0)
                except ValueError as e:
                    raise SourceError(f"mqtt-raw: the broker cannot subscribe to {self.topic!r}: {e}") from e
                if any(int(getattr(g, "value", g)) >= 0x80 for g in granted):
                    raise SourceError(
                        f"the MQTT broker refused the subscription to {self.topic!r} (check the user's ACL)"
                    )
                connected()
                async for message in client.messages:
                    self._handle(str(message.topic), message.payload, emit)
        except MqttCodeError as e:
            rc = getattr(e.rc, "value", e.rc)
            if isinstance(e, MqttConnectError) and rc in _AUTH_CODES:
                raise SourceError(
                    f"the MQTT broker {self.host}:{self.port} refused the login ({e}): check the user name and "
                    "password in the mqtt-raw:// URL"
                ) from None
            raise
        raise ConnectionError("the broker closed the connection")

    def _handle(self, topic: str, payload: Any, emit: Emit) -> None:
        if not isinstance(payload, bytes | bytearray) or not payload.lstrip().startswith(b"{"):
            return
        try:
            data = json.loads(payload)
        except ValueError:
            log.debug("mqtt-raw: not JSON on %s", topic)
            return
        if isinstance(data, dict) and (adv := advertisement_from_json(data, receiver_from_topic(topic))):
            emit(adv)


def mqtt_raw_from_url(url: str, name: str | None = None) -> MqttRawSource:
    """``mqtt-raw://[USER:PASS@]HOST[:PORT]/TOPIC`` / ``mqtts-raw://…`` (TLS); the topic URL-decoded."""
    from urllib.parse import unquote

    example = "mqtt-raw://user:pass@broker.local:1883/home/+/BTtoMQTT/# (mqtts-raw:// for TLS)"
    parts, port = split_source_url(url, "bad MQTT source", example)
    scheme = parts.scheme.lower()
    port = port or (8883 if scheme == "mqtts-raw" else 1883)
    if scheme not in ("mqtt-raw", "mqtts-raw") or not parts.hostname or parts.query:
        raise SourceError(f"bad MQTT source; use {example}")
    topic = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "#" in url.split("://", 1)[-1]:  # an unencoded '#' is the URL fragment: it belongs to the topic
        topic += "#" + parts.fragment
    topic = unquote(topic) or DEFAULT_TOPIC
    return MqttRawSource(
        parts.hostname,
        port,
        topic,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=scheme == "mqtts-raw",
        name=name,
    )

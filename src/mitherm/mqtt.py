"""MQTT publisher with Home Assistant discovery.

Topics (``<base>`` = ``mitherm``, ``<id>`` = MAC without colons, lower case)::

    <base>/<gateway_id>/status                       online / offline (retained, last will offline)
    <base>/<id>/state                                JSON state (retained)
    <base>/<id>/availability                         online / offline (retained; the pipeline decides)
    <prefix>/sensor/mitherm_<id>/<quantity>/config   HA discovery (retained, byte-stable)

Delivery: every message is a retained "newest value of a topic". Messages wait in a per-topic
outbox (newest replaces older), mirrored to a small SQLite file while the broker is unreachable, so a
broker outage (or a gateway restart during one) loses nothing and sends each topic's newest value
once when the broker is back. The file is written in batches (see ``OUTBOX_FLUSH_INTERVAL``: a kill -9
during an outage loses at most the last half second of updates). Sending is pipelined: up to
``SEND_WINDOW`` QoS 1 publishes wait for their acknowledgement at once, issued in priority order
(discovery, availability, states) and, per topic, oldest first."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import re
import secrets
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt

from . import __version__
from .catalogue import by_product_id
from .mac import normalize_mac
from .paths import data_dir
from .state import DeviceState

__all__ = [
    "SENSORS",
    "MqttPublisher",
    "MqttSettings",
    "Sensor",
    "discovery_messages",
    "expire_after_for",
    "node_id",
    "state_payload",
]

log = logging.getLogger(__name__)

_ID_BAD = re.compile(r"[^a-zA-Z0-9_-]")
#: expire_after values used (seconds); a device's value is the smallest that covers 3 × its interval.
EXPIRE_BUCKETS = (300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400)
#: expire_after for a device whose data interval is not known yet (stock sensors report every ~10 min).
EXPIRE_UNKNOWN = 1800


# -- settings -------------------------------------------------------------------------------------------


def _sanitize_id(text: str) -> str:
    s = _ID_BAD.sub("_", text.strip()).strip("_")
    return s or "gateway"


def _default_gateway_id() -> str:
    return _sanitize_id(socket.gethostname().split(".")[0].lower())


@dataclass(slots=True)
class MqttSettings:
    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None  # CA bundle for TLS (default: system store)
    insecure: bool = False  # TLS without certificate / host name checks
    base_topic: str = "mitherm"
    discovery_prefix: str = "homeassistant"
    #: names this gateway in its status topic; stable across restarts (default: host name)
    gateway_id: str = field(default_factory=_default_gateway_id)
    #: unique per process (two gateways sharing a broker must never collide)
    client_id: str = ""
    #: seconds between two state publishes of one device (newer states are held back, never dropped)
    min_interval: float = 30.0
    #: publish devices without a key or user-given name (neighbours' sensors); off by default
    publish_unknown: bool = False
    #: an unchanged state (same values) is re-published at most every max(min_interval, expire/3) s
    refresh_unchanged: bool = True
    retain_state: bool = True
    discovery: bool = True
    qos: int = 1
    keepalive: int = 30
    reconnect_initial: float = 1.0
    reconnect_max: float = 60.0
    #: outbox file used while the broker is unreachable (default: data dir, one per gateway_id)
    outbox_path: Path | None = None
    #: at most this many topics wait in the outbox (oldest states dropped first beyond it)
    outbox_max: int = 10_000

    def __post_init__(self) -> None:
        self.gateway_id = _sanitize_id(self.gateway_id)
        if not self.client_id:
            self.client_id = f"mitherm-{self.gateway_id}-{secrets.token_hex(3)}"
        self.base_topic = self.base_topic.strip("/")
        self.discovery_prefix = self.discovery_prefix.strip("/")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MqttSettings:
        """``mqtt://[USER[:PASS]@]HOST[:PORT]`` or ``mqtts://…`` (TLS) with options ``?ca=PATH``,
        ``insecure=1``, ``client_id=``, ``gateway_id=``, ``base_topic=``, ``discovery_prefix=``,
        ``min_interval=``, ``publish_unknown=1``. Keyword overrides win over the URL."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"MQTT URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"MQTT URL {url!r} has no host")
        kw: dict[str, Any] = {
            "host": parts.hostname,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
            "tls": parts.scheme in ("mqtts", "ssl"),
        }
        flags = {"1", "true", "yes", "on"}
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            v = values[-1]
            if key == "ca":
                kw["ca"] = v
                kw["tls"] = True
            elif key == "insecure":
                kw["insecure"] = v.lower() in flags
            elif key == "publish_unknown":
                kw["publish_unknown"] = v.lower() in flags
            elif key == "min_interval":
                kw["min_interval"] = float(v)
            elif key in ("client_id", "gateway_id", "base_topic", "discovery_prefix"):
                kw[key] = v
            else:
                raise ValueError(f"MQTT URL {url!r}: unknown option {key!r}")
        try:
            kw["port"] = parts.port or (8883 if kw["tls"] else 1883)
        except ValueError as e:
            raise ValueError(f"MQTT URL {url!r}: {e}") from None
        kw.update(overrides)
        return cls(**kw)

    @property
    def gateway_status_topic(self) -> str:
        return f"{self.base_topic}/{self.gateway_id}/status"

    @property
    def ha_status_topic(self) -> str:
        return f"{self.discovery_prefix}/status"

    def device_topic(self, mac: str, leaf: str) -> str:
        return f"{self.base_topic}/{mac_id(mac)}/{leaf}"

    def display(self) -> str:
        """The broker address without the password, for log lines."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


# -- discovery (pure) -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sensor:
    name: str
    device_class: str | None
    unit: str | None
    precision: int | None = None
    diagnostic: bool = False
    enabled_by_default: bool = True
    icon: str | None = None


#: The quantities that become HA sensors (any other value is in the state JSON but not discovered).
SENSORS: dict[str, Sensor] = {
    "temperature_c": Sensor("Temperature", "temperature", "°C", 1),
    "humidity_pct": Sensor("Humidity", "humidity", "%", 1),
    "battery_pct": Sensor("Battery", "battery", "%", 0),
    "voltage_v": Sensor("Battery voltage", "voltage", "V", 3, diagnostic=True),
    "moisture_pct": Sensor("Moisture", "moisture", "%", 0),
    "conductivity_us_cm": Sensor("Conductivity", "conductivity", "µS/cm", 0),
    "illuminance_lx": Sensor("Illuminance", "illuminance", "lx", 0),
    "pressure_hpa": Sensor("Pressure", "atmospheric_pressure", "hPa", 1),
    "dew_point_c": Sensor("Dew point", "temperature", "°C", 1),
    "co2_ppm": Sensor("Carbon dioxide", "carbon_dioxide", "ppm", 0),
    "pm25_ug_m3": Sensor("PM2.5", "pm25", "µg/m³", 0),
    "pm10_ug_m3": Sensor("PM10", "pm10", "µg/m³", 0),
    "rssi": Sensor("Signal strength", "signal_strength", "dBm", 0, diagnostic=True, enabled_by_default=False),
}


def mac_id(mac: str) -> str:
    """``a4c138123456`` for any spelling of A4:C1:38:12:34:56."""
    return normalize_mac(mac).replace(":", "").lower()


def node_id(mac: str) -> str:
    return f"mitherm_{mac_id(mac)}"


def expire_after_for(interval: float | None, previous: int | None = None) -> int:
    """A stable ``expire_after`` for a device reporting every ``interval`` seconds: the smallest bucket
    covering max(3 × interval, 300). With ``previous`` (the value in use) a small change of the measured
    interval keeps it (hysteresis), so the discovery payload does not flap at a bucket boundary."""
    if interval is None or not math.isfinite(interval) or interval <= 0:
        return previous if previous is not None else EXPIRE_UNKNOWN
    need = max(3.0 * interval, 300.0)
    if previous is not None and need <= previous < 2.5 * need:
        return previous
    for bucket in EXPIRE_BUCKETS:
        if bucket >= need:
            return bucket
    return int(math.ceil(need / 86400.0) * 86400)


def _device_name(state: DeviceState) -> str:
    if state.name:
        return state.name
    return f"{state.model or 'BLE sensor'} {mac_id(state.mac)[6:]}"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def discovered_quantities(state: DeviceState) -> list[str]:
    """The quantities of ``state`` that get an HA entity, in a stable order."""
    out = [q for q in SENSORS if q != "rssi" and _is_number(state.values.get(q))]
    if state.rssi is not None:
        out.append("rssi")
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def discovery_messages(
    state: DeviceState, settings: MqttSettings, expire_after: int | None = None
) -> list[tuple[str, bytes]]:
    """The retained HA discovery configs for one device: ``[(topic, payload), …]``, one per quantity it
    reports. Pure and byte-stable: the same state facts give the same bytes (no timestamps, sorted keys,
    nothing from the client id). ``expire_after`` overrides the value derived from
    ``state.data_interval``."""
    node = node_id(state.mac)
    mac = normalize_mac(state.mac)
    expire = expire_after if expire_after is not None else expire_after_for(state.data_interval)
    device: dict[str, Any] = {
        "connections": [["bluetooth", mac]],
        "identifiers": [node],
        "name": _device_name(state),
    }
    info = by_product_id(state.product_id) if state.product_id is not None else None
    if info is not None:
        device["manufacturer"] = info.manufacturer
    if state.model or info is not None:
        device["model"] = state.model or info.model  # type: ignore[union-attr]
    if state.format:
        device["sw_version"] = state.format
    availability = [
        {"topic": settings.gateway_status_topic},
        {"topic": settings.device_topic(mac, "availability")},
    ]
    messages = []
    for quantity in discovered_quantities(state):
        sensor = SENSORS[quantity]
        config: dict[str, Any] = {
            "availability": availability,
            "availability_mode": "all",
            "device": device,
            "expire_after": expire,
            "name": sensor.name,
            "origin": {"name": "mitherm", "sw_version": __version__},
            "state_class": "measurement",
            "state_topic": settings.device_topic(mac, "state"),
            "unique_id": f"{node}_{quantity}",
            "value_template": f"{{{{ value_json.{quantity} }}}}",
        }
        if sensor.device_class:
            config["device_class"] = sensor.device_class
        if sensor.unit:
            config["unit_of_measurement"] = sensor.unit
        if sensor.precision is not None:
            config["suggested_display_precision"] = sensor.precision
        if sensor.diagnostic:
            config["entity_category"] = "diagnostic"
        if not sensor.enabled_by_default:
            config["enabled_by_default"] = False
        topic = f"{settings.discovery_prefix}/sensor/{node}/{_sanitize_id(quantity)}/config"
        messages.append((topic, _dumps(config)))
    return messages


def state_payload(state: DeviceState) -> bytes:
    """The JSON published on ``<base>/<id>/state``: the latest values at the top level plus ``rssi``,
    ``receiver``, ``last_seen`` (ISO 8601 UTC), ``key_status`` (and ``key_verdict`` when the key fails)."""
    obj: dict[str, Any] = {}
    for k, v in state.values.items():
        if isinstance(v, float) and not math.isfinite(v):
            continue
        obj[k] = v
    obj["rssi"] = state.rssi
    obj["receiver"] = state.receiver
    obj["last_seen"] = (
        datetime.fromtimestamp(state.last_seen, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        if state.last_seen
        else None
    )
    obj["key_status"] = state.key_status
    if state.key_verdict:
        obj["key_verdict"] = state.key_verdict
    return _dumps(obj)


def _significant(state: DeviceState) -> tuple[object, ...]:
    """What makes a state a change: the values and key status, not last_seen / rssi / receiver."""
    return (tuple(state.values.items()), state.key_status, state.key_verdict)


# -- outbox ---------------------------------------------------------------------------------------------

_PRIO_DISCOVERY, _PRIO_AVAILABILITY, _PRIO_STATE = 1, 2, 3  # send order within a batch

#: While the broker is unreachable, queued messages reach the outbox file in one transaction at most this many
#: seconds after they were queued (or as soon as OUTBOX_FLUSH_TOPICS topics wait to be written), and always when
#: the connection drops and on stop. A crash (kill -9) while the broker is unreachable therefore loses at most
#: the messages queued in the last OUTBOX_FLUSH_INTERVAL seconds; a topic that already had a row keeps its
#: older value, which is what the next run delivers.
OUTBOX_FLUSH_INTERVAL = 0.5
OUTBOX_FLUSH_TOPICS = 1000
#: QoS 1 publishes awaiting their acknowledgement at once (paho's default max_inflight_messages is 20). They are
#: issued in send order on the one connection (the next as soon as one is acknowledged), so the broker receives
#: them in that order; a topic has at most one message in flight.
SEND_WINDOW = 20
#: seconds without an acknowledgement while publishes wait for one before the connection is considered broken
PUBLISH_TIMEOUT = 10.0


@dataclass(slots=True, eq=False)
class _Msg:
    topic: str
    payload: bytes
    retain: bool
    prio: int
    due: float = 0.0  # by the publisher's clock
    mac: str | None = None
    signature: object = None  # state messages: see _significant (set when the payload is built)
    on_disk: bool = False  # the outbox row of this topic holds this message's current payload
    seq: int = 0
    #: a state message's payload is built from the device state only when it is sent or stored (most states
    #: are replaced by a newer one before their rate-limit window ends, so most are never serialised)
    state: DeviceState | None = None
    sending: bool = False  # published, not acknowledged yet: a newer state gets a new message

    def materialize(self) -> bytes:
        st = self.state
        if st is not None:
            self.payload = state_payload(st)
            self.signature = _significant(st)
            self.state = None
        return self.payload


def _send_order(m: _Msg) -> tuple[int, int]:
    return (m.prio, m.seq)


def _seq_of(m: _Msg) -> int:
    return m.seq


@dataclass(slots=True, eq=False)
class _Device:
    """What the publisher keeps per device (by normalised MAC)."""

    mac: str
    state_topic: str
    availability_topic: str
    #: expire_after in use (None: not derived yet, e.g. with discovery off)
    expire: int | None = None
    #: the state facts the announced discovery payloads were built from (disc_keys None: never built)
    disc_name: str | None = None
    disc_model: str | None = None
    disc_format: str | None = None
    disc_product_id: int | None = None
    disc_no_rssi: bool = False
    disc_keys: tuple[str, ...] | None = None
    discovery: dict[str, bytes] = field(default_factory=dict)  # topic -> payload announced
    available: bool | None = None
    last_pub: float | None = None  # publisher-clock time of the last state publish
    last_sig: object = None  # _significant of the last state published


class _Outbox:
    """The on-disk copy of the messages waiting while the broker is unreachable: one row per topic,
    newest payload wins, at most ``limit`` rows (the oldest state rows go first)."""

    def __init__(self, path: Path, limit: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.limit = limit
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, "
            "retain INTEGER NOT NULL, prio INTEGER NOT NULL, seq INTEGER NOT NULL)"
        )
        row = self._db.execute("SELECT max(seq) FROM outbox").fetchone()
        self._seq = row[0] or 0

    def put(self, msgs: list[_Msg]) -> None:
        """Write ``msgs`` (in this order) in one transaction."""
        if not msgs:
            return
        rows = []
        seq = self._seq
        for m in msgs:
            seq += 1
            rows.append((m.topic, m.materialize(), int(m.retain), m.prio, seq))
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO outbox (topic, payload, retain, prio, seq) VALUES (?, ?, ?, ?, ?) ON CONFLICT (topic) "
                "DO UPDATE SET payload = excluded.payload, retain = excluded.retain, prio = excluded.prio, "
                "seq = excluded.seq",
                rows,
            )
            excess = db.execute("SELECT count(*) FROM outbox").fetchone()[0] - self.limit
            if excess > 0:
                log.warning("mqtt: outbox full (%d topics): dropping the %d oldest", self.limit, excess)
                db.execute(
                    "DELETE FROM outbox WHERE topic IN (SELECT topic FROM outbox ORDER BY prio DESC, seq LIMIT ?)",
                    (excess,),
                )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._seq = seq
        for m in msgs:
            m.on_disk = True

    def delete_topics(self, topics: list[str]) -> None:
        """Remove the rows of ``topics`` (delivered) in one transaction."""
        if not topics:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("DELETE FROM outbox WHERE topic = ?", [(t,) for t in topics])
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def load(self) -> list[_Msg]:
        rows = self._db.execute("SELECT topic, payload, retain, prio, seq FROM outbox ORDER BY seq").fetchall()
        return [_Msg(t, bytes(p), bool(r), prio, 0.0, on_disk=True, seq=s) for t, p, r, prio, s in rows]

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        self._db.close()


# -- publisher ------------------------------------------------------------------------------------------


class MqttPublisher:
    """Publishes device states and HA discovery; survives broker outages.

    Use::

        pub = MqttPublisher(settings)
        task = asyncio.create_task(pub.run())
        pub.publish_state(state)            # non-blocking, from the pipeline
        pub.set_available(mac, False)       # the pipeline decides when a device is gone
        await pub.stop()                    # flushes held-back states, publishes offline, disconnects
    """

    def __init__(self, settings: MqttSettings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        #: the clock rate limits are judged by: wall time by default; the gateway passes the advertisements'
        #: clock so that a replayed capture is rate-limited as it happened
        self._clock: Callable[[], float] = clock or time.monotonic
        self._capture_clock = clock is not None
        self._sender_deadline: float | None = None  # when the sender wakes up next (None: idle)
        path = settings.outbox_path or data_dir() / f"mqtt-outbox-{settings.gateway_id}.sqlite3"
        self._outbox = _Outbox(Path(path), settings.outbox_max)
        self._due: dict[str, _Msg] = {m.topic: m for m in self._outbox.load()}  # topic -> newest waiting
        self._seq = max((m.seq for m in self._due.values()), default=0)
        #: (due, tiebreak, msg) of the waiting messages; entries of replaced / sent / rescheduled messages are
        #: skipped when they come up (see _valid)
        self._heap: list[tuple[float, int, _Msg]] = []
        self._tiebreak = itertools.count()
        self._devices: dict[str, _Device] = {}  # normalised MAC -> device
        self._lookup: dict[str, _Device] = {}  # any MAC spelling seen -> device
        self._disk_topics: set[str] = set(self._due)  # topics with an outbox row
        self._dirty: dict[str, _Msg] = {}  # queued while disconnected, not written to the outbox yet
        self._dirty_since = 0.0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._delivered_on_disk: list[str] = []  # acknowledged topics whose outbox rows are to be deleted
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._online = False  # mirrors _connected (checked for every message queued)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._run_task: asyncio.Task[Any] | None = None
        self._closed = False
        self.published = 0  # messages acknowledged by the broker (for tests and health)
        if self._due:
            log.info("mqtt: %d messages waiting in %s from a previous run", len(self._due), self._outbox.path)

    # -- pipeline API ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def backlog(self) -> int:
        """Messages not yet acknowledged by the broker (held-back states included)."""
        return len(self._due)

    def wants(self, state: DeviceState) -> bool:
        return state.known or self.settings.publish_unknown

    def _device(self, mac: str) -> _Device:
        """The record of ``mac`` (any spelling), created when first seen."""
        dev = self._lookup.get(mac)
        if dev is None:
            norm = normalize_mac(mac)
            dev = self._devices.get(norm)
            if dev is None:
                s = self.settings
                dev = _Device(norm, s.device_topic(norm, "state"), s.device_topic(norm, "availability"))
                self._devices[norm] = dev
            self._lookup[mac] = self._lookup[norm] = dev
        return dev

    def publish_state(self, state: DeviceState) -> None:
        """Queue a device's state. The first state of a device and any changed state go out at once,
        unless the device published less than ``min_interval`` ago: then it is held back and published
        when the interval ends (a newer state replaces a held-back one; the newest is never dropped).
        Announces the device (discovery, availability ``online``) when first seen or when its
        discovery changes (a new quantity, a new expire_after bucket, a rename)."""
        s = self.settings
        if not (state.known or s.publish_unknown):
            return
        dev = self._lookup.get(state.mac)
        if dev is None:
            dev = self._device(state.mac)
        now = self._clock()
        if s.discovery:
            # expire_after_for(interval, dev.expire), skipping the call when the value in use is kept
            expire = dev.expire
            interval = state.data_interval
            if expire is not None and interval is not None and interval > 0.0:
                need = 3.0 * interval
                if need < 300.0:
                    need = 300.0
                if not need <= expire < 2.5 * need:
                    expire = expire_after_for(interval, expire)
            elif expire is None or interval is not None:
                expire = expire_after_for(interval, expire)
            # build the payloads only when what they depend on changed
            keys = tuple(state.values)
            if (
                expire != dev.expire
                or state.name != dev.disc_name
                or state.model != dev.disc_model
                or state.format != dev.disc_format
                or state.product_id != dev.disc_product_id
                or (state.rssi is None) is not dev.disc_no_rssi
                or keys != dev.disc_keys
            ):
                self._announce(dev, state, expire, keys, now)
        if not dev.available:
            # first state, or a state after the pipeline marked it unavailable: the device is alive
            self._set_available(dev, True, now)
        topic = dev.state_topic
        held = self._due.get(topic)
        if held is not None and held.sending:
            held = None  # being published: a newer state is a new message, rate-limited from that publish
        last = dev.last_pub
        if last is None:
            due = now
        else:
            due = last + s.min_interval
            if due < now:
                due = now
            # An unchanged state waits longer (refresh); a held-back message due no later than `due` decides
            # alone (a newer state never delays one already scheduled), so the comparison is mostly skipped.
            if (held is None or held.due > due) and s.refresh_unchanged and _significant(state) == dev.last_sig:
                exp = dev.expire
                due = last + max(s.min_interval, (exp if exp is not None else EXPIRE_UNKNOWN) / 3.0)
                if due < now:
                    due = now
        if held is None:
            self._enqueue(_Msg(topic, b"", s.retain_state, _PRIO_STATE, due, dev.mac, state=state))
            return
        if held.prio != _PRIO_STATE:  # e.g. forget_device's empty payload
            self._enqueue(_Msg(topic, b"", s.retain_state, _PRIO_STATE, min(due, held.due), dev.mac, state=state))
            return
        # the held-back message of the device takes the newer state in place
        held.state = state
        held.on_disk = False
        if held.mac is None:  # loaded from the outbox
            held.mac = dev.mac
            held.retain = s.retain_state
        self._seq = held.seq = self._seq + 1
        if due < held.due:
            held.due = due
            self._schedule(held)
        if not self._online:
            self._mark_dirty(held)

    def _announce(self, dev: _Device, state: DeviceState, expire: int, keys: tuple[str, ...], now: float) -> None:
        dev.expire = expire
        dev.disc_keys = keys
        dev.disc_name = state.name
        dev.disc_model = state.model
        dev.disc_format = state.format
        dev.disc_product_id = state.product_id
        dev.disc_no_rssi = state.rssi is None
        announced = dev.discovery
        for topic, payload in discovery_messages(state, self.settings, expire):
            if announced.get(topic) != payload:
                announced[topic] = payload
                self._enqueue(_Msg(topic, payload, True, _PRIO_DISCOVERY, now, dev.mac))

    def set_available(self, mac: str, available: bool) -> None:
        """Publish a device's availability (``online``/``offline``, retained). HA shows the device's
        entities unavailable while it is offline. The next ``publish_state`` of the device marks it
        online again."""
        dev = self._device(mac)
        if dev.available is available:
            return
        self._set_available(dev, available, self._clock())

    def forget_device(self, mac: str) -> None:
        """Remove a device from HA and the broker: empty retained payloads on its discovery, state and
        availability topics."""
        mac = normalize_mac(mac)
        now = self._clock()
        dev = self._devices.pop(mac, None)
        topics = []
        if dev is not None:
            self._lookup = {k: d for k, d in self._lookup.items() if d is not dev}
            topics += dev.discovery
        topics += [self.settings.device_topic(mac, "state"), self.settings.device_topic(mac, "availability")]
        for topic in topics:
            self._enqueue(_Msg(topic, b"", True, _PRIO_DISCOVERY, now, mac))

    def announce_all(self) -> None:
        """Queue discovery and availability of every device seen (done on each connection and when HA
        sends its birth message)."""
        now = self._clock()
        for dev in self._devices.values():
            for topic, payload in dev.discovery.items():
                self._enqueue(_Msg(topic, payload, True, _PRIO_DISCOVERY, now, dev.mac), replace_newer=False)
        for dev in self._devices.values():
            if dev.available is not None:
                self._enqueue(
                    _Msg(
                        dev.availability_topic,
                        b"online" if dev.available else b"offline",
                        True,
                        _PRIO_AVAILABILITY,
                        now,
                        dev.mac,
                    ),
                    replace_newer=False,
                )

    def _set_available(self, dev: _Device, available: bool, now: float) -> None:
        dev.available = available
        payload = b"online" if available else b"offline"
        self._enqueue(_Msg(dev.availability_topic, payload, True, _PRIO_AVAILABILITY, now, dev.mac))

    def _enqueue(self, msg: _Msg, replace_newer: bool = True) -> None:
        if not replace_newer and msg.topic in self._due:
            return  # something newer for this topic is already waiting
        self._seq += 1
        msg.seq = self._seq
        self._due[msg.topic] = msg
        self._schedule(msg)
        if not self._online:
            self._mark_dirty(msg)

    def _schedule(self, msg: _Msg) -> None:
        """Make the sender see ``msg`` at ``msg.due`` (a new message, or one that is due earlier now)."""
        heap = self._heap
        heapq.heappush(heap, (msg.due, next(self._tiebreak), msg))
        if len(heap) > 4 * len(self._due) + 1024:  # many stale entries (a long outage): drop them
            self._rebuild_schedule()
        deadline = self._sender_deadline
        if deadline is None or msg.due < deadline:
            self._sender_deadline = msg.due
            self._wake.set()  # the sender sleeps until `deadline`: wake it only for something due earlier

    def _rebuild_schedule(self) -> None:
        tb = self._tiebreak
        self._heap = [(m.due, next(tb), m) for m in self._due.values()]
        heapq.heapify(self._heap)

    def _valid(self, entry: tuple[float, int, _Msg]) -> bool:
        m = entry[2]
        return self._due.get(m.topic) is m and m.due == entry[0] and not m.sending

    # -- outbox ----------------------------------------------------------------------------------------

    def _mark_dirty(self, msg: _Msg) -> None:
        """``msg`` was queued (or updated) while the broker is unreachable: write it to the outbox soon."""
        dirty = self._dirty
        dirty[msg.topic] = msg
        if self._flush_handle is None:
            self._dirty_since = time.monotonic()
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop to flush later: write now
                self._flush_outbox()
                return
            self._flush_handle = loop.call_later(OUTBOX_FLUSH_INTERVAL, self._flush_outbox)
        elif len(dirty) >= OUTBOX_FLUSH_TOPICS or time.monotonic() - self._dirty_since >= OUTBOX_FLUSH_INTERVAL:
            self._flush_outbox()  # also when the event loop is too busy to run the timer

    def _flush_outbox(self) -> None:
        """Write the messages queued while disconnected that still wait (one transaction)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        due = self._due
        waiting = [m for m in self._dirty.values() if due.get(m.topic) is m and not m.on_disk]
        self._dirty.clear()
        waiting.sort(key=_seq_of)
        self._write_outbox(waiting)

    def _persist(self) -> None:
        """Copy every waiting message to disk (the broker went away, or stop)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._dirty.clear()
        waiting = sorted((m for m in self._due.values() if not m.on_disk), key=_seq_of)
        self._write_outbox(waiting)

    def _write_outbox(self, msgs: list[_Msg]) -> None:
        if self._closed:
            return
        try:
            self._delete_delivered()  # first: a row written below must not be deleted afterwards
            if msgs:
                self._outbox.put(msgs)
                self._disk_topics.update(m.topic for m in msgs)
        except sqlite3.Error as e:  # the in-memory copy still gets sent
            log.warning("mqtt: cannot write the outbox %s: %s", self._outbox.path, e)

    def _delete_delivered(self) -> None:
        """Delete the outbox rows of delivered topics (one transaction)."""
        topics = self._delivered_on_disk
        if topics and not self._closed:
            self._delivered_on_disk = []
            self._outbox.delete_topics(topics)

    def _delete_delivered_logged(self) -> None:
        try:
            self._delete_delivered()
        except sqlite3.Error as e:  # at worst a delivered message is sent once more by the next run
            log.warning("mqtt: cannot update the outbox %s: %s", self._outbox.path, e)

    # -- connection ------------------------------------------------------------------------------------

    def _client_args(self) -> dict[str, Any]:
        s = self.settings
        tls_context = None
        if s.tls:
            tls_context = ssl.create_default_context(cafile=s.ca)
            if s.insecure:
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        return {
            "hostname": s.host,
            "port": s.port,
            "username": s.username,
            "password": s.password,
            "identifier": s.client_id,
            "keepalive": s.keepalive,
            "timeout": 10.0,
            "tls_context": tls_context,
            "will": aiomqtt.Will(s.gateway_status_topic, b"offline", qos=1, retain=True),
            "logger": logging.getLogger(f"{__name__}.client"),
        }

    async def run(self) -> None:
        """Connect, publish, and reconnect with exponential backoff until :meth:`stop`."""
        if self._running:
            raise RuntimeError("MqttPublisher.run() is already running")
        self._running = True
        self._run_task = asyncio.current_task()
        s = self.settings
        delay = s.reconnect_initial
        outage_since: float | None = None
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    async with aiomqtt.Client(**self._client_args()) as client:
                        self._client = client
                        if outage_since is not None:
                            log.warning(
                                "mqtt: connected to %s again after %.0f s; sending %d waiting messages",
                                s.display(),
                                time.monotonic() - outage_since,
                                len(self._due),
                            )
                        else:
                            log.info("mqtt: connected to %s as %s", s.display(), s.client_id)
                        outage_since, failures, delay = None, 0, s.reconnect_initial
                        await self._session(client)
                        return  # stop() asked: clean disconnect when leaving the context
                except aiomqtt.MqttError as e:
                    if self._stopping.is_set():
                        break
                    failures += 1
                    if outage_since is None:
                        outage_since = time.monotonic()
                    # One warning per outage, then one per minute at most (the backoff caps the rate).
                    level = logging.WARNING if failures == 1 or delay >= s.reconnect_max else logging.INFO
                    log.log(
                        level,
                        "mqtt: broker %s unreachable (%s); retrying in %.1f s (%d messages waiting)",
                        s.display(),
                        e,
                        delay,
                        len(self._due),
                    )
                finally:
                    self._client = None
                    if self._connected.is_set():
                        self._connected.clear()
                        self._online = False
                        self._persist()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                delay = min(delay * 2, s.reconnect_max)
        finally:
            self._running = False
            self._finished.set()

    async def _session(self, client: aiomqtt.Client) -> None:
        s = self.settings
        # a window of pipelined publishes is expected, not a sign of trouble
        client.pending_calls_threshold = max(client.pending_calls_threshold, 2 * SEND_WINDOW)
        await client.publish(s.gateway_status_topic, b"online", qos=1, retain=True)
        await client.subscribe(s.ha_status_topic, qos=1)
        self._connected.set()
        self._online = True
        self.announce_all()  # the broker may have lost its retained messages
        self._rebuild_schedule()
        sender = asyncio.create_task(self._sender(client), name="mitherm-mqtt-sender")
        listener = asyncio.create_task(self._listener(client), name="mitherm-mqtt-listener")
        try:
            done, _ = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if not self._stopping.is_set():
                raise aiomqtt.MqttError("the MQTT session ended unexpectedly")
        finally:
            for t in (sender, listener):
                t.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
        # the sender returns after stop() once it has sent everything (held-back states included)
        await client.publish(s.gateway_status_topic, b"offline", qos=1, retain=True, timeout=10.0)

    async def _listener(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if message.topic.matches(self.settings.ha_status_topic) and message.payload in (b"online", "online"):
                log.info("mqtt: Home Assistant is online: announcing %d devices", len(self._devices))
                self.announce_all()

    async def _sender(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            if self._stopping.is_set():
                await self._send_due(client, flush_all=True)
                return
            next_due = await self._send_due(client)
            self._sender_deadline = next_due
            timeout = None if next_due is None else max(0.0, next_due - self._clock())
            if timeout is not None and self._capture_clock:
                timeout = min(timeout, 0.25)  # the capture clock may run faster than the wall clock
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _send_due(self, client: aiomqtt.Client, flush_all: bool = False) -> float | None:
        """Publish the messages that are due (discovery, then availability, then states; each in queue
        order); return the time of the next one by the publisher's clock (or None)."""
        now = self._clock()
        heap = self._heap
        if flush_all:
            ready = [m for m in self._due.values() if not m.sending]
        else:
            ready = []
            valid = self._valid
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)
                if valid(entry):
                    ready.append(entry[2])
        if ready:
            ready.sort(key=_send_order)
            await self._publish(client, ready, now)
        if flush_all:
            self._rebuild_schedule()
        heap = self._heap
        while heap and not self._valid(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    async def _publish(self, client: aiomqtt.Client, ready: list[_Msg], now: float) -> None:
        """Publish ``ready`` in this order with up to SEND_WINDOW unacknowledged QoS 1 publishes in flight (a
        sliding window: a new one goes out as soon as one is acknowledged; the broker receives them in order).
        A message replaced meanwhile is skipped: its replacement is scheduled on its own."""
        qos = self.settings.qos
        due = self._due
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(SEND_WINDOW)
        inflight: dict[asyncio.Task[None], _Msg] = {}
        failures: list[Exception] = []

        async def one(m: _Msg, payload: bytes) -> None:
            try:
                # no per-call timeout (it costs a task per message in Python 3.11): see `deadline` below
                await client.publish(m.topic, payload, qos=qos, retain=m.retain, timeout=math.inf)
            except Exception as e:
                failures.append(e)
            else:
                self._delivered(m)
            finally:
                m.sending = False
                slots.release()

        try:
            # the connection is broken when no publish is acknowledged within PUBLISH_TIMEOUT
            async with asyncio.timeout(None) as deadline:
                for m in ready:
                    if due.get(m.topic) is not m or m.sending:
                        continue
                    if slots.locked():
                        deadline.reschedule(loop.time() + PUBLISH_TIMEOUT)
                        await slots.acquire()
                        deadline.reschedule(None)
                    else:
                        await slots.acquire()  # does not suspend
                    if failures:
                        break
                    if len(self._delivered_on_disk) >= OUTBOX_FLUSH_TOPICS:  # a long backlog: keep the file small
                        self._delete_delivered_logged()
                    if due.get(m.topic) is not m:  # replaced while waiting for a slot
                        slots.release()
                        continue
                    m.sending = True
                    task = loop.create_task(one(m, m.materialize()))
                    inflight[task] = m
                    if m.prio == _PRIO_STATE and m.mac is not None:
                        # the rate limit counts from here (a state queued while this one is in flight waits)
                        dev = self._devices.get(m.mac)
                        if dev is not None:
                            dev.last_pub = now
                            if m.signature is not None:
                                dev.last_sig = m.signature
                    task.add_done_callback(inflight.pop)
                if inflight and not failures:
                    deadline.reschedule(loop.time() + PUBLISH_TIMEOUT)
                    await asyncio.wait(list(inflight))
        except TimeoutError:
            raise aiomqtt.MqttError(f"no acknowledgement from the broker within {PUBLISH_TIMEOUT:.0f} s") from None
        finally:
            for task, m in list(inflight.items()):
                task.cancel()
                m.sending = False
            self._delete_delivered_logged()
        if failures:
            raise failures[0]

    def _delivered(self, m: _Msg) -> None:
        """The broker acknowledged ``m``."""
        self.published += 1
        topic = m.topic
        due = self._due
        current = due.get(topic)
        if current is m:
            del due[topic]
            current = None
        if topic in self._disk_topics and (current is None or not current.on_disk):
            # the row holds this payload or an older one: delivered (a newer waiting one is written on its own)
            self._disk_topics.discard(topic)
            self._delivered_on_disk.append(topic)

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until nothing is waiting (held-back states included) — for tests and shutdown."""

        async def idle() -> None:
            while self._due or not self._connected.is_set():
                await asyncio.sleep(0.01)

        await asyncio.wait_for(idle(), timeout)

    async def stop(self, timeout: float = 10.0) -> None:
        """Publish held-back states and ``offline``, disconnect cleanly and close the outbox. When the
        broker is unreachable, waiting messages stay on disk for the next run. Idempotent."""
        if self._closed:
            return
        self._stopping.set()
        self._wake.set()
        try:
            if self._running:
                try:
                    await asyncio.wait_for(self._finished.wait(), timeout)
                except TimeoutError:
                    log.warning(
                        "mqtt: could not send everything within %.0f s; %d message(s) wait on disk for the next run",
                        timeout,
                        len(self._due),
                    )
                    task = self._run_task
                    if task is not None and not task.done():
                        task.cancel()  # stop the sender before its outbox is closed
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await asyncio.wait_for(asyncio.shield(task), 2.0)
        finally:  # even when cancelled: what was not sent waits on disk for the next run
            self._persist()
            self._outbox.close()
            self._closed = True

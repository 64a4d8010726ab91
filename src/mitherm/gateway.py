"""The gateway pipeline: Advertisement -> dedupe -> decode -> replay check -> device state -> sinks.

Sinks are plain objects with ``publish(state, reading)`` (sync, cheap) — history, MQTT, ``--print``, the
web UI. Time is the advertisement's own clock, so a replayed capture behaves as it happened."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .decoder import SUPPORTED_UUIDS, Decoder
from .doctor import Diagnosis, diagnose
from .framecache import Frame, FrameCache
from .model import Advertisement, ErrorCode, Reading
from .state import DeviceState, KeyStatus
from .uuids import MIBEACON

log = logging.getLogger(__name__)

_NOT_STATE = frozenset({"flags", "packet_id", "trigger"})  # per-frame facts, not device state


class Sink(Protocol):
    def publish(self, state: DeviceState, reading: Reading) -> None: ...


@dataclass(slots=True)
class GatewayStats:
    adverts: int = 0
    frames: int = 0
    duplicates: int = 0
    decoded: int = 0
    replayed: int = 0
    failed: int = 0


@dataclass
class GatewayOptions:
    dedupe_window: float = 10.0  # seconds: the same frame heard by several receivers (or repeated) is one frame
    publish_unknown: bool = False


class Gateway:
    """Keeps per-device state from a stream of advertisements. Not thread-safe: feed it from one loop."""

    idle_fast_path = True  # skip the decoder for repeated idle MiBeacon headers (tests compare with it off)

    def __init__(
        self,
        keys: dict[str, str] | None = None,
        *,
        names: dict[str, str] | None = None,
        options: GatewayOptions | None = None,
        counters: dict[str, int] | None = None,
        cache: FrameCache | None = None,
    ) -> None:
        self.decoder = Decoder(keys or {})
        self.keys: dict[str, str] = dict(keys or {})
        self.names: dict[str, str] = dict(names or {})
        self.options = options or GatewayOptions()
        self.cache = cache or FrameCache()
        self.devices: dict[str, DeviceState] = {}
        self.sinks: list[Sink] = []
        self.stats = GatewayStats()
        #: last accepted encrypted counter per device (replay protection; persisted by the owner)
        self.counters: dict[str, int] = dict(counters or {})
        #: dedupe: (mac, payload) -> (time, mac), in time order (re-inserted on repeat) for the sweep
        self._recent: dict[tuple[str, bytes], tuple[float, str]] = {}
        self._inserts = 0
        self._diagnosed: dict[str, tuple[str, int]] = {}  # mac -> (key, failures when last diagnosed)
        self._failures: dict[str, int] = {}  # mac -> key failures seen (monotonic; the frame ring is bounded)
        self._last_data: dict[str, float] = {}
        #: per sender: (length, header without the counter byte, device, model, product id) of its last idle
        #: MiBeacon frame that decoded cleanly (the next ones with the same header skip the decoder)
        self._idle: dict[str, tuple[int, bytes, str, str | None, int]] = {}
        self.clock = 0.0  # the newest advertisement time seen

    # --- keys ----------------------------------------------------------------------------------------
    def set_keys(self, keys: dict[str, str], names: dict[str, str] | None = None) -> list[str]:
        """Replace the keys (keystore reloaded). Returns the MACs whose key changed; their verdict is redone
        at once against the frames already seen."""
        changed = [m for m in set(keys) | set(self.keys) if keys.get(m) != self.keys.get(m)]
        self.keys = dict(keys)
        self.decoder.set_keys(keys)
        if names is not None:
            self.names = dict(names)
            for mac, st in self.devices.items():
                st.name = self.names.get(mac, st.name)
                st.known = mac in self.keys or mac in self.names
        for mac in changed:
            self._diagnosed.pop(mac, None)
            st = self.devices.get(mac)
            if st is not None:
                st.known = mac in self.keys or mac in self.names
                self._check_key(st, force=True)
        return changed

    def verify_key(self, mac: str, key: str) -> Diagnosis:
        return diagnose(self.cache, mac, key, now=self.clock or None)

    # --- the pipeline --------------------------------------------------------------------------------
    def handle(self, adv: Advertisement) -> list[tuple[DeviceState, Reading]]:
        """Feed one advertisement; returns the (state, reading) pairs it produced (decoded data frames and
        key failures)."""
        stats = self.stats
        stats.adverts += 1
        t = adv.time
        if t > self.clock:
            self.clock = t
        out: list[tuple[DeviceState, Reading]] = []
        recent = self._recent
        for uuid, payload in adv.service_data.items():
            if uuid not in SUPPORTED_UUIDS:
                continue
            stats.frames += 1
            if type(payload) is not bytes:
                payload = bytes(payload)
            mac = adv.mac
            key = (mac, payload)
            seen = recent.get(key)
            if seen is not None:
                if t - seen[0] <= self.options.dedupe_window:
                    # the same frame from another receiver (or repeated): keep the best RSSI and its receiver
                    stats.duplicates += 1
                    rssi = adv.rssi
                    if rssi is not None:
                        st = self.devices.get(seen[1])
                        if st is not None and st.last_seen == seen[0] and (st.rssi is None or rssi > st.rssi):
                            st.rssi = rssi
                            st.receiver = adv.source or st.receiver
                    continue
                del recent[key]  # re-insert at the end: the dict stays in time order for the sweep
            recent[key] = (t, mac)
            self._inserts += 1
            if self._inserts & 255 == 0:
                self._sweep(t)
            r = self._frame(adv, uuid, payload)
            if r is not None:
                out.append(r)
        return out

    def handle_many(self, advs: Iterable[Advertisement]) -> None:
        handle = self.handle
        for adv in advs:
            handle(adv)

    def _sweep(self, now: float) -> None:
        """Forget dedupe entries older than the window (they are in time order) and cap the size."""
        recent = self._recent
        horizon = now - self.options.dedupe_window
        stale = []
        for k, v in recent.items():
            if v[0] >= horizon and len(recent) - len(stale) <= 50_000:
                break
            stale.append(k)
        for k in stale:
            del recent[k]

    def _frame(self, adv: Advertisement, uuid: int, payload: bytes) -> tuple[DeviceState, Reading] | None:
        mac = adv.mac
        t = adv.time
        self.cache.add(Frame(t, mac, uuid, payload, adv.rssi, adv.name))
        if uuid == MIBEACON and len(payload) > 4 and not payload[0] & 0x40 and self.idle_fast_path:
            # a MiBeacon frame without objects: an idle frame
            idle = self._idle.get(mac)
            if idle is not None and idle[0] == len(payload) and idle[1] == payload[:4] + payload[5:12]:
                # The same header (frame control, product id, MAC, capability) as this device's last idle frame,
                # which decoded without error: only the frame counter differs, so the decode would give the
                # same result. Update the state as below for an idle reading, without decoding.
                st = self.devices.get(idle[2])
                if st is not None:
                    st.last_seen = t
                    st.rssi = adv.rssi
                    st.receiver = adv.source or None
                    if adv.name and not st.name:
                        st.name = self.names.get(st.mac) or adv.name
                    model = idle[3]
                    if model and model != st.model and (st.model is None or model not in ("ATC", "BTHome")):
                        st.model = model
                    st.product_id = idle[4]
                    return None
        reading = self.decoder.decode(mac, uuid, payload)
        rmac = reading.mac
        st = self.devices.get(rmac)
        if st is None:
            st = self.devices[rmac] = DeviceState(mac=rmac, first_seen=t, name=self.names.get(rmac))
            st.known = rmac in self.keys or rmac in self.names
        st.last_seen = t
        st.rssi = adv.rssi
        st.receiver = adv.source or None
        if adv.name and not st.name:
            st.name = self.names.get(rmac) or adv.name
        model = reading.model
        if model and model != st.model and (st.model is None or model not in ("ATC", "BTHome")):
            st.model = model
        if reading.product_id is not None:
            st.product_id = reading.product_id
        err = reading.error
        if err is not None:
            self.stats.failed += 1
            if err.code is ErrorCode.NO_KEY:
                st.format = reading.format
                st.key_status = KeyStatus.MISSING
            elif err.code in (ErrorCode.WRONG_KEY, ErrorCode.BAD_KEY):
                st.format = reading.format
                self._check_key(st)
            return (st, reading) if err.code is not ErrorCode.MALFORMED else None
        values = reading.values
        if not values:
            if uuid == MIBEACON and not reading.objects and not payload[0] & 0x40 and reading.product_id is not None:
                self._idle[mac] = (len(payload), payload[:4] + payload[5:12], rmac, model, reading.product_id)
            return None  # idle frame
        if reading.encrypted:
            if not self._fresh_counter(reading):
                self.stats.replayed += 1
                return None
            if st.key_status != KeyStatus.VERIFIED:
                if st.key_status == KeyStatus.FAILED:
                    log.warning("%s: the key works again", st.mac)
                st.key_status = KeyStatus.VERIFIED
                st.key_verdict = None
        elif st.key_status != KeyStatus.NOT_NEEDED and (
            st.key_status in (KeyStatus.UNKNOWN, KeyStatus.MISSING) or rmac not in self.keys
        ):
            st.key_status = KeyStatus.NOT_NEEDED
        self.stats.decoded += 1
        st.format = reading.format
        prev = self._last_data.get(rmac)
        if prev is not None and t > prev:
            gap = t - prev
            st.data_interval = gap if st.data_interval is None else 0.8 * st.data_interval + 0.2 * gap
        self._last_data[rmac] = t
        svalues = st.values
        updated = st.updated
        for name, value in values.items():
            if name in _NOT_STATE:
                continue
            svalues[name] = value
            updated[name] = t
        for sink in self.sinks:
            sink.publish(st, reading)
        return st, reading

    def _fresh_counter(self, r: Reading) -> bool:
        """Reject replayed or out-of-order encrypted frames (the counter is part of the nonce)."""
        if r.frame_counter is None:
            return True
        fmt = r.format or ""
        if fmt.startswith("mibeacon"):
            counter = (r.ext_counter or 0) << 8 | r.frame_counter
            span = 1 << 32
        elif fmt.startswith("bthome"):
            counter, span = r.frame_counter, 1 << 32
        else:  # pvvx / atc1441: a 1-byte counter that wraps
            counter, span = r.frame_counter, 256
        last = self.counters.get(r.mac)
        if last is not None:
            delta = (counter - last) % span
            rebooted = counter < 256 and last > 4096 and span > 256  # a rebooted device starts near zero
            if (delta == 0 or delta > span // 2) and not rebooted:
                return False
        self.counters[r.mac] = counter
        return True

    def _check_key(self, st: DeviceState, force: bool = False) -> None:
        """Run the doctor when a key fails: once per key and per few new failures, one log line."""
        key = self.keys.get(st.mac)
        if key is None:
            st.key_status = KeyStatus.MISSING
            return
        failures = self._failures.get(st.mac, 0) + (0 if force else 1)
        self._failures[st.mac] = failures
        prev = self._diagnosed.get(st.mac)
        # re-diagnose on the first failures (a re-keyed device needs 3 before it is "outdated"), then every 8
        if not force and prev is not None and prev[0] == key and failures - prev[1] < (1 if failures <= 4 else 8):
            return
        dx = diagnose(self.cache, st.mac, key, now=self.clock or None)
        self._diagnosed[st.mac] = (key, failures)
        if dx.ok:
            st.key_status = KeyStatus.VERIFIED
            st.key_verdict = None
            return
        if dx.verdict.value in ("no_encrypted_frames", "device_not_seen"):
            return
        if st.key_verdict != dx.verdict.value:
            log.warning("%s (%s): key_failed: %s — %s", st.mac, st.name or st.model or "?", dx.verdict.value, dx.advice)
        st.key_status = KeyStatus.FAILED
        st.key_verdict = dx.verdict.value


class PrintSink:
    """``--print``: one JSON line per device update on stdout."""

    def __init__(self, write: Callable[[str], Any]) -> None:
        import json

        self._dumps = json.dumps
        self._write = write

    def publish(self, state: DeviceState, reading: Reading) -> None:
        d = state.to_json()
        d["time"] = state.last_seen
        self._write(self._dumps(d, ensure_ascii=False) + "\n")

"""Virtual thermometers: stock Xiaomi/Qingping firmware, pvvx custom firmware and BTHome sensors.

A device is a pure, seeded state machine on a **simulated** time axis (seconds since the simulation
started; ``t = 0`` is local midnight of day 0). It never sleeps and never touches a radio: ask it when
its next frame is due (``peek()``), take it (``next_frame()`` / ``next_event()`` / ``events()``), and
push the complete AD structures wherever you like. ``Simulator`` (runner.py) interleaves many devices and
maps simulated time to wall time with ``time_factor``.

Byte layouts come from the format encoders (``mitherm.formats``); what each firmware emits and how often
is in shared/reference/formats.md §2, §3.4 and firmware.md §1.4:

* stock firmware: MiBeacon v5 with the MAC (frame control ``5858``), mostly *idle* frames without
  objects (``5830`` + capability byte) and one encrypted reading about every 10 minutes, temperature
  (0x1004), humidity (0x1006) and battery (0x100A) in turn. CGG1 also exists as a plain v5/v3 variant.
* pvvx firmware: one advert per advertising interval (default 2.5 s) carrying the latest measurement
  (measure interval = N advertising intervals, default 4) in the selected format; BTHome alternates two
  packets as the firmware does.
* BTHome v1/v2 sensors, plain or encrypted, optionally MAC-included and trigger-based.

Everything random (address, bindkey, climate, fault draws) comes from ``random.Random`` streams derived
from the device seed, so a seed and a sequence of calls always give the same bytes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..bindkey import Bindkey, clean_key_text, parse_bindkey
from ..catalogue import catalogue
from ..formats import atc1441, bthome, mibeacon, pvvx
from ..mac import mac_to_le, normalize_mac
from ..uuids import BTHOME_V1, BTHOME_V1_ENC, BTHOME_V2, CUSTOM_181A, MIBEACON

# --- advertising data (AD structures) -------------------------------------------------------------

AD_FLAGS = 0x01
AD_COMPLETE_LOCAL_NAME = 0x09
AD_SERVICE_DATA_16 = 0x16
FLAGS_GENERAL_DISCOVERABLE_NO_BREDR = 0x06
MAX_LEGACY_AD = 31


def ad_structure(ad_type: int, value: bytes) -> bytes:
    """``length | type | value`` (length counts the type byte)."""
    return bytes([len(value) + 1, ad_type]) + value


def build_advertising_data(
    service_uuid: int,
    payload: bytes,
    name: str | None = None,
    *,
    flags: int | None = FLAGS_GENERAL_DISCOVERABLE_NO_BREDR,
) -> bytes:
    """Flags AD, 16-bit service data AD and, when it still fits in 31 bytes, the complete local name.

    Real sensors send the name in the scan response when the advert is full; a passive scanner then
    sees no name, and neither does a receiver of this data."""
    out = b"" if flags is None else ad_structure(AD_FLAGS, bytes([flags]))
    out += ad_structure(AD_SERVICE_DATA_16, service_uuid.to_bytes(2, "little") + payload)
    if len(out) > MAX_LEGACY_AD:
        raise ValueError(f"service data of {len(payload)} bytes does not fit a 31-byte legacy advert")
    if name:
        named = out + ad_structure(AD_COMPLETE_LOCAL_NAME, name.encode())
        if len(named) <= MAX_LEGACY_AD:
            return named
    return out


class DeviceConfigError(ValueError):
    """A device parameter that does not fit the device; ``field`` names the house-file field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# --- deterministic randomness -----------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _noise(key: int, channel: int, step: int) -> float:
    """White noise in [-1, 1) that depends only on (key, channel, step): truth is a function of time."""
    return _mix(key ^ _mix((channel << 48) ^ (step & _M64))) / 2**63 - 1.0


def seeded_rng(seed: Any, purpose: str) -> random.Random:
    # One independent stream per purpose, so that giving e.g. an explicit address does not shift the
    # climate or the key drawn from the same seed. String seeds are hashed with SHA-512: stable.
    return random.Random(f"mitherm-sim:{seed}:{purpose}")


def random_bindkey(rng: random.Random) -> str:
    return rng.randbytes(16).hex()


def random_address(rng: random.Random, oui: str | None) -> str:
    """A public address under ``oui`` ("A4:C1:38"), or a random static one (top bits 11) without."""
    if oui:
        head = bytes.fromhex(oui.replace(":", ""))
        raw = head + rng.randbytes(6 - len(head))
    else:
        raw = rng.randbytes(6)
        raw = bytes([raw[0] | 0xC0]) + raw[1:]
    return raw.hex(":").upper()


# --- what the sensor measures -------------------------------------------------------------------------

V_FULL = 3.1  # CR2032 fresh
V_EMPTY = 2.2  # where the sensors report 0 % (the xiaomi-ble estimate uses the same 2.2-3.1 V range)
DAY_S = 86_400.0


def battery_pct_for(voltage_v: float) -> int:
    """Linear 3.1 V -> 100 %, 2.2 V -> 0 %, clamped."""
    return max(0, min(100, round((voltage_v - V_EMPTY) / (V_FULL - V_EMPTY) * 100)))


@dataclass(frozen=True, slots=True)
class Truth:
    """What the sensor measured (sensor resolution: 0.01 °C, 0.01 %, 1 mV)."""

    temperature_c: float
    humidity_pct: float
    battery_pct: int
    voltage_v: float

    def as_dict(self) -> dict[str, float]:
        return {
            "temperature_c": self.temperature_c,
            "humidity_pct": self.humidity_pct,
            "battery_pct": self.battery_pct,
            "voltage_v": self.voltage_v,
        }


@dataclass(frozen=True, slots=True)
class Climate:
    """A room: daily temperature sinusoid + slow wobbles + noise, humidity anti-correlated, battery
    draining slowly. ``at(t)`` is a pure function of ``t`` (simulated seconds)."""

    key: int
    temperature_c: float = 21.0  # daily mean
    temperature_swing_c: float = 3.0  # amplitude of the daily sinusoid
    peak_s: float = 15 * 3600.0  # time of day of the maximum
    humidity_pct: float = 50.0  # mean relative humidity
    humidity_per_c: float = 2.5  # %RH lost per °C above the mean
    battery_v: float = 3.0  # voltage at t = 0
    drain_v_per_day: float = 0.002  # 3.1 V -> 2.2 V in about 15 months
    wobbles: tuple[tuple[float, float, float], ...] = ()  # (period s, amplitude °C, phase rad)
    noise_c: float = 0.05
    noise_pct: float = 0.3
    noise_v: float = 0.002

    @classmethod
    def random(cls, rng: random.Random) -> Climate:
        return cls(
            key=rng.getrandbits(64),
            temperature_c=round(rng.uniform(19.5, 23.0), 2),
            temperature_swing_c=round(rng.uniform(2.0, 3.5), 2),
            peak_s=rng.uniform(13.0, 17.0) * 3600,
            humidity_pct=round(rng.uniform(40.0, 60.0), 1),
            humidity_per_c=rng.uniform(1.5, 3.0),
            battery_v=round(rng.uniform(2.75, 3.1), 3),
            drain_v_per_day=rng.uniform(0.001, 0.003),
            wobbles=tuple(
                (rng.uniform(900.0, 7200.0), rng.uniform(0.05, 0.25), rng.uniform(0.0, math.tau)) for _ in range(3)
            ),
        )

    def at(self, t: float) -> Truth:
        step = math.floor(t / 10.0)  # the noise changes every 10 s of simulated time
        dt = self.temperature_swing_c * math.cos(math.tau * (t - self.peak_s) / DAY_S)
        for period, amplitude, phase in self.wobbles:
            dt += amplitude * math.sin(math.tau * t / period + phase)
        dt += self.noise_c * _noise(self.key, 1, step)
        humidity = self.humidity_pct - self.humidity_per_c * dt + self.noise_pct * _noise(self.key, 2, step)
        volts = self.battery_v - self.drain_v_per_day * t / DAY_S + self.noise_v * _noise(self.key, 3, step // 6)
        volts = round(max(2.0, min(3.3, volts)), 3)
        return Truth(
            temperature_c=round(self.temperature_c + dt, 2),
            humidity_pct=round(max(0.0, min(100.0, humidity)), 2),
            battery_pct=battery_pct_for(volts),
            voltage_v=volts,
        )


CLIMATE_FIELDS = ("temperature_c", "temperature_swing_c", "humidity_pct", "battery_v")


# --- frames -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One advert as sent: ``ad`` is the complete AD structures (what goes on air / to ``set_data``)."""

    t: float
    ad: bytes
    service_uuid: int
    payload: bytes  # service data after the UUID
    has_data: bool  # False for MiBeacon idle frames (no objects)
    corrupted: bool = False


@dataclass(frozen=True, slots=True)
class _Payload:
    uuid: int
    data: bytes
    has_data: bool = True
    # How ``corrupt()`` may damage it: encrypted frames get one byte flipped at an index >= flip_from
    # (the header before it stays intact, so the frame still routes to the same decoder and fails its
    # MIC); plain frames are cut to one of ``cuts`` lengths (see Device._damage).
    flip_from: int | None = None
    cuts: tuple[int, ...] = ()


# Payload lengths on UUID 0x181A that some decoder accepts (formats.md §3 table): a truncated plain
# atc1441/pvvx frame must not land on one of them.
_181A_VALID_LENGTHS = frozenset({8, 11, 13, 14, 15, 16, 18})
_181A_CUTS = tuple(n for n in range(1, 13) if n not in _181A_VALID_LENGTHS)


def _object_cuts(header_len: int, first_object_len: int) -> tuple[int, ...]:
    """Lengths that end inside the first object: a tolerant parser keeps the complete objects before a
    cut-off one, so the cut must fall in the first object for the frame to carry no value at all."""
    return tuple(range(header_len, header_len + first_object_len))


# MiBeacon frame control: the encoder sets version/MAC/capability/objects/encrypted; stock v5 frames
# also carry auth mode 2 ("standard", bits 10-11), which makes 0x5058 the familiar 0x5858. The frame
# control is not part of the v5 nonce or AAD, so this does not touch the MIC.
MI_AUTH_STANDARD = 0x0800
MI_IDLE_CAPABILITY = 0x08  # capability byte of stock idle frames (bond ability); illustrative


def _mi_v5_auth(payload: bytes, version: int) -> bytes:
    if version < 5:
        return payload
    return bytes([payload[0], payload[1] | MI_AUTH_STANDARD >> 8]) + payload[2:]


# Which Truth fields a MiBeacon object carries, in order (encode_object takes natural units).
MI_OBJECT_FIELDS: dict[int, tuple[str, ...]] = {
    0x1004: ("temperature_c",),
    0x1006: ("humidity_pct",),
    0x100A: ("battery_pct",),
    0x100D: ("temperature_c", "humidity_pct"),
}
MI_HEADER_WITH_MAC = 11  # FC 2 + product id 2 + frame counter 1 + MAC 6


def _mi_object(oid: int, truth: Truth) -> bytes:
    return mibeacon.encode_object(oid, *(getattr(truth, f) for f in MI_OBJECT_FIELDS[oid]))


# BTHome objects: id -> Truth field (None: a fixed value supplied by the packet table).
BTHOME_FIELDS: dict[int, str | None] = {
    0x00: None,  # packet id
    0x01: "battery_pct",
    0x02: "temperature_c",  # 0.01 °C
    0x03: "humidity_pct",  # 0.01 %
    0x0C: "voltage_v",  # 0.001 V
    0x10: None,  # power / switch (pvvx: trigger output)
}


# --- the device base class -----------------------------------------------------------------------------


class Device:
    """Common state: identity, key, climate, faults and the frame loop. Subclasses schedule frames
    (``peek`` / ``_pop``) and build payloads."""

    kind: ClassVar[str] = ""
    address_type: ClassVar[str] = "public"
    default_adv_interval: ClassVar[float] = 2.0
    default_measure_interval: ClassVar[float | None] = None

    def __init__(
        self,
        *,
        model: str,
        seed: Any = 0,
        address: str | None = None,
        bindkey: str | None = None,
        encrypted: bool = False,
        label: str | None = None,
        name: str | None = None,
        oui: str | None = None,
        adv_interval: float | None = None,
        measure_interval: float | None = None,
        min_interval: float = 0.0,
        climate: dict[str, float] | None = None,
        demo_wrong_key: bool = False,
    ) -> None:
        self.seed = seed
        self.model = model
        self.label = label
        self.encrypted = encrypted
        self.demo_wrong_key = demo_wrong_key
        self.address = normalize_mac(address) if address else random_address(seeded_rng(seed, "address"), oui)
        self._mac_le = mac_to_le(self.address)
        self._explicit_name = name
        self.name = name or self.default_name()
        self.bindkey: str | None = None
        self._key: Bindkey | None = None
        if encrypted:
            self._set_key(bindkey if bindkey is not None else random_bindkey(seeded_rng(seed, "bindkey")))
        elif bindkey is not None:
            raise DeviceConfigError(
                f"{self.model} ({self.format}) sends plain frames: a bindkey makes no sense", "bindkey"
            )
        self.adv_interval = float(adv_interval if adv_interval is not None else self.default_adv_interval)
        mi = measure_interval if measure_interval is not None else self.default_measure_interval
        self.measure_interval: float | None = None if mi is None else float(mi)
        self.min_interval = float(min_interval)
        self.climate_overrides = dict(climate or {})
        self.climate = replace(Climate.random(seeded_rng(seed, "climate")), **self.climate_overrides)
        sched = seeded_rng(seed, "schedule")
        self._jitter_key = sched.getrandbits(64)
        self._measure_phase = sched.uniform(0.0, self.measure_interval or 1.0)
        self._t_adv = sched.uniform(0.0, self.adv_interval)
        self._adv_count = 0
        self._schedule_rng = sched
        self._faults = seeded_rng(seed, "faults")
        self.corrupt_probability = 0.0
        self._silent_from = math.inf
        self._silent_until = math.inf
        #: Current simulated time as the device knows it: the last frame taken, or what the Simulator set
        #: before running a scheduled action. Faults start here by default.
        self.now = 0.0
        #: Device-side GATT protocol objects (pvvx config service, Mi auth, OTA) attach here later.
        self.gatt: Any = None

    # identity -------------------------------------------------------------------------------------

    def default_name(self) -> str:
        return self.model

    @property
    def format(self) -> str:
        """The wire format name as the decoder reports it (``mibeacon_v5_enc``, ``pvvx``, ``bthome_v2`` …)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        label = f" {self.label!r}" if self.label else ""
        return f"<{type(self).__name__}{label} {self.address} {self.model} {self.format}>"

    def _set_key(self, key_hex: str) -> None:
        key = parse_bindkey(key_hex)  # validates hex and length
        if len(key.raw) != 16:
            raise DeviceConfigError("these formats need a 16-byte (32 hex digit) bindkey", "bindkey")
        self._key = key
        self.bindkey = clean_key_text(key_hex)

    def spec(self) -> dict[str, Any]:
        """The house-file fields that recreate this device (current address and key)."""
        d: dict[str, Any] = {"kind": self.kind}
        d.update(self._spec_fields())
        if self.label is not None:
            d["name"] = self.label
        d["address"] = self.address
        if self.bindkey is not None:
            d["bindkey"] = self.bindkey
        if self._explicit_name is not None:
            d["adv_name"] = self._explicit_name
        if self.adv_interval != self.default_adv_interval:
            d["adv_interval"] = self.adv_interval
        d.update(self.climate_overrides)
        if self.demo_wrong_key:
            d["demo_wrong_key"] = True
        return d

    def _spec_fields(self) -> dict[str, Any]:
        return {}

    # measurements ---------------------------------------------------------------------------------

    def measurement_time(self, t: float) -> float:
        """When the measurement that a frame sent at ``t`` carries was taken."""
        mi = self.measure_interval
        if mi is None:
            return t
        return self._measure_phase + self.measurement_index(t) * mi

    def measurement_index(self, t: float) -> int:
        """Number of the measurement a frame sent at ``t`` carries (0 for continuous sensors)."""
        mi = self.measure_interval
        if mi is None:
            return 0
        # the epsilon keeps a frame scheduled exactly at a measurement instant on that measurement
        return math.floor((t - self._measure_phase) / mi + 1e-9)

    def truth_at(self, t: float) -> Truth:
        """The values a frame sent at ``t`` carries, at sensor resolution (before format rounding)."""
        return self.climate.at(self.measurement_time(t))

    # faults ---------------------------------------------------------------------------------------

    def rekey(self, new_key: str | None = None) -> str:
        """Re-pairing: a new bindkey (random from the seeded fault stream unless given). Returns it."""
        if not self.encrypted:
            raise ValueError(f"{self!r} sends plain frames: there is no key to change")
        self._set_key(new_key if new_key is not None else random_bindkey(self._faults))
        assert self.bindkey is not None
        return self.bindkey

    def drop_out(self, duration: float | None = None, *, at: float | None = None) -> None:
        """Go silent (out of range, battery pulled) from ``at`` (default: ``now``) for
        ``duration`` simulated seconds, or until ``come_back()``. Counters keep running meanwhile."""
        start = self.now if at is None else at
        self._silent_from = start
        self._silent_until = math.inf if duration is None else start + duration

    def come_back(self, *, at: float | None = None) -> None:
        self._silent_until = self.now if at is None else at

    def corrupt(self, probability: float) -> None:
        """Damage each data frame with this probability (0 switches it off)."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        self.corrupt_probability = probability

    def is_silent(self, t: float) -> bool:
        return self._silent_from <= t < self._silent_until

    def _damage(self, p: _Payload) -> bytes:
        # Encrypted: flip one byte after the header -> the MIC fails (a forgery passes with 2^-32).
        # Plain: a flipped byte usually still decodes (atc1441/pvvx have no checksum: a flipped
        # temperature byte is just another temperature), so plain frames are truncated to a length
        # that carries no complete value instead.
        data = bytearray(p.data)
        if p.flip_from is not None:
            i = self._faults.randrange(p.flip_from, len(data))
            data[i] ^= self._faults.randrange(1, 256)
            return bytes(data)
        return bytes(data[: self._faults.choice(p.cuts)])

    # scheduling -----------------------------------------------------------------------------------

    @property
    def adv_period(self) -> float:
        return max(self.adv_interval, self.min_interval)

    def _advance_adv(self) -> None:
        # BLE adds a pseudo-random 0-10 ms advDelay to every advertising event.
        self._adv_count += 1
        jitter = 0.005 * (_noise(self._jitter_key, 9, self._adv_count) + 1.0)
        self._t_adv += self.adv_period + jitter

    def peek(self) -> float:
        """Simulated time of the next scheduled frame."""
        return self._t_adv

    def _pop(self) -> tuple[float, _Payload]:
        raise NotImplementedError

    # the frame loop -------------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """Take the next scheduled frame; None when the device is silent then (its counters still run)."""
        t, p = self._pop()
        self.now = max(self.now, t)
        if self.is_silent(t):
            return None
        data = p.data
        corrupted = False
        if self.corrupt_probability and p.has_data and self._faults.random() < self.corrupt_probability:
            data = self._damage(p)
            corrupted = True
        ad = build_advertising_data(p.uuid, data, self.name)
        return Frame(t, ad, p.uuid, data, p.has_data, corrupted)

    def next_event(self, until: float = math.inf) -> tuple[float, bytes] | None:
        """``(t, ad_bytes)`` of the next frame sent before ``until``, or None."""
        while self.peek() < until:
            f = self.next_frame()
            if f is not None:
                return f.t, f.ad
        return None

    def frames(self, until: float) -> Iterator[Frame]:
        while self.peek() < until:
            f = self.next_frame()
            if f is not None:
                yield f

    def events(self, until: float) -> Iterator[tuple[float, bytes]]:
        for f in self.frames(until):
            yield f.t, f.ad


# --- stock firmware ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StockModel:
    """How one stock model advertises. Product ids come from the catalogue (data/devices.toml)."""

    model: str
    encrypted_as: str | None  # catalogue model whose product id encrypted frames carry
    plain_as: str | None  # ... and plain frames (None: this firmware always encrypts)
    plain_version: int  # MiBeacon version of the plain variant
    oui: str
    encrypted_objects: tuple[int, ...] = (0x1004, 0x1006, 0x100A)  # one object per frame, in turn
    plain_objects: tuple[int, ...] = (0x100D, 0x100A)
    data_interval: float = 600.0  # "about every 10 minutes" (formats.md, ecosystem.md §HA notes)
    adv_interval: float = 2.0  # idle frames; an assumption, not a measured value


STOCK_MODELS: dict[str, StockModel] = {
    m.model: m
    for m in (
        StockModel("LYWSD03MMC", "LYWSD03MMC", "LYWSD03MMC", 3, "A4:C1:38"),  # plain v3: old firmware
        StockModel("MHO-C401", "MHO-C401", None, 5, "A4:C1:38"),
        StockModel("CGG1", "CGG1-ENCRYPTED", "CGG1", 5, "58:2D:34"),
        StockModel("CGDK2", "CGDK2", None, 5, "58:2D:34"),
    )
}


def product_id_for(model: str) -> int:
    for pid, info in catalogue().items():
        if info.model == model:
            return pid
    raise ValueError(f"model {model!r} is not in the device catalogue")


class StockDevice(Device):
    """Stock firmware: MiBeacon v5 (MAC included), idle frames at the advertising interval and one
    reading every ``data_interval`` seconds, cycling through the model's objects."""

    kind = "stock"

    def __init__(
        self,
        model: str = "LYWSD03MMC",
        *,
        encrypted: bool | None = None,
        version: int | None = None,
        data_interval: float | None = None,
        **kw: Any,
    ) -> None:
        spec = STOCK_MODELS.get(model)
        if spec is None:
            raise DeviceConfigError(f"unknown stock model {model!r}; known: {', '.join(STOCK_MODELS)}", "model")
        self.stock = spec
        if encrypted is None:
            own = catalogue().get(product_id_for(model))
            encrypted = bool(own and own.stock_encrypted) if spec.plain_as else True
        if (encrypted and spec.encrypted_as is None) or (not encrypted and spec.plain_as is None):
            only = "plain" if spec.plain_as else "encrypted"
            raise DeviceConfigError(f"stock {model} firmware sends {only} frames only", "encrypted")
        default_version = 5 if encrypted else spec.plain_version
        self.version = default_version if version is None else version
        if self.version not in (3, 5) or (encrypted and self.version != 5):
            raise DeviceConfigError("stock thermometers send MiBeacon v5 (encrypted) or v3/v5 (plain)", "version")
        self.product_id = product_id_for(spec.encrypted_as if encrypted else spec.plain_as)  # type: ignore[arg-type]
        self.objects = spec.encrypted_objects if encrypted else spec.plain_objects
        self.data_interval = float(data_interval if data_interval is not None else spec.data_interval)
        self.default_adv_interval = spec.adv_interval  # type: ignore[misc]
        kw.setdefault("oui", spec.oui)
        super().__init__(model=model, encrypted=encrypted, **kw)
        self._t_data = self._schedule_rng.uniform(0.0, self.data_interval)
        self._data_count = 0
        self._frame_counter = self._schedule_rng.randrange(256)
        self._ext_counter = self._schedule_rng.randrange(4096)

    @property
    def format(self) -> str:
        return f"mibeacon_v{self.version}" + ("_enc" if self.encrypted else "")

    def _spec_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "encrypted": self.encrypted}
        if self.version != (5 if self.encrypted else self.stock.plain_version):
            d["version"] = self.version
        if self.data_interval != self.stock.data_interval:
            d["data_interval"] = self.data_interval
        return d

    def peek(self) -> float:
        return min(self._t_adv, self._t_data)

    def _pop(self) -> tuple[float, _Payload]:
        if self._t_data <= self._t_adv:
            t = self._t_data
            self._t_data += self.data_interval
            return t, self._data_frame(t)
        t = self._t_adv
        self._advance_adv()
        return t, self._idle_frame()

    def _next_frame_counter(self) -> int:
        self._frame_counter = (self._frame_counter + 1) & 0xFF
        return self._frame_counter

    def _idle_frame(self) -> _Payload:
        payload = mibeacon.encode(
            mac_le=self._mac_le,
            product_id=self.product_id,
            frame_counter=self._next_frame_counter(),
            version=self.version,
            capability=MI_IDLE_CAPABILITY,
        )
        return _Payload(MIBEACON, _mi_v5_auth(payload, self.version), has_data=False)

    def _data_frame(self, t: float) -> _Payload:
        oid = self.objects[self._data_count % len(self.objects)]
        self._data_count += 1
        obj = _mi_object(oid, self.truth_at(t))
        if self.encrypted:
            self._ext_counter = (self._ext_counter + 1) & 0xFFFFFF
        payload = mibeacon.encode(
            mac_le=self._mac_le,
            product_id=self.product_id,
            frame_counter=self._next_frame_counter(),
            objects=[obj],
            version=self.version,
            key=self._key if self.encrypted else None,
            ext_counter=self._ext_counter,
        )
        payload = _mi_v5_auth(payload, self.version)
        if self.encrypted:
            return _Payload(MIBEACON, payload, flip_from=MI_HEADER_WITH_MAC)
        return _Payload(MIBEACON, payload, cuts=_object_cuts(MI_HEADER_WITH_MAC, len(obj)))


# --- pvvx custom firmware --------------------------------------------------------------------------------

PVVX_ADV_TYPES = ("atc1441", "pvvx", "mi", "bthome")  # config byte flg b0-1 = 0..3 (firmware.md §1.4)
PVVX_MI_PLAIN_OBJECTS = (0x100D, 0x100A)
PVVX_MI_ENCRYPTED_OBJECTS = (0x1004, 0x1006, 0x100A)
# pvvx BTHome v2 alternates these two packets (formats.md §3.4): object ids, packet id first.
PVVX_BTHOME_PACKETS = ((0x00, 0x01, 0x02, 0x03), (0x00, 0x0C, 0x10))


def pvvx_models() -> tuple[str, ...]:
    """Catalogue models pvvx firmware runs on (they lend the product id to the Mi format)."""
    seen: dict[str, None] = {}
    for info in catalogue().values():
        if info.custom_firmware == "pvvx":
            seen.setdefault(info.model)
    return tuple(seen)


class PvvxDevice(Device):
    """pvvx custom firmware (the LYWSD03MMC's usual replacement): one advert per advertising interval
    (default 40 × 62.5 ms = 2.5 s) carrying the latest measurement, taken every ``measure_count``
    advertising intervals (default 4 = 10 s). ``adv_type``: atc1441 | pvvx | mi | bthome (default)."""

    kind = "pvvx"
    default_adv_interval = 2.5

    def __init__(
        self,
        adv_type: str = "bthome",
        *,
        encrypted: bool = False,
        model: str = "LYWSD03MMC",
        measure_count: int = 4,
        flags: int = 0,
        **kw: Any,
    ) -> None:
        if adv_type not in PVVX_ADV_TYPES:
            raise DeviceConfigError(f"must be one of {', '.join(PVVX_ADV_TYPES)}", "adv_type")
        if model not in pvvx_models():
            raise DeviceConfigError(
                f"pvvx firmware does not run on {model!r}; it does on {', '.join(pvvx_models())}", "model"
            )
        if measure_count < 2:
            raise DeviceConfigError("must be at least 2 (firmware minimum)", "measure_count")
        self.adv_type = adv_type
        self.product_id = product_id_for(model)
        self.measure_count = int(measure_count)
        self.flags = flags
        kw.setdefault("oui", "A4:C1:38")
        adv_interval = kw.get("adv_interval") or self.default_adv_interval
        # firmware.md §1.4: measure period = N advertising intervals, capped at 250 s
        kw["measure_interval"] = min(250.0, adv_interval * self.measure_count)
        super().__init__(model=model, encrypted=encrypted, **kw)
        self._mi_ext = self._schedule_rng.randrange(4096)
        self._bthome_counter = self._schedule_rng.randrange(1 << 16)

    def default_name(self) -> str:
        return "ATC_" + self.address.replace(":", "")[-6:]  # as the firmware names itself

    @property
    def format(self) -> str:
        base = {"atc1441": "atc1441", "pvvx": "pvvx", "mi": "mibeacon_v5", "bthome": "bthome_v2"}[self.adv_type]
        return base + ("_enc" if self.encrypted else "")

    def _spec_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {"adv_type": self.adv_type, "encrypted": self.encrypted}
        if self.model != "LYWSD03MMC":
            d["model"] = self.model
        if self.measure_count != 4:
            d["measure_count"] = self.measure_count
        if self.flags:
            d["flags"] = self.flags
        return d

    def _pop(self) -> tuple[float, _Payload]:
        t = self._t_adv
        k = self._adv_count
        self._advance_adv()
        return t, self._build(t, k)

    def _build(self, t: float, k: int) -> _Payload:
        truth = self.truth_at(t)
        key = self._key
        if self.adv_type in ("atc1441", "pvvx"):
            counter = self.measurement_index(t) & 0xFF
            fmt = atc1441 if self.adv_type == "atc1441" else pvvx
            if self.encrypted:
                data = fmt.encode_encrypted(
                    self._mac_le,
                    key,
                    truth.temperature_c,
                    truth.humidity_pct,
                    truth.battery_pct,
                    counter,
                    self.flags & 0xFF if fmt is pvvx else 0,
                )
                return _Payload(CUSTOM_181A, data, flip_from=0)
            if fmt is pvvx:
                data = pvvx.encode_plain(
                    self._mac_le,
                    truth.temperature_c,
                    truth.humidity_pct,
                    truth.battery_pct,
                    truth.voltage_v,
                    counter,
                    self.flags,
                )
            else:
                data = atc1441.encode_plain(
                    self._mac_le, truth.temperature_c, truth.humidity_pct, truth.battery_pct, truth.voltage_v, counter
                )
            return _Payload(CUSTOM_181A, data, cuts=_181A_CUTS)
        if self.adv_type == "mi":
            objects = PVVX_MI_ENCRYPTED_OBJECTS if self.encrypted else PVVX_MI_PLAIN_OBJECTS
            obj = _mi_object(objects[k % len(objects)], truth)
            if self.encrypted:
                self._mi_ext = (self._mi_ext + 1) & 0xFFFFFF
            data = mibeacon.encode(
                mac_le=self._mac_le,
                product_id=self.product_id,
                frame_counter=k & 0xFF,
                objects=[obj],
                version=5,
                key=key if self.encrypted else None,
                ext_counter=self._mi_ext,
            )
            data = _mi_v5_auth(data, 5)
            if self.encrypted:
                return _Payload(MIBEACON, data, flip_from=MI_HEADER_WITH_MAC)
            return _Payload(MIBEACON, data, cuts=_object_cuts(MI_HEADER_WITH_MAC, len(obj)))
        # bthome: alternate the two packets; the packet id (and the encryption counter) change per packet
        counter = (self._bthome_counter + k) & 0xFFFFFFFF
        fixed = {0x00: counter & 0xFF, 0x10: 1 if self.flags & pvvx.FLAG_TRIGGER_OUT else 0}
        packet = PVVX_BTHOME_PACKETS[k % 2]
        objs = [bthome.encode_object(oid, _bthome_value(oid, truth, fixed)) for oid in packet]
        data = bthome.encode_v2(objs, mac_le=self._mac_le, key=key if self.encrypted else None, counter=counter)
        if self.encrypted:
            return _Payload(BTHOME_V2, data, flip_from=1)
        return _Payload(BTHOME_V2, data, cuts=_object_cuts(1, len(objs[0])))


def _bthome_value(oid: int, truth: Truth, fixed: dict[int, int]) -> float:
    name = BTHOME_FIELDS[oid]
    return fixed[oid] if name is None else getattr(truth, name)


# --- BTHome sensors ---------------------------------------------------------------------------------------

# Two packets in turn, so that even an encrypted, MAC-included v2 frame fits 31 bytes with the flags.
BTHOME_PACKETS = ((0x00, 0x02, 0x03), (0x00, 0x01, 0x0C))
BTHOME_TRIGGER_BURST = len(BTHOME_PACKETS)  # a trigger-based device sends each packet once per event


class BTHomeDevice(Device):
    """A generic BTHome sensor (v1 on 0x181C/0x181E or v2 on 0xFCD2), random static address.

    Periodic devices advertise every ``adv_interval`` (default 5 s) and measure every ``measure_interval``
    (default 30 s). Trigger-based (sleepy, v2 device-info bit 2) devices are silent between
    measurements and send one burst of both packets per measurement."""

    kind = "bthome"
    address_type = "random"
    default_adv_interval = 5.0
    default_measure_interval = 30.0

    def __init__(
        self,
        version: int = 2,
        *,
        encrypted: bool = False,
        include_mac: bool = False,
        trigger_based: bool = False,
        model: str = "BTHome",
        **kw: Any,
    ) -> None:
        if version not in (1, 2):
            raise DeviceConfigError("BTHome version must be 1 or 2", "version")
        if version == 1 and (include_mac or trigger_based):
            raise DeviceConfigError("exists in BTHome v2 only", "include_mac" if include_mac else "trigger_based")
        self.version = version
        self.include_mac = include_mac
        self.trigger_based = trigger_based
        super().__init__(model=model, encrypted=encrypted, **kw)
        self._counter = self._schedule_rng.randrange(1 << 16)
        if trigger_based:
            self._t_adv = self._measure_phase
            self._burst = 0

    def default_name(self) -> str:
        return "BTH_" + self.address.replace(":", "")[-6:]

    @property
    def format(self) -> str:
        return f"bthome_v{self.version}" + ("_enc" if self.encrypted else "")

    @property
    def service_uuid(self) -> int:
        if self.version == 2:
            return BTHOME_V2
        return BTHOME_V1_ENC if self.encrypted else BTHOME_V1

    def _spec_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "encrypted": self.encrypted}
        if self.model != "BTHome":
            d["model"] = self.model
        if self.include_mac:
            d["include_mac"] = True
        if self.trigger_based:
            d["trigger_based"] = True
        if self.measure_interval != self.default_measure_interval:
            d["measure_interval"] = self.measure_interval
        return d

    def _advance_trigger(self) -> None:
        self._burst += 1
        self._adv_count += 1
        if self._burst < BTHOME_TRIGGER_BURST:
            self._t_adv += self.adv_interval
            return
        self._burst = 0
        assert self.measure_interval is not None
        period = max(self.measure_interval, self.min_interval)
        last = self.measurement_time(self._t_adv)
        self._t_adv = last + period * max(1, math.ceil((self._t_adv - last + 1e-9) / period))

    def _pop(self) -> tuple[float, _Payload]:
        t = self._t_adv
        k = self._adv_count
        if self.trigger_based:
            self._advance_trigger()
        else:
            self._advance_adv()
        truth = self.truth_at(t)
        counter = (self._counter + k) & 0xFFFFFFFF
        packet = BTHOME_PACKETS[k % 2]
        fixed = {0x00: counter & 0xFF}
        key = self._key if self.encrypted else None
        if self.version == 2:
            objs = [bthome.encode_object(oid, _bthome_value(oid, truth, fixed)) for oid in packet]
            data = bthome.encode_v2(
                objs,
                mac_le=self._mac_le,
                key=key,
                counter=counter,
                include_mac=self.include_mac,
                trigger_based=self.trigger_based,
            )
            head = 7 if self.include_mac else 1
            if self.encrypted:
                return t, _Payload(BTHOME_V2, data, flip_from=head)
            return t, _Payload(BTHOME_V2, data, cuts=_object_cuts(head, len(objs[0])))
        objs = [bthome.encode_v1_object(oid, _bthome_value(oid, truth, fixed)) for oid in packet]
        data = bthome.encode_v1(objs, mac_le=self._mac_le, key=key, counter=counter)
        if self.encrypted:
            return t, _Payload(BTHOME_V1_ENC, data, flip_from=0)
        return t, _Payload(BTHOME_V1, data, cuts=_object_cuts(1, len(objs[0]) - 1))


DEVICE_CLASSES: dict[str, type[Device]] = {"stock": StockDevice, "pvvx": PvvxDevice, "bthome": BTHomeDevice}


__all__ = [
    "BTHOME_PACKETS",
    "DEVICE_CLASSES",
    "PVVX_ADV_TYPES",
    "STOCK_MODELS",
    "BTHomeDevice",
    "Climate",
    "Device",
    "DeviceConfigError",
    "Frame",
    "PvvxDevice",
    "StockDevice",
    "StockModel",
    "Truth",
    "ad_structure",
    "battery_pct_for",
    "build_advertising_data",
    "random_address",
    "random_bindkey",
    "seeded_rng",
]

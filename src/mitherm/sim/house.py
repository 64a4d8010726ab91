"""House files: a TOML description of the virtual devices to simulate, and built-in presets.

::

    seed = 42
    time_factor = 60.0   # 1 real second = 60 simulated seconds
    min_interval = 60.0  # optional: at most one advert per device per 60 simulated seconds

    [[device]]
    kind = "stock"       # stock | pvvx | bthome
    model = "LYWSD03MMC"
    name = "Living room"
    address = "A4:C1:38:00:00:01"   # optional: generated from the seed when missing
    bindkey = "..."                 # optional: generated from the seed when missing

    [[device]]
    kind = "pvvx"
    adv_type = "bthome"  # atc1441 | pvvx | mi | bthome
    encrypted = true

Every field of a device is in ``FIELDS`` below (with its type and which kinds accept it). Errors name the
device as ``device[i].field`` (i counts from 0 in file order). A device without ``seed`` gets
``"<house seed>:<i>"``, so the same file always gives the same devices and bytes.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bindkey import InvalidKey
from ..mac import InvalidMac, normalize_mac
from .devices import (
    CLIMATE_FIELDS,
    DEVICE_CLASSES,
    PVVX_ADV_TYPES,
    STOCK_MODELS,
    BTHomeDevice,
    Device,
    DeviceConfigError,
    PvvxDevice,
    StockDevice,
    random_bindkey,
    seeded_rng,
)


class HouseError(ValueError):
    """A house file problem. ``index`` (0-based device number) and ``field`` say where, when known."""

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None) -> None:
        where = "" if index is None else f"device[{index}]"
        if field:
            where = f"{where}.{field}" if where else field
        super().__init__(f"{where}: {message}" if where else message)
        self.index = index
        self.field = field


# --- field table ---------------------------------------------------------------------------------------

_NUMBER = (int, float)
_KINDS = tuple(DEVICE_CLASSES)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    types: tuple[type, ...]
    kinds: tuple[str, ...]  # which device kinds accept the field
    help: str
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None


def _positive(v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a positive number of seconds"


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(repr, allowed))}"


FIELDS: dict[str, FieldSpec] = {
    "kind": FieldSpec((str,), _KINDS, "stock | pvvx | bthome", _one_of(*_KINDS)),
    "name": FieldSpec((str,), _KINDS, "a label for people (room name)"),
    "address": FieldSpec((str,), _KINDS, "Bluetooth address; generated from the seed when missing"),
    "bindkey": FieldSpec((str,), _KINDS, "32 hex digits; generated when missing (encrypted devices)"),
    "seed": FieldSpec((int, str), _KINDS, "per-device seed (default: '<house seed>:<index>')"),
    "adv_name": FieldSpec((str,), _KINDS, "advertised local name (default: as the firmware names itself)"),
    "adv_interval": FieldSpec(_NUMBER, _KINDS, "seconds between adverts", _positive),
    "encrypted": FieldSpec((bool,), _KINDS, "encrypt with the bindkey"),
    "demo_wrong_key": FieldSpec((bool,), _KINDS, "the demo hands out a wrong key for this device"),
    "model": FieldSpec((str,), ("stock", "pvvx", "bthome"), "hardware model"),
    "version": FieldSpec((int,), ("stock", "bthome"), "MiBeacon version (stock: 3 or 5) / BTHome version (1 or 2)"),
    "data_interval": FieldSpec(_NUMBER, ("stock",), "seconds between readings (default 600)", _positive),
    "adv_type": FieldSpec((str,), ("pvvx",), "atc1441 | pvvx | mi | bthome", _one_of(*PVVX_ADV_TYPES)),
    "measure_count": FieldSpec(
        (int,), ("pvvx",), "measure every N adverts (>= 2)", lambda v: None if v >= 2 else "must be at least 2"
    ),
    "flags": FieldSpec((int,), ("pvvx",), "pvvx flags byte", lambda v: None if 0 <= v <= 255 else "must be 0-255"),
    "include_mac": FieldSpec((bool,), ("bthome",), "BTHome v2: MAC in the frame"),
    "trigger_based": FieldSpec((bool,), ("bthome",), "BTHome v2: sleepy device, one burst per measurement"),
    "measure_interval": FieldSpec(_NUMBER, ("bthome",), "seconds between measurements", _positive),
    "temperature_c": FieldSpec(_NUMBER, _KINDS, "daily mean temperature"),
    "temperature_swing_c": FieldSpec(
        _NUMBER, _KINDS, "daily temperature amplitude", lambda v: None if v >= 0 else "must not be negative"
    ),
    "humidity_pct": FieldSpec(
        _NUMBER, _KINDS, "mean relative humidity", lambda v: None if 0 <= v <= 100 else "must be 0-100"
    ),
    "battery_v": FieldSpec(
        _NUMBER, _KINDS, "battery voltage at the start", lambda v: None if 2.0 <= v <= 3.3 else "must be 2.0-3.3 V"
    ),
}
TOP_FIELDS = {"seed": (int,), "time_factor": _NUMBER, "min_interval": _NUMBER, "name": (str,), "device": (list,)}


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # TOML true is not a number
    return isinstance(value, types)


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "an array"}
    if types == _NUMBER:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


# --- building devices ---------------------------------------------------------------------------------


def _check_device(entry: Any, i: int) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise HouseError("must be a table ([[device]])", index=i)
    kind = entry.get("kind")
    if kind is None:
        raise HouseError(f"missing; one of {', '.join(_KINDS)}", index=i, field="kind")
    for key, value in entry.items():
        spec = FIELDS.get(key)
        if spec is None:
            raise HouseError(f"unknown field (known: {', '.join(FIELDS)})", index=i, field=key)
        if not _type_ok(value, spec.types):
            raise HouseError(f"must be {_type_names(spec.types)}, not {value!r}", index=i, field=key)
        problem = spec.check(value) if spec.check else None
        if problem:
            raise HouseError(f"{problem} (got {value!r})", index=i, field=key)
        if kind in _KINDS and kind not in spec.kinds:
            raise HouseError(f"not a field of {kind} devices", index=i, field=key)
    return entry


def _device_kwargs(entry: dict[str, Any], i: int, house_seed: Any, min_interval: float) -> dict[str, Any]:
    kind = entry["kind"]
    model = entry.get("model")
    encrypted = entry.get("encrypted")
    if kind == "stock" and model is None:
        raise HouseError(f"missing; one of {', '.join(STOCK_MODELS)}", index=i, field="model")
    kw: dict[str, Any] = {
        "seed": entry.get("seed", f"{house_seed}:{i}"),
        "address": entry.get("address"),
        "bindkey": entry.get("bindkey"),
        "label": entry.get("name"),
        "name": entry.get("adv_name"),
        "adv_interval": entry.get("adv_interval"),
        "min_interval": min_interval,
        "climate": {f: float(entry[f]) for f in CLIMATE_FIELDS if f in entry},
        "demo_wrong_key": entry.get("demo_wrong_key", False),
    }
    if kind == "stock":
        kw.update(
            model=model, encrypted=encrypted, version=entry.get("version"), data_interval=entry.get("data_interval")
        )
    elif kind == "pvvx":
        kw.update(
            adv_type=entry.get("adv_type", "bthome"),
            encrypted=bool(encrypted),
            model=model or "LYWSD03MMC",
            measure_count=entry.get("measure_count", 4),
            flags=entry.get("flags", 0),
        )
    else:
        kw.update(
            version=entry.get("version", 2),
            encrypted=bool(encrypted),
            model=model or "BTHome",
            include_mac=entry.get("include_mac", False),
            trigger_based=entry.get("trigger_based", False),
            measure_interval=entry.get("measure_interval"),
        )
    return kw


def make_device(entry: dict[str, Any], index: int = 0, *, house_seed: Any = 0, min_interval: float = 0.0) -> Device:
    """One device from a ``[[device]]`` table (validated; errors are HouseError)."""
    _check_device(entry, index)
    kw = _device_kwargs(entry, index, house_seed, min_interval)
    cls = DEVICE_CLASSES[entry["kind"]]
    try:
        return cls(**kw)
    except DeviceConfigError as e:
        raise HouseError(str(e), index=index, field=e.field) from None
    except InvalidMac as e:
        raise HouseError(str(e), index=index, field="address") from None
    except InvalidKey as e:
        raise HouseError(str(e), index=index, field="bindkey") from None


# --- the house ----------------------------------------------------------------------------------------


class House:
    """A set of virtual devices with a seed and a time factor."""

    def __init__(
        self,
        devices: list[Device],
        *,
        seed: int = 0,
        time_factor: float = 1.0,
        min_interval: float = 0.0,
        name: str | None = None,
    ) -> None:
        self.devices = devices
        self.seed = seed
        self.time_factor = time_factor
        self.min_interval = min_interval
        self.name = name

    def __repr__(self) -> str:
        return f"<House {self.name or ''} seed={self.seed} {len(self.devices)} devices ×{self.time_factor}>"

    def __iter__(self):
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def device(self, address_or_label: str) -> Device:
        for d in self.devices:
            if d.label == address_or_label:
                return d
        try:
            mac = normalize_mac(address_or_label)
        except InvalidMac:
            mac = None
        for d in self.devices:
            if d.address == mac:
                return d
        raise KeyError(address_or_label)

    def keys(self) -> dict[str, str]:
        """Address -> current bindkey of every encrypted device (after any ``rekey``)."""
        return {d.address: d.bindkey for d in self.devices if d.bindkey}

    def demo_keys(self) -> dict[str, str]:
        """``keys()`` with the key of each ``demo_wrong_key`` device replaced by a plausible wrong one
        (32 random hex digits, as a key from before a re-pairing would look)."""
        keys = self.keys()
        for i, d in enumerate(self.devices):
            if d.demo_wrong_key and d.bindkey:
                wrong = random_bindkey(seeded_rng(f"{self.seed}:{i}", "demo-wrong-key"))
                keys[d.address] = wrong if wrong != d.bindkey else wrong[::-1]
        return keys

    def to_toml(self) -> str:
        """A house file that recreates these devices (generated addresses and keys written out)."""
        lines: list[str] = []
        if self.name:
            lines.append(f"name = {_toml_value(self.name)}")
        lines.append(f"seed = {_toml_value(self.seed)}")
        lines.append(f"time_factor = {_toml_value(float(self.time_factor))}")
        if self.min_interval:
            lines.append(f"min_interval = {_toml_value(float(self.min_interval))}")
        for i, d in enumerate(self.devices):
            lines.append("")
            lines.append("[[device]]")
            spec = d.spec()
            if d.seed != f"{self.seed}:{i}":
                spec["seed"] = d.seed
            for key, value in spec.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} cannot be written to TOML here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    raise TypeError(f"cannot write {type(v).__name__} to a house file")


def parse_house(data: dict[str, Any]) -> House:
    for key, value in data.items():
        types = TOP_FIELDS.get(key)
        if types is None:
            raise HouseError(f"unknown top-level field (known: {', '.join(TOP_FIELDS)})", field=key)
        if not _type_ok(value, types):
            raise HouseError(f"must be {_type_names(types)}, not {value!r}", field=key)
    seed = data.get("seed", 0)
    time_factor = float(data.get("time_factor", 1.0))
    if not (time_factor > 0 and math.isfinite(time_factor)):
        raise HouseError("must be a positive number", field="time_factor")
    min_interval = float(data.get("min_interval", 0.0))
    if not (min_interval >= 0 and math.isfinite(min_interval)):
        raise HouseError("must be zero or a positive number of seconds", field="min_interval")
    entries = data.get("device", [])
    if not entries:
        raise HouseError("a house needs at least one [[device]]", field="device")
    devices: list[Device] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        d = make_device(entry, i, house_seed=seed, min_interval=min_interval)
        if d.address in seen:
            raise HouseError(f"{d.address} is also device[{seen[d.address]}]", index=i, field="address")
        seen[d.address] = i
        devices.append(d)
    return House(devices, seed=seed, time_factor=time_factor, min_interval=min_interval, name=data.get("name"))


def load_house(source: str | os.PathLike[str]) -> House:
    """A house from a file path or from TOML text (a string with a newline or '=' is taken as text)."""
    if isinstance(source, os.PathLike) or ("\n" not in source and "=" not in source):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise HouseError(f"cannot read house file {str(path)!r}: {e.strerror or e}") from None
    else:
        text = source
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HouseError(f"not valid TOML: {e}") from None
    return parse_house(data)


# --- presets ------------------------------------------------------------------------------------------

_DEMO = """
name = "demo"
seed = 42
time_factor = 60.0   # a simulated day in 24 minutes; stock sensors send a reading every 10 s
min_interval = 60.0  # one advert per device per simulated minute (= per real second)

# stock firmware: encrypted MiBeacon v5, a reading every 10 minutes
[[device]]
kind = "stock"
model = "LYWSD03MMC"
name = "Living room"

[[device]]
kind = "stock"
model = "MHO-C401"
name = "Bedroom"

[[device]]
kind = "stock"
model = "CGG1"
name = "Kitchen"      # plain MiBeacon v5 (product id 0x0347)

[[device]]
kind = "stock"
model = "CGG1"
encrypted = true
name = "Hallway"      # CGG1-ENCRYPTED (product id 0x0B48)

[[device]]
kind = "stock"
model = "CGDK2"
name = "Office"

[[device]]
kind = "stock"
model = "LYWSD03MMC"
name = "Garage"
demo_wrong_key = true  # the demo hands out a wrong key for this one

# pvvx custom firmware, every advertising format, plain and encrypted
[[device]]
kind = "pvvx"
adv_type = "atc1441"
name = "Bathroom"

[[device]]
kind = "pvvx"
adv_type = "atc1441"
encrypted = true
name = "Attic"

[[device]]
kind = "pvvx"
adv_type = "pvvx"
name = "Nursery"

[[device]]
kind = "pvvx"
adv_type = "pvvx"
encrypted = true
name = "Cellar"

[[device]]
kind = "pvvx"
adv_type = "mi"
name = "Study"

[[device]]
kind = "pvvx"
adv_type = "mi"
encrypted = true
name = "Guest room"

[[device]]
kind = "pvvx"
adv_type = "bthome"
name = "Dining room"

[[device]]
kind = "pvvx"
adv_type = "bthome"
encrypted = true
model = "MHO-C401"
name = "Workshop"

# generic BTHome sensors
[[device]]
kind = "bthome"
version = 1
name = "Balcony"
temperature_c = 12.0
humidity_pct = 70.0

[[device]]
kind = "bthome"
version = 1
encrypted = true
name = "Greenhouse"
temperature_c = 26.0
humidity_pct = 75.0

[[device]]
kind = "bthome"
version = 2
name = "Freezer"
temperature_c = -18.0
temperature_swing_c = 0.5
humidity_pct = 30.0

[[device]]
kind = "bthome"
version = 2
encrypted = true
name = "Fridge"
temperature_c = 4.5
temperature_swing_c = 0.5

[[device]]
kind = "bthome"
version = 2
encrypted = true
include_mac = true
trigger_based = true
name = "Shed"
temperature_c = 15.0
"""

_MINIMAL = """
name = "minimal"
seed = 1
time_factor = 60.0
min_interval = 60.0

[[device]]
kind = "stock"
model = "LYWSD03MMC"
name = "Living room"

[[device]]
kind = "pvvx"
adv_type = "bthome"
name = "Bedroom"
"""

BUILTIN_HOUSES: dict[str, str] = {"demo": _DEMO, "minimal": _MINIMAL}


def builtin_house(
    name: str = "demo", *, seed: int | None = None, time_factor: float | None = None, min_interval: float | None = None
) -> House:
    """A preset house: ``demo`` (every device type and format) or ``minimal``; overrides optional."""
    text = BUILTIN_HOUSES.get(name)
    if text is None:
        raise KeyError(f"no built-in house {name!r}; there are {', '.join(BUILTIN_HOUSES)}")
    data = tomllib.loads(text)
    if seed is not None:
        data["seed"] = seed
    if time_factor is not None:
        data["time_factor"] = time_factor
    if min_interval is not None:
        data["min_interval"] = min_interval
    return parse_house(data)


__all__ = [
    "BUILTIN_HOUSES",
    "FIELDS",
    "BTHomeDevice",
    "House",
    "HouseError",
    "PvvxDevice",
    "StockDevice",
    "builtin_house",
    "load_house",
    "make_device",
    "parse_house",
]

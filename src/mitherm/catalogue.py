"""The device catalogue, as data (``data/devices.toml``), validated when it is loaded."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

KNOWN_FORMATS = frozenset(
    f"{base}{suffix}"
    for base in (
        "mibeacon_v2",
        "mibeacon_v3",
        "mibeacon_v4",
        "mibeacon_v5",
        "atc1441",
        "pvvx",
        "bthome_v1",
        "bthome_v2",
    )
    for suffix in ("", "_enc")
)
KNOWN_MEASURES = frozenset({"temperature", "humidity", "battery", "illuminance", "moisture", "conductivity"})


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    product_id: int
    model: str
    name: str
    manufacturer: str
    measures: tuple[str, ...]
    formats: tuple[str, ...]
    stock_encrypted: bool
    custom_firmware: str | None = None
    notes: str | None = None


class CatalogueError(ValueError):
    pass


def _validate(entry: dict, index: int) -> DeviceInfo:
    where = f"devices.toml entry {index + 1} ({entry.get('model', '?')})"
    required = {
        "product_id": int,
        "model": str,
        "name": str,
        "manufacturer": str,
        "measures": list,
        "formats": list,
        "stock_encrypted": bool,
    }
    for key, typ in required.items():
        if not isinstance(entry.get(key), typ):
            raise CatalogueError(f"{where}: field {key!r} missing or not {typ.__name__}")
    unknown = set(entry) - set(required) - {"custom_firmware", "notes"}
    if unknown:
        raise CatalogueError(f"{where}: unknown fields {sorted(unknown)}")
    if not 0 <= entry["product_id"] <= 0xFFFF:
        raise CatalogueError(f"{where}: product_id out of range")
    bad = set(entry["formats"]) - KNOWN_FORMATS
    if bad:
        raise CatalogueError(f"{where}: unknown formats {sorted(bad)}")
    bad = set(entry["measures"]) - KNOWN_MEASURES
    if bad:
        raise CatalogueError(f"{where}: unknown measures {sorted(bad)}")
    return DeviceInfo(
        product_id=entry["product_id"],
        model=entry["model"],
        name=entry["name"],
        manufacturer=entry["manufacturer"],
        measures=tuple(entry["measures"]),
        formats=tuple(entry["formats"]),
        stock_encrypted=entry["stock_encrypted"],
        custom_firmware=entry.get("custom_firmware"),
        notes=entry.get("notes"),
    )


def load_catalogue(text: str) -> dict[int, DeviceInfo]:
    data = tomllib.loads(text)
    devices: dict[int, DeviceInfo] = {}
    for i, entry in enumerate(data.get("device", [])):
        info = _validate(entry, i)
        if info.product_id in devices:
            raise CatalogueError(f"devices.toml: product id 0x{info.product_id:04X} listed twice")
        devices[info.product_id] = info
    return devices


@cache
def catalogue() -> dict[int, DeviceInfo]:
    text = resources.files("mitherm").joinpath("data/devices.toml").read_text(encoding="utf-8")
    return load_catalogue(text)


def by_product_id(product_id: int) -> DeviceInfo | None:
    return catalogue().get(product_id)


def model_for(product_id: int) -> str | None:
    info = catalogue().get(product_id)
    return info.model if info else None

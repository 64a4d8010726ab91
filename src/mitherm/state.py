"""Per-device state kept by the gateway: the merged latest values of one sensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import Value


class KeyStatus:
    VERIFIED = "verified"  # the key decrypts this device's frames
    FAILED = "key_failed"  # the key does not work: see DeviceState.key_verdict
    MISSING = "missing"  # encrypted frames and no key
    NOT_NEEDED = "not_needed"  # the device sends plain frames
    UNKNOWN = "unknown"  # no data frame seen yet


@dataclass(slots=True)
class DeviceState:
    """The merged view of one device (stock sensors send temperature, humidity and battery separately).

    ``values`` holds the latest value of each quantity (``temperature_c``, ``humidity_pct``,
    ``battery_pct``, ``voltage_v``, …); ``updated`` the Unix time of each. ``rssi``/``receiver`` are from
    the best receiver of the newest frame."""

    mac: str
    name: str | None = None
    model: str | None = None
    product_id: int | None = None
    format: str | None = None
    values: dict[str, Value] = field(default_factory=dict)
    updated: dict[str, float] = field(default_factory=dict)
    rssi: int | None = None
    receiver: str | None = None
    last_seen: float = 0.0
    first_seen: float = 0.0
    key_status: str = KeyStatus.UNKNOWN
    key_verdict: str | None = None  # the doctor's verdict when key_status is key_failed
    #: seconds between data frames as observed (for expire_after / availability), None until known
    data_interval: float | None = None
    known: bool = False  # has a keystore entry or a name given by the user

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "name": self.name,
            "model": self.model,
            "format": self.format,
            "values": dict(self.values),
            "rssi": self.rssi,
            "receiver": self.receiver,
            "last_seen": self.last_seen,
            "key_status": self.key_status,
            "key_verdict": self.key_verdict,
        }

"""The values that flow through mitherm: source -> Advertisement -> decode -> Reading -> sinks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

Value = int | float | bool | str


class ErrorCode(StrEnum):
    """Why a frame did not decode. Expected outcomes, returned as values (never raised)."""

    WRONG_KEY = "wrong_key"  # integrity check failed (MIC / tag byte)
    NO_KEY = "no_key"  # encrypted frame and no key for this device
    BAD_KEY = "bad_key"  # key is not hex, or has a length this format cannot use
    MALFORMED = "malformed"  # truncated or inconsistent frame
    MAC_MISMATCH = "mac_mismatch"  # MAC inside the frame is not the sender's address
    UNSUPPORTED = "unsupported"  # a frame we recognise but do not decode, or an unknown format


@dataclass(slots=True, frozen=True)
class DecodeError:
    code: ErrorCode
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


@dataclass(slots=True)
class Reading:
    """What one frame says. Stock sensors send temperature, humidity and battery in separate frames;
    merging them per device is the gateway's job."""

    mac: str
    service_uuid: int
    format: str | None = None
    model: str | None = None
    product_id: int | None = None
    encrypted: bool = False
    #: MiBeacon frame counter (1 byte), atc1441/pvvx measurement counter, BTHome encryption counter
    #: (encrypted) or packet id (plain, when sent).
    frame_counter: int | None = None
    #: MiBeacon v4/v5 and legacy extended counter (3 bytes) of encrypted frames.
    ext_counter: int | None = None
    values: dict[str, Value] = field(default_factory=dict)
    error: DecodeError | None = None
    mac_in_frame: str | None = None
    #: (object id, raw bytes) as carried (decrypted) in the frame, for MiBeacon and BTHome.
    objects: list[tuple[int, bytes]] = field(default_factory=list)
    #: An unencrypted frame whose last object was cut off: the complete objects before it are kept.
    truncated: bool = False
    #: Something worth knowing that is not an error (why parsing stopped early, an unknown object …).
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def has_data(self) -> bool:
        """True when the frame carries measurement objects (decrypted or not)."""
        return bool(self.values) or bool(self.objects)

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "format": self.format,
            "model": self.model,
            "product_id": None if self.product_id is None else f"0x{self.product_id:04X}",
            "encrypted": self.encrypted,
            "frame_counter": self.frame_counter,
            "values": self.values,
            "truncated": self.truncated,
            "note": self.note,
            "error": None if self.error is None else self.error.to_json(),
        }


@dataclass(slots=True)
class Advertisement:
    """One received advertisement, the same value whatever the source (radio, proxy, capture, simulator).

    ``service_data`` is keyed by the 16-bit service UUID (0xFE95, 0x181A, 0x181C, 0x181E, 0xFCD2, ...);
    ``manufacturer_data`` by company id. ``time`` is the Unix time of reception (the capture's clock for
    replays). ``source`` names the receiver (adapter, proxy, capture file)."""

    mac: str
    time: float
    service_data: Mapping[int, bytes] = field(default_factory=dict)
    rssi: int | None = None
    name: str | None = None
    address_type: str | None = None  # "public" | "random" | None when the source does not say
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    source: str = ""

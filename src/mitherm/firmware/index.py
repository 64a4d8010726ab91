"""The firmware image index shipped with mitherm (``index.json``): which pvvx build and which stock image
fit a given model / hardware revision / pvvx HW id. Data only, validated on load; no downloads.

Facts come from pvvx/ATC_MiThermometer ``firmware.json`` (one file name per HW id in the ``custom``,
``original`` and ``signed`` arrays), the README / ``src/app.h`` HW id table and the flasher's stock DIS
hardware strings (shared/reference/firmware.md §2.2, §2.6, §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = [
    "Build",
    "FirmwareIndex",
    "FirmwareIndexError",
    "Hardware",
    "Match",
    "firmware_index",
]


class FirmwareIndexError(ValueError):
    """index.json does not have the expected shape."""


@dataclass(frozen=True, slots=True)
class Build:
    """One pvvx BLE build (one file per firmware version)."""

    name: str  # "ATC", "MHO_C401N" …
    file: str  # "ATC_v{v}.bin"
    image_type: int  # 0x02nn at image offset 0x14
    type_checked: bool  # checked against a real image (else: assumed 0x02 | HW id)
    models: tuple[str, ...]
    hw_ids: tuple[int, ...]

    def file_name(self, version: str) -> str:
        """``ATC_v58.bin`` for version "5.8"."""
        return self.file.format(v=version.replace(".", ""))


@dataclass(frozen=True, slots=True)
class Hardware:
    """One hardware revision, by pvvx HW id (config byte 9 / image type low byte)."""

    hw_id: int
    model: str
    revision: str
    dis_hw: tuple[str, ...]  # Device Information hardware-revision strings stock firmware reports
    build: str
    original: str | None = None  # stock image to go back to
    signed: str | None = None  # signed intermediate for stock 2.1.1_0159
    ambiguous_with: int | None = None  # stock firmware cannot tell these two apart (MHO-C401)
    original_needs_ext_ota: bool = False
    note: str | None = None

    @property
    def label(self) -> str:
        rev = f" {self.revision}" if self.revision else ""
        return f"{self.model}{rev} (HW id {self.hw_id})"


@dataclass(frozen=True, slots=True)
class Match:
    """What fits a device: the hardware candidates (two for an MHO-C401 on stock firmware) and their files."""

    candidates: tuple[Hardware, ...]
    version: str

    @property
    def ambiguous(self) -> bool:
        return len({h.build for h in self.candidates}) > 1

    def as_dict(self, index: FirmwareIndex) -> list[dict[str, Any]]:
        out = []
        for hw in self.candidates:
            build = index.builds[hw.build]
            out.append(
                {
                    "hw_id": hw.hw_id,
                    "model": hw.model,
                    "revision": hw.revision,
                    "build": build.name,
                    "image_type": f"0x{build.image_type:04X}",
                    "custom": build.file_name(self.version),
                    "original": hw.original,
                    "signed": hw.signed,
                    "note": hw.note,
                }
            )
        return out


class FirmwareIndex:
    def __init__(self, doc: dict[str, Any]) -> None:
        try:
            self.pvvx_version: str = str(doc["pvvx_version"])
            self.builds: dict[str, Build] = {
                name: Build(
                    name=name,
                    file=b["file"],
                    image_type=int(b["image_type"], 16),
                    type_checked=bool(b["type_checked"]),
                    models=tuple(b["models"]),
                    hw_ids=tuple(int(i) for i in b["hw_ids"]),
                )
                for name, b in doc["builds"].items()
            }
            self.hardware: dict[int, Hardware] = {}
            for h in doc["hardware"]:
                hw = Hardware(
                    hw_id=int(h["hw_id"]),
                    model=h["model"],
                    revision=h.get("revision", ""),
                    dis_hw=tuple(h.get("dis_hw", ())),
                    build=h["build"],
                    original=h.get("original"),
                    signed=h.get("signed"),
                    ambiguous_with=h.get("ambiguous_with"),
                    original_needs_ext_ota=bool(h.get("original_needs_ext_ota", False)),
                    note=h.get("note"),
                )
                if hw.hw_id in self.hardware:
                    raise FirmwareIndexError(f"HW id {hw.hw_id} listed twice")
                self.hardware[hw.hw_id] = hw
            stock = doc["stock_0159"]
            self.stock_0159_version: str = stock["version"]
            self.stock_0159_models: tuple[str, ...] = tuple(stock["models"])
            self.stock_0159_signed: str = stock["signed_image"]
        except (KeyError, TypeError, ValueError) as e:
            raise FirmwareIndexError(f"firmware index: bad entry ({e!r})") from e
        for hw in self.hardware.values():
            build = self.builds.get(hw.build)
            if build is None:
                raise FirmwareIndexError(f"HW id {hw.hw_id}: unknown build {hw.build!r}")
            if hw.hw_id not in build.hw_ids or hw.model not in build.models:
                raise FirmwareIndexError(f"HW id {hw.hw_id}: build {build.name} does not list it")
        for build in self.builds.values():
            if build.image_type >> 8 != 0x02:
                raise FirmwareIndexError(f"build {build.name}: image type must be 0x02nn (TLSR825x)")

    # lookups ------------------------------------------------------------------------------------------

    def build_for_image_type(self, image_type: int) -> Build | None:
        for build in self.builds.values():
            if build.image_type == image_type:
                return build
        return None

    def build_for_file(self, name: str) -> Build | None:
        """The build a file name belongs to (``MHO_C401N_v58.bin`` → MHO_C401N, never MHO_C401)."""
        stem = name.rsplit("/", 1)[-1]
        best = None
        for build in self.builds.values():
            prefix = build.file.split("{", 1)[0]
            if stem.startswith(prefix) and (best is None or len(prefix) > len(best.file.split("{", 1)[0])):
                best = build
        return best

    def models(self) -> list[str]:
        return sorted({h.model for h in self.hardware.values()})

    def by_model(self, model: str) -> list[Hardware]:
        return [h for h in self.hardware.values() if h.model.lower() == model.lower()]

    def hw_id_for_dis(self, model: str, dis_hw: str) -> int | None:
        for h in self.by_model(model):
            if dis_hw.strip() in h.dis_hw:
                return h.hw_id
        return None

    def original_for_file(self, name: str) -> list[Hardware]:
        """Hardware whose stock image (or signed intermediate) has this file name."""
        stem = name.rsplit("/", 1)[-1]
        return [h for h in self.hardware.values() if stem in (h.original, h.signed)]

    def match(self, model: str | None, hw_id: int | None = None, dis_hw: str | None = None) -> Match:
        """The hardware candidates for a device. With a HW id (pvvx firmware) there is one; stock firmware
        gives the model and its DIS hardware string, and an MHO-C401 stays ambiguous (firmware.md §2.6)."""
        if hw_id is not None and hw_id in self.hardware:
            return Match((self.hardware[hw_id],), self.pvvx_version)
        if model:
            if dis_hw:
                found = self.hw_id_for_dis(model, dis_hw)
                if found is not None:
                    hw = self.hardware[found]
                    if hw.ambiguous_with is None:
                        return Match((hw,), self.pvvx_version)
            cands = self.by_model(model)
            return Match(tuple(cands), self.pvvx_version)
        return Match((), self.pvvx_version)


@cache
def firmware_index() -> FirmwareIndex:
    text = resources.files("mitherm.firmware").joinpath("index.json").read_text(encoding="utf-8")
    return FirmwareIndex(json.loads(text))

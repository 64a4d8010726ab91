"""Firmware images for Telink thermometers: checks before flashing and the shipped image index."""

from __future__ import annotations

from .image import (
    EXT_OTA_MAX_SIZE,
    LEGACY_OTA_MAX_SIZE,
    MIN_BATTERY_PCT,
    FirmwareImage,
    FlashPlan,
    FlashRefused,
    TargetDevice,
    build_test_image,
    crc32_telink,
    parse_image,
    plan_flash,
    pvvx_version_bcd,
    pvvx_version_text,
)
from .index import Build, FirmwareIndex, Hardware, Match, firmware_index

__all__ = [
    "EXT_OTA_MAX_SIZE",
    "LEGACY_OTA_MAX_SIZE",
    "MIN_BATTERY_PCT",
    "Build",
    "FirmwareImage",
    "FirmwareIndex",
    "FlashPlan",
    "FlashRefused",
    "Hardware",
    "Match",
    "TargetDevice",
    "build_test_image",
    "crc32_telink",
    "firmware_index",
    "parse_image",
    "plan_flash",
    "pvvx_version_bcd",
    "pvvx_version_text",
]

"""Device Information (0x180A) for every virtual device: the strings `mitherm info` tells firmware apart by.

* stock: model, the stock firmware revision (``device.firmware``, default per model below), hardware
  revision, manufacturer; LYWSD03MMC ``1.0.0_0130`` accepts activation, ``2.1.1_0159`` does not;
* pvvx: firmware revision ``github.com/pvvx``, software ``V5.8`` (``device.firmware_version``, BCD
  0x58), hardware revision per model (pvvx ``src/app_att.c`` strings as summarised in firmware.md §1.1);
* BTHome and anything else: a generic DIY identity.

Optional device attributes override the defaults: ``firmware``, ``hardware``, ``software``,
``manufacturer``, ``firmware_version`` (pvvx, int).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["STOCK_DIS", "DisStrings", "dis_strings", "install"]

DIS_SERVICE = "180a"
MODEL, SERIAL, FIRMWARE, HARDWARE, SOFTWARE, MANUFACTURER = "2a24", "2a25", "2a26", "2a27", "2a28", "2a29"


@dataclass(frozen=True, slots=True)
class DisStrings:
    model: str
    firmware: str
    hardware: str
    software: str
    manufacturer: str


# Stock defaults: firmware versions from firmware.md §3 (LYWSD03MMC 1.0.0_0130 on B1.4-B2.0, MHO-C401
# 1.0.0_0010 with HW "V_14") and the flasher's list of original images (CGG1 1.0.1_0093, CGDK2
# 1.1.1_0217). The software revision of stock firmware is not in the references: the build number is
# used as a stand-in. The manufacturer string is the one pvvx keeps for these models.
STOCK_DIS: dict[str, DisStrings] = {
    "LYWSD03MMC": DisStrings("LYWSD03MMC", "1.0.0_0130", "B1.4", "0130", "miaomiaoce.com"),
    "MHO-C401": DisStrings("MHO-C401", "1.0.0_0010", "V_14", "0010", "miaomiaoce.com"),
    "CGG1": DisStrings("CGG1", "1.0.1_0093", "Qingping Temp & RH M", "0093", "Qingping"),
    "CGDK2": DisStrings("CGDK2", "1.1.1_0217", "Qingping Temp RH Lite", "0217", "Qingping"),
}
#: pvvx hardware revision strings per model (firmware.md §1.1: "B1.4"…"B1.9", "2022", "0001", "V2.3")
PVVX_HARDWARE = {
    "LYWSD03MMC": "B1.4",
    "MHO-C401": "2020",
    "MHO-C401N": "2022",
    "MJWSD05MMC": "V2.3",
}
PVVX_DEFAULT_VERSION = 0x58


def dis_strings(device: Any) -> DisStrings:
    kind = getattr(device, "kind", "")
    model = str(getattr(device, "model", "") or "unknown")
    if kind == "stock":
        base = STOCK_DIS.get(model, DisStrings(model, "1.0.0_0001", "0000", "0001", "Xiaomi"))
    elif kind == "pvvx":
        version = int(getattr(device, "firmware_version", None) or PVVX_DEFAULT_VERSION)
        software = f"V{version >> 4}.{version & 0x0F}"
        base = DisStrings(model, "github.com/pvvx", PVVX_HARDWARE.get(model, "0001"), software, "miaomiaoce.com")
    else:
        base = DisStrings(model, "1.0", "1.0", "1.0", "DIY")
    return DisStrings(
        model=base.model,
        firmware=str(getattr(device, "firmware", None) or base.firmware),
        hardware=str(getattr(device, "hardware", None) or base.hardware),
        software=str(getattr(device, "software", None) or base.software),
        manufacturer=str(getattr(device, "manufacturer", None) or base.manufacturer),
    )


def install(server: Any, device: Any) -> None:
    from ..gatt_server import CharSpec

    def reader(name: str):
        # read at request time, so that a firmware change in a test or demo shows at once
        return lambda: getattr(dis_strings(device), name).encode()

    serial = device.address.replace(":", "")[-6:].encode()
    server.add_service(
        DIS_SERVICE,
        [
            CharSpec(MODEL, {"read"}, on_read=reader("model")),
            CharSpec(SERIAL, {"read"}, value=serial),
            CharSpec(FIRMWARE, {"read"}, on_read=reader("firmware")),
            CharSpec(HARDWARE, {"read"}, on_read=reader("hardware")),
            CharSpec(SOFTWARE, {"read"}, on_read=reader("software")),
            CharSpec(MANUFACTURER, {"read"}, on_read=reader("manufacturer")),
        ],
    )

"""The device side of the GATT protocols for virtual devices.

Each module here exposes ``install(server: GattServer, device: Device) -> None`` and adds its services when
they apply to that device (stock firmware: Device Information, Mi auth, stock settings, Telink OTA; pvvx
firmware: Device Information, the 0x1F10 command channel, Telink OTA). ``serve_gatt`` assembles them."""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger(__name__)

#: device-side modules, in GATT table order
MODULES = ("dis", "miauth", "stock", "pvvx", "ota")


async def serve_gatt(advertiser: Any, device: Any) -> Any:
    """Make ``advertiser`` connectable with the GATT services of ``device``. Returns the GattServer."""
    from ..gatt_server import GattServer

    server = GattServer(advertiser)
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        module.install(server, device)
    await server.start()
    device.gatt = server
    return server

"""The simulator as a source: virtual devices advertise on a Bumble virtual radio and mitherm receives them
through bleak with the Bumble backend — the same scanning code path as a real adapter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from . import Emit, SourceError

log = logging.getLogger(__name__)

#: real-time advertising interval of a virtual advertiser; each payload is repeated until the next one,
#: as a real sensor does (the gateway's dedupe folds the repeats)
ADVERTISER_INTERVAL_MS = 250.0


def load_house_spec(spec: str, time_factor: float | None = None) -> Any:
    from ..sim.house import HouseError, builtin_house, load_house

    try:
        if spec in ("", "demo", "minimal"):
            return builtin_house(spec or "demo", time_factor=time_factor)
        if not Path(spec).is_file():
            raise SourceError(f"house file {spec} does not exist (or use sim:demo for the built-in house)")
        house = load_house(Path(spec))
    except HouseError as e:
        raise SourceError(f"house file {spec}: {e}") from e
    if time_factor:
        house.time_factor = time_factor
    return house


class SimSource:
    def __init__(
        self,
        spec: str = "demo",
        *,
        time_factor: float | None = None,
        house: Any = None,
        radio: Any = None,
        name: str = "sim",
        gatt: bool = False,
    ) -> None:
        self.house = house if house is not None else load_house_spec(spec, time_factor)
        self.radio = radio  # an external VirtualRadio (e.g. shared with `mitherm sim`), else our own
        self.name = name
        self.simulator: Any = None
        self.gatt = gatt  # also serve each device's GATT services (Mi auth, settings, pvvx, OTA)
        self.advertisers: dict[str, Any] = {}

    async def _advertise(self, radio: Any) -> None:
        from ..sim.runner import Simulator

        for d in self.house.devices:
            self.advertisers[d.address] = await radio.add_advertiser(
                d.address, d.address_type, interval_ms=ADVERTISER_INTERVAL_MS, start=False
            )
            if self.gatt:
                from ..sim.gatt import serve_gatt

                await serve_gatt(self.advertisers[d.address], d)
        self.simulator = sim = Simulator(self.house)
        last: dict[str, float] = {}
        loop = asyncio.get_running_loop()

        async def sink(device: Any, ad: bytes) -> None:
            adv = self.advertisers[device.address]
            await adv.set_data(ad)
            if not adv.is_advertising:
                await adv.start()
            last[device.address] = loop.time()

        async def silence_watch() -> None:
            # a device that stopped sending (dropped out) must stop advertising its last payload too
            while True:
                await asyncio.sleep(0.5)
                now = sim.now
                for d in self.house.devices:
                    adv = self.advertisers[d.address]
                    if adv.is_advertising and d.is_silent(now):
                        await adv.stop()

        watch = asyncio.create_task(silence_watch())
        try:
            await sim.run(sink, realtime=True)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def run(self, emit: Emit) -> None:
        from ..radio.virtual import VirtualRadio
        from .bleak_source import BleakSource

        own = self.radio is None
        radio = VirtualRadio() if own else self.radio
        if own:
            await radio.start()
        try:
            scanner = BleakSource(bumble_radio=radio, name=self.name, silence=3600)
            await asyncio.gather(self._advertise(radio), scanner.run(emit))
        finally:
            if own:
                await radio.stop()

"""Advert sources: each turns something (a radio, a proxy, a capture, the simulator) into Advertisements.

A source is an object with ``name`` and ``async run(emit)``; ``emit(adv)`` is called for every
advertisement. ``run`` returns when the source is exhausted (a capture) and runs until cancelled otherwise.
``open_source(url)`` builds one from a ``--source`` URL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..model import Advertisement

Emit = Callable[[Advertisement], None]


class Source(Protocol):
    name: str

    async def run(self, emit: Emit) -> None: ...


class SourceError(ValueError):
    """A source URL or configuration that cannot work; the message says why and what to do."""


def open_source(url: str, **options: object) -> Source:
    """``bleak:`` / ``bleak:hci1`` / ``bumble:usb:0`` / ``capture:PATH`` / ``sim:PATH`` / ``sim:demo``."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "bleak":
        from .bleak_source import BleakSource

        return BleakSource(adapter=rest or None, passive=bool(options.get("passive")))
    if scheme == "bumble":
        from .bleak_source import BleakSource

        if not rest:
            raise SourceError("bumble: needs a transport, e.g. bumble:usb:0 or bumble:tcp-client:127.0.0.1:9000")
        return BleakSource(bumble_transport=rest, passive=bool(options.get("passive")))
    if scheme == "capture":
        from .capture_source import CaptureSource

        speed = options.get("replay_speed", "max")
        return CaptureSource(rest, speed=speed)  # type: ignore[arg-type]
    if scheme == "sim":
        from .sim_source import SimSource

        return SimSource(rest or "demo", time_factor=options.get("time_factor"))  # type: ignore[arg-type]
    if scheme == "esphome":
        from .esphome import esphome_from_url

        return esphome_from_url(url)
    if scheme in ("hass", "hasss"):
        from .hass import hass_from_url

        return hass_from_url(url)
    if scheme in ("mqtt-raw", "mqtts-raw"):
        from .mqtt_raw import mqtt_raw_from_url

        return mqtt_raw_from_url(url)
    raise SourceError(
        f"unknown source {url!r}: use bleak:, bleak:hci1, bumble:usb:0, capture:PATH, sim:demo / sim:HOUSE.toml, "
        "esphome://HOST?key=KEY, hass://HOST:8123?token=TOKEN or mqtt-raw://HOST:1883/home/+/BTtoMQTT/#"
    )

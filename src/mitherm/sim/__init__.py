"""Virtual thermometers: every supported device and format, seeded and reproducible.

``devices`` models the devices (stock, pvvx, BTHome) as pure state machines on simulated time,
``house`` loads a TOML description of a set of them (and built-in presets), ``runner`` interleaves
their frames and feeds a sink (e.g. the Bumble virtual radio) in virtual or real time."""

from .devices import BTHomeDevice, Device, DeviceConfigError, Frame, PvvxDevice, StockDevice, Truth
from .house import House, HouseError, builtin_house, load_house
from .runner import Simulator

__all__ = [
    "BTHomeDevice",
    "Device",
    "DeviceConfigError",
    "Frame",
    "House",
    "HouseError",
    "PvvxDevice",
    "Simulator",
    "StockDevice",
    "Truth",
    "builtin_house",
    "load_house",
]

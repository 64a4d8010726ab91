"""A bounded ring of recent raw frames per device: what the doctor checks a key against at once."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .decoder import SUPPORTED_UUIDS
from .model import Advertisement


@dataclass(slots=True, frozen=True)
class Frame:
    time: float
    mac: str
    service_uuid: int
    payload: bytes
    rssi: int | None = None
    name: str | None = None


class FrameCache:
    """Recent frames per device (``per_device`` each, ``max_devices`` devices, least recently heard
    device evicted first). Only service data of supported UUIDs is kept."""

    def __init__(self, per_device: int = 64, max_devices: int = 2048) -> None:
        self.per_device = per_device
        self.max_devices = max_devices
        self._frames: OrderedDict[str, deque[Frame]] = OrderedDict()
        self._names: dict[str, str] = {}

    def add_advertisement(self, adv: Advertisement) -> None:
        for uuid, payload in adv.service_data.items():
            if uuid in SUPPORTED_UUIDS:
                self.add(Frame(adv.time, adv.mac, uuid, bytes(payload), adv.rssi, adv.name))
        if adv.name:
            self._names[adv.mac] = adv.name

    def add(self, frame: Frame) -> None:
        ring = self._frames.get(frame.mac)
        if ring is None:
            if len(self._frames) >= self.max_devices:
                old, _ = self._frames.popitem(last=False)
                self._names.pop(old, None)
            ring = self._frames[frame.mac] = deque(maxlen=self.per_device)
        else:
            self._frames.move_to_end(frame.mac)
        ring.append(frame)
        if frame.name:
            self._names[frame.mac] = frame.name

    def extend(self, advertisements: Iterable[Advertisement]) -> FrameCache:
        for adv in advertisements:
            self.add_advertisement(adv)
        return self

    def frames(self, mac: str) -> list[Frame]:
        ring = self._frames.get(mac)
        return sorted(ring, key=lambda f: f.time) if ring else []

    def macs(self) -> Iterator[str]:
        return iter(list(self._frames))

    def name(self, mac: str) -> str | None:
        return self._names.get(mac)

    def __contains__(self, mac: object) -> bool:
        return mac in self._frames

    def __len__(self) -> int:
        return len(self._frames)

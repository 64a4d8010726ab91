"""A bounded ring of recent raw frames per device: what the doctor checks a key against at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .decoder import SUPPORTED_UUIDS
from .model import Advertisement
from .uuids import MIBEACON


@dataclass(slots=True)
class Frame:
    time: float
    mac: str
    service_uuid: int
    payload: bytes
    rssi: int | None = None
    name: str | None = None


def _frame_time(f: Frame) -> float:
    return f.time


class FrameCache:
    """Recent frames per device (``per_device`` of any kind plus the last ``data_per_device`` frames that
    carry data, so that the idle frames of a stock sensor do not push its few data frames out); at most
    ``max_devices`` devices, the least recently heard evicted first. Only supported service data is kept."""

    def __init__(self, per_device: int = 64, max_devices: int = 2048, data_per_device: int = 32) -> None:
        self.per_device = per_device
        self.data_per_device = data_per_device
        self.max_devices = max_devices
        self._frames: dict[str, deque[Frame]] = {}
        self._data: dict[str, deque[Frame]] = {}
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
                # evict the device heard least recently (rare: only past max_devices)
                old = min(self._frames, key=lambda m: self._frames[m][-1].time)
                del self._frames[old]
                self._names.pop(old, None)
                self._data.pop(old, None)
            ring = self._frames[frame.mac] = deque(maxlen=self.per_device)
            self._data[frame.mac] = deque(maxlen=self.data_per_device)
        ring.append(frame)
        # Stock MiBeacon sensors send mostly idle frames (frame control bit 6 clear) and one data frame about
        # every 10 minutes; every other format carries data in each frame.
        p = frame.payload
        if frame.service_uuid != MIBEACON or (len(p) >= 2 and p[0] & 0x40):  # carries data?
            self._data[frame.mac].append(frame)
        if frame.name:
            self._names[frame.mac] = frame.name

    def extend(self, advertisements: Iterable[Advertisement]) -> FrameCache:
        for adv in advertisements:
            self.add_advertisement(adv)
        return self

    def frames(self, mac: str) -> list[Frame]:
        ring = self._frames.get(mac)
        if not ring:
            return []
        merged = {id(f): f for f in self._data[mac]}
        merged.update((id(f), f) for f in ring)
        return sorted(merged.values(), key=lambda f: f.time)

    def advertisements(self) -> Iterator[Advertisement]:
        """Every cached frame as an Advertisement (for a snapshot file the doctor can read)."""
        return self.snapshot_advertisements(self.snapshot())

    def snapshot(self) -> list[tuple[str | None, list[Frame], list[Frame]]]:
        """A copy of the cache that stays valid while the cache goes on: per device its name, its recent and its
        data frames (references to the immutable frames, so cheap to take on the event loop; turn it into
        advertisements in another thread with :meth:`snapshot_advertisements`)."""
        names, data = self._names, self._data
        return [(names.get(mac), list(ring), list(data[mac])) for mac, ring in self._frames.items()]

    @staticmethod
    def snapshot_advertisements(snap: list[tuple[str | None, list[Frame], list[Frame]]]) -> Iterator[Advertisement]:
        for name, ring, data in snap:
            merged = {id(f): f for f in data}
            merged.update((id(f), f) for f in ring)
            for f in sorted(merged.values(), key=_frame_time):
                yield Advertisement(
                    mac=f.mac,
                    time=f.time,
                    service_data={f.service_uuid: f.payload},
                    rssi=f.rssi,
                    name=f.name or name,
                    source="cache",
                )

    def macs(self) -> Iterator[str]:
        return iter(list(self._frames))

    def name(self, mac: str) -> str | None:
        return self._names.get(mac)

    def __contains__(self, mac: object) -> bool:
        return mac in self._frames

    def __len__(self) -> int:
        return len(self._frames)

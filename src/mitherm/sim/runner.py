"""Run a house: interleave the devices' frames in time order and hand them to a sink.

Time is simulated seconds (the devices' axis). ``events(until)`` steps a virtual clock as fast as
possible; ``run(sink, realtime=True)`` waits so that ``time_factor`` simulated seconds pass per real
second (``realtime=False`` does not wait, for tests). The sink gets the complete AD structures, e.g.
``VirtualAdvertiser.set_data`` of the device's advertiser on the virtual radio.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator

from .devices import Device
from .house import House

Sink = Callable[[Device, bytes], Awaitable[None]]
Event = tuple[float, Device, bytes]


class Simulator:
    """Drives devices on one clock. ``min_interval`` (simulated seconds) caps every device's advert rate
    (idle and periodic adverts are stretched to it; stock readings keep their cadence); None keeps the
    house's value. ``call_at(t, fn)`` schedules a fault or any action at simulated time ``t``."""

    def __init__(
        self,
        house: House | Iterable[Device],
        *,
        time_factor: float | None = None,
        min_interval: float | None = None,
        start: float = 0.0,
    ) -> None:
        if isinstance(house, House):
            self.house: House | None = house
            self.devices = list(house.devices)
            tf = house.time_factor
        else:
            self.house = None
            self.devices = list(house)
            tf = 1.0
        self.time_factor = float(time_factor if time_factor is not None else tf)
        if not (self.time_factor > 0 and math.isfinite(self.time_factor)):
            raise ValueError("time_factor must be a positive number")
        if min_interval is not None:
            for d in self.devices:
                d.min_interval = float(min_interval)
        #: Simulated time of the last event or action handled (or of ``until`` of a finished ``events``).
        self.now = float(start)
        self._queue: list[tuple[float, int, int]] = []
        for i, d in enumerate(self.devices):
            while d.peek() < start:  # skip what a device would have sent before the start
                d.next_frame()
            self._queue.append((d.peek(), i, i))
        heapq.heapify(self._queue)
        self._actions: list[tuple[float, int, Callable[[], object]]] = []
        self._action_seq = 0
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Simulator {len(self.devices)} devices t={self.now:.1f}s ×{self.time_factor}>"

    # scheduling -----------------------------------------------------------------------------------

    def call_at(self, t: float, action: Callable[[], object]) -> None:
        """Run ``action()`` at simulated time ``t`` (before any frame due at the same time)."""
        heapq.heappush(self._actions, (float(t), self._action_seq, action))
        self._action_seq += 1

    def next_time(self) -> float:
        """Simulated time of the next frame or action."""
        tq = self._queue[0][0] if self._queue else math.inf
        ta = self._actions[0][0] if self._actions else math.inf
        return min(tq, ta)

    def step(self) -> Event | None:
        """Handle the earliest frame or action; the frame as ``(t, device, ad)``, else None."""
        if self._actions and (not self._queue or self._actions[0][0] <= self._queue[0][0]):
            t, _, action = heapq.heappop(self._actions)
            self.now = max(self.now, t)
            for d in self.devices:  # so that faults default to the action's time
                d.now = max(d.now, t)
            action()
            return None
        if not self._queue:
            return None
        t, _, i = self._queue[0]
        d = self.devices[i]
        frame = d.next_frame()
        # ties are broken by the device's position in the house: deterministic order
        heapq.heapreplace(self._queue, (d.peek(), i, i))
        self.now = max(self.now, t)
        if frame is None:
            return None
        return frame.t, d, frame.ad

    def events(self, until: float) -> Iterator[Event]:
        """Every frame with ``t < until`` in time order, as fast as possible. Calls continue where the
        previous one stopped."""
        while self.next_time() < until:
            ev = self.step()
            if ev is not None:
                yield ev
        if math.isfinite(until):
            self.now = max(self.now, until)

    # running --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Make a running ``run()`` return after the event in hand."""
        self._stopped = True

    async def run(self, sink: Sink, *, duration: float | None = None, realtime: bool = True) -> int:
        """Push ``(device, ad_bytes)`` to ``sink`` for ``duration`` simulated seconds (None: until
        ``stop()`` or cancellation). With ``realtime`` each frame waits for its wall-clock moment
        (start + t / time_factor); the frame is built after the wait, so faults injected meanwhile
        apply. Returns the number of frames sent."""
        loop = asyncio.get_running_loop()
        t0 = self.now
        wall0 = loop.time()
        end = math.inf if duration is None else t0 + duration
        sent = 0
        self._stopped = False
        while True:
            t = self.next_time()
            if t >= end:
                break
            if realtime:
                delay = wall0 + (t - t0) / self.time_factor - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                # faults injected from outside while we slept start about now, not at a device's last frame
                for d in self.devices:
                    d.now = max(d.now, t)
            if self._stopped:
                return sent
            ev = self.step()
            if ev is None:
                continue
            await sink(ev[1], ev[2])
            sent += 1
            if not realtime:
                await asyncio.sleep(0)  # let the receiving side run
        if math.isfinite(end):
            if realtime:
                delay = wall0 + (end - t0) / self.time_factor - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.now = max(self.now, end)
        return sent


__all__ = ["Event", "Simulator", "Sink"]

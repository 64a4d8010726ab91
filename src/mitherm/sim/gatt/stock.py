"""Device side of the stock settings service ``ebe0ccb0-…`` for stock virtual devices (keys.md §4.1).

Unit (ccbe), clock (ccb7), live data (ccc1/ccc4) from ``device.truth_at(device.now)``, history counters
(ccb9), start index (ccba) → records on ccbc, last record (ccbb) and, on the MHO-C401, comfort limits
(ccd7). Codecs come from :mod:`mitherm.protocols.stock`, so both sides share one definition.

Time: the device clock runs on the device's simulated time axis (``device.now``). Until a client sets it,
it counts seconds since power-up, ``uptime_hours`` before simulated time 0 (the stock firmware does this,
keys.md §4.1); after a set it is ``value + (now - set_at)``.

History: one record per complete hour since power-up (index 0 = the first hour), min/max of the
device's climate sampled every 10 minutes; record timestamps use the current clock mapping.

Fault injection for tests: ``state_of(device).mute = True`` (ignore writes, never notify) and
``state_of(device).drop_history_after = n`` (the device drops the link after n history records).
"""

from __future__ import annotations

import asyncio
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

from ...protocols import stock as proto

HISTORY_SAMPLE_S = 600.0
HISTORY_CAPACITY = 20 * 24  # records kept (an assumption: about 20 days)

_STATES: weakref.WeakKeyDictionary[Any, StockState] = weakref.WeakKeyDictionary()


@dataclass
class StockState:
    device: Any
    unit: int = 0x00
    uptime_hours: int = 24
    clock_value: int | None = None  # set by a client
    clock_set_at: float = 0.0  # device.now when it was set
    tz_hours: int | None = None
    comfort: proto.Comfort = field(default_factory=lambda: proto.Comfort(27.0, 19.0, 85, 20))
    mute: bool = False
    drop_history_after: int | None = None
    history_requests: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # clock -------------------------------------------------------------------------------------
    def clock_at(self, t: float) -> int:
        if self.clock_value is None:
            return int(t + self.uptime_hours * 3600)
        return int(self.clock_value + (t - self.clock_set_at))

    # history -----------------------------------------------------------------------------------
    def counters(self) -> proto.HistoryCounters:
        hours = max(0, math.floor((self.device.now + self.uptime_hours * 3600) / 3600))
        return proto.HistoryCounters(last_index=max(0, hours - 1), next_index=hours)

    def record(self, index: int) -> proto.HistoryRecord:
        start = (index - self.uptime_hours) * 3600.0
        truths = [self.device.climate.at(start + k * HISTORY_SAMPLE_S) for k in range(int(3600 / HISTORY_SAMPLE_S))]
        temps = [x.temperature_c for x in truths]
        hums = [x.humidity_pct for x in truths]
        return proto.HistoryRecord(
            index=index,
            timestamp=self.clock_at(start),
            temperature_min_c=round(min(temps), 1),
            temperature_max_c=round(max(temps), 1),
            humidity_min_pct=float(round(min(hums))),
            humidity_max_pct=float(round(max(hums))),
        )

    def first_index(self) -> int:
        return max(0, self.counters().next_index - HISTORY_CAPACITY)


def state_of(device: Any) -> StockState:
    return _STATES[device]


def install(server: Any, device: Any) -> None:
    if getattr(device, "kind", None) != "stock":
        return
    from ..gatt_server import CharSpec

    state = StockState(device)
    _STATES[device] = state
    is_mho = device.model == "MHO-C401"

    def read_unit() -> bytes:
        return bytes([state.unit])

    def write_unit(data: bytes) -> None:
        if not state.mute and data:
            state.unit = 0x01 if data[0] == 0x01 else 0x00

    def read_clock() -> bytes:
        return proto.encode_clock(proto.ClockValue(state.clock_at(device.now), state.tz_hours))

    def write_clock(data: bytes) -> None:
        if state.mute:
            return
        value = proto.decode_clock(data)
        state.clock_value, state.tz_hours, state.clock_set_at = value.seconds, value.tz_hours, device.now

    def read_live() -> bytes:
        truth = device.truth_at(device.now)
        if is_mho:
            return proto.encode_live(truth.temperature_c, truth.humidity_pct)
        return proto.encode_live(truth.temperature_c, truth.humidity_pct, truth.voltage_v)

    def read_battery() -> bytes:
        return bytes([100])  # keks51: always reads 100 on LYWSD03MMC (keys.md §4.1)

    def read_counters() -> bytes:
        return proto.encode_history_counters(state.counters())

    def read_last() -> bytes:
        c = state.counters()
        return proto.encode_history_record(state.record(c.last_index)) if c.next_index else b""

    def write_index(data: bytes) -> None:
        # the write is acknowledged at once; the records follow as notifications
        if state.mute or len(data) < 4:
            return
        state.history_requests += 1
        start = max(int.from_bytes(data[:4], "little"), state.first_index())
        task = asyncio.ensure_future(send_history(start))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    async def send_history(start: int) -> None:
        await asyncio.sleep(0)
        counters = state.counters()
        if counters.next_index == 0:
            return
        for n, index in enumerate(range(start, counters.last_index + 1)):
            if state.drop_history_after is not None and n >= state.drop_history_after:
                await server.disconnect()
                return
            if not server.connected:
                return
            await server.notify(proto.HISTORY_RECORDS_UUID, proto.encode_history_record(state.record(index)))
            await asyncio.sleep(0)

    def read_comfort() -> bytes:
        return proto.encode_comfort(state.comfort)

    def write_comfort(data: bytes) -> None:
        if not state.mute:
            state.comfort = proto.decode_comfort(data)

    chars = [
        CharSpec(proto.CLOCK_UUID, {"read", "write"}, on_read=read_clock, on_write=write_clock),
        CharSpec(proto.HISTORY_COUNTERS_UUID, {"read"}, on_read=read_counters),
        CharSpec(proto.HISTORY_INDEX_UUID, {"read", "write"}, on_write=write_index),
        CharSpec(proto.HISTORY_LAST_UUID, {"read"}, on_read=read_last),
        CharSpec(proto.HISTORY_RECORDS_UUID, {"notify"}),
        CharSpec(proto.UNIT_UUID, {"read", "write"}, on_read=read_unit, on_write=write_unit),
        CharSpec(proto.LIVE_UUID, {"read", "notify"}, on_read=read_live),
        CharSpec(proto.BATTERY_UUID, {"read"}, on_read=read_battery),
        CharSpec(proto.SPEED_UUID, {"write"}),
    ]
    if is_mho:
        chars.append(CharSpec(proto.COMFORT_UUID, {"read", "write"}, on_read=read_comfort, on_write=write_comfort))
    server.add_service(proto.SERVICE_UUID, chars)

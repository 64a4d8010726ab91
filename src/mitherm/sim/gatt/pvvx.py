"""Device side of the pvvx command channel (service 0x1F10, characteristic 0x1F1F) for pvvx virtual devices.

Follows ``src/cmd_parser.c`` as summarised in firmware.md §1.2-§1.4 and §6: a write ``[cmd, payload…]``
is answered by a notification starting with ``cmd``; reading 0x1F1F gives ``55 VERSION cfg``; unknown
commands answer ``[cmd, 0xFF]``. The config block is a v5.8 ``cfg_t``; writing it (whole or a prefix,
as the firmware copies ``len`` bytes from the start) runs the same clamps as ``test_config()``
(:func:`mitherm.protocols.pvvx.clamp_config`), keeps the read-only HW id, and **changes how the virtual
device advertises**: ``device.adv_type``, ``device.encrypted``, ``device.adv_interval`` and
``device.measure_count``. The config notification carries one trailing byte more than ``cfg_t``, as on
the real device.

Commands: 0x00 device id, 0x18 beacon bindkey (set → ``device.rekey``), 0x20 comfort, 0x23 time,
0x33 one measurement, 0x35 history (records every ``averaging × measure period``, index 1 = newest,
end marker ``35 00 00``), 0x55/0x56 config/defaults (0x56 is answered with the ``55 VERSION cfg``
buffer, as ``ble_send_cfg()`` does), 0x72 reboot on disconnect; 0x5A and anything else
→ ``[cmd, FF]``.

Fault injection for tests: ``state_of(device).mute = True`` (no replies at all) and
``state_of(device).drop_history_after = n`` (drop the link after n history records).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import struct
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from ...protocols import pvvx as proto
from ...protocols.stock import HistoryRecord

VERSION = 0x58  # v5.8, firmware.md sources table; a flashed image changes ``device.firmware_version``
SERVICES = 0x0001_F0FF  # OTA, ext-OTA, PIN, bindkey, history, screen, LR, T/H sensor … (illustrative)
HW_ID_BY_MODEL = {"LYWSD03MMC": 0, "MHO-C401": 1, "CGG1": 2, "CGG1-ENCRYPTED": 2, "CGDK2": 6}
HISTORY_CAPACITY = 2000  # records the virtual flash log keeps (an assumption)
_SAMPLES_PER_RECORD = 6

_STATES: weakref.WeakKeyDictionary[Any, PvvxState] = weakref.WeakKeyDictionary()


@dataclass
class PvvxState:
    device: Any
    config: proto.PvvxConfig
    bindkey: bytes | None = None
    uptime_s: float = 86_400.0
    clock_value: int | None = None
    clock_set_at: float = 0.0
    last_set: int = 0
    comfort: tuple[int, int, int, int] = (2100, 2600, 3000, 6000)  # def_cmf (src/app.c)
    reboot_on_disconnect: bool = False
    reboots: int = 0
    mute: bool = False
    drop_history_after: int | None = None
    commands: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # clock -------------------------------------------------------------------------------------
    def clock_at(self, t: float) -> int:
        if self.clock_value is None:
            return int(t + self.uptime_s)  # utc_time_sec counts from boot until set
        return int(self.clock_value + (t - self.clock_set_at))

    # applying the config to the virtual device -----------------------------------------------------
    def apply(self) -> None:
        d, c = self.device, self.config
        d.adv_type = c.advertising_type
        d.adv_interval = c.adv_interval_ms / 1000
        d.measure_count = c.measure_interval
        d.measure_interval = min(250.0, d.adv_interval * c.measure_interval)
        if c.encrypted:
            if self.bindkey is None:
                # no key in EEP yet: the firmware creates one when it needs it (an assumption)
                self.bindkey = secrets.token_bytes(16)
            d.encrypted = True
            if d.bindkey != self.bindkey.hex():
                d.rekey(self.bindkey.hex())
        else:
            d.encrypted = False

    # history -----------------------------------------------------------------------------------
    @property
    def history_step(self) -> float:
        return (self.config.averaging or 0) * self.config.measure_period_s

    def history_count(self) -> int:
        step = self.history_step
        if step <= 0:
            return 0
        return min(HISTORY_CAPACITY, math.floor((self.device.now + self.uptime_s) / step))

    def history_record(self, index: int) -> HistoryRecord:
        """Record ``index`` counted back from the newest (1 = newest)."""
        step = self.history_step
        newest_end = math.floor((self.device.now + self.uptime_s) / step) * step - self.uptime_s
        end = newest_end - (index - 1) * step
        samples = [self.device.climate.at(end - step + (k + 1) * step / _SAMPLES_PER_RECORD) for k in range(6)]
        return HistoryRecord(
            index=index,
            timestamp=self.clock_at(end),
            temperature_c=round(sum(s.temperature_c for s in samples) / len(samples), 2),
            humidity_pct=round(sum(s.humidity_pct for s in samples) / len(samples), 2),
            voltage_v=round(samples[-1].voltage_v, 3),
        )


def state_of(device: Any) -> PvvxState:
    return _STATES[device]


def initial_config(device: Any) -> proto.PvvxConfig:
    cfg = proto.default_config(VERSION, HW_ID_BY_MODEL.get(device.model, 0), device.model)
    cfg = replace(
        cfg,
        advertising_type=device.adv_type,
        encrypted=bool(device.encrypted),
        adv_interval=max(1, round(device.adv_interval / 0.0625)),
        measure_interval=device.measure_count,
    )
    return proto.clamp_config(cfg)[0]


def install(server: Any, device: Any) -> None:
    if getattr(device, "kind", None) != "pvvx":
        return
    from ..gatt_server import CharSpec

    state = PvvxState(device, initial_config(device))
    if device.encrypted and device.bindkey:
        state.bindkey = bytes.fromhex(device.bindkey)
    _STATES[device] = state
    hw_ver = state.config.hw_ver

    def version() -> int:
        # the OTA simulator sets device.firmware_version (BCD) after a flash; the stored cfg bytes stay
        return int(getattr(device, "firmware_version", None) or VERSION) & 0xFF

    def config_value() -> bytes:
        return bytes([proto.CMD_CONFIG, version()]) + state.config.to_bytes()

    async def reply(data: bytes) -> None:
        if server.connected:
            await server.notify(proto.CHAR_UUID, data)

    def set_config(new: proto.PvvxConfig) -> None:
        old_flg2 = state.config.flg2
        new, _ = proto.clamp_config(replace(new, hw_ver=hw_ver, version=VERSION))
        state.config = new
        state.apply()
        if (old_flg2 ^ new.flg2) & 0x60:  # BT5 PHY / LongRange change: reboot on disconnect
            state.reboot_on_disconnect = True

    async def on_write(data: bytes) -> None:
        if state.mute or not data:
            return
        state.commands.append(bytes(data))
        cmd, body = data[0], bytes(data[1:])
        if cmd == proto.CMD_CONFIG:
            if body:
                # memcpy(&cfg, payload, len): a prefix overwrites the start of the struct
                raw = body[:11] + state.config.to_bytes()[len(body[:11]) :]
                set_config(proto.decode_config(VERSION, raw))
            await reply(config_value() + b"\x00")
        elif cmd == proto.CMD_CONFIG_DEFAULT:
            set_config(proto.default_config(VERSION, hw_ver or 0, device.model))
            await reply(config_value() + b"\x00")
        elif cmd == proto.CMD_BINDKEY:
            if len(body) == 16:
                state.bindkey = body
                if state.config.encrypted:
                    device.rekey(body.hex())
            await reply(bytes([cmd]) + (state.bindkey if state.bindkey else b"\xff"))
        elif cmd == proto.CMD_TIME:
            if len(body) >= 4:
                (value,) = struct.unpack_from("<I", body)
                state.clock_value, state.clock_set_at, state.last_set = value, device.now, value
            now = state.clock_at(device.now)
            await reply(bytes([cmd]) + struct.pack("<II", now & 0xFFFFFFFF, state.last_set))
        elif cmd == proto.CMD_COMFORT:
            if len(body) >= 8:
                state.comfort = struct.unpack_from("<hhHH", body)
            await reply(bytes([cmd]) + struct.pack("<hhHH", *state.comfort))
        elif cmd == proto.CMD_DEV_ID:
            await reply(bytes([cmd]) + struct.pack("<BHHHI", 0, hw_ver or 0, version(), 0x0002, SERVICES))
        elif cmd == proto.CMD_MEASURE:
            n = body[0] if body else 1
            await reply(bytes([cmd, n]))
            if n:
                t = device.truth_at(device.now)
                count = device.measurement_index(device.now) & 0xFFFF
                await reply(
                    bytes([cmd])
                    + struct.pack(
                        "<HhHHB",
                        round(t.voltage_v * 1000),
                        round(t.temperature_c * 100),
                        round(t.humidity_pct * 100),
                        count,
                        0,
                    )
                )
        elif cmd == proto.CMD_HISTORY and len(body) >= 2:
            count, start = struct.unpack_from("<H", body)[0], 0
            if len(body) >= 4:
                (start,) = struct.unpack_from("<H", body, 2)
            task = asyncio.ensure_future(send_history(count, start))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
        elif cmd == proto.CMD_REBOOT:
            state.reboot_on_disconnect = True
            await reply(bytes([cmd, 0x00]))
        else:
            await reply(bytes([cmd, proto.UNSUPPORTED]))

    async def send_history(count: int, start: int) -> None:
        available = state.history_count()
        sent = 0
        index = start
        while True:
            index += 1  # send_memo_blk: ++cur > cnt or no record -> end marker
            if index > count or index > available:
                await reply(proto.HISTORY_END)
                return
            if state.drop_history_after is not None and sent >= state.drop_history_after:
                await server.disconnect()
                return
            if not server.connected:
                return
            await reply(proto.encode_history_record(state.history_record(index)))
            sent += 1
            await asyncio.sleep(0)

    previous = server.on_disconnect

    def on_disconnect() -> None:
        if state.reboot_on_disconnect:
            state.reboot_on_disconnect = False
            state.reboots += 1
        if previous is not None:
            previous()

    server.on_disconnect = on_disconnect
    server.add_service(
        proto.SERVICE_UUID,
        [
            CharSpec(
                proto.CHAR_UUID, {"read", "notify", "write_without_response"}, on_read=config_value, on_write=on_write
            )
        ],
    )

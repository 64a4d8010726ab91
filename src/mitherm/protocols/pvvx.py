"""The pvvx custom firmware's command channel (service 0x1F10, characteristic 0x1F1F), sans-IO.

Reference: shared/reference/firmware.md §1.2-§1.6 and §6, keys.md §4.2 (from ``pvvx/ATC_MiThermometer``
``src/cmd_parser.c``, ``src/app.c`` ``test_config()``, ``src/app.h`` ``cfg_t``, ``src/ble.c``
``send_memo_blk`` and ``TelinkMiFlasher.html`` ``CustomBlkParse``/``SendCustomConfig``).

Model: the client writes ``[cmd, payload…]`` (write without response) to 0x1F1F; the device answers with a
notification on 0x1F1F starting with the same ``cmd`` byte. No payload means "get", a payload means "set"
and the new value is echoed. ``[cmd, 0xFF]`` means "unsupported" except for the few commands for which
0xFF is a value (0x18 "no bindkey stored", 0x33 "stream forever", 0x71 "MTU too small").

Nothing here does I/O: build requests with the ``*_request`` functions, feed notifications to
:func:`parse_reply` (or to :class:`PvvxHistoryDownload` for command 0x35) and get values back. The config
block (command 0x55) is decoded by the firmware VERSION byte with one :class:`ConfigLayout` per layout
generation; :func:`clamp_config` applies the same limits as the firmware's ``test_config()``.

The older atc1441 firmware uses the same UUIDs with single-byte commands and no replies (§1.6):
:data:`ATC1441_COMMANDS` and :func:`atc1441_request`.
"""

from __future__ import annotations

import calendar
import struct
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .stock import HistoryProgress, HistoryRecord

__all__ = [
    "ADV_TYPES",
    "ATC1441_COMMANDS",
    "CHAR_UUID",
    "HW_IDS",
    "LAYOUTS",
    "SERVICE_UUID",
    "BindkeyReply",
    "Clamp",
    "ComfortReply",
    "ConfigLayout",
    "ConfigReply",
    "DeviceIdReply",
    "PvvxConfig",
    "PvvxError",
    "PvvxHistoryDownload",
    "RawReply",
    "RebootReply",
    "TimeReply",
    "Unsupported",
    "atc1441_request",
    "bindkey_request",
    "clamp_config",
    "comfort_request",
    "config_request",
    "decode_config",
    "default_config_request",
    "device_id_request",
    "history_request",
    "local_epoch",
    "parse_reply",
    "reboot_request",
    "time_request",
]

SERVICE_UUID = "00001f10-0000-1000-8000-00805f9b34fb"
CHAR_UUID = "00001f1f-0000-1000-8000-00805f9b34fb"

# Command ids (src/cmd_parser.h CMD_ID_KEYS, firmware.md §1.3 table)
CMD_DEV_ID = 0x00
CMD_NAME = 0x01
CMD_BINDKEY = 0x18
CMD_COMFORT = 0x20
CMD_TIME = 0x23
CMD_MEASURE = 0x33
CMD_HISTORY = 0x35
CMD_CLEAR_HISTORY = 0x36
CMD_CONFIG = 0x55
CMD_CONFIG_DEFAULT = 0x56
CMD_MTU = 0x71
CMD_REBOOT = 0x72
CMD_LONGRANGE_RESET = 0xDD
#: commands answered under another id: 0x56 (defaults) and 0xDD (LongRange reset) reply with the config
#: buffer, which starts with 0x55 (``ble_send_cfg()`` sends ``my_RxTx_Data`` = ``55 VERSION cfg``)
REPLY_COMMAND = {CMD_CONFIG_DEFAULT: CMD_CONFIG, CMD_LONGRANGE_RESET: CMD_CONFIG}
#: commands whose reply ``[cmd, 0xFF]`` is a value, not "unsupported"
FF_IS_VALUE = frozenset({CMD_BINDKEY, CMD_MEASURE, CMD_MTU})
UNSUPPORTED = 0xFF


class PvvxError(ValueError):
    """A reply that cannot be decoded (too short, wrong command)."""


# --- the config block (command 0x55) ------------------------------------------------------------------

#: flg b0-1 (firmware.md §1.4)
ADV_TYPES = ("atc1441", "pvvx", "mi", "bthome")

#: HW ids of config byte 9 (firmware.md §3.4)
HW_IDS: dict[int, str] = {
    0: "LYWSD03MMC B1.4",
    1: "MHO-C401",
    2: "CGG1-M 2020/21",
    3: "LYWSD03MMC B1.9",
    4: "LYWSD03MMC B1.6",
    5: "LYWSD03MMC B1.7/B2.0",
    6: "CGDK2",
    7: "CGG1-M 2022",
    8: "MHO-C401N (2022)",
    9: "MJWSD05MMC ch",
    10: "LYWSD03MMC B1.5",
    11: "MHO-C122",
    12: "MJWSD05MMC en",
    13: "MJWSD06MMC",
    14: "LYWSD03MMC B1.6-2025",
    16: "TB03F",
    17: "TS0201",
    49: "LYWSD02MMC",
    51: "ZG-204ZV",
}

#: known RF TX power codes (firmware.md §1.4 byte 6): code -> dBm
TX_POWER_DBM: dict[int, float] = {0x82: -25.18, 0xA9: 0.04, 0xBF: 3.01, 23: 3.23, 63: 10.46}


@dataclass(frozen=True, slots=True)
class ConfigLayout:
    """One generation of the ``cfg_t`` layout, chosen by the firmware VERSION byte (firmware.md §1.4).

    ``offsets``: bytes 2-3 are temperature/humidity offsets (s8 ×0.1) instead of ``flg3`` and
    ``event_adv_cnt``; ``hw_id``: how byte 9 carries the HW id (``"none"``: 9-byte struct without it,
    ``"bits"``: ``hwver:3`` bit-field, ``"nibble"``: low nibble with 15 = extended, ``"byte"``: the
    whole byte); ``adv_delay``: ``flg3`` b0-3 is the random advertising delay and byte 3 the beacons per
    event (the flasher shows them for ``ver > 0x50``)."""

    name: str
    min_version: int
    size: int
    offsets: bool
    hw_id: str
    adv_delay: bool


LAYOUTS: tuple[ConfigLayout, ...] = (
    ConfigLayout("v1.x", 0x00, 9, True, "none", False),  # 2021-01: 9 bytes, plain smiley byte
    ConfigLayout("v2.0", 0x20, 11, True, "bits", False),  # + hw_cfg bit-field + averaging
    ConfigLayout("v3.6", 0x36, 11, True, "nibble", False),  # HW id in the low nibble
    ConfigLayout("v4.7", 0x47, 11, False, "nibble", False),  # offsets moved to command 0x25
    ConfigLayout("v4.8", 0x48, 11, False, "byte", False),  # byte 9 = full HW id
    ConfigLayout("v5.1", 0x51, 11, False, "byte", True),  # adv random delay / beacons per event
)


def layout_for(version: int) -> ConfigLayout:
    chosen = LAYOUTS[0]
    for layout in LAYOUTS:
        if version >= layout.min_version:
            chosen = layout
    return chosen


def _bit(value: int, n: int) -> bool:
    return bool(value >> n & 1)


def _s8(b: int) -> int:
    return b - 256 if b >= 128 else b


@dataclass(frozen=True, slots=True)
class PvvxConfig:
    """The device config of pvvx firmware, every bit of it (lossless: ``decode_config(c.to_bytes())``
    gives ``c`` back). Raw firmware units; the ``*_ms``/``*_s`` properties convert."""

    version: int  # firmware VERSION byte, BCD-like: 0x58 = v5.8
    advertising_type: str = "bthome"  # flg b0-1
    comfort_smiley: bool = True  # flg b2
    show_time: bool = False  # flg b3 (clock / ×100 display / battery, depending on the model)
    fahrenheit: bool = False  # flg b4: °F on the display
    show_battery: bool = False  # flg b5
    tx_measures: bool = False  # flg b6: notify every measurement while connected
    lp_measures: bool = True  # flg b7: low-power sensor mode
    smiley: int = 0  # flg2 b0-2
    encrypted: bool = False  # flg2 b3: encrypted beacons with the 0x18 bindkey
    adv_flags: bool = True  # flg2 b4: add the "flags" AD
    bt5phy: bool = False  # flg2 b5
    longrange: bool = False  # flg2 b6 (implies bt5phy)
    screen_off: bool = False  # flg2 b7
    temp_offset: float | None = None  # before v4.7: byte 2, s8 ×0.1 °C
    humi_offset: float | None = None  # before v4.7: byte 3, s8 ×0.1 %
    flg3: int | None = None  # v4.7+: byte 2 (b0-3 adv delay from v5.1, b6 dd/mm, b7 weekday)
    event_adv_cnt: int | None = None  # v4.7+: byte 3, beacons per event
    adv_interval: int = 40  # ×62.5 ms
    measure_interval: int = 4  # × advertising interval
    tx_power: int = 0xA9  # RF TX power code
    connect_latency: int = 49  # connection interval (N+1) × 20 ms
    lcd_step: int = 49  # min LCD update step ×50 ms
    hw_ver: int | None = None  # byte 9 (read-only), None in the 9-byte layout
    averaging: int | None = None  # byte 10: history step = N × measure period, 0 = logging off
    extra: bytes = field(default=b"", compare=False)  # trailing bytes of the notification (ignored)

    # layout ------------------------------------------------------------------------------------
    @property
    def layout(self) -> ConfigLayout:
        return layout_for(self.version)

    @property
    def version_text(self) -> str:
        return f"v{self.version >> 4}.{self.version & 0x0F}"

    # derived values ----------------------------------------------------------------------------
    @property
    def adv_interval_ms(self) -> float:
        return self.adv_interval * 62.5

    @property
    def measure_period_s(self) -> float:
        return self.adv_interval_ms * self.measure_interval / 1000

    @property
    def connect_interval_ms(self) -> int:
        return (self.connect_latency + 1) * 20

    @property
    def lcd_step_ms(self) -> int:
        return self.lcd_step * 50

    @property
    def history_step_s(self) -> float | None:
        if self.averaging is None:
            return None
        return self.averaging * self.measure_period_s

    @property
    def adv_delay(self) -> int | None:
        """Random advertising delay 0..15 (×0.625 ms), v5.1+."""
        if self.flg3 is None or not self.layout.adv_delay:
            return None
        return self.flg3 & 0x0F

    @property
    def tx_power_dbm(self) -> float | None:
        return TX_POWER_DBM.get(self.tx_power)

    @property
    def hw_id(self) -> int | None:
        """The HW id (firmware.md §3.4) decoded from byte 9 as the version stores it."""
        mode = self.layout.hw_id
        if self.hw_ver is None or mode == "none":
            return None
        if mode == "bits":
            return self.hw_ver & 0x07
        if mode == "nibble":
            nibble = self.hw_ver & 0x0F
            return self.lcd_step if nibble == 15 else nibble  # 15 = extended: byte 8 carries 16+id
        return self.hw_ver

    @property
    def hw_name(self) -> str | None:
        hid = self.hw_id
        return None if hid is None else HW_IDS.get(hid, f"id {hid}")

    # bytes -------------------------------------------------------------------------------------
    @property
    def flg(self) -> int:
        return (
            ADV_TYPES.index(self.advertising_type)
            | self.comfort_smiley << 2
            | self.show_time << 3
            | self.fahrenheit << 4
            | self.show_battery << 5
            | self.tx_measures << 6
            | self.lp_measures << 7
        )

    @property
    def flg2(self) -> int:
        return (
            (self.smiley & 7)
            | self.encrypted << 3
            | self.adv_flags << 4
            | self.bt5phy << 5
            | self.longrange << 6
            | self.screen_off << 7
        )

    def to_bytes(self) -> bytes:
        """The config bytes after ``55 VERSION`` (9 or 11, by layout)."""
        layout = self.layout
        if layout.offsets:
            b2 = round((self.temp_offset or 0.0) * 10) & 0xFF
            b3 = round((self.humi_offset or 0.0) * 10) & 0xFF
        else:
            b2 = (self.flg3 or 0) & 0xFF
            b3 = (self.event_adv_cnt or 0) & 0xFF
        out = bytes(
            [
                self.flg,
                self.flg2,
                b2,
                b3,
                self.adv_interval & 0xFF,
                self.measure_interval & 0xFF,
                self.tx_power & 0xFF,
                self.connect_latency & 0xFF,
                self.lcd_step & 0xFF,
            ]
        )
        if layout.size == 11:
            out += bytes([(self.hw_ver or 0) & 0xFF, (self.averaging or 0) & 0xFF])
        return out

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(
            version_text=self.version_text,
            layout=self.layout.name,
            adv_interval_ms=self.adv_interval_ms,
            measure_period_s=self.measure_period_s,
            connect_interval_ms=self.connect_interval_ms,
            adv_delay=self.adv_delay,
            tx_power_dbm=self.tx_power_dbm,
            hw_id=self.hw_id,
            hw_name=self.hw_name,
            history_step_s=self.history_step_s,
        )
        return d


def decode_config(version: int, data: bytes) -> PvvxConfig:
    """Decode the config bytes that follow ``55 VERSION``. Bytes beyond the layout's size are kept in
    ``extra`` (the firmware's notification carries one more byte than ``cfg_t``, firmware.md §1.3)."""
    layout = layout_for(version)
    if len(data) < layout.size:
        raise PvvxError(f"config of firmware {version:#04x} needs {layout.size} bytes, got {len(data)}")
    flg, flg2, b2, b3, adv, meas, tx, lat, lcd = data[:9]
    kw: dict[str, Any] = {
        "version": version,
        "advertising_type": ADV_TYPES[flg & 3],
        "comfort_smiley": _bit(flg, 2),
        "show_time": _bit(flg, 3),
        "fahrenheit": _bit(flg, 4),
        "show_battery": _bit(flg, 5),
        "tx_measures": _bit(flg, 6),
        "lp_measures": _bit(flg, 7),
        "smiley": flg2 & 7,
        "encrypted": _bit(flg2, 3),
        "adv_flags": _bit(flg2, 4),
        "bt5phy": _bit(flg2, 5),
        "longrange": _bit(flg2, 6),
        "screen_off": _bit(flg2, 7),
        "adv_interval": adv,
        "measure_interval": meas,
        "tx_power": tx,
        "connect_latency": lat,
        "lcd_step": lcd,
        "extra": bytes(data[layout.size :]),
    }
    if layout.offsets:
        kw["temp_offset"] = _s8(b2) / 10
        kw["humi_offset"] = _s8(b3) / 10
    else:
        kw["flg3"] = b2
        kw["event_adv_cnt"] = b3
    if layout.size == 11:
        kw["hw_ver"] = data[9]
        kw["averaging"] = data[10]
    return PvvxConfig(**kw)


def default_config(version: int = 0x58, hw_id: int = 0, model: str = "LYWSD03MMC") -> PvvxConfig:
    """``def_cfg`` of ``src/app.c`` for the LYWSD03MMC (MHO-C401/CGG1 2020: measure ×8, LCD 99, averaging 90)."""
    slow = model in ("MHO-C401", "MHO-C401N", "CGG1")
    layout = layout_for(version)
    return PvvxConfig(
        version=version,
        advertising_type="bthome",
        comfort_smiley=True,
        lp_measures=True,
        adv_flags=True,
        temp_offset=0.0 if layout.offsets else None,
        humi_offset=0.0 if layout.offsets else None,
        flg3=10 if not layout.offsets else None,  # adv delay 10 (firmware.md §1.4)
        event_adv_cnt=6 if not layout.offsets else None,
        adv_interval=40,
        measure_interval=8 if slow else 4,
        tx_power=0xA9,
        connect_latency=49,
        lcd_step=99 if slow else 49,
        hw_ver=hw_id if layout.size == 11 else None,
        averaging=(90 if slow else 180) if layout.size == 11 else None,
    )


# --- clamping as test_config() does ---------------------------------------------------------------------

DEF_CONNECT_LATENCY = 49
ADV_INTERVAL_MAX = 160  # 160 × 62.5 ms = 10 s
MEASURE_PERIOD_LIMIT = 400_000  # 250 s in 0.625 ms units (adv_interval × 100 per count)
MIN_EVENT_ADV_CNT = 6


@dataclass(frozen=True, slots=True)
class Clamp:
    """One value the firmware would change on write: ``field`` from ``requested`` to ``applied``."""

    field: str
    requested: Any
    applied: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.requested} -> {self.applied} ({self.reason})"


def clamp_config(
    cfg: PvvxConfig, *, low_battery: bool = False, min_lcd_step: int = 10
) -> tuple[PvvxConfig, list[Clamp]]:
    """Apply the firmware's limits (``src/app.c`` ``test_config()``, firmware.md §1.4/§6) and say what changed.

    ``low_battery``: the battery is below LOW_VBAT_MV (then a latency above 49 falls back to 49);
    ``min_lcd_step``: 10 (0.5 s), E-ink builds use a higher ``USE_EPD`` minimum."""
    notes: list[Clamp] = []
    new = cfg

    def put(name: str, value: Any, reason: str) -> None:
        nonlocal new
        notes.append(Clamp(name, getattr(new, name), value, reason))
        new = replace(new, **{name: value})

    # test_config(): "if (cfg.flg2.longrange) cfg.flg2.bt5phy = 1"
    if new.longrange and not new.bt5phy:
        put("bt5phy", True, "LE Long Range needs the BT5 PHY (test_config)")
    # test_config(): TX power kept inside the two code ranges (bit7 = 1: 130..191, bit7 = 0: 23..63)
    tx = new.tx_power & 0xFF
    lo, hi = (130, 191) if tx & 0x80 else (23, 63)
    if not lo <= tx <= hi:
        put("tx_power", min(max(tx, lo), hi), f"TX power codes are {lo}..{hi} (test_config)")
    # test_config(): advertising interval 0 -> 1 (62.5 ms), > 160 -> 160 (10 s)
    if new.adv_interval == 0:
        put("adv_interval", 1, "minimum 1 × 62.5 ms (test_config)")
    elif new.adv_interval > ADV_INTERVAL_MAX:
        put("adv_interval", ADV_INTERVAL_MAX, "maximum 160 × 62.5 ms = 10 s (test_config)")
    # test_config(): measure interval >= 2 advertising intervals, measure period below 250 s
    if new.measure_interval < 2:
        put("measure_interval", 2, "minimum 2 advertising intervals (test_config)")
    step = new.adv_interval * 100
    if step * new.measure_interval > MEASURE_PERIOD_LIMIT - step:
        put("measure_interval", (MEASURE_PERIOD_LIMIT - step) // step, "measure period capped at 250 s (test_config)")
    # test_config(): a latency above the default falls back to it on a low battery
    if low_battery and new.connect_latency > DEF_CONNECT_LATENCY:
        put("connect_latency", DEF_CONNECT_LATENCY, "low battery: latency back to 49 = 1 s (test_config)")
    # test_config(): LCD update step >= 10 × 50 ms (E-ink: USE_EPD); not on layouts where byte 8 is the HW id
    extended_hw = new.layout.hw_id == "nibble" and new.hw_ver is not None and new.hw_ver & 0x0F == 15
    if not extended_hw and new.lcd_step < min_lcd_step:
        put("lcd_step", min_lcd_step, f"minimum {min_lcd_step} × 50 ms (test_config)")
    # firmware.md §1.4/§6: the firmware forces at least 6 beacons per event (v5.1+)
    if new.layout.adv_delay and new.event_adv_cnt is not None and new.event_adv_cnt < MIN_EVENT_ADV_CNT:
        put("event_adv_cnt", MIN_EVENT_ADV_CNT, "at least 6 beacons per event (firmware.md §1.4)")
    return new, notes


# --- requests ---------------------------------------------------------------------------------------------


def config_request(cfg: PvvxConfig | None = None) -> bytes:
    """``55`` (get) or ``55 cfg…`` (set: the whole block, read-modify-write)."""
    return bytes([CMD_CONFIG]) if cfg is None else bytes([CMD_CONFIG]) + cfg.to_bytes()


def default_config_request() -> bytes:
    return bytes([CMD_CONFIG_DEFAULT])


def device_id_request() -> bytes:
    return bytes([CMD_DEV_ID])


def bindkey_request(key: bytes | str | None = None) -> bytes:
    """``18`` (get) or ``18 key[16]`` (set the beacon bindkey in EEP)."""
    if key is None:
        return bytes([CMD_BINDKEY])
    raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    if len(raw) != 16:
        raise ValueError("a pvvx beacon bindkey is 16 bytes (32 hex digits)")
    return bytes([CMD_BINDKEY]) + raw


def time_request(seconds: int | None = None) -> bytes:
    """``23`` (get) or ``23 u32`` (set). Pass :func:`local_epoch` to do what the official tools do."""
    if seconds is None:
        return bytes([CMD_TIME])
    return bytes([CMD_TIME]) + struct.pack("<I", int(seconds) & 0xFFFFFFFF)


def local_epoch(now: float | None = None) -> int:
    """Local wall-clock time as if it were UTC (epoch + TZ offset): what ``TelinkMiFlasher.html``
    ``setDevTime()`` and ``atc_mi_config.py`` send with command 0x23 (firmware.md §1.3)."""
    return calendar.timegm(time.localtime(time.time() if now is None else now))


def comfort_request(
    t_lo: float | None = None, t_hi: float | None = None, h_lo: float | None = None, h_hi: float | None = None
) -> bytes:
    """``20`` (get) or ``20 t_lo t_hi h_lo h_hi`` (s16/s16 0.01 °C, u16/u16 0.01 %)."""
    if t_lo is None:
        return bytes([CMD_COMFORT])
    assert t_hi is not None and h_lo is not None and h_hi is not None
    return bytes([CMD_COMFORT]) + struct.pack(
        "<hhHH", round(t_lo * 100), round(t_hi * 100), round(h_lo * 100), round(h_hi * 100)
    )


def history_request(count: int, start: int = 0) -> bytes:
    """``35 count(u16) start(u16)``: records ``start + 1 … count`` (1 = the newest)."""
    return bytes([CMD_HISTORY]) + struct.pack("<HH", count & 0xFFFF, start & 0xFFFF)


def reboot_request() -> bytes:
    """``72``: reboot when the client disconnects."""
    return bytes([CMD_REBOOT])


# --- replies ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unsupported:
    """``[cmd, 0xFF]``: the firmware does not know the command (or this build lacks it)."""

    cmd: int


@dataclass(frozen=True, slots=True)
class ConfigReply:
    cmd: int  # 0x55, 0x56 or 0xDD
    config: PvvxConfig


@dataclass(frozen=True, slots=True)
class BindkeyReply:
    key: bytes | None  # None: no bindkey stored in EEP (``18 FF``)

    @property
    def hex(self) -> str | None:
        return None if self.key is None else self.key.hex()


@dataclass(frozen=True, slots=True)
class TimeReply:
    now: int
    last_set: int | None = None


@dataclass(frozen=True, slots=True)
class ComfortReply:
    t_lo: float
    t_hi: float
    h_lo: float
    h_hi: float


@dataclass(frozen=True, slots=True)
class DeviceIdReply:
    hw_version: int
    sw_version: int
    dev_spec: int
    services: int

    @property
    def version_text(self) -> str:
        return f"v{self.sw_version >> 4 & 0xF}.{self.sw_version & 0xF}"


@dataclass(frozen=True, slots=True)
class RebootReply:
    status: int


@dataclass(frozen=True, slots=True)
class HistoryEnd:
    """``35 00 00``: no more records."""


@dataclass(frozen=True, slots=True)
class RawReply:
    cmd: int
    data: bytes


Reply = (
    Unsupported
    | ConfigReply
    | BindkeyReply
    | TimeReply
    | ComfortReply
    | DeviceIdReply
    | RebootReply
    | HistoryRecord
    | HistoryEnd
    | RawReply
)

_HISTORY_RECORD = struct.Struct("<HIhHH")  # idx, time, temp ×0.01, humi ×0.01, vbat mV (logger.h memo_blk_t)
_DEVICE_ID = struct.Struct("<BHHHI")


def decode_history_record(data: bytes) -> HistoryRecord | HistoryEnd:
    """One 0x35 notification: a record (13 bytes) or the end marker ``35 00 00``."""
    if len(data) < 3 or data[0] != CMD_HISTORY:
        raise PvvxError(f"not a history notification: {data.hex()}")
    if len(data) < 1 + _HISTORY_RECORD.size:
        return HistoryEnd()
    idx, ts, temp, humi, vbat = _HISTORY_RECORD.unpack_from(data, 1)
    return HistoryRecord(
        index=idx, timestamp=ts, temperature_c=temp / 100, humidity_pct=humi / 100, voltage_v=vbat / 1000
    )


def encode_history_record(rec: HistoryRecord) -> bytes:
    return bytes([CMD_HISTORY]) + _HISTORY_RECORD.pack(
        rec.index & 0xFFFF,
        int(rec.timestamp) & 0xFFFFFFFF,
        round((rec.temperature_c or 0.0) * 100),
        round((rec.humidity_pct or 0.0) * 100),
        round((rec.voltage_v or 0.0) * 1000),
    )


HISTORY_END = bytes([CMD_HISTORY, 0, 0])


def parse_reply(data: bytes) -> Reply:
    """Decode one 0x1F1F notification (or the value read from 0x1F1F, which is ``55 VERSION cfg…``)."""
    if not data:
        raise PvvxError("empty notification")
    cmd = data[0]
    body = bytes(data[1:])
    if len(body) == 1 and body[0] == UNSUPPORTED and cmd not in FF_IS_VALUE:
        return Unsupported(cmd)
    if cmd in (CMD_CONFIG, CMD_CONFIG_DEFAULT, CMD_LONGRANGE_RESET):
        if not body:
            raise PvvxError("config reply without the version byte")
        return ConfigReply(cmd, decode_config(body[0], body[1:]))
    if cmd == CMD_BINDKEY:
        if len(body) >= 16:
            return BindkeyReply(body[:16])
        if body[:1] == bytes([UNSUPPORTED]):
            return BindkeyReply(None)
        raise PvvxError(f"bindkey reply of {len(body)} bytes")
    if cmd == CMD_TIME:
        if len(body) < 4:
            raise PvvxError("time reply shorter than 4 bytes")
        (now,) = struct.unpack_from("<I", body)
        last = struct.unpack_from("<I", body, 4)[0] if len(body) >= 8 else None
        return TimeReply(now, last)
    if cmd == CMD_COMFORT:
        if len(body) < 8:
            raise PvvxError("comfort reply shorter than 8 bytes")
        t_lo, t_hi, h_lo, h_hi = struct.unpack_from("<hhHH", body)
        return ComfortReply(t_lo / 100, t_hi / 100, h_lo / 100, h_hi / 100)
    if cmd == CMD_DEV_ID:
        if len(body) < _DEVICE_ID.size:
            raise PvvxError("device id reply too short")
        _rev, hw, sw, spec, services = _DEVICE_ID.unpack_from(body)
        return DeviceIdReply(hw, sw, spec, services)
    if cmd == CMD_REBOOT:
        return RebootReply(body[0] if body else 0)
    if cmd == CMD_HISTORY:
        return decode_history_record(data)
    return RawReply(cmd, body)


def reply_command(data: bytes) -> int | None:
    return data[0] if data else None


# --- history download (command 0x35), sans-IO ----------------------------------------------------------------


class PvvxHistoryDownload:
    """Download the history log: ``start()`` gives the bytes to write to 0x1F1F, every notification goes
    to ``receive()``, which returns events (:class:`HistoryRecord`, :class:`HistoryProgress`); ``done``
    turns true at the end marker ``35 00 00`` or at record index ``count``. Records are numbered from
    the newest (1) back; the firmware sends indexes ``start + 1 … count`` (``send_memo_blk``), so
    ``count`` is the last index, not a number of records. ``[0x35, 0xFF]`` raises
    :class:`PvvxError` (a build without the history service). Other commands' notifications (the 0x33
    measurement stream) are ignored."""

    def __init__(self, count: int = 0xFFFF, start: int = 0) -> None:
        self.count = max(1, min(int(count), 0xFFFF))
        self.start_index = start
        self.records: list[HistoryRecord] = []
        self.done = False
        self.unsupported = False

    def start(self) -> bytes:
        return history_request(self.count, self.start_index)

    def receive(self, data: bytes) -> list[HistoryRecord | HistoryProgress]:
        if self.done or not data or data[0] != CMD_HISTORY:
            return []
        if len(data) == 2 and data[1] == UNSUPPORTED:
            self.done = True
            self.unsupported = True
            raise PvvxError("this firmware build has no history log (command 0x35 unsupported)")
        item = decode_history_record(data)
        if isinstance(item, HistoryEnd):
            self.done = True
            return [HistoryProgress(len(self.records), len(self.records), done=True)]
        self.records.append(item)
        # send_memo_blk(): records start+1 .. count, then the end marker
        self.done = item.index >= self.count
        total = len(self.records) if self.done else None
        return [item, HistoryProgress(len(self.records), total, done=self.done)]


# --- atc1441 firmware: single-byte commands, no replies (firmware.md §1.6) -----------------------------------

#: name -> (opcode, takes a signed/unsigned byte argument)
ATC1441_COMMANDS: dict[str, tuple[int, str | None]] = {
    "display_fahrenheit": (0xFF, None),
    "display_celsius": (0xCC, None),
    "advertise_fahrenheit": (0x0F, None),
    "advertise_celsius": (0x0C, None),
    "battery_on": (0xB1, None),
    "battery_off": (0xB0, None),
    "smiley_off": (0xA0, None),
    "smiley_happy": (0xA1, None),
    "smiley_sad": (0xA2, None),
    "smiley_comfort": (0xA3, None),
    "blinking_smiley": (0xAB, None),
    "advertise_custom": (0xAE, None),
    "advertise_mi": (0xAF, None),
    "adv_interval": (0xFE, "u8"),  # × 10 s
    "temp_offset": (0xFA, "s8"),  # ×0.1 °C
    "humi_offset": (0xFB, "s8"),  # ×1 %, ±50
    "defaults": (0xDE, None),  # defaults + save
    "save": (0xDF, None),  # settings are RAM-only until this
}


def atc1441_request(name: str, value: int | None = None) -> bytes:
    """Bytes of one atc1441 command (nothing is answered; send ``save`` to keep the settings)."""
    try:
        opcode, arg = ATC1441_COMMANDS[name]
    except KeyError:
        raise ValueError(f"unknown atc1441 command {name!r}; known: {', '.join(ATC1441_COMMANDS)}") from None
    if arg is None:
        return bytes([opcode])
    if value is None:
        raise ValueError(f"atc1441 command {name} needs a value")
    if arg == "s8":
        if not -128 <= value <= 127:
            raise ValueError(f"{name} must be -128..127")
        return bytes([opcode, value & 0xFF])
    if not 0 <= value <= 255:
        raise ValueError(f"{name} must be 0..255")
    return bytes([opcode, value])

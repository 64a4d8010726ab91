"""Reading and writing captures: btsnoop files (Android ``btsnoop_hci.log``, ``btmon -w``) and mitherm's
own JSON Lines captures. Everything comes out as :class:`mitherm.model.Advertisement`.

btsnoop
    All headers are big-endian. File header: magic ``btsnoop\\0``, version (1), datalink. Record header:
    original length, included length, flags, cumulative drops, timestamp (µs since 0000-01-01). Datalinks
    read: 1001 (unencapsulated HCI; a record is a received event when ``flags & 3 == 3``), 1002 (HCI H4;
    the first data byte is the packet type, 0x04 = event) and 2001 (BlueZ monitor; ``flags`` is
    ``(controller_index << 16) | opcode``, opcode 3 = event). Only LE Meta events carrying legacy (0x02)
    or extended (0x0D) advertising reports become Advertisements; everything else is skipped.

mitherm JSON Lines
    One JSON object per line::

        {"time": 1718000000.123456, "mac": "A4:C1:38:12:34:56", "address_type": "public",
         "rssi": -67, "name": "ATC_123456", "service_data": {"181a": "a4c138..."},
         "manufacturer_data": {"911": "0102"}, "source": "hci0"}

    ``time`` is Unix seconds (float); ``service_data`` keys are 16-bit service UUIDs as 4 lowercase hex
    digits, values the payload after the UUID in hex; ``manufacturer_data`` keys are the company id as a
    *decimal* string (``"911"`` = 0x038F Xiaomi), values the bytes after the company id in hex.
    ``address_type``, ``rssi`` and ``name`` may be null. When reading, service-data keys may also be
    spelled ``"0xFE95"``, ``"FE95"`` or as a full Bluetooth-base 128-bit UUID, and manufacturer keys as
    ``"0x038f"``; blank lines are skipped.
"""

from __future__ import annotations

import binascii
import io
import json
import json.encoder
import os
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from mitherm.mac import InvalidMac, mac_from_le, mac_to_le, normalize_mac
from mitherm.model import Advertisement
from mitherm.uuids import InvalidUuid, parse_service_uuid

__all__ = [
    "BTSNOOP_MAGIC",
    "CaptureError",
    "JsonlWriter",
    "build_ad_structures",
    "build_le_adv_report",
    "parse_ad_structures",
    "parse_hci_event",
    "read_btsnoop",
    "read_capture",
    "read_jsonl",
    "write_btsnoop",
    "write_jsonl_line",
]


class CaptureError(ValueError):
    """A capture file that cannot be read (wrong format, bad line)."""


PathOrFile = str | os.PathLike[str] | IO[bytes] | IO[str]

# --------------------------------------------------------------------------------------------------
# AD structures

AD_FLAGS = 0x01
AD_SHORT_NAME = 0x08
AD_COMPLETE_NAME = 0x09
AD_SERVICE_DATA_16 = 0x16
AD_SERVICE_DATA_32 = 0x20
AD_SERVICE_DATA_128 = 0x21
AD_MANUFACTURER = 0xFF

# Bluetooth base UUID 0000xxxx-0000-1000-8000-00805F9B34FB as it appears over the air (little-endian):
# the 12 fixed low bytes, then the 32-bit value.
_BASE_UUID_LE_TAIL = bytes.fromhex("fb349b5f8000008000100000")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def parse_ad_structures(data: bytes) -> tuple[dict[int, bytes], dict[int, bytes], str | None]:
    """Walk the AD structures of advertising data: ``(service_data, manufacturer_data, name)``.

    ``service_data`` maps the 16-bit UUID to the payload after it (32- and 128-bit service data count
    only when the UUID is a Bluetooth-base UUID with a 16-bit value). The complete local name wins over
    the shortened one. A truncated last structure is ignored; zero-length structures (padding) skipped."""
    service: dict[int, bytes] = {}
    manufacturer: dict[int, bytes] = {}
    complete_name: bytes | None = None
    short_name: bytes | None = None
    copy = type(data) is not bytes  # a slice of bytes is bytes already
    i = 0
    n = len(data)
    while i < n:
        length = data[i]
        if length == 0:  # padding (some stacks zero-fill to 31 bytes)
            i += 1
            continue
        end = i + 1 + length
        if end > n:  # truncated last structure
            break
        ad_type = data[i + 1]
        if ad_type == AD_FLAGS:  # in nearly every advertisement; nothing to take from it
            pass
        elif ad_type == AD_SERVICE_DATA_16:
            if length >= 3:
                value = data[i + 4 : end]
                service[data[i + 2] | (data[i + 3] << 8)] = bytes(value) if copy else value
        elif ad_type == AD_MANUFACTURER:
            if length >= 3:
                value = data[i + 4 : end]
                manufacturer[data[i + 2] | (data[i + 3] << 8)] = bytes(value) if copy else value
        elif ad_type == AD_COMPLETE_NAME:
            complete_name = bytes(data[i + 2 : end])
        elif ad_type == AD_SHORT_NAME:
            short_name = bytes(data[i + 2 : end])
        elif ad_type == AD_SERVICE_DATA_32:
            if length >= 5:
                (uuid32,) = _U32.unpack_from(data, i + 2)
                if uuid32 <= 0xFFFF:
                    service[uuid32] = bytes(data[i + 6 : end])
        elif (
            ad_type == AD_SERVICE_DATA_128
            and length >= 17
            and data[i + 2 : i + 14] == _BASE_UUID_LE_TAIL
            and data[i + 16] == 0
            and data[i + 17] == 0
        ):
            service[data[i + 14] | (data[i + 15] << 8)] = bytes(data[i + 18 : end])
        i = end
    raw_name = complete_name if complete_name is not None else short_name
    name = None if raw_name is None else raw_name.rstrip(b"\0").decode("utf-8", errors="replace")
    return service, manufacturer, name


def build_ad_structures(
    service_data: Mapping[int, bytes],
    manufacturer_data: Mapping[int, bytes] | None = None,
    name: str | None = None,
    flags: int | None = 0x06,
) -> bytes:
    """Advertising data for the given values (the inverse of :func:`parse_ad_structures`).

    ``flags=None`` leaves out the Flags structure. Raises ValueError if a structure exceeds 255 bytes."""
    out = bytearray()

    def put(ad_type: int, value: bytes) -> None:
        if len(value) + 1 > 255:
            raise ValueError(f"AD structure 0x{ad_type:02X} too long ({len(value)} bytes, at most 254)")
        out.append(len(value) + 1)
        out.append(ad_type)
        out.extend(value)

    if flags is not None:
        put(AD_FLAGS, bytes([flags & 0xFF]))
    for uuid, payload in service_data.items():
        put(AD_SERVICE_DATA_16, _U16.pack(uuid) + bytes(payload))
    for company, payload in (manufacturer_data or {}).items():
        put(AD_MANUFACTURER, _U16.pack(company) + bytes(payload))
    if name is not None:
        put(AD_COMPLETE_NAME, name.encode("utf-8"))
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# HCI LE advertising reports

HCI_EVENT_LE_META = 0x3E
LE_ADVERTISING_REPORT = 0x02
LE_EXTENDED_ADVERTISING_REPORT = 0x0D
RSSI_UNAVAILABLE = 127
LEGACY_MAX_DATA = 31
EXTENDED_MAX_DATA = 229  # one HCI event: 255 parameter bytes - subevent - num_reports - 24-byte header

_ADDRESS_TYPES = {0: "public", 1: "random", 2: "public", 3: "random"}
_ADDRESS_TYPE_CODES = {"public": 0, "random": 1, None: 0}

# event type, address type, address (LE), data length
_LEGACY_REPORT = struct.Struct("<BB6sB")
# an LE Meta event with legacy reports up to the first one's data: event code, parameter length, subevent,
# number of reports, then the first report's header
_LEGACY_EVENT_HEAD = struct.Struct("<BBBB" + _LEGACY_REPORT.format[1:])
# event type, address type, address, primary PHY, secondary PHY, SID, TX power, RSSI, periodic interval,
# direct address type, direct address, data length
_EXT_REPORT = struct.Struct("<HB6sBBBbbHB6sB")


def _rssi(raw: int) -> int | None:
    return None if raw == RSSI_UNAVAILABLE else raw


#: the RSSI byte of a legacy report (signed) -> dBm, None for 127 (unavailable)
_RSSI_BYTE = tuple(_rssi(b - 256 if b > 127 else b) for b in range(256))
_MACS_LE: dict[bytes, str] = {}  # over-the-air address -> AA:BB:…, a capture has a few hundred


def _advertisement(
    addr_le: bytes, addr_type: int, ad: bytes, rssi: int | None, time: float, source: str
) -> Advertisement:
    service, manufacturer, name = parse_ad_structures(ad)
    mac = _MACS_LE.get(addr_le)
    if mac is None:
        mac = _mac_from_le_cached(addr_le)
    return Advertisement(mac, time, service, rssi, name, _ADDRESS_TYPES.get(addr_type), manufacturer, source)


def _mac_from_le_cached(addr_le: bytes) -> str:
    if len(_MACS_LE) >= 65536:
        _MACS_LE.clear()
    mac = _MACS_LE[addr_le] = mac_from_le(addr_le)
    return mac


def parse_hci_event(packet: bytes, time: float, source: str = "") -> list[Advertisement]:
    """Advertisements in one HCI event (event code first, no H4 packet-type byte).

    Reads LE Meta legacy (0x02) and extended (0x0D) advertising reports, one report after another (the
    layout every controller and BlueZ use). Other events, and malformed or short packets, give ``[]``."""
    if len(packet) < 4 or packet[0] != HCI_EVENT_LE_META:
        return []
    end = 2 + packet[1]
    if end > len(packet):
        return []
    subevent = packet[2]
    count = packet[3]
    pos = 4
    out: list[Advertisement] = []
    try:
        if subevent == LE_ADVERTISING_REPORT:
            for _ in range(count):
                _evt, addr_type, addr, length = _LEGACY_REPORT.unpack_from(packet, pos)
                pos += _LEGACY_REPORT.size
                if pos + length + 1 > end:
                    return []
                ad = packet[pos : pos + length]
                rssi = _RSSI_BYTE[packet[pos + length]]
                pos += length + 1
                out.append(_advertisement(addr, addr_type, ad, rssi, time, source))
        elif subevent == LE_EXTENDED_ADVERTISING_REPORT:
            for _ in range(count):
                fields = _EXT_REPORT.unpack_from(packet, pos)
                pos += _EXT_REPORT.size
                length = fields[11]
                if pos + length > end:
                    return []
                ad = packet[pos : pos + length]
                pos += length
                out.append(_advertisement(fields[2], fields[1], ad, _rssi(fields[7]), time, source))
    except struct.error:  # report header runs past the packet
        return []
    return out


def build_le_adv_report(
    mac: str,
    ad_data: bytes,
    rssi: int | None,
    address_type: str | None = "public",
    extended: bool = False,
) -> bytes:
    """An HCI LE Meta event (no H4 byte) with one legacy or extended advertising report."""
    addr = mac_to_le(mac)
    try:
        addr_type = _ADDRESS_TYPE_CODES[address_type]
    except KeyError:
        raise ValueError(f"address_type must be 'public' or 'random', not {address_type!r}") from None
    raw_rssi = RSSI_UNAVAILABLE if rssi is None else rssi
    if extended:
        if len(ad_data) > EXTENDED_MAX_DATA:
            raise ValueError(f"advertising data too long for one report ({len(ad_data)} > 229 bytes)")
        # event type 0 (complete, non-connectable), 1M primary PHY, no secondary PHY, no SID,
        # TX power unavailable (127), no periodic advertising, no direct address
        report = _EXT_REPORT.pack(0, addr_type, addr, 1, 0, 0xFF, 127, raw_rssi, 0, 0, bytes(6), len(ad_data))
        params = bytes([LE_EXTENDED_ADVERTISING_REPORT, 1]) + report + ad_data
    else:
        if len(ad_data) > LEGACY_MAX_DATA:
            raise ValueError(f"advertising data too long for a legacy report ({len(ad_data)} > 31 bytes)")
        report = _LEGACY_REPORT.pack(0, addr_type, addr, len(ad_data)) + ad_data
        params = bytes([LE_ADVERTISING_REPORT, 1]) + report + struct.pack("b", raw_rssi)
    return bytes([HCI_EVENT_LE_META, len(params)]) + params


# --------------------------------------------------------------------------------------------------
# btsnoop

BTSNOOP_MAGIC = b"btsnoop\0"
DATALINK_HCI_UNENCAP = 1001
DATALINK_HCI_H4 = 1002
DATALINK_BLUEZ_MONITOR = 2001
#: microseconds from 0000-01-01 to 1970-01-01 in btsnoop's calendar
BTSNOOP_EPOCH_DELTA_US = 0x00DCDDB30F2F8000

_FILE_HEADER = struct.Struct(">8sII")
_RECORD_HEADER = struct.Struct(">IIIIq")
_H4_EVENT = 0x04
_MONITOR_EVENT = 3


def _open_binary(src: PathOrFile) -> tuple[IO[bytes], str, bool]:
    """(binary file, display name, whether we opened it)."""
    if isinstance(src, str | os.PathLike):
        name = os.fspath(src)
        if name == "-":
            return sys.stdin.buffer, "<stdin>", False
        try:
            return open(name, "rb"), name, True  # closed by the reader
        except OSError as e:
            raise CaptureError(f"cannot open capture {name}: {e.strerror or e}") from e
    f = src
    if isinstance(f, io.TextIOBase) and hasattr(f, "buffer"):
        f = f.buffer
    # a text stream without a buffer (StringIO) stays text: only JSON Lines can be read from it
    name = getattr(src, "name", None)
    return f, name if isinstance(name, str) else "<capture>", False  # type: ignore[return-value]


def _source_name(name: str) -> str:
    return Path(name).name if not name.startswith("<") else name


def read_btsnoop(path_or_fileobj: PathOrFile, source: str | None = None) -> Iterator[Advertisement]:
    """Advertisements in a btsnoop file (datalink 1001, 1002 or 2001).

    The header is checked at once (CaptureError for a non-btsnoop file or another datalink); records
    are read lazily. A truncated last record ends the iteration cleanly. ``source`` defaults to the
    file name."""
    f, name, owned = _open_binary(path_or_fileobj)
    return _open_btsnoop(f, name, owned, source)


def _open_btsnoop(f: IO[bytes], name: str, owned: bool, source: str | None) -> Iterator[Advertisement]:
    try:
        header = f.read(_FILE_HEADER.size)
        if len(header) < _FILE_HEADER.size or header[:8] != BTSNOOP_MAGIC:
            raise CaptureError(
                f"{name} is not a btsnoop file: expected the magic b'btsnoop\\x00' at the start, found {header[:8]!r}"
            )
        _magic, _version, datalink = _FILE_HEADER.unpack(header)
        if datalink not in (DATALINK_HCI_UNENCAP, DATALINK_HCI_H4, DATALINK_BLUEZ_MONITOR):
            raise CaptureError(
                f"{name}: unsupported btsnoop datalink {datalink}: expected 1001 (HCI), 1002 (HCI H4, "
                "Android) or 2001 (BlueZ monitor, btmon -w)"
            )
    except BaseException:
        if owned:
            f.close()
        raise
    return _btsnoop_records(f, owned, datalink, source if source is not None else _source_name(name))


def _btsnoop_records(f: IO[bytes], owned: bool, datalink: int, source: str) -> Iterator[Advertisement]:
    # Records are cut out of chunks of the file rather than read one by one (two reads a record). A
    # truncated last record ends the iteration, as a short read always did.
    read = getattr(f, "read1", None) or f.read  # read1: what a pipe has, without waiting for a full chunk
    unpack_from = _RECORD_HEADER.unpack_from
    header_size = _RECORD_HEADER.size
    h4 = datalink == DATALINK_HCI_H4
    monitor = datalink == DATALINK_BLUEZ_MONITOR
    rssis = _RSSI_BYTE
    macs, address_types, new = _MACS_LE, _ADDRESS_TYPES, Advertisement
    legacy_head = _LEGACY_EVENT_HEAD.unpack_from
    buf = b""
    pos = 0
    try:
        while True:
            if len(buf) - pos < header_size:
                more = read(_CHUNK)
                if not more:
                    return
                buf = buf[pos:] + more
                pos = 0
                continue
            _orig_len, incl_len, flags, _drops, ts = unpack_from(buf, pos)
            start = pos + header_size
            end = start + incl_len
            if end > len(buf):
                more = f.read(end - len(buf))  # the rest of this record, however long it claims to be
                if len(more) < end - len(buf):
                    return
                buf = buf[pos:] + more
                pos = 0
                continue
            pos = end
            if h4:
                if incl_len < 2 or buf[start] != _H4_EVENT:
                    continue
                start += 1
            elif monitor:
                if flags & 0xFFFF != _MONITOR_EVENT:
                    continue
            elif flags & 3 != 3:  # 1001: bit 1 = command/event, bit 0 = received
                continue
            if start == end or buf[start] != HCI_EVENT_LE_META:
                continue
            time = (ts - BTSNOOP_EPOCH_DELTA_US) / 1_000_000
            if end - start >= _LEGACY_EVENT_HEAD.size:
                _code, length, subevent, count, _evt, addr_type, addr, data_length = legacy_head(buf, start)
                if subevent == LE_ADVERTISING_REPORT and count == 1:
                    # what parse_hci_event makes of the usual event, one legacy report, without the list
                    ad_start = start + _LEGACY_EVENT_HEAD.size
                    ad_end = ad_start + data_length
                    if start + 2 + length <= end and ad_end < start + 2 + length:  # else malformed: nothing
                        service, manufacturer, name = parse_ad_structures(buf[ad_start:ad_end])
                        mac = macs.get(addr)
                        if mac is None:
                            mac = _mac_from_le_cached(addr)
                        yield new(
                            mac,
                            time,
                            service,
                            rssis[buf[ad_end]],
                            name,
                            address_types.get(addr_type),
                            manufacturer,
                            source,
                        )
                    continue
            yield from parse_hci_event(buf[start:end], time, source)
    finally:
        if owned:
            f.close()


def write_btsnoop(
    path: str | os.PathLike[str] | IO[bytes],
    advertisements: Iterable[Advertisement],
    datalink: Literal[1001, 1002, 2001] = DATALINK_HCI_H4,
) -> int:
    """Write advertisements as LE advertising report events; returns the number of records.

    A legacy report when the advertising data fits in 31 bytes, else an extended one. An unknown
    ``address_type`` is written as public; ``rssi=None`` as 127 (unavailable), which reads back as None."""
    if datalink not in (DATALINK_HCI_UNENCAP, DATALINK_HCI_H4, DATALINK_BLUEZ_MONITOR):
        raise ValueError(f"datalink must be 1001, 1002 or 2001, not {datalink!r}")
    if isinstance(path, str | os.PathLike):
        f: IO[bytes] = open(path, "wb")  # noqa: SIM115
        owned = True
    else:
        f, owned = path, False
    count = 0
    try:
        f.write(_FILE_HEADER.pack(BTSNOOP_MAGIC, 1, datalink))
        for adv in advertisements:
            ad = build_ad_structures(adv.service_data, adv.manufacturer_data, adv.name)
            event = build_le_adv_report(
                adv.mac, ad, adv.rssi, adv.address_type or "public", extended=len(ad) > LEGACY_MAX_DATA
            )
            if datalink == DATALINK_HCI_H4:
                data, flags = bytes([_H4_EVENT]) + event, 3
            elif datalink == DATALINK_BLUEZ_MONITOR:
                data, flags = event, _MONITOR_EVENT  # controller index 0
            else:
                data, flags = event, 3
            ts = round(adv.time * 1_000_000) + BTSNOOP_EPOCH_DELTA_US
            f.write(_RECORD_HEADER.pack(len(data), len(data), flags, 0, ts))
            f.write(data)
            count += 1
    finally:
        if owned:
            f.close()
    return count


# --------------------------------------------------------------------------------------------------
# mitherm JSON Lines


def _hex_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a hex string, not {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{what} is not hex: {value[:40]!r}") from None


def _company_id(key: str) -> int:
    s = key.strip().lower()
    try:
        value = int(s, 16) if s.startswith("0x") else int(s, 10)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"manufacturer_data key {key!r} is not a company id (decimal, or 0x-prefixed hex)")
    return value


_RAW_DECODE = json.JSONDecoder().raw_decode
_MACS: dict[str, str] = {}
_UUIDS: dict[str, int] = {}


def _fast_adv(obj: Any, source: str | None, default_source: str = "") -> Advertisement | None:
    """The records mitherm writes itself, without the full validation (a replay reads millions); None
    when anything is unusual, and the validating path decides."""
    try:
        mac = _MACS.get(obj["mac"])
        t = obj["time"]
        rssi = obj.get("rssi")
        name = obj.get("name")
        if mac is None or type(t) is not float or (rssi is not None and type(rssi) is not int):
            return None
        if name is not None and type(name) is not str:
            return None
        service_data = {}
        for key, value in obj["service_data"].items():
            uuid = _UUIDS.get(key)
            if uuid is None:
                return None
            service_data[uuid] = bytes.fromhex(value)
        md = obj.get("manufacturer_data")
        if md:
            return None
        address_type = obj.get("address_type")
        if address_type not in ("public", "random", None):
            return None
        src = source if source is not None else obj.get("source") or default_source
        if type(src) is not str:
            return None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return Advertisement(mac, t, service_data, rssi, name, address_type, {}, src)


def _adv_from_json(obj: Any, source: str | None, default_source: str = "") -> Advertisement:
    adv = _fast_adv(obj, source, default_source)
    if adv is not None:
        return adv
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "mac" not in obj:
        raise ValueError('missing "mac"')
    mac = normalize_mac(str(obj["mac"]))
    if isinstance(obj["mac"], str) and len(_MACS) < 100_000:
        _MACS[obj["mac"]] = mac
    t = obj.get("time")
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValueError('"time" must be a number (Unix seconds)')
    try:
        t = float(t)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError('"time" is out of range for Unix seconds') from None
    rssi = obj.get("rssi")
    if rssi is not None and (isinstance(rssi, bool) or not isinstance(rssi, int)):
        raise ValueError('"rssi" must be an integer or null')
    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError('"name" must be a string or null')
    address_type = obj.get("address_type")
    if address_type not in ("public", "random", None):
        raise ValueError('"address_type" must be "public", "random" or null')
    service_data: dict[int, bytes] = {}
    raw_sd = obj.get("service_data") or {}
    if not isinstance(raw_sd, dict):
        raise ValueError('"service_data" must be an object')
    for key, value in raw_sd.items():
        uuid = parse_service_uuid(key)
        if isinstance(key, str) and len(_UUIDS) < 1000:
            _UUIDS[key] = uuid
        service_data[uuid] = _hex_bytes(value, f"service_data[{key!r}]")
    manufacturer_data: dict[int, bytes] = {}
    raw_md = obj.get("manufacturer_data") or {}
    if not isinstance(raw_md, dict):
        raise ValueError('"manufacturer_data" must be an object')
    for key, value in raw_md.items():
        manufacturer_data[_company_id(key)] = _hex_bytes(value, f"manufacturer_data[{key!r}]")
    src = source if source is not None else obj.get("source") or default_source
    return Advertisement(
        mac=mac,
        time=t,
        service_data=service_data,
        rssi=rssi,
        name=name,
        address_type=address_type,
        manufacturer_data=manufacturer_data,
        source=str(src),
    )


def read_jsonl(
    path_or_fileobj: PathOrFile,
    errors: Literal["strict", "skip"] = "strict",
    source: str | None = None,
    default_source: str = "",
) -> Iterator[Advertisement]:
    """Advertisements from a mitherm JSON Lines capture (see the module docstring).

    A bad line raises CaptureError naming the file and line number, or is skipped with
    ``errors="skip"``. ``source`` overrides the ``source`` field of every record; ``default_source``
    names the receiver of records that carry none (a missing, null or empty ``source``)."""
    if errors not in ("strict", "skip"):
        raise ValueError(f"errors must be 'strict' or 'skip', not {errors!r}")
    f, name, owned = _open_binary(path_or_fileobj)
    return _jsonl_records(f, name, owned, errors == "skip", source, default_source)


# Reading the lines mitherm writes itself (`write_jsonl_line`) is the hot path of a replay, so they do not
# go through the JSON decoder. A line in the canonical layout
#
#   {"time":H.F,"mac":M,"address_type":A,"rssi":R,"name":N,"service_data":{"K":"P"…},"manufacturer_data":{…},"source":S}
#
# is cut with bytes.partition into the time's digits H and F, `M,"address_type":A`, R, `N,"service_data":{"K`,
# the payload P and the tail after it. The pieces that repeat from line to line (one `M,…A` per device, one
# tail per receiver) are checked against their strict form below when first seen, and what they hold is
# cached; the ones that change with every frame (the digits, the hex) are checked on every line. A line takes
# this path only when every piece passes; the strict pieces joined by the separators spell exactly the
# canonical layout, and none of them can hold the separator that follows it, so the line means the same to
# the JSON decoder: no escape or control character in a string, numbers in JSON syntax, every key once and in
# its place. Any other line, or one with a piece that fails, goes through the JSON decoder and the validation
# (`slow` in _jsonl_records), which decide and word the error. The time is H.F as the quotient of two
# integers, which Python divides with correct rounding: the float the JSON decoder gives for those digits
# (whose float() of 16-17 digits takes the slow path of dtoa).
_JSON_STR = rb'"[^"\\\x00-\x1f]*"'  # a JSON string without escapes: its bytes are its UTF-8 text
_HEX_ENTRY = rb'"[^"\\\x00-\x1f]*":"[0-9A-Fa-f]*"'
_TIME_HEAD = re.compile(rb'\{"time":(0|[1-9][0-9]{0,15})')
_MAC_PIECE = re.compile(rb"(" + _JSON_STR + rb'),"address_type":(null|"public"|"random")')
_RSSI_PIECE = re.compile(rb"-?(?:0|[1-9][0-9]*)")
_NAME_PIECE = re.compile(rb"(null|" + _JSON_STR + rb'),"service_data":\{"([^"\\\x00-\x1f]*)')
_TAIL_PIECE = re.compile(
    rb"((?:," + _HEX_ENTRY + rb")*)\},"
    rb'"manufacturer_data":\{((?:' + _HEX_ENTRY + rb"(?:," + _HEX_ENTRY + rb")*)?)\},"
    rb'"source":(null|' + _JSON_STR + rb")\}\r?"
)
_HEX_ENTRIES = re.compile(rb'"([^"]*)":"([^"]*)"')
_POW10 = tuple(10**k for k in range(18))
_CHUNK = 1 << 16
_PIECE_CACHE_SIZE = 4096


def _json_str(token: bytes) -> str | None:
    return None if token == b"null" else token[1:-1].decode("utf-8")


def _strict(pattern: re.Pattern[bytes], piece: bytes) -> re.Match[bytes]:
    m = pattern.fullmatch(piece)
    if m is None:
        raise ValueError("not in the canonical layout")
    return m


def _time_head(piece: bytes) -> int:
    return int(_strict(_TIME_HEAD, piece)[1])


def _mac_piece(piece: bytes) -> tuple[str, str | None]:
    m = _strict(_MAC_PIECE, piece)
    return normalize_mac(m[1][1:-1].decode("utf-8")), _json_str(m[2])


def _rssi_piece(piece: bytes) -> int | None:
    return None if piece == b"null" else int(_strict(_RSSI_PIECE, piece)[0])


def _name_piece(piece: bytes) -> tuple[str | None, int]:
    m = _strict(_NAME_PIECE, piece)
    return _json_str(m[1]), parse_service_uuid(m[2].decode("utf-8"))


def _hex_entries(body: bytes, key: Any) -> tuple[tuple[int, bytes], ...]:
    entries = tuple((key(k.decode("utf-8")), binascii.a2b_hex(v)) for k, v in _HEX_ENTRIES.findall(body))
    if len({k for k, _ in entries}) < len(entries):
        # the same key twice, or two spellings of one: JSON keeps the last value at the first place
        raise ValueError("a repeated key")
    return entries


def _tail_piece(
    piece: bytes, source: str | None, default_source: str
) -> tuple[tuple[tuple[tuple[int, bytes], ...], tuple[tuple[int, bytes], ...]] | None, str]:
    """((the further service data, the manufacturer data) or None when there is neither, the source)."""
    m = _strict(_TAIL_PIECE, piece)
    extra = _hex_entries(m[1], parse_service_uuid)
    manufacturer = _hex_entries(m[2], _company_id)
    src = _json_str(m[3])
    more = (extra, manufacturer) if extra or manufacturer else None
    return more, source if source is not None else src or default_source


# piece -> what it holds (plain dicts: the hot loop looks them up by subscript), filled by _learn
_TIME_HEADS: dict[bytes, int] = {}
_MAC_PIECES: dict[bytes, tuple[str, str | None]] = {}
_KNOWN_RSSIS: dict[bytes, int | None] = {b"null": None, **{str(i).encode(): i for i in range(-128, 128)}}
_RSSI_PIECES = dict(_KNOWN_RSSIS)
_NAME_PIECES: dict[bytes, tuple[str | None, int]] = {}


def _learn(cache: dict[bytes, Any], piece: bytes, parse: Any, *args: Any) -> None:
    """Cache what a piece holds when it is canonical (else leave it out: its lines take the validating path)."""
    if piece in cache:
        return
    try:
        value = parse(piece, *args)
    except ValueError:  # not canonical; InvalidMac, InvalidUuid, UnicodeDecodeError, binascii.Error too
        return
    if len(cache) >= _PIECE_CACHE_SIZE:  # a bound for odd files; a capture has a few hundred of each
        cache.clear()
        if cache is _RSSI_PIECES:
            cache.update(_KNOWN_RSSIS)
    cache[piece] = value


class _BadLine(Exception):
    pass


def _jsonl_records(
    f: IO[bytes], name: str, owned: bool, skip: bool, source: str | None, default_source: str = ""
) -> Iterator[Advertisement]:
    def slow(raw: bytes | str) -> Advertisement | None:
        """One line through the JSON decoder and the validation; None for a blank or skipped line."""
        line = raw.strip()
        if not line:
            return None
        try:
            text = line.decode("utf-8") if type(line) is bytes else line  # text-mode files give str
            obj, end = _RAW_DECODE(text)  # json.loads without its encoding sniffing and regexes
            if end != len(text):
                raise ValueError(f"extra data after the JSON object at column {end + 1}")
            return _adv_from_json(obj, source, default_source)
        except (ValueError, InvalidMac, InvalidUuid, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            if skip:
                return None
            raise _BadLine(e) from e

    def bad(e: _BadLine, lineno: int) -> CaptureError:
        return CaptureError(f"{name}:{lineno}: not a mitherm capture record: {e.args[0]}")

    try:
        read = getattr(f, "read1", None) or getattr(f, "read", None)
        if read is None or not isinstance(read(0), bytes):  # a text stream: line by line
            for lineno, raw in enumerate(f, 1):
                try:
                    adv = slow(raw)
                except _BadLine as e:
                    raise bad(e, lineno) from e.args[0]
                if adv is not None:
                    yield adv
            return
        heads, macs, rssis, names = _TIME_HEADS, _MAC_PIECES, _RSSI_PIECES, _NAME_PIECES
        tails: dict[bytes, Any] = {}  # per reader: the source it gives depends on source and default_source
        pow10 = _POW10
        unhex = binascii.a2b_hex
        new = Advertisement
        lines_before = 0
        for chunk in _line_chunks(read):
            lines = chunk.split(b"\n")
            lines.pop()  # after the last line break
            for line in lines:
                head, _, rest = line.partition(b".")
                frac, _, rest = rest.partition(b',"mac":')
                mac_piece, _, rest = rest.partition(b',"rssi":')
                rssi, _, rest = rest.partition(b',"name":')
                name_piece, _, rest = rest.partition(b'":"')
                payload, _, tail = rest.partition(b'"')
                if frac.isdigit():
                    try:
                        mac, address_type = macs[mac_piece]
                        name_, uuid = names[name_piece]
                        more, src = tails[tail]
                        service_data = {uuid: unhex(payload)}
                        if more is None:
                            manufacturer = {}
                        else:
                            service_data.update(more[0])
                            manufacturer = dict(more[1])
                        p = pow10[len(frac)]
                        adv = new(
                            mac,
                            (heads[head] * p + int(frac)) / p,
                            service_data,
                            rssis[rssi],
                            name_,
                            address_type,
                            manufacturer,
                            src,
                        )
                    except KeyError:  # a piece not seen yet (or not canonical): this line the slow way
                        _learn(heads, head, _time_head)
                        _learn(macs, mac_piece, _mac_piece)
                        _learn(rssis, rssi, _rssi_piece)
                        _learn(names, name_piece, _name_piece)
                        _learn(tails, tail, _tail_piece, source, default_source)
                    except (ValueError, IndexError):  # hex of odd length or not hex, a fraction of 18+ digits
                        pass
                    else:
                        yield adv
                        continue
                try:
                    adv = slow(line)
                except _BadLine as e:
                    # the first line with these bytes: an identical one before would have failed the same way
                    raise bad(e, lines_before + lines.index(line) + 1) from e.args[0]
                if adv is not None:
                    yield adv
            lines_before += len(lines)
    finally:
        if owned:
            f.close()


def _line_chunks(read: Any) -> Iterator[bytes]:
    """The stream in chunks of whole lines, each ending with a line break (one is added to the last)."""
    pending: list[bytes] = []
    while True:
        data = read(_CHUNK)
        if not data:
            break
        cut = data.rfind(b"\n") + 1
        if not cut:  # a line longer than a chunk
            pending.append(data)
            continue
        if pending:
            pending.append(data[:cut])
            yield b"".join(pending)
            pending.clear()
        else:
            yield data[:cut] if cut < len(data) else data
        if cut < len(data):
            pending.append(data[cut:])
    if pending:
        pending.append(b"\n")
        yield b"".join(pending)


def _adv_to_json(adv: Advertisement) -> dict[str, Any]:
    return {
        "time": adv.time,
        "mac": adv.mac,
        "address_type": adv.address_type,
        "rssi": adv.rssi,
        "name": adv.name,
        "service_data": {f"{uuid:04x}": bytes(data).hex() for uuid, data in adv.service_data.items()},
        "manufacturer_data": {str(cid): bytes(data).hex() for cid, data in adv.manufacturer_data.items()},
        "source": adv.source,
    }


def _write_jsonl_line_json(adv: Advertisement) -> str:
    """The reference formulation of :func:`write_jsonl_line` (what it must equal byte for byte)."""
    return json.dumps(_adv_to_json(adv), ensure_ascii=False, separators=(",", ":"))


_encode_str = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) writes for a str
_ENCODED: dict[str, str] = {}  # mac, source, name, address type -> its JSON string
_NONFINITE = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}


class _Unusual(Exception):
    """A value that the hand formatting does not cover: json.dumps decides."""


def _json_string(s: Any) -> str:
    if type(s) is not str:
        if s is None:
            return "null"
        raise _Unusual
    encoded = _ENCODED.get(s)
    if encoded is None:
        if len(_ENCODED) >= 8192:
            _ENCODED.clear()
        encoded = _ENCODED[s] = _encode_str(s)
    return encoded


# (mac, address_type, name, source, uuid) -> the text between the time and the rssi, between the rssi and
# the payload, and after the payload, for the usual record: one service data entry, no manufacturer data
_LINE_PIECES: dict[tuple[str, str | None, str | None, str, int], tuple[str, str, str]] = {}
_STR_OR_NONE = (str, type(None))


def write_jsonl_line(adv: Advertisement) -> str:
    """One JSON Lines record for ``adv``, without the line break.

    Byte for byte ``json.dumps`` of the record (``ensure_ascii=False``, no spaces), formatted by hand:
    a replay's capture and the gateway's recent-frame snapshot write tens of thousands at a time. Values
    of other types than the annotated ones go through ``json.dumps`` itself."""
    t = adv.time  # read in the order json.dumps's dict reads them: the same error for a missing one
    mac = adv.mac
    address_type = adv.address_type
    rssi = adv.rssi
    name = adv.name
    sd = adv.service_data
    md = adv.manufacturer_data
    source = adv.source
    if (
        type(t) is float
        and t - t == 0.0  # finite: json writes NaN and Infinity
        and type(rssi) is int
        and type(sd) is dict
        and len(sd) == 1
        and type(md) is dict
        and not md
        and type(mac) is str
        and type(source) is str
        and type(name) in _STR_OR_NONE
        and type(address_type) in _STR_OR_NONE
    ):
        ((uuid, data),) = sd.items()
        if type(data) is bytes and type(uuid) is int:
            key = (mac, address_type, name, source, uuid)
            pieces = _LINE_PIECES.get(key)
            if pieces is None:
                if len(_LINE_PIECES) >= 8192:
                    _LINE_PIECES.clear()
                pieces = _LINE_PIECES[key] = (
                    f',"mac":{_encode_str(mac)},"address_type":{_json_string(address_type)},"rssi":',
                    f',"name":{_json_string(name)},"service_data":{{"{uuid:04x}":"',
                    f'"}},"manufacturer_data":{{}},"source":{_encode_str(source)}}}',
                )
            # float.__repr__ is what json writes for a finite float; str(int) for an int
            return f'{{"time":{t!r}{pieces[0]}{rssi}{pieces[1]}{data.hex()}{pieces[2]}'
    return _write_jsonl_line_any(adv)


def _write_jsonl_line_any(adv: Advertisement) -> str:
    """write_jsonl_line for any record: by hand for the annotated types, else json.dumps."""
    try:
        t = adv.time
        if type(t) is float:
            time_ = repr(t)
            if time_[-1] > "9":  # inf, -inf, nan; a finite repr ends with a digit
                time_ = _NONFINITE[time_]
        elif type(t) is int:
            time_ = repr(t)
        else:
            raise _Unusual
        mac = _json_string(adv.mac)
        address_type = _json_string(adv.address_type)
        rssi = adv.rssi
        if rssi is None:
            rssi_ = "null"
        elif type(rssi) is int:
            rssi_ = repr(rssi)
        else:
            raise _Unusual
        name = _json_string(adv.name)
        sd = adv.service_data
        md = adv.manufacturer_data
        if type(sd) is not dict or type(md) is not dict:
            raise _Unusual
        for uuid in sd:
            if type(uuid) is not int:
                raise _Unusual
        for cid in md:
            if type(cid) is not int:
                raise _Unusual
        source = adv.source
        if type(source) is not str:
            raise _Unusual
        source = _json_string(source)
    except (_Unusual, AttributeError, ValueError):  # ValueError: an int beyond the str() digit limit
        return _write_jsonl_line_json(adv)  # the same line, or the same error, the slow way
    # from here on the same expressions as _adv_to_json, in the same order: the same errors, if any
    sd_ = ",".join([f'"{uuid:04x}":"{bytes(data).hex()}"' for uuid, data in sd.items()]) if sd else ""
    md_ = ",".join([f'"{cid}":"{bytes(data).hex()}"' for cid, data in md.items()]) if md else ""
    return (
        f'{{"time":{time_},"mac":{mac},"address_type":{address_type},"rssi":{rssi_},"name":{name},'
        f'"service_data":{{{sd_}}},"manufacturer_data":{{{md_}}},"source":{source}}}'
    )


class JsonlWriter:
    """Appends advertisements to a JSON Lines capture, flushing after every line (safe to tail or kill).

    Usable as a context manager. ``path`` may also be an open text file (left open on close)."""

    def __init__(self, path: str | os.PathLike[str] | IO[str]) -> None:
        if isinstance(path, str | os.PathLike):
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = open(p, "a", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._file, self._owned = path, False
        self.count = 0

    def write(self, adv: Advertisement) -> None:
        self._file.write(write_jsonl_line(adv) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._owned and not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# sniffing


def _peek(f: IO[bytes], n: int) -> bytes:
    peek = getattr(f, "peek", None)
    if peek is not None:
        return peek(n)[:n]
    if f.seekable():
        pos = f.tell()
        head = f.read(n)
        f.seek(pos)
        return head
    raise CaptureError("cannot sniff the capture format of a non-seekable stream")


def read_capture(path: PathOrFile, source: str | None = None, default_source: str = "") -> Iterator[Advertisement]:
    """Advertisements from a btsnoop file or a mitherm JSON Lines capture, told apart by content.

    ``"-"`` reads standard input. Anything else raises CaptureError at once. ``source`` overrides the
    receiver of every advertisement; ``default_source`` names the receiver of JSON Lines records that
    carry none (btsnoop advertisements are named after the file)."""
    f, name, owned = _open_binary(path)
    try:
        head = _peek(f, 64)
        if isinstance(head, str):  # a text stream
            head = head.encode("utf-8", errors="replace")
        if head.startswith(BTSNOOP_MAGIC):
            return _open_btsnoop(f, name, owned, source)
        stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
        if stripped.startswith(b"{") or (not stripped and len(head) < 64):
            return _jsonl_records(f, name, owned, False, source, default_source)
        raise CaptureError(
            f"{name} is not a btsnoop or mitherm JSON Lines capture: first bytes {head[:16].hex(' ')} "
            f"({head[:16]!r}); expected b'btsnoop\\x00' or a line starting with '{{'"
        )
    except BaseException:
        if owned:
            f.close()
        raise

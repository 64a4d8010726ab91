"""Telink OTA images: parsing and every check made **before anything is sent** to a device.

Image layout (shared/reference/firmware.md §2.2; all little-endian)::

    0x02  u32  file version (pvvx BLE images: 0x99993001)
    0x06  5D 02  firmware-CRC flag + CRC algorithm 2
    0x08  "KNLT" bootable marker
    0x12  u16  manufacturer 0x1141 (Telink; pvvx images since Nov 2023, stock images: 0)
    0x14  u16  image type 0x02nn (nn = pvvx HW id of the build)
    0x18  u32  image size including the trailing CRC, always ≡ 4 (mod 16)
    size-4 u32 CRC-32 (reflected 0xEDB88320, init 0xFFFFFFFF, no final xor) of bytes 0 … size-5

Optional wrappers/trailers: a Zigbee OTA file header (magic 0x0BEEF11E, 56 bytes + a 6-byte sub-element
header) is stripped, as TelinkMiFlasher does; a Xiaomi signature (``00000000 4D49EF54 464F5441`` right after
the CRC, then the signature blocks) marks a signed stock image and is sent along with the image.

:func:`parse_image` does the structural checks (size, marker, header size, CRC); :func:`plan_flash`
checks the image against the connected device (size limit of legacy vs extended OTA, image type vs HW
id, stock vs custom, battery, the MHO-C401 / MHO-C401N question). Every refusal is a :class:`FlashRefused`
with a ``check`` name, a message and a hint on what to do."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from .index import Build, FirmwareIndex, Hardware, firmware_index

__all__ = [
    "BLOCK_SIZE",
    "EXT_OTA_MAX_SIZE",
    "LEGACY_OTA_MAX_SIZE",
    "MIN_BATTERY_PCT",
    "MIN_IMAGE_SIZE",
    "FirmwareImage",
    "FlashPlan",
    "FlashRefused",
    "TargetDevice",
    "ZigbeeHeader",
    "build_test_image",
    "crc32_telink",
    "parse_image",
    "plan_flash",
    "pvvx_version_bcd",
    "pvvx_version_text",
    "read_test_tag",
    "stock_image_hardware",
]

MIN_IMAGE_SIZE = 1024
LEGACY_OTA_MAX_SIZE = 0x20000  # one 128 KiB bank (MAX_BLE_OTA_SIZE)
EXT_OTA_MAX_SIZE = 0x34000  # 208 KiB: the extended OTA area from 0x40000
EXT_OTA_MIN_VERSION = 0x46  # pvvx v4.6
EXT_OTA_MODELS = frozenset({"MJWSD05MMC", "MHO-C122", "MJWSD06MMC"})  # always had it (firmware.md §2.2)
MIN_BATTERY_PCT = 40  # README warnings §3: LYWSD03MMC has no bulk capacitance
BLOCK_SIZE = 16

OFF_FILE_VERSION = 0x02
OFF_CRC_FLAG = 0x06
OFF_MARKER = 0x08
OFF_MANUFACTURER = 0x12
OFF_IMAGE_TYPE = 0x14
OFF_SIZE = 0x18
HEADER_END = 0x1C

CRC_FLAG = b"\x5d\x02"
KNLT = b"KNLT"
TELINK_MANUFACTURER = 0x1141
CHIP_TLSR8258 = 0x02
PVVX_FILE_VERSION = 0x99993001
SIGNED_TRAILER = bytes.fromhex("000000004d49ef54464f5441")

ZIGBEE_MAGIC = 0x0BEEF11E
ZIGBEE_HEADER_VERSION = 0x0100
ZIGBEE_HEADER_LEN = 56
ZIGBEE_SUBELEMENT_LEN = 6  # tag u16 + length u32; the Telink image follows at 0x3E
ZIGBEE_TAG_UPGRADE_IMAGE = 0x0000

# Test images (build_test_image) carry this tag at 0x20 so the simulator knows what it runs after a flash.
TEST_TAG = b"MITHERM-TEST\x00"
OFF_TEST_TAG = 0x20


def crc32_telink(data: bytes) -> int:
    """The image CRC: CRC-32 without the final xor, i.e. the bitwise inverse of zlib's."""
    return ~zlib.crc32(data) & 0xFFFFFFFF


def pvvx_version_text(bcd: int) -> str:
    """0x58 → "5.8" (pvvx versions are BCD bytes)."""
    return f"{bcd >> 4}.{bcd & 0x0F}"


class FlashRefused(Exception):
    """A check failed: nothing was sent. ``check`` names the check, ``hint`` says what to do."""

    def __init__(self, check: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\n{self.hint}" if self.hint else "")


@dataclass(frozen=True, slots=True)
class ZigbeeHeader:
    manufacturer: int
    image_type: int
    file_version: int
    header_string: str
    total_size: int


@dataclass(frozen=True, slots=True)
class TestTag:
    kind: str  # "pvvx" | "stock"
    version: str
    model: str | None


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    """A checked Telink image. ``payload`` is what goes over the air (Zigbee wrapper removed, a Xiaomi
    signature kept)."""

    payload: bytes
    file_size: int
    size: int  # header size field: image incl. CRC
    file_version: int
    manufacturer: int
    image_type: int
    crc32: int
    crc_flag: bool  # 5D 02 present (the device verifies the CRC at the end)
    signed: bool  # Xiaomi signature trailer after the CRC (stock image)
    zigbee: ZigbeeHeader | None = None
    name: str | None = None  # file name, when known
    test_tag: TestTag | None = None
    warnings: tuple[str, ...] = ()

    @property
    def is_pvvx(self) -> bool:
        """A pvvx-style image: Telink manufacturer and a TLSR8258 image type 0x02nn."""
        return self.manufacturer == TELINK_MANUFACTURER and self.image_type >> 8 == CHIP_TLSR8258

    @property
    def is_stock(self) -> bool:
        if self.test_tag is not None:
            return self.test_tag.kind == "stock"
        return not self.is_pvvx and (self.signed or (self.name is not None and "original" in self.name.lower()))

    @property
    def hw_id(self) -> int | None:
        return self.image_type & 0xFF if self.is_pvvx else None

    @property
    def blocks(self) -> int:
        return -(-len(self.payload) // BLOCK_SIZE)

    def build(self, index: FirmwareIndex | None = None) -> Build | None:
        index = index or firmware_index()
        if self.is_pvvx:
            return index.build_for_image_type(self.image_type)
        if self.name and not self.is_stock:
            return index.build_for_file(self.name)
        return None

    def variant(self, index: FirmwareIndex | None = None) -> str:
        """Human description of what the image is for ("MHO_C401N build, image type 0x0208 …")."""
        index = index or firmware_index()
        build = self.build(index)
        if self.is_pvvx:
            if build is None:
                return f"pvvx image type 0x{self.image_type:04X} (unknown build, HW id {self.hw_id})"
            hws = _hardware_text([index.hardware[i] for i in build.hw_ids if i in index.hardware])
            return f"{build.name} build (image type 0x{self.image_type:04X}) for {hws}"
        if self.is_stock:
            fits = stock_image_hardware(self, index)
            what = "Xiaomi-signed stock image" if self.signed else "stock image"
            if fits:
                return f"{what} for {_hardware_text(fits)}"
            return what + " (no image type: the model cannot be checked)"
        if build is not None:
            return f"{build.name} build (by file name; the image has no type field)"
        return "Telink image without a type field (older pvvx or atc1441 build)"

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "file_size": self.file_size,
            "size": self.size,
            "blocks": self.blocks,
            "file_version": f"0x{self.file_version:08X}",
            "manufacturer": f"0x{self.manufacturer:04X}",
            "image_type": f"0x{self.image_type:04X}",
            "crc32": f"0x{self.crc32:08X}",
            "signed": self.signed,
            "zigbee": self.zigbee is not None,
            "variant": self.variant(),
            "version": self.test_tag.version if self.test_tag else None,
            "warnings": list(self.warnings),
        }


def _hardware_text(hws: list[Hardware]) -> str:
    if len(hws) == 1:
        return hws[0].label
    models = dict.fromkeys(h.model for h in hws)
    return "; ".join(f"{m} (HW ids {', '.join(str(h.hw_id) for h in hws if h.model == m)})" for m in models)


def _u16(data: bytes, off: int) -> int:
    return struct.unpack_from("<H", data, off)[0]


def _u32(data: bytes, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def _unwrap_zigbee(data: bytes) -> tuple[bytes, ZigbeeHeader]:
    if len(data) < ZIGBEE_HEADER_LEN + ZIGBEE_SUBELEMENT_LEN:
        raise FlashRefused("zigbee-header", "Zigbee OTA file too short for its header")
    version, hlen = _u16(data, 4), _u16(data, 6)
    if version != ZIGBEE_HEADER_VERSION or hlen != ZIGBEE_HEADER_LEN:
        raise FlashRefused(
            "zigbee-header",
            f"unsupported Zigbee OTA header (version 0x{version:04X}, length {hlen}; expected 0x0100 and 56)",
        )
    header = ZigbeeHeader(
        manufacturer=_u16(data, 10),
        image_type=_u16(data, 12),
        file_version=_u32(data, 14),
        header_string=data[20:52].split(b"\0", 1)[0].decode("ascii", "replace"),
        total_size=_u32(data, 52),
    )
    inner_len = _u32(data, ZIGBEE_HEADER_LEN + 2)
    start = ZIGBEE_HEADER_LEN + ZIGBEE_SUBELEMENT_LEN
    if start + inner_len > len(data):
        raise FlashRefused(
            "zigbee-header",
            f"Zigbee OTA file says the image is {inner_len} bytes but only {len(data) - start} follow the header",
        )
    return data[start : start + inner_len], header


def read_test_tag(data: bytes) -> TestTag | None:
    """The tag :func:`build_test_image` puts at 0x20 (None for any other image)."""
    off = OFF_TEST_TAG
    if data[off : off + len(TEST_TAG)] != TEST_TAG:
        return None
    off += len(TEST_TAG)
    try:
        kind = {0x70: "pvvx", 0x73: "stock"}[data[off]]
        n = data[off + 1]
        version = data[off + 2 : off + 2 + n].decode("ascii")
        off += 2 + n
        m = data[off]
        model = data[off + 1 : off + 1 + m].decode("ascii") or None
    except (KeyError, IndexError, UnicodeDecodeError):
        return None
    return TestTag(kind, version, model)


def parse_image(data: bytes, name: str | None = None) -> FirmwareImage:
    """Check an image file the way TelinkMiFlasher does (testOTAFirmware) and describe it.

    Raises :class:`FlashRefused` (check ``size-min``, ``zigbee-header``, ``marker``, ``header-size`` or
    ``crc``). Size limits that depend on the device are checked by :func:`plan_flash`."""
    data = bytes(data)
    file_size = len(data)
    zigbee = None
    if len(data) >= 4 and _u32(data, 0) == ZIGBEE_MAGIC:
        data, zigbee = _unwrap_zigbee(data)
    if len(data) < MIN_IMAGE_SIZE:
        raise FlashRefused(
            "size-min",
            f"image is {len(data)} bytes: a Telink firmware image is at least {MIN_IMAGE_SIZE} bytes",
            "is this the right file (not an HTML page saved from GitHub, or a truncated download)?",
        )
    if data[OFF_MARKER : OFF_MARKER + 4] != KNLT:
        raise FlashRefused(
            "marker",
            "no 'KNLT' marker at offset 8: this is not a bootable Telink image",
            "download the .bin file itself (GitHub: the 'raw' link), not a web page or an archive",
        )
    size = _u32(data, OFF_SIZE)
    if size > len(data) or size % 16 != 4 or size < MIN_IMAGE_SIZE:
        raise FlashRefused(
            "header-size",
            f"the header says the image is {size} bytes but the file holds {len(data)}"
            + ("" if size % 16 == 4 else " (and a valid size is 4 more than a multiple of 16)"),
            "the file is truncated or not a Telink image",
        )
    stored = _u32(data, size - 4)
    computed = crc32_telink(data[: size - 4])
    if stored != computed:
        raise FlashRefused(
            "crc",
            f"image CRC-32 mismatch: stored 0x{stored:08X}, computed 0x{computed:08X}",
            "the file is damaged: download it again",
        )
    warnings: list[str] = []
    signed = data[size : size + len(SIGNED_TRAILER)] == SIGNED_TRAILER
    if len(data) > size and not signed:
        warnings.append(f"{len(data) - size} bytes after the image CRC are not a Xiaomi signature; they are sent too")
    if data[OFF_CRC_FLAG : OFF_CRC_FLAG + 2] != CRC_FLAG:
        warnings.append("no '5D 02' CRC flag at offset 6: the device will not verify the image CRC")
    image = FirmwareImage(
        payload=data,
        file_size=file_size,
        size=size,
        file_version=_u32(data, OFF_FILE_VERSION),
        manufacturer=_u16(data, OFF_MANUFACTURER),
        image_type=_u16(data, OFF_IMAGE_TYPE),
        crc32=stored,
        crc_flag=data[OFF_CRC_FLAG : OFF_CRC_FLAG + 2] == CRC_FLAG,
        signed=signed,
        zigbee=zigbee,
        name=name,
        test_tag=read_test_tag(data),
        warnings=tuple(warnings),
    )
    if zigbee is not None and image.is_pvvx and zigbee.image_type != image.image_type:
        raise FlashRefused(
            "zigbee-header",
            f"Zigbee OTA header says image type 0x{zigbee.image_type:04X} but the image inside is "
            f"0x{image.image_type:04X}",
        )
    return image


def stock_image_hardware(image: FirmwareImage, index: FirmwareIndex | None = None) -> list[Hardware]:
    """Hardware a stock image is for, from its file name or test tag (stock images have no type field)."""
    index = index or firmware_index()
    if image.test_tag is not None and image.test_tag.model:
        return index.by_model(image.test_tag.model)
    if image.name:
        return index.original_for_file(image.name)
    return []


# --- the device side of the checks -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetDevice:
    """What the flasher knows about the connected device (from ``mitherm.device.identify``)."""

    model: str | None
    firmware: str  # "stock" | "pvvx" | "atc1441" | "unknown"
    version: str | None = None  # "5.8", "1.0.0_0130", "2.1.1_0159"
    pvvx_version: int | None = None  # BCD byte, 0x58
    hw_id: int | None = None  # pvvx firmware only
    hw_revision: str | None = None  # DIS 0x2A27
    battery_pct: int | None = None
    ext_ota: bool | None = None  # services bit 1 of pvvx command 0x00, when known

    @property
    def supports_ext_ota(self) -> bool:
        if self.firmware != "pvvx":
            return False
        if self.ext_ota is not None:
            return self.ext_ota
        return (self.pvvx_version or 0) >= EXT_OTA_MIN_VERSION or (self.model or "") in EXT_OTA_MODELS

    @property
    def is_stock_0159(self) -> bool:
        index = firmware_index()
        return (
            self.firmware == "stock"
            and (self.model or "") in index.stock_0159_models
            and (self.version or "").startswith(index.stock_0159_version)
        )


@dataclass(slots=True)
class FlashPlan:
    """The result of all checks: how to send the image and what to ask the user first."""

    image: FirmwareImage
    device: TargetDevice
    extended: bool  # extended OTA (0x73 first) instead of plain legacy OTA
    confirm: list[str] = field(default_factory=list)  # questions for the user before sending
    warnings: list[str] = field(default_factory=list)
    hardware: list[Hardware] = field(default_factory=list)  # what the image is for

    @property
    def method(self) -> str:
        return "extended OTA (0x73, v4.6+)" if self.extended else "legacy OTA (dual bank)"


def _check_size(image: FirmwareImage, device: TargetDevice) -> bool:
    n = len(image.payload)
    if n > EXT_OTA_MAX_SIZE:
        raise FlashRefused(
            "size-max",
            f"image is {n} bytes: more than any OTA can take ({EXT_OTA_MAX_SIZE} bytes = 208 KiB)",
        )
    if n <= LEGACY_OTA_MAX_SIZE:
        return False
    if device.supports_ext_ota:
        return True
    running = f"{device.firmware} {device.version or ''}".strip()
    raise FlashRefused(
        "size-legacy",
        f"image is {n} bytes (> 128 KiB): legacy OTA would overwrite the running bank and can brick the "
        f"device; only extended OTA (pvvx firmware v4.6+) takes it, and this device runs {running}",
        "flash a current pvvx BLE image (< 128 KiB) first, then this one through extended OTA",
    )


def _check_kind(image: FirmwareImage, device: TargetDevice, to_stock: bool, index: FirmwareIndex) -> None:
    if to_stock and image.is_pvvx:
        raise FlashRefused(
            "not-stock",
            f"--stock was given but this is a pvvx image ({image.variant(index)})",
            "drop --stock to flash custom firmware, or pick the Original_OTA_… file",
        )
    if not to_stock and image.is_stock:
        raise FlashRefused(
            "stock-image",
            f"this is a {image.variant(index)}",
            "going back to stock is deliberate: repeat with --stock (see the notes it prints on Mi keys)",
        )
    if device.is_stock_0159 and not image.signed:
        raise FlashRefused(
            "stock-0159",
            f"{device.model} runs stock {device.version}, which accepts only Xiaomi-signed images",
            "first flash the signed intermediate image with "
            f"'mitherm flash MAC --stock {index.stock_0159_signed}' (after a Mi login with the MiHome "
            "token), log in again, then flash the custom image",
        )


def _check_hardware(image: FirmwareImage, device: TargetDevice, index: FirmwareIndex, plan: FlashPlan) -> None:
    match = index.match(device.model, device.hw_id, device.hw_revision)
    device_hw = {h.hw_id for h in match.candidates}
    if image.is_pvvx:
        build = index.build_for_image_type(image.image_type)
        image_hw = set(build.hw_ids) if build else {image.image_type & 0xFF}
        plan.hardware = [index.hardware[i] for i in sorted(image_hw) if i in index.hardware]
        if build is None:
            plan.warnings.append(f"image type 0x{image.image_type:04X} is not in mitherm's index")
    elif image.is_stock:
        plan.hardware = stock_image_hardware(image, index)
        image_hw = {h.hw_id for h in plan.hardware}
        if not image_hw:
            plan.confirm.append(
                f"mitherm cannot tell which model this stock image is for. Is it the stock firmware of your "
                f"{device.model or 'device'}?"
            )
            return
    else:
        build = image.build(index)
        if build is None:
            plan.confirm.append(
                "this image has no type field and its file name is not a known pvvx build: "
                f"is it really for your {device.model or 'device'}?"
            )
            return
        image_hw = set(build.hw_ids)
        plan.hardware = [index.hardware[i] for i in build.hw_ids if i in index.hardware]
        plan.warnings.append(f"image type taken from the file name ({build.name}): older images carry none")
    if not device_hw:
        plan.confirm.append(
            f"mitherm does not know the hardware of this device ({device.model or 'unknown model'}); "
            f"the image is a {image.variant(index)}. Flash it anyway?"
        )
        return
    fits = device_hw & image_hw
    if not fits:
        dev = ", ".join(h.label for h in match.candidates)
        raise FlashRefused(
            "image-type",
            f"this image is a {image.variant(index)}; the device is {dev}",
            "a wrong image leaves BLE working but the display frozen or blank: pick the image "
            "'mitherm firmware list MAC' names",
        )
    if match.ambiguous:
        # MHO-C401 on stock firmware: the old and the 2022.11 (N) panel cannot be told apart (§3.2)
        chosen = [h for h in match.candidates if h.hw_id in fits]
        other = [h for h in match.candidates if h.hw_id not in fits]
        plan.confirm.append(
            f"stock firmware cannot tell which {device.model} this is. The image is a {image.variant(index)}. "
            f"Is your device the {' / '.join(h.revision for h in chosen)} and not the "
            f"{' / '.join(h.revision for h in other)}? (the 2022.11 'N' units show an extra symbol on screen; "
            "a wrong image leaves the display frozen)"
        )


def plan_flash(
    image: FirmwareImage,
    device: TargetDevice,
    *,
    force_low_battery: bool = False,
    to_stock: bool = False,
    index: FirmwareIndex | None = None,
) -> FlashPlan:
    """Check ``image`` against ``device``; raise :class:`FlashRefused` or return the plan."""
    index = index or firmware_index()
    extended = _check_size(image, device)
    plan = FlashPlan(image, device, extended, warnings=list(image.warnings))
    _check_kind(image, device, to_stock, index)
    _check_hardware(image, device, index, plan)
    if device.battery_pct is None:
        plan.warnings.append("battery level unknown: make sure it is above 40 %")
    elif device.battery_pct < MIN_BATTERY_PCT:
        if not force_low_battery:
            raise FlashRefused(
                "battery",
                f"battery at {device.battery_pct} %: below {MIN_BATTERY_PCT} % a flash may fail half-way",
                "put in a fresh CR2032, or accept the risk with --force-low-battery",
            )
        plan.warnings.append(f"battery at {device.battery_pct} %: flashing anyway (--force-low-battery)")
    if extended:
        plan.confirm.append(
            "extended OTA erases the stored MiHome keys and the measurement history on the device. Continue?"
        )
    if device.firmware == "stock" and not image.signed and not to_stock:
        plan.warnings.append("stock firmware: a Mi login is needed before the OTA service accepts data")
    return plan


# --- test images -----------------------------------------------------------------------------------


def pvvx_version_bcd(version: str) -> int:
    """BCD byte of a pvvx version string ("5.9" → 0x59)."""
    major, _, minor = version.partition(".")
    return (int(major) << 4) | int(minor or 0)


def build_test_image(
    hw_id: int | None = 10,
    version: str = "5.8",
    size: int = 2048,
    *,
    kind: str = "pvvx",
    model: str | None = None,
    image_type: int | None = None,
    signed: bool = False,
    zigbee: bool = False,
    bad_crc: bool = False,
    marker: bytes = KNLT,
    size_field: int | None = None,
    seed: int = 0,
) -> bytes:
    """A valid-looking Telink image for tests (never a real firmware): header, body, CRC-32.

    ``size`` is rounded up to the next value ≡ 4 (mod 16). ``kind="pvvx"`` sets manufacturer 0x1141 and
    image type ``image_type`` (default: the index's type for ``hw_id``'s build, else 0x02nn);
    ``kind="stock"`` leaves them zero (``model`` names the model in the test tag). ``signed`` appends a
    fake Xiaomi signature, ``zigbee`` wraps the result in a Zigbee OTA header; ``bad_crc``, ``marker`` and
    ``size_field`` damage the image for the refusal tests."""
    size = max(size, MIN_IMAGE_SIZE)
    size += (4 - size % 16) % 16
    body = bytearray(size - 4)
    # deterministic filler that is not all zeros, so lost or swapped blocks change the CRC
    x = (seed * 0x9E3779B1 + 1) & 0xFFFFFFFF
    for i in range(HEADER_END, len(body)):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        body[i] = x >> 24
    body[0:2] = b"\x80\x25"  # looks like the jump of a real image; unused
    file_version = PVVX_FILE_VERSION if kind == "pvvx" else 0
    struct.pack_into("<I", body, OFF_FILE_VERSION, file_version)
    body[OFF_CRC_FLAG : OFF_CRC_FLAG + 2] = CRC_FLAG
    body[OFF_MARKER : OFF_MARKER + 4] = marker
    struct.pack_into("<I", body, 0x0C, 0x00880000 | (size >> 4 & 0xFFFF))
    manufacturer = 0
    if kind == "pvvx":
        manufacturer = TELINK_MANUFACTURER
        if image_type is None:
            hw = firmware_index().hardware.get(hw_id if hw_id is not None else -1)
            build = firmware_index().builds[hw.build] if hw else None
            image_type = build.image_type if build else (CHIP_TLSR8258 << 8) | ((hw_id or 0) & 0xFF)
    elif kind == "stock":
        image_type = 0 if image_type is None else image_type
    else:
        raise ValueError("kind must be 'pvvx' or 'stock'")
    struct.pack_into("<HH", body, OFF_MANUFACTURER, manufacturer, image_type)
    struct.pack_into("<I", body, OFF_SIZE, size if size_field is None else size_field)
    ver = version.encode("ascii")
    mod = (model or "").encode("ascii")
    tag = TEST_TAG + bytes([0x70 if kind == "pvvx" else 0x73, len(ver)]) + ver + bytes([len(mod)]) + mod
    body[OFF_TEST_TAG : OFF_TEST_TAG + len(tag)] = tag
    crc = crc32_telink(bytes(body))
    if bad_crc:
        crc ^= 0x00010000
    image = bytes(body) + struct.pack("<I", crc)
    if signed:
        image += SIGNED_TRAILER + bytes(range(256)) * 5  # stands in for Xiaomi's tag and signature blocks
    if zigbee:
        header = struct.pack(
            "<IHHHHHIH32sI",
            ZIGBEE_MAGIC,
            ZIGBEE_HEADER_VERSION,
            ZIGBEE_HEADER_LEN,
            0,
            manufacturer,
            image_type,
            0x99993001 if kind == "pvvx" else 0,
            0x0002,
            f"mitherm test v{version}".encode().ljust(32, b"\0"),
            ZIGBEE_HEADER_LEN + ZIGBEE_SUBELEMENT_LEN + len(image),
        )
        image = header + struct.pack("<HI", ZIGBEE_TAG_UPGRADE_IMAGE, len(image)) + image
    return image

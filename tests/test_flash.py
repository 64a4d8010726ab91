"""Firmware images, the image index, Telink OTA (client and virtual device) and `mitherm flash`.

Test images are built here (``build_test_image``); nothing is downloaded. Over the virtual radio a 4 KiB
image takes about half a second (the client waits 0.3 s after CMD_OTA_START as the web flasher does)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from mitherm.firmware import (
    EXT_OTA_MAX_SIZE,
    LEGACY_OTA_MAX_SIZE,
    FlashRefused,
    TargetDevice,
    build_test_image,
    crc32_telink,
    firmware_index,
    parse_image,
    plan_flash,
)
from mitherm.firmware.image import SIGNED_TRAILER
from mitherm.protocols import ota
from mitherm.sim.gatt.ota import OtaTarget

LYWSD03_PVVX = TargetDevice("LYWSD03MMC", "pvvx", "5.8", 0x58, hw_id=0, hw_revision="B1.4", battery_pct=90)
LYWSD03_STOCK = TargetDevice("LYWSD03MMC", "stock", "1.0.0_0130", hw_revision="B1.4", battery_pct=None)


def refused(check: str, fn, *args, **kw) -> FlashRefused:
    with pytest.raises(FlashRefused) as info:
        fn(*args, **kw)
    assert info.value.check == check, info.value
    assert info.value.message
    return info.value


# --- image structure ------------------------------------------------------------------------------


def test_valid_image_is_described():
    image = parse_image(build_test_image(0, "5.9", 2048), "ATC_v59.bin")
    assert image.size == 2052 and image.size % 16 == 4
    assert image.is_pvvx and not image.is_stock and image.image_type == 0x020A
    assert image.crc32 == crc32_telink(image.payload[: image.size - 4])
    assert "ATC build" in image.variant() and "LYWSD03MMC" in image.variant()
    assert image.test_tag is not None and image.test_tag.version == "5.9"


def test_crc32_is_zlib_without_final_xor():
    import zlib

    assert crc32_telink(b"123456789") == zlib.crc32(b"123456789") ^ 0xFFFFFFFF


def test_refuses_a_short_file():
    refused("size-min", parse_image, b"\x00" * 1000)


def test_refuses_a_missing_knlt_marker():
    err = refused("marker", parse_image, build_test_image(marker=b"KNLX"))
    assert "KNLT" in err.message


def test_refuses_a_header_size_beyond_the_file():
    refused("header-size", parse_image, build_test_image(size=2048, size_field=4100))


def test_refuses_a_header_size_not_4_mod_16():
    refused("header-size", parse_image, build_test_image(size=2048, size_field=2048))


def test_refuses_a_bad_crc():
    err = refused("crc", parse_image, build_test_image(bad_crc=True))
    assert "download it again" in str(err)


def test_zigbee_wrapper_is_stripped():
    raw = build_test_image(8, "5.9", 3000, zigbee=True)
    assert struct.unpack_from("<I", raw)[0] == 0x0BEEF11E
    image = parse_image(raw)
    assert image.zigbee is not None and image.zigbee.image_type == 0x0208
    assert image.payload == build_test_image(8, "5.9", 3000)
    assert image.payload[8:12] == b"KNLT"


def test_refuses_a_bad_zigbee_header():
    raw = bytearray(build_test_image(zigbee=True))
    struct.pack_into("<H", raw, 4, 0x0200)  # header version
    refused("zigbee-header", parse_image, bytes(raw))
    raw = bytearray(build_test_image(zigbee=True))
    struct.pack_into("<I", raw, 58, 10**6)  # inner size
    refused("zigbee-header", parse_image, bytes(raw))


def test_signed_stock_image_is_recognised():
    image = parse_image(build_test_image(None, "2.1.1_0159", 4000, kind="stock", model="LYWSD03MMC", signed=True))
    assert image.signed and image.is_stock and not image.is_pvvx
    assert image.payload[image.size : image.size + 12] == SIGNED_TRAILER  # the signature is sent along
    assert "Xiaomi-signed stock image" in image.variant()


# --- checks against the device ------------------------------------------------------------------------


def test_plan_for_a_matching_pvvx_image():
    plan = plan_flash(parse_image(build_test_image(0, "5.9")), LYWSD03_PVVX)
    assert not plan.extended and not plan.confirm and "legacy" in plan.method


def test_every_lywsd03mmc_revision_takes_the_atc_image():
    image = parse_image(build_test_image(10, "5.9"))  # ATC: image type 0x020A whatever the revision
    for hw_id in (0, 3, 4, 5, 10, 14):
        plan_flash(image, TargetDevice("LYWSD03MMC", "pvvx", "5.8", 0x58, hw_id=hw_id, battery_pct=80))


def test_refuses_an_image_for_other_hardware():
    image = parse_image(build_test_image(1, "5.9"))  # MHO_C401 (old panel)
    err = refused("image-type", plan_flash, image, LYWSD03_PVVX)
    assert "MHO_C401" in err.message and "LYWSD03MMC" in err.message
    n_device = TargetDevice("MHO-C401", "pvvx", "5.8", 0x58, hw_id=8, battery_pct=80)
    refused("image-type", plan_flash, image, n_device)
    plan_flash(parse_image(build_test_image(8, "5.9")), n_device)


def test_size_limits():
    big = parse_image(build_test_image(0, "5.9", LEGACY_OTA_MAX_SIZE + 1024))
    err = refused("size-legacy", plan_flash, big, LYWSD03_STOCK, to_stock=False)
    assert "brick" in err.message
    old_pvvx = TargetDevice("LYWSD03MMC", "pvvx", "4.5", 0x45, hw_id=0, battery_pct=80)
    refused("size-legacy", plan_flash, big, old_pvvx)
    plan = plan_flash(big, LYWSD03_PVVX)  # v5.8 has extended OTA
    assert plan.extended and any("erases" in q for q in plan.confirm)
    huge = parse_image(build_test_image(0, "5.9", EXT_OTA_MAX_SIZE + 16))
    refused("size-max", plan_flash, huge, LYWSD03_PVVX)


def test_battery_below_40_percent_is_refused_unless_forced():
    low = TargetDevice("LYWSD03MMC", "pvvx", "5.8", 0x58, hw_id=0, battery_pct=35)
    image = parse_image(build_test_image(0, "5.9"))
    err = refused("battery", plan_flash, image, low)
    assert "--force-low-battery" in str(err)
    plan = plan_flash(image, low, force_low_battery=True)
    assert any("35 %" in w for w in plan.warnings)
    unknown = plan_flash(image, TargetDevice("LYWSD03MMC", "pvvx", "5.8", 0x58, hw_id=0))
    assert any("unknown" in w for w in unknown.warnings)


def test_stock_and_custom_images_need_the_right_flag():
    stock = parse_image(build_test_image(None, "1.0.0_0130", kind="stock", model="LYWSD03MMC"))
    refused("stock-image", plan_flash, stock, LYWSD03_PVVX)
    plan_flash(stock, LYWSD03_PVVX, to_stock=True)
    refused("not-stock", plan_flash, parse_image(build_test_image(0, "5.9")), LYWSD03_PVVX, to_stock=True)
    mho_stock = parse_image(build_test_image(None, "1.0.0_0010", kind="stock", model="MHO-C401"))
    refused("image-type", plan_flash, mho_stock, LYWSD03_PVVX, to_stock=True)


def test_stock_0159_takes_only_signed_images():
    dev = TargetDevice("LYWSD03MMC", "stock", "2.1.1_0159", hw_revision="B1.6", battery_pct=None)
    err = refused("stock-0159", plan_flash, parse_image(build_test_image(4, "5.9")), dev)
    assert "Original_OTA_Xiaomi_LYWSD03MMC_v2.1.1_0159c.bin" in str(err)
    signed = parse_image(build_test_image(None, "2.1.1_0159", 4000, kind="stock", model="LYWSD03MMC", signed=True))
    plan_flash(signed, dev, to_stock=True)


def test_mho_c401_on_stock_needs_confirmation_showing_the_variant():
    dev = TargetDevice("MHO-C401", "stock", "1.0.0_0010", hw_revision="V_14", battery_pct=None)
    plan = plan_flash(parse_image(build_test_image(8, "5.9")), dev)
    assert len(plan.confirm) == 1
    question = plan.confirm[0]
    assert "MHO_C401N build" in question and "0x0208" in question and "frozen" in question
    refused("image-type", plan_flash, parse_image(build_test_image(0, "5.9")), dev)


# --- the index --------------------------------------------------------------------------------------------


def test_index_lookups():
    index = firmware_index()
    assert index.builds["ATC"].file_name("5.8") == "ATC_v58.bin"
    assert index.build_for_file("MHO_C401N_v58.bin").name == "MHO_C401N"
    assert index.build_for_file("MHO_C401_v58.bin").name == "MHO_C401"
    assert index.build_for_file("CGG1M_v58.bin").name == "CGG1M"
    assert index.build_for_image_type(0x020A).hw_ids == (0, 3, 4, 5, 10, 14)
    assert index.hw_id_for_dis("LYWSD03MMC", "B1.9") == 3
    one = index.match("LYWSD03MMC", None, "B1.7")
    assert [h.hw_id for h in one.candidates] == [5] and not one.ambiguous
    assert one.as_dict(index)[0]["custom"] == "ATC_v58.bin"
    mho = index.match("MHO-C401", None, "V_14")
    assert mho.ambiguous and {h.build for h in mho.candidates} == {"MHO_C401", "MHO_C401N"}
    assert index.match(None, 8).candidates[0].original == "Original_OTA_Xiaomi_MHO_C401_v1.0.0_0016.bin"
    assert index.hardware[14].original == "Original_OTA_Xiaomi_LYWSD03MMC_v2.1.1_0159_B1.6.bin"
    assert index.match("CGG1").candidates and not index.match("NOPE").candidates


# --- sans-IO client against the device side ------------------------------------------------------------------


def crc16_vector():
    assert ota.crc16_modbus(b"123456789") == 0x4B37


def test_crc16_modbus_check_value():
    crc16_vector()
    frame = ota.encode_block(3, b"\x01" * 16)
    assert len(frame) == 20 and ota.decode_block(frame) == (3, b"\x01" * 16, True)
    assert ota.encode_block(0, b"\x01")[2:18] == b"\x01" + b"\xff" * 15
    assert ota.encode_end(0x1234) == bytes.fromhex("02ff3412cbed")


def pump(client: ota.OtaClient, target: OtaTarget, *, lose=(), corrupt=(), stall_at=None, drop_at=None, dt=0.01):
    """Run client against target in memory on a fake clock; returns the client's events."""
    now, events = 0.0, []
    while (action := client.next_action()) is not None:
        if isinstance(action, ota.Write):
            data = action.data
            index = struct.unpack_from("<H", data)[0]
            if len(data) == 20 and index == drop_at:
                target.link_lost()
                client.receive_disconnect()
                events += client.events()
                continue
            if len(data) == 20 and index == stall_at:
                now += 17.0
                stall_at = None
            if len(data) == 20 and index in lose:
                continue
            if len(data) == 20 and index in corrupt:
                data = data[:4] + bytes([data[4] ^ 1]) + data[5:]
            target.write(data, now)
        elif isinstance(action, ota.Read):
            client.receive_read(target.read(now))
        elif isinstance(action, ota.Subscribe):
            pass
        elif isinstance(action, ota.WaitNotification):
            pending = getattr(target, "_notes", None)
            if pending:
                client.receive_notification(pending.pop(0))
            else:
                client.receive_timeout()
        now += dt
        events += client.events()
    return events


def image_bytes(size: int = 3000) -> bytes:
    return parse_image(build_test_image(0, "5.9", size)).payload


def test_in_memory_success():
    payload = image_bytes()
    client, target = ota.OtaClient(payload, start_delay=0), OtaTarget()
    events = pump(client, target)
    assert client.state == "done" and isinstance(events[-1], ota.OtaFinished) and events[-1].status == 0
    assert target.state == "done" and target.reboot == "new"
    assert target.image[: len(payload)] == payload
    progress = [e for e in events if isinstance(e, ota.Progress)]
    assert progress[-1].sent == progress[-1].total == len(payload)
    assert [e.sent for e in progress] == sorted(e.sent for e in progress)


def test_in_memory_lost_block_is_error_1_and_the_old_image_stays():
    client, target = ota.OtaClient(image_bytes(), start_delay=0), OtaTarget()
    events = pump(client, target, lose={10})
    failure = events[-1]
    assert isinstance(failure, ota.OtaFailed) and failure.code == 1 and failure.phase == "transfer"
    assert failure.old_image_running and failure.block == 16  # seen at the status read after block 15
    assert target.reboot == "old"


def test_in_memory_repeated_block_is_ignored():
    target = OtaTarget()
    target.write(ota.encode_command(ota.CMD_OTA_START), 0)
    target.write(ota.encode_block(0, b"a" * 16), 0)
    target.write(ota.encode_block(0, b"a" * 16), 0)
    target.write(ota.encode_block(1, b"b" * 16), 0)
    assert target.error == 0 and target.image == b"a" * 16 + b"b" * 16


def test_in_memory_crc_error_is_error_2():
    client, target = ota.OtaClient(image_bytes(), start_delay=0), OtaTarget()
    events = pump(client, target, corrupt={5})
    assert events[-1].code == 2 and "CRC" in events[-1].message


def test_in_memory_timeout_is_error_5():
    client, target = ota.OtaClient(image_bytes(), start_delay=0), OtaTarget()
    events = pump(client, target, stall_at=20)
    assert events[-1].code == 5 and target.reboot == "old"


def test_in_memory_bad_image_crc_is_error_6_at_the_end():
    raw = bytearray(image_bytes())
    raw[100] ^= 0xFF  # the client's checks would refuse this file; the device checks too
    client, target = ota.OtaClient(bytes(raw), start_delay=0), OtaTarget()
    events = pump(client, target)
    assert events[-1].code == 6 and events[-1].phase == "end"


def test_in_memory_wrong_end_index_is_error_4():
    target = OtaTarget()
    target.write(ota.encode_command(ota.CMD_OTA_START), 0)
    target.write(ota.encode_block(0, b"a" * 16), 0)
    target.write(ota.encode_end(1), 0)
    assert target.read(0) == b"\x04"


def test_in_memory_link_lost():
    client, target = ota.OtaClient(image_bytes(), start_delay=0), OtaTarget()
    events = pump(client, target, drop_at=30)
    assert events[-1].code is None and "link lost at block 30" in events[-1].message
    assert target.reboot == "old"


def test_in_memory_extended_ota():
    payload = image_bytes(9000)
    client, target = ota.OtaClient(payload, extended=True, start_delay=0), OtaTarget()
    first = [client.next_action(), client.next_action()]
    assert isinstance(first[0], ota.Subscribe)
    assert first[1] == ota.Write(ota.PVVX_CMD_CHAR, bytes.fromhex("73 00000400 09000000"))
    target._notes = target.ext_request(first[1].data[1:])
    events = pump(client, target)
    erase = [e for e in events if isinstance(e, ota.EraseProgress)]
    assert len(erase) == 3 and erase[-1].address == 0x42000
    assert any(isinstance(e, ota.ExtOtaReady) for e in events)
    assert client.state == "done" and target.extended and target.reboot == "new"


def test_in_memory_extended_ota_refusals():
    target = OtaTarget()
    assert target.ext_request(struct.pack("<II", 0x40001, 9))[0][1] == ota.EXT_BAD_PARAM
    assert target.ext_request(struct.pack("<II", 0x40000, 300))[0][1] == ota.EXT_BAD_PARAM
    client = ota.OtaClient(image_bytes(), extended=True)
    client.next_action(), client.next_action(), client.next_action()
    client.receive_notification(bytes([0x73, 0xFF]))
    assert client.failure is not None and "not supported" in client.failure.message


def test_legacy_image_beyond_the_bank_is_a_flash_error():
    target = OtaTarget(bank_size=64)
    target.write(ota.encode_command(ota.CMD_OTA_START), 0)
    for i in range(5):
        target.write(ota.encode_block(i, b"x" * 16), 0)
    assert target.error == 3


# --- over the virtual radio ------------------------------------------------------------------------------------


@pytest.fixture
async def radio():
    from mitherm.radio.virtual import VirtualRadio

    async with VirtualRadio() as r:
        yield r


async def add_device(radio, device):
    from mitherm.sim.gatt import serve_gatt

    adv = await radio.add_advertiser(device.address, "public", interval_ms=10, data=b"\x02\x01\x06")
    await serve_gatt(adv, device)
    return adv


@pytest.fixture
async def pvvx(radio):
    from mitherm.sim.devices import PvvxDevice

    device = PvvxDevice(seed=7)
    adv = await add_device(radio, device)
    return device, adv


async def test_flash_a_virtual_pvvx_device(radio, pvvx):
    from mitherm.commands.flash import flash_async
    from mitherm.sim.gatt.ota import state_of

    device, adv = pvvx
    events = []
    report = await flash_async(device.address, build_test_image(0, "5.9", 4096), radio=radio, on_event=events.append)
    assert report.before.pvvx_version == "5.8" and report.new_version == "5.9"
    assert report.after.advertising_format == "bthome_v2" and report.after.hw_id == 0
    assert state_of(device).reboots == 1 and len(state_of(device).flashes) == 1
    assert isinstance(events[-1], ota.OtaFinished)
    assert report.bytes_per_second > 1000
    await asyncio.sleep(0.05)
    assert adv.is_advertising  # advertising continues after the reboot


@pytest.mark.parametrize(
    ("check", "image", "kw", "climate"),
    [
        ("image-type", dict(hw_id=1), {}, None),
        ("battery", dict(hw_id=0), {}, {"battery_v": 2.45}),
        ("stock-image", dict(hw_id=None, kind="stock", model="LYWSD03MMC"), {}, None),
        ("not-stock", dict(hw_id=0), {"to_stock": True}, None),
        ("not-confirmed", dict(hw_id=0, size=LEGACY_OTA_MAX_SIZE + 64), {}, None),
        ("crc", dict(hw_id=0, bad_crc=True), {}, None),
    ],
)
async def test_refusals_send_nothing(radio, check, image, kw, climate):
    from mitherm.commands.flash import flash_async
    from mitherm.sim.devices import PvvxDevice
    from mitherm.sim.gatt.ota import state_of

    device = PvvxDevice(seed=8, climate=climate)
    await add_device(radio, device)
    with pytest.raises(FlashRefused) as info:
        await flash_async(device.address, build_test_image(**image), radio=radio, **kw)
    assert info.value.check == check
    assert state_of(device).target.state == "idle" and state_of(device).frames == 0


async def test_low_battery_can_be_forced(radio):
    from mitherm.commands.flash import flash_async
    from mitherm.sim.devices import PvvxDevice

    device = PvvxDevice(seed=9, climate={"battery_v": 2.45})
    await add_device(radio, device)
    report = await flash_async(device.address, build_test_image(0, "5.9", 1024), radio=radio, force_low_battery=True)
    assert report.new_version == "5.9" and any("battery" in w for w in report.warnings)


@pytest.mark.parametrize(
    ("fault", "code", "text"),
    [
        ({"lose_blocks": {12}}, 1, "lost packet"),
        ({"corrupt_blocks": {20}}, 2, "data CRC error"),
        ({"disconnect_at_block": 30}, None, "link lost"),
    ],
)
async def test_failed_transfer_reports_code_and_state(radio, pvvx, fault, code, text):
    from mitherm.commands.flash import FlashFailed, flash_async
    from mitherm.sim.gatt.ota import state_of

    device, _ = pvvx
    for key, value in fault.items():
        setattr(state_of(device), key, value)
    with pytest.raises(FlashFailed) as info:
        await flash_async(device.address, build_test_image(0, "5.9", 2048), radio=radio)
    err = info.value
    assert err.code == code and text in str(err)
    assert "old firmware is still running" in err.state and "runs pvvx 5.8" in err.state
    assert err.advice
    assert getattr(device, "firmware_version", None) is None and not state_of(device).flashes


async def test_device_timeout_during_transfer(radio, pvvx):
    from mitherm.commands.flash import FlashFailed, flash_async
    from mitherm.sim.gatt.ota import state_of

    device, _ = pvvx
    state = state_of(device)
    state.timeout = 0.3
    state.new_target()

    async def stall(event):
        if isinstance(event, ota.Progress) and event.block == 40:
            await asyncio.sleep(1.0)  # the client stalls longer than the device's inactivity timer

    with pytest.raises(FlashFailed) as info:
        await flash_async(device.address, build_test_image(0, "5.9", 2048), radio=radio, on_event=stall)
    assert info.value.code in (5, None)  # the code if read before the reboot, else the dropped link
    assert "runs pvvx 5.8" in info.value.state and not state.flashes


async def test_extended_ota_over_the_radio(radio, pvvx):
    from mitherm.gatt.link import connect
    from mitherm.sim.gatt.ota import state_of

    device, _ = pvvx
    payload = image_bytes(5000)
    link = await connect(device.address, radio=radio)
    events = []
    try:
        result = await ota.run_ota(link, ota.OtaClient(payload, extended=True, start_delay=0), events.append)
    finally:
        await link.disconnect()
    assert result.status in (0, None)
    assert sum(isinstance(e, ota.EraseProgress) for e in events) == 2
    assert any(isinstance(e, ota.ExtOtaReady) for e in events)
    await asyncio.sleep(0.5)
    assert state_of(device).flashes and state_of(device).target.state == "idle"


async def test_stock_device_needs_a_login_first(radio, tmp_path):
    from mitherm.commands.flash import flash_async
    from mitherm.sim.devices import StockDevice
    from mitherm.sim.gatt.miauth import state_for

    device = StockDevice("LYWSD03MMC", seed=3, encrypted=True)
    await add_device(radio, device)
    image = build_test_image(None, "1.0.0_0131", 2048, kind="stock", model="LYWSD03MMC")
    with pytest.raises(FlashRefused) as info:
        await flash_async(device.address, image, radio=radio, to_stock=True)
    assert info.value.check == "no-token" and "0159" in info.value.message
    token = state_for(device).token.hex()
    report = await flash_async(device.address, image, radio=radio, to_stock=True, token=token, confirm=lambda q: True)
    assert report.before.firmware == "1.0.0_0130" and report.new_version == "1.0.0_0131"


async def test_firmware_list(radio, pvvx):
    from mitherm.commands import flash as flash_mod

    device, _ = pvvx
    fit = await flash_mod.firmware_list_async(device.address, radio=radio)
    assert fit["firmware"] == "pvvx" and fit["hw_id"] == 0 and fit["images"][0]["custom"] == "ATC_v58.bin"
    from rich.console import Console

    console = Console(record=True, width=140)
    flash_mod.print_fit(fit, console)
    text = console.export_text()
    assert "ATC_v58.bin" in text and "HW id 0" in text
    assert fit["images"][0]["original"] == "Original_OTA_Xiaomi_LYWSD03MMC_v1.0.0_0130.bin"


def test_cli_inspect_and_refusal_messages(tmp_path):
    from click.testing import CliRunner

    from mitherm.cli import main

    good = tmp_path / "ATC_v59.bin"
    good.write_bytes(build_test_image(0, "5.9"))
    result = CliRunner().invoke(main, ["firmware", "inspect", str(good)])
    assert result.exit_code == 0 and "0x020A" in result.output
    bad = tmp_path / "bad.bin"
    bad.write_bytes(build_test_image(bad_crc=True))
    result = CliRunner().invoke(main, ["firmware", "inspect", str(bad)])
    assert result.exit_code != 0 and "CRC-32 mismatch" in result.output
    result = CliRunner().invoke(main, ["flash", "A4:C1:38:00:00:01", str(bad)])
    assert result.exit_code != 0 and "refused (crc), nothing was sent" in result.output

"""VirtualRadio (Bumble LocalLink) + BumbleScanner (bleak backend over Bumble)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError

from mitherm.radio.bleak_backend import BumbleScanner, advertisement_data_from_ad, open_scanner
from mitherm.radio.virtual import VirtualRadio

TIMEOUT = 3.0
FAST_MS = 20  # advertising interval used in the tests

FE95 = "0000fe95-0000-1000-8000-00805f9b34fb"
U181A = "0000181a-0000-1000-8000-00805f9b34fb"
FCD2 = "0000fcd2-0000-1000-8000-00805f9b34fb"

ADDR_MI = "A4:C1:38:00:00:01"  # public
ADDR_ATC = "A4:C1:38:00:00:02"  # public
ADDR_BTHOME = "D2:3C:00:00:00:03"  # random static


def ad_struct(ad_type: int, value: bytes) -> bytes:
    return bytes([len(value) + 1, ad_type]) + value


def build_ad(uuid16: int, service_data: bytes, name: str | None = None, *, extra: bytes = b"") -> bytes:
    out = ad_struct(0x01, b"\x06") + ad_struct(0x16, uuid16.to_bytes(2, "little") + service_data)
    if name is not None:
        out += ad_struct(0x09, name.encode())
    out += extra
    assert len(out) <= 31
    return out


MI_PAYLOAD = bytes.fromhex("5020aa01c4010000 38c1a4 0d1004 d2003c02")[:12]
ATC_PAYLOAD = bytes.fromhex("a4c138000002 00e4 32 0b 9a 3c")
BTHOME_PAYLOAD = bytes.fromhex("40 0064 02ca09 03bf13")

Frame = tuple[BLEDevice, AdvertisementData]


class Collector:
    """Detection callback recording every frame, with bounded waits on what arrives."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._waiters: list[tuple[Callable[[Frame], bool], int, list[Frame], asyncio.Future[list[Frame]]]] = []

    def __call__(self, device: BLEDevice, adv: AdvertisementData) -> None:
        frame = (device, adv)
        self.frames.append(frame)
        for waiter in list(self._waiters):
            predicate, count, got, future = waiter
            if not future.done() and predicate(frame):
                got.append(frame)
                if len(got) >= count:
                    future.set_result(got)
                    self._waiters.remove(waiter)

    async def next(self, predicate: Callable[[Frame], bool] = lambda f: True, count: int = 1) -> list[Frame]:
        """Wait for ``count`` new frames matching ``predicate`` (from now on)."""
        future: asyncio.Future[list[Frame]] = asyncio.get_running_loop().create_future()
        waiter = (predicate, count, [], future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, TIMEOUT)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def from_(self, address: str, since: int = 0) -> list[Frame]:
        return [f for f in self.frames[since:] if f[0].address == address]


def by(address: str) -> Callable[[Frame], bool]:
    return lambda frame: frame[0].address == address


@pytest.fixture
async def radio():
    async with VirtualRadio() as r:
        yield r


@pytest.fixture
async def three(radio: VirtualRadio):
    mi = await radio.add_advertiser(
        ADDR_MI,
        "public",
        interval_ms=FAST_MS,
        data=build_ad(0xFE95, MI_PAYLOAD, "LYWSD03MMC"),
        rssi=-61,
    )
    atc = await radio.add_advertiser(
        ADDR_ATC,
        interval_ms=FAST_MS,
        data=build_ad(0x181A, ATC_PAYLOAD, "ATC_02", extra=ad_struct(0x0A, b"\xfc")),
    )
    bthome = await radio.add_advertiser(
        ADDR_BTHOME,
        "random",
        interval_ms=FAST_MS,
        data=build_ad(0xFCD2, BTHOME_PAYLOAD, "BTH", extra=ad_struct(0xFF, b"\x69\x09\x01\x02")),
    )
    return mi, atc, bthome


async def test_three_advertisers_seen_with_exact_payloads(radio: VirtualRadio, three) -> None:
    cb = Collector()
    async with BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio) as scanner:
        assert scanner.backend_id == "BumbleScanner"
        (mi,) = await cb.next(by(ADDR_MI))
        (atc,) = await cb.next(by(ADDR_ATC))
        (bth,) = await cb.next(by(ADDR_BTHOME))

    dev, adv = mi
    assert adv.service_data == {FE95: MI_PAYLOAD}
    assert adv.local_name == "LYWSD03MMC" and dev.name == "LYWSD03MMC"
    assert adv.service_uuids == [FE95]
    assert adv.rssi == -61
    assert adv.tx_power is None and adv.manufacturer_data == {}
    assert dev.details.address.is_public

    dev, adv = atc
    assert adv.service_data == {U181A: ATC_PAYLOAD}
    assert adv.local_name == "ATC_02"
    assert adv.tx_power == -4
    assert adv.rssi == -50

    dev, adv = bth
    assert adv.service_data == {FCD2: BTHOME_PAYLOAD}
    assert adv.local_name == "BTH"
    assert adv.manufacturer_data == {0x0969: b"\x01\x02"}
    assert not dev.details.address.is_public
    assert adv.platform_data[0].address == dev.details.address

    # seen_devices is kept like other backends (BleakScanner.discovered_devices_and_advertisement_data)
    assert set(scanner.discovered_devices_and_advertisement_data) == {ADDR_MI, ADDR_ATC, ADDR_BTHOME}


async def test_every_frame_is_reported(radio: VirtualRadio, three) -> None:
    cb = Collector()
    async with BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio):
        # ~50 advertising events per second per device at 20 ms: well over 10 frames each, no dedup
        await cb.next(by(ADDR_MI), count=10)
    frames = cb.from_(ADDR_MI)
    assert len(frames) >= 10
    assert all(adv.service_data == {FE95: MI_PAYLOAD} for _, adv in frames)


async def test_payload_change_is_received(radio: VirtualRadio, three) -> None:
    mi, _, _ = three
    new_payload = MI_PAYLOAD[:-1] + b"\x99"
    cb = Collector()
    async with BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio):
        await cb.next(by(ADDR_MI))
        await mi.set_data(build_ad(0xFE95, new_payload, "LYWSD03MMC"))
        assert mi.data.endswith(b"LYWSD03MMC")
        await cb.next(lambda f: f[0].address == ADDR_MI and f[1].service_data.get(FE95) == new_payload)
        # from then on only the new payload
        later = await cb.next(by(ADDR_MI), count=3)
        assert all(adv.service_data[FE95] == new_payload for _, adv in later)
        # and again, quickly, without a name: the BLEDevice keeps the last known name
        await mi.set_data(build_ad(0xFE95, b"\x01"))
        (frame,) = await cb.next(lambda f: f[0].address == ADDR_MI and f[1].service_data.get(FE95) == b"\x01")
        assert frame[1].local_name is None
        assert frame[0].name == "LYWSD03MMC"


async def test_stopped_advertiser_sends_nothing_until_restarted(radio: VirtualRadio, three) -> None:
    _, atc, _ = three
    cb = Collector()
    async with BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio):
        await cb.next(by(ADDR_ATC))
        await atc.stop()
        assert not atc.is_advertising
        # let frames already on the link drain, then watch ~0.3 s worth of traffic from the others
        await cb.next(by(ADDR_MI), count=3)
        mark = len(cb.frames)
        await cb.next(by(ADDR_MI), count=15)
        await cb.next(by(ADDR_BTHOME), count=5)
        assert cb.from_(ADDR_ATC, since=mark) == []
        await atc.start()
        await cb.next(by(ADDR_ATC))


async def test_service_uuids_filter(radio: VirtualRadio, three) -> None:
    cb = Collector()
    async with BleakScanner(cb, [FCD2.upper()], backend=BumbleScanner, bumble_radio=radio):
        await cb.next(count=15)
    assert {dev.address for dev, _ in cb.frames} == {ADDR_BTHOME}

    cb = Collector()
    async with BleakScanner(cb, [FE95, U181A], backend=BumbleScanner, bumble_radio=radio):
        await cb.next(by(ADDR_MI))
        await cb.next(by(ADDR_ATC))
        await cb.next(count=10)
    assert {dev.address for dev, _ in cb.frames} == {ADDR_MI, ADDR_ATC}


async def test_active_and_passive_scanning(radio: VirtualRadio) -> None:
    """A connectable advertiser with its name in the scan response: active scanning merges the
    scan response into the frame, passive scanning never sees it."""
    adv_data = build_ad(0x181A, ATC_PAYLOAD)
    dev = await radio.add_advertiser(
        ADDR_ATC,
        interval_ms=FAST_MS,
        connectable=True,
        data=adv_data,
        scan_response=ad_struct(0x09, b"ATC_SCANRSP"),
    )
    assert dev.connectable

    cb = Collector()
    async with BleakScanner(cb, scanning_mode="active", backend=BumbleScanner, bumble_radio=radio):
        frames = await cb.next(count=5)
    assert all(adv.local_name == "ATC_SCANRSP" for _, adv in frames)
    assert all(adv.service_data == {U181A: ATC_PAYLOAD} for _, adv in frames)
    assert all(d.details.is_connectable for d, _ in frames)

    cb = Collector()
    async with BleakScanner(cb, scanning_mode="passive", backend=BumbleScanner, bumble_radio=radio):
        frames = await cb.next(count=10)
    assert all(adv.local_name is None for _, adv in frames)
    assert all(adv.service_data == {U181A: ATC_PAYLOAD} for _, adv in frames)


async def test_non_connectable_is_reported_as_such(radio: VirtualRadio, three) -> None:
    cb = Collector()
    async with BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio):
        ((dev, _),) = await cb.next(by(ADDR_MI))
    assert not dev.details.is_connectable


async def test_start_stop_cycles_clean_up_the_link(radio: VirtualRadio, three) -> None:
    assert radio.link is not None
    base = len(radio.link.controllers)
    assert base == 3
    cb = Collector()
    scanner = BleakScanner(cb, backend=BumbleScanner, bumble_radio=radio)
    for _ in range(2):
        await scanner.start()
        assert len(radio.link.controllers) == base + 1
        await cb.next()
        await scanner.stop()
        assert len(radio.link.controllers) == base
    await scanner.stop()  # idempotent


async def test_open_scanner_helper(radio: VirtualRadio, three) -> None:
    cb = Collector()
    scanner = await open_scanner(cb, radio=radio, scanning_mode="passive")
    try:
        await cb.next(by(ADDR_BTHOME))
    finally:
        await scanner.stop()


async def test_discover_passes_backend_kwargs(radio: VirtualRadio, three) -> None:
    found = await BleakScanner.discover(timeout=0.3, return_adv=True, backend=BumbleScanner, bumble_radio=radio)
    assert set(found) == {ADDR_MI, ADDR_ATC, ADDR_BTHOME}


async def test_legacy_controller_via_transport_object(radio: VirtualRadio, three) -> None:
    """A BLE 4.x style controller (legacy HCI scanning/report events), given as an open Transport."""
    transport = radio.open_hci_transport(extended=False)
    cb = Collector()
    try:
        async with BleakScanner(cb, backend=BumbleScanner, bumble_transport=transport):
            (frame,) = await cb.next(by(ADDR_BTHOME))
            assert frame[1].service_data == {FCD2: BTHOME_PAYLOAD}
    finally:
        await transport.close()


async def test_tcp_hci_server(radio: VirtualRadio, three) -> None:
    port = await radio.serve_tcp("127.0.0.1", 0)
    assert radio.link is not None
    cb = Collector()
    async with BleakScanner(cb, backend=BumbleScanner, bumble_transport=f"tcp-client:127.0.0.1:{port}"):
        (frame,) = await cb.next(by(ADDR_MI))
        assert frame[1].service_data == {FE95: MI_PAYLOAD}
        assert len(radio.link.controllers) == 4
    # the server side notices the disconnection and removes that controller
    for _ in range(100):
        if len(radio.link.controllers) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(radio.link.controllers) == 3


async def test_errors(radio: VirtualRadio) -> None:
    with pytest.raises(ValueError):
        await radio.add_advertiser("not-an-address")
    with pytest.raises(ValueError):
        await radio.add_advertiser(ADDR_MI, "static")  # type: ignore[arg-type]
    adv = await radio.add_advertiser(ADDR_MI)
    with pytest.raises(ValueError):
        await radio.add_advertiser(ADDR_MI.lower())
    with pytest.raises(ValueError):
        await adv.set_data(bytes(32))
    with pytest.raises(BleakError):
        BleakScanner(backend=BumbleScanner)
    with pytest.raises(BleakError):
        BleakScanner(backend=BumbleScanner, bumble_radio=radio, bumble_transport="usb:0")
    with pytest.raises(BleakError):
        await BleakScanner(backend=BumbleScanner, bumble_radio=VirtualRadio()).start()
    with pytest.raises(BleakError):
        await BleakScanner(backend=BumbleScanner, bumble_transport="tcp-client:127.0.0.1:1").start()
    await adv.close()
    assert radio.advertisers == []


def test_advertisement_data_from_ad_structures() -> None:
    uuid128 = bytes(range(16))
    adv = advertisement_data_from_ad(
        [
            (0x08, b"short"),
            (0x03, b"\x0f\x18\x1a\x18"),
            (0x07, uuid128),
            (0x20, b"\x78\x56\x34\x12\xaa"),
            (0x21, uuid128 + b"\xbb"),
            (0x16, b"\x95"),  # truncated: skipped
            (0xFF, b"\x4c"),  # truncated: skipped
            (0x0A, b"\x08"),
        ],
        rssi=-70,
    )
    u128 = "0f0e0d0c-0b0a-0908-0706-050403020100"
    assert adv.local_name == "short"
    assert adv.service_uuids == [
        "0000180f-0000-1000-8000-00805f9b34fb",
        U181A,
        u128,
        "12345678-0000-1000-8000-00805f9b34fb",
    ]
    assert adv.service_data == {"12345678-0000-1000-8000-00805f9b34fb": b"\xaa", u128: b"\xbb"}
    assert adv.manufacturer_data == {}
    assert adv.tx_power == 8 and adv.rssi == -70

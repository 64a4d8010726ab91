"""GATT over the virtual radio: GattServer (simulated device) <-> BumbleClient (bleak) <-> GattLink."""

from __future__ import annotations

import asyncio
import time

import pytest
from bleak import BleakClient

from mitherm.gatt.link import GattError, GattLink, connect, normalize_uuid
from mitherm.radio.bleak_client import BumbleClient
from mitherm.radio.virtual import VirtualRadio
from mitherm.sim.gatt_server import CharSpec, GattServer

ADDRESS = "A4:C1:38:12:34:56"
PVVX_SERVICE = "1f10"
PVVX_CHAR = "1f1f"
OTA_SERVICE = "00010203-0405-0607-0809-0a0b0c0d1912"
OTA_CHAR = "00010203-0405-0607-0809-0a0b0c0d2b12"


class FakeDevice:
    """A pvvx-like device: 0x1F1F echoes every write as a notification; an OTA-like characteristic
    takes writes without response; Device Information has model and firmware strings."""

    def __init__(self, server: GattServer) -> None:
        self.server = server
        self.ota_writes: list[bytes] = []
        self.pvvx_writes: list[bytes] = []
        server.add_service(
            PVVX_SERVICE,
            [
                CharSpec(
                    PVVX_CHAR, {"read", "write", "write_without_response", "notify"}, on_write=self.echo, value=b"\x55"
                )
            ],
        )
        server.add_service(
            OTA_SERVICE, [CharSpec(OTA_CHAR, {"write_without_response"}, on_write=self.ota_writes.append)]
        )
        server.add_service(
            "180a",
            [
                CharSpec("2a24", {"read"}, value=b"LYWSD03MMC"),
                CharSpec("2a26", {"read"}, on_read=lambda: b"V4.6"),
            ],
        )

    async def echo(self, data: bytes) -> None:
        self.pvvx_writes.append(data)
        await self.server.notify(PVVX_CHAR, data)


@pytest.fixture
async def radio():
    async with VirtualRadio() as radio:
        yield radio


async def add_device(radio: VirtualRadio, address: str = ADDRESS, **kwargs) -> FakeDevice:
    adv = await radio.add_advertiser(address, "public", interval_ms=10, data=b"\x02\x01\x06")
    server = GattServer(adv, **kwargs)
    device = FakeDevice(server)
    await server.start()
    return device


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def test_normalize_uuid():
    full = "00001f1f-0000-1000-8000-00805f9b34fb"
    assert normalize_uuid("0x1f1f") == normalize_uuid("1F1F") == normalize_uuid(0x1F1F) == full
    assert normalize_uuid(OTA_CHAR.upper()) == OTA_CHAR
    with pytest.raises(ValueError):
        normalize_uuid("xyz")


async def test_server_makes_advertiser_connectable(radio):
    device = await add_device(radio)
    assert device.server.advertiser.connectable
    assert device.server.advertiser.is_advertising


async def test_read_write_discovery(radio):
    device = await add_device(radio)
    link = await connect(ADDRESS, radio=radio, timeout=5)
    try:
        assert isinstance(link, GattLink)
        assert link.is_connected and link.address == ADDRESS
        services = link.services()
        assert normalize_uuid(PVVX_SERVICE) in services and OTA_SERVICE in services
        assert normalize_uuid("180a") in services
        assert link.has_characteristic("0x1f1f") and link.has_characteristic(0x2A26)
        assert link.has_characteristic(OTA_CHAR.upper())
        assert not link.has_characteristic("2a99")
        assert await link.read("2a24") == b"LYWSD03MMC"
        assert await link.read(0x2A26) == b"V4.6"
        assert await link.read("1f1f") == b"\x55"

        await link.write("1f1f", b"\x01\x02", response=True)
        assert device.pvvx_writes == [b"\x01\x02"]  # the write response comes after the callback
        assert await link.read("1f1f") == b"\x01\x02"

        await link.write(OTA_CHAR, b"\xaa" * 20, response=False)
        await wait_for(lambda: device.ota_writes == [b"\xaa" * 20])

        with pytest.raises(GattError, match="no characteristic"):
            await link.read("2a99")
        assert device.server.connected
        assert not device.server.advertiser.controller.le_legacy_advertiser.enabled  # quiet while connected
    finally:
        await link.disconnect()
    assert not link.is_connected
    with pytest.raises(GattError, match="not connected"):
        await link.read("2a24")
    await wait_for(lambda: not device.server.connected)


async def test_notifications_in_order(radio):
    device = await add_device(radio)
    link = await connect(ADDRESS, radio=radio, timeout=5)
    received: list[bytes] = []
    try:
        await link.subscribe("1f1f", received.append)
        # Echo of writes with response.
        await link.write("1f1f", b"\x33", response=True)
        await wait_for(lambda: received == [b"\x33"])
        received.clear()
        # 200 notifications sent back to back by the device.
        for i in range(200):
            await device.server.notify(PVVX_CHAR, i.to_bytes(2, "little"))
        await wait_for(lambda: len(received) >= 200)
        assert received == [i.to_bytes(2, "little") for i in range(200)]
        received.clear()
        # 200 writes without response, echoed (coroutine write callback) in order.
        for i in range(200):
            await link.write("1f1f", bytes([i]) * 20, response=False)
        await wait_for(lambda: len(received) >= 200)
        assert received == [bytes([i]) * 20 for i in range(200)]

        await link.unsubscribe("1f1f")
        received.clear()
        await device.server.notify(PVVX_CHAR, b"\x99")
        await asyncio.sleep(0.05)
        assert received == []
    finally:
        await link.disconnect()


async def test_device_side_disconnect(radio):
    device = await add_device(radio)
    link = await connect(ADDRESS, radio=radio, timeout=5)
    fired: list[bool] = []
    link.on_disconnect(lambda: fired.append(True))
    server_events: list[str] = []
    device.server.on_disconnect = lambda: server_events.append("down")
    await device.server.disconnect()
    await wait_for(lambda: fired == [True])
    assert not link.is_connected
    assert server_events == ["down"]
    with pytest.raises(GattError):
        await link.read("2a24")
    with pytest.raises(GattError):
        await link.write("1f1f", b"\x01")
    with pytest.raises(GattError):
        await link.subscribe("1f1f", lambda data: None)
    await link.disconnect()  # idempotent
    assert fired == [True]
    # The device advertises again: a new connection works.
    await wait_for(lambda: device.server.advertiser.controller.le_legacy_advertiser.enabled)
    link2 = await connect(ADDRESS, radio=radio, timeout=5)
    assert await link2.read("2a24") == b"LYWSD03MMC"
    await link2.disconnect()


async def test_disconnect_during_operation(radio):
    adv = await radio.add_advertiser(ADDRESS, "public", interval_ms=10)
    server = GattServer(adv)
    stall = asyncio.Event()

    async def slow_write(data: bytes) -> None:
        await stall.wait()

    server.add_service("1f10", [CharSpec("1f1f", {"write"}, on_write=slow_write)])
    await server.start()
    link = await connect(ADDRESS, radio=radio, timeout=5)
    write = asyncio.create_task(link.write("1f1f", b"\x01"))
    await asyncio.sleep(0.05)
    await server.disconnect()
    with pytest.raises(GattError, match="disconnected"):
        await asyncio.wait_for(write, 3)
    stall.set()


async def test_operation_timeout(radio):
    adv = await radio.add_advertiser(ADDRESS, "public", interval_ms=10)
    server = GattServer(adv)
    never = asyncio.Event()

    async def stuck(data: bytes) -> None:
        await never.wait()

    server.add_service("1f10", [CharSpec("1f1f", {"write"}, on_write=stuck)])
    await server.start()
    link = await connect(ADDRESS, radio=radio, timeout=5, op_timeout=0.3)
    try:
        with pytest.raises(GattError, match="timed out"):
            await link.write("1f1f", b"\x01")
    finally:
        never.set()
        await link.disconnect()


async def test_connect_unknown_address(radio):
    await add_device(radio)
    start = time.monotonic()
    with pytest.raises(GattError, match="not found"):
        await connect("A4:C1:38:00:00:99", radio=radio, timeout=0.5, attempts=3)
    assert time.monotonic() - start < 2.0


async def test_connect_non_connectable(radio):
    await radio.add_advertiser(ADDRESS, "public", interval_ms=10, data=b"\x02\x01\x06")
    with pytest.raises(GattError, match="not connectable"):
        await connect(ADDRESS, radio=radio, timeout=0.5, attempts=1)


async def test_connect_twice_sequentially(radio):
    device = await add_device(radio)
    for round_ in range(3):
        link = await connect(ADDRESS, radio=radio, timeout=5)
        assert await link.read("2a24") == b"LYWSD03MMC"
        await link.write("1f1f", bytes([round_]))
        await link.disconnect()
        await wait_for(lambda: not device.server.connected)
    assert device.pvvx_writes == [b"\x00", b"\x01", b"\x02"]
    # Transports of the central are removed from the link.
    assert len(radio._transports) == 0


async def test_random_address_and_keep_advertising(radio):
    address = "E1:22:33:44:55:66"
    adv = await radio.add_advertiser(address, "random", interval_ms=10)
    server = GattServer(adv, stop_advertising_when_connected=False)
    server.add_service("180a", [CharSpec("2a24", {"read"}, value=b"MHO-C401")])
    await server.start()
    link = await connect(address, radio=radio, timeout=5)
    try:
        assert await link.read("2a24") == b"MHO-C401"
        await wait_for(lambda: adv.controller.le_legacy_advertiser.enabled)
    finally:
        await link.disconnect()


async def test_bleak_client_directly(radio):
    await add_device(radio)
    disconnected: list[BleakClient] = []
    async with BleakClient(
        ADDRESS, disconnected_callback=disconnected.append, backend=BumbleClient, bumble_radio=radio, timeout=5
    ) as client:
        assert client.is_connected
        assert client.mtu_size == 23
        char = client.services.get_characteristic(normalize_uuid("1f1f"))
        assert char is not None
        assert set(char.properties) == {"read", "write", "write-without-response", "notify"}
        assert char.max_write_without_response_size == 20
        assert [d.uuid for d in char.descriptors] == [normalize_uuid("2902")]
        assert await client.read_gatt_char("00002a24-0000-1000-8000-00805f9b34fb") == bytearray(b"LYWSD03MMC")
        with pytest.raises(NotImplementedError):
            await client.pair()
    assert disconnected == [client]


async def test_bleak_client_mtu_exchange(radio):
    await add_device(radio)
    async with BleakClient(ADDRESS, backend=BumbleClient, bumble_radio=radio, bumble_mtu=247, timeout=5) as client:
        assert client.mtu_size > 23
        char = client.services.get_characteristic(normalize_uuid(OTA_CHAR))
        assert char.max_write_without_response_size == client.mtu_size - 3


async def test_write_without_response_throughput(radio):
    device = await add_device(radio)
    link = await connect(ADDRESS, radio=radio, timeout=5)
    try:
        count = 1000
        start = time.perf_counter()
        for i in range(count):
            await link.write(OTA_CHAR, i.to_bytes(4, "little") * 5, response=False)
        await wait_for(lambda: len(device.ota_writes) >= count, timeout=10)
        rate = count / (time.perf_counter() - start)
        assert device.ota_writes == [i.to_bytes(4, "little") * 5 for i in range(count)]
        assert rate > 300, f"{rate:.0f} writes/s"
        print(f"write-without-response throughput: {rate:.0f}/s")
    finally:
        await link.disconnect()


async def test_platform_path_not_found(monkeypatch):
    async def find_device_by_address(address, timeout=10.0, **kwargs):
        return None

    monkeypatch.setattr("mitherm.gatt.link.BleakScanner.find_device_by_address", find_device_by_address)
    with pytest.raises(GattError, match=r"device A4:C1:38:12:34:56 not found: is it in range.*Xiaomi Home"):
        await connect(ADDRESS.lower(), timeout=0.1)


async def test_platform_path_uses_retry_connector(radio, monkeypatch):
    """The real-adapter path (find the BLEDevice, then bleak_retry_connector.establish_connection),
    run against the virtual radio by handing the Bumble backend to bleak through the retry connector."""
    import bleak_retry_connector
    from bleak.backends.device import BLEDevice

    await add_device(radio)
    calls: list[BLEDevice] = []

    async def find_device_by_address(address, timeout=10.0, **kwargs):
        return BLEDevice(address, None, None)

    real_establish = bleak_retry_connector.establish_connection

    async def establish_connection(client_class, device, name, **kwargs):
        calls.append(device)
        return await real_establish(client_class, device, name, backend=BumbleClient, bumble_radio=radio, **kwargs)

    monkeypatch.setattr("mitherm.gatt.link.BleakScanner.find_device_by_address", find_device_by_address)
    monkeypatch.setattr(bleak_retry_connector, "establish_connection", establish_connection)
    link = await connect(ADDRESS, timeout=5)
    try:
        assert [d.address for d in calls] == [ADDRESS]
        assert await link.read("2a24") == b"LYWSD03MMC"
    finally:
        await link.disconnect()


async def test_connection_attempt_times_out_and_is_cancelled(radio):
    """With the address type given, no scan happens first: LE Create Connection is pending until the
    timeout, then cancelled (the virtual controller completes the cancel, so this does not hang)."""
    client = BleakClient("A4:C1:38:00:00:99", backend=BumbleClient, bumble_radio=radio, bumble_address_type="public")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.connect(timeout=0.3), 3)
    assert time.monotonic() - start < 2.0
    assert not client.is_connected
    assert len(radio._transports) == 0
    # The device appears later: the same client object connects.
    await add_device(radio, "A4:C1:38:00:00:99")
    await client.connect(timeout=5)
    assert await client.read_gatt_char("00002a24-0000-1000-8000-00805f9b34fb") == bytearray(b"LYWSD03MMC")
    await client.disconnect()

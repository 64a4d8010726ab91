"""Mi standard auth: the sans-IO client against the sans-IO device side (bytes only), then over the
Bumble virtual radio through the GATT link, identify/activate/login and the fault injections."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mitherm.commands.device import DeviceCommandError, activate_async, info_async, login_async, sim_radio
from mitherm.keystore import Keystore
from mitherm.protocols import miauth
from mitherm.protocols.miauth import (
    CONTROL_UUID,
    DATA_UUID,
    RCV_ERROR,
    RCV_OK,
    RCV_RDY,
    STATUS,
    Failed,
    LoggedIn,
    LoginClient,
    Progress,
    RegisterClient,
    Registered,
    Write,
    did_text,
    frames_for,
    parse_token,
)
from mitherm.sim.devices import PvvxDevice, StockDevice
from mitherm.sim.gatt.miauth import MiAuthDevice, MiAuthState, Notify, state_for
from mitherm.sim.house import House

# --- in memory -------------------------------------------------------------------------------------------

Tamper = Callable[[list[Notify]], list[Notify]]


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def device(state: MiAuthState | None = None, seed: int = 2, **kw) -> MiAuthDevice:
    d = MiAuthDevice(state if state is not None else MiAuthState(), rng=seeded(seed), **kw)
    d.start()
    return d


def pump(client, dev: MiAuthDevice, tamper: Tamper | None = None, limit: int = 100):
    """Run client and device against each other; ``tamper`` edits each batch of notifications."""
    events, device_events, writes = [], [], []
    outputs = client.start()
    for _ in range(limit):
        notifications: list[Notify] = []
        for out in outputs:
            if isinstance(out, Write):
                writes.append(out)
                for r in dev.receive(out.char_uuid, out.data):
                    (notifications if isinstance(r, Notify) else device_events).append(r)
            else:
                events.append(out)
        if tamper is not None:
            notifications = tamper(notifications)
        if client.done or not notifications:
            break
        outputs = [o for n in notifications for o in client.receive(n.char_uuid, n.data)]
    return events, device_events, writes


def final(events):
    assert events and isinstance(events[-1], Registered | LoggedIn | Failed), events
    return events[-1]


def register(state: MiAuthState, seed: int = 1, **kw) -> Registered:
    events, _, _ = pump(RegisterClient(rng=seeded(seed)), device(state, **kw))
    result = final(events)
    assert isinstance(result, Registered), result
    return result


def test_register_unbound_device_both_sides_derive_the_same_keys():
    state = MiAuthState()
    events, device_events, writes = pump(RegisterClient(rng=seeded(1)), device(state))
    reg = final(events)
    assert isinstance(reg, Registered) and not reg.reused_did
    assert [type(e) for e in device_events] == [Registered]
    assert state.bound and (state.token, state.bindkey, state.did) == (reg.token, reg.bindkey, reg.did)
    assert len(reg.token) == 12 and len(reg.bindkey) == 16 and len(reg.did) == 20
    assert did_text(reg.did).startswith("blt.3.") and reg.did[0] == 0
    assert next(e.step for e in events if isinstance(e, Progress)).startswith("asking")
    # the message sequence of keys.md §1.4
    control = [w.data.hex() for w in writes if w.char_uuid == CONTROL_UUID]
    assert control == ["a2000000", "15000000", "13000000"]
    data = [w.data for w in writes if w.char_uuid == DATA_UUID]
    assert data[:2] == [RCV_RDY, RCV_OK]  # device info received
    assert data[2] == bytes.fromhex("000000030400")  # app key announced, 4 frames
    assert [len(f) for f in data[3:7]] == [20, 20, 20, 12]
    assert bytes.fromhex("000000000200") in data  # encrypted DID, 2 frames


def test_register_bound_device_reuses_its_did_and_replaces_the_keys():
    state = MiAuthState()
    first = register(state, seed=1)
    second = register(state, seed=9)
    assert second.reused_did and second.did == first.did
    assert second.bindkey != first.bindkey and state.bindkey == second.bindkey


def test_register_is_deterministic_for_a_seeded_rng():
    a, b = register(MiAuthState(), seed=5), register(MiAuthState(), seed=5)
    assert (a.token, a.bindkey, a.did) == (b.token, b.bindkey, b.did)


def test_custom_did_generator():
    reg = register_with_did(b"\x00" + b"blt.3.mitherm000000")
    assert did_text(reg.did) == "blt.3.mitherm000000"


def register_with_did(did: bytes) -> Registered:
    state = MiAuthState()
    events, _, _ = pump(RegisterClient(rng=seeded(3), did_generator=lambda _rng: did), device(state))
    return final(events)


def test_login_with_the_right_token():
    state = MiAuthState()
    reg = register(state)
    events, device_events, writes = pump(LoginClient(reg.token.hex(), rng=seeded(4)), device(state))
    result = final(events)
    assert isinstance(result, LoggedIn) and result.session is not None
    assert isinstance(device_events[-1], LoggedIn)
    assert device_events[-1].session == result.session  # both sides hold the same session keys
    assert [w.data.hex() for w in writes if w.char_uuid == CONTROL_UUID] == ["24000000"]


def test_login_with_a_wrong_token_fails_on_the_device_proof():
    state = MiAuthState()
    register(state)
    events, _, _ = pump(LoginClient(bytes(12), rng=seeded(4)), device(state))
    result = final(events)
    assert isinstance(result, Failed) and result.code == "invalid_token"
    assert "mitherm cloud keys" in result.message


def test_device_checks_the_app_proof(monkeypatch):
    state = MiAuthState()
    reg = register(state)
    monkeypatch.setattr(miauth, "app_proof", lambda *a: bytes(32))
    events, device_events, _ = pump(LoginClient(reg.token, rng=seeded(4)), device(state))
    assert final(events) == Failed("login_failed", STATUS[0x23].message)
    assert isinstance(device_events[-1], Failed)


def test_login_on_an_unregistered_device():
    events, _, _ = pump(LoginClient(bytes(12)), device(MiAuthState()))
    assert final(events) == Failed("not_registered", STATUS[0xE0].message)


def test_device_faults_in_memory():
    state = MiAuthState()
    reg = register(state)
    assert final(pump(RegisterClient(), device(state, faults={"already_registered": True}))[0]).code == (
        "already_registered"
    )
    ok = final(pump(LoginClient(reg.token), device(state, faults={"repeated_login": True}))[0])
    assert isinstance(ok, LoggedIn) and ok.session is None  # e2 counts as logged in (TelinkMiFlasher)
    bad = final(pump(LoginClient(reg.token), device(state, faults={"wrong_proof": True}))[0])
    assert bad.code == "invalid_token"
    err = final(pump(RegisterClient(), device(state, faults={"transfer_error": True}))[0])
    assert err.code == "protocol_error" and "transfer error" in err.message


def test_refused_activation_times_out_with_advice():
    client = RegisterClient()
    pump(client, device(MiAuthState(), refuse_activation=True))
    assert not client.done and "ready-to-receive for the app public key" in client.waiting_for
    result = final(client.timeout())
    assert result.code == "timeout" and "2.1.1_0159" in result.message and "mitherm login" in result.message


def test_never_answering_device_times_out_with_advice():
    client = RegisterClient(step_timeout=3)
    pump(client, device(faults={"never_answer": True}))
    result = final(client.timeout())
    assert result.code == "timeout"
    assert "(3 s)" in result.message and "long-press" in result.message and "2.1.1_0159" in result.message
    assert client.timeout() == [] and client.receive(DATA_UUID, RCV_RDY) == []  # done stays done


def test_disconnect_mid_way():
    client = RegisterClient()
    pump(client, device(), tamper=lambda ns: [])  # the device's answers never arrive
    result = final(client.disconnected())
    assert result.code == "disconnected" and "device info" in result.message


# --- framing edge cases ----------------------------------------------------------------------------------


def _is_key_frame(n: Notify) -> bool:
    return n.char_uuid == DATA_UUID and n.data[:2] in (b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x04\x00")


def test_frames_out_of_order_are_an_error():
    def swap(ns: list[Notify]) -> list[Notify]:
        frames = [n for n in ns if _is_key_frame(n)]
        if len(frames) == 4:  # the device's public key
            return [n for n in ns if not _is_key_frame(n)] + [frames[1], frames[0], *frames[2:]]
        return ns

    events, _, writes = pump(RegisterClient(), device(), tamper=swap)
    result = final(events)
    assert (
        result.code == "protocol_error" and "frame 2 of the device public key arrived where frame 1" in result.message
    )
    assert writes[-1] == Write(DATA_UUID, RCV_ERROR)


def drop_key_frame(index: int) -> Tamper:
    def tamper(ns: list[Notify]) -> list[Notify]:
        frames = [n for n in ns if _is_key_frame(n)]
        return [n for n in ns if n is not frames[index]] if len(frames) == 4 else ns

    return tamper


def test_a_lost_last_frame_ends_in_a_timeout_naming_it():
    client = RegisterClient()
    pump(client, device(), tamper=drop_key_frame(3))
    result = final(client.timeout())
    assert result.code == "timeout" and "frame 4 of 4 of the device public key" in result.message


def test_a_lost_middle_frame_is_noticed_at_the_next_one():
    events, _, _ = pump(RegisterClient(), device(), tamper=drop_key_frame(1))
    assert "frame 3 of the device public key arrived where frame 2 of 4" in final(events).message


@pytest.mark.parametrize("frame_size", [1, 7, 18, 64, 200])
def test_frames_of_any_size_are_reassembled(frame_size):
    # a device with a larger (or odd) MTU sends fewer, longer frames: the announced count is what counts
    state = MiAuthState()
    register(state)
    events, _, _ = pump(RegisterClient(frame_size=frame_size), device(state, frame_size=frame_size))
    assert isinstance(final(events), Registered)


def test_inline_transfer_and_mtu_check():
    client = LoginClient(bytes(12), rng=seeded(1))
    client.start()
    assert client.receive(DATA_UUID, RCV_RDY)[0].data == b"\x01\x00" + seeded(1)(16)
    assert client.receive(DATA_UUID, RCV_OK) == []
    # stock 2.1.1 MTU check: echoed with 05 in place of 04
    assert client.receive(DATA_UUID, bytes.fromhex("0000040011")) == [Write(DATA_UUID, bytes.fromhex("0000050011"))]
    # the device random inline (0000020d + 16 bytes): acked with 00000300
    assert client.receive(DATA_UUID, bytes.fromhex("0000020d") + bytes(16)) == [
        Write(DATA_UUID, bytes.fromhex("00000300"))
    ]
    assert "device proof" in client.waiting_for


def test_wrong_payload_type_and_size():
    client = RegisterClient()
    client.start()
    result = final(client.receive(DATA_UUID, bytes.fromhex("000000030100")))
    assert result.code == "protocol_error" and "type 03" in result.message
    login = LoginClient(bytes(12))
    login.start()
    login.receive(DATA_UUID, RCV_RDY)
    login.receive(DATA_UUID, RCV_OK)
    login.receive(DATA_UUID, bytes.fromhex("0000000d0100"))
    result = final(login.receive(DATA_UUID, b"\x01\x00" + bytes(5)))
    assert "device random is 5 bytes, expected 16" in result.message


# --- status codes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(c for c, s in STATUS.items() if not s.ok and c != 0xE2))
@pytest.mark.parametrize("client_type", [RegisterClient, LoginClient])
def test_every_failure_status_has_its_message(code, client_type):
    client = client_type(bytes(12)) if client_type is LoginClient else client_type()
    client.start()
    result = final(client.receive(CONTROL_UUID, bytes([code, 0, 0, 0])))
    assert result == Failed(STATUS[code].name, STATUS[code].message)
    assert len(result.message) > 40 and f"status {code:02x}" in result.message


def test_status_messages_give_the_way_out():
    assert "mitherm cloud keys" in STATUS[0xE1].message and "long-press" in STATUS[0xE1].message
    assert "mitherm activate" in STATUS[0xE0].message
    assert "token" in STATUS[0x22].message


def test_repeated_login_status_and_unexpected_codes():
    login = LoginClient(bytes(12))
    login.start()
    assert final(login.receive(CONTROL_UUID, bytes.fromhex("e2000000"))) == LoggedIn(None)
    reg = RegisterClient()
    reg.start()
    assert "e2" in final(reg.receive(CONTROL_UUID, bytes.fromhex("e2000000"))).message
    reg = RegisterClient()
    reg.start()
    assert "unknown status 99000000" in final(reg.receive(CONTROL_UUID, bytes.fromhex("99000000"))).message
    reg = RegisterClient()
    reg.start()
    assert "unexpected status 21" in final(reg.receive(CONTROL_UUID, bytes.fromhex("21000000"))).message


def test_parse_token():
    assert parse_token("00112233 44556677 8899aabb") == bytes.fromhex("00112233445566778899aabb")
    with pytest.raises(ValueError, match="length of a bindkey"):
        parse_token("00" * 16)
    with pytest.raises(ValueError, match="12 bytes"):
        parse_token(b"abc")


# --- hypothesis -----------------------------------------------------------------------------------------


@given(st.binary(max_size=300), st.integers(1, 40))
def test_frames_for_round_trip(payload, size):
    frames = frames_for(payload, size)
    assert [int.from_bytes(f[:2], "little") for f in frames] == list(range(1, len(frames) + 1))
    assert b"".join(f[2:] for f in frames) == payload
    assert all(len(f) <= size + 2 for f in frames)


@given(st.integers(1, 70), st.integers(1, 70), st.integers(0, 2**32))
def test_register_and_login_with_any_frame_sizes(client_size, device_size, seed):
    state = MiAuthState()
    events, _, _ = pump(RegisterClient(frame_size=client_size, rng=seeded(seed)), device(state, frame_size=device_size))
    reg = final(events)
    assert isinstance(reg, Registered) and reg.bindkey == state.bindkey
    events, _, _ = pump(LoginClient(reg.token, frame_size=client_size), device(state, frame_size=device_size))
    assert isinstance(final(events), LoggedIn)


@given(st.lists(st.tuples(st.sampled_from([CONTROL_UUID, DATA_UUID, "2a26"]), st.binary(max_size=24)), max_size=30))
def test_arbitrary_notifications_never_crash_a_client(notifications):
    for client in (RegisterClient(), LoginClient(bytes(12))):
        client.start()
        for char, data in notifications:
            for out in client.receive(char, data):
                assert isinstance(out, Write | Progress | Registered | LoggedIn | Failed)
        assert not client.done or isinstance(client.result, Failed | LoggedIn)


@given(st.lists(st.tuples(st.sampled_from([CONTROL_UUID, DATA_UUID]), st.binary(max_size=24)), max_size=30))
def test_arbitrary_writes_never_crash_the_device(writes):
    dev = device()
    for char, data in writes:
        for out in dev.receive(char, data):
            assert isinstance(out, Notify | Failed | Registered | LoggedIn)
    assert not dev.done  # the device serves forever


# --- over the Bumble virtual radio ---------------------------------------------------------------------

STEP = 0.5  # seconds per protocol step: the virtual link answers in milliseconds


def stock(**kw) -> StockDevice:
    # an encrypted reading every simulated second: the verification does not wait 10 minutes
    return StockDevice("LYWSD03MMC", seed=kw.pop("seed", 11), data_interval=1.0, **kw)


def house(*devices) -> House:
    return House(list(devices), time_factor=4.0)


@pytest.fixture
def keystore(tmp_path) -> Keystore:
    return Keystore(tmp_path / "keys.json")


async def test_identify_stock_and_pvvx():
    lywsd, pv = stock(), PvvxDevice("bthome", seed=12)
    async with sim_radio(house(lywsd, pv)) as radio:
        ident = await info_async(lywsd.address, radio=radio, timeout=5)
        assert ident.firmware_kind == "stock" and ident.has_mi_auth and ident.accepts_activation
        assert (ident.model, ident.firmware, ident.hardware) == ("LYWSD03MMC", "1.0.0_0130", "B1.4")
        assert any("mitherm activate" in s for s in ident.next_steps)
        lywsd.firmware = "2.1.1_0159"
        ident = await info_async(lywsd.address, radio=radio, timeout=5)
        assert ident.accepts_activation is False and any("cloud keys" in s for s in ident.next_steps)
        ident = await info_async(pv.address, radio=radio, timeout=5)
        assert ident.firmware_kind == "pvvx" and ident.pvvx_version == "5.8" and not ident.has_mi_auth
        assert ident.firmware == "github.com/pvvx" and any("mitherm pvvx" in s for s in ident.next_steps)


async def test_activate_stores_the_key_the_next_advert_decrypts_and_login_works(keystore):
    dev = stock()
    old_key = dev.bindkey
    async with sim_radio(house(dev)) as radio:
        steps = []
        result = await activate_async(
            dev.address,
            keystore=keystore,
            radio=radio,
            timeout=5,
            step_timeout=STEP,
            verify_timeout=15,
            on_event=lambda e: steps.append(e),
        )
        assert dev.bindkey == result.bindkey != old_key  # the device re-keyed its adverts
        assert result.diagnosis is not None and result.diagnosis.ok, result.diagnosis
        assert result.diagnosis.frames.decrypted >= 1
        entry = Keystore(keystore.path).get(dev.address)
        assert entry is not None and entry.source == "activation"
        assert (entry.bindkey, entry.token, entry.did) == (result.bindkey, result.token, result.did)
        assert any(isinstance(e, Progress) for e in steps)

        logged_in = await login_async(dev.address, keystore=keystore, radio=radio, timeout=5, step_timeout=STEP)
        assert logged_in.session is not None
        with pytest.raises(DeviceCommandError, match="login proof does not match"):
            await login_async(dev.address, token="00" * 12, radio=radio, timeout=5, step_timeout=STEP)


async def test_login_with_the_cloud_token_on_0159(keystore):
    # a 0159 device bound in Xiaomi Home: activation is refused up front, login with its token works
    dev = stock()
    dev.firmware = "2.1.1_0159"
    async with sim_radio(house(dev)) as radio:
        with pytest.raises(DeviceCommandError, match=r"2\.1\.1_0159.*refuses BLE activation.*mitherm cloud keys"):
            await activate_async(dev.address, keystore=keystore, radio=radio, timeout=5, step_timeout=STEP)
        cloud_token = state_for(dev).token.hex()
        await login_async(dev.address, token=cloud_token, radio=radio, timeout=5, step_timeout=STEP)
        # --force tries anyway: the firmware never answers the key exchange
        with pytest.raises(DeviceCommandError, match=r"No answer from the device.*2\.1\.1_0159"):
            await activate_async(
                dev.address, keystore=keystore, radio=radio, timeout=5, step_timeout=STEP, force=True, verify=False
            )
    assert len(keystore) == 0


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"never_answer": True}, r"No answer from the device while waiting for the device info.*long-press"),
        ({"already_registered": True}, r"already registered \(status e1\)"),
        ({"refuse_activation": True}, r"No answer.*ready-to-receive for the app public key.*2\.1\.1_0159"),
        ({"disconnect_after": 3}, r"dropped the connection"),
    ],
)
async def test_activation_faults_give_clear_errors(keystore, faults, message):
    dev = stock()
    dev.miauth_faults = faults
    async with sim_radio(house(dev)) as radio:
        with pytest.raises(DeviceCommandError, match=message):
            await activate_async(dev.address, keystore=keystore, radio=radio, timeout=5, step_timeout=STEP)
    assert len(keystore) == 0


async def test_login_errors(keystore):
    dev = stock()
    async with sim_radio(house(dev)) as radio:
        with pytest.raises(DeviceCommandError, match="no token stored"):
            await login_async(dev.address, keystore=keystore, radio=radio, timeout=5)
        with pytest.raises(DeviceCommandError, match="bad token"):
            await login_async(dev.address, token="abc", radio=radio, timeout=5)
        dev.miauth_faults = {"disconnect_after": 1}
        with pytest.raises(DeviceCommandError, match="dropped the connection"):
            await login_async(dev.address, token="00" * 12, radio=radio, timeout=5, step_timeout=STEP)


def test_cli_activate_and_info_on_a_virtual_house(tmp_path):
    from click.testing import CliRunner

    from mitherm.commands.device import activate, info

    house_file = tmp_path / "house.toml"
    house_file.write_text(
        'time_factor = 4.0\n[[device]]\nkind = "stock"\nmodel = "LYWSD03MMC"\naddress = "A4:C1:38:00:00:01"\n'
    )
    keys = tmp_path / "keys.json"
    runner = CliRunner()
    out = runner.invoke(info, ["A4:C1:38:00:00:01", "--sim", str(house_file), "--json"])
    assert out.exit_code == 0, out.output
    assert '"firmware_kind": "stock"' in out.output
    out = runner.invoke(
        activate, ["a4c138000001", "--sim", str(house_file), "--keystore", str(keys), "--yes", "--no-verify"]
    )
    assert out.exit_code == 0, out.output
    entry = Keystore(keys).get("A4:C1:38:00:00:01")
    assert entry is not None and entry.bindkey not in out.output and entry.token not in out.output  # masked
    assert f"{entry.bindkey[:4]}…{entry.bindkey[-4:]}" in out.output and "Xiaomi Home" in out.output
    out = runner.invoke(activate, ["A4:C1:38:00:00:01", "--sim", str(house_file), "--keystore", str(keys)], input="n\n")
    assert out.exit_code == 1 and "not activated" in out.output

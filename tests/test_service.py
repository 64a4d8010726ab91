"""``mitherm run`` end to end with real parts: capture replay -> Gateway -> SQLite history / --print, the
keystore watcher, counter persistence, CLI errors, and the simulator over the Bumble virtual radio."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mitherm.captures import parse_ad_structures, write_jsonl_line
from mitherm.cli import main
from mitherm.history import History
from mitherm.keystore import Keystore
from mitherm.model import Advertisement
from mitherm.service import RunConfig, Service
from mitherm.sim.devices import BTHomeDevice, Device, PvvxDevice, StockDevice
from mitherm.sim.house import House
from mitherm.state import KeyStatus


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of a test run lands in the user's directories (the recent-frame snapshot, default paths)."""
    monkeypatch.setenv("MITHERM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "config"))


# --- captures written by the test ----------------------------------------------------------------------


def make_devices() -> list[Device]:
    return [
        BTHomeDevice(2, encrypted=True, seed="svc-bthome", adv_interval=0.5),
        StockDevice("LYWSD03MMC", seed="svc-stock", data_interval=0.4, adv_interval=0.3),
        PvvxDevice("pvvx", seed="svc-pvvx", adv_interval=0.5),
    ]


def write_capture(path: Path, devices: list[Device], seconds: float, t0: float, receivers: int = 2) -> list:
    """Every frame of ``devices`` over ``seconds`` of simulated time as heard by ``receivers`` receivers.
    Returns [(t, device, frame)] in time order."""
    events = sorted(((f.t, i, d, f) for i, d in enumerate(devices) for f in d.frames(seconds)), key=lambda e: e[:2])
    with path.open("w", encoding="utf-8") as out:
        for t, _, d, f in events:
            for r in range(receivers):
                adv = Advertisement(
                    d.address, t0 + t + 0.001 * r, {f.service_uuid: f.payload}, rssi=-60 - 7 * r, source=f"rx{r}"
                )
                out.write(write_jsonl_line(adv) + "\n")
    return [(t, d, f) for t, _, d, f in events]


def write_keys(path: Path, keys: dict[str, str], names: dict[str, str] | None = None) -> None:
    ks = Keystore(path)
    for mac, key in keys.items():
        ks.add(mac, key, name=(names or {}).get(mac), overwrite=True)
    ks.save()


@pytest.fixture
def setup(tmp_path: Path):
    devices = make_devices()
    t0 = time.time() - 600.0
    events = write_capture(tmp_path / "cap.jsonl", devices, 2.6, t0)
    keys = {d.address: d.bindkey for d in devices if d.bindkey}
    write_keys(tmp_path / "keys.json", keys, {d.address: f"dev{i}" for i, d in enumerate(devices)})
    return tmp_path, devices, events, t0


def config(tmp_path: Path, **kw) -> RunConfig:
    kw.setdefault("sources", [f"capture:{tmp_path / 'cap.jsonl'}"])
    return RunConfig(db=str(tmp_path / "history.sqlite3"), keys=str(tmp_path / "keys.json"), web=False, **kw)


def expected_decoded(events) -> dict[str, int]:
    """Distinct data payloads per device (what the gateway decodes once each)."""
    seen: dict[str, set[bytes]] = {}
    for _, d, f in events:
        if f.has_data:
            seen.setdefault(d.address, set()).add(f.payload)
    return {mac: len(p) for mac, p in seen.items()}


# --- capture replay ---------------------------------------------------------------------------------------


async def test_capture_replay_runs_to_the_end_and_stops(setup) -> None:
    tmp_path, devices, events, _t0 = setup
    out = io.StringIO()
    gw = await asyncio.wait_for(Service(config(tmp_path, print=True), out=out).run(), 20)
    assert gw.stats.adverts == 2 * len(events)
    assert gw.stats.duplicates >= len(events)  # the second receiver hears everything again
    per_device = expected_decoded(events)
    assert gw.stats.decoded == sum(per_device.values())
    assert gw.stats.replayed == 0 and gw.stats.failed == 0
    for d in devices:
        st = gw.devices[d.address]
        assert st.rssi == -60  # the best receiver's
        assert st.key_status == (KeyStatus.VERIFIED if d.encrypted else KeyStatus.NOT_NEEDED)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == gw.stats.decoded
    by_mac: dict[str, int] = {}
    for obj in lines:
        by_mac[obj["mac"]] = by_mac.get(obj["mac"], 0) + 1
        assert set(obj) >= {"mac", "name", "values", "time", "key_status", "rssi", "receiver"}
    assert by_mac == per_device


async def test_replay_keeps_the_receiver_names_of_the_capture(setup) -> None:
    """BUG: CaptureSource calls ``read_capture(path, source=self.name)``, which overrides every record's
    ``source`` (the receiver that heard it, e.g. "hci0" or a proxy name) with "capture:FILE": a replayed
    multi-receiver capture loses which receiver heard a device best (#5.2 keeps the receiver name)."""
    tmp_path, devices, _events, _t0 = setup
    gw = await asyncio.wait_for(Service(config(tmp_path)).run(), 20)
    for d in devices:
        st = gw.devices[d.address]
        assert (st.receiver, st.rssi) == ("rx0", -60)


async def test_history_holds_the_readings_and_the_cli_reads_them_back(setup) -> None:
    tmp_path, devices, events, t0 = setup
    await asyncio.wait_for(Service(config(tmp_path)).run(), 20)
    db = tmp_path / "history.sqlite3"
    bthome = devices[0]
    truth = {round(t0 + f.t, 6): bthome.truth_at(f.t) for t, d, f in events if d is bthome and f.has_data}
    with History(db) as h:
        rows = h.readings(bthome.address)
        assert {r.quantity for r in rows} >= {"temperature_c", "humidity_pct", "battery_pct", "voltage_v"}
        assert "packet_id" not in {r.quantity for r in rows}
        for r in rows:
            assert abs(r.value - getattr(truth[round(r.ts, 6)], r.quantity)) <= 0.006
        assert h.device(bthome.address).name == "dev0"
        assert h.integrity_check() == "ok"

    res = CliRunner().invoke(main, ["history", bthome.address, "--json", "--db", str(db)])
    assert res.exit_code == 0, res.output
    objs = [json.loads(line) for line in res.output.splitlines()]
    assert len(objs) == len(truth)
    for obj in objs:
        tr = truth[round(obj["ts"], 6)]
        if "temperature_c" in obj:
            assert abs(obj["temperature_c"] - tr.temperature_c) <= 0.006
        if "battery_pct" in obj:
            assert obj["battery_pct"] == tr.battery_pct


async def test_replay_at_recorded_pace_takes_the_capture_time(setup) -> None:
    tmp_path, _devices, events, _t0 = setup
    span = events[-1][0] - events[0][0]
    assert span >= 2.0
    start = time.monotonic()
    gw = await asyncio.wait_for(Service(config(tmp_path, replay_speed="1.0")).run(), 20)
    paced = time.monotonic() - start
    assert paced >= 1.5
    assert gw.stats.adverts == 2 * len(events)

    (tmp_path / "history.sqlite3").unlink()
    start = time.monotonic()
    await asyncio.wait_for(Service(config(tmp_path, replay_speed="max")).run(), 20)
    assert time.monotonic() - start < paced


async def test_follow_keeps_running_until_cancelled(setup) -> None:
    tmp_path, devices, events, _t0 = setup
    svc = Service(config(tmp_path, follow=True))
    task = asyncio.create_task(svc.run())
    deadline = time.monotonic() + 10
    while (svc.gateway is None or svc.gateway.stats.adverts < 2 * len(events)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert svc.gateway is not None and svc.gateway.stats.adverts == 2 * len(events)
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with History(tmp_path / "history.sqlite3") as h:  # flushed on the way out
        assert h.readings(devices[2].address)


async def test_keystore_edit_is_picked_up_while_running(tmp_path: Path) -> None:
    dev = BTHomeDevice(2, encrypted=True, seed="svc-keywatch", adv_interval=0.25)
    t0 = time.time()
    write_capture(tmp_path / "cap.jsonl", [dev], 12.0, t0, receivers=1)
    write_keys(tmp_path / "keys.json", {dev.address: "00112233445566778899aabbccddeeff"})
    svc = Service(config(tmp_path, replay_speed="1"))
    task = asyncio.create_task(svc.run())
    try:
        while svc.gateway is None or dev.address not in svc.gateway.devices:
            await asyncio.sleep(0.05)
        st = svc.gateway.devices[dev.address]
        await asyncio.sleep(0.6)
        assert st.key_status == KeyStatus.FAILED
        assert st.key_verdict == "wrong_key"
        assert svc.gateway.stats.decoded == 0

        await asyncio.sleep(0.1)  # a different mtime from the first write
        write_keys(tmp_path / "keys.json", {dev.address: dev.bindkey})
        edited = time.monotonic()
        while st.key_status != KeyStatus.VERIFIED and time.monotonic() - edited < 5:
            await asyncio.sleep(0.05)
        assert st.key_status == KeyStatus.VERIFIED, "keystore edit not picked up within 5 s"
        decoded = svc.gateway.stats.decoded
        while svc.gateway.stats.decoded == decoded and time.monotonic() - edited < 6:
            await asyncio.sleep(0.05)
        assert svc.gateway.stats.decoded > decoded  # and new frames decode
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_counters_persisted_in_the_history_db_survive_a_restart(setup) -> None:
    tmp_path, devices, events, _t0 = setup
    gw1 = await asyncio.wait_for(Service(config(tmp_path)).run(), 20)
    per_device = expected_decoded(events)
    encrypted = sum(n for mac, n in per_device.items() if mac != devices[2].address)
    plain = per_device[devices[2].address]
    assert gw1.stats.decoded == encrypted + plain
    with History(tmp_path / "history.sqlite3") as h:
        assert h.get_state("counters")

    gw2 = await asyncio.wait_for(Service(config(tmp_path)).run(), 20)
    assert gw2.stats.replayed == encrypted
    assert gw2.stats.decoded == plain  # plain frames carry no replay protection
    for d in devices[:2]:
        assert gw2.devices[d.address].values == {}


# --- the command line ---------------------------------------------------------------------------------------


def _run_cli(tmp_path: Path, *args: str):
    return CliRunner().invoke(
        main,
        ["run", "--no-web", "--db", str(tmp_path / "h.sqlite3"), "--keys", str(tmp_path / "k.json"), *args],
    )


def _assert_clean_error(res, *needles: str) -> None:
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # a ClickException, not a traceback
    assert "Error:" in res.output
    for n in needles:
        assert n in res.output, res.output


def test_cli_run_missing_capture_is_a_clean_error(tmp_path: Path) -> None:
    _assert_clean_error(_run_cli(tmp_path, "--source", f"capture:{tmp_path / 'nope.jsonl'}"), "nope.jsonl")


def test_cli_run_bad_capture_content_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not a capture\n")
    _assert_clean_error(_run_cli(tmp_path, "--source", f"capture:{bad}"), "bad.jsonl")
    half = tmp_path / "half.jsonl"
    dev = PvvxDevice("pvvx", seed="half")
    f = next(iter(dev.frames(10.0)))
    good = write_jsonl_line(Advertisement(dev.address, time.time(), {f.service_uuid: f.payload}))
    half.write_text(good + "\n" + '{"mac": "zz"}\n')
    _assert_clean_error(_run_cli(tmp_path, "--source", f"capture:{half}"), "half.jsonl:2")


def test_cli_run_capture_prints_a_summary(setup) -> None:
    tmp_path, _devices, events, _t0 = setup
    res = CliRunner().invoke(
        main,
        ["run", "--no-web", "--db", str(tmp_path / "h.sqlite3"), "--keys", str(tmp_path / "keys.json"),
         "--source", f"capture:{tmp_path / 'cap.jsonl'}", "--print"],
    )  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"{2 * len(events)} adverts" in res.output
    assert "3 devices" in res.output


def test_cli_run_unknown_config_option_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "mitherm.toml"
    cfg.write_text('source = "capture:x.jsonl"\nmqtt_host = "localhost"\n')
    _assert_clean_error(_run_cli(tmp_path, "--config", str(cfg)), "mqtt_host")


def test_cli_run_invalid_toml_is_a_clean_error(tmp_path: Path) -> None:
    cfg = tmp_path / "mitherm.toml"
    cfg.write_text("source = [\n")
    _assert_clean_error(_run_cli(tmp_path, "--config", str(cfg)), "not valid TOML")


@pytest.mark.parametrize(
    ("text", "option"),
    [("source = 5\n", "source"), ('replay_speed = "fast"\nsource = "capture:{cap}"\n', "replay")],
    ids=["source-not-a-string", "replay-speed-not-a-number"],
)
def test_cli_run_config_option_of_the_wrong_type_is_named(setup, text: str, option: str) -> None:
    """BUG (source = 5): RunConfig.from_toml does not check value types; ``source = 5`` reaches
    ``for u in 5`` in Service.run and ends in a TypeError traceback instead of an error naming the option."""
    tmp_path, _devices, _events, _t0 = setup
    cfg = tmp_path / "mitherm.toml"
    cfg.write_text(text.format(cap=tmp_path / "cap.jsonl"))
    _assert_clean_error(_run_cli(tmp_path, "--config", str(cfg)), option)


def test_cli_run_unreadable_keystore_is_a_clean_error(setup) -> None:
    """BUG: a keystore that is not valid JSON raises KeystoreError out of Service.run (traceback)."""
    tmp_path, _devices, _events, _t0 = setup
    (tmp_path / "k.json").write_text("{not json")
    _assert_clean_error(_run_cli(tmp_path, "--source", f"capture:{tmp_path / 'cap.jsonl'}"), "k.json")


# --- the simulator over the Bumble virtual radio ---------------------------------------------------------------


def sim_house() -> tuple[House, Device, Device]:
    rekeyed = StockDevice("LYWSD03MMC", seed="sim-rekey", data_interval=4.0, adv_interval=4.0, label="rekey")
    corrupted = BTHomeDevice(2, encrypted=True, seed="sim-corrupt", label="corrupt")
    corrupted_plain = PvvxDevice("pvvx", seed="sim-corrupt-plain", label="corrupt-plain")
    corrupted.corrupt(1.0)
    corrupted_plain.corrupt(1.0)
    devices: list[Device] = [
        StockDevice("LYWSD03MMC", seed="sim-stock", data_interval=10.0, adv_interval=5.0),
        *(PvvxDevice(t, encrypted=e, seed=f"sim-{t}-{e}") for t in ("atc1441", "pvvx", "mi", "bthome") for e in (0, 1)),
        *(BTHomeDevice(v, encrypted=e, seed=f"sim-bth{v}-{e}") for v in (1, 2) for e in (False, True)),
        rekeyed,
        corrupted,
        corrupted_plain,
    ]
    return House(devices, time_factor=10.0, name="test"), rekeyed, corrupted


async def test_simulator_over_the_bumble_radio() -> None:
    from mitherm.gateway import Gateway
    from mitherm.radio.virtual import VirtualRadio
    from mitherm.sources.sim_source import SimSource
    from test_gateway import Recorder, assert_matches_truth

    house, rekeyed, corrupted = sim_house()
    by_mac = {d.address: d for d in house.devices}
    corrupt = {d.address for d in house.devices if d.corrupt_probability}
    gw = Gateway(house.keys())
    rec = Recorder()
    gw.sinks.append(rec)
    sent: dict[tuple[str, bytes], float] = {}  # (mac, payload) -> simulated time it was first sent
    checked: dict[str, int] = {}
    problems: list[str] = []

    radio = VirtualRadio()
    await radio.start()
    src = SimSource(house=house, radio=radio)
    add = radio.add_advertiser

    async def add_advertiser(address, *a, **kw):
        adv = await add(address, *a, **kw)
        set_data = adv.set_data

        async def recording_set_data(ad: bytes) -> None:
            for payload in parse_ad_structures(ad)[0].values():
                sent.setdefault((address, payload), src.simulator.now)
            await set_data(ad)

        adv.set_data = recording_set_data
        return adv

    radio.add_advertiser = add_advertiser

    def emit(adv: Advertisement) -> None:
        for st, reading in gw.handle(adv):
            if reading.error is not None:
                continue
            dev = by_mac[st.mac]
            (payload,) = [p for u, p in adv.service_data.items() if u]
            t = sent.get((adv.mac, payload))
            if t is None:
                problems.append(f"{st.mac}: received a payload that was never sent")
                continue
            try:
                assert_matches_truth(reading.values, dev.truth_at(t).as_dict(), reading.format or "")
            except AssertionError as e:
                problems.append(str(e))
            checked[st.mac] = checked.get(st.mac, 0) + 1

    task = asyncio.create_task(src.run(emit))
    try:
        wanted = [d for d in house.devices if d.address not in corrupt]
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            assert not task.done(), task.exception()
            if all(d.address in checked and d.address in gw.devices for d in wanted) and all(
                len(gw.devices[d.address].values) >= 3 for d in wanted if d is not house.devices[0]
            ):
                break
        missing = [repr(d) for d in wanted if d.address not in checked]
        assert not missing, f"no value received from {missing}"
        assert not problems, problems[:5]
        for d in wanted:
            st = gw.devices[d.address]
            assert st.key_status == (KeyStatus.VERIFIED if d.encrypted else KeyStatus.NOT_NEEDED), (d, st)
            assert st.format == d.format
            assert st.receiver == "sim"

        old = rekeyed.bindkey
        rekeyed.rekey()
        verdict = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            verdict = gw.verify_key(rekeyed.address, old).verdict.value
            if verdict == "key_outdated":
                break
        assert verdict == "key_outdated"
        assert gw.verify_key(rekeyed.address, rekeyed.bindkey).verdict.value == "ok"
        assert not problems, problems[:5]
        for mac in corrupt:
            assert mac not in checked
            st = gw.devices.get(mac)
            assert st is None or st.values == {}
        assert not [m for m, _ in rec.published if m in corrupt]
        assert gw.devices[corrupted.address].key_status == KeyStatus.FAILED
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await radio.stop()


async def test_service_uses_the_sim_source_it_is_given(tmp_path: Path) -> None:
    """BUG: Service(cfg, sim_source=src) stores ``src`` but Service.run opens every cfg.sources URL afresh
    (``open_source("sim:demo")``): the prepared SimSource (the demo's house, any fault or rekey scheduled
    on it) is never run. ``mitherm demo`` works only because a second builtin house has the same seed."""
    from mitherm.sources.sim_source import SimSource

    src = SimSource("minimal", time_factor=60.0)
    svc = Service(config(tmp_path, sources=["sim:minimal"]), sim_source=src)
    task = asyncio.create_task(svc.run())
    try:
        deadline = time.monotonic() + 8
        while (svc.gateway is None or not svc.gateway.devices) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert svc.gateway is not None and svc.gateway.devices
        assert src.simulator is not None, "the given SimSource was not used"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

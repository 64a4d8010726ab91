"""Xiaomi cloud key extraction (issue #8) against a local fake Xiaomi server (tests/fake_xiaomi.py).

Nothing here talks to the internet: the fake listens on a random loopback port and the client is
pointed at it with --account-url / --api-url (or the environment / cloud.toml)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives.ciphers import Cipher

from fake_xiaomi import FakeDevice, FakeXiaomi
from mitherm.bindkey import parse_bindkey
from mitherm.captures import write_jsonl_line
from mitherm.cloud import (
    AccountLocked,
    CaptchaRequired,
    CloudSession,
    NetworkError,
    SessionExpired,
    TwoFactorRequired,
    WrongCaptcha,
    WrongCredentials,
    WrongVerificationCode,
    XiaomiCloud,
    api_base,
    crypto,
)
from mitherm.commands.cloud import cloud
from mitherm.formats import mibeacon
from mitherm.keystore import Keystore
from mitherm.mac import mac_to_le
from mitherm.model import Advertisement
from mitherm.paths import default_frames_snapshot

USER = "alice@example.com"
PASSWORD = "correct horse battery"
UID = 1812345678
OTHER_UID = 1898765432

MAC_BED = "A4:C1:38:0A:0B:01"
MAC_HALL = "A4:C1:38:0A:0B:02"
MAC_KITCHEN = "A4:C1:38:0A:0B:03"
MAC_CELLAR = "E7:2E:01:0A:0B:04"
KEY_BED = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
KEY_KITCHEN = "b7e3c0a1d5f24e6a8c9b0d1e2f3a4b5c"
KEY_CELLAR = "5a5a5a5a00112233445566778899aabb"
KEY_OLD = "00112233445566778899aabbccddeeff"  # a key from an earlier pairing


def populate(fake: FakeXiaomi) -> FakeXiaomi:
    fake.add_account(USER, PASSWORD, UID)
    fake.add_account("bob", "bobs password", OTHER_UID)
    fake.add_home(
        1001,
        "Flat",
        UID,
        "de",
        [
            FakeDevice("blt.3.1bed", "Bedroom", "miaomiaoce.sensor_ht.t2", MAC_BED, token="6a2f1c", beaconkey=KEY_BED),
            FakeDevice("blt.3.1hal", "Hall", "miaomiaoce.sensor_ht.t2", MAC_HALL, beaconkey=None),
            FakeDevice("412345678", "Desk plug", "chuangmi.plug.v3", None),
        ],
    )
    fake.add_home(
        2002,
        "Parents",
        OTHER_UID,
        "de",
        [FakeDevice("blt.3.2kit", "Kitchen", "miaomiaoce.sensor_ht.t2", MAC_KITCHEN, beaconkey=KEY_KITCHEN)],
        shared_with={UID},
    )
    fake.add_home(
        3003,
        "Cottage",
        UID,
        "us",
        [FakeDevice("blt.4.3cel", "Cellar", "miaomiaoce.sensor_ht.o2", MAC_CELLAR, beaconkey=KEY_CELLAR)],
    )
    return fake


@pytest.fixture
def fake() -> Iterator[FakeXiaomi]:
    with FakeXiaomi() as f:
        yield populate(f)


@pytest.fixture(autouse=True)
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("MITHERM_DATA_DIR", str(tmp_path / "data"))
    for var in ("MITHERM_KEYSTORE", "MITHERM_CLOUD_ACCOUNT_URL", "MITHERM_CLOUD_API_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def servers(fake: FakeXiaomi) -> list[str]:
    return ["--account-url", fake.url, "--api-url", fake.api_url]


def client(fake: FakeXiaomi, **kw: object) -> XiaomiCloud:
    return XiaomiCloud(account_url=fake.url, api_url=fake.api_url, **kw)  # type: ignore[arg-type]


def cli_login(fake: FakeXiaomi, input: str = f"{USER}\n{PASSWORD}\n", *extra: str):
    return CliRunner().invoke(cloud, ["login", *servers(fake), *extra], input=input)


def session_file(dirs: Path) -> Path:
    return dirs / "config" / "cloud-session.json"


# --------------------------------------------------------------------------------------------------
# crypto (sans I/O)


def _ref_arc4(key: bytes, data: bytes, drop: int) -> bytes:
    enc = Cipher(ARC4(key), mode=None).encryptor()
    enc.update(bytes(drop))
    return enc.update(data)


def test_rc4_known_vector_and_drop1024_match_cryptography() -> None:
    assert crypto.rc4(b"Key", b"Plaintext").hex() == "bbf316e8d940af0ad3"
    assert crypto.rc4(b"Wiki", b"pedia").hex() == "1021bf0420"
    for n in range(5):
        key = hashlib.sha256(bytes([n])).digest()
        data = os.urandom(50 + n)
        assert crypto.rc4_drop1024(key, data) == _ref_arc4(key, data, 1024)
        assert crypto.rc4_drop1024(key, crypto.rc4_drop1024(key, data)) == data


def test_nonce_signed_nonce_and_password_hash() -> None:
    nonce = crypto.make_nonce(now_ms=1_700_000_000_000, random_bytes=b"\x01" * 8)
    raw = base64.b64decode(nonce)
    assert raw[:8] == b"\x01" * 8 and int.from_bytes(raw[8:], "big") == 1_700_000_000_000 // 60000
    ssecurity = base64.b64encode(b"s" * 16).decode()
    expected = base64.b64encode(hashlib.sha256(b"s" * 16 + raw).digest()).decode()
    assert crypto.signed_nonce(ssecurity, nonce) == expected
    assert crypto.password_hash("pässword") == hashlib.md5("pässword".encode()).hexdigest().upper()


def test_encrypted_params_pass_the_fakes_independent_check_and_response_roundtrip() -> None:
    ssecurity = base64.b64encode(os.urandom(16)).decode()
    fields = crypto.encrypt_params("/v2/homeroom/gethome", {"data": '{"fg":true}'}, ssecurity)
    assert list(fields) == ["data", "rc4_hash__", "signature", "ssecurity", "_nonce"]
    checked = FakeXiaomi().check_encrypted("/v2/homeroom/gethome", list(fields.items()), ssecurity)
    assert isinstance(checked, dict) and checked["data"] == '{"fg":true}'
    # a different path is a different signature
    assert FakeXiaomi().check_encrypted("/v2/other", list(fields.items()), ssecurity) == "invalid signature"
    body = crypto.encrypt_response(ssecurity, fields["_nonce"], {"code": 0, "result": {"x": 1}})
    assert crypto.decrypt_response(ssecurity, fields["_nonce"], body) == {"code": 0, "result": {"x": 1}}


def test_api_base_and_paths() -> None:
    assert api_base("https://{region}.api.io.mi.com/app", "cn") == "https://api.io.mi.com/app"
    assert api_base("https://{region}.api.io.mi.com/app", "de") == "https://de.api.io.mi.com/app"
    assert api_base("http://127.0.0.1:9/{region}/app", "cn") == "http://127.0.0.1:9/cn/app"
    assert (
        crypto.api_path("https://de.api.io.mi.com/app/v2/device/blt_get_beaconkey?x=1")
        == "/v2/device/blt_get_beaconkey"
    )
    assert crypto.api_path("http://127.0.0.1:9/sg/app/v2/homeroom/gethome") == "/v2/homeroom/gethome"
    assert crypto.parse_account_json('&&&START&&&{"code":0}') == {"code": 0}


# --------------------------------------------------------------------------------------------------
# the fake server really checks


async def test_fake_server_rejects_a_wrong_signature(fake: FakeXiaomi) -> None:
    async with client(fake) as c:
        s = await c.login(USER, PASSWORD)
    url = fake.api_url.replace("{region}", "de") + "/v2/homeroom/gethome"
    cookies = {"userId": s.user_id, "serviceToken": s.service_token, "yetAnotherServiceToken": s.service_token}
    headers = {"MIOT-ENCRYPT-ALGORITHM": "ENCRYPT-RC4"}

    def fields() -> dict[str, str]:
        return crypto.encrypt_params("/v2/homeroom/gethome", {"data": '{"fg":true}'}, s.ssecurity)

    async with aiohttp.ClientSession(cookies=cookies) as http:
        good = fields()
        async with http.post(url, params=good, headers=headers) as r:
            assert r.status == 200
            doc = crypto.decrypt_response(s.ssecurity, good["_nonce"], await r.text())
            assert [h["id"] for h in doc["result"]["homelist"]] == ["1001"]
        async with http.post(url, params=good, headers=headers) as r:  # the same nonce again
            assert r.status == 400 and await r.text() == "replayed nonce"
        bad = fields()
        sig = bytearray(base64.b64decode(bad["signature"]))
        sig[0] ^= 1
        bad["signature"] = base64.b64encode(bytes(sig)).decode()
        async with http.post(url, params=bad, headers=headers) as r:
            assert r.status == 400 and await r.text() == "invalid signature"
        swapped = fields()  # data encrypted for another nonce: signature no longer matches
        swapped["data"] = fields()["data"]
        async with http.post(url, data=swapped, headers=headers) as r:  # form body style
            assert r.status == 400 and await r.text() == "invalid signature"
        stale = crypto.encrypt_params(
            "/v2/homeroom/gethome",
            {"data": "{}"},
            s.ssecurity,
            nonce=crypto.make_nonce(now_ms=int((time.time() - 3600) * 1000)),
        )
        async with http.post(url, params=stale, headers=headers) as r:
            assert r.status == 400 and await r.text() == "stale nonce"
    assert fake.rejected == ["replayed nonce", "invalid signature", "invalid signature", "stale nonce"]


# --------------------------------------------------------------------------------------------------
# client API


async def test_login_and_ble_devices_across_homes_and_regions(fake: FakeXiaomi) -> None:
    async with client(fake) as c:
        s = await c.login(USER, PASSWORD, region="de")
        assert s.user_id == str(UID) and s.region == "de" and not s.expired()
        assert PASSWORD not in repr(s) and s.service_token not in repr(s)
        report = await c.ble_devices(["de", "us", "sg"])
    by_mac = {d.mac: d for d in report.devices}
    assert set(by_mac) == {MAC_BED, MAC_HALL, MAC_KITCHEN, MAC_CELLAR}  # the Wi-Fi plug is not BLE
    assert by_mac[MAC_BED].bindkey == KEY_BED and by_mac[MAC_BED].token == "6a2f1c"
    assert by_mac[MAC_BED].key_status == "ok" and by_mac[MAC_BED].region == "de"
    assert by_mac[MAC_HALL].bindkey is None and by_mac[MAC_HALL].key_status == "no_key_stored"
    assert by_mac[MAC_KITCHEN].shared and by_mac[MAC_KITCHEN].home_name == "Parents"
    assert by_mac[MAC_CELLAR].region == "us"
    assert [(r, h.id, h.shared) for r, h in report.homes] == [
        ("de", "1001", False),
        ("de", "2002", True),
        ("us", "3003", False),
    ]
    # the server saw the documented calls with the documented data
    calls = {(path, json.dumps(data, sort_keys=True)) for _, path, data in fake.api_calls}
    assert ("/v2/device/blt_get_beaconkey", json.dumps({"did": "blt.3.1bed", "pdid": 1}, sort_keys=True)) in calls
    dev_lists = [d for _, p, d in fake.api_calls if p == "/v2/home/home_device_list"]
    assert {
        "home_owner": OTHER_UID,
        "home_id": 2002,
        "limit": 200,
        "get_split_device": True,
        "support_smart_home": True,
    } in dev_lists
    # step 2 carried the documented fields (the hash is checked by the server)
    assert fake.login_posts[0]["qs"] == "%3Fsid%3Dxiaomiio%26_json%3Dtrue" and fake.login_posts[0]["_json"] == "true"


async def test_mac_filter_and_region(fake: FakeXiaomi) -> None:
    async with client(fake) as c:
        await c.login(USER, PASSWORD)
        only = await c.ble_devices(["us"], mac="e72e010a0b04")
        missing = await c.ble_devices(["de"], mac=MAC_CELLAR)  # it lives on the us server
    assert [d.mac for d in only.devices] == [MAC_CELLAR]
    assert missing.devices == []


async def test_wrong_password_locked_account_and_no_network(fake: FakeXiaomi) -> None:
    fake.add_account("locked@example.com", "pw", 42, locked=True)
    async with client(fake) as c:
        with pytest.raises(WrongCredentials, match="70016"):
            await c.login(USER, "wrong")
        with pytest.raises(WrongCredentials):
            await c.login("nobody@example.com", PASSWORD)
        with pytest.raises(AccountLocked, match="locked"):
            await c.login("locked@example.com", "pw")
    async with XiaomiCloud(account_url="http://127.0.0.1:1", api_url=fake.api_url) as c:
        with pytest.raises(NetworkError, match=r"cannot reach 127\.0\.0\.1:1"):
            await c.login(USER, PASSWORD)


async def test_captcha_is_shown_and_checked(fake: FakeXiaomi) -> None:
    fake.accounts[USER].captcha = True
    async with client(fake) as c:
        with pytest.raises(CaptchaRequired) as info:
            await c.login(USER, PASSWORD)
        assert info.value.url.startswith(fake.url + "/pass/getCode")

    answers = iter(["nope", fake.captcha_code])
    seen = []

    def ask(challenge):
        seen.append((challenge.retry, challenge.image.endswith(fake.captcha_code.encode())))
        return next(answers)

    async with client(fake) as c:
        s = await c.login(USER, PASSWORD, captcha=ask)
    assert s.user_id == str(UID)
    assert seen == [(False, True), (True, True)] and fake.captcha_images == 2

    async with client(fake) as c:
        with pytest.raises(WrongCaptcha):
            await c.login(USER, PASSWORD, captcha=lambda _: "never")


@pytest.mark.parametrize("method", ["email", "phone"])
async def test_two_factor_flow(fake: FakeXiaomi, method: str) -> None:
    fake.accounts[USER].two_factor = method
    async with client(fake) as c:
        with pytest.raises(TwoFactorRequired) as info:
            await c.login(USER, PASSWORD)
        assert "/identity/authStart" in info.value.url

    asked = []

    async def code(v):  # async prompts work too
        asked.append((v.method, v.retry))
        return "000000" if not v.retry else fake.verification_code

    async with client(fake) as c:
        s = await c.login(USER, PASSWORD, verification=code)
        report = await c.ble_devices(["de"])
    assert asked == [(method, False), (method, True)]
    assert s.user_id == str(UID) and s.c_user_id == f"c{UID}"
    assert len(report.devices) == 3 and fake.sent_codes == [fake.verification_code]

    fake.accounts[USER].two_factor = method
    async with client(fake) as c:
        with pytest.raises(WrongVerificationCode):
            await c.login(USER, PASSWORD, verification=lambda v: "111111")


async def test_an_unreachable_region_is_a_warning_unless_all_are(fake: FakeXiaomi) -> None:
    async with client(fake) as c:
        s = await c.login(USER, PASSWORD)
    async with XiaomiCloud(api_url="http://127.0.0.1:1/{region}/app", session=s) as c:
        with pytest.raises(NetworkError):  # every region unreachable: no network, not "no devices"
            await c.ble_devices(["cn", "de"])

    class Mixed(XiaomiCloud):
        def region_url(self, region: str) -> str:
            return "http://127.0.0.1:1/app" if region == "cn" else super().region_url(region)

    async with Mixed(api_url=fake.api_url, session=s) as c:
        report = await c.ble_devices(["cn", "de"])
    assert len(report.devices) == 3 and report.warnings[0].startswith("region cn: cannot reach")


async def test_revoked_session_is_reported(fake: FakeXiaomi) -> None:
    async with client(fake) as c:
        await c.login(USER, PASSWORD)
        fake.revoke_tokens()
        with pytest.raises(SessionExpired):
            await c.ble_devices(["de"])


# --------------------------------------------------------------------------------------------------
# CLI: login


def test_cli_login_caches_a_private_session_without_the_password(fake: FakeXiaomi, dirs: Path) -> None:
    result = cli_login(fake)
    assert result.exit_code == 0, result.output
    assert f"Logged in as Xiaomi user {UID}" in result.output
    path = session_file(dirs)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    doc = json.loads(text)
    assert doc["user_id"] == str(UID) and doc["ssecurity"] and doc["service_token"]
    assert doc["account_url"] == fake.url and doc["expires"] > time.time()
    assert PASSWORD not in text and crypto.password_hash(PASSWORD) not in text
    assert PASSWORD not in result.output and doc["service_token"] not in result.output

    status = CliRunner().invoke(cloud, ["status"])
    assert f"Xiaomi user {UID}" in status.output and "valid" in status.output
    assert doc["ssecurity"] not in status.output


def test_cli_login_with_captcha_and_email_code(fake: FakeXiaomi) -> None:
    fake.accounts[USER].captcha = True
    fake.accounts[USER].two_factor = "email"
    result = cli_login(fake, f"{USER}\n{PASSWORD}\nbad\n{fake.captcha_code}\n{fake.verification_code}\n")
    assert result.exit_code == 0, result.output
    assert "Open the image" in result.output and "not accepted" in result.output
    assert "verification code to the e-mail address" in result.output
    image = result.output.split("Open the image ", 1)[1].split()[0]
    assert fake.captcha_images == 2 and not Path(image).exists()  # shown twice, removed once answered


def test_cli_login_errors(fake: FakeXiaomi, dirs: Path) -> None:
    result = cli_login(fake, f"{USER}\nwrong password\n")
    assert result.exit_code == 1 and "wrong username or password" in result.output
    assert "wrong password" not in result.output.split("Password:")[-1]
    assert not session_file(dirs).exists()
    fake.add_account("frozen", "pw", 7, locked=True)
    result = CliRunner().invoke(cloud, ["login", *servers(fake), "-u", "frozen"], input="pw\n")
    assert result.exit_code == 1 and "locked" in result.output
    result = CliRunner().invoke(
        cloud, ["login", "--account-url", "http://127.0.0.1:1", "-u", USER], input=f"{PASSWORD}\n"
    )
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_servers_from_environment_and_cloud_toml(fake: FakeXiaomi, dirs: Path) -> None:
    env = {"MITHERM_CLOUD_ACCOUNT_URL": fake.url, "MITHERM_CLOUD_API_URL": fake.api_url}
    result = CliRunner().invoke(cloud, ["login", "-u", USER], input=f"{PASSWORD}\n", env=env)
    assert result.exit_code == 0, result.output
    session_file(dirs).unlink()
    (dirs / "config" / "cloud.toml").write_text(
        f'account-url = "{fake.url}"\napi_url = "{fake.api_url}"\nregion = "us"\n'
    )
    result = CliRunner().invoke(cloud, ["login", "-u", USER], input=f"{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cloud, ["keys", "--json"])
    assert result.exit_code == 0, result.output
    assert [d["mac"] for d in json.loads(result.output)["devices"]] == [MAC_CELLAR]  # region us from cloud.toml


# --------------------------------------------------------------------------------------------------
# CLI: keys


def test_keys_needs_a_valid_session(fake: FakeXiaomi, dirs: Path) -> None:
    result = CliRunner().invoke(cloud, ["keys", *servers(fake)])
    assert result.exit_code == 1 and "not logged in" in result.output
    assert cli_login(fake).exit_code == 0
    doc = json.loads(session_file(dirs).read_text())
    doc["expires"] = time.time() - 1
    session_file(dirs).write_text(json.dumps(doc))
    result = CliRunner().invoke(cloud, ["keys"])
    assert result.exit_code == 1 and "expired" in result.output
    # a token the server has revoked: the cache is dropped
    assert cli_login(fake).exit_code == 0
    fake.revoke_tokens()
    result = CliRunner().invoke(cloud, ["keys", "--region", "de"])
    assert result.exit_code == 1 and "mitherm cloud login" in result.output
    assert not session_file(dirs).exists()


def test_keys_table_masks_keys_and_flags_missing_keys(fake: FakeXiaomi) -> None:
    assert cli_login(fake).exit_code == 0
    result = CliRunner().invoke(cloud, ["keys"])  # all regions, servers from the session
    assert result.exit_code == 0, result.output
    out = result.output
    for mac in (MAC_BED, MAC_HALL, MAC_KITCHEN, MAC_CELLAR):
        assert mac in out
    assert "0f1e…e1f0" in out and KEY_BED not in out and KEY_CELLAR not in out
    assert "no key stored" in out and "Parents (shared)" in out
    assert "1 device(s) have no key stored" in out
    shown = CliRunner().invoke(cloud, ["keys", "--region", "de", "--show-keys"])
    assert KEY_BED in shown.output and KEY_KITCHEN in shown.output and MAC_CELLAR not in shown.output


def test_keys_json_and_mac_filter(fake: FakeXiaomi) -> None:
    assert cli_login(fake, f"{USER}\n{PASSWORD}\n", "--region", "de").exit_code == 0
    result = CliRunner().invoke(cloud, ["keys", "--json", "--mac", "a4-c1-38-0a-0b-03", "--show-keys"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["regions"] == ["de"]  # the login's default region
    [dev] = doc["devices"]
    assert dev["mac"] == MAC_KITCHEN and dev["bindkey"] == KEY_KITCHEN and dev["shared"] is True
    assert dev["model"] == "miaomiaoce.sensor_ht.t2" and dev["name"] == "Kitchen" and dev["did"] == "blt.3.2kit"
    masked = json.loads(CliRunner().invoke(cloud, ["keys", "--json", "--mac", MAC_HALL]).output)
    assert masked["devices"][0]["bindkey"] is None and masked["devices"][0]["key_status"] == "no_key_stored"
    result = CliRunner().invoke(cloud, ["keys", "--mac", MAC_CELLAR])
    assert result.exit_code == 1 and "--region all" in result.output


def test_keys_save_merges_and_reports_conflicts(fake: FakeXiaomi, dirs: Path) -> None:
    store_path = dirs / "keys.json"
    store = Keystore(store_path)
    store.add(MAC_KITCHEN, KEY_OLD, name="Kitchen", source="manual")
    store.save()
    assert cli_login(fake).exit_code == 0
    result = CliRunner().invoke(cloud, ["keys", "--region", "de", "--save", "--keystore", str(store_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"added     {MAC_BED}" in out
    assert f"conflict  {MAC_KITCHEN}" in out and "--save --replace" in out
    assert f"skipped   {MAC_HALL}" in out and "no key stored" in out
    assert "mitherm doctor --live --mac A4:C1:38:0A:0B:01" in out  # no capture to check against
    store = Keystore(store_path)
    bed = store.get(MAC_BED)
    assert bed is not None and bed.bindkey == KEY_BED and bed.source == "cloud" and bed.did == "blt.3.1bed"
    assert bed.model == "miaomiaoce.sensor_ht.t2" and bed.name == "Bedroom" and bed.token == "6a2f1c"
    assert store.get(MAC_KITCHEN).bindkey == KEY_OLD  # not silently overwritten
    assert MAC_HALL not in store
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600

    again = CliRunner().invoke(cloud, ["keys", "--region", "de", "--save", "--keystore", str(store_path)])
    assert "1 unchanged" in again.output and f"added     {MAC_BED}" not in again.output

    result = CliRunner().invoke(
        cloud, ["keys", "--mac", MAC_KITCHEN, "--save", "--replace", "--keystore", str(store_path)]
    )
    assert result.exit_code == 0 and "replaced" in result.output
    assert Keystore(store_path).get(MAC_KITCHEN).bindkey == KEY_KITCHEN


# --------------------------------------------------------------------------------------------------
# CLI: the doctor checks saved keys against frames


def _frames(mac: str, key: str, start: float, count: int = 3) -> list[Advertisement]:
    """A stock LYWSD03MMC: an idle frame and an encrypted temperature reading, ``count`` times."""
    le = mac_to_le(mac)
    out = []
    for i in range(count):
        idle = mibeacon.encode(mac_le=le, product_id=0x055B, frame_counter=2 * i, capability=0x08)
        data = mibeacon.encode(
            mac_le=le,
            product_id=0x055B,
            frame_counter=2 * i + 1,
            objects=[mibeacon.encode_object(0x1004, 21.5 + i)],
            key=parse_bindkey(key),
            ext_counter=i + 1,
        )
        for j, payload in enumerate((idle, data)):
            out.append(Advertisement(mac=mac, time=start + 20 * i + 10 * j, service_data={0xFE95: payload}, rssi=-60))
    return out


def _write_capture(path: Path, advs: list[Advertisement]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(write_jsonl_line(a) + "\n" for a in advs))
    return path


def test_keys_save_checks_keys_against_a_capture(fake: FakeXiaomi, dirs: Path) -> None:
    now = time.time() - 600
    capture = _write_capture(
        dirs / "cap.jsonl",
        _frames(MAC_BED, KEY_BED, now) + _frames(MAC_KITCHEN, KEY_OLD, now),  # kitchen still uses its old key
    )
    store_path = dirs / "keys.json"
    store = Keystore(store_path)
    store.add(MAC_KITCHEN, KEY_OLD, source="manual")
    store.save()
    assert cli_login(fake).exit_code == 0
    args = ["keys", "--region", "de", "--save", "--keystore", str(store_path), "--capture", str(capture), "--json"]
    result = CliRunner().invoke(cloud, args)
    assert result.exit_code == 0, result.output  # the wrong cloud key was not saved: the stored one works
    doc = json.loads(result.stdout)
    by_mac = {d["mac"]: d for d in doc["devices"]}
    assert by_mac[MAC_BED]["doctor"]["verdict"] == "ok"
    assert by_mac[MAC_KITCHEN]["saved"]["status"] == "conflict"
    assert by_mac[MAC_KITCHEN]["doctor"]["verdict"] == "wrong_key"
    assert by_mac[MAC_KITCHEN]["doctor"]["stored_key_verdict"] == "ok"
    assert "doctor" not in by_mac[MAC_HALL]
    assert KEY_BED not in result.stdout and KEY_OLD not in result.stdout  # masked without --show-keys

    text = CliRunner().invoke(cloud, args[:-1])
    assert f"{MAC_KITCHEN}  wrong_key (the key already stored: ok)" in text.output
    assert "keep yours (no --replace)" in text.output
    # --capture without --save checks the cloud keys without storing anything
    listed = CliRunner().invoke(cloud, ["keys", "--mac", MAC_KITCHEN, "--capture", str(capture)])
    assert listed.exit_code == 1 and f"{MAC_KITCHEN}  wrong_key" in listed.output


def test_keys_save_uses_a_recent_gateway_capture(fake: FakeXiaomi, dirs: Path) -> None:
    _write_capture(default_frames_snapshot(), _frames(MAC_BED, KEY_OLD, time.time() - 300))
    _write_capture(dirs / "data" / "demo" / "capture.jsonl", _frames(MAC_BED, KEY_BED, time.time() - 300))
    old = time.time() - 7 * 3600  # older than the gateway's snapshot and not recent: ignored
    os.utime(dirs / "data" / "demo" / "capture.jsonl", (old, old))
    store_path = dirs / "keys.json"
    assert cli_login(fake).exit_code == 0
    result = CliRunner().invoke(cloud, ["keys", "--region", "de", "--save", "--keystore", str(store_path)])
    assert result.exit_code == 1, result.output
    assert f"Doctor, against {default_frames_snapshot()}" in result.output
    assert f"{MAC_BED}  wrong_key" in result.output
    # the kitchen sensor is not in the capture: undecided, so the live doctor is suggested
    assert f"{MAC_KITCHEN}  device_not_seen" in result.output
    assert f"mitherm doctor --live --mac {MAC_KITCHEN}" in result.output


def test_logout(fake: FakeXiaomi, dirs: Path) -> None:
    assert cli_login(fake).exit_code == 0
    result = CliRunner().invoke(cloud, ["logout"])
    assert result.exit_code == 0 and not session_file(dirs).exists()
    assert "Not logged in" in CliRunner().invoke(cloud, ["status"]).output
    assert CloudSession.load(session_file(dirs)) is None

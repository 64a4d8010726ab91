from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from mitherm.commands.keys import keys as keys_group
from mitherm.keystore import (
    KeyConflict,
    Keystore,
    KeystoreError,
    mask_key,
    normalize_bindkey,
    parse_token_extractor_output,
    parse_token_extractor_report,
)

MAC = "A4:C1:38:12:34:56"
KEY = "e9ea895fac7991e42c8d1f8d3b2af3a8"
KEY2 = "00112233445566778899aabbccddeeff"
LEGACY_KEY = "b853075158487ca39a5b5ea9"

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------ keys and MACs


@pytest.mark.parametrize(
    "text",
    [
        KEY,
        KEY.upper(),
        " e9 ea 89 5f ac 79 91 e4 2c 8d 1f 8d 3b 2a f3 a8 ",
        "E9:EA:89:5F:AC:79:91:E4:2C:8D:1F:8D:3B:2A:F3:A8",
        "0x" + KEY,
        "0xe9, 0xea, 0x89, 0x5f, 0xac, 0x79, 0x91, 0xe4, 0x2c, 0x8d, 0x1f, 0x8d, 0x3b, 0x2a, 0xf3, 0xa8",
    ],
)
def test_normalize_bindkey_spellings(text: str) -> None:
    assert normalize_bindkey(text) == KEY


def test_normalize_bindkey_legacy_length() -> None:
    assert normalize_bindkey(LEGACY_KEY.upper()) == LEGACY_KEY


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (KEY[:-2], "has 30 hex digits: expected 32"),
        (KEY + "00", "has 34 hex digits"),
        (KEY[:-1] + "g", "'g', which is not a hex digit"),
        ("f" * 32, "all Fs, which the Xiaomi cloud returns when it has no key"),
        ("0" * 24, "all 0s"),
    ],
)
def test_normalize_bindkey_errors(text: str, message: str) -> None:
    with pytest.raises(KeystoreError, match=message) as info:
        normalize_bindkey(text)
    assert KEY[4:-4] not in str(info.value)


def test_mask_key() -> None:
    assert mask_key(KEY) == "e9ea…f3a8"
    assert mask_key(None) == "-"
    assert mask_key("abc") == "…"


@pytest.mark.parametrize("spelling", ["A4:C1:38:12:34:56", "a4c138123456", "A4-C1-38-12-34-56", "a4c1.3812.3456"])
def test_mac_spellings_map_to_one_entry(tmp_path, spelling: str) -> None:
    ks = Keystore(tmp_path / "keys.json")
    assert ks.add(spelling, KEY) == "added"
    assert ks.add(MAC, KEY) == "unchanged"
    entry = ks.get(spelling.lower())
    assert entry is not None and entry.mac == MAC and entry.bindkey == KEY
    assert ks.keys() == {MAC: KEY}
    assert MAC in ks and "a4c138123456" in ks and "nope" not in ks


def test_add_rejects_bad_mac(tmp_path) -> None:
    ks = Keystore(tmp_path / "keys.json")
    with pytest.raises(KeystoreError, match="not a Bluetooth address"):
        ks.add("A4:C1:38:12:34", KEY)
    with pytest.raises(KeystoreError, match="source must be one of"):
        ks.add(MAC, KEY, source="guess")
    assert len(ks) == 0


def test_conflicts_and_updates(tmp_path) -> None:
    ks = Keystore(tmp_path / "keys.json")
    assert ks.add(MAC, KEY, name="Bedroom") == "added"
    with pytest.raises(KeyConflict) as info:
        ks.add(MAC, KEY2)
    assert info.value.mac == MAC
    assert "e9ea…f3a8" in str(info.value) and KEY not in str(info.value)
    assert ks.get(MAC).bindkey == KEY  # unchanged after the conflict
    assert ks.add(MAC, KEY, name="Bedroom") == "unchanged"
    assert ks.add(MAC, KEY, name="Kitchen", token="0A" * 12) == "updated"
    assert ks.get(MAC).name == "Kitchen" and ks.get(MAC).token == "0a" * 12
    assert ks.add(MAC, KEY2, overwrite=True, source="activation") == "replaced"
    entry = ks.get(MAC)
    assert (entry.bindkey, entry.source, entry.name) == (KEY2, "activation", "Kitchen")


def test_remove_and_entries(tmp_path) -> None:
    ks = Keystore(tmp_path / "keys.json")
    ks.add("A4:C1:38:00:00:02", KEY2)
    ks.add("A4:C1:38:00:00:01", KEY)
    assert [e.mac for e in ks.entries()] == ["A4:C1:38:00:00:01", "A4:C1:38:00:00:02"]
    assert ks.remove("a4c138000001") is True
    assert ks.remove("a4c138000001") is False
    assert ks.keys() == {"A4:C1:38:00:00:02": KEY2}


# ------------------------------------------------------------------ file


def test_missing_file_is_empty(tmp_path) -> None:
    ks = Keystore(tmp_path / "none" / "keys.json")
    assert ks.entries() == [] and ks.keys() == {}
    assert ks.reload_if_changed() is False


def test_default_path_from_config_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "cfg"))
    assert Keystore().path == tmp_path / "cfg" / "keys.json"


@posix_only
def test_save_layout_and_mode(tmp_path) -> None:
    path = tmp_path / "cfg" / "keys.json"
    ks = Keystore(path)
    ks.add(MAC, KEY, name="Bedroom", token="ab" * 16)
    ks.save()
    assert mode(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    dev = doc["devices"][MAC]
    assert (dev["bindkey"], dev["name"], dev["token"], dev["source"]) == (KEY, "Bedroom", "ab" * 16, "manual")
    assert dev["added"].startswith("20")
    again = Keystore(path)
    assert again.get(MAC) == ks.get(MAC)


@posix_only
def test_too_open_file_is_fixed(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"version": 1, "devices": {"a4c138123456": {"bindkey": KEY.upper()}}}))
    os.chmod(path, 0o644)
    ks = Keystore(path)
    assert mode(path) == 0o600  # fixed on load
    assert ks.keys() == {MAC: KEY}
    os.chmod(path, 0o666)
    ks.save()
    assert mode(path) == 0o600


def test_corrupt_and_wrong_version(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(KeystoreError, match="not valid JSON"):
        Keystore(path)
    path.write_text(json.dumps({"version": 7, "devices": {}}))
    with pytest.raises(KeystoreError, match="version 7"):
        Keystore(path)
    path.write_text(json.dumps({"version": 1, "devices": {MAC: {"bindkey": "123"}}}))
    with pytest.raises(KeystoreError, match="3 hex digits"):
        Keystore(path)


def test_plain_mapping_is_accepted(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"a4:c1:38:12:34:56": KEY}))
    assert Keystore(path).keys() == {MAC: KEY}


def test_reload_if_changed(tmp_path) -> None:
    path = tmp_path / "keys.json"
    gateway = Keystore(path)
    assert gateway.keys() == {}
    cli = Keystore(path)
    cli.add(MAC, KEY)
    cli.save()
    assert gateway.reload_if_changed() is True
    assert gateway.keys() == {MAC: KEY}
    assert gateway.reload_if_changed() is False
    cli.add("A4:C1:38:00:00:01", KEY2)
    cli.save()
    assert gateway.reload_if_changed() is True
    assert len(gateway.keys()) == 2
    path.unlink()
    assert gateway.reload_if_changed() is True
    assert gateway.keys() == {}


# ------------------------------------------------------------------ token extractor

EXTRACTOR_TEXT = """\
Logging in...
Logged in.

Devices found for server "de" @ home "150001234567":
   ---------
   NAME:     Bedroom thermometer
   ID:       blt.3.1abc2def3gh00
   BLE KEY:  E9EA895FAC7991E42C8D1F8D3B2AF3A8
   MAC:      A4:C1:38:12:34:56
   TOKEN:    0123456789abcdef01234567
   MODEL:    miaomiaoce.sensor_ht.t2
   ---------
   NAME:     Hall clock
   ID:       blt.3.1xyz
   BLE KEY:  ffffffffffffffffffffffffffffffff
   MAC:      E7:2E:01:00:00:02
   MODEL:    miaomiaoce.clock.ht02
   ---------
   NAME:     Vacuum
   ID:       123456789
   MAC:      50:EC:50:00:00:03
   IP:       192.168.1.20
   TOKEN:    00112233445566778899aabbccddeeff
   MODEL:    roborock.vacuum.s5
   ---------
   NAME:     Legacy sensor
   ID:       blt.3.old
   BLE KEY:  B853075158487CA39A5B5EA9
   MAC:      4C:65:A8:00:00:04
   MODEL:    cleargrass.sensor_ht.dk1
   ---------

Press ENTER to finish
"""


def test_parse_extractor_text() -> None:
    entries, skipped = parse_token_extractor_report(EXTRACTOR_TEXT)
    by_mac = {e.mac: e for e in entries}
    assert list(by_mac) == ["A4:C1:38:12:34:56", "E7:2E:01:00:00:02", "4C:65:A8:00:00:04"]
    bedroom = by_mac[MAC]
    assert (bedroom.bindkey, bedroom.name, bedroom.did, bedroom.model, bedroom.token, bedroom.source) == (
        KEY,
        "Bedroom thermometer",
        "blt.3.1abc2def3gh00",
        "miaomiaoce.sensor_ht.t2",
        "0123456789abcdef01234567",
        "cloud",
    )
    clock = by_mac["E7:2E:01:00:00:02"]
    assert clock.bindkey is None and clock.note == "no key stored in the cloud"
    assert by_mac["4C:65:A8:00:00:04"].bindkey == LEGACY_KEY
    assert [(s.name, s.mac) for s in skipped] == [("Vacuum", "50:EC:50:00:00:03")]
    assert "no BLE key" in skipped[0].reason
    assert parse_token_extractor_output(EXTRACTOR_TEXT) == entries


def test_parse_extractor_text_without_separators_and_crlf() -> None:
    text = "NAME: a\r\nMAC: a4c138000001\r\nBLE KEY: " + KEY + "\r\nNAME: b\r\nMAC: A4C138000002\r\nBLE KEY: " + KEY2
    entries = parse_token_extractor_output(text)
    assert [(e.name, e.mac, e.bindkey) for e in entries] == [
        ("a", "A4:C1:38:00:00:01", KEY),
        ("b", "A4:C1:38:00:00:02", KEY2),
    ]


def test_parse_extractor_json_flat_and_wrapped() -> None:
    devices = [
        {"name": "One", "did": "blt.3.1", "mac": "A4:C1:38:00:00:01", "model": "m", "bindkey": KEY},
        {"name": "Two", "did": "blt.3.2", "mac": "A4:C1:38:00:00:02", "ble_key": KEY2, "token": "aa" * 12},
        {"name": "Three", "mac": "A4:C1:38:00:00:03", "beaconkey": "0" * 32},
        {"name": "Wifi plug", "did": "987", "mac": "50:EC:50:00:00:09", "token": "bb" * 16},
        {"name": "No mac", "did": "blt.3.4", "beaconkey": KEY},
        {"name": "Bad", "mac": "A4:C1:38:00:00:05", "bindkey": "1234"},
    ]
    for text in (json.dumps(devices), json.dumps({"result": {"devices": devices}})):
        entries, skipped = parse_token_extractor_report(text)
        assert [(e.mac, e.bindkey, e.did) for e in entries] == [
            ("A4:C1:38:00:00:01", KEY, "blt.3.1"),
            ("A4:C1:38:00:00:02", KEY2, "blt.3.2"),
            ("A4:C1:38:00:00:03", None, None),
            ("A4:C1:38:00:00:05", None, None),
        ]
        assert entries[1].token == "aa" * 12
        assert entries[2].note == "no key stored in the cloud"
        assert "4 hex digits" in entries[3].note
        assert [(s.name, s.reason) for s in skipped] == [
            ("Wifi plug", "no BLE key (not a BLE device, or no key listed)"),
            ("No mac", "no MAC address listed"),
        ]


def test_parse_extractor_json_export_with_ble_data() -> None:
    export = [
        {
            "username": "someone",
            "server": "de",
            "homes": [
                {
                    "home_id": 7,
                    "devices": [
                        {
                            "did": "blt.3.abc",
                            "name": "Sensor",
                            "mac": "A4:C1:38:AA:BB:CC",
                            "model": "miaomiaoce.sensor_ht.t2",
                            "BLE_DATA": {"beaconkey": KEY.upper()},
                        }
                    ],
                }
            ],
        }
    ]
    (entry,) = parse_token_extractor_output(json.dumps(export, indent=2))
    assert (entry.mac, entry.bindkey, entry.name) == ("A4:C1:38:AA:BB:CC", KEY, "Sensor")


def test_parse_extractor_bad_json() -> None:
    with pytest.raises(KeystoreError, match="looks like JSON"):
        parse_token_extractor_output('[{"mac": ')


# ------------------------------------------------------------------ CLI


@pytest.fixture
def cli(tmp_path):
    path = tmp_path / "cfg" / "keys.json"
    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(keys_group, ["--keystore", str(path), *args], input=input)

    run.path = path  # type: ignore[attr-defined]
    return run


def test_cli_add_list_remove(cli) -> None:
    r = cli("add", "a4-c1-38-12-34-56", KEY.upper(), "--name", "Bedroom")
    assert r.exit_code == 0, r.output
    assert "Added: A4:C1:38:12:34:56" in r.output and "e9ea…f3a8" in r.output
    assert KEY not in r.output
    if os.name == "posix":
        assert mode(cli.path) == 0o600

    r = cli("list")
    assert r.exit_code == 0
    assert "A4:C1:38:12:34:56" in r.output and "e9ea…f3a8" in r.output and "Bedroom" in r.output
    assert KEY not in r.output

    r = cli("list", "--json")
    (row,) = json.loads(r.output)
    assert (row["mac"], row["bindkey"], row["name"]) == (MAC, "e9ea…f3a8", "Bedroom")
    r = cli("list", "--json", "--show-keys")
    assert json.loads(r.output)[0]["bindkey"] == KEY

    r = cli("remove", "a4c138123456")
    assert r.exit_code == 0 and "Removed A4:C1:38:12:34:56" in r.output
    assert json.loads(cli.path.read_text())["devices"] == {}
    r = cli("list")
    assert "No keys in" in r.output


def test_cli_errors_are_one_line(cli) -> None:
    cases = [
        (("add", "A4:C1:38", KEY), "not a Bluetooth address"),
        (("add", MAC, "12345"), "has 5 hex digits"),
        (("remove", MAC), "is not in"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 1, r.output
        assert isinstance(r.exception, SystemExit)
        assert message in r.output and "Traceback" not in r.output
        assert r.output.startswith("Error: ") and r.output.count("\n") == 1


def test_cli_conflict_and_force(cli) -> None:
    assert cli("add", MAC, KEY).exit_code == 0
    r = cli("add", MAC, KEY2)
    assert r.exit_code == 1
    assert "already has a different key (e9ea…f3a8)" in r.output and "--force" in r.output
    assert json.loads(cli.path.read_text())["devices"][MAC]["bindkey"] == KEY
    r = cli("add", MAC, KEY2, "--force")
    assert r.exit_code == 0 and r.output.startswith("Replaced")
    assert json.loads(cli.path.read_text())["devices"][MAC]["bindkey"] == KEY2


def test_cli_keystore_from_env(tmp_path, monkeypatch) -> None:
    path = tmp_path / "env-keys.json"
    monkeypatch.setenv("MITHERM_KEYSTORE", str(path))
    r = CliRunner().invoke(keys_group, ["add", MAC, KEY])
    assert r.exit_code == 0, r.output
    assert Keystore(path).keys() == {MAC: KEY}


def test_cli_import(cli, tmp_path) -> None:
    assert cli("add", "4C:65:A8:00:00:04", KEY2).exit_code == 0  # conflicts with the file's legacy key
    assert cli("add", MAC, KEY).exit_code == 0  # same key as in the file
    src = tmp_path / "extractor.txt"
    src.write_text(EXTRACTOR_TEXT)
    r = cli("import", str(src))
    assert r.exit_code == 0, r.output
    assert "0 added, 1 updated, 0 unchanged, 1 conflicts, 2 skipped" in r.output
    assert "updated   A4:C1:38:12:34:56  Bedroom thermometer" in r.output  # name/model filled in
    assert "conflict  4C:65:A8:00:00:04" in r.output and "use --force" in r.output
    assert "no key stored in the cloud" in r.output and "Vacuum" in r.output
    assert KEY not in r.output.lower() and LEGACY_KEY not in r.output.lower()

    r = cli("import", "-", "--force", input=EXTRACTOR_TEXT)
    assert r.exit_code == 0, r.output
    assert "0 added, 1 updated, 1 unchanged, 0 conflicts, 2 skipped" in r.output
    assert "replaced  4C:65:A8:00:00:04" in r.output
    ks = Keystore(cli.path)
    assert ks.keys() == {MAC: KEY, "4C:65:A8:00:00:04": LEGACY_KEY}
    assert ks.get("4C:65:A8:00:00:04").source == "cloud"
    assert ks.get(MAC).model == "miaomiaoce.sensor_ht.t2"  # filled in from the import


def test_cli_import_json_into_empty_store(cli) -> None:
    devices = [{"name": "One", "mac": "a4c138000001", "bindkey": KEY}]
    r = cli("import", "-", input=json.dumps(devices))
    assert r.exit_code == 0, r.output
    assert "1 added, 0 updated, 0 unchanged, 0 conflicts, 0 skipped" in r.output
    assert Keystore(cli.path).keys() == {"A4:C1:38:00:00:01": KEY}


def test_cli_import_nothing_found(cli) -> None:
    r = cli("import", "-", input="Unable to log in.\n")
    assert r.exit_code == 1
    assert "no devices found" in r.output
    assert not cli.path.exists()

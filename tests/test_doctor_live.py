"""`mitherm doctor --live` over the simulator's virtual radio: it listens until it can decide."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mitherm.cli import main
from mitherm.sim.house import builtin_house


def _house_file(tmp_path):
    house = builtin_house("minimal")
    path = tmp_path / "house.toml"
    path.write_text(house.to_toml())
    stock = next(d for d in house.devices if d.kind == "stock")
    return path, stock


def test_live_doctor_decides_ok_with_the_right_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "cfg"))
    path, stock = _house_file(tmp_path)
    result = CliRunner().invoke(
        main,
        [
            "doctor",
            "--live",
            "--source",
            f"sim:{path}",
            "--mac",
            stock.address.lower().replace(":", "-"),
            "--key",
            stock.bindkey,
            "--json",
            "--timeout",
            "60",
        ],
    )
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["verdict"] == "ok", out
    assert out["frames"]["decrypted"] >= 1
    assert result.exit_code == 0


def test_live_doctor_decides_wrong_key_after_two_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "cfg"))
    path, stock = _house_file(tmp_path)
    wrong = "00112233445566778899aabbccddeeff"
    result = CliRunner().invoke(
        main,
        [
            "doctor",
            "--live",
            "--source",
            f"sim:{path}",
            "--mac",
            stock.address,
            "--key",
            wrong,
            "--json",
            "--timeout",
            "60",
        ],
    )
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["verdict"] == "wrong_key", out
    assert out["frames"]["failed"] >= 2 and out["frames"]["decrypted"] == 0
    assert result.exit_code == 1


def test_live_doctor_gives_up_at_the_timeout_with_the_current_verdict(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "cfg"))
    path, _stock = _house_file(tmp_path)
    result = CliRunner().invoke(
        main,
        [
            "doctor",
            "--live",
            "--source",
            f"sim:{path}",
            "--mac",
            "11:22:33:44:55:66",
            "--key",
            "00112233445566778899aabbccddeeff",
            "--json",
            "--timeout",
            "2",
        ],
    )
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["verdict"] == "device_not_seen"
    assert {d["mac"] for d in out["seen_devices"]}  # the devices that were heard are listed
    assert result.exit_code == 1

"""`mitherm doctor --live` over the simulator's virtual radio: it listens until it can decide."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mitherm.cli import main
from mitherm.sim.house import builtin_house

WRONG = "00112233445566778899aabbccddeeff"


def _live_doctor(tmp_path, monkeypatch, mac: str | None, key: str | None, timeout: float):
    """Run the live doctor on the built-in minimal house; returns (result, JSON, the stock device)."""
    monkeypatch.setenv("MITHERM_CONFIG_DIR", str(tmp_path / "cfg"))
    house = builtin_house("minimal")
    path = tmp_path / "house.toml"
    path.write_text(house.to_toml())
    stock = next(d for d in house.devices if d.kind == "stock")
    args = ["doctor", "--live", "--source", f"sim:{path}", "--json", "--timeout", str(timeout)]
    args += ["--mac", mac or stock.address.lower().replace(":", "-"), "--key", key or stock.bindkey]
    result = CliRunner().invoke(main, args)
    return result, json.loads(result.output.strip().splitlines()[-1]), stock


def test_live_doctor_decides_ok_with_the_right_key(tmp_path, monkeypatch):
    result, out, _stock = _live_doctor(tmp_path, monkeypatch, None, None, 60)
    assert out["verdict"] == "ok", out
    assert out["frames"]["decrypted"] >= 1
    assert result.exit_code == 0


def test_live_doctor_decides_wrong_key_after_two_failures(tmp_path, monkeypatch):
    result, out, _stock = _live_doctor(tmp_path, monkeypatch, None, WRONG, 60)
    assert out["verdict"] == "wrong_key", out
    assert out["frames"]["failed"] >= 2 and out["frames"]["decrypted"] == 0
    assert result.exit_code == 1


def test_live_doctor_gives_up_at_the_timeout_with_the_current_verdict(tmp_path, monkeypatch):
    result, out, _stock = _live_doctor(tmp_path, monkeypatch, "11:22:33:44:55:66", WRONG, 2)
    assert out["verdict"] == "device_not_seen"
    assert {d["mac"] for d in out["seen_devices"]}  # the devices that were heard are listed
    assert result.exit_code == 1

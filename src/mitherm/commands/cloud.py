"""``mitherm cloud``: log in to the Xiaomi cloud and fetch (and save, and check) BLE bindkeys."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import tomllib
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from mitherm.cloud import (
    DEFAULT_ACCOUNT_URL,
    DEFAULT_API_URL,
    SERVERS,
    Captcha,
    CloudDevice,
    CloudError,
    CloudReport,
    CloudSession,
    SessionExpired,
    Verification,
    XiaomiCloud,
    default_session_path,
)
from mitherm.commands.device import _keystore, _keystore_option
from mitherm.keystore import KeyConflict, Keystore, KeystoreError, mask_key
from mitherm.mac import InvalidMac, normalize_mac
from mitherm.paths import config_dir, data_dir, default_frames_snapshot

__all__ = ["cloud"]

T = TypeVar("T")
CONFIG_FILE = "cloud.toml"
#: A capture the gateway wrote within this many seconds is "recent" enough to check keys against.
RECENT_CAPTURE = 6 * 3600
#: Doctor verdicts that prove a key wrong (the keys command exits 1 on them).
FAILING_VERDICTS = frozenset({"wrong_key", "key_outdated", "key_of_other_device", "looks_like_token", "invalid_key"})
_UNDECIDED = frozenset({"device_not_seen", "no_encrypted_frames"})


def _config() -> dict[str, Any]:
    """``cloud.toml`` in the config directory: account_url, api_url, region (all optional)."""
    path = config_dir() / CONFIG_FILE
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None
    return {k.replace("-", "_"): v for k, v in doc.items()}


def _servers(account_url: str | None, api_url: str | None, session: CloudSession | None) -> tuple[str, str]:
    """Flag or environment, then cloud.toml, then the cached session, then the defaults."""
    cfg = _config()
    account = account_url or cfg.get("account_url") or (session.account_url if session else None)
    api = api_url or cfg.get("api_url") or (session.api_url if session else None)
    return str(account or DEFAULT_ACCOUNT_URL), str(api or DEFAULT_API_URL)


def _server_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--api-url",
        envvar="MITHERM_CLOUD_API_URL",
        help=f"API base; {{region}} is replaced, and dropped with its dot for cn (default {DEFAULT_API_URL}; "
        "env MITHERM_CLOUD_API_URL; key api_url in cloud.toml).",
    )(f)
    f = click.option(
        "--account-url",
        envvar="MITHERM_CLOUD_ACCOUNT_URL",
        help=f"Account server (default {DEFAULT_ACCOUNT_URL}; env MITHERM_CLOUD_ACCOUNT_URL; key account_url "
        "in cloud.toml).",
    )(f)
    return f


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except CloudError as e:
        raise click.ClickException(str(e)) from None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


def _load_session() -> CloudSession:
    path = default_session_path()
    try:
        session = CloudSession.load(path)
    except CloudError as e:
        raise click.ClickException(str(e)) from None
    if session is None:
        raise click.ClickException("not logged in to the Xiaomi cloud: run `mitherm cloud login` first")
    if session.expired():
        raise click.ClickException(
            f"the Xiaomi cloud session expired on {_when(session.expires)}: run `mitherm cloud login` again"
        )
    return session


@click.group("cloud")
def cloud() -> None:
    """Fetch bindkeys from the Xiaomi cloud (the keys Mi Home gave your sensors).

    Log in once with `mitherm cloud login`; the session (not the password) is cached in the config
    directory with mode 0600. Then `mitherm cloud keys --save` lists your BLE devices, stores their
    keys and checks them against recent frames."""


# --------------------------------------------------------------------------------------------- login


def _ask_captcha(challenge: Captcha) -> str:
    suffix = ".png" if "png" in (challenge.content_type or "") else ".jpg"
    fd, name = tempfile.mkstemp(prefix="mitherm-captcha-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(challenge.image)
    if challenge.retry:
        click.echo("That captcha was not accepted; here is a new one.", err=True)
    click.echo(f"Xiaomi asks for a captcha. Open the image {name}", err=True)
    click.echo(f"  (or the address {challenge.url} in the browser session that loaded it)", err=True)
    try:
        return click.prompt("Captcha text", err=True).strip()
    finally:
        Path(name).unlink(missing_ok=True)


def _ask_code(challenge: Verification) -> str:
    where = "e-mail address" if challenge.method == "email" else "phone (SMS)"
    if challenge.retry:
        click.echo("That code was not accepted; try again.", err=True)
    else:
        click.echo(f"Xiaomi sent a verification code to the {where} of the account.", err=True)
    return click.prompt("Verification code", err=True).strip()


@cloud.command("login")
@click.option("-u", "--username", help="Xiaomi account: e-mail, phone number with country code, or account ID.")
@click.option(
    "--region",
    type=click.Choice([*SERVERS, "all"]),
    help="Default region for `cloud keys` (the one chosen in Mi Home); default: all.",
)
@_server_options
def login_cmd(username: str | None, region: str | None, account_url: str | None, api_url: str | None) -> None:
    """Log in with username and password (asked without echo, never stored).

    Answers captcha and e-mail/SMS verification prompts when Xiaomi asks for them."""
    account, api = _servers(account_url, api_url, None)
    region = region or _config().get("region")
    if username is None:
        username = click.prompt("Xiaomi account (e-mail, phone or account ID)", err=True).strip()
    password = click.prompt("Password", hide_input=True, err=True)

    async def go() -> CloudSession:
        async with XiaomiCloud(account_url=account, api_url=api) as client:
            return await client.login(
                username,
                password,
                captcha=_ask_captcha,
                verification=_ask_code,
                region=None if region == "all" else region,
            )

    session = _run(go())
    try:
        path = session.save()
    except OSError as e:
        raise click.ClickException(f"logged in, but cannot write the session file: {e.strerror or e}") from None
    click.echo(
        f"Logged in as Xiaomi user {session.user_id}. Session saved to {path} (mode 0600), "
        f"valid until {_when(session.expires)}.\nNext: mitherm cloud keys --save"
    )


@cloud.command("logout")
def logout_cmd() -> None:
    """Forget the cached cloud session."""
    path = default_session_path()
    try:
        path.unlink()
    except FileNotFoundError:
        click.echo("Not logged in.")
        return
    click.echo(f"Removed {path}.")


@cloud.command("status")
def status_cmd() -> None:
    """Show the cached cloud session (never its secrets)."""
    try:
        session = CloudSession.load()
    except CloudError as e:
        raise click.ClickException(str(e)) from None
    if session is None:
        click.echo("Not logged in (run `mitherm cloud login`).")
        return
    state = "expired" if session.expired() else "valid"
    click.echo(
        f"Xiaomi user {session.user_id} ({session.username or '?'}), region {session.region or 'all'}, "
        f"session {state} until {_when(session.expires)}; account {session.account_url}, API {session.api_url}"
    )


# --------------------------------------------------------------------------------------------- keys


def _recent_gateway_capture(now: float | None = None) -> Path | None:
    """The newest frames the gateway (or the demo) wrote recently, if any."""
    now = time.time() if now is None else now
    best: tuple[float, Path] | None = None
    # `mitherm run` snapshots its recent frames; `mitherm demo` writes a capture
    for path in (default_frames_snapshot(), data_dir() / "demo" / "capture.jsonl"):
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if now - mtime <= RECENT_CAPTURE and (best is None or mtime > best[0]):
            best = (mtime, path)
    return best[1] if best else None


def _add(store: Keystore, dev: CloudDevice, replace: bool) -> str:
    assert dev.mac is not None and dev.bindkey is not None
    kw: dict[str, Any] = {"name": dev.name, "source": "cloud", "overwrite": replace, "model": dev.model, "did": dev.did}
    try:
        return store.add(dev.mac, dev.bindkey, token=dev.token, **kw)
    except KeyConflict:
        raise
    except KeystoreError:
        if dev.token is None:
            raise
        return store.add(dev.mac, dev.bindkey, **kw)  # an odd token must not cost the key


def _save(store: Keystore, devices: list[CloudDevice], replace: bool) -> dict[str, dict[str, Any]]:
    """Merge the cloud keys into the store; per MAC: status (and the stored key on a conflict)."""
    outcome: dict[str, dict[str, Any]] = {}
    for dev in devices:
        if dev.mac is None:
            outcome[dev.did] = {"status": "skipped", "reason": "the cloud lists no MAC for this device"}
            continue
        if dev.bindkey is None:
            outcome[dev.mac] = {"status": "skipped", "reason": dev.note or "no key stored in the cloud"}
            continue
        try:
            status = _add(store, dev, replace)
        except KeyConflict as e:
            outcome[dev.mac] = {"status": "conflict", "stored": e.existing}
            continue
        except KeystoreError as e:
            outcome[dev.mac] = {"status": "skipped", "reason": str(e)}
            continue
        outcome[dev.mac] = {"status": status}
    return outcome


def _doctor(devices: list[CloudDevice], saved: dict[str, dict[str, Any]], capture: Path | None) -> dict[str, Any]:
    """Check every saved (or conflicting) key against the capture's frames."""
    checks: dict[str, Any] = {}
    if capture is None:
        return checks
    from mitherm.captures import CaptureError, read_capture
    from mitherm.doctor import diagnose
    from mitherm.framecache import FrameCache

    cache = FrameCache()
    try:
        cache.extend(read_capture(str(capture)))
    except (CaptureError, OSError) as e:
        raise click.ClickException(f"cannot read the capture {capture}: {e}") from None
    for dev in devices:
        if dev.mac is None or dev.bindkey is None or dev.mac not in saved:
            continue
        entry = saved[dev.mac]
        if entry["status"] == "skipped":
            continue
        dx = diagnose(cache, dev.mac, dev.bindkey)
        check: dict[str, Any] = {"verdict": dx.verdict.value, "advice": dx.advice}
        if entry["status"] == "conflict":
            check["stored_key_verdict"] = diagnose(cache, dev.mac, entry["stored"]).verdict.value
        checks[dev.mac] = check
    return checks


def _device_json(dev: CloudDevice, show_keys: bool, saved: dict[str, Any] | None, check: Any) -> dict[str, Any]:
    d = dev.to_json()
    if not show_keys:
        d["bindkey"] = mask_key(dev.bindkey) if dev.bindkey else None
        d["token"] = mask_key(dev.token) if dev.token else None
    if saved is not None:
        d["saved"] = {k: (v if k != "stored" or show_keys else mask_key(v)) for k, v in saved.items()}
    if check is not None:
        d["doctor"] = check
    return d


def _print_table(report: CloudReport, show_keys: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="BLE devices in the Xiaomi cloud", title_justify="left")
    for col in ("Region", "Home", "MAC", "Model", "Name", "Bindkey", "Token"):
        table.add_column(col, no_wrap=col in ("MAC", "Bindkey"), overflow="fold")
    for d in report.devices:
        if d.bindkey:
            key = d.bindkey if show_keys else mask_key(d.bindkey)
        elif d.key_status == "error":
            key = "[red]error[/]"
        else:
            key = "[yellow]no key stored[/]"
        token = (d.token if show_keys else mask_key(d.token)) if d.token else ""
        home = f"{d.home_name or d.home_id}{' (shared)' if d.shared else ''}"
        table.add_row(d.region, home, d.mac or "?", d.model or "", d.name or "", key, token)
    Console(width=max(120, Console().width)).print(table)


@cloud.command("keys")
@click.option(
    "--region",
    type=click.Choice([*SERVERS, "all"]),
    help="Server region (the one chosen in Mi Home); default: the login's, else all.",
)
@click.option("--mac", help="Only this device.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--save", is_flag=True, help="Store the keys in the keystore (source 'cloud').")
@click.option("--replace", is_flag=True, help="With --save: replace a different key already stored for a device.")
@click.option("--show-keys", is_flag=True, help="Print keys and tokens in full (they are secrets).")
@click.option(
    "--capture",
    "capture_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check the keys against this btsnoop or mitherm JSON Lines capture (default: a recent gateway capture).",
)
@_keystore_option
@_server_options
def keys_cmd(
    region: str | None,
    mac: str | None,
    as_json: bool,
    save: bool,
    replace: bool,
    show_keys: bool,
    capture_file: Path | None,
    keystore_path: Path | None,
    account_url: str | None,
    api_url: str | None,
) -> None:
    """List the account's BLE devices (own and shared homes) with MAC, model, name, token and bindkey.

    With --save the keys go into the keystore; a different key already stored is never overwritten
    without --replace. Saved keys are then checked by the doctor against a capture (--capture, or one
    the gateway wrote recently). Exits 1 when the doctor proves a saved key wrong."""
    if replace and not save:
        raise click.UsageError("--replace only makes sense with --save")
    if mac:
        try:
            mac = normalize_mac(mac)
        except InvalidMac as e:
            raise click.ClickException(str(e)) from None
    session = _load_session()
    account, api = _servers(account_url, api_url, session)
    chosen = region or _config().get("region") or session.region or "all"
    regions = list(SERVERS) if chosen == "all" else [chosen]

    async def go() -> CloudReport:
        async with XiaomiCloud(account_url=account, api_url=api, session=session) as client:
            return await client.ble_devices(regions, mac=mac)

    try:
        report = asyncio.run(go())
    except SessionExpired as e:
        default_session_path().unlink(missing_ok=True)
        raise click.ClickException(f"{e}: run `mitherm cloud login`") from None
    except CloudError as e:
        raise click.ClickException(str(e)) from None

    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    if mac and not report.devices:
        raise click.ClickException(
            f"{mac} is not among the BLE devices of this account in region(s) {', '.join(regions)}: check the "
            "address, or the region chosen in Mi Home (--region all tries every server)"
        )

    saved: dict[str, dict[str, Any]] = {}
    store: Keystore | None = None
    if save:
        store = _keystore(keystore_path)
        saved = _save(store, report.devices, replace)
        if any(v["status"] in ("added", "updated", "replaced") for v in saved.values()):
            try:
                store.save()
            except OSError as e:
                raise click.ClickException(f"cannot write keystore {store.path}: {e.strerror or e}") from None

    check = save or capture_file is not None
    capture = capture_file or (_recent_gateway_capture() if save else None)
    targets = saved if save else {d.mac: {"status": "listed"} for d in report.devices if d.mac}
    checks = _doctor(report.devices, targets, capture) if check else {}

    if as_json:
        doc = {
            "regions": report.regions,
            "homes": [
                {"region": r, "id": h.id, "name": h.name, "owner": h.owner, "shared": h.shared} for r, h in report.homes
            ],
            "devices": [
                _device_json(d, show_keys, saved.get(d.mac or d.did) if save else None, checks.get(d.mac or ""))
                for d in report.devices
            ],
            "keystore": str(store.path) if store else None,
            "capture": str(capture) if capture else None,
            "warnings": report.warnings,
        }
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        if report.devices:
            _print_table(report, show_keys)
        else:
            click.echo(f"No BLE devices found in region(s) {', '.join(report.regions)}.")
        no_key = [d for d in report.devices if d.key_status == "no_key_stored"]
        if no_key:
            click.echo(
                f"{len(no_key)} device(s) have no key stored in the cloud (all-F): remove them from Mi Home and add "
                "them again, then run this command again."
            )
        if save and store is not None:
            _print_save(report.devices, saved, store, show_keys)
        if check:
            _print_doctor(report.devices, targets, checks, capture)

    if any(_proven_wrong(c) for c in checks.values()):
        raise SystemExit(1)


def _proven_wrong(check: dict[str, Any]) -> bool:
    """A key the doctor rejects, unless it was not saved because the stored (working) key was kept."""
    if check.get("stored_key_verdict") == "ok":
        return False
    return check["verdict"] in FAILING_VERDICTS


def _print_save(devices: list[CloudDevice], saved: dict[str, dict[str, Any]], store: Keystore, show: bool) -> None:
    counts: dict[str, int] = {}
    for d in devices:
        entry = saved.get(d.mac or d.did)
        if entry is None:
            continue
        status = entry["status"]
        counts[status] = counts.get(status, 0) + 1
        label = f"{d.mac or d.did:17}  {d.name or '':20}"
        if status == "conflict":
            stored = entry["stored"] if show else mask_key(entry["stored"])
            cloud_key = d.bindkey if show else mask_key(d.bindkey)
            click.echo(
                f"  conflict  {label}  the keystore has {stored}, the cloud {cloud_key}. If the sensor was re-added "
                "in Mi Home since, the cloud key is the current one: replace it with\n"
                f"            mitherm cloud keys --mac {d.mac} --save --replace\n"
                "            (the doctor below says which key decrypts the sensor's frames)"
            )
        elif status == "skipped":
            click.echo(f"  skipped   {label}  {entry['reason']}")
        elif status != "unchanged":
            click.echo(f"  {status:9} {label}  key {d.bindkey if show else mask_key(d.bindkey)}")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    click.echo(f"Keystore {store.path}: {summary or 'nothing to save'}")


def _print_doctor(
    devices: list[CloudDevice], saved: dict[str, dict[str, Any]], checks: dict[str, Any], capture: Path | None
) -> None:
    say = click.echo
    macs = [
        d.mac for d in devices if d.mac and d.bindkey and saved.get(d.mac, {}).get("status") not in (None, "skipped")
    ]
    if not macs:
        return
    if capture is None:
        say("No recent capture to check the keys against. Check each key while the sensor is in range:")
        for m in macs:
            say(f"  mitherm doctor --live --mac {m}")
        return
    age = time.time() - capture.stat().st_mtime
    say(f"Doctor, against {capture} (written {age / 60:.0f} min ago):")
    for m in macs:
        c = checks.get(m)
        if c is None:
            continue
        stored = c.get("stored_key_verdict")
        say(f"  {m}  {c['verdict']}" + (f" (the key already stored: {stored})" if stored else ""))
        if stored == "ok" and c["verdict"] != "ok":
            say("      the key already stored works and the cloud's does not: keep yours (no --replace)")
        elif stored is not None and stored != "ok" and c["verdict"] == "ok":
            say(f"      the cloud key works and the stored one does not: mitherm cloud keys --mac {m} --save --replace")
        elif c["verdict"] in _UNDECIDED:
            say(f"      not decided by this capture: mitherm doctor --live --mac {m}")
        elif c["verdict"] != "ok":
            say(f"      {c['advice']}")

"""``mitherm keys``: add, list, remove and import bindkeys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import click

from mitherm.keystore import (
    KeyConflict,
    KeyEntry,
    Keystore,
    KeystoreError,
    mask_key,
    parse_token_extractor_report,
)
from mitherm.mac import normalize_mac
from mitherm.paths import default_keystore

__all__ = ["keys"]

_META = "mitherm.keys.keystore"


def _store(ctx: click.Context) -> Keystore:
    path = ctx.meta.get(_META) or default_keystore()
    try:
        return Keystore(path)
    except KeystoreError as e:
        raise click.ClickException(str(e)) from None


def _save(store: Keystore) -> None:
    try:
        store.save()
    except OSError as e:
        raise click.ClickException(f"cannot write keystore {store.path}: {e.strerror or e}") from None


@click.group("keys")
@click.option(
    "--keystore",
    "keystore_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="MITHERM_KEYSTORE",
    default=None,
    help="Keystore file (default: keys.json in the mitherm config directory; env MITHERM_KEYSTORE).",
)
@click.pass_context
def keys(ctx: click.Context, keystore_path: Path | None) -> None:
    """Manage bindkeys (the per-device keys that decrypt encrypted advertisements)."""
    ctx.meta[_META] = keystore_path


@keys.command("add")
@click.argument("mac")
@click.argument("key")
@click.option("--name", help="A name for the device (e.g. the room).")
@click.option("--token", help="The device's Mi token (hex), if known.")
@click.option("--force", is_flag=True, help="Replace a different key already stored for this device.")
@click.pass_context
def add_cmd(ctx: click.Context, mac: str, key: str, name: str | None, token: str | None, force: bool) -> None:
    """Store KEY (32 hex digits, or 24 for legacy devices) for the device MAC."""
    store = _store(ctx)
    try:
        status = store.add(mac, key, name=name, token=token, source="manual", overwrite=force)
    except KeyConflict as e:
        raise click.ClickException(
            f"{e.mac} already has a different key ({mask_key(e.existing)}); use --force to replace it with the new one"
        ) from None
    except KeystoreError as e:
        raise click.ClickException(str(e)) from None
    entry = store.get(mac)
    assert entry is not None
    if status != "unchanged":
        _save(store)
    click.echo(f"{status.capitalize()}: {entry.mac} key {mask_key(entry.bindkey)} in {store.path}")


def _row(entry: KeyEntry, show_keys: bool) -> dict[str, str | None]:
    return {
        "mac": entry.mac,
        "name": entry.name,
        "model": entry.model,
        "bindkey": entry.bindkey if show_keys else mask_key(entry.bindkey),
        "source": entry.source,
        "added": entry.added,
        "did": entry.did,
        "token": entry.token if show_keys else (mask_key(entry.token) if entry.token else None),
    }


@keys.command("list")
@click.option("--show-keys", is_flag=True, help="Print keys and tokens in full (they are secrets).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def list_cmd(ctx: click.Context, show_keys: bool, as_json: bool) -> None:
    """List the stored devices (keys masked unless --show-keys)."""
    store = _store(ctx)
    rows = [_row(e, show_keys) for e in store.entries()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo(f"No keys in {store.path}. Add one with: mitherm keys add MAC KEY")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Bindkeys in {store.path}", title_justify="left")
    table.add_column("MAC", no_wrap=True)
    table.add_column("Name")
    table.add_column("Model")
    table.add_column("Key", no_wrap=True)
    table.add_column("Source")
    table.add_column("Added")
    for r in rows:
        table.add_row(
            r["mac"],
            r["name"] or "",
            r["model"] or "",
            r["bindkey"],
            r["source"],
            (r["added"] or "")[:16].replace("T", " "),
        )
    Console().print(table)


@keys.command("remove")
@click.argument("mac")
@click.pass_context
def remove_cmd(ctx: click.Context, mac: str) -> None:
    """Forget the key of the device MAC."""
    store = _store(ctx)
    try:
        removed = store.remove(mac)
    except KeystoreError as e:
        raise click.ClickException(str(e)) from None
    if not removed:
        raise click.ClickException(f"{mac} is not in {store.path} (see: mitherm keys list)")
    _save(store)
    click.echo(f"Removed {normalize_mac(mac)} from {store.path}")


@keys.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@click.option("--force", is_flag=True, help="Replace keys that differ from the stored ones.")
@click.pass_context
def import_cmd(ctx: click.Context, file: IO[str], force: bool) -> None:
    """Import keys from Xiaomi cloud token extractor output (FILE, or - for stdin).

    Accepts its text output (NAME/ID/MAC/BLE KEY blocks) or its JSON export."""
    text = file.read()
    try:
        entries, skipped = parse_token_extractor_report(text)
    except KeystoreError as e:
        raise click.ClickException(str(e)) from None
    if not entries and not skipped:
        raise click.ClickException(
            f"no devices found in {getattr(file, 'name', 'the input')}: expected the token extractor's "
            "output (blocks with NAME:, MAC:, BLE KEY: lines) or its JSON export"
        )
    store = _store(ctx)
    added: list[KeyEntry] = []
    updated: list[KeyEntry] = []
    unchanged: list[KeyEntry] = []
    conflicts: list[tuple[KeyEntry, str]] = []
    skip_lines = [f"  skipped   {s.mac or '?':17}  {s.name or '':20}  {s.reason}" for s in skipped]
    for entry in entries:
        label = f"{entry.mac:17}  {entry.name or '':20}"
        if entry.bindkey is None:
            skip_lines.append(f"  skipped   {label}  {entry.note}")
            continue
        try:
            status = store.add(
                entry.mac,
                entry.bindkey,
                name=entry.name,
                token=entry.token,
                source="cloud",
                overwrite=force,
                model=entry.model,
                did=entry.did,
            )
        except KeyConflict as e:
            conflicts.append((entry, mask_key(e.existing)))
            continue
        except KeystoreError as e:
            skip_lines.append(f"  skipped   {label}  {e}")
            continue
        if status == "unchanged":
            unchanged.append(entry)
        else:
            (added if status == "added" else updated).append(entry)
            click.echo(f"  {status:9} {label}  key {mask_key(entry.bindkey)}")
    for entry, existing in conflicts:
        click.echo(
            f"  conflict  {entry.mac:17}  {entry.name or '':20}  stored {existing}, file "
            f"{mask_key(entry.bindkey)} (use --force to replace)"
        )
    for line in skip_lines:
        click.echo(line)
    if added or updated:
        _save(store)
    click.echo(
        f"Imported into {store.path}: {len(added)} added, {len(updated)} updated, "
        f"{len(unchanged)} unchanged, "
        f"{len(conflicts)} conflicts, {len(skip_lines)} skipped"
    )

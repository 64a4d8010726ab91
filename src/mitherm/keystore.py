"""The bindkey store: one private JSON file of per-device keys.

Layout (``keys.json``, mode 0600)::

    {"version": 1,
     "devices": {"A4:C1:38:12:34:56": {"bindkey": "e9ea…", "name": "Bedroom", "model": "LYWSD03MMC",
                                       "token": null, "did": null, "source": "cloud",
                                       "added": "2024-06-10T12:00:00+00:00"}}}

Changes are made in memory (:meth:`Keystore.add`, :meth:`Keystore.remove`) and written with
:meth:`Keystore.save`. Keys are secrets: nothing here logs or prints one; show them with
:func:`mask_key`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from mitherm.mac import InvalidMac, normalize_mac
from mitherm.paths import default_keystore, write_private

__all__ = [
    "SOURCES",
    "KeyConflict",
    "KeyEntry",
    "Keystore",
    "KeystoreError",
    "SkippedDevice",
    "mask_key",
    "normalize_bindkey",
    "parse_token_extractor_output",
    "parse_token_extractor_report",
]

log = logging.getLogger(__name__)

SOURCES = ("manual", "cloud", "activation", "pvvx", "import")
VERSION = 1
#: What the cloud's blt_get_beaconkey returns when it holds no key for a device.
NO_CLOUD_KEY = "no key stored in the cloud"


class KeystoreError(ValueError):
    """Bad input for the keystore (MAC, key) or an unreadable keystore file."""


class KeyConflict(KeystoreError):
    """The device already has a different bindkey (pass ``overwrite=True`` to replace it)."""

    def __init__(self, mac: str, existing: str, new: str) -> None:
        self.mac = mac
        self.existing = existing
        self.new = new
        super().__init__(
            f"{mac} already has a different bindkey ({mask_key(existing)}, new {mask_key(new)}); "
            "replace it with --force (overwrite=True) if the new key is the right one"
        )


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass(slots=True)
class KeyEntry:
    mac: str
    bindkey: str | None
    token: str | None = None
    name: str | None = None
    model: str | None = None
    source: str = "manual"
    added: str = field(default_factory=_now)
    did: str | None = None
    #: Why an imported entry has no usable key (e.g. "no key stored in the cloud"); not stored.
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["mac"], d["note"]
        return d

    @classmethod
    def from_json(cls, mac: str, obj: dict[str, Any]) -> KeyEntry:
        return cls(
            mac=normalize_mac(mac),
            bindkey=obj.get("bindkey"),
            token=obj.get("token"),
            name=obj.get("name"),
            model=obj.get("model"),
            source=obj.get("source") or "manual",
            added=obj.get("added") or "",
            did=obj.get("did"),
        )


def mask_key(key: str | None) -> str:
    """``e9ea…f3a8``: first and last 4 digits only. Short or missing keys are fully masked."""
    if not key:
        return "-"
    if len(key) < 12:
        return "…"
    return f"{key[:4]}…{key[-4:]}"


_KEY_NOISE = re.compile(r"[\s:\-,]|0[xX]")
_NOT_HEX = re.compile(r"[^0-9a-fA-F]")


def normalize_bindkey(text: str) -> str:
    """Lowercase hex of a bindkey typed any common way (spaces, colons, ``0x``), or KeystoreError.

    A bindkey is 32 hex digits (16 bytes: MiBeacon v4/v5, BTHome, pvvx/atc1441 encryption) or 24
    (12 bytes: legacy MiBeacon v2/v3). The error says what is wrong, never the key itself."""
    if not isinstance(text, str) or not text.strip():
        raise KeystoreError("the bindkey is empty: give 32 hex digits (or 24 for legacy MiBeacon devices)")
    key = _KEY_NOISE.sub("", text.strip())
    bad = _NOT_HEX.search(key)
    if bad:
        raise KeystoreError(
            f"the bindkey contains {bad.group()!r}, which is not a hex digit: a bindkey uses only 0-9 and "
            "a-f (check for a stray character or a copied label)"
        )
    if len(key) not in (24, 32):
        raise KeystoreError(
            f"the bindkey has {len(key)} hex digits: expected 32 (MiBeacon v4/v5, BTHome, pvvx) or 24 "
            "(legacy MiBeacon); check that the whole key was copied"
        )
    key = key.lower()
    if key in ("f" * len(key), "0" * len(key)):
        raise KeystoreError(
            f"the bindkey is all {key[0].upper()}s, which the Xiaomi cloud returns when it has no key "
            "for the device: re-pair it in Mi Home (or activate it with mitherm) to get a real key"
        )
    return key


def _normalize_mac(mac: str) -> str:
    try:
        return normalize_mac(mac)
    except InvalidMac as e:
        raise KeystoreError(str(e)) from None


def _normalize_token(token: str | None) -> str | None:
    if token is None or not token.strip():
        return None
    t = _KEY_NOISE.sub("", token.strip())
    if _NOT_HEX.search(t) or len(t) % 2:
        raise KeystoreError("the token must be hex (an even number of 0-9/a-f digits)")
    return t.lower()


AddStatus = Literal["added", "unchanged", "updated", "replaced"]


class Keystore:
    """Bindkeys by MAC, persisted as a private JSON file (see the module docstring).

    The file is read on construction (a missing file is an empty store). ``add``/``remove`` change
    memory only; call :meth:`save`. A long-running process calls :meth:`reload_if_changed` to pick
    up edits made by ``mitherm keys`` without a restart."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, load: bool = True) -> None:
        self.path = Path(path) if path is not None else default_keystore()
        self._entries: dict[str, KeyEntry] = {}
        self._stamp: tuple[int, int] | None = None
        if load:
            self.load()

    # ------------------------------------------------------------------ file

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> Keystore:
        """(Re)read the file; a missing file gives an empty store. KeystoreError if it is unreadable."""
        stamp = self._file_stamp()
        if stamp is None:
            self._entries = {}
            self._stamp = None
            return self
        try:
            raw = self.path.read_text(encoding="utf-8")
        except OSError as e:
            raise KeystoreError(f"cannot read keystore {self.path}: {e.strerror or e}") from None
        self._fix_mode()
        try:
            doc = json.loads(raw) if raw.strip() else {"version": VERSION, "devices": {}}
        except json.JSONDecodeError as e:
            raise KeystoreError(
                f"keystore {self.path} is not valid JSON (line {e.lineno}): fix or move the file"
            ) from None
        self._entries = self._parse_doc(doc)
        self._stamp = stamp
        return self

    def _parse_doc(self, doc: Any) -> dict[str, KeyEntry]:
        if not isinstance(doc, dict):
            raise KeystoreError(f'keystore {self.path}: expected an object {{"version": 1, "devices": {{…}}}}')
        if "devices" not in doc and all(isinstance(v, str) for v in doc.values()):
            devices: dict[str, Any] = {k: {"bindkey": v, "source": "import"} for k, v in doc.items()}
        else:
            version = doc.get("version", VERSION)
            if version != VERSION:
                raise KeystoreError(
                    f"keystore {self.path} has version {version!r}; this mitherm reads version {VERSION}"
                )
            devices = doc.get("devices") or {}
            if not isinstance(devices, dict):
                raise KeystoreError(f'keystore {self.path}: "devices" must be an object keyed by MAC')
        entries: dict[str, KeyEntry] = {}
        for mac, obj in devices.items():
            try:
                entry = KeyEntry.from_json(mac, obj if isinstance(obj, dict) else {"bindkey": obj})
                if entry.bindkey is not None:
                    entry.bindkey = normalize_bindkey(entry.bindkey)
            except (InvalidMac, KeystoreError, TypeError) as e:
                raise KeystoreError(f"keystore {self.path}: entry {mac!r}: {e}") from None
            entries[entry.mac] = entry
        return entries

    def _fix_mode(self) -> None:
        if os.name != "posix":
            return
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & 0o077:
                os.chmod(self.path, 0o600)
                log.warning("keystore %s was readable by others (mode %o); set it to 0600", self.path, mode)
        except OSError:
            pass

    def save(self) -> None:
        """Write the store atomically with mode 0600 (an existing, too-open file is replaced)."""
        doc = {
            "version": VERSION,
            "devices": {mac: self._entries[mac].to_json() for mac in sorted(self._entries)},
        }
        write_private(self.path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        self._stamp = self._file_stamp()

    def reload_if_changed(self) -> bool:
        """Reload when the file changed on disk since the last load/save; True if it did."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self.load()
        return True

    # ------------------------------------------------------------------ entries

    def add(
        self,
        mac: str,
        bindkey: str,
        name: str | None = None,
        token: str | None = None,
        source: str = "manual",
        overwrite: bool = False,
        *,
        model: str | None = None,
        did: str | None = None,
    ) -> AddStatus:
        """Add or update a device's key (in memory). Returns what happened.

        Raises KeystoreError for a bad MAC or key, KeyConflict when the device already has a different
        key and ``overwrite`` is false. Name, token, model and did given here update the entry."""
        mac = _normalize_mac(mac)
        key = normalize_bindkey(bindkey)
        token = _normalize_token(token)
        if source not in SOURCES:
            raise KeystoreError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        existing = self._entries.get(mac)
        if existing is None:
            self._entries[mac] = KeyEntry(
                mac=mac, bindkey=key, token=token, name=name, model=model, source=source, did=did
            )
            return "added"
        status: AddStatus = "unchanged"
        updated = existing
        if existing.bindkey != key:
            if existing.bindkey is not None and not overwrite:
                raise KeyConflict(mac, existing.bindkey, key)
            updated = replace(updated, bindkey=key, source=source, added=_now())
            status = "replaced"
        extra = {
            k: v
            for k, v in (("name", name), ("token", token), ("model", model), ("did", did))
            if v is not None and getattr(updated, k) != v
        }
        if extra:
            updated = replace(updated, **extra)
            if status == "unchanged":
                status = "updated"
        self._entries[mac] = updated
        return status

    def remove(self, mac: str) -> bool:
        """Forget a device (in memory); False if it was not there."""
        return self._entries.pop(_normalize_mac(mac), None) is not None

    def get(self, mac: str) -> KeyEntry | None:
        return self._entries.get(_normalize_mac(mac))

    def keys(self) -> dict[str, str]:
        """``{"AA:BB:…": "hex key"}`` for every device with a key (what the decoder takes)."""
        return {mac: e.bindkey for mac, e in self._entries.items() if e.bindkey}

    def entries(self) -> list[KeyEntry]:
        return [self._entries[mac] for mac in sorted(self._entries)]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, mac: object) -> bool:
        try:
            return isinstance(mac, str) and normalize_mac(mac) in self._entries
        except InvalidMac:
            return False

    def __iter__(self) -> Iterator[KeyEntry]:
        return iter(self.entries())


# ---------------------------------------------------------------------------------------------------
# Xiaomi cloud token extractor output


@dataclass(slots=True, frozen=True)
class SkippedDevice:
    """A device in extractor output that gives no keystore entry, and why."""

    name: str | None
    mac: str | None
    reason: str


# Text output: blocks of "NAME:     …" lines (label padded to 10 columns) between "---------" lines.
_TEXT_FIELD = re.compile(r"^\s*(NAME|ID|MAC|MODEL|TOKEN|BLE KEY|BLE_KEY|BINDKEY|IP)\s*:\s*(.*?)\s*$", re.I)
_SEPARATOR = re.compile(r"^\s*-{3,}\s*$")
_JSON_KEY_FIELDS = ("bindkey", "ble_key", "blekey", "ble key", "beaconkey", "beacon_key", "key")
_JSON_NESTED = ("ble_data", "bledata")


def _text_devices(text: str) -> list[dict[str, str]]:
    devices: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if _SEPARATOR.match(line):
            if current:
                devices.append(current)
            current = {}
            continue
        m = _TEXT_FIELD.match(line)
        if not m:
            continue
        label = m.group(1).upper().replace("_", " ")
        field_name = {"ID": "did", "BLE KEY": "bindkey", "BINDKEY": "bindkey"}.get(label, label.lower())
        if field_name in current:  # a new device without a separator line
            devices.append(current)
            current = {}
        current[field_name] = m.group(2)
    if current:
        devices.append(current)
    return devices


def _json_devices(node: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(node, list):
        for item in node:
            _json_devices(item, out)
        return
    if not isinstance(node, dict):
        return
    lower = {str(k).lower(): v for k, v in node.items()}
    if "mac" in lower or any(k in lower for k in ("bindkey", "ble_key", "beaconkey")):
        device: dict[str, Any] = {k: lower.get(k) for k in ("name", "mac", "model", "token")}
        device["did"] = lower.get("did", lower.get("id"))
        key = next((lower[k] for k in _JSON_KEY_FIELDS if lower.get(k)), None)
        if key is None:
            for nested in _JSON_NESTED:
                sub = lower.get(nested)
                if isinstance(sub, dict):
                    sub_lower = {str(k).lower(): v for k, v in sub.items()}
                    key = next((sub_lower[k] for k in _JSON_KEY_FIELDS if sub_lower.get(k)), None)
                    if key is not None:
                        break
        device["bindkey"] = key
        out.append(device)
        return
    for value in node.values():
        _json_devices(value, out)


def _str_or_none(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def parse_token_extractor_report(text: str) -> tuple[list[KeyEntry], list[SkippedDevice]]:
    """Entries and skipped devices from Xiaomi cloud token extractor output (text or JSON export).

    Devices with a MAC and a BLE key become entries (source "cloud"). An all-F / all-0 key gives an
    entry with ``bindkey=None`` and ``note="no key stored in the cloud"``; a malformed key gives
    ``bindkey=None`` with the problem in ``note``. Devices without a MAC or BLE key (Wi-Fi devices,
    gateways) are skipped with the reason."""
    stripped = text.lstrip("\ufeff \t\r\n")
    raw_devices: list[dict[str, Any]]
    if stripped[:1] in ("[", "{"):
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise KeystoreError(
                f"the input looks like JSON but does not parse (line {e.lineno}, column {e.colno}): "
                "give the token extractor's text output or its JSON export unchanged"
            ) from None
        raw_devices = []
        _json_devices(doc, raw_devices)
    else:
        raw_devices = _text_devices(text)

    entries: list[KeyEntry] = []
    skipped: list[SkippedDevice] = []
    for dev in raw_devices:
        name = _str_or_none(dev.get("name"))
        raw_mac = _str_or_none(dev.get("mac"))
        raw_key = _str_or_none(dev.get("bindkey"))
        if raw_key is None:
            skipped.append(SkippedDevice(name, raw_mac, "no BLE key (not a BLE device, or no key listed)"))
            continue
        if raw_mac is None:
            skipped.append(SkippedDevice(name, None, "no MAC address listed"))
            continue
        try:
            mac = normalize_mac(raw_mac)
        except InvalidMac:
            skipped.append(SkippedDevice(name, raw_mac, f"MAC {raw_mac!r} is not a Bluetooth address"))
            continue
        bindkey: str | None
        note: str | None = None
        compact = _KEY_NOISE.sub("", raw_key).lower()
        if compact and (set(compact) <= {"f"} or set(compact) <= {"0"}):
            bindkey, note = None, NO_CLOUD_KEY
        else:
            try:
                bindkey = normalize_bindkey(raw_key)
            except KeystoreError as e:
                bindkey, note = None, str(e)
        try:
            token = _normalize_token(_str_or_none(dev.get("token")))
        except KeystoreError:
            token = None
        entries.append(
            KeyEntry(
                mac=mac,
                bindkey=bindkey,
                token=token,
                name=name,
                model=_str_or_none(dev.get("model")),
                source="cloud",
                did=_str_or_none(dev.get("did")),
                note=note,
            )
        )
    return entries, skipped


def parse_token_extractor_output(text: str) -> list[KeyEntry]:
    """Keystore entries from Xiaomi cloud token extractor output (see parse_token_extractor_report)."""
    return parse_token_extractor_report(text)[0]

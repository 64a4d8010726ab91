"""Where mitherm keeps its files (overridable with MITHERM_CONFIG_DIR / MITHERM_DATA_DIR)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def config_dir() -> Path:
    env = os.environ.get("MITHERM_CONFIG_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "mitherm"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mitherm"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mitherm"


def data_dir() -> Path:
    env = os.environ.get("MITHERM_DATA_DIR")
    if env:
        return Path(env)
    if sys.platform in ("win32", "darwin"):
        return config_dir()
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mitherm"


def default_keystore() -> Path:
    return config_dir() / "keys.json"


def default_db() -> Path:
    return data_dir() / "history.sqlite3"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600 (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def default_frames_snapshot() -> Path:
    """The gateway's recent frames, written every few seconds: `mitherm doctor` reads them at once."""
    return data_dir() / "recent-frames.jsonl"

"""Start a throw-away Mosquitto broker for tests (``mosquitto`` on PATH or in /usr/sbin)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not listen on port {port} within {timeout} s") from None
            time.sleep(0.02)


def start_mosquitto(tmp_dir: str | Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """Start mosquitto on 127.0.0.1 (a free port unless given, e.g. to restart on the same port) with
    anonymous access and no persistence. Returns (process, port) once the port accepts connections."""
    exe = find_mosquitto()
    if exe is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = tmp_dir / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
    )
    log = open(tmp_dir / f"mosquitto-{port}.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            text = (tmp_dir / f"mosquitto-{port}.log").read_text(errors="replace")
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {text[-2000:]}")
        try:
            wait_port(port, timeout=0.2)
            return proc, port
        except TimeoutError:
            if time.monotonic() > deadline:
                proc.kill()
                raise


def stop_mosquitto(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

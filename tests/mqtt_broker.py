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


def start_mosquitto(tmp_dir: str | Path, port: int | None = None, extra_conf: str = "") -> tuple[subprocess.Popen, int]:
    """Start mosquitto on 127.0.0.1 (a free port unless given, e.g. to restart on the same port) with
    anonymous access and no persistence. ``extra_conf`` is appended to the listener's configuration
    (e.g. ``certfile``/``keyfile`` for TLS). Returns (process, port) once the port accepts connections."""
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
        # as root mosquitto drops to user "mosquitto", which cannot read the test's private tmp dir
        + ("user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else "")
        + extra_conf
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


def self_signed_cert(tmp_dir: str | Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: (certfile, keyfile) in PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitherm test broker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    tmp_dir = Path(tmp_dir)
    certfile, keyfile = tmp_dir / "broker.crt", tmp_dir / "broker.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certfile, keyfile

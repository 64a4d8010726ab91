"""run_with_reconnect: one log line per outage, backoff and its reset, fatal vs transient SourceError."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mitherm.sources import SourceError
from mitherm.sources import reconnect as rc
from mitherm.sources.reconnect import backoff_delay, connected, describe, run_with_reconnect

LOG = logging.getLogger("mitherm.sources.test")


def test_backoff_grows_with_jitter_and_caps() -> None:
    for attempt, base in [(0, 1), (1, 2), (2, 4), (5, 32)]:
        d = backoff_delay(attempt, 1.0, 60.0)
        assert 0.8 * base <= d <= 1.2 * base
    assert backoff_delay(40, 1.0, 60.0) <= 60.0


def test_describe_masks_secrets_and_prefers_os_errors() -> None:
    wrapped = RuntimeError("Error connecting to [AddrInfo(...)]: [Errno 111] refused")
    wrapped.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    assert describe(wrapped).startswith("ConnectionRefusedError")
    assert describe(ValueError("token abc123 bad"), ["abc123"]) == "ValueError: token *** bad"


async def test_one_line_per_outage_then_recovery(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    caplog.set_level(logging.DEBUG, logger="mitherm.sources.test")
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(d: float) -> None:
        delays.append(d)
        await real_sleep(0)

    monkeypatch.setattr(rc.asyncio, "sleep", fake_sleep)
    calls = 0
    done = asyncio.Event()

    async def connect_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            connected()
            raise ConnectionError("peer reset secret-pw")
        if calls < 5:
            raise OSError("unreachable")
        connected()
        done.set()
        await real_sleep(3600)

    task = asyncio.create_task(
        run_with_reconnect("esphome kitchen-proxy", connect_once, log=LOG, secrets=["secret-pw"])
    )
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"esphome kitchen-proxy: connection lost (ConnectionError: peer reset ***); retrying in {_fmt(delays[0])}"
    ]
    assert any("connected again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len(delays) == 4 and delays[3] > delays[0]  # exponential growth within the outage


def _fmt(d: float) -> str:
    return rc._fmt_seconds(d)


async def test_backoff_resets_after_a_stable_connection(monkeypatch) -> None:
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(d: float) -> None:
        delays.append(d)
        await real_sleep(0)

    monkeypatch.setattr(rc.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(rc.random, "uniform", lambda a, b: 0.0)
    clock = [1000.0]
    monkeypatch.setattr(rc.time, "monotonic", lambda: clock[0])
    calls = 0

    async def connect_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 4:  # stays up 31 s, then drops
            connected()
            clock[0] += 31
            raise ConnectionError("dropped")
        if calls == 6:
            raise asyncio.CancelledError
        raise OSError("down")

    with pytest.raises(asyncio.CancelledError):
        await run_with_reconnect("x", connect_once, log=LOG)
    assert delays == [1.0, 2.0, 4.0, 1.0, 2.0]


async def test_source_error_is_fatal_unless_caused_by_the_network(monkeypatch) -> None:
    async def bad_config() -> None:
        raise SourceError("wrong key")

    with pytest.raises(SourceError, match="wrong key"):
        await asyncio.wait_for(run_with_reconnect("x", bad_config, log=LOG), 2)

    calls = 0

    async def transient() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise SourceError("lookup failed") from OSError("temporary failure in name resolution")
        raise SourceError("now really bad")

    with pytest.raises(SourceError, match="now really bad"):
        await asyncio.wait_for(run_with_reconnect("x", transient, initial=0.01, log=LOG), 2)
    assert calls == 3

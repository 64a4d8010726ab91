"""Keep a network source connected: exponential backoff with jitter, one log line per outage.

``run_with_reconnect(name, connect_once)`` calls ``connect_once()`` again and again. ``connect_once`` is a
coroutine that connects, streams, and returns (or raises) when the connection ends. It may call
:func:`connected` once the link is really up (handshake done, subscription made); that marks the start of
a healthy connection for the recovery log line and the backoff reset. A ``connect_once`` that never calls
it is treated as connected when it returns normally.

A :class:`~mitherm.sources.SourceError` means bad configuration (wrong key, rejected token, bad topic):
it is re-raised at once instead of being retried forever. The exception: a ``SourceError`` caused by a
network error (``raise SourceError(...) from OSError(...)``) is retried like the network error itself."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar

from . import Emit, SourceError

_log = logging.getLogger(__name__)

#: A connection that stayed up this long resets the backoff to ``initial``.
STABLE_AFTER = 30.0

_connected_cb: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "mitherm_reconnect_connected", default=None
)


def connected() -> None:
    """Tell the enclosing :func:`run_with_reconnect` that the connection is up (no-op outside one)."""
    cb = _connected_cb.get()
    if cb is not None:
        cb()


def is_transient(exc: BaseException) -> bool:
    """True for network trouble worth retrying: an OSError / TimeoutError / ConnectionError anywhere in the
    explicit cause chain (``raise ... from ...``) of a SourceError."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError | TimeoutError | asyncio.TimeoutError | ConnectionError):
            return True
        e = e.__cause__  # explicit causes only: an error merely raised *during* network handling is not one
    return False


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A short one-line description of an exception with every secret masked. A wrapped OS-level error
    (connection refused, host unreachable) is described by itself: it says more than its wrapper."""
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and str(e):
            exc = e
            break
        e = e.__cause__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return redact(text, secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s and len(s) >= 3:
            text = text.replace(s, "***")
    return text


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: float = 0.2) -> float:
    """Delay before retry number ``attempt`` (0-based): initial * 2**attempt, capped, ± ``jitter``."""
    base = min(maximum, initial * (2 ** min(attempt, 30)))
    return max(0.0, min(maximum, base * (1 + random.uniform(-jitter, jitter))))


def _fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s:.2f} s"
    if s < 10:
        return f"{s:.1f} s".replace(".0 s", " s")
    return f"{s:.0f} s"


async def run_with_reconnect(
    name: str | Callable[[], str],
    connect_once: Callable[[], Awaitable[object]],
    *,
    initial: float = 1.0,
    maximum: float = 60.0,
    stable: float = STABLE_AFTER,
    log: logging.Logger | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Run ``connect_once`` forever (until cancelled), reconnecting with backoff.

    ``name`` labels the log lines ("esphome kitchen-proxy"); pass a callable when the label is only known
    after connecting (the proxy's own name). ``secrets`` are masked in every logged message."""
    logger = log or _log
    secrets = tuple(s for s in secrets if s)
    label = name if callable(name) else (lambda: name)  # type: ignore[misc]
    attempt = 0  # failures since the last healthy connection
    outage_since: float | None = None  # monotonic time the current outage started (logged once)
    ever_connected = False

    while True:
        state: dict[str, float | None] = {"up": None}

        def _mark_up(state: dict[str, float | None] = state) -> None:
            nonlocal outage_since, ever_connected
            if state["up"] is not None:
                return
            state["up"] = time.monotonic()
            if outage_since is not None:
                logger.info("%s: connected again after %s", label(), _fmt_seconds(time.monotonic() - outage_since))
                outage_since = None
            elif not ever_connected:
                logger.info("%s: connected", label())
            ever_connected = True

        token = _connected_cb.set(_mark_up)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            await connect_once()
        except asyncio.CancelledError:
            raise
        except SourceError as e:
            if not is_transient(e):
                raise
            error = e
        except Exception as e:
            error = e
        finally:
            _connected_cb.reset(token)

        if error is None and state["up"] is None:
            _mark_up()  # returned normally: it was connected, the peer closed it
        up_since = state["up"]
        if up_since is not None and time.monotonic() - up_since >= stable:
            attempt = 0
        elif up_since is None and time.monotonic() - started >= stable:
            attempt = 0  # a long attempt that never said "connected" still was not a tight loop

        delay = backoff_delay(attempt, initial, maximum)
        attempt += 1
        what = describe(error, secrets) if error is not None else "closed by the other side"
        if outage_since is None:
            outage_since = time.monotonic()
            verb = "connection lost" if up_since is not None else "cannot connect"
            logger.warning("%s: %s (%s); retrying in %s", label(), verb, what, _fmt_seconds(delay))
        else:
            logger.debug("%s: still down (%s); retrying in %s", label(), what, _fmt_seconds(delay))
        await asyncio.sleep(delay)


class ReconnectingSource:
    """Base of the network sources: ``run(emit)`` keeps ``_connect_once(emit)`` going with
    :func:`run_with_reconnect`.

    A subclass sets ``_log`` (its module's logger), ``reconnect_initial`` / ``reconnect_maximum``, and
    ``_label``: a string, or a method when the label is only known after connecting; it overrides
    ``_secrets()`` to have its credentials masked in the log."""

    _log: ClassVar[logging.Logger] = logging.getLogger(__name__)
    _label: str | Callable[[], str]
    reconnect_initial: float
    reconnect_maximum: float

    def _secrets(self) -> tuple[str, ...]:
        return ()

    async def _connect_once(self, emit: Emit) -> None:
        raise NotImplementedError

    async def run(self, emit: Emit) -> None:
        await run_with_reconnect(
            self._label,
            lambda: self._connect_once(emit),
            initial=self.reconnect_initial,
            maximum=self.reconnect_maximum,
            log=self._log,
            secrets=self._secrets(),
        )

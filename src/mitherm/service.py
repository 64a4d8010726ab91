"""``mitherm run``: sources -> Gateway -> sinks (SQLite history, MQTT, --print), as one asyncio service."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import sqlite3
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gateway import Gateway, GatewayOptions, PrintSink
from .model import Reading
from .paths import default_db, default_frames_snapshot, default_keystore
from .sources import Source, SourceError, open_source
from .state import DeviceState

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    """Mirrors the command-line flags; ``mitherm run --config FILE`` reads the same keys from TOML."""

    sources: list[str] = field(default_factory=list)
    mqtt: str | None = None
    db: str | None = None
    keys: str | None = None
    web: bool = True
    web_bind: str = "127.0.0.1:8086"
    web_password: str | None = None  # required when web_bind is not loopback (or MITHERM_WEB_PASSWORD)
    print: bool = False
    replay_speed: str = "max"
    follow: bool = False
    passive: bool = False
    publish_unknown: bool = False
    min_interval: float = 30.0
    raw_days: float = 30.0
    names: dict[str, str] = field(default_factory=dict)
    frames: str | None = None  # recent-frame snapshot for `mitherm doctor` (default: the user data dir)

    @classmethod
    def from_toml(cls, path: str) -> RunConfig:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        cfg = cls()
        known = {f for f in cls.__dataclass_fields__}
        for k, v in data.items():
            key = k.replace("-", "_")
            if key == "source":
                key = "sources"
            if key not in known:
                raise ConfigError(f"{path}: unknown option {k!r} (known: {', '.join(sorted(known))})")
            if key == "sources" and isinstance(v, str):
                v = [v]
            _check_type(path, k, key, v, getattr(cfg, key))
            setattr(cfg, key, v)
        return cfg


_TYPES: dict[str, tuple[type, ...]] = {
    "sources": (list,),
    "mqtt": (str,),
    "db": (str,),
    "keys": (str,),
    "web": (bool,),
    "web_bind": (str,),
    "web_password": (str,),
    "print": (bool,),
    "replay_speed": (str, int, float),
    "follow": (bool,),
    "passive": (bool,),
    "publish_unknown": (bool,),
    "min_interval": (int, float),
    "raw_days": (int, float),
    "names": (dict,),
    "frames": (str,),
}


def _check_type(path: str, option: str, key: str, value: Any, default: Any) -> None:
    types = _TYPES.get(key)
    if types is None:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and key == "sources":
        ok = all(isinstance(u, str) for u in value)
    if ok and key == "names":
        ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if not ok:
        want = " or ".join("list of strings" if t is list else "table" if t is dict else t.__name__ for t in types)
        raise ConfigError(f"{path}: option {option!r} must be a {want}, not {value!r}")


MAX_PENDING_VALUES = 20_000


class HistorySink:
    """Numeric values of the decoded readings into the history (``packet_id``/``flags`` and booleans are not
    history). The history's background flusher writes them; when a replay at full speed outruns it, the sink
    flushes inline once more than MAX_PENDING_VALUES are pending (back-pressure: memory stays bounded)."""

    _NOT_HISTORY = frozenset(("packet_id", "flags"))

    def __init__(self, history: Any) -> None:
        self.history = history
        self._known: set[str] = set()
        self._unchecked = 0  # values added since the sink last looked at history.pending

    def publish(self, state: DeviceState, reading: Reading) -> None:
        mac = state.mac
        if mac not in self._known:
            self._known.add(mac)
            self.history.upsert_device(mac, name=state.name, model=state.model, format=state.format, ts=state.last_seen)
        n = self.history.add_measurements(mac, state.last_seen, reading.values, self._NOT_HISTORY)
        if n:
            # pending counts the buffer: look at it every quarter of the limit, not at every reading
            self._unchecked += n
            if self._unchecked > MAX_PENDING_VALUES // 4:
                self._unchecked = 0
                history = self.history
                if history.pending > MAX_PENDING_VALUES:
                    history.flush()


class MqttSink:
    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher
        self._tasks: set[asyncio.Task[Any]] = set()

    def publish(self, state: DeviceState, reading: Reading) -> None:
        res = self.publisher.publish_state(state)
        if res is not None and inspect.isawaitable(res):  # an async publisher (tests, plug-ins)
            t = asyncio.ensure_future(res)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)


class Service:
    def __init__(
        self, cfg: RunConfig, *, out: Any = None, sim_source: Any = None, capture_path: str | None = None
    ) -> None:
        self.cfg = cfg
        self.sim_source = sim_source  # a prepared SimSource (the demo keeps its house to know the keys)
        self.capture_path = capture_path  # also write every received advert here (mitherm JSON Lines)
        self.frames_snapshot: str | None = cfg.frames or str(default_frames_snapshot())
        self.out = out or sys.stdout
        self.keystore: Any = None
        self.history: Any = None
        self.publisher: Any = None
        self.gateway: Gateway | None = None
        self.web_runner: Any = None
        self.web_any_port = False  # the demo takes any free port when the default one is busy
        self.web_url: str | None = None
        self._saved_counters: dict[str, int] = {}

    def _load_keys(self) -> tuple[dict[str, str], dict[str, str]]:
        from .keystore import Keystore

        self.keystore = Keystore(self.cfg.keys or default_keystore())
        return self._keys_and_names()

    def _keys_and_names(self) -> tuple[dict[str, str], dict[str, str]]:
        keys: dict[str, str] = {}
        names: dict[str, str] = dict(self.cfg.names)
        for e in self.keystore.entries():
            if e.bindkey:
                keys[e.mac] = e.bindkey
            if e.name:
                names.setdefault(e.mac, e.name)
        return keys, names

    async def run(self) -> Gateway:
        cfg = self.cfg
        sources_urls = cfg.sources or ["bleak:"]
        try:
            sources: list[Source] = [
                self.sim_source
                if self.sim_source is not None and u.startswith("sim:")
                else open_source(u, passive=cfg.passive, replay_speed=cfg.replay_speed)
                for u in sources_urls
            ]
        except SourceError as e:
            raise ConfigError(str(e)) from e
        from .history import History, HistoryError
        from .keystore import KeystoreError

        try:
            keys, names = self._load_keys()
        except KeystoreError as e:
            raise ConfigError(f"the keystore cannot be used: {e}") from e
        try:
            self.history = History(cfg.db or default_db())
        except (HistoryError, OSError, sqlite3.DatabaseError) as e:
            raise ConfigError(f"the history database {cfg.db or default_db()} cannot be opened: {e}") from e
        counters: dict[str, int] = {}
        raw = self.history.get_state("counters")
        if raw:
            with contextlib.suppress(ValueError, TypeError):
                counters = {k: int(v) for k, v in json.loads(raw).items()}
        gw = self.gateway = Gateway(
            keys, names=names, counters=counters, options=GatewayOptions(publish_unknown=cfg.publish_unknown)
        )
        gw.sinks.append(HistorySink(self.history))
        if cfg.print:
            gw.sinks.append(PrintSink(self._write))
        background: list[asyncio.Task[Any]] = [
            asyncio.create_task(self._flusher(), name="history-flush"),
            asyncio.create_task(self._watch_keystore(), name="keystore-watch"),
        ]
        if cfg.mqtt:
            from .mqtt import MqttPublisher, MqttSettings

            settings = MqttSettings.from_url(
                cfg.mqtt, publish_unknown=cfg.publish_unknown, min_interval=cfg.min_interval
            )
            replay = all(u.startswith("capture:") for u in sources_urls)
            # a replay is rate-limited by the capture's own clock, so an old capture publishes as it happened
            self.publisher = MqttPublisher(settings, clock=(lambda: gw.clock) if replay else None)
            gw.sinks.append(MqttSink(self.publisher))
            background.append(asyncio.create_task(self.publisher.run(), name="mqtt"))
            background.append(asyncio.create_task(self._availability(), name="availability"))

        if cfg.web:
            await self._start_web()
        writer = None
        if self.capture_path:
            from .captures import JsonlWriter

            writer = JsonlWriter(self.capture_path)

        emit: Any = gw.handle  # the hot path: one call per advertisement
        if writer is not None:

            def emit(adv: Any) -> None:
                writer.write(adv)
                gw.handle(adv)

        src_tasks = [asyncio.create_task(s.run(emit), name=f"source:{s.name}") for s in sources]
        try:
            pending = set(src_tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    exc = t.exception()
                    if exc is not None:
                        if isinstance(exc, SourceError):
                            raise ConfigError(str(exc)) from exc
                        raise exc
                for t in background:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
            if cfg.follow:
                await asyncio.Event().wait()
        finally:
            for t in src_tasks:
                t.cancel()
            await asyncio.gather(*src_tasks, return_exceptions=True)
            await self._shutdown(background)
            if writer is not None:
                writer.close()
        return gw

    async def _start_web(self) -> None:
        from .web.app import WEB_KEY, serve

        try:
            try:
                self.web_runner = await serve(self, self.cfg.web_bind, password=self.cfg.web_password)
            except OSError:
                if not self.web_any_port:
                    raise
                host = self.cfg.web_bind.rpartition(":")[0] or "127.0.0.1"
                self.web_runner = await serve(self, f"{host}:0", password=self.cfg.web_password)
        except OSError as e:
            raise ConfigError(
                f"the dashboard cannot listen on {self.cfg.web_bind}: {e.strerror or e}. Choose another address "
                "with --web-bind HOST:PORT, or run without the dashboard (--no-web)"
            ) from e
        self.web_url = self.web_runner.app[WEB_KEY].url
        log.warning("dashboard: %s", self.web_url)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def _flusher(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.history.flush)
            n += 1
            self._save_counters()  # replay protection must survive a kill -9: at most a second behind
            if n % 10 == 0 and self.gateway is not None:
                snap = self.gateway.cache.snapshot()  # on the loop (the cache is not locked); cheap: references
                await asyncio.to_thread(self._save_frames, snap)
            if n % 3600 == 0:
                await asyncio.to_thread(self.history.prune, self.cfg.raw_days)

    def _save_frames(self, snap: list[Any] | None = None) -> None:
        """Snapshot the recent-frame cache so that `mitherm doctor --mac … --key …` answers at once."""
        if self.gateway is None or not self.frames_snapshot:
            return
        from .captures import write_jsonl_line
        from .framecache import FrameCache

        if snap is None:
            snap = self.gateway.cache.snapshot()
        frames = FrameCache.snapshot_advertisements(snap)  # one advertisement at a time: no big list

        path = Path(self.frames_snapshot)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                for adv in frames:
                    f.write(write_jsonl_line(adv) + "\n")
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write the recent-frame snapshot %s: %s", path, e)

    def _save_counters(self) -> None:
        if self.gateway is not None and self.history is not None and self.gateway.counters != self._saved_counters:
            self._saved_counters = dict(self.gateway.counters)
            self.history.set_state("counters", json.dumps(self._saved_counters))

    async def _availability(self) -> None:
        """Mark devices unavailable once they have been silent longer than their expire_after (judged by the
        advertisements' clock, so replays behave as they happened); publish_state marks them online again."""
        from .mqtt import expire_after_for

        offline: set[str] = set()
        while True:
            await asyncio.sleep(5.0)
            gw = self.gateway
            if gw is None or self.publisher is None:
                continue
            for mac, st in gw.devices.items():
                silent = gw.clock - st.last_seen > expire_after_for(st.data_interval)
                if silent and mac not in offline and st.values:
                    offline.add(mac)
                    self.publisher.set_available(mac, False)
                elif not silent:
                    offline.discard(mac)

    async def _watch_keystore(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            if self.keystore.reload_if_changed() and self.gateway is not None:
                keys, names = self._keys_and_names()
                changed = self.gateway.set_keys(keys, names)
                log.warning("keystore changed: %d device key(s) updated", len(changed))

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        if self.web_runner is not None:
            with contextlib.suppress(Exception):
                await self.web_runner.cleanup()
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.publisher.stop(timeout=10), 15)
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._save_frames()
        if self.history is not None:
            self._save_counters()
            self.history.flush()
            self.history.close()

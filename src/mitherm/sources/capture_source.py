"""Replay of a capture (btsnoop or mitherm JSON Lines), at recorded pace or as fast as possible.

Advertisements keep the capture's own timestamps, so everything judged by time (availability, dedupe
windows, rate limits) sees the capture's clock."""

from __future__ import annotations

import asyncio
import time
from itertools import islice
from pathlib import Path

from . import Emit, SourceError


class CaptureSource:
    def __init__(self, path: str, speed: str | float = "max", name: str | None = None) -> None:
        if not path:
            raise SourceError("capture: needs a file, e.g. capture:/tmp/adverts.jsonl")
        if path != "-" and not Path(path).is_file():
            raise SourceError(f"capture file {path} does not exist")
        self.path = path
        if speed in ("max", None, 0):
            self.speed: float | None = None
        else:
            try:
                self.speed = float(speed)
            except ValueError as e:
                raise SourceError(f"--replay-speed must be 'max' or a number, not {speed!r}") from e
            if self.speed <= 0:
                raise SourceError("--replay-speed must be positive")
        self.name = name or f"capture:{Path(path).name}"

    async def run(self, emit: Emit) -> None:
        from ..captures import CaptureError, read_capture

        try:
            # each record keeps its own receiver; the ones that name none get the file name
            advs = read_capture(self.path, default_source=self.name)
            if self.speed is None:
                while True:
                    n = 0
                    for adv in islice(advs, 2000):
                        emit(adv)
                        n += 1
                    if n < 2000:
                        return
                    await asyncio.sleep(0)  # let the sinks (MQTT, web) run during a fast replay
            start_wall = time.monotonic()
            start_cap: float | None = None
            for adv in advs:
                if start_cap is None:
                    start_cap = adv.time
                due = (adv.time - start_cap) / self.speed - (time.monotonic() - start_wall)
                if due > 0:
                    await asyncio.sleep(due)
                emit(adv)
        except CaptureError as e:
            raise SourceError(str(e)) from e

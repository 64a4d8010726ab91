"""The shared test vectors (real frames from public test suites), loaded once.

Search order: ``$MITHERM_VECTORS``, ``tests/data/vectors.jsonl``, ``../shared/vectors/vectors.jsonl`` next to
the repository (the project's shared folder)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
CANDIDATES = (
    Path(os.environ["MITHERM_VECTORS"]) if os.environ.get("MITHERM_VECTORS") else None,
    _HERE / "data" / "vectors.jsonl",
    _HERE.parent.parent / "shared" / "vectors" / "vectors.jsonl",
    Path("/work/shared/vectors/vectors.jsonl"),
)


@dataclass(frozen=True, slots=True)
class Vector:
    line: int
    source: str
    model: str
    format: str
    mac: str
    service_uuid: int
    payload: bytes
    bindkey: str | None
    expected: dict[str, Any]
    category: str

    @property
    def test_name(self) -> str:
        return self.source.rsplit("::", 1)[-1]

    @property
    def id(self) -> str:
        return f"{self.test_name}-L{self.line}"

    @property
    def is_error(self) -> bool:
        return "decode_error" in self.expected


def vectors_path() -> Path:
    for p in CANDIDATES:
        if p is not None and p.is_file():
            return p
    raise FileNotFoundError(
        "vectors.jsonl not found; set MITHERM_VECTORS or copy shared/vectors/vectors.jsonl to tests/data/"
    )


@cache
def load_vectors() -> tuple[Vector, ...]:
    out = []
    with vectors_path().open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            out.append(
                Vector(
                    line=line_no,
                    source=d["source"],
                    model=d.get("model", ""),
                    format=d["format"],
                    mac=d["mac"],
                    service_uuid=int(d["service_uuid"], 16),
                    payload=bytes.fromhex(d["data_hex"]),
                    bindkey=d.get("bindkey"),
                    expected=d["expected"],
                    category=d.get("category", ""),
                )
            )
    return tuple(out)

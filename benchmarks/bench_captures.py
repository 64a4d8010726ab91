"""Capture reading and writing: the parsing cost of a replay (``mitherm run --source capture:FILE``) and the
cost of writing JSON Lines (``JsonlWriter``, the gateway's recent-frame snapshot).

    .venv/bin/python benchmarks/bench_captures.py                       # the gateway benchmark's capture
    .venv/bin/python benchmarks/bench_captures.py --file X.jsonl --runs 9 --baseline HEAD~1

Prints, best of ``--runs`` runs by ``time.process_time()`` (old and new take turns in each run, so a noisy
machine treats both alike):

* reading the canonical JSON Lines capture: adverts/s of ``read_capture`` and of a fast replay through
  ``CaptureSource.run`` (no sink), next to the validating JSON path alone (the same file through a text
  stream, one ``json`` decode per line) and, when ``--baseline`` names a git revision, that revision's
  reader and CaptureSource;
* reading a btsnoop file written from the same adverts (H4, as Android writes): adverts/s, new vs baseline;
* writing: lines/s of ``write_jsonl_line`` over distinct adverts, new vs the ``json.dumps`` formulation
  (which the new one must equal byte for byte: checked on every line written here).

The capture is the one ``benchmarks/bench_gateway.py --frames 200000 --no-mqtt`` generates (and caches in
the temp directory); run that first if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitherm import captures
from mitherm.sources import capture_source

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = Path(tempfile.gettempdir()) / "mitherm-bench-v1-500dev-200000fr.jsonl"


def load_revision(rev: str) -> tuple[Any, Any] | None:
    """(captures, capture_source) modules as they are at git revision ``rev``, or None."""

    def show(path: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    cap_src, source_src = show("src/mitherm/captures.py"), show("src/mitherm/sources/capture_source.py")
    if cap_src is None or source_src is None:
        return None
    cap = types.ModuleType("baseline_captures")
    exec(compile(cap_src, f"{rev}:captures.py", "exec"), cap.__dict__)
    src = types.ModuleType("mitherm.sources.baseline_capture_source")
    src.__package__ = "mitherm.sources"
    sys.modules["mitherm.baseline_captures"] = cap  # its `from ..captures import` below reads the baseline
    source_src = source_src.replace("from ..captures import", "from ..baseline_captures import")
    exec(compile(source_src, f"{rev}:capture_source.py", "exec"), src.__dict__)
    return cap, src


def best_of(runs: int, cases: dict[str, Callable[[], int]]) -> dict[str, tuple[int, float]]:
    """name -> (items, best seconds of process time); the cases take turns in every run."""
    best = {name: (0, float("inf")) for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            start = time.process_time()
            n = fn()
            spent = time.process_time() - start
            if spent < best[name][1]:
                best[name] = (n, spent)
    return best


def report(title: str, unit: str, results: dict[str, tuple[int, float]], reference: str | None) -> None:
    print(f"\n{title}")
    base = results[reference][1] / results[reference][0] if reference in results else None
    for name, (n, spent) in results.items():
        per_item = spent / n
        ratio = f"  x{base / per_item:4.2f}" if base else ""
        print(f"  {name:50s} {n / spent:>10,.0f} {unit}/s  {per_item * 1e6:6.2f} µs{ratio}")


def count(iterator: Any) -> int:
    n = 0
    for _ in iterator:
        n += 1
    return n


def replay(module: Any, path: str) -> int:
    n = 0

    def emit(_adv: Any) -> None:
        nonlocal n
        n += 1

    asyncio.run(module.CaptureSource(path).run(emit))
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE, help="canonical mitherm JSON Lines capture")
    ap.add_argument("--runs", type=int, default=5, help="runs of each case; the best counts (default 5)")
    ap.add_argument("--baseline", default="HEAD", help="git revision to compare with ('' for none)")
    ap.add_argument("--write-lines", type=int, default=50_000, help="adverts written per run (default 50000)")
    args = ap.parse_args()
    if not args.file.exists():
        sys.exit(f"{args.file} is missing: `.venv/bin/python benchmarks/bench_gateway.py --frames 200000 --no-mqtt`")
    path = str(args.file)
    baseline = load_revision(args.baseline) if args.baseline else None
    label = f"baseline {args.baseline}"
    if args.baseline and baseline is None:
        print(f"(no git revision {args.baseline}: baseline columns left out)")
    print(f"capture {path}, best of {args.runs} runs, process time")

    # ---------------------------------------------------------------- reading JSON Lines
    text = args.file.read_text(encoding="utf-8")
    cases: dict[str, Callable[[], int]] = {}
    if baseline:
        cases[f"read_capture, {label}"] = lambda: count(baseline[0].read_capture(path))
    cases["validating JSON path (text stream, json per line)"] = lambda: count(captures.read_jsonl(io.StringIO(text)))
    cases["read_capture, new"] = lambda: count(captures.read_capture(path))
    lines = text.count("\n")
    cases["read_capture, new, drained by a deque"] = lambda: (
        collections.deque(captures.read_capture(path), maxlen=0),
        lines,
    )[1]
    if baseline:
        cases[f"CaptureSource.run (fast replay), {label}"] = lambda: replay(baseline[1], path)
    cases["CaptureSource.run (fast replay), new"] = lambda: replay(capture_source, path)
    first = next(iter(cases))
    report("reading the canonical JSON Lines capture", "adverts", best_of(args.runs, cases), first)

    # ---------------------------------------------------------------- reading btsnoop
    advs = list(captures.read_capture(path))
    with tempfile.TemporaryDirectory() as tmp:
        snoop = str(Path(tmp) / "bench.btsnoop")
        captures.write_btsnoop(snoop, advs, datalink=captures.DATALINK_HCI_H4)
        cases = {}
        if baseline:
            cases[f"read_btsnoop, {label}"] = lambda: count(baseline[0].read_btsnoop(snoop))
        cases["read_btsnoop, new"] = lambda: count(captures.read_btsnoop(snoop))
        assert list(captures.read_btsnoop(snoop, source="x"))[:2000] == [
            captures.Advertisement(**{**{f: getattr(a, f) for f in a.__slots__}, "source": "x"}) for a in advs[:2000]
        ]
        report(f"reading btsnoop (H4, {len(advs):,} adverts)", "adverts", best_of(args.runs, cases), next(iter(cases)))

    # ---------------------------------------------------------------- writing
    sample = advs[: args.write_lines]
    reference = captures._write_jsonl_line_json
    for adv in sample:
        if captures.write_jsonl_line(adv) != reference(adv):
            sys.exit(f"write_jsonl_line differs from json.dumps for {adv!r}")

    def write(fn: Callable[[Any], str]) -> int:
        for adv in sample:
            fn(adv)
        return len(sample)

    cases = {}
    if baseline:
        cases[f"write_jsonl_line, {label}"] = lambda: write(baseline[0].write_jsonl_line)
    cases["json.dumps formulation"] = lambda: write(reference)
    cases["write_jsonl_line, new"] = lambda: write(captures.write_jsonl_line)
    report(f"writing ({len(sample):,} distinct adverts)", "lines", best_of(args.runs, cases), next(iter(cases)))


if __name__ == "__main__":
    main()

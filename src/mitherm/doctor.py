"""The key doctor: given recent frames, say at once whether a bindkey works and, if not, why.

Decision order (issue #3): invalid_key, device_not_seen, placeholder_key, not_encrypted,
no_encrypted_frames, looks_like_token, then the key is tried on the device's data frames: ok,
key_outdated, key_of_other_device, wrong_key."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .bindkey import InvalidKey, clean_key_text, parse_bindkey
from .decoder import Decoder
from .framecache import Frame, FrameCache
from .mac import normalize_mac
from .model import ErrorCode, Reading


class Verdict(StrEnum):
    OK = "ok"
    WRONG_KEY = "wrong_key"
    KEY_OF_OTHER_DEVICE = "key_of_other_device"
    KEY_OUTDATED = "key_outdated"
    LOOKS_LIKE_TOKEN = "looks_like_token"
    PLACEHOLDER_KEY = "placeholder_key"
    NOT_ENCRYPTED = "not_encrypted"
    NO_ENCRYPTED_FRAMES = "no_encrypted_frames"
    DEVICE_NOT_SEEN = "device_not_seen"
    INVALID_KEY = "invalid_key"


#: verdicts that more listening can change (live mode keeps going on these)
UNDECIDED = frozenset({Verdict.DEVICE_NOT_SEEN, Verdict.NO_ENCRYPTED_FRAMES})
CUSTOM_ENCRYPTED = frozenset({"pvvx_enc", "atc1441_enc", "bthome_v1_enc", "bthome_v2_enc"})
LEGACY_ENCRYPTED = frozenset({"mibeacon_v2_enc", "mibeacon_v3_enc"})
RECENT = 10  # "most of the last ten"
OUTDATED_AFTER = 3  # failures after the last success that make a key outdated


@dataclass(slots=True)
class FrameCounts:
    total: int = 0
    with_data: int = 0
    decrypted: int = 0
    failed: int = 0

    def to_json(self) -> dict[str, int]:
        return {"total": self.total, "with_data": self.with_data, "decrypted": self.decrypted, "failed": self.failed}


@dataclass(slots=True)
class Diagnosis:
    mac: str
    verdict: Verdict
    advice: str
    format: str | None = None
    model: str | None = None
    frames: FrameCounts = field(default_factory=FrameCounts)
    last_data_frame_time: float | None = None
    first_seen: float | None = None
    other_device: str | None = None
    new_key_since: float | None = None
    seen_devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mac": self.mac,
            "verdict": self.verdict.value,
            "format": self.format,
            "model": self.model,
            "frames": self.frames.to_json(),
            "last_data_frame_time": _iso(self.last_data_frame_time),
            "advice": self.advice,
        }
        if self.other_device:
            d["other_device"] = self.other_device
        if self.new_key_since is not None:
            d["new_key_since"] = _iso(self.new_key_since)
        if self.verdict is Verdict.DEVICE_NOT_SEEN:
            d["seen_devices"] = self.seen_devices
        return d


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ago(t: float, now: float) -> str:
    s = max(0, now - t)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass(slots=True)
class _Classified:
    frame: Frame
    reading: Reading  # decoded without a key

    @property
    def is_data(self) -> bool:
        r = self.reading
        return (r.encrypted and r.error is not None and r.error.code is ErrorCode.NO_KEY) or (
            r.error is None and r.has_data
        )

    @property
    def is_encrypted_data(self) -> bool:
        r = self.reading
        return r.encrypted and r.error is not None and r.error.code is ErrorCode.NO_KEY


_PLAIN = Decoder()


def _classify(frames: Iterable[Frame]) -> list[_Classified]:
    return [_Classified(f, _PLAIN.decode(f.mac, f.service_uuid, f.payload, key=None)) for f in frames]


def _try(frame: Frame, key: str) -> bool:
    r = _PLAIN.decode(frame.mac, frame.service_uuid, frame.payload, key=key)
    return r.error is None


def _model_of(classified: list[_Classified], cache: FrameCache, mac: str) -> str | None:
    for c in reversed(classified):
        if c.reading.model and c.reading.model not in ("ATC", "BTHome"):
            return c.reading.model
    for c in reversed(classified):
        if c.reading.model:
            return c.reading.model
    return cache.name(mac)


def describe_device(cache: FrameCache, mac: str) -> dict[str, Any]:
    classified = _classify(cache.frames(mac))
    fmt = next((c.reading.format for c in reversed(classified) if c.is_data), None) or next(
        (c.reading.format for c in reversed(classified) if c.reading.format), None
    )
    return {
        "mac": mac,
        "name": cache.name(mac),
        "model": _model_of(classified, cache, mac),
        "format": fmt,
        "frames": len(classified),
    }


def diagnose(cache: FrameCache, mac: str, key: str | None, *, now: float | None = None) -> Diagnosis:
    """Judge ``key`` for device ``mac`` against the frames in ``cache``."""
    mac = normalize_mac(mac)
    key_text = clean_key_text(key or "")
    frames = cache.frames(mac)
    now = now if now is not None else (frames[-1].time if frames else 0.0)

    # 1. invalid_key
    try:
        parse_bindkey(key_text)
    except InvalidKey as e:
        return Diagnosis(
            mac,
            Verdict.INVALID_KEY,
            advice=(
                f"The key is unusable: {e}. Copy the bindkey again (from `mitherm cloud keys`, the activation output, "
                "or the custom firmware's flasher page); a bindkey is 32 hex digits, a legacy v2/v3 key 24."
            ),
        )

    # 2. device_not_seen
    if not frames:
        seen = [describe_device(cache, m) for m in cache.macs()]
        listing = "; ".join(f"{d['mac']} ({d['model'] or d['name'] or d['format'] or 'unknown'})" for d in seen[:10])
        advice = (
            f"No frame from {mac} was received. Check the address (it is printed on the box and shown by "
            "`mitherm scan`), move the receiver closer, and make sure no phone app or flasher page is "
            "connected to the sensor (it stops advertising while connected)."
        )
        if seen:
            advice += f" Xiaomi-family devices that were seen: {listing}."
        else:
            advice += " No Xiaomi-family device was seen at all: is the receiver working?"
        return Diagnosis(mac, Verdict.DEVICE_NOT_SEEN, advice=advice, seen_devices=seen)

    classified = _classify(frames)
    data = [c for c in classified if c.is_data]
    enc = [c for c in data if c.is_encrypted_data]
    counts = FrameCounts(total=len(classified), with_data=len(data))
    fmt = data[-1].reading.format if data else None
    model = _model_of(classified, cache, mac)
    last_data = data[-1].frame.time if data else None
    dx = Diagnosis(
        mac,
        Verdict.OK,
        advice="",
        format=fmt,
        model=model,
        frames=counts,
        last_data_frame_time=last_data,
        first_seen=frames[0].time,
    )

    # 3. placeholder_key
    if set(key_text) <= {"f"} or set(key_text) <= {"0"}:
        dx.verdict = Verdict.PLACEHOLDER_KEY
        dx.advice = (
            "This is a placeholder, not a key: the Xiaomi cloud returns all-F when it has no key stored "
            "for the device. Remove the device from Xiaomi Home and add it again, then fetch the key "
            "again (`mitherm cloud keys`), or use `mitherm activate` where the firmware allows it."
        )
        return dx

    # 4. not_encrypted
    if data and not enc:
        dx.verdict = Verdict.NOT_ENCRYPTED
        dx.advice = (
            f"{mac} sends unencrypted {fmt} frames: no key is needed. Remove the key, or, if you "
            "want encrypted beacons, enable them in the custom firmware and set its bindkey."
        )
        return dx

    # 5. no_encrypted_frames
    if not enc:
        waited = _ago(frames[0].time, now)
        dx.verdict = Verdict.NO_ENCRYPTED_FRAMES
        dx.advice = (
            f"{len(classified)} frame(s) from {mac} over {waited}, but none carries encrypted data yet "
            "(stock sensors send an encrypted reading only about every 10 minutes, idle frames in "
            "between). Keep listening: `mitherm doctor --live` waits for one."
        )
        return dx

    enc_format = enc[-1].reading.format
    dx.format = enc_format

    # 6. looks_like_token
    if len(key_text) == 24 and enc_format not in LEGACY_ENCRYPTED:
        dx.verdict = Verdict.LOOKS_LIKE_TOKEN
        dx.advice = (
            "24 hex digits is the length of the 12-byte Mi token (or of a legacy v2/v3 key), but this "
            f"device sends {enc_format} frames, which need the 32-digit bindkey. Look for the field "
            "labelled 'BLE KEY' / 'bindkey', not 'TOKEN'."
        )
        return dx

    # 7. try the key on the data frames, oldest first
    results = [_try(c.frame, key_text) for c in enc]
    counts.decrypted = sum(results)
    counts.failed = len(results) - counts.decrypted
    # ok when the newest data frame decrypts; key_outdated when the key decrypted earlier frames and fails on
    # at least three after the last one it decrypted (checked before the "most of the last ten" rule, so that a
    # sensor re-paired half an hour ago is not called fine); ok again when most of the last ten decrypt
    # (noisy reception).
    outdated_after: list[bool] = []
    if any(results) and not results[-1]:
        last_ok = max(i for i, ok in enumerate(results) if ok)
        outdated_after = results[last_ok + 1 :]
    recent = results[-RECENT:]
    if results[-1] or (len(outdated_after) < OUTDATED_AFTER and sum(recent) * 2 > len(recent)):
        dx.verdict = Verdict.OK
        dx.advice = f"The key decrypts {mac}'s frames ({counts.decrypted} of {len(results)})."
        first_ok = results.index(True)
        older = first_ok  # failures before the first success: frames sent under an earlier key
        scattered = counts.failed - older
        if older:
            dx.advice += (
                f" The {older} oldest data frame(s) were sent under an earlier key (the device was re-paired); "
                "everything since decrypts."
            )
        if scattered:
            dx.advice += (
                f" {scattered} frame(s) did not decrypt: that is noisy reception (weak signal or a "
                "low battery corrupts frames), not a key problem. Move the receiver closer if it "
                "happens often."
            )
        return dx
    if len(outdated_after) >= OUTDATED_AFTER:
        since = enc[len(results) - len(outdated_after)].frame.time
        dx.verdict = Verdict.KEY_OUTDATED
        dx.new_key_since = since
        dx.advice = (
            f"The key worked for older frames but not for the {len(outdated_after)} newest data frames, which "
            f"started {_iso(since)} ({_ago(since, now)} ago): the device was re-paired or re-activated "
            "and has a new key. Fetch the current key (`mitherm cloud keys` after re-adding it in "
            "Xiaomi Home, or the key printed by the last activation)."
        )
        return dx

    # key_of_other_device
    for other in cache.macs():
        if other == mac:
            continue
        other_enc = [c for c in _classify(cache.frames(other)) if c.is_encrypted_data][-3:]
        if any(_try(c.frame, key_text) for c in other_enc):
            desc = describe_device(cache, other)
            label = f"{other}" + (f" ({desc['model'] or desc['name']})" if desc["model"] or desc["name"] else "")
            dx.verdict = Verdict.KEY_OF_OTHER_DEVICE
            dx.other_device = other
            dx.advice = (
                f"This key belongs to another device: it decrypts the frames of {label}. Keys are per "
                f"device; match keys by MAC (the cloud lists the MAC of each) and use the key of {mac}."
            )
            return dx

    dx.verdict = Verdict.WRONG_KEY
    dx.advice = (
        f"The key fails the integrity check on all {len(results)} data frame(s) from {mac}. "
        if not counts.decrypted
        else f"The key fails the integrity check on {counts.failed} of {len(results)} data frames from {mac}, "
        "including the newest. "
    )
    if enc_format in CUSTOM_ENCRYPTED:
        dx.advice += (
            "This device runs custom firmware (pvvx/ATC/BTHome encrypted beacons): it uses its own "
            "bindkey, set or read with the flasher or `mitherm` pvvx command 0x18, not the Mi key from "
            "the cloud or an activation."
        )
    else:
        dx.advice += (
            "Common causes: the key predates a re-pairing (every pairing makes a new key), the key of "
            "another device was copied, or a typo. Fetch the key again for exactly this MAC."
        )
    return dx

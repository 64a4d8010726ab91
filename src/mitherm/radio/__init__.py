"""Radios for mitherm: a virtual Bumble link for simulated devices, and a bleak backend over Bumble.

``mitherm.radio.virtual`` (VirtualRadio, VirtualAdvertiser) and ``mitherm.radio.bleak_backend``
(BumbleScanner, open_scanner) are imported on demand, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mitherm.radio.bleak_backend import BumbleScanner, open_scanner
    from mitherm.radio.virtual import VirtualAdvertiser, VirtualRadio

__all__ = ["BumbleScanner", "VirtualAdvertiser", "VirtualRadio", "open_scanner"]

_WHERE = {
    "VirtualRadio": "mitherm.radio.virtual",
    "VirtualAdvertiser": "mitherm.radio.virtual",
    "BumbleScanner": "mitherm.radio.bleak_backend",
    "open_scanner": "mitherm.radio.bleak_backend",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The dashboard served by ``mitherm run``: devices, history plots, keys with the doctor's verdict.

Plain HTML/CSS/JS from ``static/`` (uPlot vendored, no CDN, no build step) over a small JSON + SSE API in
:mod:`mitherm.web.app`."""

from __future__ import annotations

from .app import WebSink, create_app, serve

__all__ = ["WebSink", "create_app", "serve"]

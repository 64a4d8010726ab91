"""Xiaomi cloud access: log in once, list BLE devices with their bindkeys (issue #8).

:mod:`mitherm.cloud.crypto` holds the sans-I/O parts (RC4, nonces, signatures); :mod:`mitherm.cloud.client`
the async HTTP client. The command line is :mod:`mitherm.commands.cloud`."""

from . import client as _client
from .client import *  # noqa: F403  (the public names are client's __all__, listed once there)

__all__ = list(_client.__all__)

"""GATT connections to thermometers (real adapters through bleak, virtual devices through the
Bumble bleak backend). See :mod:`mitherm.gatt.link`."""

from mitherm.gatt.link import DEFAULT_OP_TIMEOUT, GattError, GattLink, connect, normalize_uuid

__all__ = ["DEFAULT_OP_TIMEOUT", "GattError", "GattLink", "connect", "normalize_uuid"]

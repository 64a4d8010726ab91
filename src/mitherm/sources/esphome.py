"""An ESPHome Bluetooth proxy as a source, through its native API (aioesphomeapi), raw advertisements.

The proxy sends batches of ``BluetoothLERawAdvertisement`` records (48-bit address as an integer, rssi,
address type, raw AD bytes of advert + scan response); each becomes one Advertisement stamped on receipt.

Mind the one-subscriber-per-proxy rule: a proxy serves advertisements to one API client at a time. A proxy
that Home Assistant also uses should be read through HA instead (``hass://``), or be dedicated to mitherm.

URL form: ``esphome://HOST[:PORT]?key=NOISE_PSK`` (the base64 API encryption key, URL-encoded)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..captures import parse_ad_structures
from ..model import Advertisement
from . import Emit, SourceError
from ._common import source_options, split_source_url
from .reconnect import ReconnectingSource, connected

log = logging.getLogger(__name__)

#: ESP-IDF / NimBLE address types: 0 public, 1 random, 2 public identity (RPA resolved), 3 random identity.
_ADDRESS_TYPES = {0: "public", 1: "random", 2: "public", 3: "random"}
#: BluetoothProxyFeature.RAW_ADVERTISEMENTS (bit 5).
_FEATURE_RAW_ADVERTISEMENTS = 1 << 5


def mac_from_int(address: int) -> str:
    """0xA4C138123456 -> 'A4:C1:38:12:34:56'."""
    h = f"{address & 0xFFFFFFFFFFFF:012X}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def advertisement_from_raw(address: int, rssi: int, address_type: int, data: bytes, source: str) -> Advertisement:
    service_data, manufacturer_data, name = parse_ad_structures(bytes(data))
    return Advertisement(
        mac=mac_from_int(address),
        time=time.time(),
        service_data=service_data,
        rssi=rssi,
        name=name,
        address_type=_ADDRESS_TYPES.get(address_type),
        manufacturer_data=manufacturer_data,
        source=source,
    )


def check_noise_psk(psk: str) -> None:
    import base64
    import binascii

    try:
        raw = base64.b64decode(psk, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise SourceError(
            "the ESPHome API encryption key must be the base64 text of 32 bytes (44 characters ending in '=') "
            "as in the device's `api: encryption: key:`; in a URL, write '+' as %2B, '/' as %2F and '=' as %3D"
        )


class EsphomeSource(ReconnectingSource):
    """Raw advertisements from one ESPHome Bluetooth proxy, reconnecting forever."""

    _log = log

    def __init__(
        self,
        host: str,
        port: int = 6053,
        noise_psk: str | None = None,
        name: str | None = None,
        *,
        reconnect_initial: float = 1.0,
        reconnect_maximum: float = 60.0,
        keepalive: float = 20.0,
    ) -> None:
        if not host:
            raise SourceError("esphome: needs a host, e.g. esphome://kitchen-proxy.local?key=BASE64KEY")
        if noise_psk:
            check_noise_psk(noise_psk)
        self.host = host
        self.port = port
        self.noise_psk = noise_psk or None
        self.name = name or f"esphome:{host}"
        self._fixed_name = name
        self._proxy_name: str | None = None
        self.reconnect_initial = reconnect_initial
        self.reconnect_maximum = reconnect_maximum
        self.keepalive = keepalive

    def _label(self) -> str:
        return f"esphome {self._proxy_name or self.host}"

    def _secrets(self) -> tuple[str, ...]:
        return (self.noise_psk or "",)

    async def _connect_once(self, emit: Emit) -> None:
        from aioesphomeapi import APIClient
        from aioesphomeapi.core import (
            BadNameAPIError,
            EncryptionPlaintextAPIError,
            InvalidAuthAPIError,
            InvalidEncryptionKeyAPIError,
            RequiresEncryptionAPIError,
        )

        client = APIClient(
            self.host,
            self.port,
            None,
            client_info="mitherm",
            noise_psk=self.noise_psk,
            keepalive=self.keepalive,
        )
        lost = asyncio.Event()

        async def on_stop(expected_disconnect: bool) -> None:
            lost.set()

        try:
            await client.connect(on_stop=on_stop, login=True, log_errors=False)
        except InvalidEncryptionKeyAPIError as e:
            raise SourceError(
                f"ESPHome proxy {self.host} rejected the encryption key: use the `api: encryption: key:` "
                "of that device (base64, 44 characters)"
            ) from e
        except RequiresEncryptionAPIError as e:
            raise SourceError(
                f"ESPHome proxy {self.host} requires encryption: add ?key=BASE64KEY (its `api: encryption: key:`)"
            ) from e
        except EncryptionPlaintextAPIError as e:
            raise SourceError(
                f"ESPHome proxy {self.host} does not use encryption: remove ?key= from the source URL"
            ) from e
        except InvalidAuthAPIError as e:
            raise SourceError(
                f"ESPHome proxy {self.host} wants an API password; mitherm supports only encryption keys "
                "(API passwords were removed in ESPHome 2026.1): configure `api: encryption: key:`"
            ) from e
        except BadNameAPIError as e:
            raise SourceError(f"ESPHome device at {self.host} is not the expected device: {e}") from e

        unsubscribe: Any = None
        try:
            info = await client.device_info()
            self._proxy_name = info.name or self.host
            receiver = self._fixed_name or info.name or self.host
            flags = await self._proxy_flags(client, info)
            if flags == 0:
                raise SourceError(
                    f"ESPHome device {info.name or self.host} is not a Bluetooth proxy: add "
                    "`bluetooth_proxy:` (and `esp32_ble_tracker:`) to its configuration"
                )
            if flags is not None and not flags & _FEATURE_RAW_ADVERTISEMENTS:
                log.warning(
                    "%s: the firmware does not announce raw advertisements (ESPHome >= 2022.12 needed); "
                    "it may send nothing",
                    self._label(),
                )

            def on_adverts(msg: Any) -> None:
                for adv in msg.advertisements:
                    emit(advertisement_from_raw(adv.address, adv.rssi, adv.address_type, adv.data, receiver))

            unsubscribe = client.subscribe_bluetooth_le_raw_advertisements(on_adverts)
            connected()
            await lost.wait()
        finally:
            if not lost.is_set():
                await _close(client, unsubscribe)
        raise ConnectionError("the proxy closed the connection")

    async def _proxy_flags(self, client: Any, info: Any) -> int | None:
        """The proxy's Bluetooth feature flags; None when the device would not say (never fatal)."""
        try:
            async with asyncio.timeout(5.0):
                caps = await client.device_capabilities_compat(info)
            return int(caps.bluetooth_proxy.feature_flags)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.debug("%s: no capabilities (%s)", self._label(), e)
            return None


async def _close(client: Any, unsubscribe: Any) -> None:
    if unsubscribe is not None:
        try:
            unsubscribe()
        except Exception as e:
            log.debug("unsubscribe failed: %s", e)
    try:
        async with asyncio.timeout(2.0):
            await client.disconnect()
    except asyncio.CancelledError:
        client.force_disconnect()
        raise
    except Exception:
        client.force_disconnect()


def esphome_from_url(url: str, name: str | None = None) -> EsphomeSource:
    """``esphome://HOST[:PORT]?key=NOISE_PSK[&name=RECEIVER]``."""
    example = "esphome://kitchen-proxy.local:6053?key=BASE64KEY (the key URL-encoded: + as %2B, / as %2F, = as %3D)"
    parts, port = split_source_url(url, f"bad ESPHome source {url!r}", example)
    if parts.scheme.lower() != "esphome" or not parts.hostname or parts.path not in ("", "/"):
        raise SourceError(f"bad ESPHome source {url!r}; use {example}")
    query = source_options(parts, {"key", "name"}, "ESPHome", example)
    # parse_qs turns an unencoded '+' into a space; base64 never contains spaces, so undo that.
    key = (query.get("key") or [""])[-1].replace(" ", "+") or None
    return EsphomeSource(parts.hostname, port or 6053, noise_psk=key, name=(query.get("name") or [name])[-1])

"""mitherm: decode, verify keys, gateway and simulate Xiaomi-family BLE thermometers."""

from .decoder import Decoder
from .model import Advertisement, DecodeError, ErrorCode, Reading

__version__ = "0.1.0"
__all__ = ["Advertisement", "DecodeError", "Decoder", "ErrorCode", "Reading", "__version__"]

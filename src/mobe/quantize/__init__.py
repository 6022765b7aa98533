"""Stage 5: weight-only integer quantisation of any checkpoint mobe writes or reads (after compression, or alone)."""

from .checkpoint import QuantizeError, QuantizeReport, dequantize_native, quantize_checkpoint, stored_bytes
from .groupwise import dequantize, fake_quantize, pack, quantize, unpack

__all__ = [
    "QuantizeError",
    "QuantizeReport",
    "dequantize",
    "dequantize_native",
    "fake_quantize",
    "pack",
    "quantize",
    "quantize_checkpoint",
    "stored_bytes",
    "unpack",
]

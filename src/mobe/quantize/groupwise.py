"""Symmetric group-wise integer quantisation of weights, in plain torch (no module swapping here).

Each run of `group_size` consecutive entries along the last dimension shares one scale,
`s = max|w| / ((2^b - 1) / 2)`, and is stored as `q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)`; the weight read
back is `q * s`. It is the convention of compressed-tensors (llm-compressor's W4A16 / W8A16 schemes), so a factor
quantised here and a dense weight quantised by that library round alike. Unlike that library, the last group may
be shorter than `group_size` (factor ranks need not be multiples of it). 4-bit values are packed two per byte,
the even entry in the low nibble.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BITS = (4, 8)


def _check(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """(..., n) -> (..., ceil(n / group_size), group_size), the last group padded with zeros."""
    n = w.shape[-1]
    pad = math.ceil(n / group_size) * group_size - n
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.unflatten(-1, (-1, group_size))


def group_scales(w: Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None) -> Tensor:
    """Scales (..., ceil(n / group_size)) of `w` (..., n), in `dtype` (default: w's); zero groups get scale 1."""
    _check(bits, group_size)
    amax = _grouped(w.float(), group_size).abs().amax(dim=-1)
    scales = (amax / ((2**bits - 1) / 2)).to(dtype or w.dtype)
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def quantize(w: Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(int8 values (..., n) in [-2^(b-1), 2^(b-1) - 1], scales (..., ceil(n / group_size)) in `dtype`)."""
    scales = group_scales(w, bits, group_size, dtype)
    n = w.shape[-1]
    q = torch.round(_grouped(w.float(), group_size) / scales.float()[..., None])
    q = q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).flatten(-2)[..., :n]
    return q.to(torch.int8), scales


def dequantize(q: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype | None = None) -> Tensor:
    """q * s in `dtype` (default: the scales'); q is (..., n) int8, scales (..., ceil(n / group_size))."""
    n = q.shape[-1]
    out = _grouped(q.to(scales.dtype), group_size) * scales[..., None]
    return out.flatten(-2)[..., :n].to(dtype or scales.dtype)


def fake_quantize(w: Tensor, bits: int, group_size: int) -> Tensor:
    """The weight a quantised copy of `w` reads back as, in w's dtype."""
    q, scales = quantize(w, bits, group_size)
    return dequantize(q, scales, group_size, w.dtype)


def pack(q: Tensor, bits: int) -> Tensor:
    """Storage form of int8 values: 8-bit as they are, 4-bit two per uint8 (..., ceil(n / 2)), even entry low."""
    if bits == 8:
        return q.to(torch.int8)
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: int8 values (..., n)."""
    if bits == 8:
        return packed
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=-1).flatten(-2)[..., :n]
    return (q ^ 8) - 8  # sign-extend the nibble


def packed_shape(shape: tuple[int, ...] | list[int], bits: int) -> tuple[int, ...]:
    """Shape of the stored values of a tensor of `shape`."""
    *lead, n = shape
    return (*lead, n if bits == 8 else math.ceil(n / 2))


def scales_shape(shape: tuple[int, ...] | list[int], group_size: int) -> tuple[int, ...]:
    *lead, n = shape
    return (*lead, math.ceil(n / group_size))

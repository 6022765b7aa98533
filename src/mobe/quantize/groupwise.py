"""Symmetric group-wise integer quantisation of weights, in plain torch (no module swapping here).

Each run of `group_size` consecutive entries along the last dimension shares one scale,
`s = max|w| / ((2^b - 1) / 2)`, and is stored as `q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)`; the weight read
back is `q * s`. It is the convention of compressed-tensors (llm-compressor's W4A16 / W8A16 schemes), so a factor
quantised here and a dense weight quantised by that library round alike. Unlike that library, the last group may
be shorter than `group_size` (factor ranks need not be multiples of it). Values below 8 bits are packed densely
into bytes, little-endian along the row: entry k takes bits [b*k, b*(k+1)) of the row's bit stream, so 4-bit
values sit two per byte (the even entry in the low nibble), 2-bit four per byte and 3-bit eight per three bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BITS = (2, 3, 4, 8)


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


OBSERVERS = ("minmax", "mse")
SHRINK_GRID = tuple(1 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5 of the min-max scale


def group_scales(
    w: Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None, observer: str = "minmax"
) -> Tensor:
    """Scales (..., ceil(n / group_size)) of `w` (..., n), in `dtype` (default: w's); zero groups get scale 1.

    `observer`: "minmax" (the group's largest magnitude maps to the end of the range; compressed-tensors' and
    llm-compressor's default) or "mse" (`mse_scales`)."""
    _check(bits, group_size)
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    amax = _grouped(w.float(), group_size).abs().amax(dim=-1)
    scales = (amax / ((2**bits - 1) / 2)).to(dtype or w.dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    return mse_scales(w, bits, group_size, scales) if observer == "mse" else scales


def mse_scales(w: Tensor, bits: int, group_size: int, minmax: Tensor) -> Tensor:
    """Per group, the shrink of its min-max scale (`SHRINK_GRID`, as read back in the scales' dtype) whose rounding
    to nearest leaves the least squared error: clipping a few outliers buys finer steps for the rest. At 2 and 3 bits
    the min-max step is coarse enough that this matters (an MSE observer, as llm-compressor's; its grid and norm
    differ). Ties keep the larger scale."""
    groups = _grouped(w.float(), group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    best, best_error = minmax.clone(), torch.full(minmax.shape, math.inf)
    for shrink in SHRINK_GRID:
        scales = (minmax.float() * shrink).to(minmax.dtype)
        s = scales.float()[..., None]
        error = (torch.clamp(torch.round(groups / s), qmin, qmax) * s - groups).pow(2).sum(-1)
        better = error < best_error
        best = torch.where(better, scales, best)
        best_error = torch.where(better, error, best_error)
    return best


def quantize(w: Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(int8 values (..., n) in [-2^(b-1), 2^(b-1) - 1], scales (..., ceil(n / group_size)) in `dtype`)."""
    scales = group_scales(w, bits, group_size, dtype)
    return round_to_scales(w, scales, bits, group_size), scales


def round_to_scales(w: Tensor, scales: Tensor, bits: int, group_size: int) -> Tensor:
    """int8 values (..., n) of `w` rounded to nearest on the given group `scales`, clamped to the b-bit range."""
    n = w.shape[-1]
    q = torch.round(_grouped(w.float(), group_size) / scales.float()[..., None])
    return q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).flatten(-2)[..., :n].to(torch.int8)


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
    """Storage form of int8 values: 8-bit as they are; fewer bits packed densely, (..., ceil(n * bits / 8)) uint8."""
    if bits == 8:
        return q.to(torch.int8)
    n = q.shape[-1]
    pad = -n % 8  # eight values of b bits fill exactly b bytes
    values = torch.nn.functional.pad(q, (0, pad)).to(torch.int64) & ((1 << bits) - 1)
    words = (values.unflatten(-1, (-1, 8)) << (bits * torch.arange(8, device=q.device))).sum(-1)
    stream = (words.unsqueeze(-1) >> (8 * torch.arange(bits, device=q.device))) & 0xFF
    return stream.flatten(-2)[..., : math.ceil(n * bits / 8)].to(torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: int8 values (..., n)."""
    if bits == 8:
        return packed
    pad = -packed.shape[-1] % bits
    stream = torch.nn.functional.pad(packed, (0, pad)).to(torch.int64).unflatten(-1, (-1, bits))
    words = (stream << (8 * torch.arange(bits, device=packed.device))).sum(-1)
    values = (words.unsqueeze(-1) >> (bits * torch.arange(8, device=packed.device))) & ((1 << bits) - 1)
    values = values.flatten(-2)[..., :n]
    half = 1 << (bits - 1)
    return ((values ^ half) - half).to(torch.int8)  # sign-extend the b-bit field


def packed_shape(shape: tuple[int, ...] | list[int], bits: int) -> tuple[int, ...]:
    """Shape of the stored values of a tensor of `shape`."""
    *lead, n = shape
    return (*lead, n if bits == 8 else math.ceil(n * bits / 8))


def scales_shape(shape: tuple[int, ...] | list[int], group_size: int) -> tuple[int, ...]:
    *lead, n = shape
    return (*lead, math.ceil(n / group_size))


def stored_shape(shape: tuple[int, ...] | list[int], column_groups: bool) -> list[int]:
    """Logical shape of a factor's stored integers: its own, or its transpose where the groups run down its columns
    (the stored values are then the transpose, grouped along their last dimension)."""
    shape = list(shape)
    return [*shape[:-2], shape[-1], shape[-2]] if column_groups else shape


def dequantize_stored(
    packed: Tensor, scales: Tensor, shape: tuple[int, ...] | list[int], bits: int, group_size: int, column_groups: bool
) -> Tensor:
    """A factor of logical `shape` from its packed values and scales, in the scales' dtype."""
    q = unpack(packed, bits, stored_shape(shape, column_groups)[-1])
    out = dequantize(q, scales, group_size)
    return out.transpose(-2, -1) if column_groups else out

"""Block-wise FP8 weights, as DeepSeek-V3 and Kimi-K2 ship them: e4m3 values and one float32 scale per block.

A weight `W` (rows x cols) is stored as `q = W / s` in float8_e4m3fn and `W.weight_scale_inv = s`, one `s`
per `block` = (128, 128) tile (the last tiles may be partial); `W ~ q * s`. The config says so in
`quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FP8_DTYPE_NAMES = ("F8_E4M3",)
SCALE_SUFFIX = "_scale_inv"
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The (rows, cols) block of a block-wise FP8 checkpoint, or None when the config declares none."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
        return None
    rows, cols = quant["weight_block_size"]
    return int(rows), int(cols)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _expand(scale: Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> Tensor:
    """One scale per element: each block's scale repeated over its tile, cut to the matrix's size."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize_blockwise(weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """float32 W = q * s, tile by tile."""
    return weight.float() * _expand(scale_inv.float(), tuple(weight.shape), block)


def quantize_blockwise(weight: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(q, s) with s = max |W| / 448 per tile (the largest value of a tile maps to e4m3's largest)."""
    rows, cols = weight.shape
    br, bc = block
    w = weight.float()
    padded = torch.zeros(scale_shape((rows, cols), block)[0] * br, scale_shape((rows, cols), block)[1] * bc)
    padded[:rows, :cols] = w.abs()
    amax = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w / _expand(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale

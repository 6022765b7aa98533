"""MXFP4 expert weights, as the published gpt-oss checkpoints ship them.

An experts weight that the model holds as `W` (gpt-oss: `gate_up_proj` (E, d, 2p), `down_proj` (E, p, d)) is stored
transposed, per expert and output row, in groups of 32 values: `W_blocks` (E, out, in / 32, 16) uint8, two FP4 (e2m1)
codes per byte, low nibble first, and `W_scales` (E, out, in / 32) uint8, one power-of-two exponent per group, biased
by 127. The config says `quantization_config = {"quant_method": "mxfp4", ...}`.

The reader shows each such pair as the one tensor `W` the bf16 checkpoints hold, dequantised when read with
transformers' own routine (`integrations.mxfp4.convert_moe_packed_tensors`, what `from_pretrained` runs with
`Mxfp4Config(dequantize=True)`) into bfloat16, which holds every FP4 value times a power of two exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
DEQUANTIZED_DTYPE = torch.bfloat16
DEQUANTIZED_DTYPE_NAME = "BF16"  # as safetensors names it


def is_mxfp4(config: Mapping[str, Any]) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def packed_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Tensor `W` -> (`W_blocks`, `W_scales`) for every blocks tensor whose scales are there too."""
    names = set(names)
    out = {}
    for name in sorted(names):
        base = name.removesuffix(BLOCKS_SUFFIX)
        if name.endswith(BLOCKS_SUFFIX) and base + SCALES_SUFFIX in names:
            out[base] = (name, base + SCALES_SUFFIX)
    return out


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(E, out, in / 32, 16) blocks -> the (E, in, out) tensor they dequantise to."""
    experts, rows, groups, half = blocks_shape
    return experts, groups * half * 2, rows


def dequantize(blocks: Tensor, scales: Tensor) -> Tensor:
    """The (E, in, out) bfloat16 tensor of one blocks / scales pair (transformers' dequantisation)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=DEQUANTIZED_DTYPE)


def without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """An MXFP4 checkpoint's config for an output that holds its experts dequantised (no `quantization_config`)."""
    return {k: v for k, v in config.items() if k != "quantization_config"} if is_mxfp4(config) else config

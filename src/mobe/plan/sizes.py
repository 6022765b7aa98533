"""Exact stored bytes of a routed expert's matrix at a bit width, as `mobe quantize` writes it, from the checkpoint's
headers alone (compressed-tensors' own compressor run on zeros of one expert's shape)."""

from __future__ import annotations

import math
from functools import cache

import torch

from ..architectures import MoeLayout
from ..checkpoint import CheckpointReader
from ..config import QuantizeConfig
from ..quantize.checkpoint import _quantize_ct

MATRICES = ("gate", "up", "down")
DTYPE_SIZE = {"F32": 4, "BF16": 2, "F16": 2}
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def group_size_for(layout: MoeLayout, largest: int = 128) -> int:
    """The largest power of two up to `largest` that tiles both the experts' input sizes (compressed-tensors'
    groups must tile each row of a dense weight)."""
    size = largest
    while size > 1 and (layout.hidden_size % size or layout.intermediate_size % size):
        size //= 2
    return size


def expert_bytes(reader: CheckpointReader, layout: MoeLayout, matrix: str, bits: int, group: int) -> int:
    """Bytes of one routed expert's `matrix` stored at `bits` (16: as the source stores it)."""
    name = layout.arch.tensor_name(layout.moe_layers[0], 0, matrix)
    dtype = reader.dtype_name(name)
    return _stored_bytes(tuple(reader.shape(name)), dtype, bits, group)


@cache
def _stored_bytes(shape: tuple[int, ...], dtype: str, bits: int, group: int) -> int:
    if bits == 16:
        return math.prod(shape) * DTYPE_SIZE[dtype]
    zeros = torch.zeros(*shape, dtype=FLOAT_DTYPES.get(dtype, torch.bfloat16))
    stored = _quantize_ct("w.weight", zeros, QuantizeConfig(bits=bits, group_size=group))
    return sum(t.numel() * t.element_size() for t in stored.values())


def check_budget(target_bytes: float | None, target_gib: float | None) -> None:
    """Refuse, before any work, a budget that is not exactly one of a share in (0, 1] or a positive size in GiB."""
    if (target_bytes is None) == (target_gib is None):
        raise ValueError("give one of target_bytes (a share of the original's bytes) or target_gib")
    if target_bytes is not None and not 0 < target_bytes <= 1:
        raise ValueError(f"target_bytes must be a share in (0, 1], got {target_bytes}")
    if target_gib is not None and target_gib <= 0:
        raise ValueError(f"target_gib must be positive, got {target_gib}")


def budget_bytes(target_bytes: float | None, target_gib: float | None, original_bytes: int) -> int:
    """The budget in bytes: a share of the original's stored bytes, or GiB."""
    return int(target_bytes * original_bytes) if target_bytes is not None else int(target_gib * 2**30)

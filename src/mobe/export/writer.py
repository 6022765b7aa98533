"""Assemble an output checkpoint shard by shard from the source and the fitted factors.

Native format: each compressed expert matrix type of a layer becomes three tensors beside the
experts, `{experts}.{name}.mobe_A` (E, p, r), `.mobe_bases` (g, m/g, r, d), `.mobe_coef` (E, m/g);
the per-expert gate/up tensors are dropped, everything else is copied unchanged. Dense format: the
same tensors and shard layout as the source, with the compressed matrices rebuilt from the factors
(block-FP8 sources get FP8 matrices and fresh `_scale_inv` block scales back, so engines load them as before).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import MoeLayout
from ..checkpoint import CheckpointReader
from ..checkpoint.fp8 import SCALE_SUFFIX, block_size, quantize_blockwise
from ..factorize import ExpertFactors, MobeFactors, oriented
from .files import atomic_save_file, write_json_atomic

FACTOR_PREFIX = "mobe_"
FACTOR_SUFFIXES = {field: FACTOR_PREFIX + field for field in MobeFactors.tensor_fields}
FactorSource = Callable[[int, str], ExpertFactors]


def factor_tensor_names(
    layout: MoeLayout, layer: int, matrix: str, fields: tuple[str, ...] = MobeFactors.tensor_fields
) -> dict[str, str]:
    """Checkpoint names of one (layer, matrix)'s factor tensors: `{experts}.{gate_proj}.mobe_{field}`."""
    base = f"{layout.arch.experts_prefix(layer)}.{layout.arch.matrices[matrix]}"
    return {field: f"{base}.{FACTOR_PREFIX}{field}" for field in fields}


def _replaced_tensors(layout: MoeLayout, jobs: list[tuple[int, str]]) -> dict[str, tuple[int, str, int]]:
    """Source tensor name -> (layer, matrix, expert) for every matrix the factors replace."""
    return {
        layout.arch.tensor_name(layer, e, matrix): (layer, matrix, e)
        for layer, matrix in jobs
        for e in range(layout.num_experts)
    }


def write_checkpoint(
    reader: CheckpointReader,
    layout: MoeLayout,
    jobs: list[tuple[int, str]],
    factors_of: FactorSource,
    target: Path,
    fmt: str,
    metadata: dict[str, str],
    progress: bool = True,
    shard_plan: dict[str, list[str]] | None = None,
) -> dict[str, str]:
    """Write the weight shards and the index into `target`; returns the weight map.

    `shard_plan` (source shard -> tensor names, default the reader's own) sets the output's shard
    layout. Holds one source shard (or one layer's factors) in memory at a time; dense matrices are
    rebuilt expert by expert in the factors' dtype.
    """
    replaced = _replaced_tensors(layout, jobs)
    # Block-FP8 checkpoints: dense experts go back to FP8 with fresh block scales; native ones drop the scales.
    block = block_size(reader.config)
    by_shard = shard_plan or reader.tensors_by_shard()
    planned = {name for names in by_shard.values() for name in names}
    # A matrix is FP8 in the output exactly when the plan holds its scales (the source's FP8 experts).
    replaced_scales = {n + SCALE_SUFFIX: n for n in replaced if block and n + SCALE_SUFFIX in planned}
    quantized = set(replaced_scales.values())
    dropped = {} if fmt == "dense" else {**replaced, **replaced_scales}
    kept = {shard: [n for n in names if n not in dropped] for shard, names in by_shard.items()}
    kept = {shard: names for shard, names in kept.items() if names}
    factor_layers = sorted({layer for layer, _ in jobs}) if fmt == "native" else []
    total = len(kept) + len(factor_layers)
    weight_map: dict[str, str] = {}
    total_bytes = 0

    def shard_name(i: int) -> str:
        return f"model-{i + 1:05d}-of-{total:05d}.safetensors"

    @functools.lru_cache(maxsize=2)
    def rebuilt(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One dense expert matrix in the factors' dtype, or in FP8 with its block scales."""
        layer, matrix, e = replaced[name]
        factors = factors_of(layer, matrix)
        dense = oriented(matrix, factors.reconstruct(torch.tensor([e])))[0]
        return quantize_blockwise(dense, block) if name in quantized else (dense.to(factors.dtype), None)

    bar = tqdm(total=total, desc=f"Writing {fmt} shards", disable=not progress)
    for i, names in enumerate(kept.values()):
        tensors = reader.get_many([n for n in names if n not in replaced and n not in replaced_scales])
        for name in names:
            if name in replaced:
                tensors[name] = rebuilt(name)[0]
            elif name in replaced_scales:
                tensors[name] = rebuilt(replaced_scales[name])[1]
        tensors = {name: tensors[name] for name in names}
        atomic_save_file(tensors, target / shard_name(i), metadata)
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, shard_name(i)))
        del tensors
        bar.update()
    for j, layer in enumerate(factor_layers):
        tensors = {}
        for matrix in [m for l_, m in jobs if l_ == layer]:
            factors = factors_of(layer, matrix)
            for field, name in factor_tensor_names(layout, layer, matrix, factors.tensor_fields).items():
                tensors[name] = getattr(factors, field)
        name = shard_name(len(kept) + j)
        atomic_save_file(tensors, target / name, metadata)
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        bar.update()
    bar.close()
    weight_map = dict(sorted(weight_map.items()))
    write_json_atomic(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
        target / "model.safetensors.index.json",
    )
    return weight_map

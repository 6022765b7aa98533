"""Assemble an output checkpoint shard by shard from the source and the fitted factors.

Native format: each compressed expert matrix type of a layer becomes three tensors beside the
experts, `{experts}.{name}.mobe_A` (E, p, r), `.mobe_bases` (g, m/g, r, d), `.mobe_coef` (E, m/g);
the per-expert gate/up tensors are dropped, everything else is copied unchanged. Where the checkpoint stores the
experts fused (one tensor per layer for one or more matrix types, Qwen3.5 / Gemma 4 / Llama 4), a compressed layer's
fused tensors are dropped and its matrix types left dense are written beside the factors as `{experts}.{name}` stacks
((E, p, d); down (E, d, p)), the layout of the experts module that runs them. Dense format: the
same tensors and shard layout as the source, with the compressed matrices rebuilt from the factors
(block-FP8 sources get FP8 matrices and fresh `_scale_inv` block scales back, so engines load them as before;
MXFP4 sources, which the reader shows dequantised, are written in bf16 under the dequantised tensors' names).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import MoeLayout
from ..checkpoint import CheckpointReader
from ..checkpoint.fp8 import SCALE_SUFFIX, block_size, quantize_blockwise
from ..config import FORMAT_VERSION
from ..factorize import oriented
from .files import atomic_save_file, copy_side_files, write_json_atomic
from .native import FactorSource, factor_tensor_names, is_factor_tensor, output_config


def _replaced_tensors(layout: MoeLayout, jobs: list[tuple[int, str]]) -> dict[str, tuple[int, str, int]]:
    """Source tensor name -> (layer, matrix, expert) for every per-expert matrix the factors replace."""
    if layout.arch.fused is not None:
        return {}
    return {
        layout.arch.tensor_name(layer, e, matrix): (layer, matrix, e)
        for layer, matrix in jobs
        for e in range(layout.num_experts)
    }


def replaced_fused_tensors(layout: MoeLayout, jobs: list[tuple[int, str]]) -> dict[str, tuple[int, list[str]]]:
    """Fused layouts: source tensor name -> (layer, the matrix types it holds) for every fused tensor of a compressed
    layer (the compressed experts module of a layer holds all its matrix types, in its own orientation)."""
    out = {}
    for layer in sorted({layer for layer, _ in jobs}) if layout.arch.fused is not None else ():
        for name, matrices in layout.fused_tensors(layer).items():
            out[name] = (layer, matrices)
    return out


def replaced_tensor_names(layout: MoeLayout, jobs: list[tuple[int, str]]) -> dict[str, int]:
    """Every source tensor the compressed matrices replace (per expert or fused) -> its layer."""
    per_expert = {name: layer for name, (layer, _, _) in _replaced_tensors(layout, jobs).items()}
    return per_expert | {name: layer for name, (layer, _) in replaced_fused_tensors(layout, jobs).items()}


def dense_stacks(layout: MoeLayout, jobs: list[tuple[int, str]]) -> dict[str, tuple[int, str]]:
    """Native format, fused layouts: the `{experts}.{name}` stack written for each matrix type left dense in a
    compressed layer -> (layer, matrix)."""
    compressed = set(jobs)
    return {
        f"{layout.arch.experts_prefix(layer)}.{layout.arch.matrices[m]}": (layer, m)
        for name, (layer, matrices) in replaced_fused_tensors(layout, jobs).items()
        for m in matrices
        if (layer, m) not in compressed
    }


def dense_shard_plan(
    reader: CheckpointReader, layout: MoeLayout, jobs: list[tuple[int, str]], fields: tuple[str, ...]
) -> dict[str, list[str]]:
    """Shard layout of dense experts rebuilt from the native checkpoint `reader` (factor `fields`): its other tensors
    where they are, each rebuilt matrix (and its FP8 block scales) in the shard that holds its layer's factors."""
    stacks = dense_stacks(layout, jobs)  # fused layouts: the matrix types left dense, which go back in place
    plan: dict[str, list[str]] = {}
    for name, shard in reader.weight_map.items():
        if not is_factor_tensor(name) and name not in stacks:
            plan.setdefault(shard, []).append(name)
    first_matrix = {layer: m for layer, m in reversed(jobs)}
    for name, layer in replaced_tensor_names(layout, jobs).items():
        first_factor = next(iter(factor_tensor_names(layout, layer, first_matrix[layer], fields).values()))
        if first_factor not in reader.weight_map:  # stored quantised
            first_factor += ".qweight"
        plan.setdefault(reader.weight_map[first_factor], []).append(name)
        if block_size(reader.config):  # block-FP8 model: the rebuilt matrix is written in FP8 with its scales
            plan[reader.weight_map[first_factor]].append(name + SCALE_SUFFIX)
    return {shard: sorted(names) for shard, names in sorted(plan.items())}


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
    fused = replaced_fused_tensors(layout, jobs)
    stacks = dense_stacks(layout, jobs)
    # Block-FP8 checkpoints: dense experts go back to FP8 with fresh block scales; native ones drop the scales.
    block = block_size(reader.config)
    by_shard = shard_plan or reader.tensors_by_shard()
    planned = {name for names in by_shard.values() for name in names}
    # A matrix is FP8 in the output exactly when the plan holds its scales (the source's FP8 experts).
    replaced_scales = {n + SCALE_SUFFIX: n for n in replaced if block and n + SCALE_SUFFIX in planned}
    quantized = set(replaced_scales.values())
    dropped = set(stacks) - set(fused) if fmt == "dense" else {*replaced, *replaced_scales, *fused}
    source_is_native = (reader.config.get("mobe") or {}).get("format") == "native"
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

    def dense_block(layer: int, matrix: str) -> torch.Tensor:
        """A dense (E, out, in) stack: rebuilt from factors, or as the source holds it (fused, or a native stack)."""
        if (layer, matrix) in jobs:
            factors = factors_of(layer, matrix)
            return oriented(matrix, factors.reconstruct()).to(factors.dtype)
        if source_is_native:
            return reader.get(f"{layout.arch.experts_prefix(layer)}.{layout.arch.matrices[matrix]}")
        return layout.read_experts(reader, layer, matrix)

    def rebuilt_fused(name: str) -> torch.Tensor:
        layer, matrices = fused[name]
        blocks = {m: dense_block(layer, m) for m in matrices}
        dtype = next((blocks[m].dtype for m in matrices if (layer, m) in jobs), blocks[matrices[0]].dtype)
        return layout.assemble_fused(matrices, {m: b.to(dtype) for m, b in blocks.items()})

    read_here = set(replaced) | set(replaced_scales) | set(fused)
    bar = tqdm(total=total, desc=f"Writing {fmt} shards", disable=not progress)
    for i, names in enumerate(kept.values()):
        tensors = reader.get_many([n for n in names if n not in read_here])
        for name in names:
            if name in replaced:
                tensors[name] = rebuilt(name)[0]
            elif name in replaced_scales:
                tensors[name] = rebuilt(replaced_scales[name])[1]
            elif name in fused:
                tensors[name] = rebuilt_fused(name)
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
        for name, (layer_, matrix) in stacks.items():
            if layer_ == layer:
                tensors[name] = dense_block(layer, matrix)
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


def write_output(
    reader: CheckpointReader,
    layout: MoeLayout,
    jobs: list[tuple[int, str]],
    factors_of: FactorSource,
    target: Path,
    section: dict,
    progress: bool = True,
) -> None:
    """A whole output checkpoint in `target`: the shards (`section["format"]`), the side files and config.json."""
    metadata = {"format": "pt", "mobe_version": str(FORMAT_VERSION), "mobe_format": section["format"]}
    write_checkpoint(reader, layout, jobs, factors_of, target, section["format"], metadata, progress)
    copy_side_files(reader.path, target)
    write_json_atomic(output_config(reader.config, section, jobs, factors_of), target / "config.json")

"""`mobe info`: what a checkpoint holds and what given settings would save, without reading weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .architectures import MoeLayout, moe_layout
from .checkpoint import CheckpointReader
from .config import DEFAULT_MATRICES, DistillConfig, MobeConfig
from .evaluate import mobe_parameters
from .quantize.checkpoint import stored_bytes


@dataclass
class ModelInfo:
    path: Path
    model_type: str
    layout: MoeLayout
    model_params: int
    expert_params: int
    compressed_expert_params: int | None = None
    num_bases: int | None = None
    rank: int | None = None
    matrices: tuple[str, ...] = ()  # the matrix types the given settings compress
    basis_side: str | None = None
    stored: dict | None = None  # a compressed checkpoint's mobe section (its settings)
    distill_memory: str | None = None  # what `mobe distill` with default settings would hold (compressed only)
    stored_bytes: int | None = None  # every weight tensor as stored, whatever its dtype (headers only)
    quantization: str | None = None  # how the weights are quantised, in words, if they are

    def summary(self) -> str:
        lay = self.layout
        lines = [
            f"checkpoint:     {self.path}",
            f"model_type:     {self.model_type}",
            f"layers:         {lay.num_layers} ({len(lay.moe_layers)} MoE: {_ranges(lay.moe_layers)})",
            f"experts/layer:  {lay.num_experts}, gate/up {lay.intermediate_size}x{lay.hidden_size}, "
            f"down {lay.hidden_size}x{lay.intermediate_size}",
            f"parameters:     {self.model_params:,} total, {self.expert_params:,} in routed experts "
            f"({100 * self.expert_params / self.model_params:.1f}%)",
        ]
        if self.stored is not None:
            s = self.stored
            lines[-1] = f"parameters:     {self.model_params:,} stored"
            lines.append(
                f"compressed:     {s.get('format')} {s.get('method', 'mobe')} m={s.get('num_bases')} r={s.get('rank')} "
                f"{'+'.join(s.get('matrices', []))}, layers {_ranges(tuple(s.get('layers', [])))}"
            )
        if self.compressed_expert_params is not None:
            saved = self.expert_params - self.compressed_expert_params
            before, after = (
                self.model_params + (saved if self.stored else 0),
                self.model_params - (0 if self.stored else saved),
            )
            label = "stored" if self.stored else f"MoBE m={self.num_bases} r={self.rank} ({'+'.join(self.matrices)})"
            word = "fewer" if saved >= 0 else "MORE: these settings make the model bigger"
            lines.append(
                f"{label}: routed experts {self.expert_params:,} -> {self.compressed_expert_params:,} "
                f"({100 * abs(saved) / self.expert_params:.1f}% {word}), model {before:,} -> {after:,}"
            )
        if self.quantization and self.stored is None:  # packed integers and their scales: entries, not parameters
            lines[-1] = f"parameters:     {self.model_params:,} stored entries (packed integers and scales)"
        if self.stored_bytes is not None:
            lines.append(
                f"stored bytes:   {self.stored_bytes:,} ({self.stored_bytes / 2**20:,.2f} MiB of weights"
                + (f"; {self.quantization})" if self.quantization else ")")
            )
        if self.distill_memory:
            lines.append(f"memory:         {self.distill_memory}")
        return "\n".join(lines)


def _ranges(values: tuple[int, ...]) -> str:
    """(1, 2, 3, 5) -> '1-3,5'."""
    parts: list[list[int]] = []
    for v in values:
        if parts and v == parts[-1][-1] + 1:
            parts[-1].append(v)
        else:
            parts.append([v])
    return ",".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts) or "none"


def model_info(
    model: str | Path,
    num_bases: int | None = None,
    rank: int | None = None,
    groups: int = 1,
    matrices: tuple[str, ...] = DEFAULT_MATRICES,
    target_ratio: float | None = None,
    schedule: str | None = None,
) -> ModelInfo:
    """Architecture, parameter counts and, given m (0 = E/4) and r, or a target ratio (which sets r as `compress`
    does), the compression MoBE would give with the default recipe's other settings (`schedule="paper"`: bases
    along the hidden size, as there); headers only."""
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    info = ModelInfo(
        reader.path,
        reader.config["model_type"],
        layout,
        reader.num_parameters(),
        len(layout.moe_layers) * layout.expert_params_per_layer,
    )
    info.stored_bytes = stored_bytes(reader)
    info.quantization = _quantization(reader.config)
    section = reader.config.get("mobe")
    if section and info.quantization is None:  # distillation trains float weights only
        from .distill.memory import estimate

        default = DistillConfig(train="router+coef" if section.get("format") == "native" else "router")
        info.distill_memory = estimate(reader, default).summary(default)
    if section and section.get("format") == "native":  # count what the checkpoint holds for the experts
        info.stored = section
        prefixes = tuple(layout.arch.experts_prefix(layer) + "." for layer in layout.moe_layers)
        fused = {name for layer in layout.moe_layers for name in layout.fused_tensors(layer)}
        info.compressed_expert_params = sum(
            _logical_size(reader, section, layout, n) for n in reader.weight_map if n.startswith(prefixes) or n in fused
        )
        info.model_params = sum(_logical_size(reader, section, layout, n) for n in reader.weight_map)
        return info
    if num_bases is not None or target_ratio is not None:
        from .pipeline import resolve_settings  # the rank `compress` would fit, from the same rule

        settings = resolve_settings(
            layout,
            MobeConfig(
                num_bases=num_bases or 0,
                rank=rank,
                groups=groups,
                matrices=matrices,
                target_ratio=target_ratio,
                **({"schedule": schedule} if schedule else {}),
            ),
        )
        E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
        factored = mobe_parameters(E, p, d, settings.num_bases, settings.rank, groups, settings.basis_side)
        per_layer = (3 - len(matrices)) * E * p * d + len(matrices) * factored
        info.compressed_expert_params = len(layout.moe_layers) * per_layer
        info.num_bases, info.rank = settings.num_bases, settings.rank
        info.matrices, info.basis_side = tuple(matrices), settings.basis_side
    return info


def _logical_size(reader: CheckpointReader, section: dict, layout: MoeLayout, name: str) -> int:
    """Parameters a stored tensor stands for: a quantised factor's `qweight` counts as the factor (its logical shape
    in `factor_shapes`), its `scales` as nothing."""
    if not section.get("quantization") or not name.endswith((".qweight", ".scales")):
        return math.prod(reader.shape(name))
    if name.endswith(".scales"):
        return 0
    *_, matrix_name, factor, _ = name.split(".")
    matrix = {v: k for k, v in layout.arch.matrices.items()}[matrix_name]
    return math.prod(section["factor_shapes"][matrix][factor.removeprefix("mobe_")])


def _quantization(config: dict) -> str | None:
    """'int4 group 128, compressed-tensors pack-quantized' and the like, or None for float weights."""
    native = (config.get("mobe") or {}).get("quantization")
    if native and native.get("format") == "mobe-groupwise":
        bits = {f: native.get("field_bits", {}).get(f, native["bits"]) for f in native["fields"]}
        parts = [f"{f} int{b}" for f, b in bits.items()]
        layout = ", A in orthonormal coordinates" if "A" in native.get("column_groups", ()) else ""
        return f"factors {' + '.join(parts)}, group {native['group_size']}{layout}"
    qc = config.get("quantization_config")
    if not qc:
        return None
    groups = list((qc.get("config_groups") or {}).values())
    weights = (groups[0].get("weights") or {}) if groups else {}
    if qc.get("quant_method") == "compressed-tensors" and weights:
        return f"int{weights.get('num_bits')} group {weights.get('group_size')}, compressed-tensors {qc.get('format')}"
    return f"quantised: {qc.get('quant_method', 'unknown method')}"


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    aliases: tuple[str, ...]
    model_class: str | None  # the installed transformers' causal-LM class, None where it has none
    storage: str
    tested: bool  # the test suite builds a tiny model of it (`mobe.fixtures.tiny_config`) and runs it end to end


def supported_families() -> list[FamilyRow]:
    """Every registered family, with the class the installed transformers opens it with and its on-disk layout."""
    from .architectures import canonical_model_types, get_arch
    from .fixtures import tiny_config

    rows = []
    for model_type in canonical_model_types():
        arch = get_arch(model_type)
        try:
            tiny_config(model_type)
            tested = True
        except ValueError:
            tested = False
        rows.append(FamilyRow(model_type, arch.aliases, _model_class_name(arch), arch.storage(), tested))
    return rows


def _model_class_name(arch) -> str | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .architectures.derive import NotInTransformersError, model_class

    if arch.model_type not in CONFIG_MAPPING:
        return None
    try:
        return model_class(arch.model_type, arch.model_class).__name__
    except NotInTransformersError:
        return None


def families_table() -> str:
    """`mobe info --list`: the supported families, then the known ones mobe refuses and why."""
    import transformers

    from .architectures import UNSUPPORTED

    rows = supported_families()
    width = max(len(r.model_type + "".join(f", {a}" for a in r.aliases)) for r in rows) + 2
    lines = [f"supported MoE families (transformers {transformers.__version__}):"]
    for r in rows:
        name = r.model_type + "".join(f", {a}" for a in r.aliases)
        where = r.model_class or f"not in transformers {transformers.__version__}"
        lines.append(f"  {name:<{width}}{where}; {'tested' if r.tested else 'untested'}")
        lines.append(f"  {'':<{width}}{r.storage}")
    lines.append("not supported:")
    lines += [f"  {name}: {why}" for name, why in sorted(UNSUPPORTED.items())]
    return "\n".join(lines)


# Memory estimates (`mobe info` prints them): peak bytes from the config's shapes alone, nothing allocated.

DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
GiB = 2**30


def balanced_counts(num_experts: int, tokens: int, top_k: int) -> list[int]:
    """Tokens routed to each expert when the router spreads tokens * top_k routings evenly."""
    total = tokens * top_k
    return [total // num_experts + (e < total % num_experts) for e in range(num_experts)]


def gram_stats_bytes(num_experts: int, p: int, d: int) -> int:
    """Dense float64 Grams of one layer (what mobe kept before factoring them): E (d^2 + p^2) * 8, plus counts."""
    return 8 * num_experts * (d * d + p * p) + 8 * num_experts


def factor_bytes(counts: list[int], dim: int, collecting: bool = False) -> int:
    """Bytes of a `GramFactor` holding `counts[i]` rows of `dim` numbers for expert i, counts included.

    Stored: float32 rows while n_i < dim, a float64 dim x dim R factor from then on. While `collecting`, an expert
    past dim also buffers up to dim/2 - 1 float32 rows, and one QR of [R; rows] at a time needs its (1.5 dim x dim)
    float64 input and output.
    """
    held = sum(4 * n * dim if n < dim else 8 * dim * dim for n in counts) + 8 * len(counts)
    if collecting and any(n >= dim for n in counts):
        held += sum(4 * dim * (max(1, dim // 2) - 1) for n in counts if n >= dim) + 2 * 8 * (dim + dim // 2) * dim
    return held


def factor_stats_bytes(counts: list[int], p: int, d: int, collecting: bool = False) -> int:
    """One layer's factored statistics: the inputs' factor (dim d) and the intermediate activations' (dim p)."""
    return factor_bytes(counts, d, collecting) + factor_bytes(counts, p, collecting)


def factor_stats_bound(num_experts: int, p: int, d: int, tokens: int, top_k: int, collecting: bool = False) -> int:
    """At most, whatever the routing: a factor holds no more than min(T k, E dim) rows of at most 8 * dim bytes."""
    total = 0
    for dim in (d, p):
        rows = min(tokens * top_k, num_experts * dim)
        total += 8 * dim * rows + 8 * num_experts
        if collecting:  # folding buffers of the experts that can reach dim rows
            total += factor_bytes([dim] * min(num_experts, rows // dim), dim, True) - 8 * dim * dim * (rows // dim)
    return total


@dataclass
class MemoryEstimate:
    """Peak bytes of the big tensors (the interpreter and libraries, about 0.5 GB, not included)."""

    job_host: int  # one (layer, matrix) compression job, data-free: host RAM
    job_device: int  # ... on the accelerator (0 when it runs on the CPU)
    calibrated_job_host: int  # ... with --calibration
    calibrated_job_device: int
    stats_gram: int  # one layer's calibration statistics as dense float64 Grams (before)
    stats_factor: int  # ... factored, balanced routing, while collecting (peak)
    stats_factor_bound: int  # ... factored, any routing
    inference_weights: int  # native MoBE checkpoint's parameters in its dtype
    inference_workspace: int  # materialised mixed bases of one forward + the LRU caches + KV cache
    calibration_tokens: int
    top_k: int

    def summary(self) -> str:
        def gib(n: int) -> str:
            for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20)):
                if n >= size:
                    return f"{n / size:,.1f} {unit}"
            return f"{n / 2**10:,.1f} KiB"

        def job(host: int, device: int) -> str:
            return f"{gib(host)} RAM" + (f" + {gib(device)} GPU" if device else "")

        return "\n".join(
            [
                "memory (estimates from the config's shapes):",
                f"  compression job (one layer, one matrix type): {job(self.job_host, self.job_device)}, "
                f"with --calibration {job(self.calibrated_job_host, self.calibrated_job_device)}",
                f"  calibration statistics of one layer ({self.calibration_tokens} tokens x top-{self.top_k}): "
                f"factored {gib(self.stats_factor)} (balanced routing; at most {gib(self.stats_factor_bound)}), "
                f"dense Grams {gib(self.stats_gram)}",
                f"  native inference: {gib(self.inference_weights + self.inference_workspace)} "
                f"(weights {gib(self.inference_weights)}, workspace and caches {gib(self.inference_workspace)})",
            ]
        )


def compression_job_bytes(
    num_experts: int,
    p: int,
    d: int,
    num_bases: int,
    rank: int,
    groups: int,
    source_bytes: int,
    stats_bytes: int = 0,
    weighting_rows: int = 0,
    device: str = "cpu",
) -> tuple[int, int]:
    """(host, device) peak bytes of one MoBE (layer, matrix) job, Adam schedule.

    Held throughout: the expert stack in the source dtype, the layer's Gram factor (`stats_bytes`) and the
    weighting built from it (`weighting_rows` directions of d float32 numbers). On top, the largest of: reading
    (the per-expert tensors before they are stacked), fitting (the float32 target, the parameters with their
    gradients, two Adam moments and the best state, and the larger of one chunk's activations (`auto_chunk`) and
    one SVD group's initialisation, with calibration also the weighted loss's transients and the whitened stack),
    and the error report (a float32 copy and the reconstruction). On a GPU the
    fit and a copy of the weighting are there, the rest in host RAM.
    """
    from .factorize.mobe import auto_chunk

    stack = num_experts * p * d
    params = mobe_parameters(num_experts, p, d, num_bases, rank, groups)
    weighting = 4 * weighting_rows * d
    held = source_bytes * stack + stats_bytes + weighting
    chunk = min(num_experts, auto_chunk(rank, p, d))
    activations = chunk * 4 * (3 * rank * d + 2 * p * d)
    group = -(-num_experts // num_bases) * p * d  # the experts of one SVD group, stacked
    init = 4 * (2 * group + min(group, rank * d))
    if weighting_rows:  # the weighted loss's two (chunk, p, d) transients; the whitened stack for the init
        activations += chunk * 4 * 2 * p * d
        init += 4 * stack
    fit = 4 * stack + 5 * 4 * params + max(activations, init)
    report = 8 * stack + 4 * params
    if device == "cpu":
        return held + max(source_bytes * stack, fit, report), 0
    return held + max(source_bytes * stack, report), fit + weighting


def inference_bytes(
    layout: MoeLayout,
    model_params: int,
    num_bases: int,
    rank: int,
    groups: int,
    matrices: tuple[str, ...],
    dtype_bytes: int,
    config: dict,
    workspace_experts: int = 16,
    cache_mib: float = 0.0,
    context: int = 4096,
) -> tuple[int, int]:
    """(weights, workspace) bytes of `mobe generate` on the native checkpoint at batch 1 and `context` tokens.

    Weights: the model's parameters with the routed experts' compressed matrices as MoBE factors. Workspace: the
    mixed bases act(sum_j alpha_ij B_j) (r x d) of `workspace_experts` experts per compressed matrix type (one layer
    at a time), the LRU cache of each MoE layer, and the KV cache (full keys and values per head, as transformers
    keeps them, MLA models included).
    """
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    saved = len(layout.moe_layers) * len(matrices) * (E * p * d - mobe_parameters(E, p, d, num_bases, rank, groups))
    weights = (model_params - saved) * dtype_bytes
    mixed = workspace_experts * len(matrices) * rank * d * dtype_bytes
    heads = config.get("num_attention_heads", 1)
    if "kv_lora_rank" in config:  # DeepSeek MLA: keys of qk_nope + qk_rope, values of v_head_dim, per head
        per_token = heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"])
    else:
        head_dim = config.get("head_dim") or d // heads
        per_token = 2 * config.get("num_key_value_heads", heads) * head_dim
    kv = layout.num_layers * per_token * context * dtype_bytes
    return weights, mixed + int(cache_mib * 2**20) * len(layout.moe_layers) + kv


def memory_estimate(
    model: str | Path,
    num_bases: int,
    rank: int | None = None,
    groups: int = 1,
    matrices: tuple[str, ...] = ("gate", "up"),
    calibration_tokens: int = 32768,
    device: str = "cpu",
    context: int = 4096,
    cache_mib: float = 0.0,
) -> MemoryEstimate:
    """Peak memory of compressing `model` (one job, calibration statistics) and of running the result natively."""
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    rank = rank or min(p, d)
    top_k = int(reader.config.get("num_experts_per_tok") or 1)
    first = layout.stored_names(layout.moe_layers[0], "gate")[0]  # per expert: expert 0; fused: the one tensor
    source_bytes = DTYPE_BYTES.get(reader.dtype_name(first), 4)
    if reader.is_block_fp8(first):  # read dequantised to float32; the factors are written in bfloat16
        source_bytes = 4
    counts = balanced_counts(E, calibration_tokens, top_k)
    stats = factor_stats_bytes(counts, p, d, collecting=True)
    job_stats = factor_bytes(counts, d)  # a gate/up job reads the inputs' factor (the larger one)
    host, gpu = compression_job_bytes(E, p, d, num_bases, rank, groups, source_bytes, device=device)
    calibrated = compression_job_bytes(
        E, p, d, num_bases, rank, groups, source_bytes, job_stats, sum(min(n, d) for n in counts), device
    )
    weights, workspace = inference_bytes(
        layout,
        reader.num_parameters(),
        num_bases,
        rank,
        groups,
        matrices,
        2 if reader.is_block_fp8(first) else source_bytes,
        reader.config,
        cache_mib=cache_mib,
        context=context,
    )
    return MemoryEstimate(
        job_host=host,
        job_device=gpu,
        calibrated_job_host=calibrated[0],
        calibrated_job_device=calibrated[1],
        stats_gram=gram_stats_bytes(E, p, d),
        stats_factor=stats,
        stats_factor_bound=factor_stats_bound(E, p, d, calibration_tokens, top_k, collecting=True),
        inference_weights=weights,
        inference_workspace=workspace,
        calibration_tokens=calibration_tokens,
        top_k=top_k,
    )

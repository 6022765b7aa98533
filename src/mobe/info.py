"""`mobe info`: what a checkpoint holds and what given settings would save, without reading weights (its memory and
time estimates come from `mobe.estimate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .architectures import MoeLayout, moe_layout
from .checkpoint import CheckpointReader
from .config import DEFAULT_MATRICES, DistillConfig, MobeConfig
from .evaluate import mobe_parameters
from .quantize.checkpoint import stored_bytes
from .tiny_configs import TINY_CONFIGS


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
        from .estimate import distill_memory

        default = DistillConfig(train="router+coef" if section.get("format") == "native" else "router")
        info.distill_memory = distill_memory(reader, default).summary(default)
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
    tested: bool  # the test suite builds a tiny model of it (an entry of `mobe.tiny_configs.TINY_CONFIGS`) end to end


def supported_families() -> list[FamilyRow]:
    """Every registered family, with the class the installed transformers opens it with and its on-disk layout."""
    from .architectures import canonical_model_types, get_arch

    rows = []
    for model_type in canonical_model_types():
        arch = get_arch(model_type)
        tested = model_type in TINY_CONFIGS or model_type.removesuffix("_text") in TINY_CONFIGS  # text part: its entry
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

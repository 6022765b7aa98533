"""`mobe info`: what a checkpoint holds and what given settings would save, without reading weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .architectures import MoeLayout, moe_layout
from .checkpoint import CheckpointReader
from .evaluate import mobe_parameters


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
    stored: dict | None = None  # a compressed checkpoint's mobe section (its settings)
    distill_memory: str | None = None  # what `mobe distill` with default settings would hold (compressed only)

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
            label = "stored" if self.stored else f"MoBE m={self.num_bases} r={self.rank} (gate+up)"
            word = "fewer" if saved >= 0 else "MORE: these settings make the model bigger"
            lines.append(
                f"{label}: routed experts {self.expert_params:,} -> {self.compressed_expert_params:,} "
                f"({100 * abs(saved) / self.expert_params:.1f}% {word}), model {before:,} -> {after:,}"
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
    matrices: tuple[str, ...] = ("gate", "up"),
) -> ModelInfo:
    """Architecture, parameter counts and (given m, r) the compression MoBE would give; headers only."""
    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    info = ModelInfo(
        reader.path,
        reader.config["model_type"],
        layout,
        reader.num_parameters(),
        len(layout.moe_layers) * layout.expert_params_per_layer,
    )
    section = reader.config.get("mobe")
    if section:
        from .config import DistillConfig
        from .distill.memory import estimate

        default = DistillConfig(train="router+coef" if section.get("format") == "native" else "router")
        info.distill_memory = estimate(reader, default).summary(default)
    if section and section.get("format") == "native":  # count what the checkpoint holds for the experts
        info.stored = section
        prefixes = tuple(layout.arch.experts_prefix(layer) + "." for layer in layout.moe_layers)
        fused = {name for layer in layout.moe_layers for name in layout.fused_tensors(layer)}
        info.compressed_expert_params = sum(
            math.prod(reader.shape(n)) for n in reader.weight_map if n.startswith(prefixes) or n in fused
        )
        info.model_params = reader.num_parameters()
        return info
    if num_bases is not None:
        E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
        rank = rank or min(p, d)
        per_layer = (3 - len(matrices)) * E * p * d + len(matrices) * mobe_parameters(E, p, d, num_bases, rank, groups)
        info.compressed_expert_params = len(layout.moe_layers) * per_layer
        info.num_bases, info.rank = num_bases, rank
    return info


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

"""What mobe needs to know about one MoE architecture, as plain data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MATRIX_TYPES = ("gate", "up", "down")


@dataclass(frozen=True)
class ArchSpec:
    """Tensor layout and config keys of one MoE architecture.

    Args:
        model_type: `config.json["model_type"]`.
        experts: template of one layer's routed-experts prefix, with `{layer}`.
        matrices: checkpoint name of each expert matrix type (`gate`, `up`, `down`); the tensor is
            `{experts}.{expert}.{name}.weight` with shape (p, d) for gate/up and (d, p) for down.
        num_experts_keys / intermediate_size_keys: config keys tried in order.
        is_moe_layer: which decoder layers hold routed experts, from the raw config dict.
        aliases: other `model_type`s with the same layout (Kimi-K2 uses DeepSeek-V3's).
    """

    model_type: str
    experts: str
    matrices: Mapping[str, str]
    num_experts_keys: tuple[str, ...]
    intermediate_size_keys: tuple[str, ...]
    is_moe_layer: Callable[[Mapping[str, Any], int], bool]
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # In memory (transformers 5) the routed experts of a layer are one fused module at this path, and a few
    # checkpoint names differ from module names (Mixtral's `block_sparse_moe` is `mlp`).
    experts_module: str = "model.layers.{layer}.mlp.experts"
    module_renames: Mapping[str, str] = field(default_factory=dict)
    # The router of a layer (checkpoint prefix: its `weight` rows, and any other tensor whose first dimension is the
    # expert count, such as DeepSeek-V3's `e_score_correction_bias`, are per expert), and the config key that splits
    # the experts into contiguous routing groups (DeepSeek-V3's `n_group`), if any.
    router: str = "model.layers.{layer}.mlp.gate"
    router_groups_key: str | None = None

    def module_name(self, checkpoint_name: str) -> str:
        for old, new in self.module_renames.items():
            checkpoint_name = checkpoint_name.replace(old, new)
        return checkpoint_name

    def experts_prefix(self, layer: int) -> str:
        return self.experts.format(layer=layer)

    def router_prefix(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def tensor_name(self, layer: int, expert: int, matrix: str) -> str:
        return f"{self.experts_prefix(layer)}.{expert}.{self.matrices[matrix]}.weight"


def first_config_value(config: Mapping[str, Any], keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return int(value)
    raise ValueError(f"config.json has none of {list(keys)} ({what})")

"""The MoE layout of one concrete model: its architecture plus the sizes read from config.json."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .spec import ArchSpec, first_config_value


@dataclass(frozen=True)
class MoeLayout:
    arch: ArchSpec
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    intermediate_size: int  # p
    hidden_size: int  # d

    def expected_shape(self, matrix: str) -> tuple[int, int]:
        p, d = self.intermediate_size, self.hidden_size
        return (d, p) if matrix == "down" else (p, d)

    @property
    def expert_params_per_layer(self) -> int:
        return 3 * self.num_experts * self.intermediate_size * self.hidden_size


def moe_layout(config: Mapping[str, Any]) -> MoeLayout:
    """Read the MoE layout from a raw `config.json` dict (no weights, no transformers import)."""
    from . import get_arch

    arch = get_arch(config.get("model_type"))
    num_layers = first_config_value(config, ("num_hidden_layers",), "number of layers")
    return MoeLayout(
        arch=arch,
        num_layers=num_layers,
        moe_layers=tuple(i for i in range(num_layers) if arch.is_moe_layer(config, i)),
        num_experts=first_config_value(config, arch.num_experts_keys, "number of routed experts"),
        intermediate_size=first_config_value(config, arch.intermediate_size_keys, "expert intermediate size"),
        hidden_size=first_config_value(config, ("hidden_size",), "hidden size"),
    )

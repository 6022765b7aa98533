"""The MoE layout of one concrete model: its architecture plus its MoE layers and sizes (from config.json, or from
the model transformers builds from it on the meta device), and how to read and write its expert stacks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .derive import derive_layout
from .registry import base_model_type, get_arch
from .spec import ArchSpec, first_config_value

if TYPE_CHECKING:
    from ..checkpoint import CheckpointReader


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

    def fused_shape(self, matrix: str) -> tuple[int, int, int]:
        """The shape of the fused checkpoint tensor that holds `matrix`: (E, parts * out, in), or transposed."""
        fused = self.arch.fused[matrix]
        out, inp = self.expected_shape(matrix)
        E = self.num_experts
        shape = (E, inp, fused.parts * out) if fused.transposed else (E, fused.parts * out, inp)
        return (E * shape[1], shape[2]) if fused.flat else shape

    @property
    def expert_params_per_layer(self) -> int:
        return 3 * self.num_experts * self.intermediate_size * self.hidden_size

    def stored_names(self, layer: int, matrix: str) -> list[str]:
        return self.arch.stored_names(layer, matrix, self.num_experts)

    def read_experts(self, reader: CheckpointReader, layer: int, matrix: str) -> torch.Tensor:
        """One layer's matrices of one type as an (E, p, d) stack for gate/up, (E, d, p) for down, whichever way
        the checkpoint stores them (block-FP8 dequantised); a fused tensor is read only in the rows asked for."""
        if self.arch.fused is None:
            return torch.stack(list(reader.get_many(self.stored_names(layer, matrix), dequantize=True).values()))
        fused = self.arch.fused[matrix]
        out = self.expected_shape(matrix)[0]
        dim = 2 if fused.transposed else 1
        name = fused.name.format(layer=layer)
        if fused.flat:  # experts merged with the next dimension: read whole, then split (no part to slice alone)
            stored = reader.get(name)
            stack = stored.view(self.num_experts, -1, stored.shape[-1]).narrow(dim, fused.part * out, out)
        elif fused.interleaved:  # every parts-th element: read whole (safetensors slices have no step)
            stack = fused.take(reader.get(name), dim)
        else:
            stack = reader.get_part(name, dim, fused.part * out, (fused.part + 1) * out)
        return stack.transpose(1, 2).contiguous() if fused.transposed else stack.contiguous()

    def fused_tensors(self, layer: int) -> dict[str, list[str]]:
        """Fused layouts: each checkpoint tensor of a layer -> the matrix types it holds, in block order."""
        out: dict[str, list[str]] = {}
        for matrix, fused in sorted((self.arch.fused or {}).items(), key=lambda item: item[1].part):
            out.setdefault(fused.name.format(layer=layer), []).append(matrix)
        return out

    def assemble_fused(self, matrices: list[str], blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of `read_experts` for one fused tensor holding `matrices` (in block order): the blocks,
        each an (E, out, in) stack, in the stored form."""
        fused = self.arch.fused[matrices[0]]
        if fused.interleaved:  # (E, out, parts, in) -> rows alternate between the blocks
            stack = torch.stack([blocks[m] for m in matrices], dim=2).flatten(1, 2)
        else:
            stack = torch.cat([blocks[m] for m in matrices], dim=1)
        stack = stack.transpose(1, 2).contiguous() if fused.transposed else stack
        return stack.reshape(-1, stack.shape[-1]) if fused.flat else stack


def moe_layout(config: Mapping[str, Any]) -> MoeLayout:
    """Read the MoE layout from a raw `config.json` dict (no weights read).

    Families with explicit config rules need no transformers import; the others are read from the model that
    transformers builds from the config on the meta device (`derive.py`).
    """
    arch = get_arch(config.get("model_type"))
    if arch.is_moe_layer is None:
        derived = derive_layout(arch, {**config, "model_type": base_model_type(config.get("model_type"))})
        return MoeLayout(
            arch=arch,
            num_layers=derived.num_layers,
            moe_layers=derived.moe_layers,
            num_experts=derived.num_experts,
            intermediate_size=derived.intermediate_size,
            hidden_size=derived.hidden_size,
        )
    num_layers = first_config_value(config, ("num_hidden_layers",), "number of layers")
    return MoeLayout(
        arch=arch,
        num_layers=num_layers,
        moe_layers=tuple(i for i in range(num_layers) if arch.is_moe_layer(config, i)),
        num_experts=first_config_value(config, arch.num_experts_keys, "number of routed experts"),
        intermediate_size=first_config_value(config, arch.intermediate_size_keys, "expert intermediate size"),
        hidden_size=first_config_value(config, ("hidden_size",), "hidden size"),
    )

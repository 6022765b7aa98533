"""What mobe needs to know about one MoE architecture, as plain data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

MATRIX_TYPES = ("gate", "up", "down")


class UnsupportedArchitectureError(ValueError):
    """A model type mobe cannot read, with the reason."""


@dataclass(frozen=True)
class FusedTensor:
    """Where one matrix type of a layer's experts lives in a checkpoint that stores all experts in one tensor.

    Args:
        name: checkpoint name template with `{layer}`, e.g. `model.layers.{layer}.mlp.experts.gate_up_proj`.
        part / parts: the matrix is block `part` of `parts` equal blocks along the output dimension (gate is
            block 0 and up block 1 of a `gate_up_proj` of 2p rows).
        transposed: stored (E, in, out) instead of torch's (E, out, in) (Llama 4).
        flat: the expert dimension merged into the next one, (E * out, in) or (E * in, out) (DBRX).
        interleaved: the blocks alternate element by element along the output dimension instead of following each
            other (gpt-oss: gate = `[..., 0::2]`, up = `[..., 1::2]` of its `gate_up_proj`).
    """

    name: str
    part: int = 0
    parts: int = 1
    transposed: bool = False
    flat: bool = False
    interleaved: bool = False

    def take(self, tensor: Tensor, dim: int) -> Tensor:
        """This matrix type's block of `tensor` (the fused tensor, or a bias laid out the same way) along `dim`."""
        if self.interleaved:
            index = torch.arange(self.part, tensor.shape[dim], self.parts, device=tensor.device)
            return tensor.index_select(dim, index)
        size = tensor.shape[dim] // self.parts
        return tensor.narrow(dim, self.part * size, size)


@dataclass(frozen=True)
class ExpertsQuirk:
    """What an experts module computes beyond `down(act(gate x) * (up x))`, as data (gpt-oss).

    Args:
        glu: how the hidden state is formed from the gate and up projections, a name in
            `mobe.runtime.experts.GLU_FUNCTIONS` (`clamped_swiglu`: gpt-oss's).
        glu_attributes: attributes of transformers' experts module the glu takes as keyword arguments.
        gate_up_bias / down_bias: the experts module's per-expert biases, (E, parts * p) laid out as the fused
            gate/up weight's output dimension, and (E, d); kept uncompressed under their checkpoint names.
    """

    glu: str
    glu_attributes: tuple[str, ...] = ()
    gate_up_bias: str | None = None
    down_bias: str | None = None

    @property
    def biases(self) -> tuple[str, ...]:
        return tuple(b for b in (self.gate_up_bias, self.down_bias) if b is not None)


@dataclass(frozen=True)
class ArchSpec:
    """Tensor layout and config keys of one MoE architecture.

    Args:
        model_type: `config.json["model_type"]`.
        experts: template of one layer's routed-experts prefix, with `{layer}`.
        matrices: checkpoint name of each expert matrix type (`gate`, `up`, `down`); the tensor is
            `{experts}.{expert}.{name}.weight` with shape (p, d) for gate/up and (d, p) for down.
        num_experts_keys / intermediate_size_keys: config keys tried in order; empty: the sizes are read from the
            model transformers builds on the meta device (`derive.py`).
        is_moe_layer: which decoder layers hold routed experts, from the raw config dict; None: the layers whose
            experts module exists in the model transformers builds on the meta device.
        aliases: other `model_type`s with the same layout (Kimi-K2 uses DeepSeek-V3's).
        fused: experts stored as one tensor per layer (not one per expert): matrix type -> where it is.
        model_class: the transformers class that holds the checkpoint's tensors under their own names, where
            AutoModelForCausalLM would build a text-only model under other names (multimodal checkpoints).
        text_model: where `model_class.forward` cannot run text alone, its attribute that can (the native model's
            forward goes there).
        activation: the experts module's activation, as an attribute path (DBRX: `mlp.activation_fn`).
        no_calibration: why `--calibration` cannot stream this family one decoder layer at a time, if it cannot.
        quirk: what its experts compute besides the plain gated MLP (biases, another gating), if anything.
    """

    model_type: str
    experts: str
    matrices: Mapping[str, str] = field(
        default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    num_experts_keys: tuple[str, ...] = ()
    intermediate_size_keys: tuple[str, ...] = ()
    is_moe_layer: Callable[[Mapping[str, Any], int], bool] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # In memory (transformers 5) the routed experts of a layer are one module at this path (Mixtral's
    # `block_sparse_moe` is `mlp` there: transformers' own renaming rules map the names).
    experts_module: str = "model.layers.{layer}.mlp.experts"
    fused: Mapping[str, FusedTensor] | None = None
    model_class: str | None = None
    text_model: str | None = None
    activation: str = "act_fn"
    no_calibration: str | None = None
    quirk: ExpertsQuirk | None = None
    # The router of a layer (checkpoint prefix: its `weight` rows, and any other tensor whose first dimension is the
    # expert count, such as DeepSeek-V3's `e_score_correction_bias`, are per expert), and the config key that splits
    # the experts into contiguous routing groups (DeepSeek-V3's `n_group`), if any.
    router: str = "model.layers.{layer}.mlp.gate"
    router_groups_key: str | None = None

    def experts_prefix(self, layer: int) -> str:
        return self.experts.format(layer=layer)

    def router_prefix(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def tensor_name(self, layer: int, expert: int, matrix: str) -> str:
        """A per-expert checkpoint tensor (not for fused layouts, whose experts share one tensor)."""
        if self.fused is not None:
            raise ValueError(f"{self.model_type} stores its experts fused; there is no tensor per expert")
        return f"{self.experts_prefix(layer)}.{expert}.{self.matrices[matrix]}.weight"

    def storage(self) -> str:
        """How the checkpoint stores the experts of a layer, in one line (for `mobe info --list` and the docs)."""
        if self.fused is None:
            names = ",".join(self.matrices[m] for m in MATRIX_TYPES)
            return f"{self.experts}.{{e}}.{{{names}}}.weight (per expert)"
        tensors: dict[str, list[str]] = {}
        interleaved: set[str] = set()
        for matrix in MATRIX_TYPES:
            fused = self.fused[matrix]
            shape = {(False, False): "", (True, False): " (E, in, out)", (False, True): " (E*out, in)"}.get(
                (fused.transposed, fused.flat), " (E*in, out)"
            )
            tensors.setdefault(fused.name + shape, []).append(matrix)
            if fused.interleaved:
                interleaved.add(fused.name + shape)
        blocks = "; ".join(
            f"{name} = {'|'.join(matrices)}{' interleaved' if name in interleaved else ''}"
            for name, matrices in tensors.items()
        )
        biases = f"; biases {', '.join(self.quirk.biases)}" if self.quirk and self.quirk.biases else ""
        return blocks + biases + " (fused)"

    def stored_names(self, layer: int, matrix: str, num_experts: int) -> list[str]:
        """The checkpoint tensors that hold one layer's matrices of one type (one per expert, or one fused)."""
        if self.fused is not None:
            return [self.fused[matrix].name.format(layer=layer)]
        return [self.tensor_name(layer, e, matrix) for e in range(num_experts)]


def first_config_value(config: Mapping[str, Any], keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return int(value)
    raise ValueError(f"config.json has none of {list(keys)} ({what})")

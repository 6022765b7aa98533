"""What mobe needs to know about one MoE architecture, as plain data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    """

    name: str
    part: int = 0
    parts: int = 1
    transposed: bool = False
    flat: bool = False


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
        for matrix in MATRIX_TYPES:
            fused = self.fused[matrix]
            shape = {(False, False): "", (True, False): " (E, in, out)", (False, True): " (E*out, in)"}.get(
                (fused.transposed, fused.flat), " (E*in, out)"
            )
            tensors.setdefault(fused.name + shape, []).append(matrix)
        return "; ".join(f"{name} = {'|'.join(matrices)}" for name, matrices in tensors.items()) + " (fused)"

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

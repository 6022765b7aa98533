"""What transformers itself says about a family: its model built on the meta device from the config.

Families registered without explicit config rules take their MoE layers and sizes from here: the layers whose
routed-experts module exists, and the experts' shapes, exactly as the installed transformers builds them. Nothing is
allocated (meta tensors), so this costs the same for a 1T model as for a tiny one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .registry import get_arch
from .spec import ArchSpec, UnsupportedArchitectureError


class NotInTransformersError(UnsupportedArchitectureError):
    """The installed transformers has no model class for a family."""


@dataclass(frozen=True)
class DerivedLayout:
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    intermediate_size: int  # p
    hidden_size: int  # d


def transformers_config(config: Mapping[str, Any], model_type: str):
    """The transformers config object of a raw config dict, for `model_type` (its `mobe` section left out)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        import transformers

        raise NotInTransformersError(
            f"model_type {model_type!r} is not in the installed transformers {transformers.__version__}"
        )
    config_cls = CONFIG_MAPPING[model_type]
    clean = {k: v for k, v in config.items() if k not in ("mobe", "model_type", "architectures", "auto_map")}
    return config_cls.from_dict(config_cls._decode_special_floats(clean))  # `{"__float__": "Infinity"}` as saved


def model_class(model_type: str, class_name: str | None = None) -> type:
    """The family's model class: `class_name` from transformers, or the causal LM AutoModelForCausalLM picks."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if class_name is not None:
        if not hasattr(transformers, class_name):
            raise NotInTransformersError(f"the installed transformers {transformers.__version__} has no {class_name}")
        return getattr(transformers, class_name)
    model_cls = AutoModelForCausalLM._model_mapping.get(CONFIG_MAPPING[model_type], None)
    if model_cls is None:
        raise NotInTransformersError(f"transformers has no causal-LM class for model_type {model_type!r}")
    return model_cls


def model_on_meta(config: Mapping[str, Any], model_type: str, class_name: str | None = None) -> torch.nn.Module:
    """The family's model class (`model_class`) built from `config` on the meta device."""
    cfg = transformers_config(config, model_type)
    model_cls = model_class(model_type, class_name)
    with torch.device("meta"):
        return model_cls(cfg)


def experts_module_sizes(module: torch.nn.Module, arch: ArchSpec, layer: int) -> tuple[int, int, int]:
    """(E, p, d) of a transformers experts module: `down_proj` is (E, d, p), or (E, p, d) where `gate_up_proj`
    is stored transposed, (E, d, 2p) (Llama 4); other modules hold the checkpoint's own fused tensors (DBRX)."""
    down = getattr(module, "down_proj", None)
    gate_up = getattr(module, "gate_up_proj", None)
    if not isinstance(down, torch.Tensor) or not isinstance(gate_up, torch.Tensor) or down.dim() != 3:
        return _sizes_from_fused_tensors(module, arch, layer)
    E = down.shape[0]
    if tuple(gate_up.shape) == (E, 2 * down.shape[2], down.shape[1]):
        return E, down.shape[2], down.shape[1]
    if tuple(gate_up.shape) == (E, down.shape[2], 2 * down.shape[1]):
        return E, down.shape[1], down.shape[2]
    raise ValueError(f"{type(module).__name__}: gate_up_proj {tuple(gate_up.shape)} does not fit down_proj")


def check_no_other_parameters(module: torch.nn.Module, arch: ArchSpec, layer: int) -> None:
    """Refuse experts modules holding parameters besides the gate, up and down matrices and the biases the family's
    quirk declares (gpt-oss), which the factorised experts would drop."""
    prefix = arch.experts_module.format(layer=layer) + "."
    known = {"gate_up_proj", "down_proj", *(arch.quirk.biases if arch.quirk else ())} | {
        f.name.format(layer=layer).removeprefix(prefix) for f in (arch.fused or {}).values()
    }
    other = sorted(name for name, _ in module.named_parameters() if name not in known)
    if other:
        raise UnsupportedArchitectureError(
            f"{arch.model_type}: the experts module {type(module).__name__} also holds {other}, which the factorised "
            "experts (act(gate x) * (up x), then down) cannot represent"
        )


def _sizes_from_fused_tensors(module: torch.nn.Module, arch: ArchSpec, layer: int) -> tuple[int, int, int]:
    """(E, p, d) from the module's parameters named as the checkpoint's fused tensors and its `num_experts`."""
    prefix = arch.experts_module.format(layer=layer) + "."
    E = getattr(module, "num_experts", None)
    if arch.fused is None or E is None:
        raise ValueError(f"{type(module).__name__}: no gate_up_proj / down_proj, and no fused layout to read it by")
    gate = arch.fused["gate"]
    shape = tuple(module.get_parameter(gate.name.format(layer=layer).removeprefix(prefix)).shape)
    if gate.flat:
        shape = (E, shape[0] // E, shape[1])
    out, inp = (shape[2], shape[1]) if gate.transposed else (shape[1], shape[2])
    return E, out // gate.parts, inp


@functools.lru_cache(maxsize=32)
def _derive(arch_key: str, config_json: str) -> DerivedLayout:
    config = json.loads(config_json)
    arch = get_arch(arch_key)
    experts_module = arch.experts_module
    model = model_on_meta(config, arch_key, arch.model_class)
    num_layers = model.config.get_text_config().num_hidden_layers
    moe, sizes = [], set()
    for layer in range(num_layers):
        try:
            module = model.get_submodule(experts_module.format(layer=layer))
        except AttributeError:
            continue
        moe.append(layer)
        check_no_other_parameters(module, arch, layer)
        sizes.add(experts_module_sizes(module, arch, layer))
    if not moe:
        raise ValueError(f"{arch_key}: this config builds no routed-experts module at {experts_module}")
    if len(sizes) > 1:
        raise ValueError(f"{arch_key}: MoE layers of different sizes {sorted(sizes)} are not supported")
    E, p, d = sizes.pop()
    return DerivedLayout(num_layers, tuple(moe), E, p, d)


def derive_layout(arch: ArchSpec, config: Mapping[str, Any]) -> DerivedLayout:
    """Layers, MoE layers and expert sizes of `config` as transformers builds the model (cached per config)."""
    config_json = json.dumps(dict(config), sort_keys=True, default=str)
    return _derive(arch.model_type, config_json)

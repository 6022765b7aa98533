"""Load a checkpoint as a transformers causal LM: native MoBE checkpoints run on their factors.

A thin convenience over `AutoModelForCausalLM.from_pretrained` (see `auto.py`), which also opens native
checkpoints written before they declared their own model type (`qwen3_moe` plus a native mobe section).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..architectures import NATIVE_MODEL_TYPE_PREFIX, get_arch, supported_model_types
from ..architectures.derive import model_class
from ..checkpoint import CheckpointReader
from .auto import native_classes
from .experts import MobeExperts


def configure_experts(model: nn.Module, *, workspace_experts: int = 16, cache_mib: float = 0.0) -> nn.Module:
    """Set every `MobeExperts` module's workspace and mixed-basis cache budget (per module); returns `model`."""
    for module in model.modules():
        if isinstance(module, MobeExperts):
            module.configure(workspace_experts, cache_mib)
    return model


def _causal_lm_class(config: dict, auto: type) -> type:
    """`auto` (AutoModelForCausalLM), or the family's own class for a plain checkpoint that it cannot open
    (Qwen3-VL-MoE, which transformers maps to the image-text-to-text auto class only)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING or auto._model_mapping.get(CONFIG_MAPPING[model_type], None) is not None:
        return auto
    if model_type in supported_model_types() and get_arch(model_type).model_class:
        return model_class(model_type, get_arch(model_type).model_class)
    return auto


def load_model(
    path: str | Path,
    *,
    workspace_experts: int = 16,
    cache_mib: float = 0.0,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A transformers causal LM for `path` in eval mode; native MoBE checkpoints keep their factors.

    Args:
        workspace_experts: experts whose compressed matrices are materialised at once in a forward.
        cache_mib: memory per experts module for an LRU cache of recently used experts' mixed bases (0 = none).
        dtype: parameter dtype (default: the checkpoint's). device: where the model goes.
    """
    from transformers import AutoModelForCausalLM

    reader = CheckpointReader(path)
    section = reader.config.get("mobe") or {}
    kwargs = {"dtype": dtype or "auto"}
    if section.get("format") == "native" and not reader.config["model_type"].startswith(NATIVE_MODEL_TYPE_PREFIX):
        config_cls, _ = native_classes(reader.config["model_type"])  # written before native types existed
        kwargs["config"] = config_cls.from_dict({k: v for k, v in reader.config.items() if k != "model_type"})
    if (section.get("quantization") or {}).get("allocation"):  # experts at several bit widths
        model = _load_mixed_precision(reader, dtype)
    else:
        model = _causal_lm_class(reader.config, AutoModelForCausalLM).from_pretrained(reader.path, **kwargs)
    configure_experts(model, workspace_experts=workspace_experts, cache_mib=cache_mib)
    return model.to(device).eval()


def _load_mixed_precision(reader: CheckpointReader, dtype: torch.dtype | str | None) -> nn.Module:
    """A dense checkpoint whose routed experts are stored at several bit widths (`quantize_checkpoint(allocation=)`).

    transformers (5.x) decompresses every routed expert with one config group's scheme, which fails or reads the
    other widths wrongly; so the model is built from its config without the quantisation, the other tensors are
    loaded as stored, and each expert matrix is read back at its own width by compressed-tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..calibrate.collect import EXPERT_TENSOR
    from ..quantize.checkpoint import load_mixed_experts

    config = AutoConfig.from_pretrained(reader.path)
    del config.quantization_config
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else config.dtype or torch.float32
    model = _causal_lm_class(reader.config, AutoModelForCausalLM).from_config(config, dtype=dtype)
    names = [n for n in reader.weight_map if not EXPERT_TENSOR.search(n)]
    result = model.load_state_dict(reader.get_many(names), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if ".experts." not in k and not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{reader.path}: tensors that do not match the model: {(missing + result.unexpected_keys)[:3]}"
        )
    model.tie_weights()
    load_mixed_experts(model, reader)
    return model

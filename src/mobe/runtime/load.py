"""Load a native MoBE checkpoint as a transformers model of its original architecture.

The model is built on the meta device (nothing allocated), each compressed layer's experts module is replaced by
a `MobeExperts` holding the factors, and every tensor is then assigned from the shards; the dense gate/up
experts of compressed layers are never created.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..architectures import MoeLayout, moe_layout
from ..checkpoint import CheckpointReader
from ..export import FACTOR_PREFIX
from .experts import MobeExperts


def _stack(reader: CheckpointReader, layout: MoeLayout, layer: int, matrix: str) -> torch.Tensor:
    names = [layout.arch.tensor_name(layer, e, matrix) for e in range(layout.num_experts)]
    return torch.stack(list(reader.get_many(names).values()))


def _experts_module(
    model: nn.Module,
    reader: CheckpointReader,
    layout: MoeLayout,
    layer: int,
    section: dict,
    original: nn.Module,
    workspace_experts: int,
    cache_mib: float,
) -> nn.Module:
    from ..pipeline import read_native_factors

    compressed = layer in section["layers"]
    proj = {
        m: read_native_factors(reader, layout, layer, m)
        if compressed and m in section["matrices"]
        else _stack(reader, layout, layer, m)
        for m in ("gate", "up", "down")
    }
    if not compressed:  # an uncompressed MoE layer: fused as transformers does
        original.to_empty(device="cpu")
        with torch.no_grad():
            original.gate_up_proj.copy_(torch.cat([proj["gate"], proj["up"]], dim=1))
            original.down_proj.copy_(proj["down"])
        return original
    return MobeExperts(original.act_fn, proj["gate"], proj["up"], proj["down"], workspace_experts, cache_mib)


def load_model(
    path: str | Path,
    *,
    workspace_experts: int = 16,
    cache_mib: float = 0.0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A transformers causal LM for `path`: native MoBE checkpoints run on their factors; others load as usual.

    Args:
        workspace_experts: experts whose mixed bases are built at once in a forward (bounds the workspace).
        cache_mib: memory for an LRU cache of mixed bases of recently used experts (0 = none).
        dtype / device: cast and move the loaded model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    reader = CheckpointReader(path)
    section = reader.config.get("mobe")
    if not section or section.get("format") != "native":
        model = AutoModelForCausalLM.from_pretrained(reader.path, dtype=dtype or "auto")
        return model.to(device).eval()
    if section.get("method", "mobe") != "mobe":
        raise ValueError(
            f"{reader.path}: the runtime runs method 'mobe'; for {section['method']!r} use "
            "`mobe reconstruct` and load the dense checkpoint"
        )
    layout = moe_layout(reader.config)
    config = AutoConfig.from_pretrained(reader.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    expert_tensor = re.compile(r"\.experts\.\d+\.")
    for layer in layout.moe_layers:
        name = layout.arch.experts_module.format(layer=layer)
        parent, child = name.rsplit(".", 1)
        module = _experts_module(
            model, reader, layout, layer, section, model.get_submodule(name), workspace_experts, cache_mib
        )
        setattr(model.get_submodule(parent), child, module)

    for shard, names in reader.tensors_by_shard().items():
        rest = [n for n in names if not expert_tensor.search(n) and FACTOR_PREFIX not in n.rsplit(".", 1)[-1]]
        state = {layout.arch.module_name(n): t for n, t in reader.get_many(rest).items()}
        unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise ValueError(f"{reader.path / shard}: tensors the model does not have: {unexpected[:5]}")
    for module in list(model.modules()):  # non-persistent buffers (rotary inv_freq) are rebuilt on the CPU
        for child_name, child in list(module.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and hasattr(child, "config"):
                setattr(module, child_name, type(child)(config=child.config))
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"{reader.path}: no tensor in the checkpoint for {still_meta[:5]}")
    if (reader.path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(reader.path)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()

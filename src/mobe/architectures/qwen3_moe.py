from .spec import ArchSpec


def is_sparse_layer(config, layer: int) -> bool:
    """Qwen2/3-MoE: every `decoder_sparse_step`-th layer, except those listed in `mlp_only_layers`."""
    step = config.get("decoder_sparse_step") or 1
    return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


QWEN3_MOE = ArchSpec(
    model_type="qwen3_moe",
    experts="model.layers.{layer}.mlp.experts",
    matrices={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_keys=("num_experts", "num_local_experts"),
    intermediate_size_keys=("moe_intermediate_size",),
    is_moe_layer=is_sparse_layer,
)

from .spec import ArchSpec


def is_routed_layer(config, layer: int) -> bool:
    """The first `first_k_dense_replace` layers are dense; then every `moe_layer_freq`-th is MoE."""
    freq = config.get("moe_layer_freq") or 1
    return layer >= (config.get("first_k_dense_replace") or 0) and layer % freq == 0


# The shared experts (`mlp.shared_experts`) are left alone. Kimi-K2 ships the same layout.
DEEPSEEK_V3 = ArchSpec(
    model_type="deepseek_v3",
    experts="model.layers.{layer}.mlp.experts",
    matrices={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_keys=("n_routed_experts", "num_local_experts"),
    intermediate_size_keys=("moe_intermediate_size",),
    is_moe_layer=is_routed_layer,
    aliases=("kimi_k2",),
    router_groups_key="n_group",
)

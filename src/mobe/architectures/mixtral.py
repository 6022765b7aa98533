from .spec import ArchSpec

# Mixtral activates w1 (gate) and multiplies by w3 (up); w2 is the down projection.
MIXTRAL = ArchSpec(
    model_type="mixtral",
    experts="model.layers.{layer}.block_sparse_moe.experts",
    matrices={"gate": "w1", "up": "w3", "down": "w2"},
    num_experts_keys=("num_local_experts",),
    intermediate_size_keys=("intermediate_size",),
    is_moe_layer=lambda config, layer: True,
    router="model.layers.{layer}.block_sparse_moe.gate",
)

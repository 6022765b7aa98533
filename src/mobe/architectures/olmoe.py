from .spec import ArchSpec

OLMOE = ArchSpec(
    model_type="olmoe",
    experts="model.layers.{layer}.mlp.experts",
    matrices={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_keys=("num_experts", "num_local_experts"),
    intermediate_size_keys=("intermediate_size",),
    is_moe_layer=lambda config, layer: True,
)

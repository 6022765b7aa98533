from .qwen3_moe import is_sparse_layer
from .spec import ArchSpec

# Qwen2-MoE's shared expert (`mlp.shared_expert`) and its gate are left alone.
QWEN2_MOE = ArchSpec(
    model_type="qwen2_moe",
    experts="model.layers.{layer}.mlp.experts",
    matrices={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    num_experts_keys=("num_experts", "num_local_experts"),
    intermediate_size_keys=("moe_intermediate_size",),
    is_moe_layer=is_sparse_layer,
)

from dataclasses import replace

from .qwen3_moe import QWEN3_MOE

# Same expert layout as Qwen3-MoE; Qwen2-MoE's shared expert (`mlp.shared_expert`) and its gate are left alone.
QWEN2_MOE = replace(QWEN3_MOE, model_type="qwen2_moe")

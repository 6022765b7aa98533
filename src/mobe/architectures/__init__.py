"""Registry of supported MoE architectures, keyed by `config.json["model_type"]`.

Adding an architecture is one `ArchSpec` (data) plus one `register()` line below; families whose MoE layers and
sizes transformers can tell (`derive.py`) are one line in `families.py`.
"""

from __future__ import annotations

from .deepseek_v3 import DEEPSEEK_V3
from .families import FAMILIES, UNSUPPORTED
from .layout import MoeLayout, moe_layout
from .mixtral import MIXTRAL
from .olmoe import OLMOE
from .qwen2_moe import QWEN2_MOE
from .qwen3_moe import QWEN3_MOE
from .registry import (
    NATIVE_MODEL_TYPE_PREFIX,
    base_model_type,
    canonical_model_types,
    get_arch,
    native_model_type,
    register,
    supported_model_types,
)
from .spec import MATRIX_TYPES, ArchSpec, ExpertsQuirk, FusedTensor, UnsupportedArchitectureError

for _spec in (QWEN3_MOE, QWEN2_MOE, MIXTRAL, DEEPSEEK_V3, OLMOE, *FAMILIES):
    register(_spec)

__all__ = [
    "MATRIX_TYPES",
    "NATIVE_MODEL_TYPE_PREFIX",
    "UNSUPPORTED",
    "ArchSpec",
    "ExpertsQuirk",
    "FusedTensor",
    "MoeLayout",
    "UnsupportedArchitectureError",
    "base_model_type",
    "canonical_model_types",
    "get_arch",
    "moe_layout",
    "native_model_type",
    "register",
    "supported_model_types",
]

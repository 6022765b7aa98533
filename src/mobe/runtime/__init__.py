"""Stage 4: run native checkpoints in transformers without rebuilding the dense experts.

Once mobe is imported, transformers' Auto classes know the native model types (registered on first use: see
auto.py), so that `AutoModelForCausalLM.from_pretrained(native_checkpoint)` returns the model with its compressed
experts.
"""

from .auto import MissingFactorsError, install_compressed_experts, native_classes, register_native_models
from .experts import FactoredMatrix, MobeExperts
from .load import configure_experts, load_model

__all__ = [
    "FactoredMatrix",
    "MissingFactorsError",
    "MobeExperts",
    "configure_experts",
    "install_compressed_experts",
    "load_model",
    "native_classes",
    "register_native_models",
]

"""mobe: compress Mixture-of-Experts LLMs with Mixture-of-Basis-Experts (MoBE)."""

from .architectures import ArchSpec, get_arch, register, supported_model_types
from .checkpoint import CheckpointError, CheckpointReader
from .config import DistillConfig, MobeConfig, QuantizeConfig
from .distill import DistillReport
from .evaluate import CompressionReport
from .factorize import MobeFactors, fit_mobe
from .info import ModelInfo, model_info
from .pipeline import CompressionError, compress, reconstruct
from .quantize import QuantizeReport, quantize_checkpoint
from .runtime import MobeExperts, load_model

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "CheckpointError",
    "CheckpointReader",
    "CompressionError",
    "CompressionReport",
    "DistillConfig",
    "DistillReport",
    "MobeConfig",
    "MobeExperts",
    "MobeFactors",
    "ModelInfo",
    "QuantizeConfig",
    "QuantizeReport",
    "compress",
    "fit_mobe",
    "get_arch",
    "load_model",
    "model_info",
    "quantize_checkpoint",
    "reconstruct",
    "register",
    "supported_model_types",
]

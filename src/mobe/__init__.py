"""mobe: compress Mixture-of-Experts LLMs with Mixture-of-Basis-Experts (MoBE).

`import mobe` is cheap: the public names below resolve on first use (a module `__getattr__`, as transformers' own
lazy module does), so torch and transformers load only when something needs them. It also makes the native model
types (`mobe_<family>`) known to transformers' Auto classes, registered when transformers first asks for one
(`_native_types.py`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _native_types

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)

# Public name -> the submodule that defines it.
_EXPORTS = {
    "ArchSpec": "architectures",
    "CheckpointError": "checkpoint",
    "CheckpointReader": "checkpoint",
    "CompressionError": "pipeline",
    "CompressionReport": "evaluate",
    "DistillConfig": "config",
    "DistillReport": "distill",
    "MobeConfig": "config",
    "MobeExperts": "runtime",
    "MobeFactors": "factorize",
    "ModelInfo": "info",
    "QuantizeConfig": "config",
    "QuantizeReport": "quantize",
    "compress": "pipeline",
    "fit_mobe": "factorize",
    "get_arch": "architectures",
    "load_model": "runtime",
    "model_info": "info",
    "quantize_checkpoint": "quantize",
    "reconstruct": "pipeline",
    "register": "architectures",
    "supported_model_types": "architectures",
}

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


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule on first use; or a submodule (`mobe.pipeline`)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next lookup does not come here
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # a submodule that exists but fails to import
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_native_types.install()

if TYPE_CHECKING:  # what the names resolve to, for type checkers and editors
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

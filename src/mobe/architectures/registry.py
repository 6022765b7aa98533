"""The registry of architectures by model type, and the native (`mobe_`) model types; `__init__` fills it."""

from __future__ import annotations

from .families import UNSUPPORTED
from .spec import ArchSpec, UnsupportedArchitectureError

_REGISTRY: dict[str, ArchSpec] = {}

# A native MoBE checkpoint declares `mobe_<family>` so that transformers never opens it as the plain family.
NATIVE_MODEL_TYPE_PREFIX = "mobe_"


def native_model_type(model_type: str) -> str:
    return NATIVE_MODEL_TYPE_PREFIX + model_type


def base_model_type(model_type: str | None) -> str | None:
    """The family of a model type: `mobe_qwen3_moe` -> `qwen3_moe`; other names unchanged."""
    if model_type and model_type.startswith(NATIVE_MODEL_TYPE_PREFIX):
        return model_type[len(NATIVE_MODEL_TYPE_PREFIX) :]
    return model_type


def register(spec: ArchSpec) -> None:
    for name in (spec.model_type, *spec.aliases):
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def canonical_model_types() -> list[str]:
    """One name per registered architecture (aliases such as kimi_k2 left out)."""
    return sorted({spec.model_type for spec in _REGISTRY.values()})


def get_arch(model_type: str | None) -> ArchSpec:
    """The spec of a family, for its own model type or its native (`mobe_`) one."""
    model_type = base_model_type(model_type)
    if model_type in UNSUPPORTED:
        raise UnsupportedArchitectureError(f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type]

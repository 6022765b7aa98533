"""Native checkpoints open with `AutoModelForCausalLM.from_pretrained`, as every model does.

A native checkpoint declares `model_type: "mobe_<base>"` (for example `mobe_qwen3_moe`). Once mobe is imported,
transformers' first lookup of such a type registers, for that family (if the installed transformers has it), a
config class and a causal-LM class under that name with transformers' Auto classes (`mobe/_native_types.py` routes
the lookup to `register_native_type`; `register_native_models` registers every family at once): the model is the
family's own class with the compressed layers' experts modules replaced by `MobeExperts` before any weight is read,
so transformers' loader (dtype, `device_map`, offload, its checkpoint-conversion rules) fills the factor tensors
under their on-disk names and the dense experts are never built. Without mobe imported, transformers does not know
the model type and refuses to open the checkpoint: a native checkpoint never loads as random experts.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

from torch import nn

from ..architectures import (
    base_model_type,
    canonical_model_types,
    get_arch,
    moe_layout,
    native_model_type,
)
from ..export.native import factor_meta, factor_shapes
from ..factorize import get_method
from .experts import FactoredMatrix, MobeExperts


def install_compressed_experts(model: nn.Module, config: Any) -> None:
    """Replace the experts module of every MoE layer of `model` (built from `config`) by `MobeExperts`."""
    section = config.mobe
    layout = moe_layout(config.to_dict())
    method = section.get("method", "mobe")
    get_method(method)  # an unknown method fails here, by name
    fused = layout.arch.fused is not None
    for layer in layout.moe_layers:
        # Per-expert layouts: uncompressed MoE layers too, their experts load unfused, as on disk. Fused layouts:
        # uncompressed layers keep transformers' module, which loads the fused tensors as they are.
        if fused and layer not in section["layers"]:
            continue
        path = layout.arch.experts_module.format(layer=layer)
        original = model.get_submodule(path)
        compressed = section["matrices"] if layer in section["layers"] else ()
        factored = {
            m: FactoredMatrix(
                method, factor_shapes(section, layout, m), factor_meta(section, m), section.get("quantization")
            )
            for m in compressed
        }
        quirk = layout.arch.quirk
        experts = MobeExperts(
            None if quirk else operator.attrgetter(layout.arch.activation)(original),
            layout.num_experts,
            layout.intermediate_size,
            layout.hidden_size,
            factored,
            layout.arch.matrices,
            quirk=quirk,
            glu_kwargs={a: getattr(original, a) for a in quirk.glu_attributes} if quirk else None,
            fused=layout.arch.fused,
        )
        parent, child = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, experts)


class MissingFactorsError(ValueError):
    pass


def _from_pretrained(cls, *args, **kwargs):
    """transformers' from_pretrained, refusing (instead of initialising at random) missing expert tensors."""
    want_info = kwargs.pop("output_loading_info", False)
    model, info = super(cls, cls).from_pretrained(*args, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", ()) if ".experts." in k]
    if missing:
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        raise MissingFactorsError(f"{where}: the checkpoint has no tensor for {sorted(missing)[:3]} (and the rest)")
    return (model, info) if want_info else model


@functools.cache
def _native_classes(base: str) -> tuple[type, type] | None:
    """(config class, causal-LM class) of the native variant of family `base`, or None if transformers lacks it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..architectures.derive import NotInTransformersError, model_class

    if base not in CONFIG_MAPPING:
        return None
    base_config = CONFIG_MAPPING[base]
    try:
        base_model = model_class(base, get_arch(base).model_class)
    except NotInTransformersError:
        return None
    name = native_model_type(base)
    config_cls = type(f"Mobe{base_config.__name__}", (base_config,), {"model_type": name, "__module__": __name__})

    def __init__(self, config):
        base_model.__init__(self, config)
        install_compressed_experts(self, config)

    attributes = {
        "config_class": config_cls,
        "__init__": __init__,
        "from_pretrained": classmethod(_from_pretrained),
        "__module__": __name__,
    }
    if get_arch(base).text_model is not None:
        attributes["forward"] = _text_forward(get_arch(base).text_model)
    model_cls = type(f"Mobe{base_model.__name__}", (base_model,), attributes)
    AutoConfig.register(name, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _register_conversions(base, name, model_cls.__name__)
    globals()[config_cls.__name__] = config_cls  # importable by name (pickling, Ray workers)
    globals()[model_cls.__name__] = model_cls
    return config_cls, model_cls


def _text_forward(text_model: str):
    """A forward that hands text straight to the model's language model (the `text_model` attribute), for families
    whose multimodal forward cannot run text (transformers 5.24's Llama 4 reads `image_outputs` from a language-model
    output that has none, on every input)."""

    def forward(self, input_ids=None, pixel_values=None, **kwargs):
        if pixel_values is not None:
            raise ValueError(f"{type(self).__name__} runs text only (its compressed experts are in the language model)")
        kwargs.pop("mm_encoder_outputs", None)
        return getattr(self, text_model)(input_ids=input_ids, **kwargs)

    return forward


def _register_conversions(base: str, *names: str) -> None:
    """The native type's loading rules: the base family's renamings and non-expert rules, and each dense expert
    matrix type stacked (not fused with its neighbour: a layer may keep gate dense and compress up)."""
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    mapping = cm.get_checkpoint_conversion_mapping(base)
    if mapping is None:
        pattern = getattr(cm, "_MODEL_TO_CONVERSION_PATTERN", {}).get(base)
        mapping = (cm.get_checkpoint_conversion_mapping(pattern) if pattern else None) or []
    arch = get_arch(base)
    if arch.fused is not None:  # factors and dense stacks are stored under their module names: nothing to convert
        for name in names:
            cm.register_checkpoint_conversion_mapping(name, mapping, overwrite=True)
        return
    kept = [t for t in mapping if not any(".experts." in p for p in t.source_patterns)]
    experts = arch.experts_module.split("{layer}.", 1)[1]  # `mlp.experts` (patterns are regexes: no leading dot,
    stacks = [  # which would also match `shared_experts`)
        WeightConverter(f"{experts}.*.{n}.weight", f"{experts}.{n}", operations=[MergeModulelist(dim=0)])
        for n in arch.matrices.values()
    ]
    for name in names:  # the model type, and the class name (looked up first, whatever the config says)
        cm.register_checkpoint_conversion_mapping(name, kept + stacks, overwrite=True)


def register_native_models() -> dict[str, tuple[type, type]]:
    """Register every supported family's native type with transformers (idempotent); returns what was registered."""
    out = {}
    for base in canonical_model_types():
        classes = _native_classes(base)
        if classes is not None:
            out[native_model_type(base)] = classes
    return out


def register_native_type(model_type: str) -> bool:
    """Register the native type `model_type` (`mobe_<family>`) with transformers, if mobe supports the family and
    the installed transformers has it (idempotent); returns whether it is registered."""
    base = base_model_type(model_type)
    return base in canonical_model_types() and _native_classes(base) is not None


def native_classes(model_type: str) -> tuple[type, type]:
    """The registered (config, model) classes for a native or base model type (registered now if they were not)."""
    base = base_model_type(model_type)
    if not register_native_type(base):
        get_arch(base)  # unsupported family: the registry's own error
        raise ValueError(f"the installed transformers has no model class for {base!r}")
    return _native_classes(base)


def __getattr__(name: str) -> type:
    """A native class by name (`MobeQwen3MoeConfig`), registering every family's: how pickles refer to them (Ray
    workers, multiprocessing) in a process that has not opened a native checkpoint yet."""
    if name.startswith("Mobe"):
        register_native_models()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

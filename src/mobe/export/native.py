"""The native MoBE checkpoint format, written and read in one place.

Tensors: each compressed (layer, matrix type) keeps its method's factor tensors beside the experts, under
`{experts}.{gate_proj}.mobe_{field}` (`factor_tensor_names`); a quantised factor (`mobe quantize`) is stored as
`NAME.qweight` and `NAME.scales`. config.json: the source's, `model_type` renamed `mobe_<family>` (transformers
opens it only through mobe), and a `mobe` section with the run's settings plus `factor_suffixes`, `factor_shapes`
and `factor_meta` (per matrix type), `base_model_type` and `base_architectures`, and `quantization` where the
factors are integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from safetensors import SafetensorError

from ..architectures import MoeLayout, base_model_type, native_model_type
from ..checkpoint import CheckpointError, CheckpointReader
from ..checkpoint.mxfp4 import without_quantization
from ..config import FORMAT_VERSION, MobeConfig
from ..factorize import ExpertFactors, MobeFactors, get_method

FACTOR_PREFIX = "mobe_"
FACTOR_SUFFIXES = {field: FACTOR_PREFIX + field for field in MobeFactors.tensor_fields}  # MoBE's, as first written
QUANTIZED_PARTS = ("qweight", "scales")
# What only a native checkpoint's mobe section holds (a dense output rebuilt from it drops them).
NATIVE_ONLY_KEYS = ("factor_suffixes", "factor_shapes", "factor_meta", "base_model_type", "base_architectures")
FactorSource = Callable[[int, str], ExpertFactors]


class NativeFormatError(CheckpointError):
    """A native checkpoint that does not hold what its config.json declares (one line, naming the file)."""


def factor_tensor_names(
    layout: MoeLayout, layer: int, matrix: str, fields: tuple[str, ...] = MobeFactors.tensor_fields
) -> dict[str, str]:
    """Checkpoint names of one (layer, matrix)'s factor tensors: `{experts}.{gate_proj}.mobe_{field}`."""
    base = f"{layout.arch.experts_prefix(layer)}.{layout.arch.matrices[matrix]}"
    return {field: f"{base}.{FACTOR_PREFIX}{field}" for field in fields}


def is_factor_tensor(name: str) -> bool:
    """A native factor tensor, `...mobe_A`, or one of its quantised parts, `...mobe_A.qweight`."""
    parts = name.rsplit(".", 2)
    return parts[-1].startswith(FACTOR_PREFIX) or (len(parts) > 1 and parts[-2].startswith(FACTOR_PREFIX))


def factor_meta(section: Mapping[str, Any], matrix: str) -> dict:
    """The settings a matrix type's factors need (the run's, plus what its fit decided, e.g. SLBF's orientation)."""
    return {**section, **section.get("factor_meta", {}).get(matrix, {})}


def factor_shapes(section: Mapping[str, Any], layout: MoeLayout, matrix: str) -> dict[str, list[int]]:
    """Shapes of one compressed matrix type's factor tensors (the same in every compressed layer)."""
    shapes = section.get("factor_shapes", {}).get(matrix)
    if shapes:
        return shapes
    if section.get("method", "mobe") != "mobe":  # only MoBE checkpoints predate the recorded shapes
        raise ValueError(f"config.json mobe section has no factor_shapes for {matrix!r}")
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size
    g, m, r = section.get("groups", 1), section["num_bases"], section["rank"]
    return {"A": [E, p, r], "bases": [g, m // g, r, d], "coef": [E, m // g]}


def run_section(config: MobeConfig, jobs: list[tuple[int, str]], fmt: str) -> dict:
    """The `mobe` section of an output's config.json as the run sets it (`output_config` adds the native fields)."""
    return {
        "version": FORMAT_VERSION,
        "format": fmt,
        "method": config.method,
        "num_bases": config.num_bases,
        "rank": config.rank,
        "activation": config.activation,
        "groups": config.groups,
        "layers": sorted({layer for layer, _ in jobs}),
        "matrices": list(config.matrices),
    }


def output_config(source: dict, section: dict, jobs: list[tuple[int, str]], factors_of: FactorSource) -> dict:
    """config.json of an output: the source's, plus the mobe section; a native output declares `mobe_<family>`,
    which transformers opens only through mobe (never as the plain family with random experts)."""
    config = without_quantization({k: v for k, v in source.items() if k != "mobe"})  # MXFP4 experts written bf16
    if section["format"] == "native":
        family = base_model_type(config["model_type"])
        first_layer = jobs[0][0]
        first = {m: factors_of(first_layer, m) for layer, m in jobs if layer == first_layer}
        fields = get_method(section["method"]).factors_cls.tensor_fields
        section = {
            **section,
            "factor_suffixes": {field: FACTOR_PREFIX + field for field in fields},
            "base_model_type": family,
            "base_architectures": config.get("architectures"),
            "factor_shapes": {
                m: {f: list(t.shape) for f, t in factors.tensors().items()} for m, factors in first.items()
            },
            "factor_meta": {m: factors.meta() for m, factors in first.items()},
        }
        config["model_type"] = native_model_type(family)
        config["architectures"] = [f"Mobe{name}" for name in config.get("architectures") or []] or None
    config["mobe"] = section
    return config


def dense_config(native: dict) -> dict:
    """config.json of a dense checkpoint rebuilt from a native one: the family's own model type and classes."""
    section = native["mobe"]
    dropped = {*NATIVE_ONLY_KEYS, "quantization"}  # the dense matrices are rebuilt in floating point
    dense_section = {k: v for k, v in section.items() if k not in dropped} | {"format": "dense"}
    family = section.get("base_model_type") or base_model_type(native["model_type"])
    config = {**native, "model_type": family, "mobe": dense_section}
    if "base_architectures" in section:
        config["architectures"] = section["base_architectures"]
    return config


def native_section(reader: CheckpointReader) -> dict:
    """The mobe section of a native checkpoint, or a one-line refusal naming its config.json."""
    section = reader.config.get("mobe")
    if not isinstance(section, dict) or section.get("format") != "native":
        raise NativeFormatError(
            f"{reader.path} is not a native MoBE checkpoint (config.json has no mobe section with format 'native')"
        )
    missing = [key for key in ("layers", "matrices") if key not in section]
    if missing:
        raise NativeFormatError(f"{reader.path / 'config.json'}: the mobe section lacks {missing}")
    return section


def field_scheme(quantization: Mapping[str, Any], field: str) -> tuple[int, int, bool]:
    """(bits, group size, groups down the columns) of one quantised factor field of a native checkpoint: the
    scheme's bits unless `field_bits` names the field's own, and `column_groups` lists the fields stored transposed."""
    bits = quantization.get("field_bits", {}).get(field, quantization["bits"])
    return bits, quantization["group_size"], field in quantization.get("column_groups", ())


def read_native_factors(reader: CheckpointReader, layout: MoeLayout, layer: int, matrix: str) -> ExpertFactors:
    """Load one layer's factors of one matrix type from a native checkpoint (any method, quantised or not)."""
    section = native_section(reader)
    factors_cls = get_method(section.get("method", "mobe")).factors_cls
    names = factor_tensor_names(layout, layer, matrix, factors_cls.tensor_fields)
    quantization = section.get("quantization") or {}
    quantized = {f for f in names if f in quantization.get("fields", ())}
    stored = [n for f, n in names.items() if f not in quantized]
    stored += [f"{names[f]}.{part}" for f in quantized for part in QUANTIZED_PARTS]
    try:
        tensors = reader.get_many(stored)
    except (SafetensorError, OSError) as exc:
        shard = reader.path / reader.weight_map.get(stored[0], "?")
        raise NativeFormatError(f"{shard}: cannot read the layer {layer} {matrix} factors ({exc})") from None
    if quantized:  # stored as integers (`mobe quantize`): read back as the float factors they stand for
        from ..quantize import groupwise  # here, not above: the quantiser's package imports this one

        shapes = section["factor_shapes"][matrix]
        for f in quantized:
            q, scales = (tensors.pop(f"{names[f]}.{part}") for part in QUANTIZED_PARTS)
            tensors[names[f]] = groupwise.dequantize_stored(q, scales, shapes[f], *field_scheme(quantization, f))
    declared = section.get("factor_shapes", {}).get(matrix, {})
    for field, name in names.items():
        if field in declared and list(tensors[name].shape) != list(declared[field]):
            shard = reader.path / reader.weight_map[f"{name}.{QUANTIZED_PARTS[0]}" if field in quantized else name]
            raise NativeFormatError(
                f"{shard}: tensor {name} has shape {list(tensors[name].shape)}, config.json declares {declared[field]}"
            )
    try:
        return factors_cls.from_tensors(
            {field: tensors[name] for field, name in names.items()}, factor_meta(section, matrix)
        )
    except KeyError as exc:
        raise NativeFormatError(f"{reader.path / 'config.json'}: {exc.args[0]}") from None

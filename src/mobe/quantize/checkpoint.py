"""Quantise a whole checkpoint shard by shard: dense ones in compressed-tensors' format, native ones factor-wise.

Dense checkpoints (an original, a REAP-pruned one, a reconstructed one) become what llm-compressor writes for
its W4A16 / W8A16 schemes, through the compressed-tensors library itself (the format is the one it infers for a
weight-only integer scheme, `pack-quantized`): each quantised linear `X.weight` becomes `X.weight_packed` (int32,
eight 4-bit or four 8-bit values each), `X.weight_scale` and `X.weight_shape`, and config.json gains a
`quantization_config` with `quant_method: compressed-tensors`. transformers loads it (with compressed-tensors
installed; tested); it is the format vLLM and SGLang serve llm-compressor's checkpoints in (not tested here).

With a calibration text (`QuantizeConfig.calibration`), a dense checkpoint's routed experts are rounded by GPTQ
(`gptq.py`) instead of to nearest: the model is streamed one decoder layer at a time over the text
(`mobe.calibrate`), each layer's per-expert Grams of the routed inputs (gate, up) and of the intermediate
activations (down) are the Hessians, and the layer's experts are rounded and compressed before the next layer runs
(with `sequential`, the layer first runs again with its rounded experts, so the next layer is measured on the
quantised model's hidden states). Peak memory: about one layer, its statistics and the calibration tokens' hidden
states (two copies with `sequential`). The result is stored exactly like a round-to-nearest one (same scales, same
format).

Native checkpoints keep their factors, each floating factor tensor but the mixing coefficients stored as
`NAME.qweight` (int8, or 2-, 3- or 4-bit values packed into uint8) and `NAME.scales`; the `mobe` section of
config.json records the scheme under `quantization`, and the runtime dequantises the experts it runs, when it runs
them. MoBE factors below 8 bits are rounded as `factors.quantize_mobe` describes: bases at `shared_bits`, A in
orthonormal coordinates with its groups down the columns (`column_groups`; `factor_meta.orthonormal`); without
calibration A is rounded by GPTQ on the Hessians the weights stand in for (`factor_rounding` "weights", `proxy`:
down's from its layer's gate and up), or to nearest ("nearest").

One source shard is held in memory at a time; the result is written to a temporary folder, then renamed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..architectures import MoeLayout, moe_layout
from ..checkpoint import CheckpointReader
from ..config import FORMAT_VERSION, JOINT_METHODS, QuantizeConfig
from ..export import FACTOR_PREFIX, atomic_save_file, copy_side_files, factor_tensor_names, write_json_atomic
from ..export.native import field_scheme
from ..factorize import get_method
from . import groupwise
from .factors import StoredFactor, quantize_factor, quantize_mobe, weight_gram_hessian
from .gptq import gptq_quantize
from .proxy import down_hessians, expert_activation

logger = logging.getLogger(__name__)

QWEIGHT, SCALES = "qweight", "scales"
UNQUANTISED_FACTORS = ("coef",)  # softmax mixing weights: tiny, and they pass through a softmax-like mix


class QuantizeError(ValueError):
    """A checkpoint or setting the quantiser cannot take (named in one line)."""


@dataclass
class QuantizeReport:
    """What a quantisation wrote: the tensors it quantised and the bytes of the weights before and after."""

    source: str
    output: str
    config: dict
    kind: str  # "compressed-tensors" (a dense checkpoint) or "native" (MoBE factors)
    quantized: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    calibrated: dict | None = None  # GPTQ: tokens, experts rounded to nearest for want of tokens, seconds

    def table(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        how = "" if self.calibrated is None else f", GPTQ on {self.calibrated['tokens']} calibration tokens"
        precision = f"int{self.config['bits']}"
        if self.config.get("allocation"):
            precision = "/".join(f"int{b}" for b in sorted(set(self.config["allocation"].values()), reverse=True))
            precision = f"mixed {precision}"
        line = (
            f"quantised {self.quantized} tensors to {precision} (group {self.config['group_size']}, "
            f"{self.kind}{how}); weights {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({100 * ratio:.1f}%)"
        )
        if self.calibrated and self.calibrated["unrouted_experts"]:
            line += (
                f"\n{self.calibrated['unrouted_experts']} expert(s) saw no calibration token and were rounded to "
                "nearest (a longer text reaches more)"
            )
        return line


DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def stored_bytes(path: str | Path | CheckpointReader) -> int:
    """Bytes of a checkpoint's weights as stored (every safetensors tensor, whatever its dtype; headers excluded)."""
    reader = path if isinstance(path, CheckpointReader) else CheckpointReader(path)
    return sum(math.prod(reader.shape(n)) * DTYPE_BYTES.get(reader.dtype_name(n), 1) for n in reader.weight_map)


def quantize_checkpoint(
    model: str | Path,
    output: str | Path,
    config: QuantizeConfig | None = None,
    *,
    progress: bool = True,
    grams: Callable[[int, str], torch.Tensor | None] | None = None,
    targets: Callable[[int, str], torch.Tensor] | None = None,
    allocation: Mapping[tuple[int, str], int] | None = None,
) -> QuantizeReport:
    """Quantise the weights of `model` (any checkpoint mobe reads: original, pruned, dense or native) into `output`.

    Args:
        model: checkpoint folder or hub id.
        output: new folder; must not exist or be empty.
        config: bits, group size and (dense checkpoints) which linears (`QuantizeConfig()`: int4, 128, experts).
        progress: show a progress bar.
        grams: native MoBE factors below 8 bits: (layer, matrix) -> the second moments (E, k, k) of each expert's
            inputs (`mobe.calibrate` statistics), to round the expert factors by GPTQ on them; None: data-free.
        targets: with `grams`: (layer, matrix) -> the original experts' (E, p, d) stack of `matrix` (down as its
            transpose, `factorize.oriented`), against which A is re-solved in the grams' metric before rounding.
        allocation: dense checkpoints, mixed precision: (MoE layer, matrix) -> bits of that layer's routed experts'
            `matrix` ("gate", "up", "down"; 2, 3, 4 or 8 bits); units not named take `config.bits`. Each
            bit width becomes one compressed-tensors config group (`mobe.plan.mixed` chooses such allocations).

    Returns:
        The report (also saved in `output/mobe_quantize.json`).

    Example:
        >>> quantize_checkpoint("./Qwen3-30B-A3B", "./q3-w4", QuantizeConfig(bits=4))  # doctest: +SKIP
    """
    config = config or QuantizeConfig()
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise QuantizeError(f"output folder {output} already exists and is not empty; choose another path")
    reader = CheckpointReader(model)
    if reader.config.get("quantization_config"):
        method = reader.config["quantization_config"].get("quant_method", "?")
        raise QuantizeError(
            f"{reader.path}/config.json: the checkpoint is already quantised ({method}); give its source"
        )
    refuse_quantized(reader, "quantise")
    section = reader.config.get("mobe") or {}
    native = section.get("format") == "native"
    if native and config.calibration is not None:
        raise QuantizeError(
            f"{reader.path} holds MoBE factors: --calibration (GPTQ) quantises dense checkpoints; native factors are "
            "rounded to nearest, so leave --calibration out"
        )
    if native and grams is None and config.factor_rounding == "sampled" and config.bits < 8:
        raise QuantizeError(
            f"{reader.path} holds MoBE factors: --factor-rounding sampled rounds them on text the original model "
            "samples, which only a compression has (mobe compress --quantize-factor-rounding sampled); here use "
            "weights or nearest"
        )
    if native and allocation:
        raise QuantizeError(f"{reader.path} holds MoBE factors: a per-matrix bit allocation applies to dense experts")
    plan = _native_plan(reader) if native else _dense_plan(reader, config)
    bits_of = _bits_of(reader, config, allocation) if allocation else {}
    rounder = _NativeRounder(reader, config, grams, targets) if native else None
    if config.calibration is not None and config.scope != "experts":
        raise QuantizeError(
            "--calibration rounds the routed experts by GPTQ on their routed inputs (scope experts); the other "
            "linears have no Hessians here: use --scope experts"
        )
    if config.calibration is not None:  # refused before any work: a missing text, no tokenizer, a fused layout
        from ..calibrate.collect import check_streamable, read_calibration_text, require_tokenizer

        read_calibration_text(config.calibration)
        require_tokenizer(reader.path, config.calibration)
        check_streamable(moe_layout(reader.config))
    report = QuantizeReport(
        str(model), str(output), config.to_dict(), "native" if native else "compressed-tensors", len(plan)
    )
    if allocation:
        report.config["allocation"] = {
            f"{layer}.{matrix}": bits for (layer, matrix), bits in sorted(allocation.items())
        }
    target = output.with_name(f".{output.name}.mobe-quantize-tmp")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    gptq = None
    if config.calibration is not None:
        start = time.perf_counter()
        gptq = _gptq_experts(reader, config, target / ".gptq", progress, allocation or {})
        report.calibrated = {**gptq.summary, "seconds": time.perf_counter() - start}
    precision = "mixed" if len(set(bits_of.values()) | {config.bits}) > 1 else f"int{config.bits}"
    metadata = {"format": "pt", "mobe_version": str(FORMAT_VERSION), "mobe_quantize": precision}
    weight_map: dict[str, str] = {}
    by_shard = reader.tensors_by_shard()
    for shard, names in tqdm(by_shard.items(), desc=f"Quantising ({precision})", disable=not progress):
        tensors = reader.get_many(names)
        out: dict[str, torch.Tensor] = {}
        for name in names:
            tensor = tensors.pop(name)
            report.bytes_before += tensor.numel() * tensor.element_size()
            if gptq is not None and name in gptq:
                out.update(gptq.compressed(name))
            elif name in plan:
                bits = bits_of.get(name, config.bits)
                own = config if bits == config.bits else dataclasses.replace(config, bits=bits)
                out.update(rounder.stored(name, tensor) if rounder else _quantize_ct(name, tensor, own))
            else:
                out[name] = tensor
        atomic_save_file(out, target / shard, metadata)
        report.bytes_after += sum(t.numel() * t.element_size() for t in out.values())
        weight_map.update(dict.fromkeys(out, shard))
        del out
    write_json_atomic(
        {"metadata": {"total_size": report.bytes_after}, "weight_map": dict(sorted(weight_map.items()))},
        target / "model.safetensors.index.json",
    )
    copy_side_files(reader.path, target)
    new_config = dict(reader.config)
    scheme = {"bits": config.bits, "group_size": config.group_size, "symmetric": True}
    if native:
        new_config["mobe"] = rounder.section({**scheme, "format": "mobe-groupwise", "fields": plan_fields(plan)})
    else:
        new_config["quantization_config"] = _ct_config(reader, plan, config, allocation or {})
        if section or allocation:
            quantization = {**scheme, "format": _ct_format(config)}
            if allocation:  # transformers alone reads these experts wrongly: mobe.load_model puts them right
                quantization["allocation"] = report.config["allocation"]
            new_config["mobe"] = {**section, "quantization": quantization}
    write_json_atomic(new_config, target / "config.json")
    write_json_atomic(report.__dict__, target / "mobe_quantize.json")
    if gptq is not None:
        shutil.rmtree(target / ".gptq")
    if output.exists():
        output.rmdir()
    target.rename(output)
    return report


def refuse_quantized(reader: CheckpointReader, what: str) -> None:
    """One line for a checkpoint written by `mobe quantize` (compressed-tensors, or integer factors): it holds
    integers where a compression reads floating weights."""
    qc = reader.config.get("quantization_config") or {}
    section = reader.config.get("mobe") or {}
    if qc.get("quant_method") == "compressed-tensors" or section.get("quantization"):
        how = "compressed-tensors" if qc else f"integer factors {section['quantization'].get('fields')}"
        raise QuantizeError(f"{reader.path} holds quantised weights ({how}); {what} from its unquantised source")


def plan_fields(plan: set[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1].removeprefix(FACTOR_PREFIX) for name in plan})


# --- native factors --------------------------------------------------------------------------------------------------
def _native_plan(reader: CheckpointReader) -> set[str]:
    """Every floating factor tensor of a native checkpoint but the mixing coefficients."""
    skip = {FACTOR_PREFIX + f for f in UNQUANTISED_FACTORS}
    return {
        name
        for name in reader.weight_map
        if name.rsplit(".", 1)[-1].startswith(FACTOR_PREFIX)
        and name.rsplit(".", 1)[-1] not in skip
        and reader.dtype_name(name) in ("F32", "BF16", "F16")
    }


class _NativeRounder:
    """The stored tensors of a native checkpoint's factors, one (layer, matrix) group at a time: MoBE factors below
    8 bits by `quantize_mobe` (which needs A, bases and coef together, wherever they are stored), every other
    factor tensor round-to-nearest on its own."""

    def __init__(
        self,
        reader: CheckpointReader,
        config: QuantizeConfig,
        grams: Callable[[int, str], torch.Tensor | None] | None = None,
        targets: Callable[[int, str], torch.Tensor] | None = None,
    ):
        self.reader, self.config, self.grams, self.targets = reader, config, grams, targets
        self.source = reader.config["mobe"]
        self.method = self.source.get("method", "mobe")
        self.joint = self.method in JOINT_METHODS and config.bits < 8
        self.group_of: dict[str, tuple[int, str]] = {}
        if self.joint:
            layout = moe_layout(reader.config)
            fields = get_method(self.method).factors_cls.tensor_fields
            for layer in self.source["layers"]:
                for matrix in self.source["matrices"]:
                    for name in factor_tensor_names(layout, layer, matrix, fields).values():
                        self.group_of[name] = (layer, matrix)
            self.names = {key: factor_tensor_names(layout, *key, fields) for key in set(self.group_of.values())}
        self._done: dict[tuple[int, str], dict[str, StoredFactor]] = {}

    def stored(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name not in self.group_of:
            return _stored(name, quantize_factor(tensor, self.config.bits, self.config.group_size))
        key = self.group_of[name]
        if key not in self._done:
            self._done[key] = self._round_group(key)
        field = name.rsplit(".", 1)[-1].removeprefix(FACTOR_PREFIX)
        factor = self._done[key].pop(field)
        if not self._done[key]:
            del self._done[key]
        return _stored(name, factor)

    def _round_group(self, key: tuple[int, str]) -> dict[str, StoredFactor]:
        names = self.names[key]
        tensors = self.reader.get_many(list(names.values()))
        meta = {**self.source, **self.source.get("factor_meta", {}).get(key[1], {})}
        factors_cls = get_method(self.method).factors_cls
        factors = factors_cls.from_tensors({f: tensors[n] for f, n in names.items()}, meta)
        shared_bits = self.config.shared_bits if self.config.shared_bits < 16 else None
        grams = None if self.grams is None else self.grams(*key)
        inputs_on_rows = (key[1] == "down") != (factors.transposed == "1")  # in the fitted orientation
        observer = self.config.observer
        if grams is None and self.config.factor_rounding == "weights":
            grams, observer = self._weight_hessians(key, factors, inputs_on_rows), "mse"
        elif grams is not None and self.config.factor_rounding == "sampled":
            observer = "mse"
        targets = None
        if grams is not None and self.targets is not None:
            targets = self.targets(*key)
            targets = targets.transpose(1, 2) if factors.transposed == "1" else targets
        _, stored = quantize_mobe(
            factors,
            self.config.bits,
            self.config.group_size,
            shared_bits=shared_bits,
            grams=grams,
            inputs_on_rows=inputs_on_rows,
            observer=observer,
            targets=targets,
        )
        del targets
        dtype = factors.A.dtype
        for field in factors_cls.tensor_fields:  # unquantised factors pass through
            if field not in stored:
                stored[field] = tensors[names[field]].to(dtype)
        return stored

    def _weight_hessians(self, key: tuple[int, str], factors, inputs_on_rows: bool) -> torch.Tensor | None:
        """The data-free Hessians of one group (`proxy`): gate's and up's input-side Gram; for down, the Grams of
        the intermediate activations its layer's own gate and up give Gaussian inputs."""
        layer, matrix = key
        if matrix != "down":
            return weight_gram_hessian(factors, inputs_on_rows)
        gate, up = self._products(layer, "gate"), self._products(layer, "up")
        return down_hessians(gate, up, factors.num_experts, expert_activation(self.reader.config))

    def _products(self, layer: int, matrix: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The experts' (n, p, d) float32 products of one matrix for given expert indices: from its factors
        where it is factorised, else from the stored dense stack."""
        if (layer, matrix) in self.names:
            names = self.names[(layer, matrix)]
            meta = {**self.source, **self.source.get("factor_meta", {}).get(matrix, {})}
            tensors = self.reader.get_many(list(names.values()))
            factors = get_method(self.method).factors_cls.from_tensors({f: tensors[n] for f, n in names.items()}, meta)
            return factors.reconstruct
        stack = moe_layout(self.reader.config).read_experts(self.reader, layer, matrix).float()
        return lambda experts: stack[experts]

    def section(self, quantization: dict) -> dict:
        """The output's mobe section: the scheme, per-field bits and layouts, and orthonormal MoBE coordinates."""
        section = dict(self.source)
        if self.joint:
            shared, shared_fields = self.config.shared_bits, get_method(self.method).factors_cls.shared_fields
            fields = [f for f in quantization["fields"] if f not in shared_fields or shared < 16]
            quantization = {**quantization, "fields": fields, "column_groups": ["A"]}
            if shared < 16:
                quantization["field_bits"] = {f: shared for f in shared_fields if f in fields}
            section["factor_meta"] = {
                m: {**meta, "orthonormal": "1"} for m, meta in self.source.get("factor_meta", {}).items()
            }
        section["quantization"] = quantization
        return section


def _stored(name: str, factor: StoredFactor | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(factor, torch.Tensor):
        return {name: factor}
    return {f"{name}.{QWEIGHT}": factor.packed(), f"{name}.{SCALES}": factor.scales}


def dequantize_native(
    qweight: torch.Tensor, scales: torch.Tensor, shape: list[int], quantization: dict, field: str = ""
) -> torch.Tensor:
    """A native factor tensor of logical `shape` from its stored `qweight` and `scales` (dtype: the scales')."""
    return groupwise.dequantize_stored(qweight, scales, shape, *field_scheme(quantization, field))


# --- dense checkpoints: compressed-tensors ---------------------------------------------------------------------------
def _require_compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise QuantizeError(
            "quantising a dense checkpoint writes compressed-tensors' format: pip install 'mobe[quant]'"
        ) from None


def check_dense_quantizable(layout: MoeLayout, config: QuantizeConfig, path: Path) -> None:
    """Refuse, before any work, a dense quantisation that cannot be written: no compressed-tensors, fused experts,
    or a group size that does not divide the experts' input sizes."""
    _require_compressed_tensors()
    if layout.arch.fused is not None:
        raise QuantizeError(
            f"{path}: {layout.arch.model_type} stores its experts fused (one tensor per layer), which "
            "compressed-tensors does not quantise as linears; quantise a native output instead"
        )
    for size in (layout.hidden_size, layout.intermediate_size):
        if size % config.group_size:
            raise QuantizeError(
                f"--quantize-group-size {config.group_size} does not divide the experts' input size {size} "
                "(compressed-tensors' groups must tile each row); choose a divisor"
            )


def _dense_plan(reader: CheckpointReader, config: QuantizeConfig) -> set[str]:
    """The `.weight` tensors to quantise: the routed experts' linears (scope experts), or every linear layer but
    lm_head, the routers and the shared-expert gates (scope linears)."""
    layout = moe_layout(reader.config)
    check_dense_quantizable(layout, config, reader.path)
    floats = ("F32", "BF16", "F16")
    bad = [n for n in reader.weight_map if n.endswith(".weight") and reader.dtype_name(n) not in floats]
    if bad:
        raise QuantizeError(f"{reader.path}: tensor {bad[0]} is {reader.dtype_name(bad[0])}; dequantise it first")
    experts = {
        layout.arch.tensor_name(layer, e, m)
        for layer in layout.moe_layers
        for e in range(layout.num_experts)
        for m in ("gate", "up", "down")
    }
    missing = sorted(experts - set(reader.weight_map))
    if missing:
        raise QuantizeError(f"{reader.path}: expert tensor {missing[0]} is not in the checkpoint")
    plan = set(experts)
    if config.scope == "linears":
        plan |= {name + ".weight" for name in _linear_modules(reader) if name + ".weight" in reader.weight_map}
        plan -= {name + ".weight" for name in _ignored_linears(reader)}
    bad = sorted(n for n in plan if reader.shape(n)[-1] % config.group_size)
    if bad:
        raise QuantizeError(
            f"--quantize-group-size {config.group_size} does not divide the input size of {bad[0]} "
            f"{list(reader.shape(bad[0]))} (compressed-tensors' groups must tile each row); choose a divisor"
        )
    return plan


def _linear_modules(reader: CheckpointReader) -> list[str]:
    """Names of the model's nn.Linear modules (the model built on the meta device)."""
    from ..architectures import get_arch
    from ..architectures.derive import model_on_meta

    arch = get_arch(reader.config["model_type"])
    model = model_on_meta(reader.config, reader.config["model_type"], arch.model_class)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _ignored_linears(reader: CheckpointReader) -> list[str]:
    """Linears that stay in 16 bits, as llm-compressor's W4A16 recipe leaves them: lm_head and the routers (plus the
    shared-expert gates, one output each)."""
    layout = moe_layout(reader.config)
    routers = {layout.arch.router_prefix(layer) for layer in layout.moe_layers}
    return [
        name
        for name in _linear_modules(reader)
        if name == "lm_head" or name in routers or name.endswith("shared_expert_gate")
    ]


def _scheme(config: QuantizeConfig, targets: list[str], fmt: str | None = None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=config.bits, type="int", symmetric=True, strategy="group", group_size=config.group_size
    )
    return QuantizationScheme(targets=targets, weights=args, format=fmt)


def _ct_format(config: QuantizeConfig) -> str:
    """The format compressed-tensors (and so llm-compressor) picks for this scheme on a linear: pack-quantized."""
    from compressed_tensors.compressors.format import infer_module_format

    return infer_module_format(torch.nn.Linear, _scheme(config, ["Linear"])).value


def _quantize_ct(name: str, tensor: torch.Tensor, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """One linear's weight, compressed by compressed-tensors' own compressor (scales by its min-max rule)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    fmt = _ct_format(config)
    scheme = _scheme(config, ["Linear"], fmt)
    scale, _ = compute_dynamic_scales_and_zp(tensor, scheme.weights, module=None)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    out = compressor.compress({"weight": tensor, "weight_scale": scale}, scheme)
    prefix = name.removesuffix(".weight")
    return {f"{prefix}.{key}": value for key, value in out.items()}


def _compress_ct(name: str, q: torch.Tensor, scales: torch.Tensor, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """Integer values and scales decided elsewhere (GPTQ), written by compressed-tensors' own compressor: it
    re-rounds q * s against s, which gives q back exactly (q * s is exact in float32)."""
    from compressed_tensors.compressors import BaseCompressor

    fmt = _ct_format(config)
    scheme = _scheme(config, ["Linear"], fmt)
    weight = groupwise.dequantize(q, scales.float(), config.group_size)
    out = BaseCompressor.get_value_from_registry(fmt).compress({"weight": weight, "weight_scale": scales}, scheme)
    prefix = name.removesuffix(".weight")
    return {f"{prefix}.{key}": value for key, value in out.items()}


def read_ct_weight(reader: CheckpointReader, name: str, bits: int, group_size: int) -> torch.Tensor:
    """A dense weight `name` written here at `bits` (`X.weight_packed`, `X.weight_scale`, `X.weight_shape`), read
    back by compressed-tensors' own decompressor (dtype: the scales')."""
    from compressed_tensors.compressors import BaseCompressor

    config = QuantizeConfig(bits=bits, group_size=group_size)
    fmt = _ct_format(config)
    prefix = name.removesuffix(".weight")
    keys = ("weight_packed", "weight_scale", "weight_shape")
    tensors = reader.get_many([f"{prefix}.{k}" for k in keys])
    state = {k: tensors[f"{prefix}.{k}"] for k in keys}
    return BaseCompressor.get_value_from_registry(fmt).decompress(state, _scheme(config, ["Linear"], fmt))["weight"]


def load_mixed_experts(model: torch.nn.Module, reader: CheckpointReader) -> None:
    """Put each routed expert of a mixed-precision checkpoint (`allocation` in its mobe section) into `model` as
    its own bit width reads back. transformers (5.x) decompresses every expert with one config group's scheme,
    which reads the other widths' integers wrongly; `mobe.load_model` calls this after loading."""
    quantization = reader.config["mobe"]["quantization"]
    layout = moe_layout(reader.config)
    p = layout.intermediate_size
    with torch.no_grad():
        for unit, bits in quantization["allocation"].items():
            layer, matrix = int(unit.split(".")[0]), unit.split(".")[1]
            experts = model.get_submodule(layout.arch.experts_module.format(layer=layer))
            for e in range(layout.num_experts):
                weight = read_ct_weight(
                    reader, layout.arch.tensor_name(layer, e, matrix), bits, quantization["group_size"]
                )
                rows = slice(None) if matrix == "down" else slice(0, p) if matrix == "gate" else slice(p, None)
                (experts.down_proj[e] if matrix == "down" else experts.gate_up_proj[e, rows]).copy_(weight)


GPTQ_BATCH = 16  # experts rounded together (one batched GPTQ call): Hessians of GPTQ_BATCH * cols^2 float64


class _GptqExperts:
    """The routed experts' compressed tensors, rounded by GPTQ layer by layer and kept in one file per layer under
    `folder` until the shard loop copies them into the output."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, Path] = {}  # checkpoint tensor name -> its layer's file
        self.summary = {"tokens": 0, "layers": 0, "unrouted_experts": 0}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def add_layer(self, layer: int, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        path = self.folder / f"layer{layer:05d}.safetensors"
        atomic_save_file({k: v.contiguous() for out in tensors.values() for k, v in out.items()}, path)
        self.where.update(dict.fromkeys(tensors, path))

    def compressed(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        prefix = name.removesuffix(".weight") + "."
        with safe_open(self.where[name], framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix) and "." not in k[len(prefix) :]}


def gptq_stack(
    stack: torch.Tensor, factor, counts: torch.Tensor, config: QuantizeConfig, bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE layer's experts of one matrix, `stack` (E, rows, cols), rounded by GPTQ on the Grams `factor`
    (`LayerStats.factor(matrix)`) at `bits` (default `config.bits`), GPTQ_BATCH experts at a time. Experts no
    calibration token reached (`counts` 0) are rounded to nearest (identity Hessian).

    Returns the integers (E, rows, cols), their scales and the rounded stack as read back (stack's dtype)."""
    bits = bits or config.bits
    E = stack.shape[0]
    q_all = torch.empty(stack.shape, dtype=torch.int8)
    scales_all, rounded = None, torch.empty_like(stack)
    for first in range(0, E, GPTQ_BATCH):
        experts = list(range(first, min(first + GPTQ_BATCH, E)))
        hessian = factor.gram(experts)
        hessian[counts[experts] == 0] = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
        q, scales = gptq_quantize(
            stack[experts],
            hessian,
            bits,
            config.group_size,
            damping=config.damping,
            act_order=config.act_order,
            dtype=stack.dtype,
            observer=config.observer,
        )
        if scales_all is None:
            scales_all = torch.empty(E, *scales.shape[1:], dtype=scales.dtype)
        q_all[first : first + len(experts)] = q
        scales_all[first : first + len(experts)] = scales
        rounded[first : first + len(experts)] = groupwise.dequantize(q, scales, config.group_size, stack.dtype)
    return q_all, scales_all, rounded


def _gptq_experts(
    reader: CheckpointReader,
    config: QuantizeConfig,
    folder: Path,
    progress: bool,
    allocation: Mapping[tuple[int, str], int],
) -> _GptqExperts:
    """Stream the model over the calibration text one layer at a time and round each MoE layer's routed experts by
    GPTQ against the Grams of their routed inputs (gate, up) and intermediate activations (down). With
    `config.sequential` each layer then runs again with its rounded experts, so the next layer's Grams are of the
    inputs the quantised model gives it; otherwise every layer is measured on the original model's hidden states."""
    from ..calibrate import calibration_ids, collect_sequentially, collect_statistics

    layout = moe_layout(reader.config)
    sequences = calibration_ids(reader.path, config.calibration, config.calibration_tokens, config.calibration_seq_len)
    folder.mkdir(parents=True)
    result = _GptqExperts(folder)
    result.summary["tokens"] = int(sum(s.numel() for s in sequences))
    bar = tqdm(desc="GPTQ", total=len(layout.moe_layers), disable=not progress)

    def round_layer(layer: int, stats) -> dict[str, torch.Tensor]:
        counts = stats.counts
        result.summary["unrouted_experts"] += int((counts == 0).sum())
        out: dict[str, dict[str, torch.Tensor]] = {}
        rounded: dict[str, torch.Tensor] = {}
        for matrix in ("gate", "up", "down"):
            stack = layout.read_experts(reader, layer, matrix)  # (E, rows, cols)
            bits = allocation.get((layer, matrix), config.bits)
            own = config if bits == config.bits else dataclasses.replace(config, bits=bits)
            q, scales, rounded[matrix] = gptq_stack(stack, stats.factor(matrix), counts, own)
            for e in range(layout.num_experts):
                name = layout.arch.tensor_name(layer, e, matrix)
                out[name] = _compress_ct(name, q[e], scales[e], own)
        result.add_layer(layer, out)
        result.summary["layers"] += 1
        bar.update()
        return rounded

    if config.sequential:
        collect_sequentially(reader, layout, sequences, round_layer, progress=progress)
    else:
        for layer, stats in collect_statistics(reader, layout, sequences, layout.moe_layers, progress=progress):
            round_layer(layer, stats)
    bar.close()
    return result


def _ct_config(
    reader: CheckpointReader, plan: set[str], config: QuantizeConfig, allocation: Mapping[tuple[int, str], int]
) -> dict:
    """config.json's `quantization_config`, as llm-compressor writes it (compressed-tensors' own model). With an
    allocation, one config group per bit width, each naming its (layer, matrix) units by regex."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationConfig

    layout = moe_layout(reader.config)

    def experts_regex(layers: str, matrices: list[str]) -> str:
        experts = re.escape(layout.arch.experts.replace("{layer}", "@")).replace("@", layers)
        names = "|".join(re.escape(layout.arch.matrices[m]) for m in matrices)
        return f"re:{experts}\\.\\d+\\.({names})$"

    fmt = _ct_format(config)
    if allocation:
        by_bits: dict[int, list[str]] = {}
        for layer in layout.moe_layers:
            for matrix in ("gate", "up", "down"):
                bits = allocation.get((layer, matrix), config.bits)
                by_bits.setdefault(bits, []).append(experts_regex(str(layer), [matrix]))
        groups = {
            f"group_{i}": _scheme(dataclasses.replace(config, bits=bits), targets, fmt)
            for i, (bits, targets) in enumerate(sorted(by_bits.items(), reverse=True))
        }
        ignore = ["lm_head"]
    else:
        targets = [experts_regex(r"\d+", ["gate", "up", "down"])]
        ignore = ["lm_head"]
        if config.scope == "linears":
            targets.append("Linear")
            quantised = {name.removesuffix(".weight") for name in plan}
            ignore = sorted({n for n in _linear_modules(reader) if n not in quantised})
        groups = {"group_0": _scheme(config, targets, fmt)}
    qc = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="compressed", ignore=ignore)
    return {**qc.model_dump(), "version": ct_version}


def _bits_of(
    reader: CheckpointReader, config: QuantizeConfig, allocation: Mapping[tuple[int, str], int]
) -> dict[str, int]:
    """Each routed expert tensor's bits under `allocation`, checked: MoE layers, known matrices, bits we write,
    scope experts."""
    layout = moe_layout(reader.config)
    if config.scope != "experts":
        raise QuantizeError("a per-matrix bit allocation covers the routed experts: use scope experts")
    for (layer, matrix), bits in allocation.items():
        if layer not in layout.moe_layers or matrix not in ("gate", "up", "down"):
            raise QuantizeError(f"allocation names ({layer}, {matrix!r}): not a MoE layer's gate, up or down")
        if bits not in groupwise.BITS:  # a 16-bit unit beside packed ones does not load in transformers
            raise QuantizeError(f"allocation gives ({layer}, {matrix!r}) {bits} bits; choose from {groupwise.BITS}")
    return {
        layout.arch.tensor_name(layer, e, matrix): allocation.get((layer, matrix), config.bits)
        for layer in layout.moe_layers
        for matrix in ("gate", "up", "down")
        for e in range(layout.num_experts)
    }

"""The native format: what `write_output` writes, `read_native_factors` reads back, field by field, for every
method and for quantised factors; a damaged file is refused in one line that names it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mobe import MobeConfig
from mobe.architectures import moe_layout
from mobe.checkpoint import CheckpointError, CheckpointReader
from mobe.config import QuantizeConfig
from mobe.export import (
    NativeFormatError,
    dense_config,
    factor_tensor_names,
    native_section,
    read_native_factors,
    write_output,
)
from mobe.factorize import get_method, method_names, oriented
from mobe.pipeline import resolve_settings
from mobe.quantize import fake_quantize, quantize_checkpoint
from mobe.quantize.factors import quantize_mobe

METHODS = method_names()
JOBS_MATRICES = ("gate", "up", "down")


def _write_native(source, target, method: str) -> dict:
    """Fit every matrix type of the source's first MoE layer with `method` and write a native checkpoint; returns
    the factors written, by (layer, matrix)."""
    reader = CheckpointReader(source)
    layout = moe_layout(reader.config)
    config = resolve_settings(layout, MobeConfig(method=method, rank=4, steps=3, eval_every=1))
    fit = get_method(method).fit
    layer = layout.moe_layers[0]
    jobs = [(layer, m) for m in JOBS_MATRICES]
    written = {
        (layer, m): fit(oriented(m, layout.read_experts(reader, layer, m).float()), config, "cpu", None, None)[0]
        for _, m in jobs
    }
    section = {
        "version": 1,
        "format": "native",
        "method": method,
        "num_bases": config.num_bases,
        "rank": config.rank,
        "activation": config.activation,
        "groups": config.groups,
        "layers": [layer],
        "matrices": list(JOBS_MATRICES),
    }
    target.mkdir()
    write_output(reader, layout, jobs, lambda lay, m: written[lay, m], target, section, progress=False)
    return written


@pytest.fixture(scope="module")
def natives(tiny_checkpoints, tmp_path_factory) -> dict:
    """method -> (native folder, the factors written)."""
    root = tmp_path_factory.mktemp("native")
    source = tiny_checkpoints["qwen3_moe"]
    return {method: (root / method, _write_native(source, root / method, method)) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_every_factor_field_round_trips(natives, method):
    folder, written = natives[method]
    reader = CheckpointReader(folder)
    layout = moe_layout(reader.config)
    section = native_section(reader)
    assert reader.config["model_type"].startswith("mobe_") and section["base_model_type"] == "qwen3_moe"
    for (layer, matrix), factors in written.items():
        read = read_native_factors(reader, layout, layer, matrix)
        assert type(read) is type(factors) and read.meta() == factors.meta()
        assert set(read.tensor_fields) == set(section["factor_shapes"][matrix])
        for field in factors.tensor_fields:
            assert torch.equal(getattr(read, field), getattr(factors, field)), field
            assert getattr(read, field).dtype == getattr(factors, field).dtype
        names = factor_tensor_names(layout, layer, matrix, factors.tensor_fields)
        assert set(names.values()) <= set(reader.weight_map)
        assert section["factor_meta"][matrix] == factors.meta()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["mobe", "slbf"])
def test_quantised_factors_read_back_as_their_dequantised_values(natives, method, bits, tmp_path):
    folder, written = natives[method]
    out = tmp_path / "q"
    nearest = QuantizeConfig(bits=bits, group_size=8, factor_rounding="nearest")  # the storage, not the rounding
    quantize_checkpoint(folder, out, nearest, progress=False)
    reader = CheckpointReader(out)
    layout = moe_layout(reader.config)
    fields = reader.config["mobe"]["quantization"]["fields"]
    assert fields and "coef" not in fields
    for (layer, matrix), factors in written.items():
        names = factor_tensor_names(layout, layer, matrix, factors.tensor_fields)
        read = read_native_factors(reader, layout, layer, matrix)
        # MoBE and SLBF below 8 bits: bases (U, V) at 8 bits, A in orthonormal coordinates (mobe.quantize.factors);
        # else each factor on its own
        expected = quantize_mobe(factors, bits, 8)[0] if bits < 8 else None
        for field in factors.tensor_fields:
            original = getattr(factors, field)
            if field in fields:
                assert {f"{names[field]}.qweight", f"{names[field]}.scales"} <= set(reader.weight_map)
                assert names[field] not in reader.weight_map
                want = fake_quantize(original, bits, 8) if expected is None else getattr(expected, field)
                torch.testing.assert_close(read.tensors()[field], want, rtol=0, atol=1e-6)
            else:
                assert torch.equal(getattr(read, field), original), field


def test_dense_config_drops_what_only_the_native_format_holds(natives):
    folder, _ = natives["mobe"]
    native = json.loads((folder / "config.json").read_text())
    dense = dense_config(native)
    assert dense["model_type"] == "qwen3_moe" and dense["architectures"] == native["mobe"]["base_architectures"]
    assert dense["mobe"]["format"] == "dense"
    assert not {"factor_shapes", "factor_meta", "factor_suffixes", "quantization"} & set(dense["mobe"])


def _copy(natives, tmp_path, method="mobe"):
    folder, written = natives[method]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (layer, matrix), factors = next(iter(written.items()))
    reader = CheckpointReader(copy)
    name = factor_tensor_names(moe_layout(reader.config), layer, matrix, factors.tensor_fields)["A"]
    return copy, copy / reader.weight_map[name], layer, matrix


def _refusal(folder, layer, matrix) -> str:
    reader = CheckpointReader(folder)
    with pytest.raises(CheckpointError) as info:
        read_native_factors(reader, moe_layout(reader.config), layer, matrix)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_truncated_factor_file_is_refused_naming_it(natives, tmp_path):
    folder, shard, layer, matrix = _copy(natives, tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert str(shard) in _refusal(folder, layer, matrix)


def test_a_corrupt_factor_file_is_refused_naming_it(natives, tmp_path):
    folder, shard, layer, matrix = _copy(natives, tmp_path)
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    assert str(shard) in _refusal(folder, layer, matrix)


def test_a_factor_of_another_shape_than_declared_is_refused_naming_the_file(natives, tmp_path):
    folder, shard, layer, matrix = _copy(natives, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["mobe"]["factor_shapes"][matrix]["A"][-1] += 1
    (folder / "config.json").write_text(json.dumps(config))
    message = _refusal(folder, layer, matrix)
    assert str(shard) in message and "declares" in message


def test_a_checkpoint_without_native_section_is_refused(natives, tmp_path):
    folder, _, _, _ = _copy(natives, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["mobe"]["format"] = "dense"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NativeFormatError, match="not a native MoBE checkpoint"):
        native_section(CheckpointReader(folder))

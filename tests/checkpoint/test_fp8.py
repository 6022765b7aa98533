"""Block-FP8 checkpoints (DeepSeek-V3 / Kimi-K2 layout): read dequantised, written back in FP8 with fresh scales."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobe import MobeConfig, compress, reconstruct
from mobe.checkpoint import CheckpointReader
from mobe.checkpoint.fp8 import FP8_MAX, SCALE_SUFFIX, dequantize_blockwise, quantize_blockwise

BLOCK = (16, 16)


def test_dequantize_multiplies_each_tile_by_its_scale():
    q = torch.ones(3, 3).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0]])
    assert torch.equal(dequantize_blockwise(q, scale, (2, 2)), expected)


def test_quantize_round_trip_is_within_e4m3_rounding():
    w = torch.randn(40, 50, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 50)
    q, scale = quantize_blockwise(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 4)
    back = dequantize_blockwise(q, scale, BLOCK)
    per_element_scale = scale.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :50]
    # e4m3 keeps 3 mantissa bits (relative half-step 2^-4); below 2^-6 it is subnormal (absolute half-step 2^-10).
    bound = w.abs() / 16 + per_element_scale * 2.0**-10
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    tile_max = (q.float().abs()).amax()
    assert tile_max == FP8_MAX  # the largest value of a tile lands on e4m3's largest


def _to_block_fp8(source: Path, target: Path) -> Path:
    """Quantise every 2-D projection weight of the decoder layers to block FP8, as DeepSeek-V3 ships them."""
    shutil.copytree(source, target)
    for shard in target.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if ".layers." in n and n.endswith("proj.weight") and tensors[n].ndim == 2]:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_blockwise(tensors[name], BLOCK)
        save_file(tensors, shard, metadata={"format": "pt"})
    index_path = target / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name, shard in list(index["weight_map"].items()):
        if ".layers." in name and name.endswith("proj.weight") and name + SCALE_SUFFIX in load_file(target / shard):
            index["weight_map"][name + SCALE_SUFFIX] = shard
    index_path.write_text(json.dumps(index))
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def fp8_model(tiny_checkpoints, tmp_path) -> Path:
    return _to_block_fp8(tiny_checkpoints["deepseek_v3"], tmp_path / "fp8")


def _all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


LOSSLESS = MobeConfig(num_bases=8, rank=16, steps=0, init_logit=30.0, activation="none", device="cpu")


def test_fp8_model_compresses_to_native_and_dense(fp8_model, tmp_path):
    source = _all(fp8_model)
    reader = CheckpointReader(fp8_model)
    expert = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert source[expert].dtype == torch.float8_e4m3fn

    compress(fp8_model, tmp_path / "native", LOSSLESS, progress=False)
    native = _all(tmp_path / "native")
    assert not [n for n in native if ".mlp.experts." in n and ("gate_proj.weight" in n or "up_proj.weight" in n)]
    factors = [n for n in native if ".mobe_" in n]
    assert factors and all(native[n].dtype == torch.bfloat16 for n in factors)
    for name, tensor in source.items():  # attention, down, dense layers: FP8 values and scales copied as they are
        if name in native:
            assert torch.equal(native[name].view(torch.uint8), tensor.view(torch.uint8)), name

    compress(fp8_model, tmp_path / "dense", LOSSLESS, reconstruct=True, progress=False)
    dense = _all(tmp_path / "dense")
    assert set(dense) == set(source), set(dense) ^ set(source)
    assert dense[expert].dtype == torch.float8_e4m3fn and dense[expert + SCALE_SUFFIX].dtype == torch.float32
    original = reader.get_many([expert], dequantize=True)[expert]
    rebuilt = CheckpointReader(tmp_path / "dense").get_many([expert], dequantize=True)[expert]
    # Lossless factors rebuild the dequantised expert (bf16 factors); FP8 rounding is then all that differs.
    assert (rebuilt - original).abs().max() <= original.abs().max() / 8

    reconstruct(tmp_path / "native", tmp_path / "rebuilt")
    again = _all(tmp_path / "rebuilt")
    assert again.keys() == dense.keys()
    assert all(torch.equal(again[n].view(torch.uint8), dense[n].view(torch.uint8)) for n in dense)

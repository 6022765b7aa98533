"""gpt-oss: biases and clamped SwiGLU kept exactly, bf16 and MXFP4 checkpoints (the published layout)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssForCausalLM, Mxfp4Config

from mobe import CheckpointReader, MobeConfig, compress, load_model, reconstruct
from mobe.architectures import moe_layout
from mobe.cli.main import main
from mobe.fixtures import build_tiny_moe, mxfp4_experts_on_disk, tiny_config
from mobe.runtime.experts import clamped_swiglu

LOSSLESS_ALL = MobeConfig(num_bases=8, activation="none", init_logit=60.0, steps=0, matrices=("gate", "up", "down"))
FAST = MobeConfig(num_bases=2, rank=8, steps=10, matrices=("gate", "up", "down"))
IDS = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
EXPERT_WEIGHTS = (".experts.gate_up_proj", ".experts.down_proj")
# Native (factors, in float32 here) against dense (A M rebuilt, then rounded to the source's bf16): that rounding only.
REBUILT_IN_BF16 = dict(atol=2e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("gpt_oss") / "bf16", "gpt_oss", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """The published layout: MXFP4 experts (sizes multiples of 32), everything else bf16, quantization_config."""
    path = build_tiny_moe(
        tmp_path_factory.mktemp("gpt_oss") / "mxfp4", "gpt_oss", moe_intermediate_size=32, dtype=torch.bfloat16
    )
    mxfp4_experts_on_disk(path)
    return path


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(IDS).logits


def _transformers_mxfp4(path):
    """The MXFP4 checkpoint as transformers loads it on a CPU: dequantised by its own conversion."""
    return GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True))


def test_clamped_swiglu_is_transformers_gate():
    """The runtime's gating on split projections equals transformers' on the interleaved ones, clamps included."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(tiny_config("gpt_oss"))
    gate_up = torch.randn(64, 32) * experts.limit * 2  # about half of the values beyond the limit
    assert (gate_up.abs() > experts.limit).float().mean() > 0.3
    ours = clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], alpha=experts.alpha, limit=experts.limit)
    assert torch.equal(ours, experts._apply_gate(gate_up))


def test_bf16_lossless_all_matrices_and_every_other_tensor_bit_for_bit(bf16, tmp_path):
    """Full rank, gate, up and down compressed: the dense output gives the source's logits; biases, attention sinks,
    router weight and bias and every other non-expert tensor are copied bit for bit; the native model in transformers
    equals the dense one."""
    compress(bf16, tmp_path / "native", LOSSLESS_ALL, progress=False)
    reconstruct(tmp_path / "native", tmp_path / "dense", progress=False)
    source, dense = CheckpointReader(bf16), CheckpointReader(tmp_path / "dense")
    assert set(dense.weight_map) == set(source.weight_map)
    others = [n for n in source.weight_map if not n.endswith(EXPERT_WEIGHTS)]
    for part in ("gate_up_proj_bias", "down_proj_bias", "self_attn.sinks", "mlp.router.weight", "mlp.router.bias"):
        assert any(n.endswith(part) for n in others), part
    for name in others:
        assert torch.equal(dense.get(name), source.get(name)), name
    for name in set(source.weight_map) - set(others):
        assert dense.get(name).dtype == torch.bfloat16
        torch.testing.assert_close(dense.get(name), source.get(name), atol=1e-2, rtol=1e-2)  # bf16 rounding only
    reference = _logits(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32))
    dense_logits = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32))
    torch.testing.assert_close(dense_logits, reference, atol=2e-3, rtol=1e-2)
    native_logits = _logits(load_model(tmp_path / "native", dtype=torch.float32))
    torch.testing.assert_close(native_logits, dense_logits, **REBUILT_IN_BF16)


def test_mxfp4_reads_as_transformers_dequantises(mxfp4):
    """Each blocks / scales pair reads as the tensor transformers' loader fills from it, and as FP4 codes decoded
    here by hand (low nibble first, times 2^(scale - 127)); the gate / up / down stacks are its interleaved parts."""
    reader = CheckpointReader(mxfp4)
    layout = moe_layout(reader.config)
    model = _transformers_mxfp4(mxfp4)
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    assert not any(n.endswith(EXPERT_WEIGHTS) for n in reader._stored)
    for layer in layout.moe_layers:
        module = model.get_submodule(layout.arch.experts_module.format(layer=layer))
        for proj in ("gate_up_proj", "down_proj"):
            name = f"{layout.arch.experts_prefix(layer)}.{proj}"
            ours = reader.get(name)
            assert ours.dtype == torch.bfloat16 and reader.shape(name) == tuple(ours.shape)
            assert torch.equal(ours, getattr(module, proj).data)
            blocks, scales = reader.get(f"{name}_blocks"), reader.get(f"{name}_scales")
            codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-3).long()  # (E, out, in)
            by_hand = fp4[codes] * torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
            assert torch.equal(ours.float(), by_hand.transpose(1, 2))
        gate_up = module.gate_up_proj.data.transpose(1, 2)  # (E, 2p, d), gate and up rows alternating
        assert torch.equal(layout.read_experts(reader, layer, "gate"), gate_up[:, 0::2])
        assert torch.equal(layout.read_experts(reader, layer, "up"), gate_up[:, 1::2])
        assert torch.equal(layout.read_experts(reader, layer, "down"), module.down_proj.data.transpose(1, 2))


def test_mxfp4_lossless_dense_output_in_bf16(mxfp4, tmp_path):
    """Compressed from MXFP4, the dense output holds the experts dequantised in bf16 (no blocks, no
    quantization_config), every other tensor bit for bit, and gives the logits of transformers' own load."""
    compress(mxfp4, tmp_path / "dense", LOSSLESS_ALL, reconstruct=True, progress=False)
    source, dense = CheckpointReader(mxfp4), CheckpointReader(tmp_path / "dense")
    assert "quantization_config" not in dense.config and not dense.mxfp4
    assert set(dense._stored) == set(source.weight_map)
    for name in source.weight_map:
        if name.endswith(EXPERT_WEIGHTS):
            assert dense.dtype_name(name) == "BF16"
            torch.testing.assert_close(dense.get(name), source.get(name), atol=1e-2, rtol=1e-2)
        else:
            assert torch.equal(dense.get(name), source.get(name)), name
    reference = _logits(_transformers_mxfp4(mxfp4))
    dense_logits = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32))
    torch.testing.assert_close(dense_logits, reference, atol=2e-3, rtol=1e-2)


def test_mxfp4_partly_compressed_native_equals_dense(mxfp4, tmp_path):
    """Only layer 1 compressed: the native checkpoint keeps layer 0's experts dequantised (bf16, under the bf16
    checkpoints' names), runs in transformers and equals its dense reconstruction."""
    config = MobeConfig(num_bases=2, rank=8, steps=10, layers=(1,), matrices=("gate", "up", "down"))
    compress(mxfp4, tmp_path / "native", config, progress=False)
    reconstruct(tmp_path / "native", tmp_path / "dense", progress=False)
    source, native = CheckpointReader(mxfp4), CheckpointReader(tmp_path / "native")
    assert "quantization_config" not in json.loads((tmp_path / "native" / "config.json").read_text())
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{proj}"
        assert torch.equal(native.get(name), source.get(name))
        assert f"model.layers.1.mlp.experts.{proj}" not in native.weight_map
    dense_logits = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32))
    torch.testing.assert_close(_logits(load_model(tmp_path / "native")), dense_logits, **REBUILT_IN_BF16)


def test_calibration_is_refused_in_one_line(bf16, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 20)
    argv = ["compress", str(bf16), "-o", str(tmp_path / "out"), "--bases", "2", "--calibration", str(text)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "mobe: error: --calibration cannot stream gpt_oss: its experts add biases and a clamped SwiGLU, which the "
        "calibration statistics do not model\n"
    )


def test_info_reads_mxfp4_as_its_dequantised_parameters(mxfp4, capsys):
    """`mobe info` counts an MXFP4 checkpoint's experts as the weights they dequantise to (not packed bytes)."""
    assert main(["info", str(mxfp4), "--bases", "2", "--rank", "8"]) == 0
    layout = moe_layout(CheckpointReader(mxfp4).config)
    experts = len(layout.moe_layers) * layout.expert_params_per_layer
    assert f"{experts:,} in routed experts" in capsys.readouterr().out

"""Weight quantisation: dense checkpoints in compressed-tensors' format load in transformers and equal a reference
model fake-quantised here in plain torch; native factors stored as integers run to the logits of the float factors
fake-quantised the same way, and take the bytes the scheme says."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from mobe import MobeConfig, compress, model_info
from mobe.architectures import moe_layout
from mobe.cli.main import main
from mobe.config import QuantizeConfig
from mobe.distill import DistillError, distill
from mobe.fixtures import build_tiny_moe, heldout_text, trained_fixture_path
from mobe.quantize import QuantizeError, groupwise, quantize_checkpoint, stored_bytes
from mobe.runtime import MobeExperts

# Dense checkpoints are written with compressed-tensors (the `quant` extra, in `dev`); native factors need nothing.
needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="mobe[quant] missing")

IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12, 14]])


def reference_fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric group-wise round trip written out independently: scale = max|w| / ((2^b - 1) / 2) per group of the
    last dimension (the last group may be short), values rounded and clipped to [-2^(b-1), 2^(b-1) - 1]."""
    out = torch.empty_like(w)
    for start in range(0, w.shape[-1], group_size):
        block = w[..., start : start + group_size].float()
        scale = (block.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)).to(w.dtype).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(block / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out[..., start : start + group_size] = (q * scale).to(w.dtype)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {arch: build_tiny_moe(root / arch, arch, initializer_range=0.2) for arch in ("qwen3_moe", "qwen2_moe")}


def logits(path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(IDS).logits


def fake_quantized_original(path, bits: int, group_size: int, scope: str) -> torch.Tensor:
    """Logits of the original model with the weights the scope names fake-quantised in place."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            half = experts.gate_up_proj.shape[1] // 2  # (E, 2p, d): gate rows, then up rows
            for e in range(experts.gate_up_proj.shape[0]):
                for rows in (slice(0, half), slice(half, None)):
                    experts.gate_up_proj[e, rows] = reference_fake_quantize(
                        experts.gate_up_proj[e, rows], bits, group_size
                    )
                experts.down_proj[e] = reference_fake_quantize(experts.down_proj[e], bits, group_size)
            if scope == "linears":
                linears = [
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                    layer.self_attn.o_proj,
                ]
                shared = getattr(layer.mlp, "shared_expert", None)
                if shared is not None:
                    linears += [shared.gate_proj, shared.up_proj, shared.down_proj]
                for linear in linears:
                    linear.weight.copy_(reference_fake_quantize(linear.weight, bits, group_size))
        return model(IDS).logits


@needs_ct
def test_groupwise_agrees_with_compressed_tensors_and_packs_losslessly():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    w = torch.randn(6, 64) * torch.logspace(-2, 1, 64)
    for bits in (2, 3, 4, 8):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=16)
        scale, zp = compute_dynamic_scales_and_zp(w, args, module=None)
        assert torch.equal(groupwise.fake_quantize(w, bits, 16), fake_quantize(w, scale, zp, args))
        assert torch.equal(groupwise.fake_quantize(w, bits, 16), reference_fake_quantize(w, bits, 16))
        q, _ = groupwise.quantize(w[:, :45], bits, 16)  # odd length, short last group
        assert int(q.min()) == -(2 ** (bits - 1)) or int(q.max()) == 2 ** (bits - 1) - 1
        packed = groupwise.pack(q, bits)
        assert packed.shape[-1] == (45 if bits == 8 else math.ceil(45 * bits / 8))
        assert torch.equal(groupwise.unpack(packed, bits, 45), q)


@needs_ct
@pytest.mark.parametrize(
    ("arch", "scope", "bits"),
    [
        ("qwen3_moe", "experts", 4),
        ("qwen2_moe", "linears", 4),
        ("qwen3_moe", "experts", 3),
        ("qwen2_moe", "experts", 2),
    ],
)
def test_dense_loads_in_transformers_and_equals_the_fake_quantised_reference(tiny, arch, scope, bits, tmp_path):
    out = tmp_path / f"w{bits}"
    quantize_checkpoint(tiny[arch], out, QuantizeConfig(bits=bits, group_size=16, scope=scope), progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "lm_head" in config["ignore"]
    with open(out / "model.safetensors.index.json") as f:
        names = json.load(f)["weight_map"]
    assert "model.layers.0.mlp.experts.0.down_proj.weight_packed" in names
    assert ("model.layers.0.self_attn.q_proj.weight_packed" in names) == (scope == "linears")
    assert "model.layers.0.mlp.gate.weight" in names and "lm_head.weight" in names  # routers, lm_head stay 16-bit
    with open(out / "model.safetensors.index.json") as f:  # packed densely: bits / 32 int32 words per weight
        shard = json.load(f)["weight_map"]["model.layers.0.mlp.experts.0.down_proj.weight_packed"]
    from safetensors import safe_open

    with safe_open(out / shard, "pt") as f:
        packed = f.get_slice("model.layers.0.mlp.experts.0.down_proj.weight_packed").get_shape()
    cols = moe_layout(json.loads((tiny[arch] / "config.json").read_text())).intermediate_size
    assert packed[-1] == math.ceil(cols * bits / 32)
    expected = fake_quantized_original(tiny[arch], bits, 16, scope)
    torch.testing.assert_close(logits(out), expected, rtol=0, atol=1e-5)
    assert (logits(out) - logits(tiny[arch])).abs().max() > 1e-4  # the reference is not the original


@needs_ct
def test_dense_int8_stays_close_to_the_original(tiny, tmp_path):
    out = tmp_path / "w8"
    report = quantize_checkpoint(tiny["qwen3_moe"], out, QuantizeConfig(bits=8, group_size=16), progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    original = logits(tiny["qwen3_moe"])
    torch.testing.assert_close(
        logits(out), fake_quantized_original(tiny["qwen3_moe"], 8, 16, "experts"), rtol=0, atol=1e-5
    )
    assert (logits(out) - original).abs().max() < 0.02 * original.abs().max()
    assert report.bytes_after == stored_bytes(out) < stored_bytes(tiny["qwen3_moe"])


@pytest.mark.parametrize("bits", [8])  # below 8 bits MoBE factors are rounded jointly: tests/quantize/test_factors.py
def test_native_factors_quantised_run_to_the_fake_quantised_factors(tiny, bits, tmp_path):
    native = tmp_path / "native"
    compress(tiny["qwen3_moe"], native, MobeConfig(num_bases=4, steps=20, device="cpu"), progress=False)
    out = tmp_path / f"native-int{bits}"
    group = 6  # does not divide r = 16 nor d = 32: short last groups
    quantize_checkpoint(native, out, QuantizeConfig(bits=bits, group_size=group), progress=False)
    section = json.loads((out / "config.json").read_text())["mobe"]
    assert section["quantization"]["fields"] == ["A", "bases"]

    quantized = AutoModelForCausalLM.from_pretrained(out).eval()
    experts = [m for m in quantized.modules() if isinstance(m, MobeExperts)]
    stored = {n: b for n, b in quantized.named_buffers() if n.endswith(".qweight")}
    assert stored and all(b.dtype == (torch.int8 if bits == 8 else torch.uint8) for b in stored.values())
    assert not [n for n, _ in quantized.named_parameters() if n.endswith(("mobe_A", "mobe_bases"))]
    reference = AutoModelForCausalLM.from_pretrained(native).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(("mobe_A", "mobe_bases")):
                param.copy_(reference_fake_quantize(param, bits, group))
        expected = reference(IDS).logits
        torch.testing.assert_close(quantized(IDS).logits, expected, rtol=0, atol=1e-5)
        for module in experts:  # the decoding path (one token per expert) and the cache give the same
            module.configure(workspace_experts=2, cache_mib=1)
        torch.testing.assert_close(quantized(IDS[:, :1]).logits, reference(IDS[:, :1]).logits, rtol=0, atol=1e-5)

    # bytes: each quantised factor (float32 here) becomes its packed values plus one float32 scale per group
    shapes = section["factor_shapes"]
    per_layer = sum(
        math.prod(shape) * 4
        - math.prod(shape[:-1]) * (math.ceil(shape[-1] * bits / 8) + 4 * math.ceil(shape[-1] / group))
        for matrix in section["matrices"]
        for field, shape in shapes[matrix].items()
        if field in ("A", "bases")
    )
    assert stored_bytes(native) - stored_bytes(out) == per_layer * len(section["layers"])

    before, after = model_info(native), model_info(out)  # parameters: the factors' own, however stored
    assert after.model_params == before.model_params
    assert after.compressed_expert_params == before.compressed_expert_params
    assert after.stored_bytes == stored_bytes(out) and f"int{bits}" in after.quantization

    text = tmp_path / "text.txt"
    text.write_text("some text")
    with pytest.raises(DistillError, match="quantised"):  # integers do not train
        distill(tiny["qwen3_moe"], out, tmp_path / "kd", text)

    dense = tmp_path / "dense"  # mobe reconstruct reads the quantised factors back
    assert main(["reconstruct", str(out), "-o", str(dense), "-q"]) == 0
    torch.testing.assert_close(logits(dense), expected, rtol=0, atol=1e-5)


@needs_ct
def test_cli_compress_quantize_and_bad_input(tiny, tmp_path, capsys):
    out = tmp_path / "mobe-w8"
    args = ["compress", str(tiny["qwen3_moe"]), "-o", str(out), "--bases", "4", "--steps", "10", "--device", "cpu"]
    assert main([*args, "--reconstruct", "--quantize", "int8", "--quantize-group-size", "16", "-q"]) == 0
    report = json.loads((out / "mobe_report.json").read_text())
    assert report["quantize"]["bits"] == 8 and report["stored_bytes"]["after"] == stored_bytes(out)
    assert "stored:" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    logits(out)  # loads

    assert main(["info", str(out)]) == 0
    assert "compressed-tensors pack-quantized" in capsys.readouterr().out

    native = tmp_path / "mobe-w4"  # a native output: its factors quantised, any group size
    assert main([*args[:3], str(native), *args[4:], "--quantize", "int4", "--quantize-group-size", "5", "-q"]) == 0
    assert json.loads((native / "config.json").read_text())["mobe"]["quantization"]["group_size"] == 5
    logits(native)

    bad = tmp_path / "bad"
    assert main([*args[:3], str(bad), "--reconstruct", "--quantize", "int4", "--quantize-group-size", "12"]) == 2
    assert "--quantize-group-size 12" in capsys.readouterr().err and not bad.exists()
    assert main(["quantize", str(out), "-o", str(tmp_path / "again")]) == 2
    assert "already quantised" in capsys.readouterr().err
    for source in (out, native):  # integers are no input to a compression
        assert main(["compress", str(source), "-o", str(tmp_path / "again"), "--steps", "1"]) == 2
        assert "holds quantised weights" in capsys.readouterr().err
    assert main(["quantize", str(tiny["qwen3_moe"]), "-o", str(tmp_path / "w4"), "--group-size", "16", "-q"]) == 0
    with pytest.raises(QuantizeError, match="not empty"):
        quantize_checkpoint(tiny["qwen3_moe"], tmp_path / "w4")


@needs_ct
def test_cli_reap_then_int4(tmp_path, capsys):
    model = build_tiny_moe(tmp_path / "tiny", "qwen3_moe", vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained_fixture_path() / name, model / name)
    text = tmp_path / "calibration.txt"
    text.write_text(heldout_text()[:2000])
    out = tmp_path / "reap-w4"
    args = ["compress", str(model), "-o", str(out), "--method", "reap", "--target-ratio", "0.25"]
    assert main([*args, "--calibration", str(text), "--calibration-tokens", "128", "--quantize", "int4"]) == 2  # 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt", "tiny"]  # refused before any work
    assert main([*args, "--calibration", str(text), "--calibration-tokens", "128", "--quantize", "int4",
                 "--quantize-group-size", "16", "-q"]) == 0  # fmt: skip
    assert f"-> {stored_bytes(out) / 2**20:,.2f} MiB" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert moe_layout(config).num_experts == 6 and config["quantization_config"]["format"] == "pack-quantized"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt", "reap-w4", "tiny"]
    logits(out)


# SLBF below 8 bits is rounded jointly, A in orthonormal coordinates, as MoBE is (tests/quantize/test_factors.py)
@pytest.mark.parametrize(
    ("method", "ratio", "bits"), [("slbf", 0.1, 8), ("svd", 0.3, 4), ("d2moe", 0.3, 4), ("molae", 0.3, 4)]
)
def test_every_method_s_factors_quantised_run_to_the_fake_quantised_factors(tiny, method, ratio, bits, tmp_path):
    native, out = tmp_path / "native", tmp_path / f"int{bits}"
    config = MobeConfig(method=method, target_ratio=ratio, num_bases=2, steps=10, device="cpu")
    compress(tiny["qwen3_moe"], native, config, progress=False)
    quantize_checkpoint(native, out, QuantizeConfig(bits=bits, group_size=6), progress=False)
    fields = json.loads((out / "config.json").read_text())["mobe"]["quantization"]["fields"]
    assert "coef" not in fields and "pivots" not in fields  # mixing weights and integer pivots stay as they are
    reference = AutoModelForCausalLM.from_pretrained(native).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.rsplit(".", 1)[-1].removeprefix("mobe_") in fields:
                param.copy_(reference_fake_quantize(param, bits, 6))
        torch.testing.assert_close(logits(out), reference(IDS).logits, rtol=0, atol=1e-5)

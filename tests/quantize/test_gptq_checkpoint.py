"""`mobe quantize --calibration`: GPTQ of a dense checkpoint's routed experts, against round-to-nearest on the loss
GPTQ minimises (the output error on the calibration inputs each expert is routed), plus what it refuses."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mobe import MobeConfig, compress
from mobe.architectures import moe_layout
from mobe.calibrate import calibration_ids, collect_statistics
from mobe.checkpoint import CheckpointReader
from mobe.cli.main import main
from mobe.config import QuantizeConfig
from mobe.fixtures import heldout_text, trained_fixture_path
from mobe.quantize import QuantizeError, quantize_checkpoint, stored_bytes
from mobe.quantize.gptq import output_error

pytestmark = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None, reason="mobe[quant] missing")

TOKENS, SEQ_LEN, BITS, GROUP = 1024, 256, 3, 128


def _experts(path) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer, the experts' gate, up and down stacks as transformers loads them (dequantised), float64."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        p = experts.down_proj.shape[-1]
        out.append(
            {
                "gate": experts.gate_up_proj[:, :p].double(),
                "up": experts.gate_up_proj[:, p:].double(),
                "down": experts.down_proj.double(),
            }
        )
    return out


def test_gptq_lowers_the_output_error_on_the_calibration_inputs(tmp_path, capsys):
    model = trained_fixture_path()
    text = tmp_path / "calibration.txt"
    text.write_text(heldout_text()[:20000])
    gptq, rtn = tmp_path / "gptq", tmp_path / "rtn"
    options = ["--bits", str(BITS), "--group-size", str(GROUP), "-q"]
    calibration = [
        "--calibration",
        str(text),
        "--calibration-tokens",
        str(TOKENS),
        "--calibration-seq-len",
        str(SEQ_LEN),
    ]
    assert main(["quantize", str(model), "-o", str(gptq), *options, *calibration]) == 0
    assert f"GPTQ on {TOKENS} calibration tokens" in capsys.readouterr().out
    quantize_checkpoint(model, rtn, QuantizeConfig(bits=BITS, group_size=GROUP), progress=False)
    assert stored_bytes(gptq) == stored_bytes(rtn)  # same scales, same format: only the integers differ
    assert not (gptq / ".gptq").exists()
    report = json.loads((gptq / "mobe_quantize.json").read_text())
    assert report["calibrated"]["tokens"] == TOKENS and report["config"]["act_order"] is True

    reader = CheckpointReader(model)
    layout = moe_layout(reader.config)
    sequences = calibration_ids(model, text, TOKENS, SEQ_LEN)
    original, ours, nearest = _experts(model), _experts(gptq), _experts(rtn)
    totals = {"gptq": 0.0, "rtn": 0.0}
    for layer, stats in collect_statistics(reader, layout, sequences, layout.moe_layers):
        routed = stats.counts > 0
        for matrix in ("gate", "up", "down"):
            grams = stats.gram(matrix)[routed]
            w = original[layer][matrix][routed]
            errors = {
                "gptq": output_error(w, ours[layer][matrix][routed], grams).sum().item(),
                "rtn": output_error(w, nearest[layer][matrix][routed], grams).sum().item(),
            }
            assert errors["gptq"] < errors["rtn"], (layer, matrix, errors)
            for k in totals:
                totals[k] += errors[k]
    assert totals["gptq"] < 0.7 * totals["rtn"], totals


def test_calibration_refusals(tmp_path, tiny_checkpoints):
    text = tmp_path / "calibration.txt"
    text.write_text(heldout_text()[:2000])
    model = trained_fixture_path()
    with pytest.raises(QuantizeError, match="scope experts"):
        quantize_checkpoint(
            model, tmp_path / "a", QuantizeConfig(group_size=64, scope="linears", calibration=str(text))
        )
    native = tmp_path / "native"
    compress(tiny_checkpoints["qwen3_moe"], native, MobeConfig(num_bases=2, steps=2, device="cpu"), progress=False)
    with pytest.raises(QuantizeError, match="native factors are rounded to nearest"):
        quantize_checkpoint(native, tmp_path / "b", QuantizeConfig(calibration=str(text)))
    for bits in (2, 3):  # plain round-to-nearest of the factors at any bit width
        quantize_checkpoint(native, tmp_path / f"w{bits}", QuantizeConfig(bits=bits, group_size=8), progress=False)
    with pytest.raises(ValueError, match="damping"):
        QuantizeConfig(damping=-1)
    out = tmp_path / "c"
    code = main(["quantize", str(model), "-o", str(out), "--group-size", "64", "--calibration", str(tmp_path / "no")])
    assert code == 2 and not out.exists() and not (tmp_path / ".c.mobe-quantize-tmp").exists()
    no_tokenizer = tiny_checkpoints["qwen3_moe"]
    with pytest.raises(ValueError, match="no tokenizer"):
        quantize_checkpoint(no_tokenizer, tmp_path / "d", QuantizeConfig(group_size=16, calibration=str(text)))
    assert not (tmp_path / ".d.mobe-quantize-tmp").exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_integers_are_stored_as_they_are(bits):
    """compressed-tensors' compressor re-rounds q * s against s: the packed values are GPTQ's integers exactly."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from mobe.quantize.checkpoint import _compress_ct
    from mobe.quantize.gptq import gptq_quantize

    torch.manual_seed(bits)
    weight = (torch.randn(16, 128) * torch.logspace(-3, 0, 128)).bfloat16()
    x = torch.randn(256, 128)
    q, scales = gptq_quantize(weight, x.T @ x, bits, 64, act_order=True, dtype=torch.bfloat16)
    out = _compress_ct("a.weight", q, scales, QuantizeConfig(bits=bits, group_size=64))
    assert torch.equal(unpack_from_int32(out["a.weight_packed"], bits, torch.Size([16, 128])), q)
    assert torch.equal(out["a.weight_scale"], scales)


def test_sequential_gptq_measures_later_layers_on_the_quantised_model(tmp_path):
    """The first MoE layer sees the same inputs either way; later layers are rounded on other Hessians."""
    model = trained_fixture_path()
    text = tmp_path / "calibration.txt"
    text.write_text(heldout_text()[:8000])
    config = {
        "bits": 2,
        "group_size": GROUP,
        "calibration": str(text),
        "calibration_tokens": 512,
        "calibration_seq_len": 256,
    }
    plain, sequential = tmp_path / "plain", tmp_path / "sequential"
    quantize_checkpoint(model, plain, QuantizeConfig(**config), progress=False)
    quantize_checkpoint(model, sequential, QuantizeConfig(**config, sequential=True), progress=False)
    a, b = _experts(plain), _experts(sequential)
    assert all(torch.equal(a[0][m], b[0][m]) for m in ("gate", "up", "down"))
    assert not torch.equal(a[-1]["down"], b[-1]["down"])

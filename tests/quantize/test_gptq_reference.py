"""mobe's GPTQ against llm-compressor's on the same weight and Hessian.

tests/data/gptq_reference/qwen3-moe-trained-down.safetensors holds one expert's down_proj of the coarse trained
fixture (bf16, 128 x 256), the Gram of its routed intermediate activations, and what llm-compressor 0.14.0.1 (its
weight observer and `quantize_weight`, static act-order, dampening 0.01, block 128; float32) made of them at 4, 3 and
2 bits: written by scripts/make_gptq_reference.py, whose inputs and versions are in the file's metadata.

Tolerance: none. Both take each column's error against its bf16 read-back, so float64 here and float32 there round
every entry alike on this matrix (a float64 reference with an exact q * s read-back differs in 4.3% of the 4-bit
entries: a flip early in a row moves every later column of it).
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mobe.quantize.gptq import gptq_quantize, output_error
from mobe.quantize.groupwise import dequantize, fake_quantize

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "gptq_reference" / "qwen3-moe-trained-down.safetensors"
GROUP = 128


@pytest.fixture(scope="module")
def reference():
    with safe_open(REFERENCE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_reference_records_how_it_was_made(reference):
    tensors, meta = reference
    assert meta["llmcompressor"] == "0.14.0.1" and meta["actorder"] == "static" and meta["group_size"] == str(GROUP)
    assert meta["made_by"] == "python scripts/make_gptq_reference.py"
    assert tensors["weight"].dtype == torch.bfloat16 and tensors["weight"].shape == (128, 256)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_mobe_gptq_equals_llm_compressor(reference, bits):
    tensors, meta = reference
    weight, hessian = tensors["weight"], tensors["hessian"]
    assert meta[f"rtn_fallback{bits}"] == "False"
    q, scales = gptq_quantize(weight, hessian, bits, GROUP, act_order=True, dtype=weight.dtype)
    assert torch.equal(scales, tensors[f"scale{bits}"])  # the same min-max observer
    assert torch.equal(q, tensors[f"q{bits}"])
    dequantized = dequantize(q, scales, GROUP, torch.bfloat16)
    assert torch.equal(dequantized, tensors[f"dequantized{bits}"])
    # and it is GPTQ: well below round-to-nearest's output error on the same Hessian
    gptq_error = output_error(weight.float(), dequantized.float(), hessian)
    rtn_error = output_error(weight.float(), fake_quantize(weight, bits, GROUP).float(), hessian)
    assert gptq_error < 0.6 * rtn_error

"""The committed trained fixture (fixtures/qwen3-moe-trained) loads, has learned, and its experts moved from init."""

from __future__ import annotations

import json

import pytest
import torch

from mobe.evaluate.perplexity import sliding_window_perplexity
from mobe.fixtures import heldout_text, trained_fixture_path

# Perplexity of the committed fixture on the first 2048 held-out tokens (context 256, stride 128), measured in
# bfloat16 when it was trained; the bound leaves room for kernel differences across machines.
MEASURED_PPL_2K = 21.71
PPL_BOUND = 24.0


@pytest.fixture(scope="module")
def fixture_path():
    return trained_fixture_path()


@pytest.fixture(scope="module")
def model_and_tokenizer(fixture_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(fixture_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(fixture_path)
    return model, tokenizer


def test_layout(fixture_path):
    config = json.loads((fixture_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert (
        config.get("num_experts", config.get("num_local_experts")) == 16
        and 256 <= config["moe_intermediate_size"] <= 512
    )
    index = json.loads((fixture_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]


def test_heldout_perplexity(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(heldout_text(), return_tensors="pt")["input_ids"][0, :2048]
    assert ids.numel() == 2048
    result = sliding_window_perplexity(model, ids, context=256, stride=128, progress=False)
    vocab = model.config.vocab_size
    assert result.perplexity < vocab / 20  # a uniform guess scores exactly vocab_size
    assert result.perplexity < PPL_BOUND, f"perplexity {result.perplexity:.2f} (measured {MEASURED_PPL_2K})"


def test_generates_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer("The function returns", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum(c.isalpha() for c in text) > 10


def test_training_stats(fixture_path):
    stats = json.loads((fixture_path / "training_stats.json").read_text())
    distances = stats["expert_distance_from_init"]
    assert len(distances) == 4
    for layer, kinds in distances.items():
        for kind in ("gate", "up", "down"):
            assert kinds[kind] > 1.0, f"layer {layer} {kind}: {kinds[kind]:.2f}"
    assert stats["heldout"]["perplexity"] < stats["uniform_perplexity"] / 20

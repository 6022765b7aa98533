import json

import huggingface_hub
import pytest
import torch

from mobe import CheckpointError, CheckpointReader
from mobe.checkpoint.reader import HUB_PATTERNS


def test_hub_id_is_resolved_with_snapshot_download(qwen3_checkpoint, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(qwen3_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    reader = CheckpointReader("someorg/tiny-moe")
    assert calls == [("someorg/tiny-moe", HUB_PATTERNS)]
    assert reader.config["model_type"] == "qwen3_moe"


def test_hub_failure_names_the_model(monkeypatch):
    def offline(repo_id, allow_patterns):
        raise OSError("outgoing traffic has been disabled\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not get someorg/x from the Hugging Face hub: outgoing traffic"):
        CheckpointReader("someorg/x")


def test_lazy_reads_match_the_saved_model(qwen3_checkpoint):
    from transformers import AutoModelForCausalLM

    reader = CheckpointReader(qwen3_checkpoint)
    assert len(reader.shards) > 1  # the sharded layout is exercised
    model = AutoModelForCausalLM.from_pretrained(qwen3_checkpoint)
    fused = model.model.layers[1].mlp.experts.gate_up_proj  # (E, 2p, d): gate rows first, then up
    p = reader.config["moe_intermediate_size"]
    assert torch.equal(reader.get("model.layers.1.mlp.experts.3.gate_proj.weight"), fused[3, :p])
    assert torch.equal(reader.get("model.layers.1.mlp.experts.3.up_proj.weight"), fused[3, p:])
    index = json.loads((qwen3_checkpoint / "model.safetensors.index.json").read_text())
    assert set(reader.weight_map) == set(index["weight_map"])
    assert reader.num_parameters() == sum(t.numel() for t in model.state_dict().values())

"""End to end: compress every architecture, write native and dense checkpoints, load the dense one."""

import json

import pytest
import torch
from safetensors import safe_open

from mobe import CheckpointReader, MobeConfig, compress, load_model, reconstruct
from mobe.architectures import canonical_model_types, moe_layout
from mobe.evaluate import mobe_parameters

ARCHITECTURES = canonical_model_types()

# m = E, r = p, no activation, a one-hot start and no steps: the initialisation alone, which is exact.
LOSSLESS = MobeConfig(num_bases=8, activation="none", init_logit=60.0, steps=0)
FAST = MobeConfig(num_bases=2, rank=8, steps=30, eval_every=10, matrices=("gate", "up"))


def _logits(path, ids):
    model = load_model(path, dtype=torch.float32)  # AutoModelForCausalLM, or the family's class it lacks (Qwen3-VL)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lossless_setting_reconstructs_original_logits(arch, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[arch]
    report = compress(src, tmp_path / "dense", LOSSLESS, reconstruct=True, progress=False)
    assert max(r.relative_error for r in report.results) < 1e-5
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tmp_path / "dense", ids), _logits(src, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_native_checkpoint_layout_and_report(arch, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[arch]
    out = tmp_path / "native"
    report = compress(src, out, FAST, progress=False)
    layout = moe_layout(json.loads((src / "config.json").read_text()))
    E, p, d = layout.num_experts, layout.intermediate_size, layout.hidden_size

    reader, src_reader = CheckpointReader(out), CheckpointReader(src)
    section = reader.config["mobe"]
    assert section["format"] == "native" and section["layers"] == list(layout.moe_layers)
    assert (section["num_bases"], section["rank"], section["matrices"]) == (2, 8, ["gate", "up"])
    assert (out / "generation_config.json").exists() and (out / "mobe_report.json").exists()
    arch_spec = layout.arch
    for layer in layout.moe_layers:
        prefix = arch_spec.experts_prefix(layer)
        for matrix in ("gate", "up"):
            assert not set(layout.stored_names(layer, matrix)) & set(reader.weight_map)
            name = arch_spec.matrices[matrix]
            assert reader.shape(f"{prefix}.{name}.mobe_A") == (E, p, 8)
            assert reader.shape(f"{prefix}.{name}.mobe_bases") == (1, 2, 8, d)
            assert reader.shape(f"{prefix}.{name}.mobe_coef") == (E, 2)
        if arch_spec.fused:  # the compressed layer's experts module holds down as one (E, d, p) stack
            assert torch.equal(
                reader.get(f"{prefix}.{arch_spec.matrices['down']}"), layout.read_experts(src_reader, layer, "down")
            )
        else:  # left as the source stores it
            assert reader.shape(layout.stored_names(layer, "down")[-1]) == (d, p)

    # Every tensor that is neither a replaced gate/up matrix (fused: any experts tensor) nor a factor is copied as is.
    source = CheckpointReader(src)
    replaced_types = ("gate", "up", "down") if arch_spec.fused else ("gate", "up")
    replaced = {n for layer in layout.moe_layers for m in replaced_types for n in layout.stored_names(layer, m)}
    kept = [n for n in source.weight_map if n not in replaced]
    assert len(kept) < len(source.weight_map)
    for name in kept:
        assert torch.equal(reader.get(name), source.get(name)), name

    per_matrix = mobe_parameters(E, p, d, 2, 8)
    assert all(r.params_after == per_matrix and r.params_before == E * p * d for r in report.results)
    saved = json.loads((out / "mobe_report.json").read_text())["summary"]
    assert saved["model_params_after"] == reader.num_parameters()
    assert saved["model_params_before"] == source.num_parameters()
    factor = f"{arch_spec.experts_prefix(layout.moe_layers[0])}.{arch_spec.matrices['up']}.mobe_A"
    with safe_open(out / reader.weight_map[factor], "pt") as f:
        assert f.metadata()["mobe_format"] == "native"


def test_reconstruct_from_native_equals_direct_dense_export(qwen3_checkpoint, tmp_path):
    compress(qwen3_checkpoint, tmp_path / "native", FAST, progress=False)
    reconstruct(tmp_path / "native", tmp_path / "dense_a", progress=False)
    compress(qwen3_checkpoint, tmp_path / "dense_b", FAST, reconstruct=True, progress=False)
    a, b = CheckpointReader(tmp_path / "dense_a"), CheckpointReader(tmp_path / "dense_b")
    assert set(a.weight_map) == set(b.weight_map) == set(CheckpointReader(qwen3_checkpoint).weight_map)
    for name in a.weight_map:
        assert torch.equal(a.get(name), b.get(name)), name
    ids = torch.arange(10)[None]
    torch.testing.assert_close(_logits(tmp_path / "dense_a", ids), _logits(tmp_path / "dense_b", ids))


def test_only_selected_layers_and_matrices(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["deepseek_v3"]  # MoE layers are 1 and 2
    config = MobeConfig(num_bases=2, rank=8, steps=5, layers=(2,), matrices=("up",))
    report = compress(src, tmp_path / "out", config, progress=False)
    assert [(r.layer, r.matrix) for r in report.results] == [(2, "up")]
    reader = CheckpointReader(tmp_path / "out")
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in reader.weight_map
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in reader.weight_map
    assert "model.layers.2.mlp.experts.0.up_proj.weight" not in reader.weight_map


def test_bfloat16_source_keeps_its_dtype(tmp_path):
    from mobe.fixtures import build_tiny_moe

    src = build_tiny_moe(tmp_path / "bf16", dtype=torch.bfloat16)
    compress(src, tmp_path / "out", FAST, progress=False)
    reader = CheckpointReader(tmp_path / "out")
    assert reader.get("model.layers.0.mlp.experts.gate_proj.mobe_A").dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["svd", "d2moe", "molae"])
def test_comparison_methods_end_to_end(method, qwen3_checkpoint, tmp_path):
    config = MobeConfig(method=method, target_ratio=0.4)
    report = compress(qwen3_checkpoint, tmp_path / "native", config, progress=False)
    summary = report.summary()
    assert summary["expert_reduction"] >= 0.4 and summary["expert_reduction"] < 0.5
    section = CheckpointReader(tmp_path / "native").config["mobe"]
    assert section["method"] == method and section["rank"] == report.config["rank"] >= 1
    reconstruct(tmp_path / "native", tmp_path / "dense_a", progress=False)
    compress(qwen3_checkpoint, tmp_path / "dense_b", config, reconstruct=True, progress=False)
    a, b = CheckpointReader(tmp_path / "dense_a"), CheckpointReader(tmp_path / "dense_b")
    for name in b.weight_map:
        assert torch.equal(a.get(name), b.get(name)), name


def test_target_ratio_out_of_reach(qwen3_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="out of reach for --method d2moe"):
        config = MobeConfig(method="d2moe", target_ratio=0.66, matrices=("gate", "up"))
        compress(qwen3_checkpoint, tmp_path / "o", config, progress=False)


# Per expert; fused (E, d, p); fused and transposed (Llama 4); fused, flat and transposed (DBRX).
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "granitemoe", "llama4", "dbrx"])
def test_down_matrices_too_lossless(arch, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[arch]
    config = MobeConfig(num_bases=8, activation="none", init_logit=60.0, steps=0, matrices=("gate", "up", "down"))
    report = compress(src, tmp_path / "native", config, progress=False)
    assert {r.matrix for r in report.results} == {"gate", "up", "down"}
    assert max(r.relative_error for r in report.results) < 1e-5
    reader = CheckpointReader(tmp_path / "native")
    layout = moe_layout(reader.config)
    assert not set(layout.stored_names(layout.moe_layers[0], "down")) & set(reader.weight_map)
    reconstruct(tmp_path / "native", tmp_path / "dense", progress=False)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(tmp_path / "dense", ids), _logits(src, ids), atol=1e-4, rtol=1e-4)

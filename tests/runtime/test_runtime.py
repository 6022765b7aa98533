"""Native MoBE inference equals the dense reconstruction, for every architecture, without dense experts."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mobe import CheckpointReader, MobeConfig, compress, load_model, reconstruct
from mobe.architectures import canonical_model_types, moe_layout
from mobe.fixtures import build_tiny_moe
from mobe.runtime import MobeExperts

CONFIG = MobeConfig(num_bases=4, rank=8, steps=20)


@pytest.fixture(scope="module")
def pairs(tiny_checkpoints, tmp_path_factory):
    """arch -> (native path, dense path) built from the same factors."""
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for arch, src in tiny_checkpoints.items():
        compress(src, root / f"{arch}-native", CONFIG, progress=False)
        reconstruct(root / f"{arch}-native", root / f"{arch}-dense", progress=False)
        out[arch] = (root / f"{arch}-native", root / f"{arch}-dense")
    return out


@pytest.mark.parametrize("arch", canonical_model_types())
def test_prefill_and_cached_decoding_match_dense(arch, pairs):
    native_path, dense_path = pairs[arch]
    native = load_model(native_path)
    dense = load_model(dense_path)  # AutoModelForCausalLM, or the family's class it lacks (Qwen3-VL-MoE)
    assert any(isinstance(m, MobeExperts) for m in native.modules())
    assert not [n for n, _ in native.named_parameters() if n.endswith("gate_up_proj")]  # no dense gate/up anywhere

    ids = torch.randint(2, 128, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-4)
        kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        a, b = native.generate(ids, **kwargs), dense.generate(ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-4)


def test_workspace_and_cache_do_not_change_results(pairs):
    native_path, _ = pairs["qwen3_moe"]
    ids = torch.randint(2, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = load_model(native_path, workspace_experts=64)(ids).logits
        small = load_model(native_path, workspace_experts=1)(ids).logits
        cached_model = load_model(native_path, workspace_experts=3, cache_mib=1)
        first, second = cached_model(ids).logits, cached_model(ids).logits
    torch.testing.assert_close(small, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(second, reference, atol=1e-6, rtol=1e-5)
    experts = [m for m in cached_model.modules() if isinstance(m, MobeExperts)]
    assert all(0 < m._cached_bytes <= 2**20 for m in experts)


def test_cache_respects_its_budget(pairs):
    native_path, _ = pairs["qwen3_moe"]
    model = load_model(native_path, cache_mib=4 * 8 * 32 * 4 / 2**20)  # room for 4 mixed bases of 8 x 32 floats
    with torch.no_grad():
        model(torch.randint(2, 128, (1, 30)))
    for m in (m for m in model.modules() if isinstance(m, MobeExperts)):
        assert len(m._cache) == 4 and m._cached_bytes == 4 * 8 * 32 * 4


def test_plain_checkpoints_load_as_usual(pairs, tiny_checkpoints):
    model = load_model(tiny_checkpoints["mixtral"])
    assert not any(isinstance(m, MobeExperts) for m in model.modules())


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama4"])  # per expert; fused (uncompressed layers keep theirs)
def test_partially_compressed_model(arch, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[arch]
    last = moe_layout(CheckpointReader(src).config).moe_layers[-1]
    compress(
        src, tmp_path / "n", MobeConfig(num_bases=2, rank=8, steps=5, layers=(last,), matrices=("up",)), progress=False
    )
    reconstruct(tmp_path / "n", tmp_path / "d", progress=False)
    ids = torch.randint(2, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "n")(ids).logits,
            AutoModelForCausalLM.from_pretrained(tmp_path / "d")(ids).logits,
            atol=1e-5,
            rtol=1e-4,
        )


def test_down_matrices_compressed_match_dense(tiny_checkpoints, tmp_path):
    config = MobeConfig(num_bases=4, rank=8, steps=10, matrices=("gate", "up", "down"))
    compress(tiny_checkpoints["olmoe"], tmp_path / "n", config, progress=False)
    reconstruct(tmp_path / "n", tmp_path / "d", progress=False)
    native = load_model(tmp_path / "n", workspace_experts=3, cache_mib=1)
    assert not [n for n, _ in native.named_parameters() if n.endswith(("experts.down_proj", "gate_up_proj"))]
    ids = torch.randint(2, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            native(ids).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "d")(ids).logits, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])  # per expert; fused down in the experts module
def test_wide_experts_fitted_transposed_run_like_their_reconstruction(arch, tmp_path):
    """Experts wider than the hidden size (p > d, Mixtral's shape): the default recipe fits every matrix transposed
    (bases on the wider side); native prefill and decoding equal the dense rebuild."""
    src = build_tiny_moe(tmp_path / "src", arch, moe_intermediate_size=48)  # p = 48 > d = 32
    compress(src, tmp_path / "n", MobeConfig(target_ratio=0.4, steps=10), progress=False)
    section = CheckpointReader(tmp_path / "n").config["mobe"]
    assert section["matrices"] == ["gate", "up", "down"]
    assert {m: meta["transposed"] for m, meta in section["factor_meta"].items()} == dict.fromkeys(
        section["matrices"], "1"
    )
    reconstruct(tmp_path / "n", tmp_path / "d", progress=False)
    native, dense = (
        load_model(tmp_path / "n", workspace_experts=3),
        AutoModelForCausalLM.from_pretrained(tmp_path / "d"),
    )
    ids = torch.randint(2, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-4)
        out_native = native.generate(ids[:1], max_new_tokens=5, do_sample=False)
        out_dense = dense.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(out_native, out_dense)

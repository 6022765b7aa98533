"""Families read through transformers: each layout checked against what transformers' own loader builds."""

import pytest
import torch

from mobe import CheckpointReader, MobeConfig, compress, reconstruct
from mobe.architectures import UnsupportedArchitectureError, canonical_model_types, get_arch, moe_layout
from mobe.architectures.derive import model_class
from mobe.cli.main import main

FUSED = [a for a in canonical_model_types() if get_arch(a).fused is not None]


@pytest.mark.parametrize("arch", canonical_model_types())
def test_expert_stacks_are_what_transformers_loads(arch, tiny_checkpoints):
    """Each matrix type read the mobe way (per expert, or a slice of a fused tensor) equals its block of the experts
    module that transformers fills from the same files with its own conversion rules; the MoE layers are exactly
    those with an experts module."""
    src = tiny_checkpoints[arch]
    reader = CheckpointReader(src)
    layout = moe_layout(reader.config)
    model = model_class(arch, get_arch(arch).model_class).from_pretrained(src, dtype=torch.float32)
    p = layout.intermediate_size
    with_experts = []
    for layer in range(layout.num_layers):
        try:
            experts = model.get_submodule(layout.arch.experts_module.format(layer=layer))
        except AttributeError:
            continue
        with_experts.append(layer)
        if not hasattr(experts, "gate_up_proj"):  # DBRX keeps its own tensors: check by running the module
            _check_by_forward(experts, layout, reader, layer)
            continue
        gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2p, d): gate rows first; (E, d, p)
        if down.shape[1] == p != layout.hidden_size:  # Llama 4, gpt-oss hold both transposed (Qwen3-VL-MoE on disk)
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if layout.arch.fused is not None and layout.arch.fused["gate"].interleaved:  # gpt-oss: rows alternate
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        else:
            gate, up = gate_up[:, :p], gate_up[:, p:]
        assert torch.equal(layout.read_experts(reader, layer, "gate"), gate)
        assert torch.equal(layout.read_experts(reader, layer, "up"), up)
        assert torch.equal(layout.read_experts(reader, layer, "down"), down)
    assert tuple(with_experts) == layout.moe_layers and len(layout.moe_layers) >= 1


def _check_by_forward(experts, layout, reader, layer):
    """Token t routed to expert t % E with weight 1: the module's output is down_e(act(gate_e x) * up_e x) computed
    from the stacks mobe reads."""
    E, d = layout.num_experts, layout.hidden_size
    x = torch.randn(2 * E, d, generator=torch.Generator().manual_seed(layer))
    index = (torch.arange(2 * E) % E)[:, None]
    with torch.no_grad():
        out = experts(x, index, torch.ones(2 * E, 1)).reshape(2 * E, d)
    gate, up, down = (layout.read_experts(reader, layer, m)[index[:, 0]] for m in ("gate", "up", "down"))
    act = getattr(experts, "act_fn", None) or experts.mlp.activation_fn
    h = act(torch.bmm(gate, x[:, :, None])) * torch.bmm(up, x[:, :, None])
    torch.testing.assert_close(out, torch.bmm(down, h)[:, :, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", FUSED)
def test_fused_tensors_are_rebuilt_in_place(arch, tiny_checkpoints, tmp_path):
    """Gate compressed, up and down not: the dense output has the source's tensors and shapes, the fused gate/up
    tensor with its up block bit for bit; the native one drops it and keeps up as a stack; both ways to dense agree."""
    src = tiny_checkpoints[arch]
    config = MobeConfig(num_bases=2, rank=8, steps=5, matrices=("gate",))
    compress(src, tmp_path / "n", config, progress=False)
    reconstruct(tmp_path / "n", tmp_path / "a", progress=False)
    compress(src, tmp_path / "b", config, reconstruct=True, progress=False)
    source, native = CheckpointReader(src), CheckpointReader(tmp_path / "n")
    a, b = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "b")
    assert set(a.weight_map) == set(b.weight_map) == set(source.weight_map)
    layout = moe_layout(source.config)
    for name in source.weight_map:
        assert torch.equal(a.get(name), b.get(name)), name
        assert a.shape(name) == source.shape(name), name
    for layer in layout.moe_layers:
        assert torch.equal(layout.read_experts(a, layer, "up"), layout.read_experts(source, layer, "up"))
        assert torch.equal(layout.read_experts(a, layer, "down"), layout.read_experts(source, layer, "down"))
        assert not torch.equal(layout.read_experts(a, layer, "gate"), layout.read_experts(source, layer, "gate"))
        assert layout.stored_names(layer, "up")[0] not in native.weight_map
        stack = f"{layout.arch.experts_prefix(layer)}.{layout.arch.matrices['up']}"
        assert torch.equal(native.get(stack), layout.read_experts(source, layer, "up"))


UNSUPPORTED_CASES = [
    ("nemotron_h", "not gated"),
    ("bailing_moe", "no bailing_moe"),
    ("qwen3_vl_moe_text", "no causal-LM class"),
]


@pytest.mark.parametrize(("model_type", "needle"), UNSUPPORTED_CASES)
def test_known_unsupported_families_say_why(model_type, needle):
    with pytest.raises(UnsupportedArchitectureError, match=needle) as err:
        moe_layout({"model_type": model_type, "num_hidden_layers": 2})
    assert f"model_type {model_type!r} is not supported" in str(err.value) and "\n" not in str(err.value)


def test_info_list_names_every_family_its_class_and_layout(capsys):
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    for arch in canonical_model_types():
        spec = get_arch(arch)
        assert f"  {arch}" in out and spec.storage() in out
    assert "GraniteMoeForCausalLM; tested" in out and "nemotron_h: " in out
    assert main(["info"]) == 2
    assert "--list" in capsys.readouterr().err


def test_family_missing_from_transformers_is_one_line():
    from mobe.architectures.derive import model_on_meta

    with pytest.raises(UnsupportedArchitectureError, match=r"'bailing_moe' is not in the installed transformers 5\."):
        model_on_meta({}, "bailing_moe")


def test_experts_with_biases_are_refused_by_what_transformers_builds():
    """Without its quirk entry (which declares the biases), gpt-oss's experts module, as transformers builds it, is
    refused by the parameters the factorised experts would drop."""
    import transformers

    from mobe.architectures import ArchSpec
    from mobe.architectures.derive import check_no_other_parameters

    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(config)
    spec = ArchSpec(model_type="gpt_oss", experts="model.layers.{layer}.mlp.experts")
    with pytest.raises(UnsupportedArchitectureError, match="gate_up_proj_bias"):
        check_no_other_parameters(model.get_submodule("model.layers.0.mlp.experts"), spec, 0)


def test_qwen3_vl_moe_saved_by_transformers_is_refused_by_shape(tmp_path):
    """transformers 5 holds Qwen3-VL-MoE's experts untransposed and saves them so; mobe reads the published
    (transposed) layout and refuses the other in one line that names the tensor and both shapes."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from mobe.checkpoint import CheckpointError
    from mobe.fixtures import tiny_config

    Qwen3VLMoeForConditionalGeneration(tiny_config("qwen3_vl_moe")).save_pretrained(tmp_path / "src")
    with pytest.raises(CheckpointError) as err:
        compress(tmp_path / "src", tmp_path / "out", MobeConfig(num_bases=2, rank=8, steps=1), progress=False)
    assert str(err.value) == (
        "tensor model.language_model.layers.0.mlp.experts.gate_up_proj has shape [8, 48, 32], expected [8, 32, 48] "
        "from config.json"
    )


# (text-only model type, its transformers config class, the published family it is the text part of)
TEXT_ONLY_CASES = [
    ("qwen3_5_moe_text", "Qwen3_5MoeTextConfig", "qwen3_5_moe"),
    ("gemma4_text", "Gemma4TextConfig", "gemma4"),
    ("llama4_text", "Llama4TextConfig", "llama4"),
]


@pytest.mark.parametrize(("model_type", "config_class", "family"), TEXT_ONLY_CASES)
def test_text_only_checkpoint_saved_by_transformers(model_type, config_class, family, tmp_path):
    """A family's text-only model, built by AutoModelForCausalLM from its text config and saved by transformers,
    compresses from the command line, and its native checkpoint opens with AutoModelForCausalLM like the dense one
    `mobe reconstruct` rebuilds; the experts are the published family's, without the `language_model` wrapper."""
    from transformers import AutoModelForCausalLM

    from mobe.fixtures import tiny_config

    config = tiny_config(model_type)
    assert type(config).__name__ == config_class
    assert config.to_dict() == tiny_config(family).get_text_config().to_dict()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "src")
    layout = moe_layout(CheckpointReader(tmp_path / "src").config)
    assert layout.arch.model_type == model_type and "language_model" not in layout.arch.experts
    published = moe_layout(tiny_config(family).to_dict())
    assert (layout.num_experts, layout.intermediate_size, layout.hidden_size) == (
        published.num_experts, published.intermediate_size, published.hidden_size,
    )  # fmt: skip

    argv = [str(tmp_path / "src"), "-q", "--bases", "2", "--rank", "8", "--steps", "5"]
    assert main(["compress", *argv, "-o", str(tmp_path / "n")]) == 0
    assert main(["reconstruct", str(tmp_path / "n"), "-o", str(tmp_path / "d"), "-q"]) == 0
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "n", dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    assert type(native).__name__ == "Mobe" + type(model).__name__ and type(dense) is type(model)
    ids = torch.randint(2, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)

import pytest

from mobe.architectures import UnsupportedArchitectureError, get_arch, moe_layout, supported_model_types


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_arch("llama")
    message = str(err.value)
    assert "'llama'" in message
    for name in ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "kimi_k2", "olmoe"):
        assert name in message and name in supported_model_types()


def test_deepseek_dense_first_layers_and_kimi_alias():
    config = {
        "model_type": "kimi_k2",
        "num_hidden_layers": 61,
        "first_k_dense_replace": 1,
        "n_routed_experts": 384,
        "moe_intermediate_size": 2048,
        "hidden_size": 7168,
    }
    layout = moe_layout(config)
    assert layout.moe_layers == tuple(range(1, 61)) and layout.num_experts == 384
    assert layout.expected_shape("gate") == (2048, 7168) and layout.expected_shape("down") == (7168, 2048)


def test_qwen_sparse_step_and_mlp_only_layers():
    config = {
        "model_type": "qwen2_moe",
        "num_hidden_layers": 8,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "num_experts": 60,
        "moe_intermediate_size": 1408,
        "hidden_size": 2048,
    }
    assert moe_layout(config).moe_layers == (1, 5, 7)


def test_mixtral_names_w1_gate_w3_up():
    arch = get_arch("mixtral")
    assert arch.tensor_name(3, 7, "gate") == "model.layers.3.block_sparse_moe.experts.7.w1.weight"
    assert arch.tensor_name(3, 7, "up") == "model.layers.3.block_sparse_moe.experts.7.w3.weight"


def test_missing_expert_count_is_named():
    with pytest.raises(ValueError, match="n_routed_experts"):
        moe_layout({"model_type": "deepseek_v3", "num_hidden_layers": 2, "moe_intermediate_size": 8, "hidden_size": 8})


def test_every_family_has_a_tiny_config_of_its_own_class():
    """Each registered family is built by the tests from an entry of TINY_CONFIGS (its text-only form from its
    family's), whose class is the one transformers maps the model type to."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from mobe.architectures import canonical_model_types
    from mobe.fixtures import tiny_config
    from mobe.tiny_configs import TINY_CONFIGS

    for model_type in canonical_model_types():
        assert model_type in TINY_CONFIGS or model_type.removesuffix("_text") in TINY_CONFIGS, model_type
        if model_type in TINY_CONFIGS:
            assert TINY_CONFIGS[model_type].config_class == CONFIG_MAPPING[model_type].__name__, model_type
        assert type(tiny_config(model_type)) is CONFIG_MAPPING[model_type], model_type
    with pytest.raises(ValueError, match="no tiny config for model_type 'llama'"):
        tiny_config("llama")

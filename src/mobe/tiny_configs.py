"""The tiny test configuration of every supported family, as data: model_type -> config class and its arguments.

`mobe.fixtures.tiny_config` builds them (the tests, the demo and the benchmarks read them there). Each entry's
`kwargs` maps the requested sizes to the config class's arguments, on top of the common ones (`TinySizes.common`):
at the top level, inside `text_config` (multimodal families), or not at all (DBRX names everything its own way).
A multimodal family's text-only form (`gemma4_text`) is the text part of its family's entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# An override that removes a common argument the config class does not take (Gemma 4's `num_experts_per_tok`).
DROP = object()


@dataclass(frozen=True)
class TinySizes:
    d: int  # hidden size
    p: int  # expert intermediate size
    E: int  # routed experts
    L: int  # decoder layers asked for (families with a dense first layer get one more)
    top_k: int
    vocab: int
    init: float  # initializer_range

    @property
    def common(self) -> dict[str, Any]:
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.d,
            num_hidden_layers=self.L,
            num_attention_heads=4,
            num_experts_per_tok=self.top_k,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=None,
            tie_word_embeddings=False,
            initializer_range=self.init,
        )


@dataclass(frozen=True)
class TinyConfig:
    """One family's tiny configuration.

    Args:
        config_class: the transformers config class, by name.
        kwargs: sizes -> the class's arguments (overriding the common ones where they share a name; `DROP` removes one).
        common: where the common arguments go: "" at the top level, "text_config" inside it, None nowhere.
        known_fields_only: pass only the arguments the class has fields for (families whose classes take the usual
            names under one spelling or another: `num_experts` / `num_local_experts` / `n_routed_experts`).
    """

    config_class: str
    kwargs: Callable[[TinySizes], dict[str, Any]]
    common: str | None = ""
    known_fields_only: bool = False


def _dense_first(s: TinySizes) -> dict[str, Any]:
    """One dense first layer, then the MoE layers asked for."""
    return {"num_hidden_layers": s.L + 1}


def _mla(s: TinySizes) -> dict[str, Any]:
    return dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _deepseek_like(s: TinySizes) -> dict[str, Any]:
    return dict(
        **_dense_first(s),
        num_key_value_heads=4,
        intermediate_size=2 * s.d,
        moe_intermediate_size=s.p,
        n_routed_experts=s.E,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )


def _mixtral_like(s: TinySizes) -> dict[str, Any]:
    return dict(num_key_value_heads=2, intermediate_size=s.p, num_local_experts=s.E)


def _usual_names(s: TinySizes) -> dict[str, Any]:
    """The common sizes with the expert count and intermediate size under every usual name (`known_fields_only`);
    `intermediate_size` is the experts' where the class has no `moe_intermediate_size`, so both are given: the
    builder keeps `moe_intermediate_size` and a dense size where the class has it."""
    return dict(
        num_key_value_heads=2,
        head_dim=s.d // 4,
        intermediate_size=(s.p, 2 * s.d),  # (without moe_intermediate_size, with it)
        moe_intermediate_size=s.p,
        num_experts=s.E,
        num_local_experts=s.E,
        n_routed_experts=s.E,
    )


def _granite(s: TinySizes, **extra: Any) -> dict[str, Any]:
    return dict(**_mixtral_like(s), shared_intermediate_size=s.p, **extra)


TINY_CONFIGS: dict[str, TinyConfig] = {
    "qwen3_moe": TinyConfig(
        "Qwen3MoeConfig",
        lambda s: dict(
            num_key_value_heads=2,
            head_dim=s.d // 4,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            num_experts=s.E,
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": TinyConfig(
        "Qwen2MoeConfig",
        lambda s: dict(
            num_key_value_heads=2,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            num_experts=s.E,
            shared_expert_intermediate_size=2 * s.p,
        ),
    ),
    "mixtral": TinyConfig("MixtralConfig", _mixtral_like),
    "olmoe": TinyConfig("OlmoeConfig", lambda s: dict(num_key_value_heads=4, intermediate_size=s.p, num_experts=s.E)),
    "deepseek_v3": TinyConfig(  # as DeepSeek-V3 / Kimi-K2: a dense first layer; two routing groups
        "DeepseekV3Config", lambda s: {**_deepseek_like(s), **_mla(s), "n_group": 2, "topk_group": 2}
    ),
    "deepseek_v2": TinyConfig(
        "DeepseekV2Config",
        lambda s: {k: v for k, v in {**_deepseek_like(s), **_mla(s)}.items() if k not in ("n_group", "topk_group")},
    ),
    "glm4_moe": TinyConfig(
        "Glm4MoeConfig", lambda s: {**_deepseek_like(s), "num_key_value_heads": 2, "head_dim": s.d // 4}
    ),
    "ernie4_5_moe": TinyConfig(
        "Ernie4_5_MoeConfig",
        lambda s: dict(
            **_dense_first(s),
            num_key_value_heads=2,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            moe_num_experts=s.E,
            moe_k=s.top_k,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_interval=1,
        ),
    ),
    "qwen3_next": TinyConfig(  # layers 0-2 linear attention, layer 3 full attention; every layer MoE
        "Qwen3NextConfig",
        lambda s: dict(
            num_hidden_layers=max(s.L, 4),
            num_key_value_heads=2,
            head_dim=s.d // 4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            shared_expert_intermediate_size=s.p,
            num_experts=s.E,
        ),
    ),
    "bailing_hybrid": TinyConfig(
        "BailingHybridConfig",
        lambda s: dict(
            **_dense_first(s),
            num_key_value_heads=4,
            head_dim=s.d // 4,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            num_experts=s.E,
            num_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            layer_group_size=s.L + 1,  # linear attention, then one full-attention layer last
        ),
    ),
    "deepseek_v32": TinyConfig(
        "DeepseekV32Config",
        lambda s: dict(**_deepseek_like(s), **_mla(s), index_n_heads=2, index_head_dim=16, index_topk=4),
    ),
    "glm4_moe_lite": TinyConfig("Glm4MoeLiteConfig", lambda s: {**_deepseek_like(s), **_mla(s)}),
    "dots1": TinyConfig("Dots1Config", lambda s: {**_deepseek_like(s), "num_key_value_heads": 2, "head_dim": s.d // 4}),
    "hunyuan_v1_moe": TinyConfig(
        "HunYuanMoEV1Config",
        lambda s: dict(
            num_key_value_heads=2, head_dim=s.d // 4, intermediate_size=s.p, num_experts=s.E, moe_topk=s.top_k
        ),
    ),
    "exaone_moe": TinyConfig(
        "ExaoneMoeConfig",
        lambda s: dict(
            **_dense_first(s),
            num_key_value_heads=2,
            head_dim=s.d // 4,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            num_experts=s.E,
            first_k_dense_replace=1,
        ),
    ),
    "jamba": TinyConfig(  # Mamba layer, then attention; every layer MoE
        "JambaConfig",
        lambda s: dict(
            num_key_value_heads=2,
            intermediate_size=s.p,
            num_experts=s.E,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        ),
    ),
    "lfm2_moe": TinyConfig(  # convolution layers around an attention layer; a dense first layer
        "Lfm2MoeConfig",
        lambda s: dict(
            **_dense_first(s),
            num_key_value_heads=2,
            intermediate_size=2 * s.d,
            moe_intermediate_size=s.p,
            num_experts=s.E,
            num_dense_layers=1,
            layer_types=["conv", "full_attention", "conv"],
        ),
    ),
    "granitemoe": TinyConfig("GraniteMoeConfig", _mixtral_like),
    "granitemoeshared": TinyConfig("GraniteMoeSharedConfig", _granite),
    "granitemoehybrid": TinyConfig(  # Granite 4.0: Mamba-2 layers, then attention
        "GraniteMoeHybridConfig",
        lambda s: _granite(
            s,
            layer_types=["mamba"] * (s.L - 1) + ["attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_expand=2,
        ),
    ),
    "minimax_m2": TinyConfig("MiniMaxM2Config", lambda s: {**_mixtral_like(s), "head_dim": s.d // 4}),
    "phimoe": TinyConfig("PhimoeConfig", _mixtral_like),
    "gemma4": TinyConfig(
        "Gemma4Config",
        lambda s: dict(
            text_config=dict(
                num_key_value_heads=2,
                head_dim=s.d // 4,
                global_head_dim=s.d // 4,
                intermediate_size=2 * s.d,
                moe_intermediate_size=s.p,
                num_experts=s.E,
                top_k_experts=s.top_k,
                enable_moe_block=True,
                hidden_size_per_layer_input=0,
                layer_types=["sliding_attention"] * (s.L - 1) + ["full_attention"],
                num_experts_per_tok=DROP,
                pad_token_id=1,  # Gemma 4 masks multimodal positions with the pad token
            ),
            tie_word_embeddings=False,
        ),
        common="text_config",
    ),
    "qwen3_5_moe": TinyConfig(  # linear attention, then full attention; a one-block vision tower
        "Qwen3_5MoeConfig",
        lambda s: dict(
            text_config=dict(
                num_key_value_heads=2,
                head_dim=s.d // 4,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                moe_intermediate_size=s.p,
                shared_expert_intermediate_size=s.p,
                num_experts=s.E,
                layer_types=["linear_attention"] * (s.L - 1) + ["full_attention"],
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=s.d),
            tie_word_embeddings=False,
        ),
        common="text_config",
    ),
    "qwen3_vl_moe": TinyConfig(  # Qwen3-VL MoE: a one-block vision tower with one deepstack merger
        "Qwen3VLMoeConfig",
        lambda s: dict(
            text_config=dict(
                num_key_value_heads=2,
                head_dim=s.d // 4,
                intermediate_size=2 * s.d,
                # 2p != d and p != d: transformers tells the published (transposed) layout from its own by shape
                moe_intermediate_size=s.p + 8 * (s.p in (s.d, s.d / 2)),
                num_experts=s.E,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=s.d,
                deepstack_visual_indexes=[0],
                num_position_embeddings=16,
            ),
            tie_word_embeddings=False,
        ),
        common="text_config",
    ),
    "llama4": TinyConfig(  # MoE every second layer (as Llama 4 Maverick), a shared expert in each
        "Llama4Config",
        lambda s: dict(
            text_config=dict(
                num_hidden_layers=2 * s.L,
                num_key_value_heads=2,
                head_dim=s.d // 4,
                intermediate_size=s.p,
                intermediate_size_mlp=2 * s.d,
                num_local_experts=s.E,
                interleave_moe_layer_step=2,
            ),
            vision_config=dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                vision_output_dim=32,
                image_size=28,
                patch_size=14,
                projector_input_dim=32,
                projector_output_dim=s.d,
            ),
            tie_word_embeddings=False,
        ),
        common="text_config",
    ),
    "dbrx": TinyConfig(
        "DbrxConfig",
        lambda s: dict(
            vocab_size=s.vocab,
            d_model=s.d,
            n_layers=s.L,
            n_heads=4,
            max_seq_len=512,
            # transformers 5.24's DBRX attention reads rope_theta here and clamps q/k/v by clip_qkv (8 as published)
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": s.p, "moe_num_experts": s.E, "moe_top_k": s.top_k},
            bos_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
        ),
        common=None,
    ),
    "gpt_oss": TinyConfig(  # sliding then full attention, attention sinks, YaRN as published (scaled down)
        "GptOssConfig",
        lambda s: dict(
            num_key_value_heads=2,
            head_dim=s.d // 4,
            intermediate_size=s.p,
            num_local_experts=s.E,
            sliding_window=8,
            swiglu_limit=0.2,  # the clamps act on a random tiny model's projections (7.0 as published)
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 128,
            },
        ),
    ),
    # Classes that take the usual names: the common sizes, the experts under whichever names the class has.
    **{
        model_type: TinyConfig(config_class, _usual_names, known_fields_only=True)
        for model_type, config_class in (
            ("afmoe", "AfmoeConfig"),
            ("cohere2_moe", "Cohere2MoeConfig"),
            ("flex_olmo", "FlexOlmoConfig"),
            ("hy_v3", "HYV3Config"),
            ("mimo_v2_flash", "MiMoV2FlashConfig"),
            ("minimax", "MiniMaxConfig"),
            ("solar_open", "SolarOpenConfig"),
        )
    },
}


def tiny_config_kwargs(entry: TinyConfig, sizes: TinySizes, fields: set[str] | None = None) -> dict[str, Any]:
    """The config class's arguments for `sizes`: the entry's, on top of the common ones where it puts them."""
    kwargs = entry.kwargs(sizes)
    if entry.common == "":
        kwargs = {**sizes.common, **kwargs}
    elif entry.common is not None:
        kwargs[entry.common] = {**sizes.common, **kwargs[entry.common]}
    kwargs = _without_dropped(kwargs)
    if entry.known_fields_only:
        inner, outer = kwargs["intermediate_size"]
        kwargs["intermediate_size"] = outer if "moe_intermediate_size" in fields else inner
        kwargs = {k: v for k, v in kwargs.items() if k in fields}
    return kwargs


def _without_dropped(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _without_dropped(v) if isinstance(v, dict) and k.endswith("_config") else v
        for k, v in kwargs.items()
        if v is not DROP
    }

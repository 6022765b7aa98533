"""Families whose MoE layers and sizes come from transformers itself (the model built on the meta device).

Each entry is only what transformers cannot tell: where the routed experts sit in the checkpoint as published,
when that differs from the default (`model.layers.{layer}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`).
"""

from __future__ import annotations

from .spec import ArchSpec, ExpertsQuirk, FusedTensor

_MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}  # w1 is activated, w3 multiplies, w2 projects down
_FEED_FORWARD = "model.layers.{layer}.feed_forward.experts"
_NO_ROTARY = "its decoder layers take no rotary position embeddings from the model (Mamba / convolution layers)"


def _per_expert(model_type: str, **kwargs) -> ArchSpec:
    return ArchSpec(model_type=model_type, experts="model.layers.{layer}.mlp.experts", **kwargs)


def _fused_gate_up(model_type: str, experts: str, transposed: bool = False, **kwargs) -> ArchSpec:
    """Experts stored fused on disk as the experts module holds them: `{experts}.gate_up_proj`, gate and up the two
    halves (gate first) of one (E, 2p, d) tensor, and `{experts}.down_proj` (E, d, p) (or both transposed)."""
    return ArchSpec(
        model_type=model_type,
        experts=experts,
        experts_module=experts,
        fused={
            "gate": FusedTensor(f"{experts}.gate_up_proj", part=0, parts=2, transposed=transposed),
            "up": FusedTensor(f"{experts}.gate_up_proj", part=1, parts=2, transposed=transposed),
            "down": FusedTensor(f"{experts}.down_proj", transposed=transposed),
        },
        **kwargs,
    )


def _granite(model_type: str) -> ArchSpec:
    moe = "model.layers.{layer}.block_sparse_moe"
    return ArchSpec(
        model_type=model_type,
        experts=f"{moe}.experts",
        experts_module=f"{moe}.experts",
        fused={
            "gate": FusedTensor(f"{moe}.input_linear.weight", part=0, parts=2),
            "up": FusedTensor(f"{moe}.input_linear.weight", part=1, parts=2),
            "down": FusedTensor(f"{moe}.output_linear.weight"),
        },
    )


# gpt-oss: gate_up_proj (E, d, 2p) with gate and up interleaved column by column, down_proj (E, p, d), both
# transposed, as the bf16 checkpoints store them (the published MXFP4 ones hold `_blocks` / `_scales` pairs, which
# the reader dequantises to these tensors); per-expert biases kept as they are, and a clamped SwiGLU.
_GPT_OSS_EXPERTS = "model.layers.{layer}.mlp.experts"
GPT_OSS = ArchSpec(
    model_type="gpt_oss",
    experts=_GPT_OSS_EXPERTS,
    experts_module=_GPT_OSS_EXPERTS,
    fused={
        "gate": FusedTensor(f"{_GPT_OSS_EXPERTS}.gate_up_proj", part=0, parts=2, transposed=True, interleaved=True),
        "up": FusedTensor(f"{_GPT_OSS_EXPERTS}.gate_up_proj", part=1, parts=2, transposed=True, interleaved=True),
        "down": FusedTensor(f"{_GPT_OSS_EXPERTS}.down_proj", transposed=True),
    },
    quirk=ExpertsQuirk(
        glu="clamped_swiglu",
        glu_attributes=("alpha", "limit"),
        gate_up_bias="gate_up_proj_bias",
        down_bias="down_proj_bias",
    ),
    router="model.layers.{layer}.mlp.router",
    no_calibration="its experts add biases and a clamped SwiGLU, which the calibration statistics do not model",
)

FAMILIES = (
    # Per-expert tensors, as transformers' `qwen2_moe` conversion rules expect them.
    _per_expert("deepseek_v2"),  # DeepSeek-V2 / V2-Lite: shared experts and dense first layers left alone
    _per_expert("glm4_moe"),  # GLM-4.5 / 4.6 / 4.7
    _per_expert("ernie4_5_moe"),  # ERNIE-4.5 MoE
    _per_expert("qwen3_next"),  # Qwen3-Next: hybrid (linear + full) attention, shared expert
    _per_expert("bailing_hybrid"),  # Ling / Ring 2.5 (hybrid linear attention)
    _per_expert(  # DeepSeek-V3.2 (sparse attention indexer)
        "deepseek_v32", no_calibration="its sparse-attention indexer needs the whole model's cache to run a layer"
    ),
    _per_expert("glm4_moe_lite"),  # GLM-4.7-Flash (MLA attention)
    _per_expert("dots1"),  # dots.llm1
    _per_expert("hunyuan_v1_moe"),  # Hunyuan-A13B
    _per_expert("exaone_moe"),  # K-EXAONE
    _per_expert("afmoe"),  # Arcee Trinity
    _per_expert("cohere2_moe"),  # Cohere MoE
    _per_expert("flex_olmo"),  # FlexOlmo
    _per_expert("hy_v3"),  # Hunyuan v3
    _per_expert(  # MiMo-V2-Flash
        "mimo_v2_flash", no_calibration="its attention has no SDPA implementation, which the layer stream runs"
    ),
    _per_expert("solar_open"),  # Solar Open
    ArchSpec(  # Jamba (Mamba / attention)
        model_type="jamba", experts=_FEED_FORWARD, experts_module=_FEED_FORWARD, no_calibration=_NO_ROTARY
    ),
    ArchSpec(  # LFM2-MoE (LFM2-8B-A1B): Mixtral-style names under `feed_forward`
        model_type="lfm2_moe",
        experts=_FEED_FORWARD,
        experts_module=_FEED_FORWARD,
        matrices=_MIXTRAL_NAMES,
        no_calibration=_NO_ROTARY,
    ),
    # Mixtral-style names under `block_sparse_moe`, which transformers renames to `mlp`.
    ArchSpec(
        model_type="minimax_m2",
        experts="model.layers.{layer}.block_sparse_moe.experts",
        matrices=_MIXTRAL_NAMES,
    ),
    ArchSpec(  # MiniMax-Text-01 / M1 (lightning attention)
        model_type="minimax",
        experts="model.layers.{layer}.block_sparse_moe.experts",
        matrices=_MIXTRAL_NAMES,
    ),
    ArchSpec(
        model_type="phimoe",
        experts="model.layers.{layer}.block_sparse_moe.experts",
        matrices=_MIXTRAL_NAMES,
    ),
    # Fused on disk. IBM Granite MoE: `input_linear` (E, 2p, d), `output_linear` (E, d, p); 3.x, 3.x with a shared
    # expert, and 4.0 (hybrid Mamba-2 / attention).
    _granite("granitemoe"),
    _granite("granitemoeshared"),
    _granite("granitemoehybrid"),
    _fused_gate_up("gemma4", "model.language_model.layers.{layer}.experts"),  # Gemma 4 MoE (text part)
    # Qwen3.5 MoE (text part; hybrid linear attention). AutoModelForCausalLM would build the text-only model, whose
    # names drop `language_model`; the multimodal class holds the tensors under the checkpoint's own names.
    _fused_gate_up(
        "qwen3_5_moe",
        "model.language_model.layers.{layer}.mlp.experts",
        model_class="Qwen3_5MoeForConditionalGeneration",
    ),
    # Qwen3-VL MoE (text part): fused and transposed on disk, gate_up_proj (E, d, 2p) and down_proj (E, p, d); its
    # experts module holds them untransposed (transformers' conversion rules transpose them on load).
    _fused_gate_up(
        "qwen3_vl_moe",
        "model.language_model.layers.{layer}.mlp.experts",
        transposed=True,
        model_class="Qwen3VLMoeForConditionalGeneration",
    ),
    # Llama 4 (text part): fused and transposed, gate_up_proj (E, d, 2p) and down_proj (E, p, d); its experts module
    # takes every token for every expert, pre-scaled by the routing weights (`MobeExperts` computes routed rows only).
    _fused_gate_up(
        "llama4",
        "language_model.model.layers.{layer}.feed_forward.experts",
        transposed=True,
        model_class="Llama4ForConditionalGeneration",
        text_model="language_model",  # its multimodal forward fails on every input in transformers 5.24
    ),
    # Text-only forms of the multimodal families above (`AutoModelForCausalLM.from_config(<Family>TextConfig(...))`,
    # saved by transformers): the same experts without the `language_model` wrapper in their names. Qwen3.5-MoE's are
    # saved one tensor per expert (transformers' `qwen2_moe` rules); Gemma 4's and Llama 4's as the module holds them.
    _per_expert("qwen3_5_moe_text"),
    _fused_gate_up("gemma4_text", "model.layers.{layer}.experts"),
    _fused_gate_up("llama4_text", _FEED_FORWARD, transposed=True),
    # DBRX: per layer three (E * p, d) tensors, w1 (gate) and v1 (up) as (p, d) per expert, w2 the transpose of
    # down, (p, d) per expert; the experts module holds them as they are and calls its activation `mlp.activation_fn`.
    ArchSpec(
        model_type="dbrx",
        experts="transformer.blocks.{layer}.ffn.experts",
        experts_module="transformer.blocks.{layer}.ffn.experts",
        fused={
            "gate": FusedTensor("transformer.blocks.{layer}.ffn.experts.mlp.w1", flat=True),
            "up": FusedTensor("transformer.blocks.{layer}.ffn.experts.mlp.v1", flat=True),
            "down": FusedTensor("transformer.blocks.{layer}.ffn.experts.mlp.w2", transposed=True, flat=True),
        },
        activation="mlp.activation_fn",
    ),
    GPT_OSS,
)

# Families mobe knows of and cannot read, each with the reason (the error a user gets).
UNSUPPORTED = {
    "bailing_moe": "Ling / Ring 2.0 (bailing_moe) ships only as remote code; the installed transformers has no "
    "bailing_moe class (bailing_hybrid is supported)",
    "qwen3_vl_moe_text": "the installed transformers has no causal-LM class for the text-only Qwen3-VL-MoE (its text "
    "model has no lm_head): compress the published qwen3_vl_moe checkpoint",
    "nemotron_h": "Nemotron-H experts are not gated (relu2(up x), then down): there is no gate matrix to factorise "
    "beside up, and the factorised experts compute act(gate x) * (up x)",
}

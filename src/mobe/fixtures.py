"""Small MoE checkpoints built offline from transformers config classes, in the real sharded layout.

Used by the demo, the tests and the benchmarks: no hub access needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def tiny_config(
    model_type: str,
    *,
    hidden_size: int = 32,
    moe_intermediate_size: int = 16,
    num_experts: int = 8,
    num_layers: int = 2,
    vocab_size: int = 128,
    top_k: int = 2,
    initializer_range: float = 0.02,
):
    """A transformers config of `model_type` with small sizes (every supported architecture).

    A larger `initializer_range` gives a random model peaked output distributions, which a compression visibly
    changes (with the default, every output is close to uniform)."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_experts_per_tok=top_k,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            norm_topk_prob=True,
        )
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            num_key_value_heads=2,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            shared_expert_intermediate_size=2 * moe_intermediate_size,
        )
    if model_type == "mixtral":
        return tf.MixtralConfig(
            **common, num_key_value_heads=2, intermediate_size=moe_intermediate_size, num_local_experts=num_experts
        )
    if model_type == "olmoe":
        return tf.OlmoeConfig(
            **common, num_key_value_heads=4, intermediate_size=moe_intermediate_size, num_experts=num_experts
        )
    if model_type == "deepseek_v3":
        # One dense first layer, then MoE layers, as in DeepSeek-V3 / Kimi-K2.
        return tf.DeepseekV3Config(
            **{**common, "num_hidden_layers": num_layers + 1},
            num_key_value_heads=4,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=2,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    layers3 = {**common, "num_hidden_layers": num_layers + 1}  # a dense first layer, then MoE layers
    if model_type == "deepseek_v2":
        return tf.DeepseekV2Config(
            **layers3,
            num_key_value_heads=4,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    if model_type == "glm4_moe":
        return tf.Glm4MoeConfig(
            **layers3,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            n_routed_experts=num_experts,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        )
    if model_type == "ernie4_5_moe":
        return tf.Ernie4_5_MoeConfig(
            **layers3,
            num_key_value_heads=2,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            moe_num_experts=num_experts,
            moe_k=top_k,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_interval=1,
        )
    if model_type == "qwen3_next":  # layers 0-2 linear attention, layer 3 full attention; every layer MoE
        return tf.Qwen3NextConfig(
            **{**common, "num_hidden_layers": max(num_layers, 4)},
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            shared_expert_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
        )
    if model_type == "bailing_hybrid":
        return tf.BailingHybridConfig(
            **layers3,
            num_key_value_heads=4,
            head_dim=hidden_size // 4,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            num_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            layer_group_size=num_layers + 1,  # linear attention, then one full-attention layer last
        )
    mla = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    deepseek_like = dict(
        num_key_value_heads=4,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        n_routed_experts=num_experts,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )
    if model_type == "deepseek_v32":
        return tf.DeepseekV32Config(**layers3, **deepseek_like, **mla, index_n_heads=2, index_head_dim=16, index_topk=4)
    if model_type == "glm4_moe_lite":
        return tf.Glm4MoeLiteConfig(**layers3, **deepseek_like, **mla)
    if model_type == "dots1":
        return tf.Dots1Config(**layers3, **{**deepseek_like, "num_key_value_heads": 2}, head_dim=hidden_size // 4)
    if model_type == "hunyuan_v1_moe":
        return tf.HunYuanMoEV1Config(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            moe_topk=top_k,
        )
    if model_type == "exaone_moe":
        return tf.ExaoneMoeConfig(
            **layers3,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            first_k_dense_replace=1,
        )
    if model_type == "jamba":  # Mamba layer, then attention; every layer MoE
        return tf.JambaConfig(
            **common,
            num_key_value_heads=2,
            intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        )
    if model_type == "lfm2_moe":  # convolution layers around an attention layer; a dense first layer
        return tf.Lfm2MoeConfig(
            **layers3,
            num_key_value_heads=2,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            num_dense_layers=1,
            layer_types=["conv", "full_attention", "conv"],
        )
    if model_type in ("granitemoeshared", "granitemoehybrid"):
        extra: dict[str, Any] = dict(shared_intermediate_size=moe_intermediate_size)
        if model_type == "granitemoehybrid":  # Granite 4.0: a Mamba-2 layer, then attention
            extra.update(
                layer_types=["mamba"] * (num_layers - 1) + ["attention"],
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_d_state=8,
                mamba_n_groups=1,
                mamba_expand=2,
            )
        config_cls = tf.GraniteMoeSharedConfig if model_type == "granitemoeshared" else tf.GraniteMoeHybridConfig
        return config_cls(
            **common,
            num_key_value_heads=2,
            intermediate_size=moe_intermediate_size,
            num_local_experts=num_experts,
            **extra,
        )
    if model_type == "minimax_m2":
        return tf.MiniMaxM2Config(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=moe_intermediate_size,
            num_local_experts=num_experts,
        )
    if model_type == "phimoe":
        return tf.PhimoeConfig(
            **common, num_key_value_heads=2, intermediate_size=moe_intermediate_size, num_local_experts=num_experts
        )
    if model_type == "granitemoe":
        return tf.GraniteMoeConfig(
            **common, num_key_value_heads=2, intermediate_size=moe_intermediate_size, num_local_experts=num_experts
        )
    if model_type == "gemma4":
        text = dict(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            global_head_dim=hidden_size // 4,
            intermediate_size=2 * hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            top_k_experts=top_k,
            enable_moe_block=True,
            hidden_size_per_layer_input=0,
            layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        )
        text.pop("num_experts_per_tok")
        text["pad_token_id"] = 1  # Gemma 4 masks multimodal positions with the pad token
        return tf.Gemma4Config(text_config=text, tie_word_embeddings=False)
    if model_type == "qwen3_5_moe":  # linear attention, then full attention; a one-block vision tower
        text = dict(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            moe_intermediate_size=moe_intermediate_size,
            shared_expert_intermediate_size=moe_intermediate_size,
            num_experts=num_experts,
            layer_types=["linear_attention"] * (num_layers - 1) + ["full_attention"],
        )
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size)
        return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if model_type == "qwen3_vl_moe":  # Qwen3-VL MoE: a one-block vision tower with one deepstack merger
        text = dict(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=2 * hidden_size,
            # 2p != d and p != d: transformers tells the published (transposed) layout from its own by shape
            moe_intermediate_size=moe_intermediate_size + 8 * (moe_intermediate_size in (hidden_size, hidden_size / 2)),
            num_experts=num_experts,
        )
        vision = dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden_size,
            deepstack_visual_indexes=[0],
            num_position_embeddings=16,
        )
        return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if model_type == "llama4":  # MoE every second layer (as Llama 4 Maverick), a shared expert in each
        text = dict(
            **{**common, "num_hidden_layers": 2 * num_layers},
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=moe_intermediate_size,
            intermediate_size_mlp=2 * hidden_size,
            num_local_experts=num_experts,
            interleave_moe_layer_step=2,
        )
        vision = dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vision_output_dim=32,
            image_size=28,
            patch_size=14,
            projector_input_dim=32,
            projector_output_dim=hidden_size,
        )
        return tf.Llama4Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if model_type == "dbrx":
        return tf.DbrxConfig(
            vocab_size=vocab_size,
            d_model=hidden_size,
            n_layers=num_layers,
            n_heads=4,
            max_seq_len=512,
            # transformers 5.24's DBRX attention reads rope_theta here and clamps q/k/v by clip_qkv (8 as published)
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": moe_intermediate_size, "moe_num_experts": num_experts, "moe_top_k": top_k},
            bos_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
        )
    if model_type == "gpt_oss":  # sliding then full attention, attention sinks, YaRN as published (scaled down)
        return tf.GptOssConfig(
            **common,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            intermediate_size=moe_intermediate_size,
            num_local_experts=num_experts,
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
        )
    if model_type.endswith("_text"):  # a multimodal family's text-only form: the text part of its tiny config
        sizes = dict(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size, num_experts=num_experts)
        sizes.update(num_layers=num_layers, vocab_size=vocab_size, top_k=top_k, initializer_range=initializer_range)
        return tiny_config(model_type.removesuffix("_text"), **sizes).get_text_config()
    if model_type in _PLAIN_CONFIGS:
        return _plain_config(model_type, common, hidden_size, moe_intermediate_size, num_experts)
    raise ValueError(f"no tiny config for model_type {model_type!r}")


# Families whose config classes take the usual names: their tiny configs are the common sizes, with the expert count
# and expert intermediate size under whichever names the class has.
_PLAIN_CONFIGS = ("afmoe", "cohere2_moe", "flex_olmo", "hy_v3", "mimo_v2_flash", "minimax", "solar_open")


def _plain_config(model_type: str, common: dict[str, Any], hidden_size: int, p: int, num_experts: int):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    fields = set(config_cls.__dataclass_fields__)
    wanted = {
        **common,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "intermediate_size": p if "moe_intermediate_size" not in fields else 2 * hidden_size,
        "moe_intermediate_size": p,
        "num_experts": num_experts,
        "num_local_experts": num_experts,
        "n_routed_experts": num_experts,
    }
    return config_cls(**{k: v for k, v in wanted.items() if k in fields})


def build_tiny_moe(
    path: str | Path,
    model_type: str = "qwen3_moe",
    *,
    seed: int = 0,
    max_shard_size: str = "100KB",
    dtype: torch.dtype = torch.float32,
    **sizes,
) -> Path:
    """Save a randomly initialised tiny MoE of `model_type` to `path` with `save_pretrained` (sharded), in the
    layout its published checkpoints have (see `fuse_experts_on_disk`)."""
    from transformers import GenerationConfig

    from .architectures import get_arch
    from .architectures.derive import model_class

    torch.manual_seed(seed)
    config = tiny_config(model_type, **sizes)
    arch = get_arch(model_type)
    model = model_class(model_type, arch.model_class)(config).to(dtype)
    if arch.quirk is not None:  # transformers initialises expert biases to zero: make them count
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in arch.quirk.biases:
                torch.nn.init.normal_(param.data, std=0.1)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    fuse_experts_on_disk(path)
    transpose_experts_on_disk(path)
    return path


def transpose_experts_on_disk(path: Path) -> None:
    """Rewrite fused experts tensors saved in the experts module's orientation in the transposed one the family's
    published checkpoints hold (Qwen3-VL-MoE: transformers 5 transposes them on load, and saves them as it holds
    them); tensors already as published are left alone."""
    from safetensors.torch import load_file

    from .architectures import moe_layout
    from .checkpoint import CheckpointReader
    from .export.files import atomic_save_file

    reader = CheckpointReader(path)
    layout = moe_layout(reader.config)
    wrong = {}
    for layer in layout.moe_layers if layout.arch.fused is not None else ():
        for matrix in ("gate", "up", "down"):
            name = layout.stored_names(layer, matrix)[0]
            published = layout.fused_shape(matrix)
            if len(published) == 3 and reader.shape(name) == (published[0], published[2], published[1]) != published:
                wrong[name] = reader.weight_map[name]
    for shard in sorted(set(wrong.values())):
        tensors = load_file(path / shard)
        for name in [n for n, s in wrong.items() if s == shard]:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
        atomic_save_file(tensors, path / shard, {"format": "pt"})


def fuse_experts_on_disk(path: Path) -> None:
    """Rewrite per-expert tensors as the fused ones the family's published checkpoints hold.

    transformers' save_pretrained reverses its loading rules, so it writes Qwen3.5-MoE's experts one tensor per
    expert (the `qwen2_moe` rules it also loads), while the published checkpoints store them fused (the module's
    own `gate_up_proj` and `down_proj`). This applies those rules forward on the saved files; families saved as
    published already are left alone.
    """
    from safetensors.torch import load_file

    from .architectures import moe_layout
    from .checkpoint import CheckpointReader
    from .export.files import atomic_save_file, write_json_atomic

    reader = CheckpointReader(path)
    layout = moe_layout(reader.config)
    arch = layout.arch
    per_expert = {m: f"{arch.experts}.{{e}}.{arch.matrices[m]}.weight" for m in ("gate", "up", "down")}
    if arch.fused is None or per_expert["gate"].format(layer=layout.moe_layers[0], e=0) not in reader.weight_map:
        return
    shards = {shard: load_file(path / shard) for shard in reader.shards}
    weight_map = dict(reader.weight_map)
    for layer in layout.moe_layers:
        for name, matrices in layout.fused_tensors(layer).items():
            blocks = {}
            for m in matrices:
                names = [per_expert[m].format(layer=layer, e=e) for e in range(layout.num_experts)]
                blocks[m] = torch.stack([shards[weight_map[n]].pop(n) for n in names])
                target = weight_map[names[0]]
                for n in names:
                    del weight_map[n]
            shards[target][name] = layout.assemble_fused(matrices, blocks)
            weight_map[name] = target
    for shard, tensors in shards.items():
        atomic_save_file(tensors, path / shard, {"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        write_json_atomic({**index, "weight_map": dict(sorted(weight_map.items()))}, index_file)


def mxfp4_experts_on_disk(path: Path, seed: int = 0) -> None:
    """Rewrite a saved gpt-oss checkpoint's expert weights in the published MXFP4 layout (`mobe.checkpoint.mxfp4`).

    Each `gate_up_proj` / `down_proj` becomes `_blocks` and `_scales` of random FP4 codes and exponents 2^-8..2^-6
    (weights of a few hundredths, as a tiny model's), and config.json declares `quantization_config` as gpt-oss does:
    the model's expert weights are then what these dequantise to. Both sizes (hidden, intermediate) must be
    multiples of 32.
    """
    from safetensors.torch import load_file

    from .checkpoint import CheckpointReader
    from .checkpoint.mxfp4 import BLOCKS_SUFFIX, SCALES_SUFFIX
    from .export.files import atomic_save_file, write_json_atomic

    generator = torch.Generator().manual_seed(seed)
    reader = CheckpointReader(path)
    weight_map = dict(reader.weight_map)
    for shard in reader.shards:
        tensors = load_file(path / shard)
        for name in [n for n in sorted(tensors) if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
            experts, inp, out = tensors.pop(name).shape
            if inp % 32:
                raise ValueError(f"{name}: MXFP4 groups 32 values; input size {inp} is not a multiple of 32")
            tensors[name + BLOCKS_SUFFIX] = torch.randint(0, 256, (experts, out, inp // 32, 16), generator=generator)
            tensors[name + BLOCKS_SUFFIX] = tensors[name + BLOCKS_SUFFIX].to(torch.uint8)
            tensors[name + SCALES_SUFFIX] = torch.randint(119, 122, (experts, out, inp // 32), generator=generator)
            tensors[name + SCALES_SUFFIX] = tensors[name + SCALES_SUFFIX].to(torch.uint8)
            del weight_map[name]
            weight_map.update(dict.fromkeys((name + BLOCKS_SUFFIX, name + SCALES_SUFFIX), shard))
        atomic_save_file(tensors, path / shard, {"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        write_json_atomic({**index, "weight_map": dict(sorted(weight_map.items()))}, index_file)
    not_converted = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    quantization = {"modules_to_not_convert": not_converted, "quant_method": "mxfp4"}
    write_json_atomic({**reader.config, "quantization_config": quantization}, path / "config.json")


TRAINED_FIXTURE = "qwen3-moe-trained"  # coarse: 16 experts of p=256 on d=128, top-2 (p > d)
FINE_FIXTURE = "qwen2-moe-fine-trained"  # fine-grained: 64 experts of p=64 on d=256, top-8, shared expert (p < d)
_REBUILD = {
    TRAINED_FIXTURE: ("--out fixtures/qwen3-moe-trained --steps 2000", "python3.11-doc"),
    FINE_FIXTURE: ("--fine-grained --out fixtures/qwen2-moe-fine-trained", "perl-doc"),
}


def trained_fixture_path(name: str = TRAINED_FIXTURE) -> Path:
    """One of the repository's trained MoE fixtures (`fixtures/NAME`, built by scripts/train_fixture.py).

    Small models trained on documentation corpora, so their experts carry learned structure, unlike the random
    checkpoints of `build_tiny_moe`: the coarse Qwen3-MoE (`TRAINED_FIXTURE`, p > d) and the fine-grained
    Qwen2-MoE (`FINE_FIXTURE`, p < d like today's MoEs). Load with `AutoModelForCausalLM` / `AutoTokenizer`.
    """
    path = Path(__file__).resolve().parents[2] / "fixtures" / name
    if not (path / "config.json").is_file():
        flags, package = _REBUILD.get(name, (f"--out fixtures/{name}", "its corpus"))
        raise FileNotFoundError(
            f"trained fixture not found at {path}: it ships with the git repository (not the installed package); "
            f"rebuild it with `python scripts/train_fixture.py {flags}` (needs the Debian package {package})"
        )
    return path


def heldout_text(name: str = TRAINED_FIXTURE) -> str:
    """Held-out text of a trained fixture (whole documents never trained on), for perplexity checks."""
    return (trained_fixture_path(name) / "heldout.txt").read_text(encoding="utf-8")

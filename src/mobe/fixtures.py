"""Small MoE checkpoints built offline from transformers config classes, in the real sharded layout.

Used by the demo, the tests and the benchmarks: no hub access needed.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    """A transformers config of `model_type` with small sizes (every supported architecture: `TINY_CONFIGS`).

    A larger `initializer_range` gives a random model peaked output distributions, which a compression visibly
    changes (with the default, every output is close to uniform)."""
    import transformers

    from .tiny_configs import TINY_CONFIGS, TinySizes, tiny_config_kwargs

    if model_type.endswith("_text") and model_type.removesuffix("_text") in TINY_CONFIGS:  # the text-only form
        sizes = dict(hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size, num_experts=num_experts)
        sizes.update(num_layers=num_layers, vocab_size=vocab_size, top_k=top_k, initializer_range=initializer_range)
        return tiny_config(model_type.removesuffix("_text"), **sizes).get_text_config()
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type {model_type!r}")
    entry = TINY_CONFIGS[model_type]
    config_cls = getattr(transformers, entry.config_class)
    sizes = TinySizes(
        d=hidden_size,
        p=moe_intermediate_size,
        E=num_experts,
        L=num_layers,
        top_k=top_k,
        vocab=vocab_size,
        init=initializer_range,
    )
    return config_cls(**tiny_config_kwargs(entry, sizes, set(getattr(config_cls, "__dataclass_fields__", ()))))


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
